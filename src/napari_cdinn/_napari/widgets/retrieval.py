"""Phase retrieval dock: batched ER/HIO/RAAR with shrinkwrap on a pattern layer.

Wired to :func:`napari_cdinn.retrieval.reconstruct`.  The stack is inverted in blocks of
``frames per update`` patterns inside a thread worker, through the chunked loop of the command
line (:func:`napari_cdinn.stream.iter_chunks`; random starts depend on the frame's index in the
stack, not on the blocking: ``first_frame``), which reports typed progress events
(:class:`napari_cdinn.jobs.ProgressEvent`: ``PROGRESS``, ``SNAPSHOT`` and ``CHUNK``).  While a block iterates, its current
estimates are shown every iteration block (20 iterations, at most ~3 times a second, through
``reconstruct``'s ``snapshot``); after each block of frames the final amplitude, phase, support
(a Labels layer) and chi^2 replace them (frames not yet reached are zero, their chi^2 NaN) and
the plots are redrawn: the Fourier R-factor ``sum (|F| - A)**2 / sum A**2`` on measured pixels per
iteration (median and 10-90 % of the frames, log scale; ~1e-4 at convergence on noise-free data)
and chi^2 per frame.  HIO's beta, the shrinkwrap threshold and blur (sigma, from the first to
the last update) and an optional starting support layer are inputs.  Stop ends the running block at its next
iteration block and keeps the frames reached so far.  Start "CDI NN" runs what ``cdinn
reconstruct --init nn`` runs (:func:`napari_cdinn.pipelines.refine_with_fallback`, fallback
"auto"): a short refinement of the network's guess (*refinement iterations*; 0: 50 per 32 pixels
of the network's object), and the protocol of the other settings on the frames whose refinement
misfits the data; Stop then ends the running block without its frames.  Which guesses the
network trusts and which frames kept the network's start are kept in the layers' metadata
(``nn_trusted``, ``nn_start``) and said in the status line.
``iterations`` and ``starts`` default to the protocol of :mod:`napari_cdinn.protocol` (the one
``cdinn reconstruct`` runs): up to ``starts`` runs per pattern, another only while the fit
misfits the data beyond the counting noise, keep the one with the lowest chi^2; with ``PRTF``
ticked (at least 2 starts) every pattern gets every start and the third plot shows the
phase-retrieval transfer function (:func:`napari_cdinn.postprocess.prtf`): its median over the frames done against the spatial
frequency (cycles per pixel), the 1/e level and the median resolution (the first frequency where a
frame's PRTF falls below 1/e); the per-frame ``prtf``, ``prtf_q`` and ``resolution`` go into the
layers' metadata.  Post-processing (centre the object, remove the phase ramp, unwrap the phase:
:func:`napari_cdinn.postprocess.apply_steps`) is applied to each finished block of frames before it is
shown, and recorded in the metadata (``post``); an unwrapped phase layer's contrast limits fit its
range.  The phase layer is transparent outside the support.
An optional mask layer (Labels or Image, nonzero = unmeasured, shaped like one pattern or like the
stack) marks unmeasured pixels (beamstop, gaps): they are left free by the modulus step, out of
chi^2, and given to the network for the "CDI NN" start.  NaN/inf pixels are unmeasured too.
"""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
from magicgui import widgets

