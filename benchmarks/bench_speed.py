"""Speed where users run it: cold commands, the dock's warm path and the thread policy, idle and beside a busy core.

Usage::

    python benchmarks/bench_speed.py [--repeats 3] [--quick] [--json OUT.json]

Every figure is measured twice (``conditions``): on the machine as it is (``idle``: run it on an
idle machine) and beside a process that keeps one core busy (``busy``: this script started with
``--busy`` spins in a subprocess, as a training run or a second job would).  For each condition:

* ``cold_predict``: the whole ``cdinn predict IN.npz -o OUT.h5`` command (a fresh Python process:
  imports, the thread policy, the model's load, the file written) on 1, 256 and 4,096
  2x-oversampled 64 x 64 patterns, wall seconds, median of ``repeats``;
* ``cold_reconstruct``: the same for ``cdinn reconstruct --init nn`` on 1 and 256 patterns;
* ``warm_first_frame``: the inversion dock's worker body on a one-frame layer once the model is
  loaded (the scale chosen, then :func:`napari_cdinn.nn.predict`, under the docks' thread rule
  ``threads_applied(leave=1)``), seconds to the frame's result, median of ``repeats`` after a first
  call (``first_call_s``, which loads the model);
* ``network``: the network alone (channels-last, bf16 autocast where supported, as ``predict``
  runs it) on batches of ``rate_batch``, ms per pattern, with the thread policy's count and with
  2 threads forced (the count the policy would refuse beside a busy core on 2 cores).

Recorded beside them: the machine, the cores this process may use, the policy's thread count
(:func:`napari_cdinn.device.free_cores`, measured just before the figures of each condition; the
commands measure their own) and the 1-minute load average.  Targets (issue 24): one pattern in
1.0 s cold on the 2-core CPU; the dock's first frame within 100 ms of the model being loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_nn import _rate  # noqa: E402
from bench_realistic import report  # noqa: E402

from napari_cdinn.device import (  # noqa: E402
    apply_threads,
    free_cores,
    machine_info,
    refresh_window,
    threads_applied,
    usable_cores,
)
from napari_cdinn.simulate import simulate  # noqa: E402

#: Arguments of ``run`` for a smoke run (``cdinn bench --quick``).
QUICK = {"predict_counts": (1, 16), "reconstruct_counts": (1,), "repeats": 1, "rate_batch": 64, "min_seconds": 0.2}

#: Seed of the benchmark's patterns (its own stream).
BENCH_SEED = 20_261_205
#: Seconds the spinning process runs before the figures beside it (the policy measures a recent window).
SPIN_UP_S = 1.0


def spin(seconds):
    """Keep one core busy for ``seconds`` (``--busy``: the process beside the figures)."""
    end = time.monotonic() + float(seconds)
    while time.monotonic() < end:
        pass


@contextlib.contextmanager
def busy_core(active=True):
    """A subprocess spinning on one core inside the block (nothing when not ``active``)."""
    if not active:
        yield None
        return
    proc = subprocess.Popen([sys.executable, __file__, "--busy", "3600"])
    try:
        time.sleep(SPIN_UP_S)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def fresh_policy(leave=0, seconds=0.5):
    """The policy's thread count over a window of the last ``seconds`` (not one that spans this script's
    own subprocesses, whose CPU time counts as other processes')."""
    refresh_window(0.0)
    time.sleep(seconds)
    return free_cores(leave)


def cold_command(argv, repeats, out):
    """Wall seconds of ``python -m napari_cdinn.cli ARGV -o OUT`` in a fresh process: median, min, all."""
    times = []
    for _ in range(int(repeats)):
        with contextlib.suppress(FileNotFoundError):
            os.remove(out)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "napari_cdinn.cli", *argv, "-o", out], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs_s": times}


def warm_first_frame(frame, repeats, device="cpu"):
    """The inversion dock's worker body on one frame: the first call (the model loaded) and the warm ones."""
    from napari_cdinn import nn

    def body():
        with threads_applied(leave=1):  # as the docks' JobRunner runs every job
            model = nn.choose_scale(frame, nn.resolve_model(None, frame.shape), device=device)
            return nn.predict(frame, model=model, device=device, batch_size=256)

    refresh_window(0.0)
    time.sleep(0.2)
    t0 = time.perf_counter()
    body()
    first = time.perf_counter() - t0
    times = []
    for _ in range(int(repeats)):
        refresh_window(0.0)  # the docks' timer keeps a recent window
        time.sleep(0.2)  # a user's next click, not a tight loop
        t0 = time.perf_counter()
        body()
        times.append(time.perf_counter() - t0)
    return {"first_call_s": first, "median_s": statistics.median(times), "min_s": min(times), "runs_s": times}


