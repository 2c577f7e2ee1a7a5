"""The ``cdinn`` command line (no Qt, no napari import).

Every sub-command is a function ``_cmd_<name>(args)``; bad input raises :class:`UsageError`
(or ``ValueError``/``OSError`` from the core), which :func:`main` turns into one line
``error: ...`` on stderr and exit code 2.  Outputs are written to a temporary name and renamed
at the end (:func:`napari_cdinn.io.atomic_output`), so a failed run never overwrites a file.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["UsageError", "build_parser", "main"]


class UsageError(Exception):
    """Bad arguments or bad input: reported as one ``error: ...`` line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one ``error: ...`` line and exit code 2."""

    def error(self, message):
        raise UsageError(message)


def _number(kind, minimum, inclusive, what, below=float("inf")):
    """An argparse type: ``kind`` (int or float) finite, above ``minimum`` (or equal if inclusive), below ``below``."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        ok = value is not None and value < below and (value >= minimum if inclusive else value > minimum)
        if not ok:  # NaN fails both comparisons
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, 1, True, "a positive integer")
_positive_float = _number(float, 0.0, False, "a positive number")
_non_negative_float = _number(float, 0.0, True, "a number >= 0")
_non_negative_int = _number(int, 0, True, "an integer >= 0")
_level = _number(float, 0.0, False, "a fraction in (0, 1]", below=1.0 + 1e-9)


# --------------------------------------------------------------------------- threads
#: Help of ``--threads`` (every command that computes).
_THREADS_HELP = ("CPU threads (default: the free cores, those of the CPU affinity that other processes do not keep "
                 "busy; OMP_NUM_THREADS if set)")


def _thread_count(text):
    """``--threads N``: a whole number from 1 to the cores this process may use (affinity, CPU quota)."""
    from .device import usable_cores

    value = _positive_int(text)
    if value > usable_cores():
        raise argparse.ArgumentTypeError(f"expected at most the {usable_cores()} core(s) this process may use, "
                                         f"got {text!r}")
    return value


def _add_threads(p):
    p.add_argument("--threads", type=_thread_count, default=None, metavar="N", help=_THREADS_HELP)


#: The running command's state: its start (``cpu_sample``) and how to restore the threads it set.
_RUN: dict = {}


def _use_threads(args):
    """Set torch's threads for the running command, once: ``--threads``, else the free cores measured since
    the command started (:func:`napari_cdinn.device.apply_threads`); :func:`_main` restores them at its end.
    Returns the count; None for a job on the NumPy engine (``args.numpy_engine``), which leaves torch
    unimported and NumPy's threads as they are (docs/decisions.md, "Cold start: small CPU jobs run in NumPy")."""
    import contextlib

    from .device import threads_applied

    if getattr(args, "numpy_engine", False):
        return None
    if _RUN.get("threads") is None:
        stack = contextlib.ExitStack()
        try:
            _RUN["threads"] = stack.enter_context(threads_applied(getattr(args, "threads", None),
                                                                  since=_RUN.get("start")))
        except ValueError as exc:
            raise UsageError(f"--threads: {exc}") from None
        _RUN["restore"] = stack.close
    return _RUN["threads"]


def _restore_threads():
    """Undo :func:`_use_threads` (a command run in-process leaves torch's threads as it found them)."""
    restore = _RUN.pop("restore", None)
    _RUN.pop("threads", None)
    if restore is not None:
        restore()


# --------------------------------------------------------------------------- simulate
def _add_simulate(sub):
    p = sub.add_parser(
        "simulate",
        help="simulate objects and their diffraction patterns as a detector records them",
        description="Simulate the paper's data (convex-hull shapes, sine/Gaussian phases), or other object "
        "families, through an optional detector model (counting noise, background, beamstop, gaps, saturation), "
        "and write intensity, amplitude and phase (the truth), mask (True = unmeasured) and photons to an NPZ file.",
    )
    p.add_argument("--count", type=_positive_int, required=True, help="number of examples")
    p.add_argument("--size", type=_positive_int, default=32, help="object frame side in pixels (default 32)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument("--oversampling", type=_positive_int, default=1, help="zero-padding factor (default 1)")
    p.add_argument("--families", default=None, choices=("paper", "textured", "holes", "realistic"),
                   help="objects: paper (default: convex, flat), textured (varying amplitude inside), holes "
                        "(non-convex with holes) or realistic (a mix of the three)")
    p.add_argument("--detector", default=None, choices=("ideal", "realistic"),
                   help="detector preset: ideal (default) or realistic (the training mixture: 1e3-1e9 photons, "
                        "background, beamstop, gaps, saturation, drawn per pattern); the options below override it")
    p.add_argument("--photons", type=_positive_float, default=None, help="total photons per pattern (Poisson noise)")
    p.add_argument("--background", type=_non_negative_float, default=0.0,
                   help="mean flat background in photons per pixel, with --photons (default 0)")
    p.add_argument("--beamstop", type=_non_negative_float, default=0.0, help="radius of a masked central disc (pixels)")
    p.add_argument("--gaps", type=_positive_int, default=None, metavar="WIDTH",
                   help="detector gaps: a row and a column band of this width (pixels) at random offsets, unmeasured")
    p.add_argument("--saturation", type=_level, default=None, metavar="F",
                   help="pixels above this fraction (0..1) of the frame's brightest count saturate (unmeasured)")
    p.add_argument("--offset", type=_non_negative_float, default=None, metavar="PX",
                   help="cut every pattern off-centre: its zero frequency up to PX pixels from the centre pixel per "
                        "axis, drawn uniformly (the objects written carry the matching phase ramp)")
    p.add_argument("--out", "-o", required=True, help="output .npz file")
    _add_threads(p)
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args):
    from . import io
    from . import simulate as sim
    from .device import free_cores
    from .simulate import simulate

    if not args.out.lower().endswith(".npz"):
        raise UsageError(f"--out must be an .npz file, got {args.out!r}")
    if args.size < 8:
        raise UsageError("--size must be at least 8 pixels")
    side = args.size * args.oversampling
    limits = (("--photons", args.photons, sim.MAX_PHOTONS, "photons per pattern (what a Poisson draw takes)"),
              ("--background", args.background, sim.MAX_PHOTONS, "photons per pixel (what a Poisson draw takes)"),
              ("--beamstop", args.beamstop, side, f"pixels, the side of the {side} x {side} patterns"),
              ("--offset", args.offset, side / 2, f"pixels, half the side of the {side} x {side} patterns"))
    for flag, value, most, what in limits:
        if value is not None and value > most:
            raise UsageError(f"{flag} {value:g} is too large: at most {most:g} {what}")
    io.check_writable(args.out)
    # intensity and mask (side^2), amplitude and phase (size^2): all held until written, and a margin
    each, budget = int(1.25 * (5 * side * side + 8 * args.size * args.size)), io.memory_budget()
    if args.count * each > budget:
        raise UsageError(f"--count {args.count} patterns of {side} x {side} need about "
                         f"{io.format_bytes(args.count * each)} in memory, more than the memory budget of "
                         f"{io.format_bytes(budget)} (at most {budget // each} per file; CDINN_MEMORY sets the budget)")
    # the simulator's FFT threads (no torch here): --threads, else the free cores
    before, sim.FFT_WORKERS = sim.FFT_WORKERS, args.threads or free_cores(since=_RUN.get("start"))
    try:
        data = simulate(
            args.count,
            size=args.size,
            seed=args.seed,
            oversampling=args.oversampling,
            photons=args.photons,
            beamstop=args.beamstop,
            families=args.families,
            detector=_simulate_detector(args),
        )
    finally:
        sim.FFT_WORKERS = before
    io.write_npz(args.out, data)
    shape = data["intensity"].shape
    print(f"wrote {args.out}: {shape[0]} patterns of {shape[1]} x {shape[2]}", file=sys.stderr)


