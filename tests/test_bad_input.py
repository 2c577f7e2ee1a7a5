"""Bad and odd input for every command that reads a stack: one `error:` line or a sensible result.

Documented handling (README, "Bad input"): negative intensities count as 0 (float data; in
integer data they are a detector's marks, unmeasured: tests/test_io.py) and NaN pixels as
unmeasured (masked) by the networks' and the retrieval's modulus step; all-zero frames give a
zero object with chi2 1 (no data: nothing to trust; flagged); one 2-D pattern gives 2-D results;
float64 and integer counts are read as float32.  Everything else exits 2 with one line.
"""

import os

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_cdinn import io
from napari_cdinn.cli import main
from napari_cdinn.simulate import simulate

# cheap settings for each command: the point is the input handling, not the quality
COMMANDS = {
    "predict": [],
    "reconstruct": ["--iterations", "6", "--algorithm", "er"],
}


def _run(command, src, out, capsys):
    code = main([command, str(src), "-o", str(out), *COMMANDS[command]])
    err = capsys.readouterr().err
    return code, err


def _assert_clean_error(code, err):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, err
    assert lines and lines[-1].startswith("error: "), err
    assert "Traceback" not in err
    assert len([ln for ln in lines if ln.startswith("error: ")]) == 1


def _write_text(path):
    path.write_text("this is not an array\n")


