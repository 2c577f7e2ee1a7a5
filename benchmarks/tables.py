"""Markdown tables of the benchmark results stored in benchmarks/results/*.json.

Usage (from the repository root; needs only the standard library)::

    python benchmarks/tables.py            # print the tables
    python benchmarks/tables.py --write    # put them into benchmarks/README.md, between its markers

Reads ``bench_nn_*.json`` (``benchmarks/bench_nn.py --json``) and ``bench_realistic_*.json``
(``benchmarks/bench_realistic.py --json``).  ``--write`` replaces the text between
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
REALISTIC_COMMAND = ("python benchmarks/bench_realistic.py --threads 1 "
                     "--json benchmarks/results/bench_realistic_cpu2.json")
LARGE_COMMAND = "python benchmarks/bench_large.py --threads 1 --count 100 --json benchmarks/results/bench_large_cpu1.json"


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
    where = f"{m.get('cpu_count', '?')}-core CPU" if device == "cpu" else f"{device} ({m.get('cpu_count', '?')} vCPUs)"
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
           (f"Model: {_model(res)}; {_f(res.get('count'))} 2x-oversampled patterns per set (seed {res.get('seed', '?')} "
            f"+ the set's index); protocol: {res.get('iterations', '?')} iterations; *scale*: the coarser pixel size "
            "the size policy read the objects at."), "",
           "Each cell: IoU / phase RMS rad median (p90), then chi^2 median; speed-ups against the NumPy loop.", "",
           ("| set | scale | network alone | refined | protocol (620 it.) | ms per pattern: network / refined / "
            "protocol / NumPy | speed-up: network / whole `cdinn predict` / refined |"),
           "|---|---|---|---|---|---|---|"]
    for key, c in res.get("conditions", {}).items():
        net, ref, pro = c.get("network", {}), c.get("refined", {}), c.get("protocol", {})
        cells = [f"{_cell(q)}, {_f(q.get('chi2_median'))}" for q in (net, ref, pro)]
        out.append(f"| {key} | {c.get('scale', '?')} | {' | '.join(cells)} | {_f(net.get('ms_per_pattern'))} / "
                   f"{_f(ref.get('ms_per_pattern'))} / {_f(pro.get('ms_per_pattern'))} / "
                   f"{_f(c.get('numpy_ms_per_pattern'))} | {_f(net.get('speedup_vs_numpy'))} / "
                   f"{_f(net.get('cli_speedup_vs_numpy'))} / {_f(ref.get('speedup_vs_numpy'))} |")
    out.append("")
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
    files = sorted(results.glob("bench_large_*.json"))
    if files:
        out += ["## Larger objects (bench_large.py)", "", f"```bash\n{LARGE_COMMAND}\n```", ""]
    for path in files:
        out += large_tables(path.name, json.loads(path.read_text()))
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
