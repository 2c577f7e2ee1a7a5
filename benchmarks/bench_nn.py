"""CDI NN: inference speed, quality on fresh patterns, and NN-seeded refinement.

Usage::

    python benchmarks/bench_nn.py [--model NAME|PATH] [--count 1000] [--threads 2] [--json OUT.json]

Measured (CPU unless ``--device``):

* network patterns/s for batch sizes 1..4096 in fp32 (NCHW and channels-last) and bf16 autocast
  (channels-last), and :func:`napari_cdinn.nn.predict` end to end (decimation, chi^2 included);
* the whole ``cdinn predict`` command (process start, file read, write) on ``predict_count``
  2x-oversampled patterns, against the plain NumPy 620-iteration protocol per pattern
  (``numpy_reconstruct`` of ``benchmarks/bench_retrieval.py``);
* quality on ``count`` fresh test patterns (seed ``TEST_SEED``) and on the same patterns with
  Poisson noise (1e5 photons): support IoU, phase RMS inside the object (median, p90), chi^2;
  also with the test-time ensemble of 2, 4 and 8 views (``predict(views=V)``), and the whole
  ``cdinn predict --views 8`` command;
* refinement: the network's guess embedded in the 2x frame then a short ER/HIO run
  (:func:`napari_cdinn.retrieval.reconstruct`), against the 620-iteration protocol from random
  starts on the same patterns (phase RMS median/p90, time per pattern).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_cdinn import physics
from napari_cdinn.device import machine_info
from napari_cdinn.io import write_json
from napari_cdinn.simulate import simulate

#: Arguments of ``run`` for a smoke run (``cdinn bench --quick``).
QUICK = {"count": 64, "predict_count": 256, "batch_sizes": (1, 64, 256), "refine_count": 16, "numpy_count": 1,
         "min_seconds": 0.2}

_BATCHES = (1, 4, 16, 64, 256, 1024, 4096)


def _numpy_loop():
    """``numpy_reconstruct`` from the retrieval benchmark beside this file."""
    path = Path(__file__).with_name("bench_retrieval.py")
    spec = importlib.util.spec_from_file_location("cdinn_bench_retrieval_for_nn", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.numpy_reconstruct


def _rate(fn, n, min_seconds):
    """Patterns/s of ``fn()`` processing ``n`` patterns: best of repeats within ``min_seconds``."""
    fn()  # warm-up (oneDNN primitives, caches)
    best, spent = float("inf"), 0.0
    while spent < min_seconds or best == float("inf"):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return n / best


def network_rates(net, batch_sizes=_BATCHES, min_seconds=1.0, device="cpu"):
    """Network-only patterns/s per batch size for fp32 NCHW, fp32 channels-last and bf16 channels-last."""
    import torch

    from napari_cdinn.nn.runtime import autocast, bf16_supported

    dev = torch.device(device)
    out = {}
    modes = [("fp32", False, False), ("fp32_channels_last", True, False)]
    if bf16_supported(dev):
        modes.append(("bf16_channels_last", True, True))
    for name, cl, bf in modes:
        model = net.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        rates = {}
        for b in batch_sizes:
            side = 32 * getattr(net, "input_factor", 1)
            channels = 2 if getattr(net, "mask_channel", False) else 1  # amplitudes (and the map of unmeasured pixels)
            x = torch.rand(b, channels, side, side, device=dev)
            x = x.contiguous(memory_format=torch.channels_last) if cl else x

            def call(x=x, bf=bf, model=model):
                with torch.inference_mode(), autocast(dev, bf):
                    model(x)
                if dev.type == "cuda":  # time the work, not its launch
                    torch.cuda.synchronize(dev)

            rates[str(b)] = _rate(call, b, min_seconds)
        out[name] = rates
    net.to(memory_format=torch.channels_last)
    return out


def predict_rates(intensity, model, batch_sizes=(64, 256, 1024), device="cpu", min_seconds=1.0):
    """End-to-end :func:`predict` patterns/s (per batch size) on 2x-oversampled intensities."""
    from napari_cdinn.nn import predict

    return {str(b): _rate(lambda b=b: predict(intensity, model=model, device=device, batch_size=b), len(intensity),
                          min_seconds) for b in batch_sizes}


def cli_predict_time(intensity, model, threads, views=1):
    """Wall seconds of the whole ``cdinn predict --views V`` command on ``intensity`` (written to a temp dir)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.npy"), os.path.join(tmp, "out.npz")
        np.save(src, intensity)
        cmd = [sys.executable, "-m", "napari_cdinn.cli", "predict", src, "-o", dst, "--device", "cpu",
               "--views", str(views)]
        if model is not None:
            cmd += ["--model", str(model)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        return time.perf_counter() - t0


def refinement(data, model, iterations=(20, 50, 80), count=200, device="cpu", batch_size=None):
    """NN-seeded short runs against the 620-iteration protocol from random starts.

    Variants: ``nn_refine_<it>``, the ``cdinn reconstruct --init nn`` settings
    (:data:`napari_cdinn.nn.inference.REFINE_OPTIONS`: support shrink-wrapped from the network's)
    with ``it`` iterations, and ``nn_fixed_<it>``, the network's support held fixed.
    Quality after cropping to 32 x 32 (up to twin, shift, global phase); time per pattern
    including the network.
    """
    from napari_cdinn.nn import predict
    from napari_cdinn.nn.inference import REFINE_OPTIONS, embed
    from napari_cdinn.retrieval import reconstruct

    inten = data["intensity"][:count]
    truth = {k: data[k][:count] for k in ("amplitude", "phase")}

    def score(obj):
        c = physics.compare(physics.crop(obj, (32, 32)), truth["amplitude"], truth["phase"])
        return {"phase_rms_median": float(np.nanmedian(c["phase_rms"])),
                "phase_rms_p90": float(np.nanpercentile(c["phase_rms"], 90)),
                "iou_median": float(np.median(c["iou"]))}

    out = {"count": len(inten)}
    t0 = time.perf_counter()
    res = reconstruct(inten, device=device, batch_size=batch_size, iterations=620, n_starts=1)
    t_full = time.perf_counter() - t0
    out["random_620"] = dict(score(res["object"]), ms_per_pattern=1e3 * t_full / len(inten),
                             chi2_median=float(np.median(res["chi2"])))
    t0 = time.perf_counter()
    guess = predict(inten, model=model, device=device)
    t_nn = time.perf_counter() - t0
    obj, sup = embed(guess["amplitude"], guess["phase"], 2)
    out["nn_only"] = dict(score(obj), ms_per_pattern=1e3 * t_nn / len(inten), chi2_median=float(np.median(guess["chi2"])))
    refine = {k: v for k, v in REFINE_OPTIONS.items() if k not in ("iterations", "average")}
    for it in iterations:
        for name, kw in (("refine", refine), ("fixed", {"fixed_support": True})):
            t0 = time.perf_counter()
            r = reconstruct(inten, init=obj, support=sup, iterations=it, average=min(REFINE_OPTIONS["average"], it // 2),
                            device=device, batch_size=batch_size, n_starts=1, **kw)
            dt = time.perf_counter() - t0 + t_nn
            q = dict(score(r["object"]), ms_per_pattern=1e3 * dt / len(inten), chi2_median=float(np.median(r["chi2"])))
            q["speedup_vs_random_620"] = t_full / dt
            q["beats_random_620"] = bool(q["phase_rms_median"] < out["random_620"]["phase_rms_median"]
                                         and q["phase_rms_p90"] < out["random_620"]["phase_rms_p90"])
            out[f"nn_{name}_{it}"] = q
    return out


def run(model=None, count=1000, predict_count=4000, batch_sizes=_BATCHES, refine_count=200, numpy_count=4,
        device="cpu", threads=None, min_seconds=1.0, photons=1e5) -> dict:
    """Run every measurement and return the figures as a dict (see the module notes)."""
    import torch

    from napari_cdinn.nn import load_model, resolve_model
    from napari_cdinn.nn.evaluate import TEST_SEED, score_model

    if threads:
        torch.set_num_threads(int(threads))
    big = simulate(max(predict_count, count, refine_count), seed=TEST_SEED, oversampling=2)
    path = resolve_model(model, big["intensity"].shape).path
    net, card = load_model(path, device)
    res = {"benchmark": "nn", "model": str(path), "arch": net.arch, "examples_trained": card.get("examples"),
           "torch_threads": torch.get_num_threads(), "machine": machine_info(device)}
    res["network_patterns_per_s"] = network_rates(net, batch_sizes, min_seconds, device)
    res["predict_patterns_per_s"] = predict_rates(big["intensity"][:4096], path, device=device, min_seconds=min_seconds)
    t_cli = cli_predict_time(big["intensity"][:predict_count], path, threads)
    numpy_reconstruct = _numpy_loop()
    t0 = time.perf_counter()
    for i in range(numpy_count):
        numpy_reconstruct(big["intensity"][i], seed=0, frame=i)
    t_np = (time.perf_counter() - t0) / numpy_count
    res["cli_predict"] = {"patterns": int(predict_count), "seconds": t_cli, "ms_per_pattern": 1e3 * t_cli / predict_count,
                          "numpy_620_ms_per_pattern": 1e3 * t_np, "speedup_vs_numpy_620": t_np * predict_count / t_cli}
    t_views = cli_predict_time(big["intensity"][:predict_count], path, threads, views=8)
    res["cli_predict_views8"] = {"ms_per_pattern": 1e3 * t_views / predict_count,
                                 "speedup_vs_numpy_620": t_np * predict_count / t_views}
    test = {k: v[:count] for k, v in big.items()}
    res["quality"] = score_model(path, data=test, device=device)
    res["quality_fp32"] = score_model(path, data=test, device=device, precision="fp32")
    res["quality_views"] = {str(v): score_model(path, data=test, device=device, views=v) for v in (2, 4, 8)}
    noisy = simulate(count, seed=TEST_SEED, oversampling=2, photons=photons)
    res["quality_noisy"] = score_model(path, data=noisy, device=device, photons=photons)
    res["refinement"] = refinement(big, path, count=refine_count, device=device)
    for val in res["refinement"].values():
        if isinstance(val, dict) and "ms_per_pattern" in val:
            val["speedup_vs_numpy_620"] = 1e3 * t_np / val["ms_per_pattern"]
    res["targets"] = {"iou_median": 0.9, "phase_rms_median": 0.3, "chi2_median": 0.02, "cli_speedup": 100}
    return res


def summary(res):
    """Headline figures (for ``cdinn bench``)."""
    q, r = res["quality"], res["refinement"]
    best = {k: v for k, v in r.items() if k.startswith("nn_") and k != "nn_only"}
    return {
        "bf16_cl_patterns_per_s_b64": round(res["network_patterns_per_s"].get("bf16_channels_last", {}).get("64", 0)),
        "cli_ms_per_pattern": round(res["cli_predict"]["ms_per_pattern"], 3),
        "cli_speedup_vs_numpy_620": round(res["cli_predict"]["speedup_vs_numpy_620"]),
        "iou_median": round(q["iou_median"], 3),
        "phase_rms_median": round(q["phase_rms_median"], 3),
        "phase_rms_p90": round(q["phase_rms_p90"], 3),
        "chi2_median": round(q["chi2_median"], 4),
        "noisy_phase_rms_median": round(res["quality_noisy"]["phase_rms_median"], 3),
        "views8_iou_phase_phase90_chi2": [round(res["quality_views"]["8"][k], 4) for k in
                                          ("iou_median", "phase_rms_median", "phase_rms_p90", "chi2_median")],
        "views8_cli_ms_per_pattern": round(res["cli_predict_views8"]["ms_per_pattern"], 3),
        "random_620_phase_rms": [round(r["random_620"][k], 3) for k in ("phase_rms_median", "phase_rms_p90")],
        "refined_phase_rms": {k: [round(v[k2], 3) for k2 in ("phase_rms_median", "phase_rms_p90")] for k, v in best.items()},
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model name, .safetensors file or model directory (default: shipped)")
    p.add_argument("--count", type=int, default=1000, help="test patterns for quality (default 1000)")
    p.add_argument("--predict-count", type=int, default=4000, help="patterns for the whole cdinn predict (default 4000)")
    p.add_argument("--refine-count", type=int, default=200, help="patterns for the refinement comparison (default 200)")
    p.add_argument("--numpy-count", type=int, default=4, help="patterns timed with the NumPy 620-iteration loop")
    p.add_argument("--batch-sizes", default=",".join(map(str, _BATCHES)), help="comma-separated batch sizes")
    p.add_argument("--min-seconds", type=float, default=1.0, help="timing budget per rate")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    kw = {"model": args.model, "count": args.count, "predict_count": args.predict_count, "refine_count": args.refine_count,
          "numpy_count": args.numpy_count, "batch_sizes": tuple(int(b) for b in args.batch_sizes.split(",")),
          "device": args.device, "threads": args.threads, "min_seconds": args.min_seconds}
    if args.quick:
        kw.update(QUICK)
    res = run(**kw)
    print(json.dumps(summary(res), indent=1))
    if args.json:
        write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
