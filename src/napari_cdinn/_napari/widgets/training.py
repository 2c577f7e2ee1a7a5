"""Training dock: train the CDI NN networks on simulated data, with a live loss plot.

The objects (the paper's, textured, non-convex, or the realistic mixture), the detector model and
the mask channel are the trainer's options; left at "as the start model" they follow the weights
training starts from (:func:`napari_cdinn.nn.train`'s ``init_from``).
Wired to :func:`napari_cdinn.nn.train` and its callback events (``step``: running training
loss; ``checkpoint``/``validation``: validation loss).  Training runs in a thread worker, for
its epochs or until its time limit, optionally keeping the mean of the weights over the last part
of the schedule (stochastic weight averaging).  Stop asks the trainer to stop, which saves a
usable checkpoint (``last.safetensors``, and ``best.safetensors`` when it is the best so far) in
the output folder before returning.  The model folder is then offered at once in the inversion
and retrieval widgets' model pickers (offered, not chosen: a picker keeps its choice).

Below the training form, *Adapt to this stack* (:class:`.adapt.AdaptPanel`) fine-tunes a model on
a pattern layer without ground truth (:func:`napari_cdinn.nn.adapt.adapt`); its model is offered the same way.

The widgets' state is a :class:`~napari_cdinn.nn.config.TrainConfig` (the paper preset with the
values chosen: :meth:`TrainingWidget.config`); the loss-weight tooltips are the fields' help.
"""

from __future__ import annotations

from pathlib import Path

from magicgui import widgets

from ...device import DEVICES
from ...nn import TrainConfig, option_help
from ...nn.config import run_files
from ._common import JobControls, JobRunner, PlotCanvas, notify, notify_error, persist
from ._models import REGISTRY, register_model
from .adapt import AdaptPanel


def _start_choices(_widget=None):
    """"random weights" (None), then every shipped and trained model."""
    return [("random weights", None)] + REGISTRY.choices()


def _weight_box(label, name, value=0.0, minimum=0.0):
    """A spin box for the loss weight ``name`` (a TrainConfig field; 0..100 in steps of 0.5)."""
    return widgets.FloatSpinBox(label=label, value=value, min=minimum, max=100.0, step=0.5, tooltip=option_help(name))


def training_job(out, options, progress, should_stop):
    """Worker body: ``nn.train`` with events forwarded to ``progress``; returns its final state.

    ``options``: TrainConfig fields (None: the preset's or the initial weights' value) and the
    trainer's run-control arguments (``device``, ``resume``, ``quick_val_size``).
    """
    from ...nn import train

    return train(out, callback=progress, stop=should_stop, **options)


