"""Larger objects: 64-pixel objects in 128 x 128 patterns, 128-pixel objects in 256 x 256 patterns, and
48-pixel objects 4x oversampled in 192 x 192 patterns (the size ``cdinn prepare`` cuts from many detectors).

Usage::

    python benchmarks/bench_large.py [--model NAME|PATH] [--count 200] [--threads 2] [--json OUT.json]

Every set holds ``count`` 2x-oversampled patterns (unless the set says otherwise) from the project's
simulator with a seed of its own (:data:`CONDITIONS`): the paper's recipe noise-free and at 1e4
photons, and the training mixture (``realistic`` objects and detector), with 64-pixel objects
(128 x 128 patterns), the paper's recipe with 128-pixel objects (256 x 256 patterns), and 48-pixel
objects 4x oversampled (192 x 192: the network reads them at 1.5x the pixel size, the central 128
pixels decimated twice), noise-free and the mixture.  The shipped network reads 32 pixels:
the size policy (:func:`napari_cdinn.nn.choose_scale`) weighs the shipped models that read the
patterns (``model2x`` at 2x or 4x the pixel size, the answer interpolated back; ``model128``, which
draws 64-pixel objects) and keeps the best fit; ``chosen_model`` and ``scale`` record its choice.

Methods (:func:`bench_realistic.run_condition`, timed per pattern on the same patterns): the
network alone (``predict``), the NN-seeded refinement with its fallback (``reconstruct --init nn``)
and the 620-iteration protocol from a random start (``reconstruct``), plus the whole ``cdinn
predict`` command (cold start included) and the plain NumPy 620-iteration loop
(``benchmarks/bench_retrieval.py``) on ``numpy_count`` patterns of each size, the reference of the
speed-ups.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_nn import cli_predict_time  # noqa: E402
from bench_realistic import _numpy_loop, command_line, run_condition  # noqa: E402

from napari_cdinn.device import machine_info  # noqa: E402
from napari_cdinn.simulate import simulate  # noqa: E402

#: Seed of the first set; set ``i`` uses ``BENCH_SEED + i`` (disjoint from bench_realistic's).
BENCH_SEED = 20_261_205
#: Held-out sets: ``simulate`` keywords per condition (``size``: the object frame's side).
CONDITIONS = {
    "size64_noise_free": {"size": 64},
    "size64_photons_1e4": {"size": 64, "photons": 1e4},
    "size64_mixture": {"size": 64, "families": "realistic", "detector": "realistic"},
    "size128_noise_free": {"size": 128},
    "size48_os4_noise_free": {"size": 48, "oversampling": 4},
    "size48_os4_mixture": {"size": 48, "oversampling": 4, "families": "realistic", "detector": "realistic"},
}


def run(model=None, count=200, conditions=None, device="cpu", numpy_count=4, iterations=620):
    """Every condition of :data:`CONDITIONS` (or those named), with the speed-ups over the NumPy loop."""
    from napari_cdinn import nn

    names = list(CONDITIONS) if conditions is None else list(conditions)
    results = {"machine": machine_info(), "model": model, "count": int(count), "seed": BENCH_SEED,
               "iterations": int(iterations), "conditions": {}}
    numpy_ms = {}
    for name in names:
        kw = {"oversampling": 2, **CONDITIONS[name]}
        data = simulate(count, seed=BENCH_SEED + list(CONDITIONS).index(name), **kw)
        t0 = time.perf_counter()
        out = run_condition(data, model=model, device=device, iterations=iterations)
        chosen = nn.choose_scale(data["intensity"], model, mask=data.get("mask"), device=device)
        out["scale"], out["chosen_model"] = chosen.scale, chosen.name
        out["network"]["cli_predict_ms_per_pattern"] = 1e3 * cli_predict_time(data["intensity"], model, None) / count
        side = data["intensity"].shape[-1]
        if numpy_count and side not in numpy_ms:
            numpy_ms[side] = _numpy_ms(data["intensity"][:numpy_count], iterations)
        if numpy_count:
            out["numpy_ms_per_pattern"] = numpy_ms[side]
            for method in ("network", "refined", "protocol"):
                out[method]["speedup_vs_numpy"] = numpy_ms[side] / out[method]["ms_per_pattern"]
            out["network"]["cli_speedup_vs_numpy"] = numpy_ms[side] / out["network"]["cli_predict_ms_per_pattern"]
        for key in ("phase_rms_median", "phase_rms_p90"):
            out["refined"][f"{key}_below_protocol"] = bool(out["refined"][key] < out["protocol"][key])
        results["conditions"][name] = out
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return results


def _numpy_ms(intensity, iterations):
    """Milliseconds per pattern of the plain NumPy 620-iteration loop."""
    numpy_reconstruct = _numpy_loop()
    t0 = time.perf_counter()
    for frame in intensity:
        numpy_reconstruct(frame, iterations=iterations)
    return 1e3 * (time.perf_counter() - t0) / len(intensity)


def summary(res):
    """One line per condition and method: IoU, phase RMS median/p90, chi2, ms and speed-up."""
    rows = {}
    for name, cond in res["conditions"].items():
        rows[f"{name}/scale"] = cond["scale"]
        for method in ("network", "refined", "protocol"):
            q = cond[method]
            speed = f" x{q['speedup_vs_numpy']:.0f}" if "speedup_vs_numpy" in q else ""
            rows[f"{name}/{method}"] = (f"iou {q['iou_median']:.3f} phase {q['phase_rms_median']:.3f}/"
                                        f"{q['phase_rms_p90']:.3f} chi2 {q['chi2_median']:.2g} "
                                        f"{q['ms_per_pattern']:.2f} ms{speed}")
        if "cli_speedup_vs_numpy" in cond["network"]:
            rows[f"{name}/cdinn predict"] = (f"{cond['network']['cli_predict_ms_per_pattern']:.2f} ms "
                                              f"x{cond['network']['cli_speedup_vs_numpy']:.0f}")
    return rows


def main(argv=None):
    command_line(__doc__.splitlines()[0], CONDITIONS, run, summary, argv, "patterns timed with the NumPy loop, per size")


if __name__ == "__main__":
    main()
