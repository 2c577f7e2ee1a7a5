"""Adapting the network to a stack without ground truth: the network alone, base against adapted.

Usage::

    python benchmarks/bench_adapt.py [--count 2000] [--time-limit 10] [--threads 2] [--json OUT.json]
    python benchmarks/bench_adapt.py --rank [--test-count 300] [--json OUT.json]

``--rank`` (:func:`rank`) scores the base network alone on every candidate set
(:data:`CANDIDATES`: the kinds the issue names, the training mixture's edges and beyond them)
and lists them worst first; the weak sets (:data:`SETS`) are the worst of them (docs/decisions.md,
"The weak sets are the ones the network handles worst").

For each weak set the shipped ``model2x`` is adapted (:func:`napari_cdinn.nn.adapt.adapt`, its defaults) on
``count`` unlabelled 2x-oversampled 64 x 64 patterns of that kind, then the network alone
(:func:`napari_cdinn.nn.evaluate.score_model`: support IoU, phase RMS inside the true object,
medians after removing twin, shift and global phase) is scored with the truth on
``test_count`` *separate* patterns of the same kind, and on the paper's noise-free patterns (does
the adapted network forget?), base against adapted.  The held-out chi^2 the adaptation reports
(median over its held-out frames) comes with it.  ``--only`` adapts on any candidate set instead (the
kinds the issue names, now in the base's training mixture, for comparison).  Seeds: ``BENCH_SEED`` +
the set's index in :data:`CANDIDATES` for the unlabelled patterns, + 100 for the set's test
patterns, + 200 for the paper test patterns, + 300 for ``--rank``'s; disjoint from the training,
validation, ``TEST_SEED`` and ``bench_realistic`` streams.

Targets (issue 25; 2-core CPU, ``--time-limit 10``): on every weak set the IoU up by at least
0.03 or the median phase RMS down by at least 0.03 rad, with the held-out chi^2 down; on the
paper set the IoU at most 0.01 lower.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_realistic import add_common_options, report, set_threads  # noqa: E402

from napari_cdinn.device import machine_info  # noqa: E402
from napari_cdinn.simulate import Detector, simulate  # noqa: E402

#: Seed of the first set's unlabelled patterns (see the module notes).
BENCH_SEED = 20_261_225
#: Candidate sets (``simulate`` keywords) ``--rank`` scores the base on: the paper's, the families and
#: counts the issue names, and detectors at and beyond the edges of the base's training mixture
#: (``realistic``: 1e3-1e9 photons, beamstops up to 3.5 pixels, gaps 1-2 pixels wide, background up to
#: 0.3 photons per pixel).
CANDIDATES = {
    "paper": {},
    "textured": {"families": "textured"},
    "holes": {"families": "holes"},
    "photons_1e3": {"photons": 1e3},
    "photons_3e2": {"photons": 3e2},
    "photons_1e2": {"photons": 1e2},
    "textured_1e3": {"families": "textured", "photons": 1e3},
    "holes_1e3": {"families": "holes", "photons": 1e3},
    "beamstop_5": {"detector": Detector(photons=(1e5, 1e5), beamstop=(5.0, 5.0))},
    "background_1": {"detector": Detector(photons=(1e4, 1e4), background=(1.0, 1.0))},
    "gaps_4": {"detector": Detector(photons=(1e5, 1e5), gaps=1.0, gap_width=(4, 4))},
}
#: Weak sets adapted on: the five the base handles worst by ``--rank`` (docs/decisions.md).
SETS = {name: CANDIDATES[name] for name in ("gaps_4", "background_1", "photons_1e2", "holes_1e3", "beamstop_5")}
#: Seed of the first candidate set of ``--rank`` (set ``i``: + i); disjoint from the streams above.
RANK_SEED = BENCH_SEED + 300
#: The base model adapted.
BASE = "model2x"
#: IoU gain or phase-RMS drop (rad) a weak set must show; IoU the paper set may lose at most.
GAIN, FORGET = 0.03, 0.01
#: Arguments of ``run`` for a smoke run (``cdinn bench --quick``).
QUICK = {"count": 300, "test_count": 50, "time_limit": 0.2, "sets": ("gaps_4",)}
#: Scores kept per model and test set.
_KEYS = ("iou_median", "phase_rms_median", "phase_rms_p90", "chi2_median", "trusted_fraction")


def _scores(model, data, device):
    """The network alone on ``data``'s patterns, scored with its truth."""
    from napari_cdinn.nn.evaluate import score_model

    res = score_model(model, data=data, device=device)
    return {k: res[k] for k in _KEYS}


def _described(kw):
    """``simulate`` keywords as JSON (a :class:`Detector` as its fields)."""
    return {k: dataclasses.asdict(v) if isinstance(v, Detector) else v for k, v in kw.items()}


def rank(test_count=300, device="cpu"):
    """The base network alone on every candidate set (:data:`CANDIDATES`), worst IoU first."""
    results = {"machine": machine_info(device), "base": BASE, "test_count": int(test_count), "seed": RANK_SEED,
               "candidates": {}}
    for i, (name, kw) in enumerate(CANDIDATES.items()):
        data = simulate(test_count, seed=RANK_SEED + i, oversampling=2, **kw)
        results["candidates"][name] = dict(_scores(BASE, data, device), set=_described(kw))
    results["worst_first"] = sorted(results["candidates"], key=lambda n: results["candidates"][n]["iou_median"])
    return results


