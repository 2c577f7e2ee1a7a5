"""``reconstruct``: NumPy stacks in, finished reconstructions out (batched on a torch device)."""

from __future__ import annotations

import contextlib
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .. import physics, postprocess
from ..checks import check_mask_layout, number_in, whole_number
from ..device import default_threads, resolve_device
from ..jobs import Cancelled, PartsProgress, stop_requested
from ..prepare import NOT_SQUARE_HINT
from ..protocol import BETA_MAX, ITERATIONS, RESTART_CHI2, RESTART_NOISE, STARTS, needs_restart
from . import steps as st
from .engine import Shrinkwrap, iterate
from .schedule import (
    ALGORITHMS,
    STEPS,
    default_schedule,
    parse_schedule,
    schedule_length,
)
from .support import autocorrelation_support

__all__ = [
    "centre_shifts",
    "default_batch_size",
    "finish_frames",
    "make_schedule",
    "random_start",
    "reconstruct",
    "reconstruct_chunk",
    "single_threaded_ops",
]

#: Patterns per batch by device type (CPU: fits the caches; GPUs: fills them).
#: Default batch per device.  On the CPU a batch of 32 64 x 64 frames keeps a worker's working
#: set (about 6 MB) in cache (measured against 64 and 128: docs/decisions.md, "CPU retrieval").
_BATCH = {"cpu": 32, "cuda": 4096, "mps": 1024}


def default_batch_size(device):
    """Default number of runs (pattern x start) inverted together on ``device``."""
    return _BATCH.get(torch.device(device).type, 64)


def make_schedule(algorithm="hio-er", iterations=620, average=20):
    """Schedule from a protocol name (:data:`ALGORITHMS`) or a one-line schedule string/list."""
    if not isinstance(algorithm, (str, list, tuple)):
        raise ValueError(f"algorithm must be hio-er, er, hio, raar or a schedule such as '(hio:80,er:20)x6,er:20', "
                         f"got {algorithm!r}")
    if isinstance(algorithm, str) and algorithm.lower() in ALGORITHMS:
        return default_schedule(algorithm, iterations, average)
    if isinstance(algorithm, str) and re.fullmatch(r"\s*[A-Za-z_-]+\s*", algorithm) and algorithm.lower() not in STEPS:
        raise ValueError(
            f"unknown algorithm {algorithm!r}: use hio-er, er, hio, raar or a schedule such as '(hio:80,er:20)x6,er:20'"
        )
    pairs = parse_schedule(algorithm)
    if schedule_length(pairs) < 1:
        raise ValueError("the schedule has no iterations")
    return pairs


def random_start(amplitude, seed, frame, start):
    """Random-phase start of one run: ``ifft2(A * exp(i phi))`` with phi uniform in [-pi, pi).

    The phases depend only on ``(seed, frame, start)``, never on the batch a run lands in.

    Parameters
    ----------
    amplitude : ndarray, float32, (M, M)
        Amplitudes in FFT layout.
    seed, frame, start : int

    Returns
    -------
    ndarray, complex64, (M, M), FFT layout.
    """
    rng = np.random.default_rng([int(seed), int(frame), int(start)])
    phi = rng.uniform(-np.pi, np.pi, size=amplitude.shape)
    return np.fft.ifft2(amplitude * np.exp(1j * phi)).astype(np.complex64)


