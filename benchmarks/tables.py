"""Markdown tables of the benchmark results stored in benchmarks/results/*.json.

Usage (from the repository root; needs only the standard library)::

    python benchmarks/tables.py            # print the tables
    python benchmarks/tables.py --write    # put them into benchmarks/README.md, between its markers

Reads ``bench_nn_*.json`` (``benchmarks/bench_nn.py --json``), ``bench_realistic_*.json``
(``benchmarks/bench_realistic.py --json``), ``select_restarts_*.json`` and
``bench_retrieval_heldout_*.json`` (``benchmarks/bench_retrieval.py --held-out --json``),
``bench_retrieval_*.json``, ``bench_simulate_*.json`` and ``bench_stream_*.json`` (the engine, the
simulator and streaming), ``bench_speed_*.json`` (``benchmarks/bench_speed.py --json``), ``bench_large_*.json`` and
``bench_adapt_*.json`` (``benchmarks/bench_adapt.py [--rank] --json``).  ``--write`` replaces the text between
``<!-- tables:begin -->`` and ``<!-- tables:end -->`` in ``benchmarks/README.md`` and keeps the rest.
Re-run it after adding or re-measuring a JSON file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
BEGIN, END = "<!-- tables:begin -->", "<!-- tables:end -->"

#: Held-out sets of bench_realistic.py, in its order, with a readable name.
CONDITIONS = {
    "noise_free": "noise-free",
    "photons_1e6": "1e6 photons",
    "photons_1e5": "1e5 photons",
    "photons_1e4": "1e4 photons",
    "photons_1e3": "1e3 photons",
    "beamstop_1": "beamstop r = 1 px",
    "beamstop_2": "beamstop r = 2 px",
    "beamstop_3": "beamstop r = 3 px",
    "gaps": "detector gaps",
    "textured": "textured objects",
    "holes": "non-convex, holes",
    "mixture": "training mixture",
}
REALISTIC_COMMAND = ("python benchmarks/bench_realistic.py --threads 2 "
                     "--json benchmarks/results/bench_realistic_cpu2.json")
LARGE_COMMAND = ("python benchmarks/bench_large.py --threads 2 --count 100 --only size64_noise_free --only "
                 "size64_photons_1e4 --only size64_mixture --only size128_noise_free --json "
                 "benchmarks/results/bench_large_cpu2.json\npython benchmarks/bench_large.py --threads 2 --count 100 "
                 "--only size48_os4_noise_free --only size48_os4_mixture --json "
                 "benchmarks/results/bench_large_os4_cpu2.json")
SPEED_COMMAND = "python benchmarks/bench_speed.py --json benchmarks/results/bench_speed_cpu2.json"
VERDICT_COMMAND = "python benchmarks/bench_verdict.py --count 300 --threads 2 --json benchmarks/results/bench_verdict_cpu2.json"
PREPARE_COMMAND = "python benchmarks/bench_prepare.py --threads 2 --json benchmarks/results/bench_prepare_cpu2.json"
ADAPT_COMMANDS = ("python benchmarks/bench_adapt.py --rank --threads 2 --json benchmarks/results/bench_adapt_rank_cpu2.json\n"
                  "python benchmarks/bench_adapt.py --threads 2 --time-limit 10 "
                  "--json benchmarks/results/bench_adapt_cpu2_10min.json")
ENGINE_COMMANDS = ("python benchmarks/bench_simulate.py --json benchmarks/results/bench_simulate_cpu2.json\n"
                   "python benchmarks/bench_retrieval.py --numpy-count 64 --json benchmarks/results/bench_retrieval_cpu2.json\n"
                   "python benchmarks/bench_stream.py --json benchmarks/results/bench_stream_cpu2.json")
RESTARTS_COMMANDS = ("python benchmarks/select_restarts.py --threads 1 --json benchmarks/results/select_restarts_cpu1.json\n"
                     "python benchmarks/bench_retrieval.py --held-out --count 300 "
                     "--json benchmarks/results/bench_retrieval_heldout_cpu2.json")


def _f(x, digits=3):
    if x is None:
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if x != 0 and abs(x) < 1e-3:
        return f"{x:.0e}".replace("e-0", "e-")
    return f"{x:.{digits}g}"


def _pct(x):
    return "–" if x is None else f"{100 * x:.0f}%"


def _machine(res):
    m = res.get("machine", {})
    device = m.get("device", "cpu")
    cpu = "CPU" if "cpu_model" not in m else f"{m['cpu_model']}{'' if m.get('cpu_bf16') else ' (no fast bf16)'}"
    where = f"{m.get('cpu_count', '?')}-core {cpu}" if device == "cpu" else f"{device} ({m.get('cpu_count', '?')} vCPUs)"
    return f"{where}, torch {m.get('torch', '?')}, {res.get('torch_threads', m.get('torch_threads', '?'))} torch threads"


def _model(res):
    if not res.get("model"):
        return "the shipped default for the pattern size (no `--model`)"
    name = Path(str(res["model"])).stem
    ex = res.get("examples_trained")
    arch = res.get("arch")
    return f"`{name}`" + (f" ({arch}, {ex / 1e6:.2f}M training examples)" if ex else "")


def _quality_row(label, q):
    return (f"| {label} | {_f(q.get('iou_median'))} | {_f(q.get('phase_rms_median'))} ({_f(q.get('phase_rms_p90'))}) "
            f"| {_f(q.get('chi2_median'))} | {_pct(q.get('trusted_fraction'))} |")


def nn_tables(name, res):
    """Markdown for one bench_nn JSON."""
    out = [f"### `{name}`: {_machine(res)}", "", f"Model: {_model(res)}.", ""]
    quality = [("network alone", res.get("quality")), ("network alone, fp32 (accuracy check of bf16)",
                                                         res.get("quality_fp32"))]
    for v, q in sorted(res.get("quality_views", {}).items(), key=lambda kv: int(kv[0])):
        quality.append((f"{v} test-time views (`--views {v}`)", q))
    noisy = res.get("quality_noisy")
    if noisy:
        photons = noisy.get("photons")
        photons = f"{photons:.0e}".replace("e+0", "e") if photons else "?"
        quality.append((f"network alone, Poisson noise, {photons} photons", noisy))
    quality = [(label, q) for label, q in quality if q]
    if quality:
        count = quality[0][1].get("count")
        out += [(f"**Quality** on {_f(count)} fresh test patterns (2x oversampled, seed "
                f"{quality[0][1].get('seed', '?')}; medians after removing twin, shift and global phase):"), "",
                "| setting | IoU | phase RMS rad (p90) | chi^2 | trusted |", "|---|---|---|---|---|"]
        out += [_quality_row(label, q) for label, q in quality]
        targets = res.get("targets")
        if targets:
            out += ["", (f"Targets: IoU >= {targets.get('iou_median')}, phase RMS <= {targets.get('phase_rms_median')} "
                        f"rad, chi^2 <= {targets.get('chi2_median')}; whole `cdinn predict` >= "
                        f"{targets.get('cli_speedup')}x faster than the NumPy protocol.")]
        out.append("")
    rates = res.get("network_patterns_per_s", {})
    if rates:
        batches = sorted({int(b) for r in rates.values() for b in r})
        out += ["**Network speed**, patterns/s by batch size (network alone):", "",
                "| precision, memory format | " + " | ".join(str(b) for b in batches) + " |",
                "|---|" + "---|" * len(batches)]
        for mode, r in rates.items():
            out.append(f"| {mode} | " + " | ".join(_f(r.get(str(b)), 4) for b in batches) + " |")
        pred = res.get("predict_patterns_per_s", {})
        if pred:
            out += ["", "`nn.predict` end to end (decimation, chi^2, copies), patterns/s: "
                    + ", ".join(f"{_f(v, 4)} at batch {b}" for b, v in pred.items()) + "."]
        out.append("")
    cli, views = res.get("cli_predict"), res.get("cli_predict_views8")
    if cli:
        line = (f"**Whole command** (`cdinn predict` on {_f(cli.get('patterns'))} patterns, process start and I/O "
                f"included): {_f(cli.get('ms_per_pattern'))} ms per pattern against "
                f"{_f(cli.get('numpy_620_ms_per_pattern'))} ms for the NumPy 620-iteration protocol: "
                f"{_f(cli.get('speedup_vs_numpy_620'))}x")
        if views:
            line += (f"; with `--views 8` {_f(views.get('ms_per_pattern'))} ms: "
                     f"{_f(views.get('speedup_vs_numpy_620'))}x")
        out += [line + ".", ""]
    ref = res.get("refinement")
    if ref:
        out += [(f"**NN-seeded refinement** on {_f(ref.get('count'))} fresh patterns (`nn_refine_K`: network guess, "
                "then K iterations with shrinkwrap, as `cdinn reconstruct --init nn`; `nn_fixed_K`: the network's "
                "support held fixed; `random_620`: the paper's protocol from a random start, our batched engine):"), "",
                "| method | phase RMS rad median (p90) | IoU | chi^2 | ms per pattern | x NumPy protocol |",
                "|---|---|---|---|---|---|"]
        for key, q in ref.items():
            if not isinstance(q, dict):
                continue
            out.append(f"| `{key}` | {_f(q.get('phase_rms_median'))} ({_f(q.get('phase_rms_p90'))}) "
                       f"| {_f(q.get('iou_median'))} | {_f(q.get('chi2_median'), 2)} | {_f(q.get('ms_per_pattern'))} "
                       f"| {_f(q.get('speedup_vs_numpy_620'))} |")
        out.append("")
    return out


def _cell(q):
    cell = f"{_f(q.get('iou_median'))} / {_f(q.get('phase_rms_median'))} ({_f(q.get('phase_rms_p90'))})"
    if "trusted" in q:  # the network's flags; retrieval results carry a chi^2 but no trust flag
        cell += f" / {_pct(q.get('trusted'))} / {_pct(q.get('trusted_but_wrong'))}"
    return cell


def realistic_tables(name, res):
    """Markdown for one bench_realistic JSON."""
    out = [f"### `{name}`: {_machine(res)}", "",
           (f"Model: {_model(res)}; {_f(res.get('count'))} patterns per set (2x-oversampled 64 x 64, 32-pixel objects, "
           f"seed {res.get('seed', '?')} + the set's index); protocol: {res.get('iterations', '?')} iterations."), "",
           ("Each cell: IoU / phase RMS rad median (p90); for the network also trusted / trusted but wrong (IoU < 0.7). "
           "`refined` is `cdinn reconstruct --init nn` (fallback `auto`; *kept*: frames whose network start won)."), "",
           ("| set | network alone | refined | protocol (620 it.) | refined >= protocol | ms per pattern: "
           "network / refined / protocol |"), "|---|---|---|---|---|---|"]
    conds = res.get("conditions", {})
    for key in [k for k in CONDITIONS if k in conds] + [k for k in conds if k not in CONDITIONS]:
        c = conds[key]
        net, ref, pro = c.get("network", {}), c.get("refined", {}), c.get("protocol", {})
        ok = [ref.get("iou_median_at_least_protocol"), ref.get("phase_rms_median_at_least_protocol")]
        ok = "–" if None in ok else ("yes" if all(ok) else "IoU" if ok[0] else "phase" if ok[1] else "no")
        out.append(f"| {CONDITIONS.get(key, key)} | {_cell(net)} | {_cell(ref)}, kept {_pct(ref.get('network_start_kept'))} "
                   f"| {_cell(pro)} | {ok} | {_f(net.get('ms_per_pattern'))} / {_f(ref.get('ms_per_pattern'))} / "
                   f"{_f(pro.get('ms_per_pattern'))} |")
    if "numpy_ms_per_pattern" in res:
        line = f"NumPy 620-iteration protocol: {_f(res['numpy_ms_per_pattern'])} ms per pattern"
        if "refined_speedup_vs_numpy_noise_free" in res:
            line += f"; refined on the noise-free set: {_f(res['refined_speedup_vs_numpy_noise_free'])}x faster"
        out += ["", line + "."]
    out.append("")
    return out


def large_tables(name, res):
    """Markdown for one bench_large JSON."""
    out = [f"### `{name}`: {_machine(res)}", "",
           (f"Model: {_model(res)}; {_f(res.get('count'))} patterns per set, 2x oversampled unless the set's name says "
            f"`os4` (seed {res.get('seed', '?')} + the set's index); protocol: {res.get('iterations', '?')} "
            "iterations; *model, scale*: the network the size policy chose and the pixel size it read the objects "
            "at (2: twice the pattern's)."), "",
           "Each cell: IoU / phase RMS rad median (p90), then chi^2 median; speed-ups against the NumPy loop.", "",
           ("| set | model, scale | network alone | refined | protocol (620 it.) | ms per pattern: network / refined / "
            "protocol / NumPy | speed-up: network / whole `cdinn predict` / refined |"),
           "|---|---|---|---|---|---|---|"]
    for key, c in res.get("conditions", {}).items():
        net, ref, pro = c.get("network", {}), c.get("refined", {}), c.get("protocol", {})
        cells = [f"{_cell(q)}, {_f(q.get('chi2_median'))}" for q in (net, ref, pro)]
        chosen = f"{c['chosen_model']}, {c.get('scale', '?')}" if "chosen_model" in c else c.get("scale", "?")
        out.append(f"| {key} | {chosen} | {' | '.join(cells)} | {_f(net.get('ms_per_pattern'))} / "
                   f"{_f(ref.get('ms_per_pattern'))} / {_f(pro.get('ms_per_pattern'))} / "
                   f"{_f(c.get('numpy_ms_per_pattern'))} | {_f(net.get('speedup_vs_numpy'))} / "
                   f"{_f(net.get('cli_speedup_vs_numpy'))} / {_f(ref.get('speedup_vs_numpy'))} |")
    out.append("")
    return out


def _rule(r):
    return (f"{r.get('iterations', '?')} iterations per run, up to {r.get('starts', '?')} runs, another while "
            f"chi^2 - chi2_noise > max({_f(r.get('threshold'))}, {_f(r.get('relative'))} chi2_noise)")


def _q(q):
    return f"{_f(q.get('phase_rms_median'))} ({_f(q.get('phase_rms_p90'))}) / {_f(q.get('iou_median'))}"


def select_restarts_tables(name, res):
    """Markdown for one select_restarts JSON: the chosen rule, replayed on the held-out sets."""
    held = res.get("held_out", {})
    paper, chosen, raw = held.get("paper", {}), held.get("chosen", {}), held.get("chi2_alone", {})
    j = held.get("judge_chosen", {})
    out = [f"### `{name}`: {_machine(res)}", "",
           (f"Chosen on the selection sets (seeds {res.get('seed', '?')} + {res.get('selection_offset', '?')} + the "
            f"set's index, {_f(res.get('count'))} patterns each): {_rule(res.get('chosen', {}))}; the shipped "
            f"`napari_cdinn.protocol` {'is' if res.get('shipped_is_chosen') else 'is NOT'} this rule. Rule: the "
            f"largest mean gain in p90 phase RMS at most {_f(res.get('max_cost'))}x the iterations of one "
            f"620-iteration run, no set worse by more than {_f(res.get('tolerance'))} rad or "
            f"{_f(res.get('iou_tolerance'))} IoU."), "",
           (f"Replayed on the benchmark's held-out sets ({_f(res.get('count'))} patterns each, seed "
            f"{res.get('seed', '?')} + the set's index). Each cell: phase RMS rad median (p90) / IoU median; "
            "*cost*: iterations per pattern against one 620-iteration run (time follows it); *restarted*: patterns "
            "given a second run; *chi^2 alone*: the same rule without the counting noise (what a threshold on chi^2 "
            "restarts)."), "",
           "| set | paper: 1 run of 620 | chosen rule | cost | restarted | chi^2 alone: restarted, cost |",
           "|---|---|---|---|---|---|"]
    for key in [k for k in CONDITIONS if k in paper]:
        p, c, r = paper[key], chosen.get(key, {}), raw.get(key, {})
        base = p.get("iterations_per_pattern") or 1
        out.append(f"| {CONDITIONS[key]} | {_q(p)} | {_q(c)} | {_f(c.get('iterations_per_pattern', 0) / base)}x "
                   f"| {_pct(c.get('restarted'))} | {_pct(r.get('restarted'))}, "
                   f"{_f(r.get('iterations_per_pattern', 0) / base)}x |")
    cheap = f"the cheapest rule within the tolerance on the selection sets ({_rule(res.get('cheapest_within_tolerance', {}))})"
    for label, v in (("the chosen rule", j), (cheap, held.get("judge_cheapest", {}))):
        if v:
            out += ["", (f"Over the held-out sets, {label}: cost {_f(v.get('cost'))}x, mean gain "
                         f"{_f(v.get('mean_median_gain'))} rad (median) and {_f(v.get('mean_p90_gain'))} rad (p90); "
                         f"worst set {_f(v.get('worst_median_loss'))} rad (median), {_f(v.get('worst_p90_loss'))} rad "
                         f"(p90), {_f(v.get('worst_iou_loss'))} IoU (positive: worse than one 620-iteration run).")]
    out.append("")
    return out


def _head(name, res, text, columns):
    """A result's heading, its explanation and the header of its table of ``columns``."""
    return [f"### `{name}`: {_machine(res)}", "", text, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def verdict_tables(name, res):
    """Markdown for one bench_verdict JSON: per held-out set and path, how often its verdict passes wrong results."""
    paths = ("network", "refined", "reconstruct")
    out = _head(name, res,
                (f"{_f(res.get('count'))} patterns per held-out set (bench_realistic's sets and seeds). Per path, the "
                 "frames its verdict passes (`predict`: trusted; `reconstruct --init nn` and the default `reconstruct`: "
                 "fit within the counting noise) / those passed but wrong (IoU < "
                 f"{res.get('wrong_iou', 0.7)}), of which faint (chi2_noise > `LOW_DOSE_CHI2`)."),
                ("set", *(f"`{p}`: passed / wrong (faint)" for p in
                          ("predict", "reconstruct --init nn", "reconstruct"))))
    for cond, c in res.get("conditions", {}).items():
        cells = [f"{_pct(c[p]['passed'])} / {100 * c[p]['passed_but_wrong']:.1f}% "
                 f"({100 * c[p].get('passed_but_wrong_faint', float('nan')):.1f}%)" for p in paths]
        out.append(f"| {CONDITIONS.get(cond, cond)} | " + " | ".join(cells) + " |")
    return out + [""]


def held_out_command_tables(name, res):
    """Markdown for one ``bench_retrieval.py --held-out`` JSON: the whole default command against the NumPy loop."""
    p = res.get("protocol", {})
    out = _head(name, res,
                (f"The whole default `cdinn reconstruct` ({p.get('iterations', '?')} iterations per run, up to "
                 f"{p.get('starts', '?')} runs) on {_f(res.get('count'))} patterns per held-out set (process start, "
                 f"imports and I/O included; seed {res.get('seed', '?')} + the set's index), against the paper's "
                 "protocol as the plain NumPy loop run once per pattern (one 620-iteration run, one core) on "
                 f"{'the first ' + _f(res['numpy_count']) if res.get('numpy_count') else 'all'} of them. Quality on those same "
                 "patterns: phase RMS rad median (p90) / IoU median."),
                ("set", "`cdinn reconstruct` ms per pattern", "NumPy ms per pattern", "speed-up", "restarted",
                 "runs per pattern", "`cdinn reconstruct`", "NumPy protocol", "equal or better (median, p90, IoU)"))
    conds = res.get("conditions", {})
    for key in [k for k in CONDITIONS if k in conds] + [k for k in conds if k not in CONDITIONS]:
        c = conds[key]
        cmd, npy, sub = c.get("command", {}), c.get("numpy", {}), c.get("command_on_numpy_subset", {})
        ok = c.get("at_least_numpy", {})
        ok = ", ".join("yes" if ok.get(k) else "no" for k in ("phase_rms_median", "phase_rms_p90", "iou_median"))
        out.append(f"| {CONDITIONS.get(key, key)} | {_f(cmd.get('ms_per_pattern'))} | {_f(npy.get('ms_per_pattern'))} "
                   f"| {_f(c.get('speedup'))}x | {_pct(cmd.get('restarted'))} | {_f(cmd.get('runs_per_pattern'))} "
                   f"| {_q(sub)} | {_q(npy)} | {ok} |")
    out.append("")
    return out


def retrieval_tables(name, res):
    """Markdown for one ``bench_retrieval.py`` JSON: the batched engine, the NumPy loop and cohere-core."""
    sub = res.get("numpy_count")
    out = _head(name, res,
                (f"{res.get('protocol', '')}; {_f(res.get('count'))} fresh paper-recipe patterns (2x oversampled, "
                 f"seed {res.get('seed', '?')}) for the batched engine, the first {_f(sub)} of them for the NumPy "
                 "loop and cohere-core (one pattern at a time, one core). Quality after removing twin, shift and "
                 "global phase: phase RMS rad median (p90) / IoU median."),
                ("engine", "patterns", "ms per pattern", "runs per pattern", "ms per run", "speed-up per run",
                 "quality", f"quality on the first {_f(sub)}"))
    base = res.get("numpy_ms_per_run")
    coh = res.get("cohere", {})
    rows = [("batched torch engine", res.get("count"), res.get("torch_ms_per_pattern"), res.get("torch_runs_per_pattern"),
             res.get("torch_ms_per_run"), res.get("quality_torch", {}), res.get("quality_torch_on_numpy_subset", {})),
            ("NumPy loop", sub, res.get("numpy_ms_per_pattern"), res.get("numpy_runs_per_pattern"), base, {},
             res.get("quality_numpy", {}))]
    if coh.get("available"):
        rows.append((f"cohere-core {coh.get('version', '')} ({coh.get('backend', '?')} back end)", coh.get("count"),
                     coh.get("ms_per_pattern"), coh.get("runs_per_pattern"), coh.get("ms_per_run"), {},
                     coh.get("quality", {})))
    for label, n, ms, runs, per_run, q, qsub in rows:
        speed = f"{_f(base / per_run)}x" if base and per_run else "–"
        out.append(f"| {label} | {_f(n)} | {_f(ms)} | {_f(runs)} | {_f(per_run)} | {speed} "
                   f"| {_q(q) if q else '–'} | {_q(qsub)} |")
    out += ["", (f"One engine iteration costs {_f(res.get('iteration_over_fft_pair'))} FFT pairs "
                 f"({_f(1e6 * res.get('iteration_s_per_pattern', float('nan')))} us against "
                 f"{_f(1e6 * res.get('fft_pair_s_per_pattern', float('nan')))} us per pattern, batch {res.get('batch', '?')}, "
                 "one core)." + ("" if coh.get("available") else f" cohere-core: {coh.get('note', 'not run')}.")), ""]
    return out


def simulate_stream_tables(simulate, stream):
    """Markdown for the ``bench_simulate.py`` and ``bench_stream.py`` JSONs: one row each."""
    out = []
    for name, res in simulate:
        shape = " x ".join(str(v) for v in res.get("pattern_shape", ()))
        out += _head(name, res, "The simulator (`napari_cdinn.simulate`, the paper's recipe).",
                     ("examples", "pattern", "seconds", "examples per s"))
        out += [f"| {_f(res.get('count'))} | {shape} | {_f(res.get('seconds'))} | {_f(res.get('examples_per_s'))} |", ""]
    for name, res in stream:
        t = res.get("targets", {})
        out += _head(name, res,
                     (f"`cdinn predict` h5 -> h5 on {_f(res.get('frames'))} frames ({_f(res.get('stack_mb'))} MB) streamed "
                      f"by chunk against the same stack in memory. Targets: peak memory <= "
                      f"{_f(t.get('streamed_peak_rss_mb_max'))} MB, >= {_f(t.get('throughput_ratio_min'))} of the "
                      "in-memory rate."),
                     ("run", "frames per s", "peak RSS MB", "of the in-memory rate"))
        out += [f"| streamed | {_f(res.get('streamed_frames_per_s'))} | {_f(res.get('streamed_peak_rss_mb'))} "
                f"| {_f(res.get('throughput_ratio'))} |",
                f"| in memory | {_f(res.get('in_memory_frames_per_s'))} | {_f(res.get('in_memory_peak_rss_mb'))} | 1 |", ""]
    return out


def speed_tables(name, res):
    """Markdown for one bench_speed JSON: cold commands, the dock's warm frame and the network, idle and busy."""
    t = res.get("targets", {})
    out = _head(name, res,
                (f"{res.get('patterns', '')}; wall seconds, median of {res.get('repeats', '?')} runs (fresh processes "
                 f"for the cold commands). Targets: one pattern cold in {_f(t.get('cold_predict_1_s'))} s, the dock's "
                 f"first frame in {_f(t.get('warm_first_frame_s'))} s once the model is loaded. *busy*: beside a "
                 "process that keeps one core busy."),
                ("condition", "load (1 min)", "policy threads", "cold predict 1 / 256 / 4,096",
                 "cold reconstruct --init nn 1 / 256", "dock first frame ms",
                 "network ms per pattern: policy / 2 threads"))
    for cond, c in res.get("conditions", {}).items():
        cold = " / ".join(_f(v.get("median_s")) for v in c.get("cold_predict", {}).values())
        rec = " / ".join(_f(v.get("median_s")) for v in c.get("cold_reconstruct", {}).values())
        warm, net = c.get("warm_first_frame", {}), c.get("network", {})
        first = _f(1e3 * warm["median_s"]) if "median_s" in warm else "-"
        out.append(f"| {cond} | {_f(c.get('load_1min'))} | {c.get('policy_threads', '?')} | {cold} | {rec} | {first} "
                   f"| {_f(net.get('policy_ms_per_pattern'))} / {_f(net.get('threads2_ms_per_pattern'))} |")
    out.append("")
    return out


def rank_tables(name, res):
    """Markdown for one ``bench_adapt.py --rank`` JSON: the base network alone on every candidate set, worst first."""
    out = _head(name, res,
                (f"`{res.get('base', '?')}` alone on {_f(res.get('test_count'))} 2x-oversampled patterns per candidate "
                 f"set (seed {res.get('seed', '?')} + the set's index), worst IoU first."),
                ("set", "IoU median", "phase RMS rad median (p90)", "chi^2 median", "trusted"))
    for key in res.get("worst_first", []):
        c = res["candidates"][key]
        out.append(f"| {key} | {_f(c.get('iou_median'))} | {_f(c.get('phase_rms_median'))} "
                   f"({_f(c.get('phase_rms_p90'))}) | {_f(c.get('chi2_median'))} | {_pct(c.get('trusted_fraction'))} |")
    out.append("")
    return out


def adapt_tables(name, res):
    """Markdown for one ``bench_adapt.py`` JSON: base against adapted on each weak set and on the paper set."""
    out = _head(name, res,
                (f"`{res.get('base', '?')}` adapted for at most {_f(res.get('time_limit_min'))} minutes on "
                 f"{_f(res.get('count'))} unlabelled patterns per weak set, scored with the truth on "
                 f"{_f(res.get('test_count'))} separate patterns of the set and of the paper's noise-free objects. "
                 "Each cell: base -> adapted. Targets: IoU +0.03 or phase RMS -0.03 rad on the set, the held-out "
                 "chi^2 down, the paper set's IoU at most 0.01 lower."),
                ("set", "IoU", "phase RMS rad median", "paper IoU", "held-out chi^2", "steps (best; ended)",
                 "targets"))
    for key, c in res.get("sets", {}).items():
        w, p, h, t = c.get("weak", {}), c.get("paper", {}), c.get("holdout_chi2", {}), c.get("targets", {})

        def arrow(d, k):
            return f"{_f(d.get('base', {}).get(k))} -> {_f(d.get('adapted', {}).get(k))}"

        met = "met" if t.get("gain_met") and t.get("chi2_down") and t.get("paper_kept") else "missed"
        steps = f"{c.get('steps', '?')} ({c.get('best_step', '?')}; {c.get('ended', '?')})"
        out.append(f"| {key} | {arrow(w, 'iou_median')} | {arrow(w, 'phase_rms_median')} | {arrow(p, 'iou_median')} "
                   f"| {_f(h.get('before'))} -> {_f(h.get('after'))} | {steps} | {met} |")
    out.append("")
    return out


def prepare_tables(name, res):
    """Markdown for one bench_prepare JSON: the centre's error by frames summed, and what a wrong centre costs."""
    kinds = list(res.get("centre", {}))
    counts = list(next(iter(res["centre"].values()), {})) if kinds else []
    out = _head(name, res,
                (f"Frames on a {' x '.join(map(str, res.get('chip', [])))} chip, the beam at "
                 f"{tuple(res.get('beam', []))} under a beamstop, two gaps (realistic_detector: besides, the "
                 "`realistic` detector's per-frame beamstops, gaps and saturated peaks). Centre: exact fraction / "
                 "largest error (px) over the seeds, by frames in the stack."),
                ("frames", *kinds))
    for n in counts:
        cells = [f"{_pct(res['centre'][k][n]['exact'])} / {_f(res['centre'][k][n]['max_px'])}" for k in kinds]
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    out += ["", ("What a wrong centre costs (realistic mixture at 1e5 photons, 64 x 64, nothing masked; "
                 "IoU / phase RMS rad medians after centring and ramp removal):"), "",
            "| centre off (px) | network as `predict` runs it (re-centred by): trusted, IoU / phase | network as cut "
            "| default reconstruct: chi^2, IoU / phase |",
            "|---|---|---|---|"]

    def net(n):
        return f"{_pct(n['trusted'])}, {_f(n['iou'])} / {_f(n['phase_rms'])}"

    for off, c in res.get("offset", {}).items():
        n, r = c["network"], c["retrieval"]
        by = f" ({', '.join(map(str, n['recentred']))})" if n.get("recentred") else ""
        cut = net(c["network_as_cut"]) if "network_as_cut" in c else "–"
        out.append(f"| {off} | {net(n)}{by} | {cut} | {_f(r['chi2'])}, {_f(r['iou'])} / {_f(r['phase_rms'])} |")
    sp = res.get("speed", {})
    out += ["", f"The centre of one {' x '.join(map(str, sp.get('shape', [])))} frame (EIGER 4M): "
            f"{_f(sp.get('eiger4m_frame_s'))} s.", ""]
    return out


def render(results=RESULTS):
    results = Path(results)
    out = ["<!-- Generated by `python benchmarks/tables.py --write` from benchmarks/results/*.json. -->", "",
           "## CDI NN (bench_nn.py)", ""]
    files = sorted(results.glob("bench_nn_*.json"))
    for path in files:
        out += nn_tables(path.name, json.loads(path.read_text()))
    if not files:
        out += ["*(no `bench_nn_*.json` in benchmarks/results yet)*", ""]
    out += ["## Real detector data (bench_realistic.py)", "", f"```bash\n{REALISTIC_COMMAND}\n```", ""]
    files = sorted(results.glob("bench_realistic_*.json"))
    for path in files:
        out += realistic_tables(path.name, json.loads(path.read_text()))
    if not files:
        out += [("*(not measured yet: the table is generated from `benchmarks/results/bench_realistic_cpu2.json` "
                "once the command above has written it)*"), ""]
    engine = [p for p in sorted(results.glob("bench_retrieval_*.json")) if "heldout" not in p.name]
    simulate = [(p.name, json.loads(p.read_text())) for p in sorted(results.glob("bench_simulate_*.json"))]
    stream = [(p.name, json.loads(p.read_text())) for p in sorted(results.glob("bench_stream_*.json"))]
    if engine or simulate or stream:
        out += ["## Simulator, retrieval engine, streaming (bench_simulate.py, bench_retrieval.py, bench_stream.py)", "",
                f"```bash\n{ENGINE_COMMANDS}\n```", ""]
    for path in engine:
        out += retrieval_tables(path.name, json.loads(path.read_text()))
    out += simulate_stream_tables(simulate, stream)
    restarts = sorted(results.glob("select_restarts_*.json")), sorted(results.glob("bench_retrieval_heldout_*.json"))
    out += ["## Restarts (select_restarts.py, bench_retrieval.py --held-out)", "", f"```bash\n{RESTARTS_COMMANDS}\n```", ""]
    for path in restarts[0]:
        out += select_restarts_tables(path.name, json.loads(path.read_text()))
    for path in restarts[1]:
        out += held_out_command_tables(path.name, json.loads(path.read_text()))
    if not restarts[1]:
        out += [("*(the whole command per held-out set is not measured yet: the table is generated from "
                 "`benchmarks/results/bench_retrieval_heldout_cpu2.json` once the second command above has written "
                 "it on the free 2-core CPU)*"), ""]
    files = sorted(results.glob("bench_verdict_*.json"))
    if files:
        out += ["## Can a frame's verdict be believed? (bench_verdict.py)", "", f"```bash\n{VERDICT_COMMAND}\n```", ""]
    for path in files:
        out += verdict_tables(path.name, json.loads(path.read_text()))
    files = sorted(results.glob("bench_large_*.json"))
    if files:
        out += ["## Larger objects (bench_large.py)", "", f"```bash\n{LARGE_COMMAND}\n```", ""]
    for path in files:
        out += large_tables(path.name, json.loads(path.read_text()))
    files = sorted(results.glob("bench_adapt_*.json"))
    if files:
        out += ["## Adapting to a stack (bench_adapt.py)", "", f"```bash\n{ADAPT_COMMANDS}\n```", ""]
    for path in files:
        res = json.loads(path.read_text())
        out += rank_tables(path.name, res) if "candidates" in res else adapt_tables(path.name, res)
    files = sorted(results.glob("bench_prepare_*.json"))
    if files:
        out += ["## Preparing detector frames (bench_prepare.py)", "", f"```bash\n{PREPARE_COMMAND}\n```", ""]
    for path in files:
        out += prepare_tables(path.name, json.loads(path.read_text()))
    files = sorted(results.glob("bench_speed_*.json"))
    if files:
        out += ["## Speed where users run it (bench_speed.py)", "", f"```bash\n{SPEED_COMMAND}\n```", ""]
    for path in files:
        out += speed_tables(path.name, json.loads(path.read_text()))
    return "\n".join(out).rstrip() + "\n"


def write(text, readme=README):
    """Replace the generated part of ``readme`` (between the markers) by ``text``."""
    doc = Path(readme).read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"error: {readme} lacks the markers {BEGIN} and {END}")
    head, rest = doc.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    Path(readme).write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(RESULTS), help="folder of the JSON results")
    p.add_argument("--write", action="store_true", help=f"write the tables into {README.relative_to(HERE.parent)}")
    args = p.parse_args(argv)
    text = render(args.results)
    if args.write:
        write(text)
        print(f"wrote {README}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
