"""Preparing detector frames: how well the centre is found, what a wrong centre costs, how fast.

Three measurements, on simulated frames placed on a larger chip with the beam off-centre, a beamstop
over it and two gaps (``--quick``: smaller sets):

* ``centre``: the error (pixels, the larger of the two axes) of :func:`napari_cdinn.prepare.stack_centre`
  on stacks of 1, 2, 4, 8, 16 and 32 frames, for the paper's objects without noise, the realistic
  mixture at 1e5 and 1e3 photons, and the mixture as the ``realistic`` detector records it (1e3-1e6
  photons, background, and per-frame beamstops, gaps and saturated peaks besides the chip's), over
  several seeds;
* ``offset``: patterns (nothing masked: the centre's cost alone) cut with the centre 0-3 px off, inverted by the shipped network
  as ``predict`` runs it (re-centred where its sample fits better so, ``recentred``) and as cut
  (trusted fraction, IoU, phase RMS after centring and ramp removal), and by the default
  ``reconstruct`` (chi^2, IoU, phase RMS), against the truth;
* ``speed``: :func:`napari_cdinn.prepare.friedel_centre` on one frame of an EIGER 4M-sized chip
  (2,167 x 2,070), seconds.

    python benchmarks/bench_prepare.py --json benchmarks/results/bench_prepare_cpu2.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

from napari_cdinn import physics, prepare
from napari_cdinn.device import machine_info
from napari_cdinn.io import write_json
from napari_cdinn.postprocess import apply_steps
from napari_cdinn.simulate import simulate

#: The chip and the beam of every set: 300 x 200 pixels, the beam at (141, 77).
CHIP, BEAM = (300, 200), (141, 77)
#: The kinds of frames: :func:`simulate` keywords.
KINDS = {"paper_noise_free": {"families": "paper"},
         "mixture_1e5": {"families": "realistic", "photons": 1e5},
         "mixture_1e3": {"families": "realistic", "photons": 1e3},
         "realistic_detector": {"families": "realistic", "detector": "realistic"}}


def detector_frames(count, seed, oversampling=4, masked=True, **kinds):
    """Simulated centred patterns (``kinds``: :func:`simulate` keywords) on the chip with (``masked``) a
    beamstop and two gaps: zeros there, and the mask (per frame where the detector masks per frame)."""
    sim = simulate(count, seed=seed, oversampling=oversampling, **kinds)
    side = sim["intensity"].shape[-1]
    cy, cx = BEAM
    window = (slice(None), slice(cy - side // 2, cy + side // 2), slice(cx - side // 2, cx + side // 2))
    det = np.zeros((count, *CHIP), np.float32)
    det[window] = sim["intensity"]
    mask = np.zeros(CHIP, bool)
    if masked:
        mask[cy - 3:cy + 4, cx - 3:cx + 4] = True
        mask[:, cx + 13:cx + 16] = True
        mask[cy + side // 2 - 5:cy + side // 2 - 1, :] = True
    if "mask" in sim:  # the detector's own, per frame
        mask = np.broadcast_to(mask, det.shape).copy()
        mask[window] |= sim["mask"]
    det[np.broadcast_to(mask, det.shape)] = 0
    return det, mask, sim


def centre_errors(seeds=5, counts=(1, 2, 4, 8, 16, 32)):
    """Per kind and number of summed frames: the fraction exact, the median and the largest error."""
    out = {}
    for kind, kinds in KINDS.items():
        errors = {n: [] for n in counts}
        for seed in range(seeds):
            det, mask, _ = detector_frames(max(counts), 100 + seed, **kinds)
            for n in counts:
                c = prepare.stack_centre(det[:n], mask if mask.ndim == 2 else mask[:n])
                errors[n].append(max(abs(c[0] - BEAM[0]), abs(c[1] - BEAM[1])))
        out[kind] = {str(n): {"exact": float(np.mean(np.array(e) == 0)), "median_px": float(np.median(e)),
                              "max_px": float(max(e))} for n, e in errors.items()}
    return out


def _scores(amplitude, phase, sim, support=None):
    amp, pha, _ = apply_steps(amplitude, phase, ["centre", "ramp"], support=support)
    obj = physics.crop(amp * np.exp(1j * pha), sim["amplitude"].shape[-2:])
    ta, tp, _ = apply_steps(sim["amplitude"], sim["phase"], ["ramp"])
    cmp = physics.compare(obj, ta, tp)
    return {"iou": float(np.median(cmp["iou"])), "phase_rms": float(np.median(cmp["phase_rms"]))}


def offset_costs(count=48, offsets=((0, 0), (1, 0), (1, 1), (2, 2), (3, 0))):
    """The network and the default retrieval on patterns cut with the centre off by ``offsets`` pixels."""
    from napari_cdinn import nn
    from napari_cdinn.retrieval import reconstruct

    det, mask, sim = detector_frames(count, 11, oversampling=2, masked=False, **KINDS["mixture_1e5"])  # the centre alone
    out = {}
    for dy, dx in offsets:
        pattern, bad = prepare.prepare_frames(det, (BEAM[0] + dy, BEAM[1] + dx), 64, 1, mask)
        info = nn.choose_scale(pattern, mask=bad, device="cpu")  # what predict chooses: re-centred or not
        net = nn.predict(pattern, model=info, mask=bad, device="cpu")
        as_cut = nn.predict(pattern, model=dataclasses.replace(info, offset=None), mask=bad, device="cpu")
        pr = reconstruct(pattern, mask=bad, seed=1)
        out[f"{dy},{dx}"] = {
            "network": dict(_scores(net["amplitude"], net["phase"], sim), trusted=float(np.mean(net["trusted"])),
                            recentred=list(info.offset) if info.offset else None),
            "network_as_cut": dict(_scores(as_cut["amplitude"], as_cut["phase"], sim),
                                   trusted=float(np.mean(as_cut["trusted"]))),
            "retrieval": dict(_scores(pr["amplitude"], pr["phase"], sim, pr["support"]),
                              chi2=float(np.median(pr["chi2"]))),
        }
    return out


def speed(repeats=3):
    """Seconds of :func:`prepare.friedel_centre` on one EIGER 4M-sized frame (best of ``repeats``)."""
    frame = np.random.default_rng(0).poisson(1.0, (2167, 2070)).astype(np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        prepare.friedel_centre(frame)
        best = min(best, time.perf_counter() - t0)
    return {"eiger4m_frame_s": best, "shape": [2167, 2070]}


#: Arguments of ``run`` for a smoke run (``cdinn bench --quick``).
QUICK = {"seeds": 1, "counts": (1, 4), "count": 8, "offsets": ((0, 0), (2, 2)), "repeats": 1}


def run(seeds=5, counts=(1, 2, 4, 8, 16, 32), count=48, offsets=((0, 0), (1, 0), (1, 1), (2, 2), (3, 0)),
        repeats=3) -> dict:
    """Every measurement (see the module notes) as a dict."""
    return {"benchmark": "prepare", "machine": machine_info("cpu"), "chip": list(CHIP), "beam": list(BEAM),
            "centre": centre_errors(seeds, counts), "offset": offset_costs(count, offsets), "speed": speed(repeats)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sets (a smoke run)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    res = run(**(QUICK if args.quick else {}))
    print(json.dumps(res, indent=1))
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
