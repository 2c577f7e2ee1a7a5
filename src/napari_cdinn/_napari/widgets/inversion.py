"""CDI NN inversion dock: the networks' amplitude and phase for a pattern or a stack.

Wired to :func:`napari_cdinn.nn.predict`.  The model is resolved for the pattern size when Invert
is pressed (:func:`napari_cdinn.nn.resolve_model`: a size or model that cannot work is a
notification at once).  Frames are inverted in batches inside a thread worker, through the chunked
loop of the command line (:func:`napari_cdinn.stream.iter_chunks`: progress events after each
batch, Stop between batches).  Results keep the stack axis: a
32 x 32 amplitude and phase per frame (``32 s`` for objects read at scale ``s``, chosen once for the
stack by :func:`napari_cdinn.nn.choose_scale`), centred in the pattern's frame (the 2x protocol), with the
per-frame chi^2 trust score in the layers' metadata and in a plot; shown as one complex image
(brightness = amplitude, hue = phase) beside the pattern (:func:`._common.arrange_side_by_side`).  The trust rule is
:func:`napari_cdinn.nn.inference.is_trusted`: a frame is trusted when its misfit beyond counting
noise, ``chi2 - chi2_noise``, is at most the "trust" threshold (default
:data:`napari_cdinn.nn.TRUST_CHI2`); the others are flagged (metadata ``trusted``, red in the
plot, a notification).  An optional mask layer (Labels or Image, nonzero = unmeasured, shaped like
one pattern or like the stack) tells the network which pixels were not measured; NaN/inf pixels
are unmeasured too.  Unmeasured pixels are left out of chi^2.
"""

from __future__ import annotations

import numpy as np
from magicgui import widgets

from ... import nn
from ...device import DEVICES
from ...jobs import Cancelled, Kind, ProgressEvent
from ...nn import TRUST_CHI2
from .. import layers as _layers
from ._common import (
    JobControls,
    JobRunner,
    PlotCanvas,
    arrange_side_by_side,
    image_layer_picker,
    mask_layer_picker,
    mask_of,
    notify,
    notify_error,
    persist,
    show_result,
    stack_of,
)
from ._models import ModelPicker


def trusted_frames(chi2, chi2_noise, threshold=TRUST_CHI2):
    """The trust rule of :func:`napari_cdinn.nn.inference.is_trusted` at the dock's ``threshold``.

    True where ``chi2 - chi2_noise <= threshold`` (NaN is never trusted).
    """
    return (np.asarray(chi2, np.float64) - np.asarray(chi2_noise, np.float64)) <= float(threshold)


def run_inversion(stack, options, emit, should_stop, mask=None):
    """Worker body: ``nn.predict`` batch by batch over the stack (:func:`napari_cdinn.stream.iter_chunks`).

    ``options``: :func:`napari_cdinn.nn.predict` keywords and ``batch_size`` (frames per batch);
    ``emit`` gets a :class:`napari_cdinn.jobs.ProgressEvent` (``PROGRESS``, frames done) after each
    batch; ``mask``: None, or True on unmeasured pixels, (H, W) or (N, H, W) (NumPy or dask).

    Returns the merged result, ``stopped`` and ``off_centre`` (:func:`napari_cdinn.nn.off_centre`).
    """
    from ...stream import iter_chunks

    options = dict(options)
    n, batch = stack.shape[0], max(1, int(options.pop("batch_size")))
    # the scale is chosen once for the stack from a sample of it, not per batch
    options["model"] = nn.choose_scale(stack, options.get("model"), mask=mask, device=options.get("device", "auto"))

    def chunk(intensity, first_frame=0, mask=None):
        return nn.predict(intensity, batch_size=batch, mask=mask, **options)

    parts = []
    try:
        for _lo, hi, res in iter_chunks(stack, chunk, chunk_size=batch, mask=mask, should_stop=should_stop):
            parts.append(res)
            emit(ProgressEvent(Kind.PROGRESS, hi, n))
    except Cancelled:
        pass
    if not parts:
        return {"stopped": True}
    out = {key: np.concatenate([p[key] for p in parts]) for key in ("amplitude", "phase", "chi2", "chi2_noise")}
    out["stopped"] = sum(len(p["chi2"]) for p in parts) < n
    out["off_centre"] = nn.off_centre(options["model"])
    out["scale"] = options["model"].scale
    return out


def inversion_job(stack, options, progress, should_stop, mask=None):
    """:func:`run_inversion` reporting ``progress({"done": frames, "total": N})`` after each batch."""
    return run_inversion(stack, options, lambda ev: progress({"done": ev.done, "total": ev.total}), should_stop,
                         mask)