class TrainingWidget(widgets.Container):
    """Dock widget: train the networks with a live plot of training and validation loss."""

    def __init__(self, napari_viewer):
        self.viewer = napari_viewer
        self.train_size = widgets.SpinBox(label="training examples", value=180_000, min=1, max=100_000_000, step=1024)
        self.val_size = widgets.SpinBox(label="validation examples", value=20_000, min=1, max=10_000_000, step=1024)
        self.epochs = widgets.SpinBox(label="epochs", value=10, min=1, max=10_000)
        self.batch_size = widgets.SpinBox(label="batch", value=256, min=1, max=65_536)
        self.device = widgets.ComboBox(label="device", choices=DEVICES, value="auto")
        self.out = widgets.FileEdit(label="model folder", mode="d", value="")
        self.resume = widgets.CheckBox(label="resume", value=False)
        self.init_from = widgets.ComboBox(label="start from", choices=_start_choices,
                                          tooltip="random weights, or " + option_help("init_from"))
        self.arch = widgets.ComboBox(
            label="architecture",
            choices=[("as the start model (else shared)", None), ("shared encoder, 32 x 32 input", "shared"),
                     ("shared encoder, 2x-oversampled input", "shared2x"),
                     ("one more level: 64-pixel objects, 128 x 128 input", "deep2x"), ("the paper's pair", "paper")],
            tooltip=option_help("arch"))
        self.families = widgets.ComboBox(
            label="objects",
            choices=[("as the start model (else the paper's)", None), ("the paper's (flat, convex)", "paper"),
                     ("textured", "textured"), ("non-convex, with holes", "holes"), ("realistic mixture", "realistic"),
                     ("realistic, more of the paper's", "realistic-paper")],
            tooltip=option_help("families"))
        self.detector = widgets.ComboBox(
            label="detector",
            choices=[("as the start model (else ideal)", None), ("ideal", "ideal"),
                     ("realistic (noise, beamstop, gaps)", "realistic"),
                     ("realistic, 40 % noise-free", "realistic-clean"),
                     ("that, half cut up to 2 px off-centre", "realistic-offcentre")],
            tooltip=option_help("detector"))
        self.mask_channel = widgets.CheckBox(
            label="read the unmeasured-pixel map", value=False,
            tooltip=option_help("mask_channel") + "; off: as the start model (a start model that reads it keeps it)")
        self.fresh = widgets.CheckBox(label="new examples every epoch", value=False, tooltip=option_help("fresh_data"))
        self.data_weight = _weight_box("data-consistency weight", "data_weight")
        self.support_weight = _weight_box("support weight", "support_weight")
        self.miss_weight = _weight_box("missed-pixel weight", "miss_weight", value=1.0, minimum=0.01)
        self.time_limit = widgets.FloatSpinBox(
            label="time limit (min)", value=0.0, min=0.0, max=100_000.0, step=5.0,
            tooltip="end training after this many minutes, a cosine schedule decaying by then (0: no limit)")
        self.average = widgets.SpinBox(
            label="average last (%)", value=0, min=0, max=99, step=10,
            tooltip="keep the mean of the weights over this last part of the schedule (stochastic weight "
                    "averaging, average.safetensors); it becomes the best model when it validates better (0: off)")
        self.runner = JobRunner(self._on_event, self._on_result, on_finish=self._on_finish)
        self.controls = JobControls("Train", self.run, self.runner)
        super().__init__(widgets=[self.train_size, self.val_size, self.epochs, self.batch_size, self.device,
                                  self.out, self.resume, self.init_from, self.arch, self.families, self.detector,
                                  self.mask_channel, self.fresh, self.data_weight,
                                  self.support_weight, self.miss_weight, self.time_limit, self.average, self.controls])
        REGISTRY.changed.connect(self._refresh_models)
        # TrainConfig field -> (widget, its value as the field holds it; None: the preset's or the initial weights')
        self._fields = {
            "train_size": (self.train_size, int), "val_size": (self.val_size, int), "epochs": (self.epochs, int),
            "batch_size": (self.batch_size, int), "init_from": (self.init_from, None), "arch": (self.arch, None),
            "families": (self.families, None), "detector": (self.detector, None),
            "mask_channel": (self.mask_channel, lambda v: True if v else None),
            "fresh_data": (self.fresh, bool), "data_weight": (self.data_weight, float),
            "support_weight": (self.support_weight, float), "miss_weight": (self.miss_weight, float),
            "time_limit_min": (self.time_limit, lambda v: float(v) or None),
            "average_from": (self.average, lambda v: 1.0 - int(v) / 100 if v else None),
        }
        self.plot = PlotCanvas(height=2.8)
        self.plot.add_to(self)
        self.adapt = AdaptPanel(napari_viewer)  # below the training plot
        self.native.layout().addWidget(self.adapt.native)
        persist(self, "training", ("train_size", "val_size", "epochs", "batch_size", "device", "out", "fresh",
                                   "arch", "families", "detector", "mask_channel", "data_weight", "support_weight",
                                   "miss_weight", "time_limit", "average"))
        self.history = {"train": [], "val": []}
        self._total = 1
        self._folder = None

    def run(self):
        """Start training into the chosen model folder."""
        text = str(self.out.value or "").strip()
        if not text or text == ".":
            notify_error("choose a model folder to write the checkpoints to")
            return
        folder = Path(text)
        if folder.exists() and not folder.is_dir():
            notify_error(f"{folder} exists and is not a folder")
            return
        try:
            config = self.config()
        except ValueError as exc:
            notify_error(str(exc))
            return
        if not self.resume.value and run_files(folder):  # said at once, not after the data are simulated
            notify_error(f"the model folder {str(folder)!r} already holds a training run: tick resume to continue "
                         "it, or choose a new folder")
            return
        if self.resume.value and not (folder / "last.json").is_file():
            notify(f"no checkpoint in {folder}: a new run starts")
        options = dict(self.choices(), device=self.device.value, resume=bool(self.resume.value),
                       quick_val_size=min(2000, config.val_size))
        self._folder = folder
        self._total = config.train_size * config.epochs
        self.history = {"train": [], "val": []}
        self._draw()
        self.controls.busy("simulating data and starting...")
        self.runner.start(lambda progress, should_stop: training_job(folder, options, progress, should_stop))

    def choices(self) -> dict:
        """The recipe chosen in the dock: TrainConfig fields (None: the preset's or the initial weights' value)."""
        return {name: (w.value if convert is None or w.value is None else convert(w.value))
                for name, (w, convert) in self._fields.items()}

    def config(self) -> TrainConfig:
        """The dock's recipe as a TrainConfig (the paper preset with :meth:`choices`; ``ValueError`` if invalid)."""
        return TrainConfig.from_preset("paper", **self.choices())

    def _refresh_models(self):
        try:
            self.init_from.reset_choices()
        except RuntimeError:  # the Qt widget was closed with its viewer: stop listening
            REGISTRY.changed.disconnect(self._refresh_models)

    def _on_event(self, event):
        kind = event.get("event")
        epochs = event.get("examples", 0) / max(self._total / max(int(self.epochs.value), 1), 1)
        if kind in ("step", "epoch") and event.get("train_loss") is not None:
            self.history["train"].append((epochs, event["train_loss"]))
        if kind in ("checkpoint", "validation") and event.get("val_loss") is not None:
            self.history["val"].append((epochs, event["val_loss"]))
        if kind in ("step", "epoch", "checkpoint", "validation"):
            done = event.get("examples", 0) / self._total
            if self.time_limit.value:  # whichever ends first: the epochs or the time
                done = max(done, event.get("elapsed_s", 0.0) / (60 * float(self.time_limit.value)))
            self.controls.set_progress(min(int(1000 * done), 1000), 1000,
                                       f"epoch {event.get('epoch', 0)}, {event.get('examples', 0)} examples")
            self._draw()

    def _draw(self):
        ax = self.plot.axes
        ax.clear()
        for key, style in (("train", "-"), ("val", "o-")):
            if self.history[key]:
                x, y = zip(*self.history[key], strict=True)
                ax.plot(x, y, style, label=f"{key} loss", ms=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        if any(self.history.values()):
            ax.legend(fontsize="small")
        self.plot.draw()

    def _on_result(self, state):
        label = f"{self._folder.name} (trained)"
        register_model(self._folder, label)
        ended = {"stopped": "stopped, checkpoint saved", "time limit": "done (time limit)"}.get(state.get("ended"), "done")
        text = f"{ended}: {label} is ready in the model pickers"
        notify(text)
        self.controls.idle(text)

    def _on_finish(self):
        if not self.controls.run_button.enabled:
            self.controls.idle()
