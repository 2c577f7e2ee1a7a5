"""Training dock: train the CDI NN networks on simulated paper-recipe data, with a live loss plot.

Wired to :func:`napari_cdinn.nn.train` and its callback events (``step``: running training
loss; ``checkpoint``/``validation``: validation loss).  Training runs in a thread worker, for
its epochs or until its time limit, optionally keeping the mean of the weights over the last part
of the schedule (stochastic weight averaging).  Stop asks the trainer to stop, which saves a
usable checkpoint (``last.safetensors``, and ``best.safetensors`` when it is the best so far) in
the output folder before returning.  The model folder is then offered at once in the inversion
and retrieval widgets' model pickers.
"""

from __future__ import annotations

from pathlib import Path

from magicgui import widgets

from ..device import DEVICES
from ._common import JobControls, JobRunner, PlotCanvas, notify, notify_error
from ._models import REGISTRY, register_model


def _start_choices(_widget=None):
    """"random weights" (None), then every shipped and trained model."""
    return [("random weights", None)] + REGISTRY.choices()


def _weight_box(label, tooltip, value=0.0, minimum=0.0):
    """A spin box for one weight of the loss (0..100 in steps of 0.5)."""
    return widgets.FloatSpinBox(label=label, value=value, min=minimum, max=100.0, step=0.5, tooltip=tooltip)


def training_job(out, options, progress, should_stop):
    """Worker body: ``nn.train`` with events forwarded to ``progress``; returns its final state."""
    from ..nn import train

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
        self.init_from = widgets.ComboBox(label="start from", choices=_start_choices, nullable=True,
                                          tooltip="random weights, or continue training a shipped or trained model")
        self.arch = widgets.ComboBox(
            label="architecture", value=None, nullable=True,
            choices=[("as the start model (else shared)", None), ("shared encoder, 32 x 32 input", "shared"),
                     ("shared encoder, 2x-oversampled input", "shared2x"), ("the paper's pair", "paper")],
            tooltip="shared2x reads the whole 64 x 64 pattern; started from shared weights it begins where they stand")
        self.fresh = widgets.CheckBox(label="new examples every epoch", value=False,
                                      tooltip="draw fresh simulated examples each epoch instead of repeating the set")
        self.data_weight = _weight_box(
            "data-consistency weight",
            "weight of the chi^2 of each prediction against its own pattern, added to the loss (0: the paper's loss)")
        self.support_weight = _weight_box(
            "support weight", "weight of a loss term asking the shape's 0.1 threshold to draw the true support "
                              "(0: the paper's loss)")
        self.miss_weight = _weight_box(
            "missed-pixel weight", "weight of object against background pixels in the support term; above 1 the "
                                   "threshold draws more of the object, whose phase a missed pixel loses",
            value=1.0, minimum=0.01)
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
                                  self.out, self.resume, self.init_from, self.arch, self.fresh, self.data_weight,
                                  self.support_weight, self.miss_weight, self.time_limit, self.average, self.controls])
        REGISTRY.changed.connect(self._refresh_models)
        self.plot = PlotCanvas(height=2.8)
        self.plot.add_to(self)
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
        options = {"train_size": int(self.train_size.value), "val_size": int(self.val_size.value),
                   "epochs": int(self.epochs.value), "batch_size": int(self.batch_size.value),
                   "device": self.device.value, "resume": bool(self.resume.value),
                   "quick_val_size": min(2000, int(self.val_size.value)),
                   "init_from": self.init_from.value, "arch": self.arch.value, "fresh_data": bool(self.fresh.value),
                   "data_weight": float(self.data_weight.value),
                   "support_weight": float(self.support_weight.value), "miss_weight": float(self.miss_weight.value),
                   "time_limit": float(self.time_limit.value) or None,
                   "average_from": 1.0 - int(self.average.value) / 100 if self.average.value else None}
        self._folder = folder
        self._total = options["train_size"] * options["epochs"]
        self.history = {"train": [], "val": []}
        self._draw()
        self.controls.busy("simulating data and starting...")
        self.runner.start(lambda progress, should_stop: training_job(folder, options, progress, should_stop))

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
        notify(text[:1].upper() + text[1:] + ".")
        self.controls.idle(text)

    def _on_finish(self):
        if not self.controls.run_button.enabled:
            self.controls.idle()