class InversionWidget(widgets.Container):
    """Dock widget: CDI NN inversion of a pattern layer with a chi^2 trust score per frame."""

    def __init__(self, napari_viewer):
        self.viewer = napari_viewer
        self.patterns = image_layer_picker(napari_viewer, "patterns", kind="intensity")
        self.models = ModelPicker()
        self.mask = mask_layer_picker(napari_viewer, self.patterns)
        self.device = widgets.ComboBox(label="device", choices=DEVICES, value="auto")
        self.threshold = widgets.FloatSpinBox(label="shape threshold", value=0.1, min=0.01, max=0.99, step=0.01)  # predict: a fraction in (0, 1)
        self.trust = widgets.FloatSpinBox(
            label="trust chi² − noise below", value=TRUST_CHI2, min=0.0, max=10.0, step=0.005,  # 3 decimals: 0.015 exact
            tooltip="a frame is trusted when its chi² minus the chi² that counting noise alone gives "
                    "(chi2_noise) is at most this")
        self.batch_size = widgets.SpinBox(label="batch", value=256, min=1, max=65536)
        self.views = widgets.SpinBox(
            label="views", value=1, min=1, max=8,
            tooltip="test-time ensemble: also invert mirrored and transposed views of each pattern and average the "
                    "aligned answers (1: the network alone; 8: the most accurate, 8x the time)")
        self.runner = JobRunner(self._on_progress, self._on_result, on_finish=self._on_finish)
        self.controls = JobControls("Invert", self.run, self.runner)
        super().__init__(widgets=[self.patterns, self.models, self.mask, self.device, self.threshold, self.trust,
                                  self.batch_size, self.views, self.controls])
        self.plot = PlotCanvas()
        self.plot.add_to(self)
        self._source = None
        persist(self, "inversion", ("device", "threshold", "trust", "batch_size", "views"))

    def run(self):
        """Start the inversion of the chosen layer (errors become notifications)."""
        try:
            stack, single = stack_of(self.patterns.value)
            mask = mask_of(self.mask.value, stack.shape)
            model = nn.resolve_model(self.models.model, stack.shape)  # reads the header only: no torch
        except (ValueError, OSError) as exc:
            notify_error(exc)
            return
        options = {"model": model, "device": self.device.value, "threshold": float(self.threshold.value),
                   "batch_size": self.batch_size.value, "views": int(self.views.value)}
        self._source = (self.patterns.value.name, stack.shape, single,
                         None if self.mask.value is None else self.mask.value.name, model.name)
        self.controls.busy(f"inverting {stack.shape[0]} pattern(s)...")
        self.runner.start(lambda emit, should_stop: run_inversion(stack, options, emit, should_stop, mask))

    def _on_progress(self, event):
        done, total = int(event.done), int(event.total)
        self.controls.set_progress(done, total, f"{done} of {total} pattern(s)")

    def _on_result(self, res):
        if "chi2" not in res:
            self.controls.idle("stopped before the first batch")
            return
        name, shape, single, mask_name, model = self._source
        chi2, chi2_noise = res["chi2"], res["chi2_noise"]
        trusted = trusted_frames(chi2, chi2_noise, self.trust.value)
        meta = {"cdinn_source": name, "chi2": chi2, "chi2_noise": chi2_noise, "trusted": trusted,
                "trust_chi2": float(self.trust.value), "mask": mask_name, "model": model,
                "views": int(self.views.value), "scale": res["scale"]}
        amp, pha = (res["amplitude"][0], res["phase"][0]) if single else (res["amplitude"], res["phase"])
        offset = (0.0,) * (amp.ndim - 2) + _layers.centre_offset(shape, amp.shape)
        show_result(self.viewer, name, "NN", amp, pha, translate=offset, **meta)
        arrange_side_by_side(self.viewer, name)
        self._draw(chi2 - chi2_noise, trusted)
        bad = int((~trusted).sum())
        text = f"{len(chi2)} pattern(s) inverted; {len(chi2) - bad} trusted, {bad} flagged"
        if res["scale"] != 1:  # as cdinn predict says it on stderr
            side = nn.read_side(shape, res["scale"])
            text += f"; read at {res['scale']:g}x the pixel size (the central {side} x {side} pixels)"
        if res["stopped"]:
            text = f"stopped: {len(chi2)} pattern(s) inverted"
        if bad:
            notify(f"{bad} of {len(chi2)} frame(s) have chi² more than {self.trust.value:g} above their noise floor: "
                   "refine them in the Phase retrieval dock (start: CDI NN), or check them in the Quality view.")
        if res.get("off_centre"):
            notify(res["off_centre"])
        self.controls.idle(text)

    def _draw(self, excess, trusted):
        """Plot ``chi2 - chi2_noise`` per frame against the trust threshold."""
        ax = self.plot.axes
        ax.clear()
        frames = np.arange(len(excess))
        ax.scatter(frames[trusted], excess[trusted], s=8, color="tab:blue", label="trusted")
        ax.scatter(frames[~trusted], excess[~trusted], s=8, color="tab:red", label="flagged")
        ax.axhline(float(self.trust.value), color="gray", lw=0.8, ls="--")
        ax.set_xlabel("frame")
        ax.set_ylabel("chi² − noise floor")
        self.plot.draw()

    def _on_finish(self):
        if not self.controls.run_button.enabled:
            self.controls.idle()
