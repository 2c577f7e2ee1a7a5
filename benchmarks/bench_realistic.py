"""Real detector data: the network, the NN-seeded refinement and the protocol on held-out sets.

Usage::

    python benchmarks/bench_realistic.py [--model NAME|PATH] [--count 200] [--threads 2] [--json OUT.json]

Every set holds ``count`` 2x-oversampled 64 x 64 patterns of 32-pixel objects from the project's
simulator (:mod:`napari_cdinn.simulate`), with seeds of their own (``BENCH_SEED`` + the set's
index: disjoint from the training, validation and ``TEST_SEED`` streams), one condition each
(:data:`CONDITIONS`): noise-free; 1e6, 1e5, 1e4 and 1e3 photons per pattern; a beamstop of
radius 1, 2 and 3 pixels; detector gaps; textured objects; non-convex objects with holes; and
the training mixture (``realistic`` objects and detector).  Unmeasured pixels are given as the
mask the simulator writes, as ``cdinn`` uses a file's own mask.

Methods, each timed per pattern on the same patterns:

* ``network``: :func:`napari_cdinn.nn.predict` (the network alone, the default ``cdinn predict``);
* ``refined``: :func:`napari_cdinn.pipelines.refine_with_fallback` (``cdinn reconstruct --init nn``:
  the network's guess refined, the paper's protocol where the rule says it may do better);
* ``protocol``: :func:`napari_cdinn.retrieval.reconstruct` with the paper's 620 iterations from one
  random start (``cdinn reconstruct --iterations 620 --starts 1``; the default ``cdinn reconstruct``,
  with its restarts, is measured by ``benchmarks/bench_retrieval.py --held-out``).

Scores (up to twin, shift and global phase, retrieval results cropped to 32 x 32): support IoU
(median), phase RMS inside the true object (median, p90), chi^2 (median) and, for the network,
whose ``trusted`` flag users act on, the trusted fraction and the fraction of frames that are
trusted but wrong (IoU < 0.7).  ``numpy_ms_per_pattern`` times the plain NumPy
620-iteration loop (``benchmarks/bench_retrieval.py``) on a few noise-free patterns, the
reference of the speed-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from napari_cdinn import physics
from napari_cdinn.device import machine_info
from napari_cdinn.io import write_json
from napari_cdinn.simulate import Detector, simulate

#: Seed of the first set; set ``i`` uses ``BENCH_SEED + i``.
BENCH_SEED = 20_261_128
#: Held-out sets: ``simulate`` keywords per condition.
CONDITIONS = {
    "noise_free": {},
    "photons_1e6": {"photons": 1e6},
    "photons_1e5": {"photons": 1e5},
    "photons_1e4": {"photons": 1e4},
    "photons_1e3": {"photons": 1e3},
    "beamstop_1": {"beamstop": 1.0},
    "beamstop_2": {"beamstop": 2.0},
    "beamstop_3": {"beamstop": 3.0},
    "gaps": {"detector": Detector(gaps=1.0)},
    "textured": {"families": "textured"},
    "holes": {"families": "holes"},
    "mixture": {"families": "realistic", "detector": "realistic"},
}
#: A result below this IoU is wrong (the "trusted but wrong" count).
WRONG_IOU = 0.7
#: Arguments of ``run`` for a smoke run (``cdinn bench --quick``).
QUICK = {"count": 8, "conditions": ("noise_free", "photons_1e3", "beamstop_2"), "numpy_count": 1, "iterations": 40}


def _numpy_loop():
    """``numpy_reconstruct`` from the retrieval benchmark beside this file (as ``bench_nn`` loads it)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_nn import _numpy_loop as load

    return load()


def score(obj, data, chi2, seconds, trusted=None):
    """Quality of complex results ``obj`` (cropped to the truth's frame) against ``data``'s truth.

    ``trusted`` (the network's flags) adds the trusted and the trusted-but-wrong fractions.
    """
    truth_shape = data["amplitude"].shape[-2:]
    cmp = physics.compare(physics.crop(obj, truth_shape), data["amplitude"], data["phase"])
    iou, rms = np.asarray(cmp["iou"]), np.asarray(cmp["phase_rms"], dtype=np.float64)
    out = {
        "iou_median": float(np.median(iou)),
        "phase_rms_median": float(np.nanmedian(rms)),
        "phase_rms_p90": float(np.nanpercentile(rms, 90)),
        "chi2_median": float(np.median(chi2)),
        "ms_per_pattern": 1e3 * seconds / len(iou),
    }
    if trusted is not None:
        trusted = np.asarray(trusted, dtype=bool)
        out.update(trusted=float(np.mean(trusted)), trusted_but_wrong=float(np.mean(trusted & (iou < WRONG_IOU))))
    return out