from ... import nn, physics
from ...device import DEVICES
from ...jobs import Cancelled, Kind, ProgressEvent
from ...pipelines import curves_on_one_grid, faint, fit_summary, fits
from ...protocol import ITERATIONS, STARTS
from .. import layers as _layers
from ._common import (
    JobControls,
    JobRunner,
    PlotCanvas,
    add_or_update,
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

#: The named protocols of :mod:`napari_cdinn.retrieval.schedule` (listed here to keep torch unimported).
ALGORITHMS = ("hio-er", "er", "hio", "raar")


def retrieval_job(stack, mask, options, nn_start, emit, should_stop):
    """Worker body: reconstruct ``stack`` block by block (:func:`napari_cdinn.stream.iter_chunks`).

    ``mask``: None, or True on unmeasured pixels, (M, M) or (N, M, M) (NumPy or dask).
    ``options``: :func:`napari_cdinn.retrieval.reconstruct` keywords and ``block_frames``.
    ``nn_start``: None for random starts, else ``(model, refine_iterations)`` to refine the network's
    guess with a fallback to the protocol (:func:`napari_cdinn.pipelines.refine_with_fallback`;
    ``refine_iterations`` 0: :func:`napari_cdinn.nn.inference.refine_options`' count for the guess's
    size; the network reads the mask too).  A ``support`` in ``options`` ((M, M) or (N, M, M), True
    inside) is the starting support, also over the network's.  ``emit`` gets
    :class:`napari_cdinn.jobs.ProgressEvent`:
    ``PROGRESS`` (frames, fractional, while a block iterates), ``SNAPSHOT`` (the current estimates
    of a block's frames, at most every 0.3 s) and ``CHUNK`` (a finished block: ``lo`` and its
    ``amplitude``, ``phase``, ``support``, ``chi2``, ``chi2_noise``, ``errors``, ``error_iterations``, ``nn_trusted``,
    ``nn_start``, and with ``prtf`` its ``prtf``, ``prtf_q`` and ``resolution``).  ``post`` in ``options``: the
    :func:`napari_cdinn.postprocess.apply_steps` steps applied to each finished block's amplitude,
    phase and support.

    The network is chosen once for the stack at its scale (:func:`napari_cdinn.nn.choose_scale`);
    where it cannot read the patterns every frame starts from random phases and ``declined`` in the
    outcome says why.  Frames whose guess is narrower than the autocorrelation allows
    (:func:`napari_cdinn.pipelines.guess_fits_autocorrelation`) start from random phases too.

    Returns ``{"frames": frames done, "stopped": bool, "declined": None or one sentence, "off_centre": None or
    one sentence}`` (:func:`napari_cdinn.nn.off_centre`: the network read the patterns re-centred).
    """
    from ... import nn
    from ...nn.inference import refine_options
    from ...pipelines import refine_with_fallback
    from ...postprocess import apply_steps
    from ...retrieval import reconstruct
    from ...stream import iter_chunks

    options = dict(options)
    n, block = stack.shape[0], max(1, int(options.pop("block_frames")))
    support = options.pop("support", None)
    post = tuple(options.pop("post", ()))
    notes = {"declined": None, "off_centre": None}
    if nn_start is not None:  # the network at its scale (re-centred or not), chosen once for the stack, or declined
        model = nn.choose_scale(stack, nn_start[0], mask=mask, device=options["device"])
        notes["declined"] = nn.declined(model)
        refine = refine_options(0, nn_start[1]) if nn_start[1] else None  # None: as many as the guess's size asks
        nn_start = None if notes["declined"] else (model, refine)
        notes["off_centre"] = None if notes["declined"] else nn.off_centre(model)

    def invert(chunk, first_frame=0, mask=None):
        lo, hi = first_frame, first_frame + len(chunk)
        kwargs = dict(options) if mask is None else dict(options, mask=mask)
        given = None if support is None else np.asarray(support if support.ndim == 2 else support[lo:hi])
        if given is not None:
            kwargs["support"] = given

        def report(it, total):
            emit(ProgressEvent(Kind.PROGRESS, lo + (hi - lo) * it / max(total, 1), n))

        live = {"progress": report, "should_stop": should_stop, "snapshot": _Throttled(emit, lo, n)}
        if nn_start is not None:  # a stop raises Cancelled: a block's refined and fallback frames go together
            res = refine_with_fallback(chunk, model=nn_start[0], refine=nn_start[1], first_frame=lo, **live, **kwargs)
            return dict(res, stopped=False, nn_start=res["start"].astype(bool))
        res = reconstruct(chunk, on_stop="return", first_frame=lo, **live, **kwargs)
        return dict(res, nn_trusted=None, nn_start=None)

    done = 0
    try:
        for lo, _hi, res in iter_chunks(stack, invert, chunk_size=block, mask=mask, should_stop=should_stop):
            done = lo + len(res["chi2"])
            payload = {"lo": lo, **{k: res[k] for k in (
                "amplitude", "phase", "support", "chi2", "chi2_noise", "errors", "error_iterations", "nn_trusted",
                "nn_start")}}
            payload.update({k: res[k] for k in ("prtf", "prtf_q", "resolution") if k in res})
            if post:
                payload["amplitude"], payload["phase"], payload["support"] = apply_steps(
                    res["amplitude"], res["phase"], post, support=res["support"])
            emit(ProgressEvent(Kind.CHUNK, done, n, payload=payload))
            if res["stopped"]:
                return {"frames": done, "stopped": True, **notes}
    except Cancelled:
        return {"frames": done, "stopped": True, **notes}
    return {"frames": done, "stopped": False, **notes}


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
        self.iterations = widgets.SpinBox(label="iterations", value=ITERATIONS, min=1, max=1_000_000,
                                          tooltip="iterations of each run (the paper's protocol: 620, 1 start)")
        self.beta = widgets.FloatSpinBox(label="beta", value=0.9, min=0.01, max=1.99, step=0.05,
                                         tooltip="HIO/RAAR feedback parameter")
        self.threshold = widgets.FloatSpinBox(
            label="shrinkwrap threshold", value=0.12, min=0.01, max=0.99, step=0.01,
            tooltip="the support keeps the pixels above this fraction of the blurred modulus's maximum")
        self.sigma_start = widgets.FloatSpinBox(label="shrinkwrap sigma from", value=3.0, min=0.1, max=20.0, step=0.5,
                                                tooltip="blur of the first support update (pixels)")
        self.sigma_end = widgets.FloatSpinBox(label="shrinkwrap sigma to", value=1.0, min=0.1, max=20.0, step=0.5,
                                              tooltip="blur of the last support update (pixels)")
        self.start = widgets.ComboBox(label="start", choices=["random", "CDI NN"], value="random")
        self.starts = widgets.SpinBox(
            label="starts", value=STARTS, min=1, max=1000,
            tooltip="runs per pattern at most, the one with the lowest chi² kept: a pattern is started again only while "
                    "its fit misfits the data beyond the counting noise (with the CDI NN start, the runs of the "
                    "frames whose refinement misfits)")
        self.refine_iterations = widgets.SpinBox(
            label="refinement iterations", value=0, min=0, max=1_000_000,
            tooltip="CDI NN start: iterations of the refinement of the network's guess (0: 50 per 32 pixels of the "
                    "network's object, as cdinn reconstruct --init nn); the frames it leaves misfitting get the "
                    "protocol of the settings above")
        self.prtf = widgets.CheckBox(
            label="PRTF", value=False,
            tooltip="phase-retrieval transfer function of each pattern's starts (needs 2 or more starts; every pattern "
                    "then gets every start): how reproducibly each spatial frequency is retrieved, a resolution estimate")
        self.post_centre = widgets.CheckBox(label="centre object", value=False,
                                            tooltip="roll each result so its centre of mass sits in the frame centre")
        self.post_ramp = widgets.CheckBox(label="remove phase ramp", value=False,
                                          tooltip="remove the linear phase ramp and the mean phase inside the support")
        self.post_unwrap = widgets.CheckBox(label="unwrap phase", value=False,
                                            tooltip="unwrap the phase inside the support (no longer within -pi..pi)")
        self.models = ModelPicker()
        self.mask = mask_layer_picker(napari_viewer, self.patterns)
        self.support = mask_layer_picker(
            napari_viewer, label="support",
            tooltip="optional starting support: nonzero = inside the object, in the pattern's frame (M, M) or (N, M, M) "
                    "(default: the autocorrelation, or the network's support for the CDI NN start)")
        self.device = widgets.ComboBox(label="device", choices=DEVICES, value="auto")
        self.block_frames = widgets.SpinBox(label="frames per update", value=64, min=1, max=1_000_000)
        self.runner = JobRunner(self._on_progress, self._on_result, on_finish=self._on_finish)
        self.controls = JobControls("Reconstruct", self.run, self.runner)
        super().__init__(widgets=[self.patterns, self.algorithm, self.iterations, self.beta, self.threshold,
                                  self.sigma_start, self.sigma_end, self.start, self.starts, self.refine_iterations,
                                  self.prtf, self.models, self.mask, self.support, self.device, self.block_frames,
                                  self.post_centre, self.post_ramp, self.post_unwrap, self.controls])
        self.plot = PlotCanvas(height=5.0, rows=3)
        self.plot.add_to(self)
        persist(self, "retrieval", ("algorithm", "iterations", "beta", "threshold", "sigma_start", "sigma_end",
                                    "start", "starts", "refine_iterations", "prtf", "device", "block_frames",
                                    "post_centre", "post_ramp", "post_unwrap"))
        self._names = self._result = None

    @property
    def post_steps(self):
        """The ticked post-processing steps, in :data:`napari_cdinn.postprocess.STEPS` order."""
        ticked = {"centre": self.post_centre.value, "ramp": self.post_ramp.value, "unwrap": self.post_unwrap.value}
        return tuple(step for step, on in ticked.items() if on)

    def run(self):
        """Start the reconstruction of the chosen layer (errors become notifications)."""
        if self.prtf.value and self.starts.value < 2:
            notify_error("the PRTF compares several runs of each pattern: set starts to 2 or more, or untick PRTF")
            return
        try:
            stack, single = stack_of(self.patterns.value)
            mask = mask_of(self.mask.value, stack.shape)
            support = mask_of(self.support.value, stack.shape)
            nn_start = None
            if self.start.value == "CDI NN":  # the network for this size, resolved at once (no torch)
                nn_start = (nn.resolve_model(self.models.model, stack.shape), int(self.refine_iterations.value))
        except (ValueError, OSError) as exc:
            notify_error(exc)
            return
        n, m = stack.shape[0], stack.shape[-1]
        iterations = int(self.iterations.value)
        options = {"algorithm": self.algorithm.value, "iterations": iterations, "average": min(20, iterations // 2),
                   "device": self.device.value, "block_frames": self.block_frames.value,
                   "beta": float(self.beta.value), "threshold": float(self.threshold.value),
                   "sigma": (float(self.sigma_start.value), float(self.sigma_end.value)), "support": support,
                   "n_starts": int(self.starts.value), "prtf": bool(self.prtf.value), "post": self.post_steps}
        source = self.patterns.value.name
        self._names = (f"{source} PR amplitude", f"{source} PR phase", f"{source} PR support")
        self._result = {"amplitude": np.zeros((n, m, m), np.float32), "phase": np.zeros((n, m, m), np.float32),
                        "support": np.zeros((n, m, m), bool), "chi2": np.full(n, np.nan, np.float32),
                        "chi2_noise": np.full(n, np.nan, np.float32), "errors": []}
        if nn_start is not None:
            self._result["nn_trusted"] = np.zeros(n, bool)
            self._result["nn_start"] = np.zeros(n, bool)
        self._meta = {"cdinn_source": source, "algorithm": options["algorithm"], "iterations": iterations,
                      "start": self.start.value, "mask": None if self.mask.value is None else self.mask.value.name,
                      "beta": options["beta"], "threshold": options["threshold"], "sigma": options["sigma"],
                      "support_layer": None if self.support.value is None else self.support.value.name,
                      "n_starts": options["n_starts"], "post": list(options["post"])}
        if nn_start is not None:
            self._meta["refine_iterations"] = nn_start[1]  # 0: as many as the network's object size asks
        self._arranged, self._want_prtf, self._single = False, options["prtf"], single
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
        for key in ("amplitude", "phase", "support", "chi2", "chi2_noise"):
            res[key][lo:hi] = info[key]
        for key in ("nn_trusted", "nn_start"):
            if info.get(key) is not None and key in res:
                res[key][lo:hi] = info[key]
        if info.get("prtf") is not None:
            if "prtf" not in res:
                res["prtf"] = np.full((len(res["chi2"]), info["prtf"].shape[-1]), np.nan, np.float32)
                res["resolution"] = np.full(len(res["chi2"]), np.nan, np.float32)
            res["prtf"][lo:hi], res["resolution"][lo:hi], res["prtf_q"] = info["prtf"], info["resolution"], info["prtf_q"]
        res["errors"].append((np.asarray(info["error_iterations"]), info["errors"]))
        self.controls.set_progress(hi, total, f"{hi} of {total} pattern(s) done")
        self._show(res, support=True)
        self._draw_errors()

    def _show(self, res, support=False):
        """Add or refresh the amplitude and phase layers (and the support) from the current results."""
        meta = dict(self._meta, chi2=res["chi2"].copy(), chi2_noise=res["chi2_noise"].copy())
        for key in ("nn_trusted", "nn_start", "prtf", "prtf_q", "resolution"):
            if key in res:
                meta[key] = res[key].copy()
        # finished frames: their support; frames being iterated (or not reached): their amplitude's
        done = np.isfinite(res["chi2"])[:, None, None]
        shown = np.where(done, res["support"], physics.support_from_amplitude(res["amplitude"]))
        frames = (lambda a: a[0]) if self._single else (lambda a: a)  # a 2-D pattern gets 2-D results
        show_result(self.viewer, self._meta["cdinn_source"], "PR", frames(res["amplitude"]), frames(res["phase"]),
                    support=frames(shown), **meta)
        if support:
            add_or_update(self.viewer, _layers.support_tuple(frames(res["support"]), self._names[2], **meta),
                          visible=False)
        if not self._arranged:  # frame the view once per run, not at every update
            self._arranged = True
            arrange_side_by_side(self.viewer, self._meta["cdinn_source"])
        elif support:
            arrange_side_by_side(self.viewer, self._meta["cdinn_source"], frame_view=False)

    def _draw_errors(self):
        """The Fourier R-factor per iteration (median and 10-90 % of the frames), chi² per frame and the PRTF."""
        iterations, parts = curves_on_one_grid(self._result["errors"])
        errors = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        ax, ax2, _ = self.plot.all_axes
        ax.clear()
        if errors.size:
            x = iterations[: errors.shape[1]]
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns of stopped runs
                lo, mid, hi = np.nanpercentile(errors, [10, 50, 90], axis=0)
            if len(errors) > 1:
                ax.fill_between(x, lo, hi, color="tab:orange", alpha=0.25, lw=0, label="10-90 % of frames")
            ax.plot(x, mid, color="tab:orange", label="median")
            ax.set_yscale("log")
            ax.legend(fontsize="x-small")
        ax.set_xlabel("iteration")
        ax.set_ylabel("R-factor")
        ax2.clear()
        chi2, noise = self._result["chi2"], self._result["chi2_noise"]
        done = np.isfinite(chi2)
        good = fits(chi2, np.nan_to_num(noise), "reconstruct")
        dim = faint(np.nan_to_num(noise))  # a fit within the noise does not single out the object
        frames = np.arange(len(chi2))
        for sel, colour, label in ((done & good & ~dim, "tab:blue", "fits"),
                                   (done & good & dim, "tab:orange", "fits, faint"),
                                   (done & ~good, "tab:red", "misfits")):
            if sel.any():
                ax2.scatter(frames[sel], np.maximum(chi2[sel], 1e-12), s=8, color=colour, label=label)
        counted = done & (noise > 0)
        if counted.any():  # the floor counting noise alone gives (0 for data that are not counts)
            ax2.scatter(frames[counted], noise[counted], s=4, marker="_", color="gray", label="counting noise")
        if done.any():
            ax2.set_yscale("log")
            ax2.legend(fontsize="x-small", ncol=4, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False,
                       borderaxespad=0.1)  # above the axes: the dots stay visible
        ax2.set_xlabel("frame")
        ax2.set_ylabel("chi²")
        self._draw_prtf()
        self.plot.draw()

    def _draw_prtf(self):
        """The median PRTF of the frames done against spatial frequency, the 1/e level, the median resolution."""
        from ...postprocess import describe_resolution, median_resolution

        ax = self.plot.all_axes[2]
        ax.clear()
        res = self._result
        rows = res["prtf"][np.isfinite(res["prtf"]).any(axis=1)] if "prtf" in res else np.zeros((0, 0))
        if len(rows):
            q = res["prtf_q"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # empty shells (a beamstop) are NaN in every frame
                median = np.nanmedian(rows, axis=0)
            best = median_resolution(res["prtf"], res["resolution"])
            ax.plot(q, median, color="tab:green", label=f"median of {len(rows)} frame(s)")
            ax.axhline(1 / np.e, color="gray", lw=0.8, ls="--", label=f"1/e: resolution {describe_resolution(best)}")
            if np.isfinite(best):
                ax.axvline(best, color="gray", lw=0.8, ls=":")
            ax.set_ylim(0, 1.05)
            ax.set_xlim(0, 0.5)
            ax.legend(fontsize="x-small")
        else:
            text = "PRTF: no frame done yet" if self._want_prtf else "tick PRTF (2 or more starts) to see the PRTF"
            ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize="small", color="gray")
        ax.set_xlabel("spatial frequency (cycles/pixel)")
        ax.set_ylabel("PRTF")

    def _on_result(self, outcome):
        text = f"{outcome['frames']} pattern(s) reconstructed"
        if self._result is not None and outcome["frames"]:
            chi2, noise = (self._result[k][: outcome["frames"]] for k in ("chi2", "chi2_noise"))
            noise = np.nan_to_num(noise)
            good = fits(chi2, noise, "reconstruct")
            misfit, dim = int((~good).sum()), int((good & faint(noise)).sum())
            text += f"; {misfit} misfit the data beyond the counting noise" if misfit else "; all fit the data"
            text += f" ({dim} fit(s) too faint to single out the object)" if dim else ""
            advice = [f"the {misfit} that misfit are red in the chi² plot: check them (more starts, a mask over "
                      "bad pixels)"] if misfit else []
            if dim and self._meta["start"] != "CDI NN":
                advice.append("the faint ones (orange): the CDI NN start is right far more often on them")
            if advice and not outcome["stopped"]:
                notify("; ".join([fit_summary(chi2, noise), *advice]))
        if "nn_trusted" in (self._result or {}):
            done = outcome["frames"]
            text += (f"; the network trusted {int(self._result['nn_trusted'][:done].sum())} start(s), "
                     f"its start kept on {int(self._result['nn_start'][:done].sum())} frame(s)")
        if "prtf" in (self._result or {}):
            from ...postprocess import describe_resolution, median_resolution

            text += "; PRTF resolution " + describe_resolution(median_resolution(self._result["prtf"],
                                                                                self._result["resolution"]))
        if outcome.get("declined"):
            notify(outcome["declined"])
            text += "; the network declined: random starts"
        if outcome.get("off_centre"):
            notify(outcome["off_centre"])
        if outcome["stopped"]:
            text = f"stopped: {outcome['frames']} pattern(s) kept"
            notify(f"Phase retrieval stopped; {outcome['frames']} pattern(s) kept.")
        self.controls.idle(text)

    def _on_finish(self):
        if self.controls.run_button.enabled is False:
            self.controls.idle()
