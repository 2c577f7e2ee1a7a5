"""Phase retrieval dock: batched ER/HIO/RAAR with shrinkwrap on a pattern layer.

Wired to :func:`napari_cdinn.retrieval.reconstruct`.  The stack is inverted in blocks of
``frames per update`` patterns inside a thread worker, through the chunked loop of the command
line (:func:`napari_cdinn.stream.iter_chunks`; random starts depend on the frame's index in the
stack, not on the blocking: ``first_frame``), which reports typed progress events
(:class:`napari_cdinn.jobs.ProgressEvent`: ``PROGRESS``, ``SNAPSHOT`` and ``CHUNK``).  While a block iterates, its current
estimates are shown every iteration block (20 iterations, at most ~3 times a second, through
``reconstruct``'s ``snapshot``); after each block of frames the final amplitude, phase and chi^2
replace them (frames not yet reached are zero, their chi^2 NaN) and the median Fourier-error
curve is redrawn.  Stop ends the running block at its next
iteration block and keeps the frames reached so far.  Start "CDI NN" seeds every pattern with
the network's guess (:func:`napari_cdinn.pipelines.network_guess`: embedded in the oversampled
frame, its support as the first support); which guesses the network trusts is kept in the
layers' metadata (``nn_trusted``) and said in the status line.
An optional mask layer (Labels or Image, nonzero = unmeasured, shaped like one pattern or like the
stack) marks unmeasured pixels (beamstop, gaps): they are left free by the modulus step, out of
chi^2, and given to the network for the "CDI NN" start.  NaN/inf pixels are unmeasured too.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from magicgui import widgets

from ... import nn
from ...device import DEVICES
from ...jobs import Cancelled, Kind, ProgressEvent
from .. import layers as _layers
from ._common import (
    JobControls,
    JobRunner,
    PlotCanvas,
    add_or_update,
    image_layer_picker,
    mask_layer_picker,
    mask_of,
    notify,
    notify_error,
    stack_of,
)
from ._models import ModelPicker

#: The named protocols of :mod:`napari_cdinn.retrieval.schedule` (listed here to keep torch unimported).
ALGORITHMS = ("hio-er", "er", "hio", "raar")


def retrieval_job(stack, mask, options, nn_start, emit, should_stop):
    """Worker body: reconstruct ``stack`` block by block (:func:`napari_cdinn.stream.iter_chunks`).

    ``mask``: None, or True on unmeasured pixels, (M, M) or (N, M, M) (NumPy or dask).
    ``options``: :func:`napari_cdinn.retrieval.reconstruct` keywords and ``block_frames``.
    ``nn_start``: None for random starts, else ``(model,)`` to seed from the network's guess
    (the network reads the mask too).  ``emit`` gets :class:`napari_cdinn.jobs.ProgressEvent`:
    ``PROGRESS`` (frames, fractional, while a block iterates), ``SNAPSHOT`` (the current estimates
    of a block's frames, at most every 0.3 s) and ``CHUNK`` (a finished block: ``lo`` and its
    ``amplitude``, ``phase``, ``chi2``, ``errors``, ``error_iterations``, ``nn_trusted``).

    Returns ``{"frames": frames done, "stopped": bool}``.
    """
    from ...retrieval import reconstruct
    from ...stream import iter_chunks

    options = dict(options)
    n, block = stack.shape[0], max(1, int(options.pop("block_frames")))

    def invert(chunk, first_frame=0, mask=None):
        lo, hi = first_frame, first_frame + len(chunk)
        kwargs = dict(options) if mask is None else dict(options, mask=mask)
        trusted = None
        if nn_start is not None:
            from ...pipelines import network_guess

            obj, sup, trusted = network_guess(chunk, model=nn_start[0], device=options["device"], mask=mask)
            kwargs.update(init=obj, support=sup)

        def report(it, total):
            emit(ProgressEvent(Kind.PROGRESS, lo + (hi - lo) * it / max(total, 1), n))

        res = reconstruct(chunk, progress=report, should_stop=should_stop, on_stop="return", first_frame=lo,
                          snapshot=_Throttled(emit, lo, n), **kwargs)
        return dict(res, nn_trusted=None if trusted is None else trusted[: len(res["chi2"])])

    done = 0
    try:
        for lo, _hi, res in iter_chunks(stack, invert, chunk_size=block, mask=mask, should_stop=should_stop):
            done = lo + len(res["chi2"])
            emit(ProgressEvent(Kind.CHUNK, done, n, payload={"lo": lo, **{k: res[k] for k in (
                "amplitude", "phase", "chi2", "errors", "error_iterations", "nn_trusted")}}))
            if res["stopped"]:
                return {"frames": done, "stopped": True}
    except Cancelled:
        return {"frames": done, "stopped": True}
    return {"frames": done, "stopped": False}


class _Throttled:
    """``reconstruct``'s snapshot callback: emits the current estimates at most every ``interval`` s."""

    def __init__(self, emit, lo, total, interval=0.3):
        self.emit, self.lo, self.total, self.interval = emit, lo, total, interval
        self.last = float("-inf")
        self.lock = threading.Lock()

    def __call__(self, frames, amplitude, phase):
        now = time.monotonic()
        with self.lock:
            if now - self.last < self.interval:
                return
            self.last = now
        self.emit(ProgressEvent(Kind.SNAPSHOT, total=self.total, payload={
            "frames": self.lo + frames, "amplitude": amplitude, "phase": phase}))