def _write_truncated_npy(path):
    np.save(path, np.ones((4, 32, 32), np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write_h5_without_data(path):
    with h5py.File(path, "w") as f:
        f.create_group("entry_1")
        f.attrs["note"] = "no data here"


def _write_mixed_tiff(path):
    import tifffile

    with tifffile.TiffWriter(path) as tif:
        tif.write(np.ones((64, 64), np.float32))
        tif.write(np.ones((32, 32), np.float32))


BAD = {
    "missing.npy": None,
    "empty.npy": lambda p: p.write_bytes(b""),
    "text.npy": _write_text,
    "truncated.npy": _write_truncated_npy,
    "one_d.npy": lambda p: np.save(p, np.ones(64, np.float32)),
    "four_d.npy": lambda p: np.save(p, np.ones((2, 2, 32, 32), np.float32)),
    "complex.npy": lambda p: np.save(p, np.ones((2, 32, 32), np.complex64)),
    "non_square.npy": lambda p: np.save(p, np.ones((2, 32, 48), np.float32)),
    "odd.npy": lambda p: np.save(p, np.ones((2, 33, 33), np.float32)),
    "strings.npy": lambda p: np.save(p, np.array([["a", "b"], ["c", "d"]])),
    "nodata.h5": _write_h5_without_data,
    "nodata.cxi": _write_h5_without_data,
    "garbage.h5": _write_text,
    "empty.tif": lambda p: p.write_bytes(b""),
    "foreign.txt": _write_text,
    "mixed_sizes.tif": _write_mixed_tiff,
    "beyond_float32.npy": lambda p: np.save(p, np.full((2, 64, 64), 1e39)),
    "null.h5": lambda p: h5py.File(p, "w").create_dataset("data", data=h5py.Empty("f4")).file.close(),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_exits_2_and_keeps_output(command, name, tmp_path, capsys):
    src = tmp_path / name
    if BAD[name] is not None:
        BAD[name](src)
    out = tmp_path / "result.npz"
    out.write_bytes(b"existing result")
    code, err = _run(command, src, out, capsys)
    _assert_clean_error(code, err)
    assert out.read_bytes() == b"existing result"
    assert sorted(os.listdir(tmp_path)) == sorted({name, "result.npz"} & set(os.listdir(tmp_path)))


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(
    "argv_extra, message",
    [(["--device", "cuda"], "CUDA"), (["--device", "tpu"], "device"), (["--batch-size", "0"], "positive")],
)
def test_bad_options_exit_2(command, argv_extra, message, tmp_path, capsys):
    src = tmp_path / "x.npy"
    np.save(src, simulate(2, oversampling=2)["intensity"])
    code = main([command, str(src), "-o", str(tmp_path / "r.npz"), *COMMANDS[command], *argv_extra])
    err = capsys.readouterr().err
    _assert_clean_error(code, err)
    assert message.lower() in err.lower()
    assert not (tmp_path / "r.npz").exists()


def test_bad_output_extension_exits_2(tmp_path, capsys):
    src = tmp_path / "x.npy"
    np.save(src, simulate(2, oversampling=2)["intensity"])
    for command in COMMANDS:
        code, err = _run(command, src, tmp_path / "r.txt", capsys)
        _assert_clean_error(code, err)


BAD_MASKS = {
    "wrong_shape.npy": (lambda p: np.save(p, np.zeros((64, 32), bool)), "must be shaped (64, 64) or (2, 64, 64) like the patterns, got (64, 32)"),
    "wrong_count.npy": (lambda p: np.save(p, np.zeros((3, 64, 64), bool)), "like the patterns, got (3, 64, 64)"),
    "float.npy": (lambda p: np.save(p, np.zeros((64, 64), np.float32)), "booleans or integers"),
    "missing.npy": (None, "does not exist"),
    "folder": (lambda p: p.mkdir(), "is a folder; give the mask file"),
    "text.npy": (_write_text, "mask"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("name", sorted(BAD_MASKS))
def test_bad_mask_exits_2_without_output(command, name, tmp_path, capsys):
    src = tmp_path / "x.npy"
    np.save(src, simulate(2, oversampling=2)["intensity"])
    write, message = BAD_MASKS[name]
    if write is not None:
        write(tmp_path / name)
    code = main([command, str(src), "-o", str(tmp_path / "r.h5"), "--mask", str(tmp_path / name), *COMMANDS[command]])
    err = capsys.readouterr().err
    _assert_clean_error(code, err)
    assert message in err
    assert sorted(os.listdir(tmp_path)) == sorted({"x.npy", name} & set(os.listdir(tmp_path)))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bad_mask_in_the_input_exits_2(command, tmp_path, capsys):
    src = tmp_path / "x.npz"
    np.savez(src, intensity=simulate(2, oversampling=2)["intensity"], mask=np.zeros((64, 64), np.float64))
    code, err = _run(command, src, tmp_path / "r.npz", capsys)
    _assert_clean_error(code, err)
    assert "the mask in 'x.npz' must hold booleans or integers (True/1 = unmeasured), got float64" in err
    assert not (tmp_path / "r.npz").exists()


@pytest.fixture(scope="module")
def pattern64():
    return simulate(3, seed=4, oversampling=2)["intensity"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_odd_but_valid_input(command, pattern64, tmp_path, capsys):
    cases = {
        "single.npy": pattern64[0],
        "float64.npy": pattern64.astype(np.float64),
        "counts.npy": np.round(pattern64 / pattern64.max() * 60000).astype(np.uint16),
    }
    for name, arr in cases.items():
        src = tmp_path / name
        np.save(src, arr)
        out = tmp_path / f"{name}.npz"
        code, err = _run(command, src, out, capsys)
        assert code == 0, err
        res = io.read_result(out)
        assert res["amplitude"].shape[:-2] == arr.shape[:-2]
        assert res["phase"].dtype == np.float32
        assert np.all(np.isfinite(res["amplitude"])) and np.all(np.isfinite(res["chi2"]))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_nan_negative_and_zero_frames_are_handled(command, pattern64, tmp_path, capsys):
    data = pattern64.copy()
    data[0, 30:34, 30:34] = np.nan  # unmeasured pixels
    data[1] -= 0.01 * data[1].max()  # background over-subtracted: negative values
    data[2] = 0.0  # an empty frame
    src = tmp_path / "odd.h5"
    with h5py.File(src, "w") as f:
        f["data"] = data
    out = tmp_path / "res.h5"
    code, err = _run(command, src, out, capsys)
    assert code == 0, err
    res = io.read_result(out)
    for key in ("amplitude", "phase", "chi2"):
        assert np.all(np.isfinite(res[key])), key
    assert np.all(res["amplitude"][2] == 0)
    assert res["chi2"][2] == 1.0  # an empty frame is never trusted


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.uint16, np.int32]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=40),
    ),
    command=st.sampled_from(sorted(COMMANDS)),
)
def test_random_arrays_never_traceback(arr, command, tmp_path_factory, capsys):
    """Any dtype (NaN and inf included), any shape: a result or one clean error line."""
    folder = tmp_path_factory.mktemp("rand")
    src = folder / "x.npy"
    np.save(src, arr)
    out = folder / "r.npz"
    code, err = _run(command, src, out, capsys)
    assert "Traceback" not in err
    if code == 0:
        res = io.read_result(out)
        assert np.all(np.isfinite(res["amplitude"]))
        assert res["amplitude"].shape[:-2] == arr.shape[:-2]
    else:
        _assert_clean_error(code, err)
        assert not out.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--init-from", "no-such-model"],
        ["--init-from", "{tmp}/weights.txt"],
        ["--init-from", "model", "--arch", "paper"],  # the shipped weights are the shared network
        ["--phase-weight", "-1"],
        ["--data-weight", "-0.5"],
        ["--support-weight", "-1"],
        ["--miss-weight", "0"],
        ["--time-limit", "0"],
        ["--preset", "huge"],
    ],
)
def test_train_bad_options_exit_2_without_writing(tmp_path, capsys, args):
    (tmp_path / "weights.txt").write_text("not weights")
    out = tmp_path / "model"
    code = main(["train", "--out", str(out), *[a.format(tmp=tmp_path) for a in args]])
    _assert_clean_error(code, capsys.readouterr().err)
    assert not out.exists()