def run_condition(data, model=None, device="cpu", iterations=620):
    """The three methods on one held-out set (``simulate`` output)."""
    from napari_cdinn.nn import predict
    from napari_cdinn.pipelines import refine_with_fallback
    from napari_cdinn.retrieval import reconstruct

    inten, mask = data["intensity"], data.get("mask")
    out = {}
    t0 = time.perf_counter()
    res = predict(inten, model=model, device=device, mask=mask)
    out["network"] = score(res["amplitude"] * np.exp(1j * res["phase"]), data, res["chi2"],
                           time.perf_counter() - t0, res["trusted"])
    t0 = time.perf_counter()
    ref = refine_with_fallback(inten, model=model, mask=mask, device=device, iterations=iterations, n_starts=1)
    out["refined"] = score(ref["amplitude"] * np.exp(1j * ref["phase"]), data, ref["chi2"], time.perf_counter() - t0)
    out["refined"]["network_start_kept"] = float(np.mean(ref["start"] == 1))
    t0 = time.perf_counter()
    pro = reconstruct(inten, mask=mask, device=device, iterations=iterations, n_starts=1)
    out["protocol"] = score(pro["object"], data, pro["chi2"], time.perf_counter() - t0)
    for key in ("iou_median", "phase_rms_median"):
        better = np.greater_equal if key == "iou_median" else np.less_equal
        out["refined"][f"{key}_at_least_protocol"] = bool(better(out["refined"][key], out["protocol"][key]))
    return out


def run(model=None, count=200, conditions=None, device="cpu", numpy_count=4, iterations=620):
    """Every condition of :data:`CONDITIONS` (or those named), and the NumPy loop's time per pattern."""
    names = list(CONDITIONS) if conditions is None else list(conditions)
    results = {"machine": machine_info(), "model": model, "count": int(count), "seed": BENCH_SEED,
               "iterations": int(iterations), "conditions": {}}
    # warm-up, not timed: the model's load and each engine's first call would land on the first set
    run_condition(simulate(4, seed=BENCH_SEED - 1, oversampling=2), model=model, device=device, iterations=8)
    for name in names:
        kw = CONDITIONS[name]
        data = simulate(count, seed=BENCH_SEED + list(CONDITIONS).index(name), oversampling=2, **kw)
        t0 = time.perf_counter()
        results["conditions"][name] = run_condition(data, model=model, device=device, iterations=iterations)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if numpy_count:
        data = simulate(numpy_count, seed=BENCH_SEED, oversampling=2)
        numpy_reconstruct = _numpy_loop()
        t0 = time.perf_counter()
        for frame in data["intensity"]:
            numpy_reconstruct(frame, iterations=iterations)
        results["numpy_ms_per_pattern"] = 1e3 * (time.perf_counter() - t0) / numpy_count
        clean = results["conditions"].get("noise_free")
        if clean is not None:
            results["refined_speedup_vs_numpy_noise_free"] = (results["numpy_ms_per_pattern"]
                                                              / clean["refined"]["ms_per_pattern"])
    return results


def summary(res):
    """One line per condition and method: IoU, phase RMS median/p90, trusted, trusted-but-wrong, ms."""
    rows = {}
    for name, cond in res["conditions"].items():
        for method, q in cond.items():
            trust = f"trusted {q['trusted']:.2f} wrong {q['trusted_but_wrong']:.3f} " if "trusted" in q else ""
            rows[f"{name}/{method}"] = (f"iou {q['iou_median']:.3f} phase {q['phase_rms_median']:.3f}/"
                                        f"{q['phase_rms_p90']:.3f} {trust}{q['ms_per_pattern']:.2f} ms")
    for key in ("numpy_ms_per_pattern", "refined_speedup_vs_numpy_noise_free"):
        if key in res:
            rows[key] = round(res[key], 2)
    return rows


def add_common_options(parser):
    """``--threads``, ``--device`` and ``--json``: the options every benchmark script shares."""
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")


def set_threads(args):
    """Apply ``--threads`` (torch imported only when it is given)."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def report(args, res, summary):
    """Print ``summary(res)`` as JSON and write ``res`` to ``--json`` when given."""
    print(json.dumps(summary(res), indent=1))
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}", file=sys.stderr)


def command_line(description, conditions, run, summary, argv=None, numpy_help="patterns timed with the NumPy loop"):
    """The command line of this benchmark and of those that run its methods on other sets (``bench_large``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=None, help="model name, file or directory (default: the shipped one)")
    parser.add_argument("--count", type=int, default=200, help="patterns per set (default 200)")
    parser.add_argument("--only", action="append", default=None, choices=list(conditions), help="run only this set")
    parser.add_argument("--numpy-count", type=int, default=4, help=numpy_help)
    add_common_options(parser)
    args = parser.parse_args(argv)
    set_threads(args)
    res = run(model=args.model, count=args.count, conditions=args.only, device=args.device,
              numpy_count=args.numpy_count)
    report(args, res, summary)


def main(argv=None):
    command_line(__doc__.splitlines()[0], CONDITIONS, run, summary, argv)


if __name__ == "__main__":
    main()
