"""The training dock's "Adapt to this stack" section: fine-tune a model on a pattern layer, no truth needed.

Wired to :func:`napari_cdinn.nn.adapt.adapt` (its notes say what the fine-tuning does).  The chosen
pattern layer (and optional mask layer, nonzero = unmeasured) is adapted to from the chosen base
model in a thread worker, with the held-out chi^2 plotted live at every evaluation.  Stop (or
closing the viewer) ends the fine-tuning early; the best weights so far are still written.  The
new model folder is then offered in every model picker (offered, not chosen: a picker keeps its
choice).
"""

from __future__ import annotations

from pathlib import Path

from magicgui import widgets

from ...device import DEVICES
from ._common import (
    JobControls,
    JobRunner,
    PlotCanvas,
    image_layer_picker,
    mask_layer_picker,
    mask_of,
    notify,
    notify_error,
    persist,
    stack_of,
)
from ._models import ModelPicker, register_model


def adapt_job(stack, out, options, progress, should_stop, mask=None):
    """Worker body: :func:`napari_cdinn.nn.adapt.adapt` with its events forwarded to ``progress``; returns the card."""
    from ...nn.adapt import adapt

    return adapt(stack, out, mask=mask, callback=progress, stop=should_stop, **options)


class AdaptPanel(widgets.Container):
    """Adapt a model to a pattern layer (:func:`napari_cdinn.nn.adapt.adapt`) with a live held-out chi^2 plot.

    ``adapt_options``: further :func:`napari_cdinn.nn.adapt.adapt` keywords for every run (tests lower
    ``min_frames`` and ``test_count`` there).
    """

    def __init__(self, napari_viewer):
        self.viewer = napari_viewer
        self.patterns = image_layer_picker(napari_viewer, "patterns", kind="intensity")
        self.mask = mask_layer_picker(napari_viewer, self.patterns)
        self.models = ModelPicker()
        self.out = widgets.FileEdit(label="new model folder", mode="w", value="",
                                    tooltip="the adapted model is written here (a folder that does not exist yet)")
        self.device = widgets.ComboBox(label="device", choices=DEVICES, value="auto")
        self.time_limit = widgets.FloatSpinBox(label="time limit (min)", value=10.0, min=0.01, max=10_000.0, step=1.0,
                                               tooltip="fine-tune at most this long; it also ends when the "
                                                       "held-out fit stops improving")
        self.holdout = widgets.FloatSpinBox(label="held out", value=0.1, min=0.01, max=0.5, step=0.05,
                                            tooltip="fraction of the frames never trained on, whose chi² chooses "
                                                    "the weights kept")
        self.runner = JobRunner(self._on_event, self._on_result, on_finish=self._on_finish)
        self.controls = JobControls("Adapt to this stack", self.run, self.runner)
        title = widgets.Label(value="Adapt a model to a measured stack (no ground truth):")
        super().__init__(widgets=[title, self.patterns, self.mask, self.models, self.out, self.device,
                                  self.time_limit, self.holdout, self.controls])
        self.plot = PlotCanvas(height=2.2)
        self.plot.add_to(self)
        persist(self, "adapt", ("device", "time_limit", "holdout"))
        self.adapt_options = {}
        self.history, self.forgot = [], []  # (step, held-out chi2); steps whose weights forget
        self._folder = None
        self._limit_s = 1.0

    def run(self):
        """Start adapting the chosen model to the chosen pattern layer (errors become notifications)."""
        from ...nn.adapt import check_out

        text = str(self.out.value or "").strip()
        if not text or text == ".":
            notify_error("choose a new folder for the adapted model")
            return
        try:
            folder = check_out(text)
            stack, _single = stack_of(self.patterns.value)
            mask = mask_of(self.mask.value, stack.shape)
            model = self.models.model
        except (ValueError, OSError) as exc:
            notify_error(exc)
            return
        options = dict({"model": model, "device": self.device.value,
                        "time_limit_min": float(self.time_limit.value), "holdout": float(self.holdout.value),
                        "source": self.patterns.value.source.path}, **self.adapt_options)
        self._folder, self._limit_s = folder, 60.0 * float(self.time_limit.value)
        self.history, self.forgot = [], []
        self._draw()
        self.controls.busy(f"reading {stack.shape[0]} pattern(s)...")
        self.runner.start(lambda progress, should_stop: adapt_job(stack, folder, options, progress, should_stop, mask))

    def _on_event(self, event):
        kind = event["event"]
        if kind == "evaluation":
            self.history.append((event["step"], event["holdout_chi2"]))
            if not event["remembers"]:
                self.forgot.append(event["step"])
            self._draw(event["best_step"])
            forgets = "" if event["remembers"] else ", forgets: not kept"
            self.controls.set_progress(min(event["elapsed_s"], self._limit_s), self._limit_s,
                                       f"step {event['step']}: held-out chi² {event['holdout_chi2']:.4g} "
                                       f"(best {event['best_chi2']:.4g}{forgets})")
        elif kind in ("done", "stopped"):
            if kind == "done":  # ended on its own (steps, convergence or time): the bar fills
                self.controls.set_progress(1, 1)
            self.controls.status.value = "writing and scoring the adapted model..."

    def _draw(self, best_step=None):
        """Plot the held-out chi^2 per evaluation (the base's at step 0 dashed, the weights that forget
        crossed out, the kept step marked)."""
        from matplotlib.ticker import NullFormatter

        ax = self.plot.axes
        ax.clear()
        if self.history:
            steps, chi2 = zip(*self.history, strict=True)
            values = dict(self.history)
            ax.plot(steps, chi2, "o-", ms=3, label="held-out chi² (median)")
            ax.axhline(chi2[0], color="gray", lw=0.8, ls="--", label="base model")
            if self.forgot:
                ax.plot(self.forgot, [values[s] for s in self.forgot], "x", ms=6, color="gray",
                        label="forgets (not kept)")
            if best_step is not None:
                ax.plot([best_step], [values[best_step]], "*", ms=10, color="tab:red", label="kept")
            ax.set_yscale("log")  # the chi^2 often falls tenfold: the late steps stay readable
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.legend(fontsize="x-small", ncol=2)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out chi²")
        self.plot.draw()

    def _on_result(self, card):
        from ...nn.adapt import recentred_note

        label = f"{Path(card['path']).name} (adapted)"
        register_model(card["path"], label)
        h = card["holdout_chi2"]
        ended = "stopped" if card["ended"] == "stopped" else "done"
        text = f"{ended}: held-out chi² {h['before']:.4g} -> {h['after']:.4g}; {label} is ready in the model pickers"
        notify(text)
        if recentred_note(card):
            notify(recentred_note(card))
        self.controls.idle(text)

    def _on_finish(self):
        if not self.controls.run_button.enabled:
            self.controls.idle()
