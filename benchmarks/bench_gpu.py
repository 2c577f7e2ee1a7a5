"""GPU end to end: the network alone, ``predict`` on an in-memory stack and the streamed ``cdinn predict`` h5 -> h5.

Usage::

    PYTHONPATH=src python3 benchmarks/bench_gpu.py --device cuda --json OUT.json   # about 5 minutes on an H100
    python benchmarks/bench_gpu.py --device cpu --quick                            # a smoke run

On 2x-oversampled 64 x 64 patterns (``model2x``, as ``cdinn predict`` reads them; ``simulate``
draws a few thousand, tiled to the counts), measured on ``--device``:

* ``network``: the network alone (channels-last, bf16 autocast where supported, as ``predict``
  runs it: ``bench_speed.network_ms``) on batches of ``batch`` (4,096), patterns/s;
* ``in_memory``: :func:`napari_cdinn.nn.predict` end to end on a ``count``-pattern NumPy stack
  (65,536) with its default batch (4,096 on a GPU, 256 on the CPU), warm, best of repeats
  (``bench_nn._rate``), patterns/s, and its ratio to the network's (target at least 0.5);
* ``streamed``: the whole ``cdinn predict stack.h5 -o out.h5 --device D`` on ``stream_count``
  frames (100,000) in a fresh process, its start-up (the same command on 256 frames) subtracted
  as ``bench_stream.py`` does, patterns/s, and its ratio to the in-memory rate (target at least 0.8).

Neither napari nor Qt is imported (``napari_imported`` records it).  Targets: issue 24, "GPU end to end".
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_nn import _rate  # noqa: E402
from bench_realistic import add_common_options, report, set_threads  # noqa: E402
from bench_speed import network_ms  # noqa: E402
from bench_stream import _child_rss_mb, _write_stack  # noqa: E402

from napari_cdinn.device import machine_info  # noqa: E402
from napari_cdinn.simulate import simulate  # noqa: E402

#: Arguments of ``run`` for a smoke run (``cdinn bench --quick``).
QUICK = {"count": 1024, "stream_count": 2048, "batch": 256, "min_seconds": 0.2}
#: Seed of the benchmark's patterns (its own stream).
BENCH_SEED = 20_261_206
#: Distinct patterns simulated; the stacks repeat them.
DISTINCT = 4096
#: The targets of issue 24: in memory / network alone, streamed / in memory.
TARGETS = {"in_memory_over_network_min": 0.5, "streamed_over_in_memory_min": 0.8}


def patterns(count, seed=BENCH_SEED):
    """``count`` 2x-oversampled 64 x 64 float32 patterns: ``DISTINCT`` simulated, tiled."""
    base = simulate(min(count, DISTINCT), seed=seed, oversampling=2)["intensity"].astype(np.float32)
    return np.ascontiguousarray(np.resize(base, (count, *base.shape[1:])))


def in_memory_rate(stack, device, min_seconds):
    """Patterns/s of :func:`napari_cdinn.nn.predict` on ``stack`` (default batch), warm, best of repeats."""
    from napari_cdinn.nn import predict

    return _rate(lambda: predict(stack, device=device), len(stack), min_seconds)


def streamed(count, device, threads=None, workdir=None):
    """Wall time of ``cdinn predict stack.h5 -o out.h5`` on ``count`` frames, its start-up and peak RSS."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        h5 = _write_stack(os.path.join(tmp, "stack.h5"), count, seed=BENCH_SEED, oversampling=2)
        tiny = os.path.join(tmp, "tiny.npy")
        np.save(tiny, patterns(256))
        extra = ["--device", str(device)] + ([] if threads is None else ["--threads", str(threads)])
        cmd = [sys.executable, "-m", "napari_cdinn.cli", "predict"]
        wall, rss, _ = _child_rss_mb(cmd + [h5, "-o", os.path.join(tmp, "out.h5"), *extra])
        startup, _, _ = _child_rss_mb(cmd + [tiny, "-o", os.path.join(tmp, "tiny.npz"), *extra])
        stack_mb = os.path.getsize(h5) / 2**20
    return {"wall_s": wall, "startup_s": startup, "peak_rss_mb": rss, "stack_mb": stack_mb,
            "frames_per_s": count / max(wall - startup, 1e-9)}


def run(device="auto", count=65_536, stream_count=100_000, batch=4096, min_seconds=2.0, threads=None, workdir=None):
    """Every figure of the benchmark on ``device`` (see the module notes)."""
    from napari_cdinn.device import resolve_device
    from napari_cdinn.nn.inference import _batch_size

    dev = resolve_device(device)
    stack = patterns(count)
    network = 1e3 / network_ms(stack[:batch], threads, min_seconds, dev)  # network_ms: ms per pattern
    memory = in_memory_rate(stack, dev, min_seconds)
    stream = streamed(stream_count, dev, threads, workdir)
    return {
        "benchmark": "gpu",
        "device": str(dev),
        "pattern_shape": list(stack.shape[1:]),
        "network_batch": batch,
        "network_patterns_per_s": network,
        "in_memory_patterns": count,
        "in_memory_batch": _batch_size(None, dev),
        "in_memory_patterns_per_s": memory,
        "in_memory_over_network": memory / network,
        "streamed_frames": stream_count,
        "streamed": stream,
        "streamed_over_in_memory": stream["frames_per_s"] / memory,
        "targets": TARGETS,
        "napari_imported": "napari" in sys.modules or "qtpy" in sys.modules,
        "machine": machine_info(dev),
    }


def summary(res):
    """The headline figures of a run."""
    keys = ("device", "network_patterns_per_s", "in_memory_patterns_per_s", "in_memory_over_network",
            "streamed_over_in_memory", "targets")
    return {**{k: res[k] for k in keys}, "streamed_frames_per_s": res["streamed"]["frames_per_s"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=65_536, help="patterns of the in-memory stack")
    parser.add_argument("--stream-count", type=int, default=100_000, help="frames of the streamed h5 stack")
    parser.add_argument("--batch", type=int, default=4096, help="batch of the network-alone figure")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="time each rate is repeated for")
    parser.add_argument("--workdir", default=None, help="folder for the temporary stack (default: the system's)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    add_common_options(parser)
    args = parser.parse_args(argv)
    set_threads(args)
    sizes = dict(QUICK) if args.quick else {"count": args.count, "stream_count": args.stream_count,
                                            "batch": args.batch, "min_seconds": args.min_seconds}
    res = run(args.device, threads=args.threads, workdir=args.workdir, **sizes)
    report(args, res, summary)
    return res


if __name__ == "__main__":
    main()
