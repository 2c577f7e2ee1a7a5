"""More bad arguments: a training run that diverges or would overwrite another, seeds out of range,
photon counts the simulator cannot draw, and ``prepare`` sizes the other commands cannot read or
memory cannot hold.  Each exits 2 with one ``error:`` line naming the option, and leaves what
exists as it was (docs/bad_input.md)."""

import json
import re

import numpy as np
import pytest

from napari_cdinn.cli import main

#: A training run of two steps on the CPU (a couple of seconds).
TINY = ["--preset", "tiny", "--train-size", "64", "--val-size", "16", "--epochs", "1", "--batch-size", "32",
        "--device", "cpu"]

#: The one sentence of a run whose loss diverged at ``--lr 1e9`` (which loss, and how, may vary by platform).
DIVERGED = (r"the (training|validation) loss became (NaN|infinite) by step \d+ \(\d+ examples\): the weights diverged "
            r"and were not saved; lower the learning rate \(--lr, now 1e\+09\)")


def _one_error(code, err):
    """The ``error:`` line of a failed command, checked: exit 2, one such line, last, no traceback or warning."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, err
    assert lines and lines[-1].startswith("error: "), err
    assert len([ln for ln in lines if ln.startswith("error: ")]) == 1, err
    assert "Traceback" not in err and "Warning" not in err, err
    return lines[-1]


def _contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------- train
def test_a_diverging_training_run_exits_2_and_keeps_the_finite_checkpoints(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["train", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    state = json.loads((out / "last.json").read_text())
    state["config"]["lr"] = 1e9  # the resumed run takes the checkpoint's recipe: it diverges
    (out / "last.json").write_text(json.dumps(state))
    before = _contents(out)
    line = _one_error(main(["train", "--out", str(out), "--resume", "--epochs", "3", "--device", "cpu"]),
                      capsys.readouterr().err)
    assert re.fullmatch(DIVERGED, line.removeprefix("error: ")), line
    assert _contents(out) == before  # no NaN weights written as best or last: the finite checkpoints stay


def test_the_trainer_raises_the_same_sentence_for_the_training_dock(tmp_path):
    from napari_cdinn.nn import train

    # the dock runs train() in a worker and shows the ValueError's sentence as a notification
    with pytest.raises(ValueError, match=DIVERGED):
        train(tmp_path / "m", preset="tiny", train_size=64, val_size=16, epochs=1, batch_size=32, lr=1e9,
              device="cpu", quick_val_size=16)
    assert not (tmp_path / "m").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.safetensors").write_bytes(b"keep")
    with pytest.raises(ValueError, match="already holds a training run: resume it, or choose a new folder"):
        train(run, preset="tiny", device="cpu")
    (tmp_path / "file").write_text("keep")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        train(tmp_path / "file", preset="tiny", device="cpu")
    assert _contents(run) == {"last.safetensors": b"keep"}


def test_train_into_a_file_or_over_a_run_is_refused_before_it_starts(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    line = _one_error(main(["train", "--out", str(afile), *TINY]), capsys.readouterr().err)
    assert line == f"error: --out {str(afile)!r} is a file, not a folder: give the model folder to write the " \
                   "checkpoints to (created if new)"
    assert afile.read_text() == "keep"
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.safetensors", "best.json", "last.safetensors", "last.json", "optimizer.pt"):
        (run / name).write_bytes(b"keep " + name.encode())
    before = _contents(run)
    code = main(["train", "--out", str(run), *TINY])
    err = capsys.readouterr().err
    assert _one_error(code, err) == (f"error: --out {str(run)!r} already holds a training run: pass --resume to "
                                     "continue it, or choose a new folder")
    assert err.count("\n") == 1  # refused before training starts (no progress line)
    assert _contents(run) == before


@pytest.mark.parametrize("command", [
    ["train", "--out", "{tmp}/m", *TINY],
    ["adapt", "{tmp}/stack.npy", "--out", "{tmp}/m"],
])
@pytest.mark.parametrize("seed", ["-1", "4294967296", "99999999999999999999999999"])
def test_seeds_out_of_range_name_the_option_before_anything_runs(tmp_path, capsys, command, seed):
    np.save(tmp_path / "stack.npy", np.ones((2, 64, 64), np.float32))
    argv = [a.format(tmp=tmp_path) for a in command] + ["--seed", seed]
    line = _one_error(main(argv), capsys.readouterr().err)
    assert line == f"error: argument --seed: expected an integer from 0 to 4294967295, got {seed!r}"
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- simulate
@pytest.mark.parametrize("args, message", [
    (["--photons", "1e30"], "--photons 1e+30 is too large: at most 1e+18 photons per pattern"),
    (["--photons", "1e40"], "--photons 1e+40 is too large: at most 1e+18 photons per pattern"),
    (["--photons", "1e3", "--background", "1e30"], "--background 1e+30 is too large: at most 1e+18 photons per pixel"),
    (["--beamstop", "1e300"], "--beamstop 1e+300 is too large: at most 32 pixels"),
    (["--offset", "1e300"], "--offset 1e+300 is too large: at most 16 pixels"),
])
def test_simulate_counts_and_sizes_beyond_what_it_draws_name_the_option(tmp_path, capsys, args, message):
    out = tmp_path / "s.npz"
    out.write_bytes(b"keep")
    line = _one_error(main(["simulate", "--count", "2", *args, "-o", str(out)]), capsys.readouterr().err)
    assert message in line
    assert out.read_bytes() == b"keep"


def test_simulate_with_few_photons_warns_of_nothing(tmp_path, capsys):
    # a pattern that draws no photon at all: no saturation test on inf * 0
    assert main(["simulate", "--count", "4", "--photons", "0.001", "-o", str(tmp_path / "s.npz")]) == 0
    assert "Warning" not in capsys.readouterr().err
    assert np.load(tmp_path / "s.npz")["intensity"].max() == 0


# --------------------------------------------------------------------------- prepare
@pytest.fixture
def raw(tmp_path):
    """Raw detector frames (4, 100, 120)."""
    path = tmp_path / "raw.npy"
    np.save(path, np.random.default_rng(0).poisson(5.0, (4, 100, 120)).astype(np.float32))
    return path


@pytest.mark.parametrize("args, message", [
    (["--size", "2"], "--size 2 gives 2 x 2 patterns, smaller than the 8 x 8 the other commands take: give --size 8 or more"),
    (["--size", "4"], "--size 4 gives 4 x 4 patterns, smaller than the 8 x 8"),
    (["--bin", "200"], "the 100 x 120 detector binned 200 x 200 is smaller than the 8 x 8 patterns the other commands "
                       "take: give --size 8 or more (pixels off the detector are unmeasured) or a smaller --bin"),
    (["--bin", "12", "--centre", "50,60"], "binned 12 x 12 gives 6 x 6 patterns, smaller than the 8 x 8"),
    (["--centre", "0,0"], "the largest square around the centre (0, 0) that stays on the 100 x 120 detector gives "
                          "2 x 2 patterns, smaller than the 8 x 8"),
    (["--centre", "52,61", "--size", "1000000"], "--size 1000000: 1000000 x 1000000 patterns (1000000 x 1000000 "
                                                 "detector pixels) need about 29.1 TiB of memory per frame, more than "
                                                 "the memory budget of 1.0 GiB"),
    (["--centre", "52,61", "--size", "4096", "--memory", "64M"], "need about 512.0 MiB of memory per frame, more than "
                                                                 "the memory budget of 64.0 MiB"),
])
def test_prepare_refuses_patterns_too_small_to_read_or_too_large_for_memory(tmp_path, capsys, raw, args, message):
    out = tmp_path / "p.npz"
    out.write_bytes(b"keep")
    line = _one_error(main(["prepare", str(raw), "-o", str(out), *args]), capsys.readouterr().err)
    assert message in line
    assert out.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.npz", "raw.npy"]


def test_prepare_refuses_a_detector_too_small_for_a_pattern(tmp_path, capsys):
    small = tmp_path / "small.npy"
    np.save(small, np.ones((4, 8, 8), np.float32))
    out = tmp_path / "p.h5"
    line = _one_error(main(["prepare", str(small), "-o", str(out), "--centre", "4,3"]), capsys.readouterr().err)
    assert "that stays on the 8 x 8 detector gives 6 x 6 patterns, smaller than the 8 x 8" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.npy"]


@pytest.mark.parametrize("centre", ["1000,1000", "32,-1"])
def test_prepare_refuses_a_centre_off_the_detector_in_every_entry_point(tmp_path, capsys, centre):
    """The command and the dock said so in two sentences of their own; the library cut frames of
    nothing but unmeasured pixels."""
    from napari_cdinn import prepare

    frames = tmp_path / "frames.npy"
    np.save(frames, np.ones((2, 64, 64), np.float32))
    line = _one_error(main(["prepare", str(frames), "-o", str(tmp_path / "p.h5"), "--centre", centre, "--size", "32"]),
                      capsys.readouterr().err)
    cy, cx = centre.split(",")
    assert f"the centre ({cy}, {cx}) lies outside the 64 x 64 detector frame" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames.npy"]
    with pytest.raises(ValueError, match=rf"the centre \({cy}, {cx}\) lies outside the 64 x 64 detector frame"):
        prepare.prepare_frames(np.ones((2, 64, 64)), tuple(float(v) for v in centre.split(",")), 32)


def test_prepare_cuts_large_patterns_in_chunks_the_budget_holds(tmp_path, capsys, raw, monkeypatch):
    from napari_cdinn import io, stream

    seen = {}
    process = stream.process_stack

    def spy(*args, **kwargs):
        seen["chunk_size"] = kwargs["chunk_size"]
        return process(*args, **kwargs)

    monkeypatch.setattr(stream, "process_stack", spy)
    out = tmp_path / "p.h5"  # 1024 x 1024 patterns: 32 MiB each at work, so 2 frames per chunk within 80 MiB
    assert main(["prepare", str(raw), "-o", str(out), "--centre", "52,61", "--size", "1024", "--memory", "80M"]) == 0
    assert seen["chunk_size"] == 2
    assert io.stack_shape(out) == (4, 1024, 1024)


# --------------------------------------------------------------------------- the Python API
def test_the_api_refuses_masks_of_another_stack_and_empty_stacks():
    """A mask of more frames than the stack was silently cut to it; fewer raised an IndexError."""
    from napari_cdinn import nn
    from napari_cdinn.retrieval import reconstruct
    from napari_cdinn.simulate import simulate

    stack = simulate(3, oversampling=2, seed=5)["intensity"]
    quick = {"iterations": 20, "average": 5, "n_starts": 1, "device": "cpu"}
    for frames in (4, 2):
        with pytest.raises(ValueError, match=rf"mask must be shaped \(64, 64\) or \(3, 64, 64\).*got \({frames}, 64, 64\)"):
            reconstruct(stack, mask=np.zeros((frames, 64, 64), bool), **quick)
    for fn in (lambda: reconstruct(stack[:0], **quick), lambda: nn.predict(stack[:0])):
        with pytest.raises(ValueError, match="no pattern .0 frames."):
            fn()
    one, both = reconstruct(stack, sigma=2.0, **quick), reconstruct(stack, sigma=(2.0, 2.0), **quick)
    np.testing.assert_array_equal(one["chi2"], both["chi2"])  # one width: the same throughout
    with pytest.raises(ValueError, match="sigma must be one blur width or .first, last."):
        reconstruct(stack, sigma=(1.0, 2.0, 3.0), **quick)


@pytest.mark.parametrize("option, value, message", [
    ("beta", float("nan"), r"beta must be a number in \(0, 2\), got nan"),  # ran to NaN objects, chi2 1
    ("beta", 0, r"beta must be a number in \(0, 2\), got 0"),
    ("threshold", 0, r"threshold must be a fraction in \(0, 1\), got 0"),  # the whole frame as support: chi2 0
    ("threshold", 1.5, r"threshold must be a fraction in \(0, 1\), got 1.5"),
    ("autocorrelation_threshold", float("inf"), r"autocorrelation_threshold must be a fraction in \(0, 1\)"),
    ("iterations", 2.5, r"iterations must be a whole number >= 1, got 2.5"),
    ("average", -1, r"average must be a whole number >= 0, got -1"),
    ("shrinkwrap_every", -1, r"shrinkwrap_every must be a whole number >= 0"),
    ("block", 0, r"block must be a whole number >= 1, got 0"),
    ("error_every", -3, r"error_every must be a whole number >= 1"),
    ("seed", 1.5, r"seed must be a whole number >= 0, got 1.5"),
    ("n_starts", "two", r"n_starts must be a whole number >= 1, got 'two'"),
    ("batch_size", 0, r"batch_size must be a whole number >= 1, got 0"),
    ("threads", -1, r"threads must be a whole number >= 0, got -1"),
    ("algorithm", 5, r"algorithm must be hio-er, er, hio, raar or a schedule"),
    ("mask", np.full((64, 64), 0.5), r"mask must hold booleans or integers \(True/1 = unmeasured\), got float64"),
    ("support", np.full((64, 64), 0.5), r"support must hold booleans or integers \(True/1 = inside\), got float64"),
])
def test_reconstruct_refuses_option_values_it_cannot_run(option, value, message):
    """Values the command line refuses ran silently through the API (a NaN beta gave NaN objects, a
    float mask of 0.5 masked every pixel)."""
    from napari_cdinn.retrieval import reconstruct
    from napari_cdinn.simulate import simulate

    stack = simulate(2, oversampling=2, seed=5)["intensity"]
    options = {"iterations": 20, "average": 5, "n_starts": 1, "device": "cpu", option: value}
    with pytest.raises(ValueError, match=message):
        reconstruct(stack, **options)


def test_the_shared_checks_take_whole_numbers_given_as_floats_and_nothing_else():
    from napari_cdinn.checks import check_mask_layout, number_in, whole_number

    assert whole_number(4.0, "n") == 4 and isinstance(whole_number(np.int64(3), "n"), int)
    assert whole_number(2**70, "seed") == 2**70  # exact, never through a float
    for bad in (True, "3", None, float("nan"), 1e400, 0.5, -1):
        with pytest.raises(ValueError, match="n must be a whole number >= 0"):
            whole_number(bad, "n")
    with pytest.raises(ValueError, match="views must be a whole number from 1 to 8, got 9"):
        whole_number(9, "views", 1, 8)
    assert number_in(np.float32(0.5), "f", 0, 1) == 0.5
    assert number_in(1, "f", 0, 1, high_inclusive=True) == 1.0
    for bad in (0, 1, float("nan"), "0.5", None):
        with pytest.raises(ValueError, match=r"f must be a number in \(0, 1\)"):
            number_in(bad, "f", 0, 1)
    assert check_mask_layout(np.zeros((2, 4, 4), np.uint8), (2, 4, 4)) == (2, 4, 4)
    assert check_mask_layout([[True, False], [False, False]], (5, 2, 2)) == (2, 2)
    with pytest.raises(ValueError, match=r"the mask must be shaped \(4, 4\) or \(1, 4, 4\) like the patterns"):
        check_mask_layout(np.zeros((3, 4, 4), bool), (4, 4))


def test_every_function_taking_a_mask_refuses_a_float_one_with_the_same_sentence(tmp_path):
    """0.5 read as True masked every pixel in some functions; predict refused it: now all refuse it."""
    from napari_cdinn import nn, postprocess, prepare, stream
    from napari_cdinn.pipelines import refine_with_fallback
    from napari_cdinn.retrieval import reconstruct
    from napari_cdinn.simulate import simulate

    stack = simulate(2, oversampling=2, seed=5)["intensity"]
    half = np.full((64, 64), 0.5)
    calls = {
        "reconstruct": lambda: reconstruct(stack, mask=half, iterations=20, n_starts=1),
        "predict": lambda: nn.predict(stack, mask=half),
        "refine_with_fallback": lambda: refine_with_fallback(stack, mask=half),
        "prepare_frames": lambda: prepare.prepare_frames(stack, (32, 32), 32, mask=half),
        "stack_centre": lambda: prepare.stack_centre(stack, mask=half),
        "prtf": lambda: postprocess.prtf(stack.astype(np.complex64), mask=half),
        "process_stack": lambda: stream.process_stack(stack, tmp_path / "out.h5", nn.inference.predict_chunk, mask=half),
        "iter_chunks": lambda: next(stream.iter_chunks(stack, nn.inference.predict_chunk, mask=half)),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"mask must hold booleans or integers \(True/1 = unmeasured\), got float64"):
            call()
        assert not (tmp_path / "out.h5").exists(), name


STACK = object()  # stands for the test's stack of patterns among a call's arguments


@pytest.mark.parametrize("function, args, kwargs, message", [
    ("nn.predict", (STACK,), {"batch_size": 2.5}, r"batch_size must be a whole number >= 1, got 2.5"),
    ("nn.predict", (STACK,), {"threshold": float("nan")}, r"threshold must be a fraction in \(0, 1\)"),
    ("nn.predict", (STACK,), {"precision": "fp64"}, r"precision must be one of auto, fp32, bf16"),
    ("nn.predict", (STACK,), {"scale": 2.5}, r"cannot read 64 x 64 patterns at scale 2.5; it can at 1$"),
    ("nn.predict", (STACK,), {"scale": float("nan")}, r"scale must be 'auto' or a scale the model has"),
    ("nn.choose_scale", (STACK,), {"sample": 0}, r"sample must be a whole number >= 1, got 0"),
    ("simulate.simulate", (), {"count": 2.5}, r"count must be a whole number >= 1, got 2.5"),  # drew 2
    ("simulate.simulate", (2,), {"oversampling": 2.5}, r"oversampling must be a whole number >= 1"),
    ("simulate.simulate", (2,), {"seed": 1.5}, r"seed must be a whole number >= 0"),
    ("simulate.simulate", (2,), {"beamstop": float("nan")}, r"the beamstop radius must be a number of pixels >= 0, got nan"),
    ("prepare.prepare_frames", (STACK, (32, 32), 2.5), {}, r"the output size must be an even number .*got 2.5"),  # 2 x 2
    ("prepare.prepare_frames", (STACK, (32, 32), 32), {"bin": 2.5}, r"the bin must be a whole number of pixels"),
    ("prepare.prepare_frames", (STACK, (float("nan"), 3), 32), {}, r"the centre must be two finite numbers"),
    ("prepare.prepare_frames", (STACK, "x", 32), {}, r"the centre must be two finite numbers"),
    ("prepare.stack_centre", (STACK,), {"chunk_size": 0}, r"chunk_size must be a whole number >= 1, got 0"),
])
def test_library_functions_refuse_counts_that_are_not_whole_and_values_out_of_range(function, args, kwargs, message):
    """Each of these ran before: a fraction was cut to a whole number, NaN ran to empty or full supports."""
    import importlib

    from napari_cdinn.simulate import simulate

    module, name = function.rsplit(".", 1)
    fn = getattr(importlib.import_module(f"napari_cdinn.{module}"), name)
    stack = simulate(2, oversampling=2, seed=5)["intensity"]
    with pytest.raises(ValueError, match=message):
        fn(*(stack if a is STACK else a for a in args), **kwargs)
