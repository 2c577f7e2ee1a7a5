"""Iterative phase retrieval: batched torch engine against a plain NumPy loop, and quality.

Usage::

    python benchmarks/bench_retrieval.py [--count 256] [--numpy-count 16] [--device cpu] [--json OUT.json]
    python benchmarks/bench_retrieval.py --held-out [--count 300] [--numpy-count N] [--only SET] [--json OUT.json]

Both engines run the same protocol (the paper's: HIO x80 / ER x20 cycles, shrinkwrap every 20
iterations, 620 iterations, the final 20 averaged) on fresh paper-recipe patterns
(``simulate(..., oversampling=2)``, 64 x 64).  Reported: patterns/s of each and the speed-up,
the cost of one engine iteration over the cost of the FFT pair it contains, and quality against
the truth after cropping to 32 x 32 (``physics.compare``: up to twin, shift and global phase):
phase RMS inside the object (median, 90th percentile), support IoU and chi^2.  When
``cohere-core`` is importable (the ``bench`` extra) it runs the same protocol on the NumPy subset
(:func:`cohere_params`: the same schedule, shrinkwrap settings, start support and restarts; its
NumPy back end on the CPU, its torch back end on a GPU); otherwise that part is skipped with a note.

``--held-out`` (:func:`run_held_out`) measures what a user runs instead: the whole default
``cdinn reconstruct`` command (a new process per set, its start, imports, reading and writing
included; the default protocol with its restarts, :mod:`napari_cdinn.protocol`) on ``count``
patterns of every held-out set of ``bench_realistic.py`` (seeds ``BENCH_SEED + i``; the set's
own mask, as ``cdinn`` reads it), against the paper's protocol as the plain NumPy loop run once per
pattern (one 620-iteration run, one core, unmeasured pixels left free) on the first
``numpy_count`` of them: milliseconds per pattern, the speed-up, and the quality of both on the
same patterns; the same call in-process gives the fraction of patterns restarted and the runs
per pattern.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import numpy as np
from scipy import ndimage

from napari_cdinn import physics
from napari_cdinn.device import machine_info, resolve_device
from napari_cdinn.io import write_json
from napari_cdinn.retrieval import default_batch_size, default_schedule, reconstruct
from napari_cdinn.retrieval.api import single_threaded_ops
from napari_cdinn.retrieval.schedule import expand_schedule
from napari_cdinn.simulate import simulate

#: Arguments of ``run`` for a quick smoke run (``cdinn bench --quick``).
QUICK = {"count": 32, "numpy_count": 4, "ratio_iterations": 40}

_ITER = 620
_AVERAGE = 20


# --------------------------------------------------------------------------- NumPy reference
def autocorrelation_start(intensity, threshold=0.1):
    """The protocol's start support: the blurred autocorrelation above ``threshold`` of its peak.

    ``intensity`` and the support are in the FFT layout (origin at pixel ``(0, 0)``).
    """
    auto = ndimage.gaussian_filter(np.abs(np.fft.ifft2(intensity)), 1.0, mode="wrap")
    return auto > threshold * auto.max()


def numpy_reconstruct(intensity, seed=0, frame=0, start=0, iterations=_ITER, average=_AVERAGE, beta=0.9,
                      every=20, sigma=(3.0, 1.0), threshold=0.12, ac_threshold=0.1, mask=None):
    """The same protocol as ``reconstruct``, written as a plain one-pattern NumPy loop.

    Textbook steps (complex128, ``exp(1j * angle)`` modulus projection, ``np.where`` support
    projection, ``scipy.ndimage`` blur for shrinkwrap); FFT layout throughout, no shifts inside
    the loop.  ``mask`` (True = unmeasured, centred like ``intensity``): those pixels read 0 and
    are left free by the modulus projection.

    Returns
    -------
    obj : ndarray, complex128, (M, M), centred layout
    """
    amp = np.sqrt(np.maximum(np.fft.ifftshift(intensity), 0))
    free = None if mask is None else np.fft.ifftshift(np.asarray(mask, dtype=bool))
    if free is not None:
        amp = np.where(free, 0.0, amp)
    support = autocorrelation_start(amp * amp, ac_threshold)
    rng = np.random.default_rng([seed, frame, start])
    x = np.fft.ifft2(amp * np.exp(1j * rng.uniform(-np.pi, np.pi, amp.shape))) * support
    plan = expand_schedule(default_schedule("hio-er", iterations, average))
    last_sw = iterations - average
    acc = None
    for it, step in enumerate(plan):
        f = np.fft.fft2(x)
        proj = amp * np.exp(1j * np.angle(f))
        y = np.fft.ifft2(proj if free is None else np.where(free, f, proj))
        if step == "er":
            x = np.where(support, y, 0)
        else:
            x = np.where(support, y, x - beta * y)
        est = np.where(support, y, 0)
        if it >= iterations - average:
            if acc is None:
                acc = est
            else:
                c = np.sum(acc * np.conj(est))
                acc = acc + est * c / max(abs(c), 1e-30)
        done = it + 1
        if done % every == 0 and done <= last_sw:
            s = sigma[0] + (sigma[1] - sigma[0]) * min(done / last_sw, 1.0)
            blur = ndimage.gaussian_filter(np.abs(est), s, mode="wrap")
            support = blur > threshold * blur.max()
    return np.fft.fftshift(acc / average)


def best_of_starts(run_once, intensity, n_starts=1, retry_chi2=1e-4):
    """Up to ``n_starts`` runs ``run_once(k)``, restarting while the best chi^2 > ``retry_chi2``.

    Returns
    -------
    obj : ndarray, (M, M), centred layout; the run with the lowest chi^2
    runs : int, the number of runs made
    """
    best, best_chi = None, np.inf
    for k in range(n_starts):
        obj = run_once(k)
        chi = float(physics.chi2(intensity, physics.intensity(obj)))
        if chi < best_chi:
            best, best_chi = obj, chi
        if retry_chi2 is not None and best_chi <= retry_chi2:
            return best, k + 1
    return best, n_starts


def numpy_protocol(intensity, seed=0, frame=0, n_starts=1, retry_chi2=1e-4):
    """:func:`numpy_reconstruct` with :func:`best_of_starts`: ``(obj, runs)``."""
    return best_of_starts(lambda k: numpy_reconstruct(intensity, seed, frame, k), intensity, n_starts, retry_chi2)


# --------------------------------------------------------------------------- measurements
def _quality(objects, data):
    """Scores against the truth after cropping to the object frame."""
    size = data["amplitude"].shape[-1]
    c = physics.compare(physics.crop(objects, (size, size)), data["amplitude"], data["phase"])
    pr, iou = c["phase_rms"], c["iou"]
    return {
        "phase_rms_median": float(np.nanmedian(pr)),
        "phase_rms_p90": float(np.nanpercentile(pr, 90)),
        "iou_median": float(np.median(iou)),
        "iou_p10": float(np.percentile(iou, 10)),
        "twin_fraction": float(np.mean(c["twin"])),
    }


def iteration_cost_ratio(batch, iterations=100, device="cpu", step="hio"):
    """Seconds per engine iteration over seconds per bare ``fft2`` + ``ifft2`` pair, same batch.

    The engine iteration (modulus projection + update, no shrinkwrap, error every 1000) runs
    through :func:`napari_cdinn.retrieval.iterate`; the FFT pair uses preallocated outputs.
    """
    import torch

    from napari_cdinn.retrieval import iterate

    dev = torch.device(device)
    m = batch.shape[-1]
    amp = torch.from_numpy(np.fft.ifftshift(np.sqrt(batch), axes=(-2, -1)) / (m * m)).float().to(dev)
    sup = torch.ones_like(amp)
    x = torch.randn(amp.shape, dtype=torch.complex64, device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def engine(n):
        iterate(x, amp, sup, [(step, n)], shrink=None, average=0, block=10**9, error_every=10**9)

    f = torch.empty_like(x)
    g = torch.empty_like(x)

    def pair(n):
        for _ in range(n):
            torch.fft.fft2(x, out=f)
            torch.fft.ifft2(f, norm="forward", out=g)

    best = {}
    for name, fn in (("engine", engine), ("pair", pair)):
        fn(5)
        times = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            fn(iterations)
            sync()
            times.append((time.perf_counter() - t0) / iterations)
        best[name] = min(times)
    return {
        "iteration_s_per_pattern": best["engine"] / len(batch),
        "fft_pair_s_per_pattern": best["pair"] / len(batch),
        "iteration_over_fft_pair": best["engine"] / best["pair"],
        "batch": len(batch),
        "step": step,
    }


#: Minimal memory traffic of one HIO iteration, bytes per pixel: the FFT pair reads and writes the
#: complex64 field once each (32), the modulus projection reads field + amplitude and writes the
#: field (20), the update reads iterate + projection + support and writes the iterate (28).
BYTES_PER_PIXEL_ITERATION = 80


def gpu_bandwidth(ratio, device):
    """Achieved iteration bandwidth and its fraction of the GPU's peak (CUDA only, else {})."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(dev)
    m2 = 64 * 64
    achieved = BYTES_PER_PIXEL_ITERATION * m2 / ratio["iteration_s_per_pattern"]
    out = {"gpu_name": props.name, "iteration_bandwidth_GBps": achieved / 1e9,
           "bytes_per_pixel_iteration": BYTES_PER_PIXEL_ITERATION}
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        peak = 2 * clock_khz * 1e3 * bus_bits / 8
        out.update(peak_bandwidth_GBps=peak / 1e9, bandwidth_fraction=achieved / peak)
    return out


