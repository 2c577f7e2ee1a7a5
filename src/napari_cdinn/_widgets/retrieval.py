"""Phase retrieval dock: batched ER/HIO/RAAR with shrinkwrap on a pattern layer.

Wired to :func:`napari_cdinn.retrieval.reconstruct`.  The stack is inverted in blocks of
``frames per update`` patterns inside a thread worker (random starts depend on the frame's
index in the stack, not on the blocking: ``first_frame``).  While a block iterates, its current
estimates are shown every iteration block (20 iterations, at most ~3 times a second, through
``reconstruct``'s ``snapshot``); after each block of frames the final amplitude, phase and chi^2
replace them (frames not yet reached are zero, their chi^2 NaN) and the median Fourier-error
curve is redrawn.  Stop ends the running block at its next
iteration block and keeps the frames reached so far.  Start "CDI NN" seeds every pattern with
the network's guess (embedded in the oversampled frame, its support as the first support).
A Labels layer can mark unmeasured pixels (beamstop, gaps): label > 0 is masked.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from magicgui import widgets
from napari.layers import Labels

from .. import _layers
from ..device import DEVICES
from ._common import (
    JobControls,
    JobRunner,
    PlotCanvas,
    add_or_update,
    image_layer_picker,
    notify,
    notify_error,
    stack_of,
)
from ._models import ModelPicker

#: The named protocols of :mod:`napari_cdinn.retrieval.schedule` (listed here to keep torch unimported).
ALGORITHMS = ("hio-er", "er", "hio", "raar")


def _mask_for(labels, shape):
    """Boolean mask (True = unmeasured) from a Labels layer, (M, M) or (N, M, M), or None."""
    if labels is None:
        return None
    mask = np.asarray(labels.data) > 0
    if mask.shape[-2:] != tuple(shape[-2:]) or mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[0] != shape[0]):
        raise ValueError(f"the mask {mask.shape} does not match the patterns {tuple(shape)}")
    return mask


def retrieval_job(stack, mask, options, nn_start, progress, should_stop):
    """Worker body: reconstruct ``stack`` block by block, reporting each block through ``progress``.

    ``nn_start``: None for random starts, else ``(model,)`` to seed from the network's guess.

    Returns ``{"frames": frames done, "stopped": bool}``.
    """
    from .. import nn
    from ..retrieval import reconstruct

    n, block = stack.shape[0], max(1, int(options.pop("block_frames")))
    done = 0
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        chunk = np.asarray(stack[lo:hi], dtype=np.float32)
        kwargs = dict(options)
        if mask is not None:
            kwargs["mask"] = mask if mask.ndim == 2 else mask[lo:hi]
        if nn_start is not None:
            from ..nn.inference import embed, oversampling_factor

            guess = nn.predict(chunk, model=nn_start[0], device=options["device"])
            obj, sup = embed(guess["amplitude"], guess["phase"], oversampling_factor(chunk.shape))
            kwargs.update(init=obj, support=sup)

        def report(it, total, _lo=lo, _hi=hi):
            progress({"kind": "progress", "done": _lo + (_hi - _lo) * it / max(total, 1), "total": n})

        res = reconstruct(chunk, progress=report, should_stop=should_stop, on_stop="return", first_frame=lo,
                          snapshot=_Throttled(progress, lo, n), **kwargs)
        done = lo + len(res["chi2"])
        progress({"kind": "block", "lo": lo, "total": n, **{k: res[k] for k in
                  ("amplitude", "phase", "chi2", "errors", "error_iterations")}})
        if res["stopped"]:
            return {"frames": done, "stopped": True}
    return {"frames": done, "stopped": False}


class _Throttled:
    """``reconstruct``'s snapshot callback: forwards the current estimates at most every ``interval`` s."""

    def __init__(self, progress, lo, total, interval=0.3):
        self.progress, self.lo, self.total, self.interval = progress, lo, total, interval
        self.last = float("-inf")
        self.lock = threading.Lock()

    def __call__(self, frames, amplitude, phase):
        now = time.monotonic()
        with self.lock:
            if now - self.last < self.interval:
                return
            self.last = now
        self.progress({"kind": "snapshot", "frames": self.lo + frames, "amplitude": amplitude, "phase": phase,
                       "total": self.total})


