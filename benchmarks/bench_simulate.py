"""Simulator throughput: the paper's 200,000 examples (180,000 train + 20,000 validation).

Usage::

    python benchmarks/bench_simulate.py [--count 200000] [--oversampling 1] [--json OUT.json]

Prints examples per second and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import time

from napari_cdinn.device import machine_info
from napari_cdinn.io import write_json
from napari_cdinn.simulate import simulate

#: Arguments of ``run`` for a quick smoke run (``cdinn bench --quick``).
QUICK = {"count": 20_000}


def run(count: int = 200_000, oversampling: int = 1, size: int = 32, seed: int = 0) -> dict:
    """Time ``simulate`` for ``count`` examples; return the figures as a dict."""
    simulate(64, size=size, seed=seed, oversampling=oversampling)  # warm-up
    t0 = time.perf_counter()
    data = simulate(count, size=size, seed=seed, oversampling=oversampling)
    dt = time.perf_counter() - t0
    return {
        "benchmark": "simulate",
        "count": count,
        "size": size,
        "oversampling": oversampling,
        "pattern_shape": list(data["intensity"].shape[1:]),
        "seconds": dt,
        "examples_per_s": count / dt,
        "machine": machine_info("cpu"),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=200_000)
    p.add_argument("--oversampling", type=int, default=1)
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    res = run(args.count, args.oversampling)
    print(
        f"simulate: {res['count']} examples ({res['pattern_shape'][0]} x {res['pattern_shape'][1]} patterns) "
        f"in {res['seconds']:.1f} s = {res['examples_per_s']:.0f} examples/s"
    )
    if args.json:
        write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