def cohere_params(iterations=_ITER, average=_AVERAGE, every=20, sigma=(3.0, 1.0), threshold=0.12, beta=0.9):
    """cohere-core settings that run the protocol of :func:`numpy_reconstruct`.

    The same HIO/ER schedule, written as cohere's ``algorithm_sequence`` in 20-iteration pieces, each
    with its own shrinkwrap sub-trigger (``.SWk``) at the piece's last iteration, so the Gaussian's
    width falls from ``sigma[0]`` to ``sigma[1]`` as in the engine (cohere's global trigger keeps
    one width); the same relative threshold; no support update in the last ``average``
    iterations. cohere blurs its current iterate (outside the support too, during HIO) where the
    engine blurs the support-projected estimate, and does not average the last iterations: its
    algorithm, left as it is.
    """
    from napari_cdinn.retrieval.support import shrinkwrap_sigma

    plan = expand_schedule(default_schedule("hio-er", iterations, average))
    last = iterations - average
    pieces, sigmas, start = [], [], 0
    for end in range(1, len(plan) + 1):
        if end < len(plan) and plan[end] == plan[start] and not (end <= last and end % every == 0):
            continue
        piece = f"{end - start}*{plan[start].upper()}"
        if end <= last and end % every == 0:
            piece += f".SW{len(sigmas)}"
            sigmas.append(shrinkwrap_sigma(end, last, *sigma))
        pieces.append(piece)
        start = end
    return {"algorithm_sequence": "+".join(pieces), "hio_beta": beta, "shrink_wrap_type": "GAUSS",
            "shrink_wrap_trigger": [[every - 1] for _ in sigmas],
            "shrink_wrap_threshold": [threshold] * len(sigmas), "shrink_wrap_gauss_sigma": sigmas}