def rank_summary(res):
    """One line per candidate set, worst IoU first."""
    return {name: "iou {iou_median:.3f} phase {phase_rms_median:.3f} (p90 {phase_rms_p90:.3f}) chi2 {chi2_median:.4f} "
                  "trusted {trusted_fraction:.2f}".format(**res["candidates"][name]) for name in res["worst_first"]}


def _targets(weak, paper, chi2):
    """Whether a set meets the issue's targets: gain on the weak set, chi^2 down, the paper set kept."""
    iou_gain = weak["adapted"]["iou_median"] - weak["base"]["iou_median"]
    rms_drop = weak["base"]["phase_rms_median"] - weak["adapted"]["phase_rms_median"]
    paper_loss = paper["base"]["iou_median"] - paper["adapted"]["iou_median"]
    return {"iou_gain": iou_gain, "phase_rms_drop": rms_drop, "paper_iou_loss": paper_loss,
            "gain_met": bool(iou_gain >= GAIN or rms_drop >= GAIN), "chi2_down": bool(chi2["after"] < chi2["before"]),
            "paper_kept": bool(paper_loss <= FORGET)}


def run_set(name, index, count, test_count, time_limit, device, paper, folder):
    """Adapt ``BASE`` on one weak set and score base and adapted (see the module notes)."""
    from napari_cdinn.nn.adapt import adapt

    kw = CANDIDATES[name]
    unlabelled = simulate(count, seed=BENCH_SEED + index, oversampling=2, **kw)
    test = simulate(test_count, seed=BENCH_SEED + 100 + index, oversampling=2, **kw)
    t0 = time.perf_counter()
    card = adapt(unlabelled["intensity"], Path(folder) / name, model=BASE, mask=unlabelled.get("mask"),
                 time_limit_min=time_limit, device=device, test_count=0)
    seconds = time.perf_counter() - t0
    out = {"set": _described(kw), "count": int(count), "test_count": int(test_count), "adapt_s": seconds,
           "steps": card["steps"], "best_step": card["best_step"], "ended": card["ended"],
           "holdout_chi2": card["holdout_chi2"], "settings": card["settings"]}
    for label, data in (("weak", test), ("paper", paper)):
        out[label] = {"base": _scores(BASE, data, device), "adapted": _scores(card["path"], data, device)}
    out["targets"] = _targets(out["weak"], out["paper"], card["holdout_chi2"])
    return out


def run(count=2000, test_count=500, time_limit=10.0, sets=None, device="cpu"):
    """Every weak set of :data:`SETS` (or the candidate sets named), each adapted from ``BASE`` and scored."""
    names = list(SETS) if sets is None else list(sets)
    results = {"machine": machine_info(device), "base": BASE, "count": int(count), "test_count": int(test_count),
               "time_limit_min": float(time_limit), "seed": BENCH_SEED, "sets": {}}
    paper = simulate(test_count, seed=BENCH_SEED + 200, oversampling=2)
    with tempfile.TemporaryDirectory(prefix="bench_adapt_") as folder:
        for name in names:
            t0 = time.perf_counter()
            index = list(CANDIDATES).index(name)
            results["sets"][name] = run_set(name, index, count, test_count, time_limit, device, paper, folder)
            print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    results["all_targets_met"] = all(all(v for k, v in s["targets"].items() if k.endswith(("_met", "_down", "_kept")))
                                     for s in results["sets"].values())
    return results


def summary(res):
    """One line per set: IoU and phase RMS base -> adapted on the weak and paper sets, held-out chi^2, targets."""
    rows = {}
    for name, s in res["sets"].items():
        w, p, h, t = s["weak"], s["paper"], s["holdout_chi2"], s["targets"]
        rows[name] = (f"iou {w['base']['iou_median']:.3f}->{w['adapted']['iou_median']:.3f} phase "
                      f"{w['base']['phase_rms_median']:.3f}->{w['adapted']['phase_rms_median']:.3f}; paper iou "
                      f"{p['base']['iou_median']:.3f}->{p['adapted']['iou_median']:.3f}; held-out chi2 "
                      f"{h['before']:.4g}->{h['after']:.4g}; {s['steps']} steps ({s['ended']}, best {s['best_step']}); "
                      f"targets {'met' if t['gain_met'] and t['chi2_down'] and t['paper_kept'] else 'missed'}")
    rows["all_targets_met"] = res["all_targets_met"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="unlabelled patterns adapted on per set (default 2000)")
    parser.add_argument("--test-count", type=int, default=None,
                        help="test patterns per set (default 500; --rank: 300)")
    parser.add_argument("--time-limit", type=float, default=10.0, help="minutes of adaptation per set (default 10)")
    parser.add_argument("--only", action="append", default=None, choices=list(CANDIDATES),
                        help="adapt on this set of the candidates (repeatable; default: the weak sets)")
    parser.add_argument("--rank", action="store_true", help="only score the base on every candidate set, worst first")
    add_common_options(parser)
    args = parser.parse_args(argv)
    set_threads(args)
    if args.rank:
        res = rank(test_count=300 if args.test_count is None else args.test_count, device=args.device)
        return report(args, res, rank_summary)
    test_count = 500 if args.test_count is None else args.test_count
    res = run(count=args.count, test_count=test_count, time_limit=args.time_limit, sets=args.only,
              device=args.device)
    report(args, res, summary)


if __name__ == "__main__":
    main()