def _simulate_detector(args):
    """The :class:`napari_cdinn.simulate.Detector` of ``cdinn simulate``'s options (None: ideal)."""
    import dataclasses

    from .simulate import DETECTORS

    det = DETECTORS[args.detector or "ideal"]
    if args.background and args.photons is None and det.photons is None:
        raise UsageError("--background needs --photons (a background is counted with the signal)")
    changes = {}
    if args.background:
        changes.update(background=(args.background, args.background), background_rate=1.0)
    if args.gaps:
        changes.update(gaps=1.0, gap_width=(args.gaps, args.gaps))
    if args.saturation is not None:
        changes.update(saturation=1.0, saturation_level=(args.saturation, args.saturation))
    if args.offset is not None:
        changes.update(offset=args.offset, offset_rate=1.0)
    return dataclasses.replace(det, **changes)


# --------------------------------------------------------------------------- bench
def _add_bench(sub):
    p = sub.add_parser(
        "bench",
        help="run the project's benchmarks and write one JSON",
        description="Run the benchmarks under benchmarks/ (simulator rate, NN patterns/s across batch sizes, "
        "retrieval speed against the NumPy loop, streaming rate and peak memory) and write one JSON "
        "naming the machine and device. Runs from a source checkout (the benchmarks folder beside src/).",
    )
    p.add_argument("--json", default=None, help="write all figures to this JSON file")
    p.add_argument("--only", action="append", default=None, help="run only this benchmark (repeatable)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every benchmark")
    _add_threads(p)
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args):
    import importlib.util
    import json
    from pathlib import Path

    from . import io

    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    if not folder.is_dir():
        raise UsageError("cdinn bench runs from a source checkout: the benchmarks folder was not found")
    scripts = sorted(folder.glob("bench_*.py"))
    names = [s.stem[len("bench_"):] for s in scripts]
    wanted = args.only or names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise UsageError(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(names)}")
    if args.json:
        io.check_writable(args.json)
    _use_threads(args)
    results = {}
    for script, name in zip(scripts, names):
        if name not in wanted:
            continue
        spec = importlib.util.spec_from_file_location(f"cdinn_bench_{name}", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(f"== {name}", file=sys.stderr)
        results[name] = module.run(**(module.QUICK if args.quick and hasattr(module, "QUICK") else {}))
        print(json.dumps(module.summary(results[name]) if hasattr(module, "summary") else results[name],
                         indent=1, default=str)[:2000])
    if args.json:
        io.write_json(args.json, results)
        print(f"wrote {args.json}", file=sys.stderr)


# --------------------------------------------------------------------------- train
def _train_config_fields():
    """``(field, flag)`` of the TrainConfig fields ``cdinn train`` sets (torch-free import)."""
    from .nn import cli_fields

    return cli_fields()


def _train_help(f):
    """A field's help, with its value in each preset where they differ, else its default."""
    from .nn import PRESETS

    def show(value):
        return f"{value:g}" if isinstance(value, float) else str(value)

    values = {name: getattr(preset, f.name) for name, preset in PRESETS.items()}
    if f.name == "preset":
        text = f"{f.metadata['help']}: {' or '.join(PRESETS)} (default {f.default})"
    elif len(set(values.values())) > 1:
        text = f"{f.metadata['help']} ({', '.join(f'{name}: {show(value)}' for name, value in values.items())})"
    elif f.default is None or f.default is False:
        text = f.metadata["help"]
    else:
        text = f"{f.metadata['help']} (default {show(f.default)})"
    return text.replace("%", "%%")


def _train_argument(f):
    """argparse keywords (action or type, choices, metavar) for a TrainConfig field, checked as the config checks it."""
    from .nn import check_option, describe_option

    meta = f.metadata
    if meta["kind"] is bool:
        return {"action": argparse.BooleanOptionalAction}

    def parse(text):
        try:
            return check_option(f.name, meta["kind"](text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {describe_option(f.name)}, got {text!r}") from None

    out = {"type": parse, "metavar": meta["metavar"]}
    if meta["choices"]:
        out.update(choices=meta["choices"], metavar=None)
    return out


def _add_train(sub):
    p = sub.add_parser(
        "train",
        help="train the CDI NN networks on simulated data",
        description="Train the CDI NN networks (shape and phase) on the paper's simulated data with a "
        "twin-invariant loss; checkpoints (safetensors) go to the model directory --out, every few "
        "minutes and every epoch; --resume continues from them. Progress is printed on stderr.",
    )
    p.add_argument("--out", "-o", required=True, help="model directory (created)")
    for f, flag in _train_config_fields():  # the recipe: one option per TrainConfig field
        p.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=_train_help(f), **_train_argument(f))
    # how and where the run happens, not what it learns (not part of the recipe)
    p.add_argument("--checkpoint-minutes", type=_positive_float, default=5.0, help="minutes between checkpoints")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    _add_threads(p)
    p.add_argument("--data-workers", type=_non_negative_int, default=None, metavar="N",
                   help="processes simulating examples ahead of the network (default: 0 on a CPU, "
                        "up to 8 beside a GPU); the examples do not depend on it")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoints in --out (their settings; --epochs, --time-limit, "
                        "--average-from and --precision, if given, change them)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args):
    import shlex
    import signal
    import threading

    from .nn import PRESETS, TrainConfig, train
    from .nn.config import run_files

    options = {f.name: getattr(args, f.name) for f, _ in _train_config_fields() if hasattr(args, f.name)}
    preset = options.pop("preset", "paper")
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    TrainConfig.from_preset(preset, **options)  # a bad combination fails here, before anything starts
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a file, not a folder: give the model folder to write the "
                         "checkpoints to (created if new)")
    if args.resume:
        if not os.path.isdir(args.out):
            raise UsageError(f"--resume: the model directory {args.out!r} does not exist (run without --resume to start)")
        if not os.path.isfile(os.path.join(args.out, "last.json")):
            print(f"no checkpoint in {args.out}: a new run starts", file=sys.stderr)
    elif run_files(args.out):  # a new run would overwrite its checkpoints
        raise UsageError(f"--out {args.out!r} already holds a training run: pass --resume to continue it, or choose "
                         "a new folder")
    _use_threads(args)

    def progress(ev):
        kind = ev["event"]
        loss = ev.get("train_loss")
        head = f"epoch {ev['epoch']} step {ev['step']} examples {ev['examples']} t {ev['elapsed_s']:.0f}s"
        if kind == "step" and ev["step"] % 200 == 0:
            print(f"{head} loss {loss:.4f} lr {ev['lr']:.2e} {ev['examples_per_s']:.0f} ex/s", file=sys.stderr, flush=True)
        elif kind in ("checkpoint", "validation"):
            m = ev["metrics"]
            print(f"{head} {kind} val_loss {ev['val_loss']:.4f} iou {m['iou_median']:.3f} phase_rms "
                  f"{m['phase_rms_median']:.3f} p90 {m['phase_rms_p90']:.3f} chi2 {m.get('chi2_median', float('nan')):.4f} "
                  f"twin {m['twin_rate']:.2f} (n={m['count']})",
                  file=sys.stderr, flush=True)
            if "average_metrics" in ev:
                a = ev["average_metrics"]
                print(f"{head} average of {ev['averaged_steps']} steps: iou {a['iou_median']:.3f} phase_rms "
                      f"{a['phase_rms_median']:.3f} p90 {a['phase_rms_p90']:.3f} chi2 {a['chi2_median']:.4f}",
                      file=sys.stderr, flush=True)
        elif kind in ("start", "stopped", "done"):
            why = " (time limit)" if ev.get("ended") == "time limit" else ""
            print(f"{head} {kind}{why}", file=sys.stderr, flush=True)

    # SIGINT/SIGTERM stop training cleanly: a checkpoint is saved, --resume continues from it
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        train(args.out, preset, device=args.device, resume=args.resume, callback=progress, stop=stop,
              checkpoint_minutes=args.checkpoint_minutes, data_workers=args.data_workers,
              command="cdinn " + shlex.join(sys.argv[1:]), **options)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- stacks
#: Help of ``--mask`` (predict, reconstruct, adapt).
_MASK_HELP = ("unmeasured pixels (True/nonzero = unmeasured), (H, W) or (N, H, W), in any input format (.npz key or "
              ".h5 dataset 'mask'); default: the input's own mask, if it has one")


def _add_stack_options(p, what, device=True):
    """Input, output and streaming options shared by the commands that work through a stack
    (``device=False``: a NumPy command, with neither ``--device`` nor ``--threads``)."""
    p.add_argument("input", help=f"intensities: .npy, .npz, .tif, .h5 (an Eiger master file too), .nxs, .cxi, .cbf, .edf, or a folder or quoted pattern ('scan_*.cbf') of one-frame files ({what})")
    p.add_argument("-o", "--out", required=True, help="output .npz, or .h5/.cxi (written as the job streams)")
    if device:
        p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--chunk-size", type=_positive_int, default=4096, help="frames read and written at once")
    p.add_argument("--scheduler", default=None,
                   help="address of a dask.distributed scheduler to run the chunks on (e.g. tcp://host:8786)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted .h5/.cxi run, skipping the chunks it finished")
    p.add_argument("--memory", default=None, metavar="SIZE",
                   help="memory budget that bounds chunk and batch sizes, e.g. 512M or 4G (default: $CDINN_MEMORY, "
                        "else 1G)")
    p.add_argument("--scheduler-timeout", type=_positive_float, default=60.0, metavar="S",
                   help="seconds a --scheduler cluster may go without workers or without answering (default 60)")
    p.add_argument("--mask", default=None, metavar="FILE", help=_MASK_HELP)
    if device:
        _add_threads(p)
    else:
        p.set_defaults(device="cpu", numpy_engine=True)


def _check_stack_input(args):
    """Validate input, mask and output before any work; return the input's shape.

    Sets ``args.mask_array``: the ``--mask`` file's mask, else the input's own (announced on
    stderr), else None.  NaN/inf pixels of the data are unmeasured too (the core adds them).
    """
    import os

    from . import io
    from .device import device_name

    if not io.input_exists(args.input):
        raise UsageError(f"the input file {args.input!r} does not exist")
    if os.path.splitext(args.out)[1].lower() not in io.RESULT_EXTENSIONS:
        raise UsageError(f"--out must end in one of {', '.join(io.RESULT_EXTENSIONS)}, got {args.out!r}")
    io.check_writable(args.out)
    io.check_not_input(args.out, args.input, args.mask, what="--out")
    args.memory = io.memory_budget(args.memory)
    shape = io.stack_shape(args.input)
    io.frames_in_budget(shape[-2:], args.memory, what=repr(os.path.basename(args.input)))
    device_name(args.device)  # no torch import where the device is evidently the CPU
    _input_mask(args, shape)
    return shape


def _input_mask(args, shape):
    """The unmeasured pixels of the input stack: ``--mask``'s, else the input's own (announced), else None.

    Also sets ``args.mask_array`` (the mask) and ``args.mask_source`` (where it came from).
    """
    from . import io

    args.mask_array = None
    if args.mask is not None:
        if os.path.isdir(args.mask):
            raise UsageError(f"--mask {args.mask!r} is a folder; give the mask file")
        if not os.path.isfile(args.mask):
            raise UsageError(f"the mask file {args.mask!r} does not exist")
        args.mask_array = io.read_mask(args.mask, shape)
        args.mask_source = os.path.basename(args.mask)
    else:
        own = io.file_mask(args.input, shape)
        if own is not None and own.any():
            args.mask_array = own
            args.mask_source = f"the input {os.path.basename(args.input)}"
            counts = own.reshape(-1, *own.shape[-2:]).sum(axis=(1, 2))
            varies = " on average" if counts.min() < counts.max() else ""
            print(f"using the mask in {os.path.basename(args.input)} ({round(float(counts.mean()), 1):g} "
                  f"unmeasured pixels per frame{varies})", file=sys.stderr)
    return args.mask_array


class _Progress:
    """A one-line progress bar on stderr: frames done, rate and time left.

    A listener of :class:`napari_cdinn.jobs.ProgressEvent`; :func:`napari_cdinn.jobs.progress_events`
    turns it into the ``progress(done, total)`` callback of the core.
    """

    #: True while a progress line is unfinished (an error message then starts on a new line).
    open_line = False

    def __init__(self, label):
        self.label = label
        self.t0 = None
        self.last = 0.0

    def __call__(self, event):
        import time

        done, total = event.done, event.total
        now = time.perf_counter()
        if self.t0 is None:
            self.t0, self.first = now, done
        if done < total and (done == self.first or now - self.last < 0.5):
            return
        self.last = now
        rate = (done - self.first) / max(now - self.t0, 1e-9)
        left = (total - done) / rate if rate > 0 else float("nan")
        width = 30
        bar = "#" * int(width * done / max(total, 1))
        end = "\n" if done >= total else ""
        pace = f", {rate:.0f}/s, {left:.0f} s left" if rate > 0 else ""  # nothing timed before one call
        print(f"\r{self.label} [{bar:<{width}}] {done}/{total} frames{pace} ", end=end, file=sys.stderr, flush=True)
        _Progress.open_line = done < total


def _run_stack(args, fn, options, attrs, label):
    """Stream a chunk function over the input stack with progress on stderr; report the result."""
    from . import stream
    from .jobs import Cancelled

    _use_threads(args)
    if getattr(args, "mask_array", None) is not None:
        attrs = {**attrs, "mask": args.mask_source}
    # the resume fingerprint: every option as given, and the weights by their contents (not their path)
    given = {k: v for k, v in vars(args).items()
             if k not in ("func", "resume", "scheduler", "scheduler_timeout", "mask_array", "memory", "threads")}
    model = getattr(fn, "keywords", {}).get("model")
    weights = _sha256(model.path) if hasattr(model, "path") else None
    if args.scheduler:
        _quiet_dask()
    try:
        summary = stream.process_stack(args.input, args.out, fn, chunk_size=args.chunk_size, resume=args.resume,
                                       scheduler=args.scheduler, options={**options, "args": given, "weights": weights},
                                       attrs=attrs, progress=_count_progress(label),
                                       mask=getattr(args, "mask_array", None), memory=args.memory,
                                       scheduler_timeout=args.scheduler_timeout)
    except Cancelled as exc:
        raise UsageError(str(exc)) from None
    except stream.PartialError as exc:
        import shlex

        again = [a for a in _ARGV if a != "--resume"]
        how = f": cdinn {shlex.join(again)}" if again else ""
        raise UsageError(f"{exc}; delete it, or run without --resume, to start over{how}") from None
    if summary.get("complete"):
        print(f"{args.out} is already complete (made from the same input and options); nothing to do", file=sys.stderr)
        return
    skipped = summary.get("skipped", 0)  # streamed runs report finished chunks they skipped
    note = f" ({skipped} chunks resumed)" if skipped else ""
    print(f"wrote {args.out}{note}", file=sys.stderr)


# --------------------------------------------------------------------------- prepare
def _add_prepare(sub):
    p = sub.add_parser(
        "prepare",
        help="cut centred, square patterns out of raw detector frames",
        description="Take where the direct beam (zero frequency) falls on the detector from the file "
        "(NeXus/Dectris beam_center_x/_y), else find it from the inversion symmetry of the frames' mean, or take "
        "it from --centre; cut a square around it (unmeasured where it "
        "runs off the detector) and optionally sum bin x bin pixels; write 'intensity' and 'mask' "
        "(True = unmeasured), the input the other commands read.",
    )
    _add_stack_options(p, "raw detector frames, (H, W) or (N, H, W), any shape", device=False)
    p.add_argument("--centre", "--center", dest="centre", default="auto", metavar="auto|file|symmetry|Y,X",
                   help="zero-frequency position in detector pixels (row, column), e.g. 257,515; default auto: the "
                        "beam centre the file records (NeXus/Dectris beam_center_x/_y), else found from the inversion "
                        "symmetry of the frames' mean (exact on a stack of 32 or more, within a pixel from 8 "
                        "frames); file or symmetry: only that")
    p.add_argument("--size", type=_positive_int, default=None, metavar="N",
                   help="side of the output patterns in output pixels (even); default: the largest multiple of "
                        "32 (what the networks read) whose square stays on the detector")
    p.add_argument("--bin", type=_positive_int, default=1, metavar="K",
                   help="sum K x K detector pixels into one (default 1); a binned pixel with any unmeasured "
                        "pixel is unmeasured")
    p.add_argument("--dark", default=None, metavar="FILE",
                   help="an integrating detector's frames without beam (any input format; their mean is "
                        "subtracted first)")
    p.add_argument("--adu-per-photon", type=_positive_float, default=None, metavar="G",
                   help="detector units per photon: the frames (less the dark) are divided by G and rounded to "
                        "whole photons, negative readings to 0, so that the counting-noise floor applies")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args):
    import functools

    from . import io, prepare

    shape = _check_stack_input(args)
    try:
        centre = prepare.parse_centre(args.centre)
    except ValueError as exc:
        raise UsageError(f"--centre: {exc}") from None
    if args.size is not None and args.size % 2:  # before a pass over the frames
        raise UsageError(f"--size must be even (the zero frequency sits at pixel size // 2), got {args.size}")
    if args.size is not None:
        _check_prepare_size(args, shape, args.size)
    elif min(shape[-2:]) // args.bin < prepare.MIN_SIDE:  # no centre gives a default size that others take
        binned = f" binned {args.bin} x {args.bin}" if args.bin > 1 else ""
        raise UsageError(f"the {shape[-2]} x {shape[-1]} detector{binned} is smaller than the {prepare.MIN_SIDE} x "
                         f"{prepare.MIN_SIDE} patterns the other commands take: give --size {prepare.MIN_SIDE} or more "
                         "(pixels off the detector are unmeasured)" + (" or a smaller --bin" if args.bin > 1 else ""))
    if args.dark is not None:
        io.check_not_input(args.out, args.dark, what="--out")
    dark = _dark_frame(args.dark, shape)
    if isinstance(centre, str):
        centre, source, symmetry = prepare.choose_centre(
            io.open_stack(args.input, float32=True), args.mask_array, io.file_beam_centre(args.input), centre,
            chunk_size=args.chunk_size, progress=_count_progress("centre"), dark=dark)
        _end_progress_line()
        note = prepare.centre_note(centre, source, symmetry)
        if note:
            print(f"note: {note}", file=sys.stderr)
    else:
        source = "given"
    prepare.check_centre(centre, shape)
    size = prepare.default_size(shape, centre, args.bin) if args.size is None else args.size
    args.chunk_size = min(args.chunk_size, _check_prepare_size(args, shape, size, centre))
    print(prepare.describe(shape, centre, size, args.bin, source), file=sys.stderr)
    fn = functools.partial(prepare.prepare_chunk, centre=centre, size=size, bin=args.bin, dark=dark,
                           adu_per_photon=args.adu_per_photon)
    attrs = {"command": "prepare", "centre": [float(c) for c in centre], "centre_source": source, "size": size,
             "bin": args.bin, "detector_shape": [int(v) for v in shape[-2:]]}
    if dark is not None:
        attrs["dark"] = os.path.basename(args.dark)
    if args.adu_per_photon is not None:
        attrs["adu_per_photon"] = args.adu_per_photon
    options = {"command": "prepare", "centre": list(centre), "size": size, "bin": args.bin,
               "dark": None if dark is None else io.input_identity(args.dark)}
    _run_stack(args, fn, options, attrs, "prepare")


def _check_prepare_size(args, shape, size, centre=None):
    """Frames per chunk that patterns of ``size`` (output pixels, ``--bin`` applied) allow within ``--memory``;
    ``UsageError`` for patterns smaller than the other commands take, or a frame larger than the budget.
    ``centre``: where the default size (the largest square on the detector) was taken around."""
    from . import prepare

    if args.size is not None or centre is None:
        option = f"--size {size}"
    else:
        binned = f" binned {args.bin} x {args.bin}" if args.bin > 1 else ""
        option = (f"the largest square around the centre ({centre[0]:g}, {centre[1]:g}) that stays on the "
                  f"{shape[-2]} x {shape[-1]} detector{binned}")
    try:
        prepare.check_side(size, option, "--size")
    except ValueError as exc:
        hint = "" if args.size is not None else " (pixels off the detector are unmeasured)" + (
            " or a smaller --bin" if args.bin > 1 else "")
        raise UsageError(f"{exc}{hint}") from None
    try:
        return prepare.frames_in_budget(shape, size, args.bin, args.memory)
    except ValueError as exc:
        raise UsageError(f"--size {size}: {exc}") from None


def _dark_frame(path, shape):
    """The mean frame of a ``--dark`` file, checked against the detector frames' ``shape``; None without one."""
    from . import io, prepare

    if path is None:
        return None
    if not io.input_exists(path):
        raise UsageError(f"the dark file {path!r} does not exist")
    dark = io.read_stack(path)
    if tuple(dark.shape[-2:]) != tuple(shape[-2:]):
        raise UsageError(f"the dark frames are {dark.shape[-2]} x {dark.shape[-1]} pixels, the detector frames "
                         f"{shape[-2]} x {shape[-1]}")
    return prepare.mean_dark(dark)


def _count_progress(label):
    """``progress(done, total)`` drawing the command line's progress bar."""
    from .jobs import progress_events

    return progress_events(_Progress(label))


# --------------------------------------------------------------------------- predict
def _add_predict(sub):
    p = sub.add_parser(
        "predict",
        help="shape and phase of every pattern by the CDI NN networks",
        description="Run the CDI NN networks on measured intensities (32 x 32, or 32k x 32k patterns "
        "k-times oversampled, which are decimated) and write amplitude, phase, chi2 (a per-frame "
        "data-consistency score computed from the prediction), chi2_noise (the chi2 counting noise alone gives) "
        "and trusted (chi2 - chi2_noise below the trust threshold), and print how many frames are trusted. "
        ".h5/.cxi outputs are written as the job streams.",
    )
    _add_stack_options(p, "32 x 32 patterns, or 2x oversampled 64 x 64")
    p.add_argument("--model", default=None,
                   help="shipped model name (default: model2x, which reads the whole 2x-oversampled pattern, "
                        "for 64 x 64 and 128 x 128 patterns, else model), .safetensors file or model directory")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="frames per network call (default 256 on the CPU, 4096 on a GPU)")
    p.add_argument("--views", type=int, choices=range(1, 9), default=1, metavar="V",
                   help="test-time ensemble: the network also reads V-1 mirrored or transposed views of each "
                        "pattern and the aligned answers are averaged (1..8; default 1, the network alone; "
                        "8 is the most accurate, about 8x the network time)")
    p.set_defaults(func=_cmd_predict)