def cohere_reconstruct(intensity, workdir, pkg="np", device=-1, ac_threshold=0.1):
    """One pattern through cohere-core's ``Rec`` (:func:`cohere_params`); the complex object.

    cohere reads centred amplitudes from a file, and its start support from ``support.npy`` in
    ``continue_dir``: the protocol's autocorrelation support, centred in the frame (cohere's
    object can sit anywhere). Its transform to reciprocal space has the opposite sign to ours,
    so its object is the complex conjugate of ours: conjugated here. Console output is silenced.
    """
    import contextlib
    import io as _io

    from cohere_core.controller import phasing

    amp = np.sqrt(np.maximum(intensity, 0)).astype(np.float32)
    path = os.path.join(workdir, "cohere_data.npy")
    np.save(path, amp)
    start = autocorrelation_start(np.fft.ifftshift(amp.astype(np.float64) ** 2), ac_threshold)
    np.save(os.path.join(workdir, "support.npy"), np.fft.fftshift(start).astype(np.float32))
    params = {**cohere_params(), "continue_dir": workdir}
    with contextlib.redirect_stdout(_io.StringIO()), contextlib.redirect_stderr(_io.StringIO()):
        rec = phasing.create_rec(params, path, pkg, device, debug=True)
        rec.iterate()
    image = rec.ds_image
    image = image.cpu().numpy() if hasattr(image, "cpu") else np.asarray(image)
    return np.conj(image)


