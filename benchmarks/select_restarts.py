"""Choose the default protocol's restart rule: quality and cost of each rule against one 620-iteration run.

Usage::

    python benchmarks/select_restarts.py [--count 200] [--threads 1] [--json OUT.json]

Every run of the protocol (the paper's HIO/ER cycles with shrinkwrap, the last 20 iterations
averaged) is made once per pattern, start and length of :data:`ITERATIONS`, on the sets of
``bench_realistic.CONDITIONS`` drawn with seeds ``BENCH_SEED + SELECTION_OFFSET + i`` (never the
benchmark's own sets); start ``k`` draws its random phases with seed ``k``.  Each rule of the grid
(iterations per run ``n``, at most ``K`` runs, restart while
``chi2 - chi2_noise > max(t, r * chi2_noise)``: :func:`napari_cdinn.protocol.needs_restart`; the
lowest chi^2 kept) is then replayed from these runs: per set, phase RMS (median, p90) and IoU
(median) against the truth (up to twin, shift, global phase), the mean iterations per pattern (the
cost; time is proportional to it) and the fraction of patterns restarted.

The reference is the paper's protocol, one 620-iteration run per pattern (the NumPy loop of
``bench_retrieval.py``).  Chosen: among the rules that cost at most :data:`MAX_COST` of it and
leave no set worse than it by more than :data:`TOLERANCE` (rad, phase RMS median and p90) or
:data:`IOU_TOLERANCE`, the one with the largest mean gain in p90 phase RMS over the sets (then the
cheapest).  Also reported: the cheapest rule within the tolerance whatever its cost (what restarts
could save at the quality of one 620-iteration run).  These rules and the chosen one on chi^2 alone
(``chi2_noise`` taken as 0) are then replayed on the benchmark's own held-out sets (seeds
``BENCH_SEED + i``).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_realistic import BENCH_SEED, CONDITIONS, add_common_options, report, set_threads  # noqa: E402

#: Iterations per run tried.
ITERATIONS = (620, 400, 300, 200)
#: Most runs per pattern tried (every start is run on every pattern; rules replay them).
MAX_STARTS = 4
#: Absolute (``t``) and relative (``r``) parts of the restart threshold tried.
THRESHOLDS = (1e-4, 3e-4, 1e-3, 3e-3)
RELATIVE = (0.0, 0.1, 0.2, 0.5, 1.0)
#: Seed offset of the selection sets from the benchmark's.
SELECTION_OFFSET = 1000
#: Allowed loss against one 620-iteration run on any set: phase RMS (rad, median and p90), IoU.
TOLERANCE = 0.02
IOU_TOLERANCE = 0.01
#: Most mean iterations per pattern, as a fraction of one 620-iteration run.
MAX_COST = 1.05
#: The reference: one run of the paper's 620 iterations.
PAPER = {"iterations": 620, "starts": 1, "threshold": 0.0, "relative": 0.0}


def runs(data, iterations, starts, device="cpu"):
    """Every start of ``iterations`` on every pattern of ``data`` (``simulate`` output), scored.

    Returns
    -------
    dict of ndarray (starts, N): ``chi2``, ``phase_rms``, ``iou``; and ``chi2_noise`` (N,).
    """
    from napari_cdinn import physics
    from napari_cdinn.retrieval import reconstruct

    inten, mask = data["intensity"], data.get("mask")
    truth = data["amplitude"].shape[-2:]
    out = {"chi2": [], "phase_rms": [], "iou": []}
    for k in range(starts):
        r = reconstruct(inten, mask=mask, device=device, iterations=iterations, n_starts=1, seed=k)
        c = physics.compare(physics.crop(r["object"], truth), data["amplitude"], data["phase"])
        out["chi2"].append(r["chi2"])
        out["phase_rms"].append(c["phase_rms"])
        out["iou"].append(c["iou"])
    out = {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
    out["chi2_noise"] = np.asarray(r["chi2_noise"], dtype=np.float64)
    return out


def replay(starts_of, rule, noise=True):
    """Quality and cost of ``rule`` replayed from the runs of one set.

    Parameters
    ----------
    starts_of : dict
        Iterations -> :func:`runs` output of one set.
    rule : dict
        ``iterations``, ``starts``, ``threshold``, ``relative``.
    noise : bool
        False: the rule on chi^2 alone (``chi2_noise`` taken as 0).

    Returns
    -------
    dict: ``phase_rms_median``, ``phase_rms_p90``, ``iou_median``, ``iterations_per_pattern``,
    ``restarted`` (fraction of patterns given a second run), ``runs_per_pattern``.
    """
    from napari_cdinn.protocol import needs_restart

    s = starts_of[rule["iterations"]]
    floor = s["chi2_noise"] if noise else np.zeros_like(s["chi2_noise"])
    chi2, rms, iou = s["chi2"][0].copy(), s["phase_rms"][0].copy(), s["iou"][0].copy()
    n_runs = np.ones(chi2.shape)
    restarted = np.zeros(chi2.shape, dtype=bool)
    for k in range(1, rule["starts"]):
        todo = needs_restart(chi2, floor, rule["threshold"], rule["relative"])
        restarted |= todo
        better = todo & (s["chi2"][k] < chi2)
        chi2 = np.where(better, s["chi2"][k], chi2)
        rms = np.where(better, s["phase_rms"][k], rms)
        iou = np.where(better, s["iou"][k], iou)
        n_runs += todo
    return {"phase_rms_median": float(np.nanmedian(rms)), "phase_rms_p90": float(np.nanpercentile(rms, 90)),
            "iou_median": float(np.median(iou)), "iterations_per_pattern": float(rule["iterations"] * n_runs.mean()),
            "restarted": float(restarted.mean()), "runs_per_pattern": float(n_runs.mean())}


def grid():
    """The rules tried (one run per pattern needs no threshold: listed once per length)."""
    rules = []
    for n, k, t, r in itertools.product(ITERATIONS, range(1, MAX_STARTS + 1), THRESHOLDS, RELATIVE):
        if k == 1 and (t, r) != (THRESHOLDS[0], RELATIVE[0]):
            continue
        rules.append({"iterations": n, "starts": k, "threshold": t, "relative": r})
    return rules


def judge(rows, reference):
    """Losses against ``reference`` per set, the mean p90 gain, the cost ratio and whether the rule is allowed."""
    d = {key: [rows[s][key] - reference[s][key] for s in rows] for key in ("phase_rms_median", "phase_rms_p90",
                                                                            "iou_median")}
    cost = np.mean([rows[s]["iterations_per_pattern"] for s in rows]) / np.mean(
        [reference[s]["iterations_per_pattern"] for s in rows])
    out = {"worst_median_loss": max(d["phase_rms_median"]), "worst_p90_loss": max(d["phase_rms_p90"]),
           "worst_iou_loss": 0.0 - min(d["iou_median"]), "mean_p90_gain": 0.0 - float(np.mean(d["phase_rms_p90"])),
           "mean_median_gain": 0.0 - float(np.mean(d["phase_rms_median"])), "cost": float(cost)}
    out["within_tolerance"] = bool(out["worst_median_loss"] <= TOLERANCE and out["worst_p90_loss"] <= TOLERANCE
                                   and out["worst_iou_loss"] <= IOU_TOLERANCE)
    out["allowed"] = bool(out["within_tolerance"] and cost <= MAX_COST)
    return out


def choose(table):
    """The allowed rule with the largest mean p90 gain (then the lowest cost), from :func:`judge` rows."""
    allowed = [row for row in table if row["judge"]["allowed"]]
    return max(allowed, key=lambda row: (round(row["judge"]["mean_p90_gain"], 6), -row["judge"]["cost"]))["rule"]


def cheapest(table):
    """The rule with the fewest iterations among those within the tolerance (whatever their cost): what
    restarts could save at the quality of one 620-iteration run."""
    return min((row for row in table if row["judge"]["within_tolerance"]), key=lambda row: row["judge"]["cost"])["rule"]


def _sets(offset, count, lengths, device):
    """Runs of every length in ``lengths`` (``starts`` each) on every condition drawn at ``BENCH_SEED + offset + i``."""
    out = {}
    for i, (name, kw) in enumerate(CONDITIONS.items()):
        t0 = time.perf_counter()
        data = simulate_set(count, BENCH_SEED + offset + i, kw)
        out[name] = {n: runs(data, n, k, device) for n, k in lengths.items()}
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def simulate_set(count, seed, kw):
    """One held-out or selection set: ``count`` 2x-oversampled patterns of a condition."""
    from napari_cdinn.simulate import simulate

    return simulate(count, seed=seed, oversampling=2, **kw)


def run(count=200, device="cpu"):
    """Selection on the selection sets, then the chosen rule on the benchmark's sets (see the module notes)."""
    from napari_cdinn import protocol
    from napari_cdinn.device import machine_info

    selection = _sets(SELECTION_OFFSET, count, dict.fromkeys(ITERATIONS, MAX_STARTS), device)
    reference = {s: replay(selection[s], PAPER) for s in selection}
    table = []
    for rule in grid():
        rows = {s: replay(selection[s], rule) for s in selection}
        table.append({"rule": rule, "judge": judge(rows, reference), "sets": rows})
    chosen, cheap = choose(table), cheapest(table)
    raw = dict(chosen, relative=0.0)
    lengths = {620: 1}
    for rule in (chosen, cheap):
        lengths[rule["iterations"]] = max(lengths.get(rule["iterations"], 1), rule["starts"])
    held = _sets(0, count, lengths, device)
    held_rows = {"paper": {s: replay(held[s], PAPER) for s in held},
                 "chosen": {s: replay(held[s], chosen) for s in held},
                 "chi2_alone": {s: replay(held[s], raw, noise=False) for s in held},
                 "cheapest": {s: replay(held[s], cheap) for s in held}}
    table.sort(key=lambda row: (not row["judge"]["allowed"], -row["judge"]["mean_p90_gain"]))
    shipped = {"iterations": protocol.ITERATIONS, "starts": protocol.STARTS, "threshold": protocol.RESTART_CHI2,
               "relative": protocol.RESTART_NOISE}
    return {"benchmark": "select_restarts", "count": count, "seed": BENCH_SEED, "selection_offset": SELECTION_OFFSET,
            "tolerance": TOLERANCE, "iou_tolerance": IOU_TOLERANCE, "max_cost": MAX_COST, "reference": PAPER,
            "chosen": chosen, "cheapest_within_tolerance": cheap, "shipped": shipped, "shipped_is_chosen": shipped == chosen,
            "selection": {"reference": reference, "best": table[:20]},
            "held_out": {**held_rows, "judge_chosen": judge(held_rows["chosen"], held_rows["paper"]),
                         "judge_chi2_alone": judge(held_rows["chi2_alone"], held_rows["paper"]),
                         "judge_cheapest": judge(held_rows["cheapest"], held_rows["paper"])},
            "machine": machine_info()}


