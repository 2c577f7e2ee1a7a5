"""Choose ``TRUST_CHI2``: trusted and trusted-but-wrong fractions of the network per threshold.

Usage::

    python benchmarks/select_trust.py [--model model2x] [--count 200] [--threads 2] [--json OUT.json]

Selection sets: the conditions of ``bench_realistic.CONDITIONS`` drawn with seeds
``BENCH_SEED + SELECTION_OFFSET + i``, never the benchmark's own sets.  For each threshold of
:data:`GRID`, the fraction of frames trusted (``chi2 - chi2_noise <= t``) and the fraction trusted
but wrong (IoU < 0.7); the chosen threshold is the largest at which no set has more than
:data:`MAX_WRONG` of its frames trusted but wrong.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

#: Thresholds tried, largest first.
GRID = (0.05, 0.04, 0.03, 0.025, 0.02, 0.015, 0.01, 0.005)
#: Most frames of any set that may be trusted but wrong.
MAX_WRONG = 0.02
#: Seed offset of the selection sets from the benchmark's.
SELECTION_OFFSET = 1000


def run(model="model2x", count=200):
    """Trusted / trusted-but-wrong fractions per condition and threshold, and the chosen threshold."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_realistic import BENCH_SEED, CONDITIONS, WRONG_IOU

    from napari_cdinn import physics
    from napari_cdinn.nn import predict
    from napari_cdinn.simulate import simulate

    rows = {}
    for i, (name, kw) in enumerate(CONDITIONS.items()):
        d = simulate(count, seed=BENCH_SEED + SELECTION_OFFSET + i, oversampling=2, **kw)
        r = predict(d["intensity"], model=model, mask=d.get("mask"))
        iou = physics.compare(r["amplitude"] * np.exp(1j * r["phase"]), d["amplitude"], d["phase"])["iou"]
        excess = r["chi2"] - r["chi2_noise"]
        rows[name] = {str(t): {"trusted": float(np.mean(excess <= t)),
                               "trusted_but_wrong": float(np.mean((excess <= t) & (iou < WRONG_IOU)))} for t in GRID}
    ok = [t for t in GRID if all(r[str(t)]["trusted_but_wrong"] <= MAX_WRONG for r in rows.values())]
    return {"model": model, "count": count, "grid": GRID, "max_wrong": MAX_WRONG, "conditions": rows,
            "chosen": max(ok) if ok else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="model2x")
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    res = run(args.model, args.count)
    for name, r in res["conditions"].items():
        print(name, " ".join(f"{t}:{v['trusted']:.2f}/{v['trusted_but_wrong']:.3f}" for t, v in r.items()))
    print("chosen:", res["chosen"])
    if args.json:
        from napari_cdinn.io import write_json

        write_json(args.json, res)


if __name__ == "__main__":
    main()