@contextlib.contextmanager
def seeded_cohere_starts(seed):
    """cohere-core's random starts drawn from seeded generators, so that its figures repeat.

    cohere 4.5.4 reseeds NumPy's global generator from the clock and the pid at every start
    (``nplib.random``) and its torch back end draws unseeded (``torchlib.random``): two runs of the
    benchmark differed by 0.09 rad in its median phase RMS on the same 16 patterns.  Inside this
    block each start is drawn as cohere draws it (the same distribution), from a generator seeded
    by ``(seed, start number)``.
    """
    import itertools

    from cohere_core.lib import nplib

    count = itertools.count()

    def np_start(shape, **kwargs):
        rng = np.random.default_rng([seed, next(count)])
        return rng.random(shape) + 1j * rng.random(shape)

    def torch_start(shape, **kwargs):
        import torch

        gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, next(count)]).integers(2**62)))
        return torch.rand(shape, generator=gen).to(kwargs.get("device", "cpu"))

    libs = [(nplib.nplib, np_start)]
    with contextlib.suppress(ImportError):  # the torch back end needs torch
        from cohere_core.lib import torchlib

        libs.append((torchlib.torchlib, torch_start))
    saved = [(lib, lib.__dict__["random"]) for lib, _ in libs]
    try:
        for lib, start in libs:
            lib.random = staticmethod(start)
        yield
    finally:
        for lib, original in saved:
            lib.random = original


def run_cohere(inten, data, count, device="cpu", n_starts=1, retry_chi2=1e-4):
    """cohere-core on the first ``count`` patterns: ms per pattern and quality, or a note when absent.

    One pattern at a time (cohere's unit of work), with the restarts of :func:`numpy_protocol`;
    its NumPy back end on the CPU, its torch back end on a CUDA device.
    """
    import importlib.metadata
    import tempfile
    import warnings

    from napari_cdinn.retrieval.api import finish_frames

    try:
        import cohere_core.controller.phasing  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: not available
        return {"available": False, "note": f"cohere-core is not importable ({type(exc).__name__}): skipped"}
    pkg, dev = ("torch", 0) if str(device).startswith("cuda") else ("np", -1)
    n = min(count, len(inten))
    with tempfile.TemporaryDirectory() as workdir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with seeded_cohere_starts(0):
            t0 = time.perf_counter()
            out = [best_of_starts(lambda k, i=i: cohere_reconstruct(inten[i], workdir, pkg, dev), inten[i],
                                  n_starts, retry_chi2) for i in range(n)]
            dt = time.perf_counter() - t0
    objs = np.stack([o for o, _ in out]).astype(np.complex64)
    runs = float(np.mean([r for _, r in out]))
    objs, _ = finish_frames(objs, physics.support_from_amplitude(objs))
    sub = {k: data[k][:n] for k in ("amplitude", "phase")}
    return {"available": True, "version": importlib.metadata.version("cohere-core"), "backend": pkg,
            "count": n, "runs_per_pattern": runs, "patterns_per_s": n / dt, "ms_per_pattern": 1e3 * dt / n,
            "ms_per_run": 1e3 * dt / (n * runs), "params": cohere_params(), "quality": _quality(objs, sub),
            "note": "cohere-core, one pattern at a time, the protocol's schedule, shrinkwrap, start support "
                    "and restarts (cohere_params); its object conjugated"}