def centre_shifts(support):
    """Integer rolls that move each support's circular centre of mass to the frame centre.

    Parameters
    ----------
    support : ndarray, bool, (N, M, M), centred layout

    Returns
    -------
    ndarray, int, (N, 2)
    """
    n, h, w = support.shape
    s = support.astype(np.float64)
    out = np.zeros((n, 2), dtype=int)
    for axis, size in ((1, h), (2, w)):
        profile = s.sum(axis=3 - axis)  # (N, size)
        ang = np.exp(2j * np.pi * np.arange(size) / size)
        c = np.angle(profile @ ang) * size / (2 * np.pi)
        out[:, axis - 1] = np.round(size // 2 - c).astype(int) % size
    return out


def finish_frames(obj, support):
    """Centre the objects in their frames and zero the mean phase inside the support.

    Parameters
    ----------
    obj : ndarray, complex64, (N, M, M), centred layout
    support : ndarray, bool, (N, M, M)

    Returns
    -------
    obj, support : the rolled, phase-normalised objects and their rolled supports.
    """
    obj = obj.copy()
    support = support.copy()
    for i, (dy, dx) in enumerate(centre_shifts(support)):
        obj[i] = np.roll(obj[i], (dy, dx), axis=(0, 1))
        support[i] = np.roll(support[i], (dy, dx), axis=(0, 1))
    unit = np.where(support, obj / np.maximum(np.abs(obj), 1e-30), 0)
    c = unit.sum(axis=(1, 2))
    c = np.where(np.abs(c) > 0, c / np.maximum(np.abs(c), 1e-30), 1.0)
    obj = (obj * np.conj(c)[:, None, None]).astype(np.complex64)
    return obj, support


def _as_stack(a, name, dtype=None):
    shape = tuple(np.shape(a))
    if len(shape) not in (2, 3):
        raise ValueError(f"{name} must be shaped (M, M) or (N, M, M), got {shape}")
    return a if len(shape) == 3 else np.asarray(a, dtype=dtype)[None]


def _check_pattern_shape(shape):
    m, n = shape[-2:]
    if m != n or m % 2 or m < 4:
        raise ValueError(f"patterns must be square with an even size, got {m} x {n}"
                         + (NOT_SQUARE_HINT if m != n else ""))


def _frame_arrays(stack, idx):
    """Frames ``idx`` (sorted) of a NumPy or dask stack as float32, and their non-finite pixels.

    Returns
    -------
    values : ndarray, float32, negative and non-finite values set to 0
    bad : ndarray of bool (True where the value was NaN or infinite), or None when there are none
    """
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    raw = np.asarray(stack[lo:hi] if hi - lo == len(idx) else stack[np.asarray(idx)], dtype=np.float32)
    bad = ~np.isfinite(raw)
    values = np.where(~bad & (raw > 0), raw, 0.0).astype(np.float32)
    return values, (bad if bad.any() else None)


def _per_frame(a, frames):
    """Pick frames of an optional (M, M) or (N, M, M) array."""
    if a is None:
        return None
    a = np.asarray(a)
    return np.broadcast_to(a, a.shape) if a.ndim == 2 else a[frames]


def _prepare_batch(intens, mask, init, init_support, frames, starts, seed):
    """Build the device-independent NumPy inputs of one batch of runs (FFT layout)."""
    m = intens.shape[-1]
    inten = np.fft.ifftshift(intens, axes=(-2, -1))
    free = None
    if mask is not None:
        free = np.fft.ifftshift(np.broadcast_to(mask, inten.shape), axes=(-2, -1)).astype(np.float32)
        inten = inten * (1.0 - free)
    amp = np.sqrt(inten)
    scale = np.sqrt((amp.astype(np.float64) ** 2).sum(axis=(1, 2)) / (m * m)).astype(np.float32)  # float64: no overflow
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    amp = amp / scale[:, None, None]
    x0 = np.empty(amp.shape, dtype=np.complex64)
    sup0 = None
    if init_support is not None:
        sup0 = np.fft.ifftshift(init_support, axes=(-2, -1)).astype(np.float32)
    for j, (f, k) in enumerate(zip(frames, starts)):
        if init is not None and k == 0 and init[j].any():  # an all-zero init frame starts at random
            x0[j] = np.fft.ifftshift(init[j], axes=(-2, -1)) / scale[j]
        else:
            x0[j] = random_start(amp[j], seed, f, k)
    return amp, free, x0, sup0, scale


def reconstruct(
    intensity,
    *,
    algorithm="hio-er",
    iterations=ITERATIONS,
    average=20,
    beta=0.9,
    init="random",
    support=None,
    fixed_support=False,
    mask=None,
    n_starts=STARTS,
    device="auto",
    batch_size=None,
    threads=None,
    seed=0,
    first_frame=0,
    frame_ids=None,
    retry_chi2=RESTART_CHI2,
    retry_noise=RESTART_NOISE,
    prtf=False,
    shrinkwrap_every=20,
    sigma=(3.0, 1.0),
    threshold=0.12,
    autocorrelation_threshold=0.1,
    block=20,
    error_every=10,
    progress=None,
    should_stop=None,
    on_stop="raise",
    snapshot=None,
):
    """Iterative phase retrieval of a stack of oversampled diffraction patterns.

    The default is the project's protocol (:mod:`napari_cdinn.protocol`): the paper's HIO x80 /
    ER x20 cycles with a shrink-wrapped support starting from the thresholded autocorrelation, the
    estimates of the final 20 (ER) iterations averaged after aligning their global phase, in runs
    of :data:`~napari_cdinn.protocol.ITERATIONS` iterations from random phases, a pattern started
    again (up to :data:`~napari_cdinn.protocol.STARTS` runs) only while its fit misfits the data
    beyond the counting noise.  ``iterations=620, n_starts=1`` is the paper's protocol exactly.
    Patterns are inverted in batches on a torch device.

    Parameters
    ----------
    intensity : array_like, float, (M, M) or (N, M, M)
        Centred measured intensities (any non-negative scale; NumPy or dask).  ``M`` even.
        Negative values count as 0; NaN and infinite pixels are unmeasured (added to ``mask``).
    algorithm : str or list of (str, int)
        ``"hio-er"``, ``"er"``, ``"hio"``, ``"raar"``, or a schedule such as
        ``"(hio:80, er:20) x6, er:20"`` (then ``iterations`` is ignored).
    iterations : int
        Iterations of every run of a named protocol.
    average : int
        Final iterations averaged (0: keep the last estimate).
    beta : float
        HIO / RAAR feedback parameter.
    init : "random" or array_like complex, (M, M) or (N, M, M)
        Random phases, or a starting object (centred, in the frame of the pattern); its all-zero
        frames start from random phases.
    support : array_like bool, optional
        Starting support (centred), (M, M) or (N, M, M).  Default: from ``init`` (relative
        modulus above 0.1) when it is an object, else the thresholded autocorrelation; an all-zero
        frame of it gets the autocorrelation's too.
    fixed_support : bool
        Keep the support fixed (no shrinkwrap).
    mask : array_like bool, optional
        True on unmeasured pixels (beamstop, gaps); (M, M) or (N, M, M).  They are left free.
    n_starts : int
        Runs per pattern (at most, with ``retry_chi2``); the one with the lowest chi^2 is kept.
        With an ``init`` object, run 0 starts from it and the others from random phases.
    retry_chi2, retry_noise : float
        With ``retry_chi2`` given, run ``k + 2`` is made only on the patterns whose best fit after
        ``k + 1`` runs misfits the data beyond the counting noise:
        ``chi2 - chi2_noise > max(retry_chi2, retry_noise * chi2_noise)``
        (:func:`napari_cdinn.protocol.needs_restart`; ``chi2_noise`` of the measured pixels,
        :func:`napari_cdinn.physics.noise_chi2`, 0 for data that are not counts).  Each pattern's
        decision depends on its own fit only.  ``retry_chi2=None``: every pattern gets
        ``n_starts`` runs.
    prtf : bool
        Also measure how reproducibly each pattern is inverted: the phase-retrieval transfer
        function of its ``n_starts`` runs (at least 2), every pattern getting every start
        (``retry_chi2`` is then ignored).  Each run is aligned to the pattern's first run (twin,
        shift, global phase) and its far field added to running sums
        (:class:`napari_cdinn.postprocess.PrtfSums`, the computation of
        :func:`napari_cdinn.postprocess.prtf`; memory: about three objects per pattern whatever
        ``n_starts``); the PRTF compares their mean with the measured intensity on the measured
        pixels only (``mask`` and NaN/inf pixels left out).  The kept result is still the run
        with the lowest chi^2.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``.
    batch_size : int, optional
        Runs inverted together (default by device, :func:`default_batch_size`).
    threads : int, optional
        CPU only: run batches on this many worker threads, each with single-threaded torch
        operations (``torch.set_num_threads(1)`` for the duration of the call, restored after;
        the setting is process-wide).  Unlike torch's own multi-threading of these small
        operations, this does not collapse when other programs load the CPU (measured:
        docs/decisions.md, "CPU retrieval").  None (default): as many workers as the thread
        policy gives (:func:`napari_cdinn.device.default_threads`: the count a command or dock set,
        else the free cores), at most ``torch.get_num_threads()``; 0: torch's own multi-threading.
    seed : int
        Random starts depend on ``(seed, first_frame + frame index, start index)`` only, never on
        the batch a pattern lands in.
    first_frame : int
        Index of the first pattern in a larger stack, so that inverting a stack piece by piece
        gives the same random starts as inverting it whole.
    frame_ids : array_like of int, (N,), optional
        Index of each pattern in a larger stack, for patterns picked from it out of order (the
        random starts then equal those of inverting the whole stack); overrides ``first_frame``.
    shrinkwrap_every : int
        Support update period in iterations (0: never).
    sigma : float or (float, float)
        Shrinkwrap blur at the first and the last update (pixels); one number: the same throughout.
    threshold : float
        Shrinkwrap relative threshold.
    autocorrelation_threshold : float
        Relative threshold of the initial autocorrelation support.
    block : int
        Iterations between ``progress`` calls and ``should_stop`` checks.
    error_every : int
        Fourier-error sampling period of the error curves.
    progress : callable(done, total), optional
        Called after every block with iterations done and planned, summed over batches (with
        ``retry_chi2`` the planned total grows when restarts are scheduled).
    should_stop : callable or threading.Event, optional
        Checked after every block.
    on_stop : {"raise", "return"}
        On a stop, raise :class:`Cancelled`, or return the frames reached so far (the running
        batch with its current estimates) with ``stopped=True``.
    snapshot : callable(frames, amplitude, phase), optional
        Live view: called after every block of every batch with the indices of the batch's
        frames (in this call), their current amplitudes (max 1, float32) and phases (radians,
        0 outside the support), centred like the final results.  With worker threads it may be
        called from several threads; keep it cheap.

    Returns
    -------
    dict
        ``object`` complex64 (N, M, M): centred in the frame (support centre of mass at
        ``(M // 2, M // 2)``), mean phase 0 inside the support, on the input's scale
        (``|forward(object)|**2 ~ intensity``); ``amplitude`` float32 (max 1 per frame);
        ``phase`` float32 (radians, 0 outside the support); ``support`` bool; ``chi2`` float32
        (N,) (:func:`napari_cdinn.physics.chi2`; 1 for a frame without data); ``chi2_noise``
        float32 (N,) (:func:`napari_cdinn.physics.noise_chi2` of the measured pixels); ``errors``
        float32 (N, E) Fourier-error curves sampled at ``error_iterations`` (E,) (NaN where a stopped run did not reach them);
        ``start_chi2`` (N, n_starts) (NaN for starts not run); ``stopped`` bool.  After a stop
        (``on_stop="return"``) the frames reached so far are returned, the running batch with
        its current estimates.
        With ``prtf``: ``prtf`` float32 (N, M // 2), the ring-averaged PRTF of each pattern's
        runs (NaN for an empty shell, and for a pattern reached by fewer than two runs after a
        stop); ``prtf_q`` float64 (M // 2,), the shells' spatial frequency in cycles per pixel;
        ``resolution`` float32 (N,), the first ``prtf_q`` where the PRTF falls below 1/e
        (:func:`napari_cdinn.postprocess.prtf_resolution`; NaN when it never does).
        For a 2-D input the frame axis is dropped.

    Raises
    ------
    ValueError
        Bad shapes or options, or a device that is not available.
    Cancelled
        When stopped with ``on_stop="raise"``.
    """
    single = len(np.shape(intensity)) == 2
    stack = _as_stack(intensity, "intensity", np.float32)
    n = stack.shape[0]
    if n == 0:
        raise ValueError("the stack holds no pattern (0 frames)")
    _check_pattern_shape(stack.shape)
    m = stack.shape[-1]
    if on_stop not in ("raise", "return"):
        raise ValueError("on_stop must be 'raise' or 'return'")
    n_starts = whole_number(n_starts, "n_starts", 1)
    iterations, average = whole_number(iterations, "iterations", 1), whole_number(average, "average", 0)
    shrinkwrap_every, block, error_every, seed = (
        whole_number(shrinkwrap_every, "shrinkwrap_every", 0), whole_number(block, "block", 1),
        whole_number(error_every, "error_every", 1), whole_number(seed, "seed", 0))
    beta = number_in(beta, "beta", 0.0, BETA_MAX)
    threshold = number_in(threshold, "threshold", 0.0, 1.0, what="a fraction in (0, 1)")
    autocorrelation_threshold = number_in(autocorrelation_threshold, "autocorrelation_threshold", 0.0, 1.0,
                                          what="a fraction in (0, 1)")
    if prtf and n_starts < 2:
        raise ValueError(f"the PRTF compares several runs of each pattern: prtf=True needs n_starts >= 2, got {n_starts}")
    if prtf:
        retry_chi2 = None  # every pattern gets every start
    if retry_chi2 is not None and not (float(retry_chi2) >= 0 and float(retry_noise) >= 0):
        raise ValueError(f"retry_chi2 and retry_noise must be >= 0, got {retry_chi2!r} and {retry_noise!r}")
    if frame_ids is None:
        frame_ids = whole_number(first_frame, "first_frame", 0) + np.arange(n)
    frame_ids = np.asarray(frame_ids, dtype=np.int64).reshape(-1)
    if frame_ids.shape != (n,):
        raise ValueError(f"frame_ids must hold one index per pattern ({n}), got {frame_ids.size}")
    schedule = make_schedule(algorithm, iterations, average)
    total_it = schedule_length(schedule)
    dev = resolve_device(device)
    workers = _workers(threads, dev)
    if batch_size is None:
        # the default batch, shrunk so that every worker gets a share of a small stack
        batch_size = max(1, min(default_batch_size(dev), -(-n // workers)))
    batch_size = whole_number(batch_size, "batch_size", 1)

    init_obj = None
    if not (isinstance(init, str) and init == "random"):
        if isinstance(init, str):
            raise ValueError(f"init must be 'random' or a complex array, got {init!r}")
        init_obj = np.asarray(init).astype(np.complex64)
        init_obj = init_obj[None] if init_obj.ndim == 2 else init_obj
        if init_obj.shape[-2:] != (m, m) or init_obj.shape[0] not in (1, n):
            raise ValueError(f"init must be shaped like the patterns, got {init_obj.shape}")
        init_obj = np.broadcast_to(init_obj, (n, m, m))
        if support is None:
            support = physics.support_from_amplitude(init_obj)
    for name, arr, meaning in (("mask", mask, "True/1 = unmeasured"), ("support", support, "True/1 = inside")):
        if arr is not None:  # never frames of another stack, never a float (0.5 would read True)
            check_mask_layout(arr, (n, m, m), name, meaning)
    mask = None if mask is None else np.asarray(mask, dtype=bool)
    support = None if support is None else np.broadcast_to(np.asarray(support, dtype=bool), (n, m, m))

    widths = [float(s) for s in np.atleast_1d(np.asarray(sigma, dtype=np.float64)).reshape(-1)]
    if len(widths) not in (1, 2) or not all(np.isfinite(widths)) or min(widths) < 0:
        raise ValueError(f"sigma must be one blur width or (first, last) in pixels, >= 0, got {sigma!r}")
    sigma = (widths[0], widths[-1])
    shrink = None
    if not fixed_support and shrinkwrap_every > 0:
        shrink = Shrinkwrap(shrinkwrap_every, float(sigma[0]), float(sigma[1]), float(threshold), average)
    ctx = {
        "stack": stack, "mask": mask, "init": init_obj, "support": support, "seed": int(seed),
        "frame_ids": frame_ids, "ac_threshold": autocorrelation_threshold, "device": dev,
        "schedule": schedule, "beta": beta, "shrink": shrink, "average": average, "block": block,
        "error_every": error_every, "should_stop": should_stop, "batch_size": batch_size,
        "error_iterations": _error_iterations(total_it, error_every),
        "workers": workers, "snapshot": snapshot, "retry_noise": retry_noise,
        "prtf": postprocess.PrtfSums(n, (m, m)) if prtf else None,
    }
    counter = PartsProgress(progress, total_it)
    counter.plan(_batch_count(n, batch_size, workers) * (n_starts if retry_chi2 is None else 1))
    start_chi2 = np.full((n, n_starts), np.nan, dtype=np.float32)
    with single_threaded_ops(dev.type == "cpu" and threads != 0):
        best, stopped = _rounds(n, n_starts, retry_chi2, batch_size, ctx, counter, start_chi2, on_stop)
    extra = None if ctx["prtf"] is None else _prtf_of(ctx, len(best["chi2"]))
    return _finish(best, start_chi2[: len(best["chi2"])], ctx["error_iterations"], single, stopped, extra)


def _prtf_of(ctx, n, block=256):
    """``prtf``, ``prtf_q`` and ``resolution`` of the first ``n`` frames from the runs' sums in ``ctx``."""
    values = []
    for lo in range(0, n, block):
        idx = np.arange(lo, min(lo + block, n))
        inten, bad = _frame_arrays(ctx["stack"], idx)
        mask = _per_frame(ctx["mask"], idx)
        if bad is not None:
            mask = bad if mask is None else np.broadcast_to(mask, bad.shape) | bad
        values.append(ctx["prtf"].values(inten, mask=mask, frames=idx)[1])
    q = postprocess.prtf_frequencies(ctx["stack"].shape[-1])
    values = np.concatenate(values) if values else np.zeros((0, len(q)))
    return {"prtf": values.astype(np.float32), "resolution": np.asarray(postprocess.prtf_resolution(q, values), np.float32),
            "prtf_q": q}


def _workers(threads, device):
    """Worker threads for the batches: ``threads``, else the thread policy on the CPU; 1 on GPUs."""
    if device.type != "cpu" or threads == 0:
        return 1
    if threads is None:  # what the command or dock set (else the free cores), never above torch's count
        return 1 if torch.get_num_threads() <= 1 else min(torch.get_num_threads(), default_threads())
    return whole_number(threads, "threads", 0)


@contextlib.contextmanager
def single_threaded_ops(active):
    """``torch.set_num_threads(1)`` inside the block when ``active``, restored after."""
    before = torch.get_num_threads()
    if active:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if active:
            torch.set_num_threads(before)


def _rounds(n, n_starts, retry_chi2, batch_size, ctx, counter, start_chi2, on_stop):
    """Start rounds: start ``k`` on every frame, or only on those that still misfit beyond the noise
    (:func:`napari_cdinn.protocol.needs_restart` with ``retry_chi2`` and ``ctx["retry_noise"]``)."""
    best = None
    stopped = False
    for k in range(n_starts):
        if k == 0 or retry_chi2 is None:
            todo = np.arange(n)
        else:
            todo = np.flatnonzero(needs_restart(best["chi2"], best["chi2_noise"], retry_chi2, ctx["retry_noise"]))
            counter.plan(_batch_count(len(todo), batch_size, ctx["workers"]))
        if not len(todo):
            break
        runs, stopped_after = _run_round(todo, k, ctx, counter)
        start_chi2[runs["frames"], k] = runs["chi2"]
        if ctx["prtf"] is not None:
            ctx["prtf"].add(runs["object"], runs["frames"])
        best = runs if best is None else _keep_better(best, runs)
        if stopped_after is not None:
            if on_stop == "raise":
                raise Cancelled(f"the reconstruction was stopped after {stopped_after} iterations", done=stopped_after)
            stopped = True
            break
    return best, stopped


def _error_iterations(total, every):
    """Iterations at which the engine samples the Fourier error."""
    every = max(int(every), 1)
    return np.asarray([i for i in range(1, total + 1) if i % every == 0 or i == total], dtype=np.int64)


def _run_round(frames, start, ctx, counter):
    """Invert ``frames`` from start index ``start``, batch by batch (on worker threads if asked).

    Returns the per-run arrays (frames completed or reached) and None, or the iteration count
    at which a stop was seen.  Batches start in order and a stop skips those not started, so
    the frames returned are always a prefix of ``frames``.
    """
    chunks = _split(frames, ctx["batch_size"], ctx["workers"])

    def job(i):
        if i and stop_requested(ctx["should_stop"]):
            return None
        return _run_batch(chunks[i], start, ctx, counter.reporter((start, i)))

    workers = ctx["workers"]
    if workers > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            done = list(pool.map(job, range(len(chunks))))
    else:
        done = []
        for i in range(len(chunks)):
            done.append(job(i))
            if done[-1][1].stopped:
                break
    done = [d for d in done if d is not None]
    runs = {k: np.concatenate([part[k] for part, _ in done]) for k in done[0][0]}
    stops = [o.iterations for _, o in done if o.stopped]
    if len(done) < len(chunks) and not stops:
        stops = [done[-1][1].iterations]
    return runs, (stops[0] if stops else None)


def _split(frames, batch_size, workers):
    """Split ``frames`` into batches of at most ``batch_size``, at least one per worker thread.

    Sizes differ by at most one, so a small round (the restarts of a few frames) still keeps
    every worker busy instead of running as one batch on one core.
    """
    return [part for part in np.array_split(frames, _batch_count(len(frames), batch_size, workers)) if len(part)]


def _batch_count(n, batch_size, workers):
    """Number of batches :func:`_split` makes of ``n`` frames."""
    return max(-(-n // batch_size), min(workers, n))


def _run_batch(frames, start, ctx, report):
    """One batch of runs on the device: prepare, iterate, score; NumPy results (centred)."""
    dev, stack = ctx["device"], ctx["stack"]
    m = stack.shape[-1]
    starts = np.full(len(frames), start)
    init_b = None if ctx["init"] is None else ctx["init"][frames]
    values, bad = _frame_arrays(stack, frames)
    mask = _per_frame(ctx["mask"], frames)
    if bad is not None:  # NaN / inf pixels are unmeasured
        mask = bad if mask is None else np.broadcast_to(mask, bad.shape) | bad
    amp, free, x0, sup0, scale = _prepare_batch(
        values, mask, init_b, _per_frame(ctx["support"], frames),
        ctx["frame_ids"][frames], starts, ctx["seed"],
    )
    amp_t = torch.from_numpy(amp / (m * m)).to(dev)
    free_t = None if free is None else torch.from_numpy(np.ascontiguousarray(free)).to(dev)
    if sup0 is None:
        sup_t = autocorrelation_support(torch.from_numpy(amp * amp).to(dev), ctx["ac_threshold"])
    else:
        sup_t = torch.from_numpy(np.ascontiguousarray(sup0)).to(dev)
        empty = sup_t.sum(dim=(-2, -1)) == 0  # an all-zero support frame gets the autocorrelation's
        if bool(empty.any()):
            sup_t[empty] = autocorrelation_support(torch.from_numpy(amp[empty.cpu().numpy()] ** 2).to(dev),
                                                   ctx["ac_threshold"])
    x = torch.from_numpy(x0).to(dev).mul_(sup_t)
    outcome = iterate(
        x, amp_t, sup_t, ctx["schedule"], beta=ctx["beta"], free=free_t, shrink=ctx["shrink"],
        average=ctx["average"], block=ctx["block"], error_every=ctx["error_every"], progress=report,
        should_stop=ctx["should_stop"], snapshot=_snapshot_reporter(ctx["snapshot"], frames, scale),
    )
    est = outcome.estimate
    pred = st.fourier(est)
    pred = pred.real.square() + pred.imag.square()
    meas = torch.from_numpy(amp * amp).to(dev)
    chi = physics.chi2(meas, pred, None if free_t is None else free_t > 0)
    chi = torch.where(meas.sum(dim=(-2, -1)) > 0, chi, torch.ones_like(chi))  # no data: no consistency
    errors = np.full((len(frames), len(ctx["error_iterations"])), np.nan, dtype=np.float32)
    if outcome.errors:
        got = torch.stack(outcome.errors, dim=1).float().cpu().numpy()
        errors[:, : got.shape[1]] = got
    part = {
        "object": st.to_centred_layout(est).cpu().numpy() * scale[:, None, None],
        "support": st.to_centred_layout(outcome.support).cpu().numpy() > 0.5,
        "chi2": chi.float().cpu().numpy(),
        "chi2_noise": physics.noise_chi2(values, mask).astype(np.float32),
        "errors": errors,
        "frames": np.asarray(frames),
    }
    return part, outcome


def _snapshot_reporter(callback, frames, scale):
    """Turn ``callback(frames, amplitude, phase)`` into the engine's ``snapshot(estimate, support)``."""
    if callback is None:
        return None

    def report(estimate, support):
        obj, sup = finish_frames(st.to_centred_layout(estimate).cpu().numpy() * scale[:, None, None],
                                 st.to_centred_layout(support).cpu().numpy() > 0.5)
        amp = np.abs(obj)
        amp /= np.maximum(amp.max(axis=(1, 2), keepdims=True), 1e-30)
        callback(np.asarray(frames), amp.astype(np.float32), np.where(sup, np.angle(obj), 0).astype(np.float32))

    return report


def _keep_better(best, runs):
    """Replace the frames of ``best`` where ``runs`` reached a lower chi^2 (NaN never wins)."""
    idx = runs["frames"]
    better = runs["chi2"] < best["chi2"][idx]
    better |= np.isnan(best["chi2"][idx]) & ~np.isnan(runs["chi2"])
    for key in ("object", "support", "chi2", "errors"):
        best[key][idx[better]] = runs[key][better]
    return best


def _finish(best, start_chi2, error_iterations, single, stopped, prtf=None):
    """Centre and phase-normalise the kept runs; the output dict of :func:`reconstruct` (``prtf``: its PRTF keys)."""
    obj, sup = finish_frames(best["object"], best["support"])
    amp = np.abs(obj).astype(np.float32)
    peak = amp.max(axis=(1, 2), keepdims=True)
    amplitude = (amp / np.where(peak > 0, peak, 1.0)).astype(np.float32)
    phase = np.where(sup, np.angle(obj), 0.0).astype(np.float32)
    out = {
        "object": obj.astype(np.complex64),
        "amplitude": amplitude,
        "phase": phase,
        "support": sup,
        "chi2": best["chi2"].astype(np.float32),
        "chi2_noise": best["chi2_noise"].astype(np.float32),
        "errors": best["errors"].astype(np.float32),
        "start_chi2": start_chi2,
    }
    if prtf is not None:
        out.update(prtf=prtf["prtf"], resolution=prtf["resolution"])
    if single:
        out = {k: v[0] for k, v in out.items()}
    if prtf is not None:
        out["prtf_q"] = prtf["prtf_q"]
    out["error_iterations"] = error_iterations
    out["stopped"] = stopped
    return out


def reconstruct_chunk(intensity, first_frame=0, init="random", mask=None, **options):
    """Chunk function for :func:`napari_cdinn.stream.process_stack` (picklable via ``partial``): the protocol.

    The network-seeded variant (``init="nn"``, with its fallback to the protocol) is
    :func:`napari_cdinn.pipelines.reconstruct_chunk`: this package does not import the networks.

    Parameters
    ----------
    intensity : ndarray, float32, (n, M, M)
    first_frame : int
        Index of the chunk's first frame in the stack: random starts follow the frame index,
        so the result does not depend on the chunk size.
    init : "random" or array_like complex
        As in :func:`reconstruct`.
    mask : ndarray of bool, (M, M) or (n, M, M), optional
        True on unmeasured pixels (left free by the modulus step, out of chi^2).
    **options
        Passed to :func:`reconstruct`.

    Returns
    -------
    dict of ``amplitude``, ``phase``, ``support`` (n, M, M), ``chi2`` and ``chi2_noise`` (n,) and ``start``
    uint8 (n,), 0: every result started from random phases (the key :func:`napari_cdinn.pipelines.reconstruct_chunk`
    also writes); with ``prtf=True`` also ``prtf`` (n, M // 2) and ``resolution`` (n,) (per-frame
    arrays only: the shells' frequencies ``prtf_q`` are the same for every chunk,
    :func:`napari_cdinn.postprocess.prtf_frequencies`).
    """
    if isinstance(init, str) and init == "nn":
        raise ValueError("init='nn' needs the networks: use napari_cdinn.pipelines.reconstruct_chunk")
    res = reconstruct(intensity, first_frame=first_frame, init=init, mask=mask, **options)
    out = {k: res[k] for k in ("amplitude", "phase", "support", "chi2", "chi2_noise", "prtf", "resolution") if k in res}
    out["start"] = np.zeros(np.shape(out["chi2"]), dtype=np.uint8)
    return out