def _quiet_dask():
    """Silence dask.distributed's own log lines (reconnection tracebacks...): the run ends with one line of its own."""
    import logging

    import distributed  # noqa: F401 - configures its loggers

    for name in ["distributed", *logging.root.manager.loggerDict]:
        if name == "distributed" or name.startswith("distributed."):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def _sha256(path):
    """Hex SHA-256 of a file's contents (read in blocks)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _scaled_model(args, shape):
    """The network for the input's patterns at the scale that fits a sample of them (:func:`napari_cdinn.nn.choose_scale`).

    Chosen once for the whole stack (results do not depend on the chunking); a scale other than 1,
    and a stack that is not centred (:func:`napari_cdinn.nn.off_centre`), are announced on stderr.
    """
    from . import io, nn

    nn.resolve_model(args.model, shape)  # a size no network reads fails here, before any reading
    _use_threads(args)
    stack = io.open_stack(args.input, float32=True)  # reads only the sampled frames (no dask graph, no scheduler)
    info = nn.choose_scale(stack if len(shape) == 3 else stack[...], args.model, mask=args.mask_array,
                           device=args.device)
    if info.scale > 1:
        side = nn.read_side(shape, info.scale)
        print(f"note: the objects are read at {info.scale:g}x the pixel size (the central {side} x {side} pixels of "
              f"the patterns), then interpolated back: the network fits a sample of them best so", file=sys.stderr)
    if nn.off_centre(info):
        print(f"note: {nn.off_centre(info)}", file=sys.stderr)
    return info


def _cmd_predict(args):
    import functools

    from . import nn
    from .nn.inference import numpy_engine

    shape = _check_stack_input(args)
    # a small CPU job runs on the NumPy engine: nothing imports torch or sets its threads
    args.numpy_engine = numpy_engine(args.device, (1 if len(shape) == 2 else shape[0]) * args.views)
    info = _scaled_model(args, shape)  # the model for this size and its scale, chosen once
    model = str(info.path)
    fn = functools.partial(nn.predict_chunk, model=info, device=args.device, batch_size=args.batch_size,
                           views=args.views)
    attrs = {"model": model, "arch": info.card.get("arch", ""), "trust_chi2": nn.TRUST_CHI2, "views": args.views,
             "scale": info.scale}
    if nn.declined(info):
        print(f"note: {nn.declined(info).split(';')[0]}; the frames are written, untrusted", file=sys.stderr)
    _run_stack(args, fn, {"model": model, "command": "predict", "views": args.views}, attrs, "predict")
    _report_fit(args.out, "predict")


# --------------------------------------------------------------------------- reconstruct
def _add_reconstruct(sub):
    from .pipelines import LOW_DOSE_CHI2
    from .protocol import BETA_MAX, ITERATIONS, RESTART_CHI2, RESTART_NOISE, STARTS

    p = sub.add_parser(
        "reconstruct",
        help="iterative phase retrieval (ER/HIO/RAAR with shrinkwrap) of every pattern",
        description="Invert oversampled diffraction intensities by iterative phase retrieval, many patterns at "
        f"once on the CPU or a GPU. Default: the paper's HIO/ER cycles with shrinkwrap (the final 20 iterations "
        f"averaged) in runs of {ITERATIONS} iterations, a pattern started again (up to {STARTS} runs) only while its "
        "fit misfits the data beyond the counting noise; --iterations 620 --starts 1 is the paper's protocol exactly. "
        "Writes amplitude (max 1 per frame), phase (radians), support, chi2 and chi2_noise (the chi2 counting noise "
        "alone gives), and prints how many frames fit the data within the counting noise.",
    )
    _add_stack_options(p, "square, even-sized, oversampled patterns")
    p.add_argument("--algorithm", default="hio-er",
                   help="hio-er (default), er, hio, raar, or a schedule such as '(hio:80,er:20)x6,er:20'")
    p.add_argument("--iterations", type=_positive_int, default=None,
                   help=f"iterations of each run (default {ITERATIONS}; with --init nn a short refinement, "
                        "50 per 32 pixels of the network's object side)")
    p.add_argument("--init", choices=("random", "nn"), default="random",
                   help="random phases (default) or the CDI NN guess with its support")
    p.add_argument("--fallback", choices=("auto", "always", "never"), default="auto",
                   help="with --init nn, which frames also get the protocol from random starts, "
                        "keeping the better fit (output 'start': 1 network, 0 protocol; a faint frame, chi2_noise "
                        f"above {LOW_DOSE_CHI2:g}, keeps its refinement): auto (default) those the protocol would start again "
                        "(refined chi2 beyond the counting noise above the restart limit, as for --starts) or "
                        "whose guess could not seed them; always; never")
    p.add_argument("--model", default=None,
                   help="network weights for --init nn (default: the best shipped model for the pattern size)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="patterns inverted together")
    p.add_argument("--starts", type=_positive_int, default=STARTS, metavar="K",
                   help=f"runs per pattern at most, the lowest chi2 kept (default {STARTS}): a pattern is started again "
                        f"only while its chi2 exceeds its counting noise's by more than max({RESTART_CHI2:g}, "
                        f"{RESTART_NOISE:g} x the noise's chi2); 1: one run; with --prtf every pattern gets K runs")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument("--beta", type=_number(float, 0.0, False, f"a number in (0, {BETA_MAX:g})", below=BETA_MAX), default=0.9,
                   help="HIO/RAAR feedback parameter (default 0.9)")
    p.add_argument("--threshold", type=_number(float, 0.0, False, "a fraction in (0, 1)", below=1.0), default=0.12,
                   help="shrinkwrap threshold, relative to the blurred modulus's maximum (default 0.12)")
    p.add_argument("--sigma", type=_sigma, default=(3.0, 1.0), metavar="S[,S_END]",
                   help="shrinkwrap blur in pixels, at the first and the last update (default 3,1; one value: fixed)")
    p.add_argument("--post", type=_post_steps, default=(), metavar="STEPS",
                   help="post-processing, comma-separated: centre (centre of mass to the frame centre), ramp "
                        "(remove the linear phase ramp and the mean phase), unwrap (unwrap the phase in the support)")
    p.add_argument("--prtf", action="store_true",
                   help="also write each pattern's phase-retrieval transfer function from its --starts K runs (K >= 2, "
                        "every pattern gets every start) as prtf (per frame, vs the prtf_q attribute in cycles/pixel) "
                        "and resolution (first q where it falls below 1/e), and print the median resolution")
    p.set_defaults(func=_cmd_reconstruct)


def _post_steps(text):
    """``centre,ramp,unwrap`` (any subset): post-processing steps of ``cdinn reconstruct``."""
    from .postprocess import STEPS

    steps = tuple(t for t in text.replace(" ", "").split(",") if t)
    bad = [t for t in steps if t not in STEPS]
    if bad or not steps:
        raise argparse.ArgumentTypeError(f"expected steps from {', '.join(STEPS)}, got {text!r}")
    return steps


def _sigma(text):
    """``S`` or ``S0,S1``: shrinkwrap blur (pixels) at the first and the last update."""
    parts = [t for t in text.replace(" ", "").split(",") if t]
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected S or S0,S1 (pixels), got {text!r}")
    values = [_positive_float(t) for t in parts]
    return (values[0], values[-1])


def _cmd_reconstruct(args):
    import functools

    from . import nn
    from .pipelines import reconstruct_chunk
    from .protocol import ITERATIONS
    from .retrieval import make_schedule

    if args.prtf and args.starts < 2:
        raise UsageError(f"--prtf compares several runs of each pattern: it needs --starts K with K >= 2, got {args.starts}")
    shape = _check_stack_input(args)
    from .prepare import MIN_SIDE, NOT_SQUARE_HINT

    if shape[-1] != shape[-2] or shape[-1] % 2:
        raise UsageError(f"patterns must be square with an even size, got {shape[-2]} x {shape[-1]}"
                         + (NOT_SQUARE_HINT if shape[-2] != shape[-1] else ""))
    if shape[-1] < MIN_SIDE:
        raise UsageError(f"patterns must be at least {MIN_SIDE} x {MIN_SIDE} pixels to be inverted, got "
                         f"{shape[-2]} x {shape[-1]}")
    _check_iterations(args, shape)
    iterations = args.iterations or ITERATIONS
    nn_options = {}
    if args.init == "nn":
        from .nn.inference import SIZE, refine_options

        # --iterations sets the refinement (default: grown with the guess's side, known once the network is
        # chosen below); the fallback is the default protocol
        make_schedule(args.algorithm, refine_options(SIZE, args.iterations)["iterations"], nn.REFINE_OPTIONS["average"])
        iterations = ITERATIONS
    make_schedule(args.algorithm, iterations)
    model = args.model
    if args.init == "nn":
        installed = any((nn.WEIGHTS_DIR / f"{name}.safetensors").is_file() for name in nn.DEFAULT_MODELS)
        if args.model is None and not installed:
            raise UsageError("--init nn needs the CDI NN networks, which are not installed yet")
        model = _scaled_model(args, shape)  # the network for this size and its scale, chosen once
        if nn.declined(model):
            print(f"note: {nn.declined(model)}", file=sys.stderr)
        # the refinement that runs, recorded with the results (none by default when the network declines)
        side = None if nn.declined(model) and args.iterations is None else round(model.size * model.scale)
        nn_options = {"fallback": args.fallback, "refine": None if side is None else refine_options(side, args.iterations)}
    options = {"algorithm": args.algorithm, "iterations": iterations, "init": args.init, "model": args.model,
               "device": args.device, "batch_size": args.batch_size, "n_starts": args.starts, "seed": args.seed,
               "beta": args.beta, "threshold": args.threshold, "sigma": list(args.sigma), **nn_options}
    if args.prtf:
        options["prtf"] = True
    fn = functools.partial(reconstruct_chunk, **dict(options, model=model))
    if args.post:
        from .postprocess import chunk_with_steps

        fn = functools.partial(chunk_with_steps, fn, steps=args.post)
        options["post"] = list(args.post)
    options["command"] = "reconstruct"
    if args.init == "nn":
        options["scale"] = model.scale
    attrs = options
    if args.prtf:  # the shells' frequencies are the same for every frame: an attribute, written once
        from .postprocess import prtf_frequencies

        attrs = dict(options, prtf_q=prtf_frequencies(shape[-1]).tolist(), prtf_level="1/e")
    _run_stack(args, fn, options, attrs, "reconstruct")
    _report_fit(args.out, "reconstruct", args.init)
    if args.prtf:
        _report_resolution(args.out)


def _report_fit(path, command, init="random"):
    """Print :func:`napari_cdinn.pipelines.fit_summary` of a finished ``predict`` or ``reconstruct`` output
    on stderr, with what to do about the frames that do not fit (or hold few photons)."""
    from . import io
    from .pipelines import faint, fit_summary, fits

    res = io.read_result(path, keys=("chi2", "chi2_noise"))
    if "chi2" not in res:
        return
    noise = res.get("chi2_noise", 0.0)
    good = fits(res["chi2"], noise, command)
    advice = []
    if not good.all():
        advice.append("cdinn reconstruct --init nn refines the rest" if command == "predict"
                      else "check the others (more --starts, a mask over bad pixels)")
    if command == "reconstruct" and init == "random" and (good & faint(noise, good.shape)).any():
        advice.append("on faint frames --init nn is right far more often (benchmarks/README.md, bench_verdict)")
    print("; ".join([fit_summary(res["chi2"], noise, command), *advice]), file=sys.stderr)


def _report_resolution(path):
    """Print the median PRTF resolution of a finished ``cdinn reconstruct --prtf`` output on stderr."""
    import numpy as np

    from . import io
    from .postprocess import describe_resolution, median_resolution

    res = io.read_result(path, keys=("prtf", "resolution"))
    frames = int(np.size(res["resolution"]))
    print(f"PRTF resolution (where it falls below 1/e), median of {frames} frame(s): "
          f"{describe_resolution(median_resolution(res['prtf'], res['resolution']))}", file=sys.stderr)


def _check_iterations(args, shape):
    """``--iterations`` within what memory allows: the retrieval keeps a few bytes per iteration, and an
    error record per frame every 10 iterations, for a batch of up to a chunk of frames."""
    from . import io

    if args.iterations is None:
        return
    chunk = min(args.chunk_size, io.frames_in_budget(shape[-2:], args.memory))
    per_iteration = 16 + (80 + 4 * chunk) / 10
    most = int(args.memory // per_iteration)
    if args.iterations > most:
        raise UsageError(f"--iterations {args.iterations} is more than the memory budget of "
                         f"{io.format_bytes(args.memory)} allows for chunks of {chunk} frames (at most {most}; "
                         "--memory or CDINN_MEMORY sets the budget)")


# --------------------------------------------------------------------------- report
def _add_report(sub):
    p = sub.add_parser(
        "report",
        help="reproduce the paper's figures for a model (PNG + JSON)",
        description="Reproduce the paper's figures on fresh simulated test patterns: training curves (Fig. 2), "
        "examples with iterative results (Fig. 3), the chi2 histogram with the 5 best and 5 worst (Fig. 4/5), "
        "mean activation maps of conv layers 2 and 4 (Fig. 6) and the twin-image rate; PNGs and report.json "
        "go to the folder --out.",
    )
    p.add_argument("--out", "-o", required=True, help="output folder (created)")
    p.add_argument("--model", default=None, help="shipped model name, .safetensors file or model directory")
    p.add_argument("--count", type=_positive_int, default=1000, help="test cases (default 1000)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or mps (default cpu)")
    _add_threads(p)
    p.set_defaults(func=_cmd_report)


def _cmd_report(args):
    import os

    from . import nn
    from .pipelines import make_report

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out must be a folder, got the file {args.out!r}")
    nn.resolve_model(args.model, (64, 64))  # the report's patterns are 2x-oversampled 64 x 64
    _use_threads(args)
    rep = make_report(args.out, model=args.model, count=args.count, device=args.device)
    t = rep["test"]
    print(f"wrote {args.out}: iou {t['iou_median']:.3f}, phase RMS {t['phase_rms_median']:.3f} rad, chi2 "
          f"{t['chi2_median']:.3g}, twin rate {t['twin_rate']:.2f}", file=sys.stderr)


# --------------------------------------------------------------------------- adapt
def _add_adapt(sub):
    from .nn.config import MAX_SEED  # torch's generators are seeded from it

    p = sub.add_parser(
        "adapt",
        help="fine-tune a network on your own patterns, without ground truth",
        description="Adapt a trained network to a measured stack: fine-tune it on the patterns' own "
        "data-consistency (the chi2 of each prediction against its pattern, on measured pixels), with "
        "simulated labelled examples mixed in so that it does not forget, keeping the weights that fit a "
        "held-out part of the stack best. Writes a new model folder for --model. Progress on stderr.",
    )
    p.add_argument("input", help="intensities: .npy, .npz, .tif, .h5 (an Eiger master file too), .nxs, .cxi, .cbf, .edf, or a folder or quoted pattern ('scan_*.cbf') of one-frame files (the stack to adapt to; at least "
                                 "200 frames with signal)")
    p.add_argument("--out", "-o", required=True, help="new model folder (must not exist)")
    p.add_argument("--model", default=None,
                   help="base model: shipped name, .safetensors file or model directory (default: the best shipped "
                        "model for the pattern size); its files are only read")
    p.add_argument("--time-limit", type=_positive_float, default=10.0, metavar="MIN",
                   help="minutes of fine-tuning at most (default 10); it also ends when the held-out fit stops improving")
    p.add_argument("--mask", default=None, metavar="FILE", help=_MASK_HELP)
    p.add_argument("--holdout", type=_number(float, 0.0, False, "a fraction in (0, 0.5]", below=0.5 + 1e-9),
                   default=0.1, metavar="F", help="fraction of the frames held out to choose the weights (default 0.1)")
    p.add_argument("--seed", type=_number(int, 0, True, f"an integer from 0 to {MAX_SEED}", below=MAX_SEED + 1),
                   default=0, help="random seed (default 0)")
    _add_threads(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.set_defaults(func=_cmd_adapt)


def _cmd_adapt(args):
    import shlex
    import signal
    import threading

    from . import io, nn
    from .device import resolve_device
    from .nn.adapt import MIN_FRAMES, adapt, check_out, recentred_note

    check_out(args.out)
    if not io.input_exists(args.input):
        raise UsageError(f"the input file {args.input!r} does not exist")
    shape = io.stack_shape(args.input)
    frames = shape[0] if len(shape) == 3 else 1
    if frames < MIN_FRAMES:
        raise UsageError(f"adapting needs at least {MIN_FRAMES} frames, got {frames} in {args.input!r}")
    info = nn.resolve_model(args.model, shape)  # a size no model reads fails here
    resolve_device(args.device)
    mask = _input_mask(args, shape)
    _use_threads(args)  # --threads, else the free cores
    stop = threading.Event()  # Ctrl-C / SIGTERM: the best weights so far are written
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        card = adapt(io.read_stack(args.input), args.out, model=info, mask=mask, time_limit_min=args.time_limit,
                     holdout=args.holdout, seed=args.seed, device=args.device, threads=args.threads,
                     callback=_adapt_progress, stop=stop, source=args.input, command="cdinn " + shlex.join(_ARGV))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    h = card["holdout_chi2"]
    print(f"held-out chi2 (median of {h['count']} frames): before {h['before']:.4g}, after {h['after']:.4g} "
          f"({card['steps']} steps, best at step {card['best_step']}, {card['ended']})")
    r = card["recall"]
    if r["iou_base"]:
        pairs = (f"{name.replace('_', ' ')} {base:.3f} -> {r['iou_kept'][name]:.3f}"
                 for name, base in r["iou_base"].items())
        print("recall, simulated IoU of the base -> the kept weights: " + ", ".join(pairs))
    for name, scores in card.get("test_scores", {}).items():
        b, a = scores["base"], scores["adapted"]
        print(f"simulated {name} test: iou {b['iou_median']:.3f} -> {a['iou_median']:.3f}, phase RMS "
              f"{b['phase_rms_median']:.3f} -> {a['phase_rms_median']:.3f} rad")
    if recentred_note(card):
        print(f"note: {recentred_note(card)}", file=sys.stderr)
    if card["data"].get("scale", 1) != 1:  # as predict says it when it reads the stack so
        print(f"note: adapted to the objects read at {card['data']['scale']:g}x the pixel size, as predict reads "
              f"this stack", file=sys.stderr)
    print(f"wrote {args.out} (adapted from {info.name})", file=sys.stderr)


def _adapt_progress(ev):
    """``cdinn adapt``'s progress lines on stderr: the start, and each held-out evaluation."""
    kind = ev["event"]
    if kind == "start":
        print(f"adapting on {ev['used_frames'] - ev['holdout_frames']} frames, {ev['holdout_frames']} held out",
              file=sys.stderr, flush=True)
    elif kind == "evaluation":
        loss = "" if ev["train_loss"] is None else f" loss {ev['train_loss']:.4f}"
        forgets = "" if ev["remembers"] else ", forgets: not kept"
        print(f"step {ev['step']} t {ev['elapsed_s']:.0f}s{loss} held-out chi2 {ev['holdout_chi2']:.4g} "
              f"(best {ev['best_chi2']:.4g} at step {ev['best_step']}{forgets})", file=sys.stderr, flush=True)
    elif kind in ("done", "stopped"):
        print(f"{kind} ({ev['ended']}): keeping the weights of step {ev['best_step']}; scoring the base and the "
              "adapted model on simulated test sets...", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- main
_ADDERS = [_add_simulate, _add_prepare, _add_bench, _add_train, _add_predict, _add_reconstruct, _add_report, _add_adapt]


def build_parser():
    """The ``cdinn`` argument parser with every sub-command."""
    parser = _Parser(prog="cdinn", description="CDI NN: coherent diffraction imaging by networks and phase retrieval")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in _ADDERS:
        add(sub)
    return parser


def _end_progress_line():
    if _Progress.open_line:
        print(file=sys.stderr)
        _Progress.open_line = False


def main(argv=None):
    """Entry point of the ``cdinn`` console script; returns the exit code (see :func:`_main`)."""
    code = _main(argv)
    stream = sys.modules.get("napari_cdinn.stream")
    if code and stream is not None and stream.FAILED_FILES:  # HDF5 would crash closing a file whose write failed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv=None):
    """Entry point of the ``cdinn`` console script; returns the exit code.

    Bad input and arguments: one line ``error: ...`` and exit code 2; an interrupt: 130; anything
    unexpected: one line and exit code 1 (``CDINN_DEBUG=1`` shows its traceback instead).
    """
    import signal

    global _ARGV
    _ARGV = list(sys.argv[1:] if argv is None else argv)
    from .device import cpu_sample

    _RUN["start"] = cpu_sample()  # the window in which other processes' use of the cores is measured
    if hasattr(signal, "SIGXFSZ"):  # past `ulimit -f` a write fails (EFBIG, reported) instead of killing us
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except UsageError as exc:
        _end_progress_line()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError, KeyError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _end_progress_line()
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except MemoryError as exc:
        _end_progress_line()
        print(f"error: out of memory ({_first_line(exc) or 'MemoryError'}); lower --memory, --chunk-size or "
              "--batch-size", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _end_progress_line()
        print("error: interrupted (an .h5/.cxi run continues with --resume)", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("CDINN_DEBUG"):
            raise
        _end_progress_line()
        print(f"error: unexpected {type(exc).__name__}: {_first_line(exc)} (CDINN_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1
    finally:
        _restore_threads()
    return 0


#: The arguments of the running command (to print the command that starts a run over).
_ARGV: list = []


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


if __name__ == "__main__":
    sys.exit(main())