def run(count=256, numpy_count=16, device="cpu", batch_size=None, n_starts=4, retry_chi2=1e-4, seed=2024,
        ratio_iterations=100, threads=None) -> dict:
    """Run the benchmark and return its figures as a dict.

    Parameters
    ----------
    count : int
        Patterns inverted by the batched engine (quality is scored on these).
    numpy_count : int
        Patterns inverted by the NumPy loop (the first ones of the same set).
    device : str
        Torch device of the engine.
    batch_size : int, optional
        Engine batch (default by device).
    n_starts : int
        Random starts per pattern at most (both engines; best by chi^2).
    retry_chi2 : float or None
        Restart only patterns whose chi^2 is still above this (both engines); None: all starts.
    seed : int
        Simulation seed (fresh patterns: not the tests' seeds).
    ratio_iterations : int
        Iterations timed for the iteration / FFT-pair ratio.
    threads : int, optional
        ``reconstruct(threads=...)``: worker threads with single-threaded operations (default:
        torch's thread count); 0 uses torch's own multi-threading instead.
    """
    import torch

    dev = resolve_device(device)
    data = simulate(count, seed=seed, oversampling=2)
    inten = data["intensity"]

    load_before = os.getloadavg()[0]
    reconstruct(inten[: min(8, count)], device=dev, iterations=40, threads=threads)  # warm-up
    t0 = time.perf_counter()
    res = reconstruct(inten, device=dev, batch_size=batch_size, iterations=_ITER, n_starts=n_starts,
                      retry_chi2=retry_chi2, retry_noise=0.0, seed=0, threads=threads)
    t_torch = time.perf_counter() - t0
    torch_runs = float(np.mean((~np.isnan(res["start_chi2"])).sum(axis=1)))

    n_np = min(numpy_count, count)
    t0 = time.perf_counter()
    np_out = [numpy_protocol(inten[i], 0, i, n_starts, retry_chi2) for i in range(n_np)]
    t_numpy = time.perf_counter() - t0
    np_objs = np.stack([o for o, _ in np_out])
    numpy_runs = float(np.mean([r for _, r in np_out]))

    ratio_batch = batch_size or default_batch_size(dev)
    with single_threaded_ops(dev.type == "cpu"):  # the cost of one iteration on one core
        ratio = iteration_cost_ratio(inten[: min(ratio_batch, count)], ratio_iterations, str(dev))
    torch_pps = count / t_torch
    numpy_pps = n_np / t_numpy
    sub = {k: data[k][:n_np] for k in ("amplitude", "phase")}
    return {
        "benchmark": "retrieval",
        "protocol": f"hio-er, {_ITER} iterations, last {_AVERAGE} averaged, shrinkwrap every 20, "
                    f"up to {n_starts} starts (restart while chi2 > {retry_chi2})",
        "count": count,
        "seed": seed,
        "numpy_count": n_np,
        "batch_size": batch_size or "auto",
        "threads": "auto" if threads is None else threads,
        "n_starts": n_starts,
        "retry_chi2": retry_chi2,
        "torch_runs_per_pattern": torch_runs,
        "numpy_runs_per_pattern": numpy_runs,
        "torch_ms_per_run": 1e3 * t_torch / (count * torch_runs),
        "numpy_ms_per_run": 1e3 * t_numpy / (n_np * numpy_runs),
        "speedup_per_run": (t_numpy / (n_np * numpy_runs)) / (t_torch / (count * torch_runs)),
        "torch_patterns_per_s": torch_pps,
        "torch_ms_per_pattern": 1e3 / torch_pps,
        "numpy_patterns_per_s": numpy_pps,
        "numpy_ms_per_pattern": 1e3 / numpy_pps,
        "speedup": torch_pps / numpy_pps,
        **ratio,
        **gpu_bandwidth(ratio, dev),
        "quality_torch": {**_quality(res["object"], data), "chi2_median": float(np.median(res["chi2"]))},
        "quality_torch_on_numpy_subset": _quality(res["object"][:n_np], sub),
        "quality_numpy": _quality(np_objs, sub),
        "targets": {"phase_rms_median": 0.2, "phase_rms_p90": 0.6, "iou_median": 0.9, "speedup": 10},
        "cohere": run_cohere(inten, data, n_np, str(dev), n_starts, retry_chi2),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "machine": machine_info(dev),
    }