class PhaseRetrievalWidget(widgets.Container):
    """Dock widget: iterative phase retrieval of a pattern stack, updated live, with Stop."""

    def __init__(self, napari_viewer):
        self.viewer = napari_viewer
        self.patterns = image_layer_picker(napari_viewer, "patterns", kind="intensity")
        self.algorithm = widgets.ComboBox(label="algorithm", choices=ALGORITHMS, value="hio-er")
        self.iterations = widgets.SpinBox(label="iterations", value=620, min=1, max=1_000_000)
        self.start = widgets.ComboBox(label="start", choices=["random", "CDI NN"], value="random")
        self.models = ModelPicker()
        self.mask = widgets.ComboBox(label="mask (Labels)", nullable=True, choices=self._label_layers)
        self.device = widgets.ComboBox(label="device", choices=DEVICES, value="auto")
        self.block_frames = widgets.SpinBox(label="frames per update", value=64, min=1, max=1_000_000)
        self.runner = JobRunner(self._on_progress, self._on_result, on_finish=self._on_finish)
        self.controls = JobControls("Reconstruct", self.run, self.runner)
        super().__init__(widgets=[self.patterns, self.algorithm, self.iterations, self.start, self.models,
                                  self.mask, self.device, self.block_frames, self.controls])
        self.plot = PlotCanvas()
        self.plot.add_to(self)
        events = napari_viewer.layers.events
        for event in (events.inserted, events.removed):
            event.connect(lambda _e=None: self.mask.reset_choices())
        self._names = self._result = None

    def _label_layers(self, _widget=None):
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Labels)]

    def run(self):
        """Start the reconstruction of the chosen layer (errors become notifications)."""
        try:
            stack, _single = stack_of(self.patterns.value)
            mask = _mask_for(self.mask.value, stack.shape)
        except ValueError as exc:
            notify_error(exc)
            return
        n, m = stack.shape[0], stack.shape[-1]
        iterations = int(self.iterations.value)
        options = {"algorithm": self.algorithm.value, "iterations": iterations, "average": min(20, iterations // 2),
                   "device": self.device.value, "block_frames": self.block_frames.value}
        nn_start = (self.models.model,) if self.start.value == "CDI NN" else None
        source = self.patterns.value.name
        self._names = (f"{source} PR amplitude", f"{source} PR phase")
        self._result = {"amplitude": np.zeros((n, m, m), np.float32), "phase": np.zeros((n, m, m), np.float32),
                        "chi2": np.full(n, np.nan, np.float32), "errors": []}
        self._meta = {"cdinn_source": source, "algorithm": options["algorithm"], "iterations": iterations}
        self.controls.busy(f"reconstructing {n} pattern(s)...")
        self.runner.start(lambda progress, should_stop: retrieval_job(stack, mask, options, nn_start, progress, should_stop))

    def _on_progress(self, info):
        total = info["total"]
        if info["kind"] == "progress":
            self.controls.set_progress(info["done"], total)
            return
        if info["kind"] == "snapshot":  # live view of the frames being iterated
            res = self._result
            res["amplitude"][info["frames"]] = info["amplitude"]
            res["phase"][info["frames"]] = info["phase"]
            self._show(res)
            return
        lo, res = info["lo"], self._result
        hi = lo + len(info["chi2"])
        for key in ("amplitude", "phase", "chi2"):
            res[key][lo:hi] = info[key]
        res["errors"].append(info["errors"])
        self.controls.set_progress(hi, total, f"{hi} of {total} pattern(s) done")
        self._show(res)
        self._draw_errors(info["error_iterations"])

    def _show(self, res):
        """Add or refresh the amplitude and phase layers from the current results."""
        meta = dict(self._meta, chi2=res["chi2"].copy())
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
        if outcome["stopped"]:
            text = f"stopped: {outcome['frames']} pattern(s) kept"
            notify(f"Phase retrieval stopped; {outcome['frames']} pattern(s) kept.")
        self.controls.idle(text)

    def _on_finish(self):
        if self.controls.run_button.enabled is False:
            self.controls.idle()