class PhaseRetrievalWidget(widgets.Container):
    """Dock widget: iterative phase retrieval of a pattern stack, updated live, with Stop."""

    def __init__(self, napari_viewer):
        self.viewer = napari_viewer
        self.patterns = image_layer_picker(napari_viewer, "patterns", kind="intensity")
        self.algorithm = widgets.ComboBox(label="algorithm", choices=ALGORITHMS, value="hio-er")
        self.iterations = widgets.SpinBox(label="iterations", value=620, min=1, max=1_000_000)
        self.start = widgets.ComboBox(label="start", choices=["random", "CDI NN"], value="random")
        self.models = ModelPicker()
        self.mask = mask_layer_picker(napari_viewer, self.patterns)
        self.device = widgets.ComboBox(label="device", choices=DEVICES, value="auto")
        self.block_frames = widgets.SpinBox(label="frames per update", value=64, min=1, max=1_000_000)
        self.runner = JobRunner(self._on_progress, self._on_result, on_finish=self._on_finish)
        self.controls = JobControls("Reconstruct", self.run, self.runner)
        super().__init__(widgets=[self.patterns, self.algorithm, self.iterations, self.start, self.models,
                                  self.mask, self.device, self.block_frames, self.controls])
        self.plot = PlotCanvas()
        self.plot.add_to(self)
        self._names = self._result = None

    def run(self):
        """Start the reconstruction of the chosen layer (errors become notifications)."""
        try:
            stack, _single = stack_of(self.patterns.value)
            mask = mask_of(self.mask.value, stack.shape)
            nn_start = None
            if self.start.value == "CDI NN":  # the network for this size, resolved at once (no torch)
                nn_start = (nn.resolve_model(self.models.model, stack.shape),)
        except (ValueError, OSError) as exc:
            notify_error(exc)
            return
        n, m = stack.shape[0], stack.shape[-1]
        iterations = int(self.iterations.value)
        options = {"algorithm": self.algorithm.value, "iterations": iterations, "average": min(20, iterations // 2),
                   "device": self.device.value, "block_frames": self.block_frames.value}
        source = self.patterns.value.name
        self._names = (f"{source} PR amplitude", f"{source} PR phase")
        self._result = {"amplitude": np.zeros((n, m, m), np.float32), "phase": np.zeros((n, m, m), np.float32),
                        "chi2": np.full(n, np.nan, np.float32), "errors": []}
        if nn_start is not None:
            self._result["nn_trusted"] = np.zeros(n, bool)
        self._meta = {"cdinn_source": source, "algorithm": options["algorithm"], "iterations": iterations,
                      "start": self.start.value, "mask": None if self.mask.value is None else self.mask.value.name}
        self.controls.busy(f"reconstructing {n} pattern(s)...")
        self.runner.start(lambda emit, should_stop: retrieval_job(stack, mask, options, nn_start, emit, should_stop))

    def _on_progress(self, event):
        total, info = event.total, event.payload
        if event.kind is Kind.PROGRESS:
            self.controls.set_progress(event.done, total)
            return
        if event.kind is Kind.SNAPSHOT:  # live view of the frames being iterated
            res = self._result
            res["amplitude"][info["frames"]] = info["amplitude"]
            res["phase"][info["frames"]] = info["phase"]
            self._show(res)
            return
        lo, res = info["lo"], self._result
        hi = lo + len(info["chi2"])
        for key in ("amplitude", "phase", "chi2"):
            res[key][lo:hi] = info[key]
        if info.get("nn_trusted") is not None and "nn_trusted" in res:
            res["nn_trusted"][lo:hi] = info["nn_trusted"]
        res["errors"].append(info["errors"])
        self.controls.set_progress(hi, total, f"{hi} of {total} pattern(s) done")
        self._show(res)
        self._draw_errors(info["error_iterations"])

    def _show(self, res):
        """Add or refresh the amplitude and phase layers from the current results."""
        meta = dict(self._meta, chi2=res["chi2"].copy())
        if "nn_trusted" in res:
            meta["nn_trusted"] = res["nn_trusted"].copy()
        add_or_update(self.viewer, _layers.amplitude_tuple(res["amplitude"], self._names[0], **meta))
        add_or_update(self.viewer, _layers.phase_tuple(res["phase"], self._names[1], **meta))

    def _draw_errors(self, iterations):
        errors = np.concatenate(self._result["errors"])
        ax = self.plot.axes
        ax.clear()
        if errors.size:
            ax.semilogy(iterations[: errors.shape[1]], np.median(errors, axis=0), color="tab:orange")
        ax.set_xlabel("iteration")
        ax.set_ylabel("Fourier error (median)")
        self.plot.draw()

    def _on_result(self, outcome):
        text = f"{outcome['frames']} pattern(s) reconstructed"
        if "nn_trusted" in (self._result or {}):
            text += f"; the network trusted {int(self._result['nn_trusted'][: outcome['frames']].sum())} start(s)"
        if outcome["stopped"]:
            text = f"stopped: {outcome['frames']} pattern(s) kept"
            notify(f"Phase retrieval stopped; {outcome['frames']} pattern(s) kept.")
        self.controls.idle(text)

    def _on_finish(self):
        if self.controls.run_button.enabled is False:
            self.controls.idle()