def network_ms(intensity, threads, min_seconds, device="cpu"):
    """ms per pattern of the network alone on ``intensity`` (one batch) with ``threads`` torch threads."""
    import torch

    from napari_cdinn.nn import resolve_model
    from napari_cdinn.nn.data import network_input
    from napari_cdinn.nn.inference import _cached_model, prepare
    from napari_cdinn.nn.runtime import autocast, bf16_supported

    apply_threads(threads)
    dev = torch.device(device)
    info = resolve_model(None, intensity.shape)
    net, _ = _cached_model(info.path, dev)
    inputs, _, _, _, input_mask = prepare(intensity, net.input_transform, net.input_factor, None, info.scale)
    x = network_input(inputs, input_mask, getattr(net, "mask_channel", False))
    x = x.to(dev).contiguous(memory_format=torch.channels_last)
    bf16 = bf16_supported(dev)

    def call():
        with torch.inference_mode(), autocast(dev, bf16):
            net(x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # the time of the work, not of its queueing

    return 1e3 / _rate(call, len(intensity), min_seconds)  # warm-up, then the best of repeats


def condition(files, frames, predict_counts, reconstruct_counts, repeats, rate_batch, min_seconds, tmp):
    """Every figure of one condition (the machine as it is now)."""
    out = {"policy_threads": fresh_policy(), "policy_threads_dock": fresh_policy(leave=1),
           "load_1min": os.getloadavg()[0]}
    h5 = os.path.join(tmp, "out.h5")
    out["cold_predict"] = {str(n): cold_command(["predict", files[n]], repeats, h5) for n in predict_counts}
    out["cold_reconstruct"] = {str(n): cold_command(["reconstruct", files[n], "--init", "nn"], repeats, h5)
                               for n in reconstruct_counts}
    out["warm_first_frame"] = warm_first_frame(frames[:1], max(int(repeats), 3))
    batch = frames[:rate_batch]
    policy = apply_threads(fresh_policy())  # measured now, as a command would
    out["network"] = {"batch": len(batch), "policy_threads": policy,
                      "policy_ms_per_pattern": network_ms(batch, policy, min_seconds)}
    if usable_cores() >= 2:
        out["network"]["threads2_ms_per_pattern"] = network_ms(batch, 2, min_seconds)
    return out


def run(predict_counts=(1, 256, 4096), reconstruct_counts=(1, 256), repeats=3, rate_batch=256, min_seconds=1.0,
        conditions=("idle", "busy")) -> dict:
    """The figures of the module notes for each of ``conditions`` (``idle``, ``busy``)."""
    import torch

    n = max(*predict_counts, *reconstruct_counts, rate_batch)
    frames = simulate(n, seed=BENCH_SEED, oversampling=2)["intensity"]
    before = torch.get_num_threads()
    res = {"benchmark": "speed", "machine": machine_info("cpu"), "usable_cores": usable_cores(), "repeats": int(repeats),
           "patterns": "2x-oversampled 64 x 64 (the simulator's paper recipe)", "conditions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for k in {*predict_counts, *reconstruct_counts}:
            files[k] = os.path.join(tmp, f"in{k}.npz")
            np.savez(files[k], intensity=frames[:k])
        try:
            for name in conditions:
                if name not in ("idle", "busy"):
                    raise ValueError(f"unknown condition {name!r}; choose idle or busy")
                with busy_core(name == "busy"):
                    t0 = time.perf_counter()
                    res["conditions"][name] = condition(files, frames, predict_counts, reconstruct_counts, repeats,
                                                        rate_batch, min_seconds, tmp)
                print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        finally:
            torch.set_num_threads(before)
    res["targets"] = {"cold_predict_1_s": 1.0, "warm_first_frame_s": 0.1}
    return res


def summary(res):
    """Per condition: the policy's threads, cold commands (median s), the dock's warm frame (ms), the network."""
    rows = {}
    for name, c in res["conditions"].items():
        net = c["network"]
        rows[name] = {
            "policy_threads": c["policy_threads"],
            "load_1min": round(c["load_1min"], 2),
            "cold_predict_s": {k: round(v["median_s"], 2) for k, v in c["cold_predict"].items()},
            "cold_reconstruct_nn_s": {k: round(v["median_s"], 2) for k, v in c["cold_reconstruct"].items()},
            "warm_first_frame_ms": round(1e3 * c["warm_first_frame"]["median_s"], 1),
            "network_ms_per_pattern": {f"policy ({net['policy_threads']} threads)": round(net["policy_ms_per_pattern"], 3),
                                       **({"2 threads": round(net["threads2_ms_per_pattern"], 3)}
                                          if "threads2_ms_per_pattern" in net else {})},
        }
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each cold command (median; default 3)")
    parser.add_argument("--only", action="append", default=None, choices=("idle", "busy"), help="one condition")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--busy", type=float, default=None, metavar="S", help=argparse.SUPPRESS)  # the spinner
    args = parser.parse_args(argv)
    if args.busy is not None:
        spin(args.busy)
        return
    kw = dict(QUICK) if args.quick else {"repeats": args.repeats}
    if args.only:
        kw["conditions"] = tuple(args.only)
    report(args, run(**kw), summary)


if __name__ == "__main__":
    main()
