"""Streaming a large stack through `cdinn predict`: throughput and peak memory.

Usage::

    python benchmarks/bench_stream.py [--count 100000] [--json OUT.json] [--workdir DIR]

Writes a ``count``-frame 32 x 32 HDF5 stack (100,000 frames is about 410 MB of float32), then
measures, each in a fresh process so that peak resident memory (``ru_maxrss``) is its own:

* **streamed**: ``cdinn predict stack.h5 -o out.h5`` (read chunk by chunk, written as it goes);
* **in memory**: the whole stack loaded with NumPy and passed to ``napari_cdinn.nn.predict`` at
  once, results kept in memory (nothing written).

Targets (issue "Batch over stacks at scale"): streamed peak RSS under 600 MB, streamed
throughput at least 90 % of the in-memory one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from napari_cdinn.device import machine_info
from napari_cdinn.io import write_json
from napari_cdinn.simulate import simulate

#: Arguments of ``run`` for a quick smoke run (``cdinn bench --quick``).
QUICK = {"count": 8192}

_IN_MEMORY = """
import sys, time, numpy as np, torch
from napari_cdinn.nn import predict
torch.set_num_threads(int(sys.argv[3]))
data = np.load(sys.argv[1])
predict(data[:256])  # load the model, warm up
t0 = time.perf_counter()
predict(data, batch_size=int(sys.argv[2]))
print(time.perf_counter() - t0)
"""


def _write_stack(path, count, seed=0, block=16384, oversampling=1):
    """A ``count``-frame HDF5 stack of the paper's 32 x 32 patterns (``oversampling`` times oversampled), written
    block by block."""
    import h5py

    base = simulate(min(count, block), seed=seed, oversampling=oversampling)["intensity"]
    side = base.shape[-1]
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("data", shape=(count, side, side), dtype=np.float32, chunks=(1024, side, side))
        for a in range(0, count, block):
            n = min(block, count - a)
            ds[a : a + n] = base[:n] * np.float32(1 + a / count)  # varied scale, same patterns
    return path


def _child_rss_mb(argv):
    """Wall time, peak RSS (MB) and stdout of a child, measured with os.wait4."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(argv[:4])} failed")
    return wall, usage.ru_maxrss / 1024, out


def run(count: int = 100_000, batch_size: int = 256, chunk_size: int = 4096, workdir=None, threads=None) -> dict:
    """Measure streamed vs in-memory prediction over a ``count``-frame stack.

    Both use ``threads`` torch threads (default: the usable cores), so that the ratio is the cost of
    streaming, not of the thread policy's reading of a machine that has just written the stack.
    """
    from napari_cdinn.device import usable_cores

    threads = int(threads or usable_cores())
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        h5 = _write_stack(os.path.join(tmp, "stack.h5"), count)
        npy = os.path.join(tmp, "stack.npy")
        import h5py

        with h5py.File(h5) as f:
            np.save(npy, f["data"][...])
        out = os.path.join(tmp, "out.h5")
        # the streamed command, model loading included
        cmd = [sys.executable, "-m", "napari_cdinn.cli", "predict", h5, "-o", out,
               "--batch-size", str(batch_size), "--chunk-size", str(chunk_size), "--threads", str(threads)]
        s_wall, s_rss, _ = _child_rss_mb(cmd)
        # start-up of the same command on a tiny stack, to separate the fixed cost
        tiny = os.path.join(tmp, "tiny.npy")
        np.save(tiny, np.load(npy, mmap_mode="r")[:256])
        t_wall, _, _ = _child_rss_mb(cmd[:4] + [tiny, "-o", os.path.join(tmp, "tiny.npz")] + cmd[7:])
        _, m_rss, m_out = _child_rss_mb([sys.executable, "-c", _IN_MEMORY, npy, str(batch_size), str(threads)])
        m_compute = float(m_out.strip().splitlines()[-1])
        stack_mb = os.path.getsize(npy) / 2**20
        out_mb = os.path.getsize(out) / 2**20
    s_compute = max(s_wall - t_wall, 1e-9)
    return {
        "benchmark": "stream",
        "frames": count,
        "stack_mb": stack_mb,
        "output_mb": out_mb,
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "torch_threads": threads,
        "streamed_wall_s": s_wall,
        "streamed_startup_s": t_wall,
        "streamed_frames_per_s": count / s_compute,
        "streamed_peak_rss_mb": s_rss,
        "in_memory_frames_per_s": count / m_compute,
        "in_memory_peak_rss_mb": m_rss,
        "throughput_ratio": (count / s_compute) / (count / m_compute),
        "targets": {"streamed_peak_rss_mb_max": 600, "throughput_ratio_min": 0.9},
        "machine": machine_info("cpu"),
    }


def summary(res):
    """The headline figures of a run."""
    keys = ("frames", "stack_mb", "streamed_frames_per_s", "streamed_peak_rss_mb", "in_memory_frames_per_s",
            "in_memory_peak_rss_mb", "throughput_ratio")
    return {k: res[k] for k in keys}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--workdir", default=None, help="folder for the temporary stack (default: the system's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of both runs (default: the usable cores)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    res = run(args.count, args.batch_size, args.chunk_size, args.workdir, args.threads)
    print(f"stack: {res['frames']} frames, {res['stack_mb']:.0f} MB; output {res['output_mb']:.0f} MB")
    print(f"streamed  (cdinn predict h5 -> h5): {res['streamed_frames_per_s']:.0f} frames/s, "
          f"peak RSS {res['streamed_peak_rss_mb']:.0f} MB (start-up {res['streamed_startup_s']:.1f} s excluded)")
    print(f"in memory (nn.predict on the array): {res['in_memory_frames_per_s']:.0f} frames/s, "
          f"peak RSS {res['in_memory_peak_rss_mb']:.0f} MB")
    print(f"throughput ratio streamed / in memory: {res['throughput_ratio']:.2f}")
    if args.json:
        write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