# --------------------------------------------------------------------------- the whole command, held-out sets
def cli_reconstruct(data, threads=None, extra=()):
    """Run the whole ``cdinn reconstruct`` command on a ``simulate`` set; wall seconds and its result.

    The set is written as an NPZ file with its ``intensity`` and, where something is unmeasured,
    its ``mask`` (which ``cdinn`` reads as the input's own mask); the command runs in a new Python
    process with its defaults (``extra``: more arguments; ``threads``: ``--threads``).

    Returns
    -------
    seconds : float, from the process start to its end
    result : dict of the output's ``amplitude``, ``phase``, ``support``, ``chi2``
    """
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        arrays = {"intensity": data["intensity"]}
        if data.get("mask") is not None and np.any(data["mask"]):
            arrays["mask"] = data["mask"]
        np.savez(src, **arrays)
        cmd = [sys.executable, "-m", "napari_cdinn.cli", "reconstruct", src, "-o", dst, "--device", "cpu", *extra]
        if threads:
            cmd += ["--threads", str(threads)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        seconds = time.perf_counter() - t0
        with np.load(dst) as f:
            return seconds, {k: f[k] for k in ("amplitude", "phase", "support", "chi2")}


def numpy_runs(data, count):
    """The paper's protocol as the NumPy loop, once per pattern, on the first ``count`` patterns.

    Returns
    -------
    seconds : float
    objects : ndarray, complex, (count, M, M), centred
    """
    mask = data.get("mask")
    masks = [None if mask is None else mask if np.ndim(mask) == 2 else mask[i] for i in range(count)]
    t0 = time.perf_counter()
    objs = [numpy_reconstruct(data["intensity"][i], 0, i, mask=masks[i]) for i in range(count)]
    return time.perf_counter() - t0, np.stack(objs)


def held_out_set(data, numpy_count, threads=None):
    """The default ``cdinn reconstruct`` and the NumPy protocol on one held-out set (see the module notes)."""
    from napari_cdinn.retrieval.api import finish_frames

    n = len(data["intensity"])
    n_np = min(numpy_count, n) if numpy_count is not None else n
    seconds, out = cli_reconstruct(data, threads)
    obj = out["amplitude"] * np.exp(1j * out["phase"])
    t0 = time.perf_counter()
    res = reconstruct(data["intensity"], mask=data.get("mask"), device="cpu", threads=threads)
    in_process = time.perf_counter() - t0
    ran = ~np.isnan(res["start_chi2"])
    np_seconds, np_obj = numpy_runs(data, n_np)
    np_obj, _ = finish_frames(np_obj.astype(np.complex64), physics.support_from_amplitude(np_obj))
    sub = {k: data[k][:n_np] for k in ("amplitude", "phase")}
    command = {**_quality(obj, data), "ms_per_pattern": 1e3 * seconds / n,
               "in_process_ms_per_pattern": 1e3 * in_process / n, "chi2_median": float(np.median(out["chi2"])),
               "restarted": float(np.mean(ran[:, 1:].any(axis=1))) if ran.shape[1] > 1 else 0.0,
               "runs_per_pattern": float(ran.sum(axis=1).mean()),
               "same_as_in_process": bool(np.allclose(out["chi2"], res["chi2"], rtol=1e-4, atol=1e-9))}
    numpy = {**_quality(np_obj, sub), "count": n_np, "ms_per_pattern": 1e3 * np_seconds / n_np}
    on_subset = _quality(obj[:n_np], sub)
    better = {"phase_rms_median": on_subset["phase_rms_median"] <= numpy["phase_rms_median"],
              "phase_rms_p90": on_subset["phase_rms_p90"] <= numpy["phase_rms_p90"],
              "iou_median": on_subset["iou_median"] >= numpy["iou_median"]}
    return {"count": n, "command": command, "command_on_numpy_subset": on_subset, "numpy": numpy,
            "speedup": numpy["ms_per_pattern"] / command["ms_per_pattern"],
            "at_least_numpy": {k: bool(v) for k, v in better.items()}}


def run_held_out(count=300, numpy_count=None, conditions=None, threads=None):
    """:func:`held_out_set` on every held-out set of ``bench_realistic`` (or those named)."""
    import sys
    from pathlib import Path

    import torch

    from napari_cdinn import protocol

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_realistic import BENCH_SEED, CONDITIONS

    names = list(CONDITIONS) if conditions is None else list(conditions)
    cli_reconstruct(simulate(2, seed=0, oversampling=2), threads)  # warm-up: disk caches, byte code
    out = {"benchmark": "retrieval_held_out", "count": int(count), "numpy_count": numpy_count, "seed": BENCH_SEED,
           "threads": "auto" if threads is None else threads, "torch_threads": torch.get_num_threads(),
           "protocol": {"iterations": protocol.ITERATIONS, "starts": protocol.STARTS,
                        "restart_chi2": protocol.RESTART_CHI2, "restart_noise": protocol.RESTART_NOISE},
           "numpy_protocol": f"hio-er, {_ITER} iterations, last {_AVERAGE} averaged, one run per pattern",
           "load_average_1min": {"before": os.getloadavg()[0]}, "conditions": {}}
    for name in names:
        t0 = time.perf_counter()
        data = simulate(count, seed=BENCH_SEED + list(CONDITIONS).index(name), oversampling=2, **CONDITIONS[name])
        out["conditions"][name] = held_out_set(data, numpy_count, threads)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    out["load_average_1min"]["after"] = os.getloadavg()[0]
    out["machine"] = machine_info(resolve_device("cpu"))
    return out


def _held_out_table(res):
    rows = [("set", "cdinn ms/pattern", "NumPy ms/pattern", "speed-up", "restarted", "runs",
             "cdinn phase med/p90, IoU", "NumPy phase med/p90, IoU")]
    for name, c in res["conditions"].items():
        q, n = c["command_on_numpy_subset"], c["numpy"]
        rows.append((name, f"{c['command']['ms_per_pattern']:.2f}", f"{n['ms_per_pattern']:.1f}", f"{c['speedup']:.1f}",
                     f"{c['command']['restarted']:.2f}", f"{c['command']['runs_per_pattern']:.2f}",
                     f"{q['phase_rms_median']:.3f}/{q['phase_rms_p90']:.3f}, {q['iou_median']:.3f}",
                     f"{n['phase_rms_median']:.3f}/{n['phase_rms_p90']:.3f}, {n['iou_median']:.3f}"))
    return "\n".join("  ".join(f"{c!s:>14}" for c in r) for r in rows)


def summary(res):
    """The headline figures of a result (for ``cdinn bench``)."""
    q = res["quality_torch"]
    return {
        "torch_ms_per_pattern": round(res["torch_ms_per_pattern"], 2),
        "numpy_ms_per_pattern": round(res["numpy_ms_per_pattern"], 1),
        "speedup": round(res["speedup"], 1),
        "iteration_over_fft_pair": round(res["iteration_over_fft_pair"], 2),
        "phase_rms_median": round(q["phase_rms_median"], 3),
        "phase_rms_p90": round(q["phase_rms_p90"], 3),
        "iou_median": round(q["iou_median"], 3),
        "device": res["machine"].get("device"),
    }


def _table(res):
    q, qn, qs = res["quality_torch"], res["quality_numpy"], res["quality_torch_on_numpy_subset"]
    rows = [
        ("engine", "patterns", "ms/pattern", "phase RMS med", "phase RMS p90", "IoU med"),
        ("torch batched", res["count"], f"{res['torch_ms_per_pattern']:.2f}", f"{q['phase_rms_median']:.3f}",
         f"{q['phase_rms_p90']:.3f}", f"{q['iou_median']:.3f}"),
        ("torch (numpy subset)", res["numpy_count"], "", f"{qs['phase_rms_median']:.3f}",
         f"{qs['phase_rms_p90']:.3f}", f"{qs['iou_median']:.3f}"),
        ("numpy loop", res["numpy_count"], f"{res['numpy_ms_per_pattern']:.1f}", f"{qn['phase_rms_median']:.3f}",
         f"{qn['phase_rms_p90']:.3f}", f"{qn['iou_median']:.3f}"),
    ]
    lines = ["  ".join(f"{c!s:>20}" for c in r) for r in rows]
    lines.append(f"runs per pattern: torch {res['torch_runs_per_pattern']:.2f}, numpy {res['numpy_runs_per_pattern']:.2f}; "
                 f"per run: torch {res['torch_ms_per_run']:.2f} ms, numpy {res['numpy_ms_per_run']:.1f} ms "
                 f"({res['speedup_per_run']:.1f}x); load average {res['load_average_1min']['before']:.1f}")
    lines.append(f"speed-up {res['speedup']:.1f}x; one iteration = {res['iteration_over_fft_pair']:.2f} FFT pairs "
                 f"({res['iteration_s_per_pattern'] * 1e6:.1f} us vs {res['fft_pair_s_per_pattern'] * 1e6:.1f} us "
                 f"per pattern, batch {res['batch']}); chi2 median {q['chi2_median']:.2e}; "
                 f"device {res['machine'].get('device')}, threads {res['threads']}")
    coh = res["cohere"]
    if coh.get("available"):
        q = coh["quality"]
        lines.append(f"cohere-core {coh['version']} ({coh['backend']}, {coh['count']} patterns): "
                     f"{coh['ms_per_pattern']:.1f} ms/pattern, {coh['runs_per_pattern']:.2f} runs, "
                     f"{coh['ms_per_run']:.1f} ms per run; phase RMS median {q['phase_rms_median']:.3f}, "
                     f"p90 {q['phase_rms_p90']:.3f}, IoU median {q['iou_median']:.3f}")
    else:
        lines.append(f"cohere-core: {coh['note']}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=None,
                   help="patterns for the batched engine (default 256), or per held-out set (default 300)")
    p.add_argument("--numpy-count", type=int, default=None,
                   help="patterns for the NumPy loop (default 16), or per held-out set (default: all of them)")
    p.add_argument("--held-out", action="store_true",
                   help="the whole default `cdinn reconstruct` per held-out set against the NumPy protocol per pattern")
    p.add_argument("--only", action="append", default=None, metavar="SET",
                   help="with --held-out, only this set of bench_realistic.CONDITIONS (repeatable)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--starts", type=int, default=4, help="random starts per pattern at most (default 4)")
    p.add_argument("--retry-chi2", type=float, default=1e-4,
                   help="restart only patterns above this chi2 (default 1e-4; 0 = every start)")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--threads", type=int, default=None,
                   help="worker threads of the engine (default: torch's thread count; 0: torch's own threading)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.held_out:
        res = run_held_out(args.count or 300, args.numpy_count, args.only, args.threads)
        print(_held_out_table(res))
    else:
        res = run(args.count or 256, 16 if args.numpy_count is None else args.numpy_count, args.device,
                  args.batch_size, args.starts, args.retry_chi2 if args.retry_chi2 > 0 else None, args.seed,
                  threads=args.threads)
        print(_table(res))
    if args.json:
        write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