def summary(res):
    """The chosen rule and, per held-out set, the paper's run against it: phase RMS median/p90, IoU, cost, restarted."""
    c = res["chosen"]
    rows = {"chosen": (f"{c['iterations']} iterations, up to {c['starts']} runs, restart while "
                       f"chi2 - chi2_noise > max({c['threshold']:g}, {c['relative']:g} chi2_noise)"),
            "shipped_is_chosen": res["shipped_is_chosen"]}
    held = res["held_out"]
    for s in held["paper"]:
        p, q, raw = held["paper"][s], held["chosen"][s], held["chi2_alone"][s]
        rows[s] = (f"paper {p['phase_rms_median']:.3f}/{p['phase_rms_p90']:.3f}/{p['iou_median']:.3f}; chosen "
                   f"{q['phase_rms_median']:.3f}/{q['phase_rms_p90']:.3f}/{q['iou_median']:.3f} "
                   f"x{q['iterations_per_pattern'] / p['iterations_per_pattern']:.2f} restarted {q['restarted']:.2f}"
                   f" (chi2 alone: restarted {raw['restarted']:.2f})")
    for key in ("judge_chosen", "judge_cheapest"):
        rows[key] = {k: round(v, 3) if isinstance(v, float) else v for k, v in held[key].items()}
    rows["cheapest_within_tolerance"] = res["cheapest_within_tolerance"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="patterns per set (default 200)")
    add_common_options(parser)
    args = parser.parse_args(argv)
    set_threads(args)
    report(args, run(args.count, args.device), summary)


if __name__ == "__main__":
    main()
