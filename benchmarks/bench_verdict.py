"""Can a frame's verdict be believed?  How often each path's per-frame verdict passes wrong results.

Usage::

    python benchmarks/bench_verdict.py [--count 100] [--threads 2] [--json OUT.json]

On ``bench_realistic``'s held-out sets (:data:`bench_realistic.CONDITIONS`, same seeds), three
paths as a user runs them, each with the verdict it prints (:func:`napari_cdinn.pipelines.fits`):

* ``network``: ``cdinn predict`` (:func:`napari_cdinn.nn.predict`), *trusted*: ``chi2 - chi2_noise``
  at most ``TRUST_CHI2``;
* ``refined``: ``cdinn reconstruct --init nn`` (:func:`napari_cdinn.pipelines.refine_with_fallback`
  with its defaults), and
* ``reconstruct``: the default ``cdinn reconstruct`` (:func:`napari_cdinn.retrieval.reconstruct`
  with its defaults: runs of 400 iterations, restarts by the rule),

both judged by *fits*: ``chi2 - chi2_noise`` within the restart rule's limit.  Per path: the
fraction that passes, the fraction that passes but is wrong (IoU < 0.7 against the truth, up to
twin and shift), split into *faint* frames (``chi2_noise`` above
:data:`napari_cdinn.pipelines.LOW_DOSE_CHI2`, where a fit within the noise does not single out the
object) and the others, the fraction of passing frames that are right, and the fraction flagged
though right (IoU >= 0.7).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from napari_cdinn import physics
from napari_cdinn.device import machine_info
from napari_cdinn.simulate import simulate

sys.path.insert(0, str(Path(__file__).parent))
from bench_realistic import BENCH_SEED, CONDITIONS, WRONG_IOU, add_common_options, report, set_threads  # noqa: E402

#: Arguments of ``run`` for a smoke run.
QUICK = {"count": 6, "conditions": ("noise_free", "photons_1e3")}


def verdict_scores(obj, data, passed, chi2_noise):
    """How a verdict ``passed`` (N,) bool matches the truth of complex results ``obj`` (cropped to the truth),
    for all frames and split by the frames' counting noise ``chi2_noise`` (faint: above ``LOW_DOSE_CHI2``)."""
    from napari_cdinn.pipelines import faint

    cmp = physics.compare(physics.crop(obj, data["amplitude"].shape[-2:]), data["amplitude"], data["phase"])
    right = np.asarray(cmp["iou"]) >= WRONG_IOU
    passed = np.asarray(passed, dtype=bool)
    dim = faint(chi2_noise)
    return {"passed": float(passed.mean()), "passed_but_wrong": float((passed & ~right).mean()),
            "right_when_passed": float(right[passed].mean()) if passed.any() else float("nan"),
            "flagged_but_right": float((~passed & right).mean()), "right": float(right.mean()),
            "faint": float(dim.mean()), "passed_but_wrong_faint": float((passed & ~right & dim).mean()),
            "passed_but_wrong_bright": float((passed & ~right & ~dim).mean())}


def run_condition(data, device="cpu"):
    """The three paths and their verdicts on one set."""
    from napari_cdinn.nn import predict
    from napari_cdinn.pipelines import fits, refine_with_fallback
    from napari_cdinn.retrieval import reconstruct

    inten, mask = data["intensity"], data.get("mask")
    net = predict(inten, mask=mask, device=device)
    ref = refine_with_fallback(inten, mask=mask, device=device)
    pro = reconstruct(inten, mask=mask, device=device)
    out = {}
    for name, res, rule in (("network", net, "predict"), ("refined", ref, "reconstruct"), ("reconstruct", pro, "reconstruct")):
        out[name] = verdict_scores(res["amplitude"] * np.exp(1j * res["phase"]), data,
                                   fits(res["chi2"], res["chi2_noise"], rule), res["chi2_noise"])
    return out


def run(count=100, conditions=None, device="cpu"):
    """Every held-out condition (or those named)."""
    names = list(CONDITIONS) if conditions is None else list(conditions)
    out = {"benchmark": "verdict", "machine": machine_info(), "count": int(count), "seed": BENCH_SEED,
           "wrong_iou": WRONG_IOU, "conditions": {}}
    for name in names:
        t0 = time.perf_counter()
        data = simulate(count, seed=BENCH_SEED + list(CONDITIONS).index(name), oversampling=2, **CONDITIONS[name])
        out["conditions"][name] = run_condition(data, device)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def summary(res):
    """Per set and path: passed, passed but wrong, right when passed."""
    return {f"{name}/{path}": (f"passed {q['passed']:.2f} wrong {q['passed_but_wrong']:.3f} (faint "
                               f"{q['passed_but_wrong_faint']:.3f}) right when passed {q['right_when_passed']:.3f} "
                               f"flagged but right {q['flagged_but_right']:.2f}")
            for name, cond in res["conditions"].items() for path, q in cond.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="patterns per set (default 100)")
    parser.add_argument("--only", action="append", default=None, choices=list(CONDITIONS), help="run only this set")
    parser.add_argument("--quick", action="store_true", help="small sets (a smoke run)")
    add_common_options(parser)
    args = parser.parse_args(argv)
    set_threads(args)
    res = run(**QUICK, device=args.device) if args.quick else run(args.count, args.only, args.device)
    report(args, res, summary)
    return res


if __name__ == "__main__":
    main()
