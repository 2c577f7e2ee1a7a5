"""`cdinn predict` / `cdinn reconstruct` over stacks: streamed output, resume, cluster, progress."""

import re

import h5py
import numpy as np
import pytest

from napari_cdinn import io, physics
from napari_cdinn.cli import main
from napari_cdinn.protocol import RESTART_CHI2, RESTART_NOISE
from napari_cdinn.simulate import simulate

FAST = {"predict": [], "reconstruct": ["--iterations", "10", "--algorithm", "hio"]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    path = tmp_path_factory.mktemp("stack") / "stack.cxi"
    data = simulate(11, seed=21, oversampling=2)["intensity"]
    with h5py.File(path, "w") as f:
        f["entry_1/data_1/data"] = data
    return path


@pytest.mark.parametrize("command", sorted(FAST))
def test_streamed_h5_equals_in_memory_npz(command, stack, tmp_path, capsys):
    assert main([command, str(stack), "-o", str(tmp_path / "a.npz"), *FAST[command]]) == 0
    assert main([command, str(stack), "-o", str(tmp_path / "b.h5"), "--chunk-size", "4", *FAST[command]]) == 0
    err = capsys.readouterr().err
    assert "11/11 frames" in err  # the progress bar reached the end
    a, b = io.read_result(tmp_path / "a.npz"), io.read_result(tmp_path / "b.h5")
    for key in ("amplitude", "phase", "chi2"):
        np.testing.assert_allclose(b[key], a[key], atol=1e-5, err_msg=key)
    with h5py.File(tmp_path / "b.h5") as f:
        assert f["amplitude"].compression == "gzip" and f["amplitude"].chunks is not None


def test_resume_needs_a_streamed_output(stack, tmp_path, capsys):
    assert main(["predict", str(stack), "-o", str(tmp_path / "a.npz"), "--resume"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --resume needs")


def test_resume_of_a_finished_run_recomputes_nothing_wrong(stack, tmp_path, capsys):
    out = tmp_path / "r.h5"
    assert main(["predict", str(stack), "-o", str(out), "--chunk-size", "4", "--resume"]) == 0
    first = io.read_result(out)
    capsys.readouterr()
    assert main(["predict", str(stack), "-o", str(out), "--chunk-size", "4", "--resume"]) == 0
    assert "is already complete (made from the same input and options); nothing to do" in capsys.readouterr().err
    np.testing.assert_array_equal(io.read_result(out)["amplitude"], first["amplitude"])
    assert main(["predict", str(stack), "-o", str(out), "--chunk-size", "4", "--resume", "--views", "2"]) == 0
    assert f"wrote {out}" in capsys.readouterr().err  # other options: computed again


def test_scheduler_address_equals_local(stack, tmp_path, capsys):
    distributed = pytest.importorskip("dask.distributed")
    assert main(["predict", str(stack), "-o", str(tmp_path / "local.h5")]) == 0
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cl:
        code = main(["predict", str(stack), "-o", str(tmp_path / "cluster.h5"), "--chunk-size", "3",
                     "--scheduler", cl.scheduler_address])
    assert code == 0, capsys.readouterr().err
    a, b = io.read_result(tmp_path / "local.h5"), io.read_result(tmp_path / "cluster.h5")
    for key in ("amplitude", "phase", "chi2"):
        np.testing.assert_array_equal(b[key], a[key])


def test_unreachable_scheduler_is_one_error_line(stack, tmp_path, capsys):
    code = main(["predict", str(stack), "-o", str(tmp_path / "x.h5"), "--scheduler", "tcp://127.0.0.1:9",
                 "--scheduler-timeout", "2"])  # refused at once; the timeout only bounds the retries
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "Traceback" not in "".join(err)
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("argv, message", [
    (["bench", "--only", "nosuch"], "unknown benchmark"),
    (["bench", "--json", "no/such/folder/b.json"], "does not exist"),
])
def test_bench_bad_arguments_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


# --------------------------------------------------------------------------- masks
@pytest.mark.parametrize("ndim", [2, 3])
def test_mask_file_leaves_its_pixels_free(ndim, tmp_path, capsys):
    clean = simulate(5, seed=22, oversampling=2)["intensity"]
    rng = np.random.default_rng(ndim)
    mask = np.zeros(clean.shape if ndim == 3 else clean.shape[1:], bool)
    mask[..., 28:36, 28:36] = rng.random(mask[..., 28:36, 28:36].shape) < 0.5
    dirty = clean.copy()
    dirty[np.broadcast_to(mask, clean.shape)] = 1e6  # garbage where nothing was measured
    np.save(tmp_path / "clean.npy", clean)
    np.save(tmp_path / "dirty.npy", dirty)
    np.save(tmp_path / "mask.npy", mask.astype(np.uint8))
    argv = ["--mask", str(tmp_path / "mask.npy"), *FAST["reconstruct"]]
    assert main(["reconstruct", str(tmp_path / "clean.npy"), "-o", str(tmp_path / "a.npz"), *argv]) == 0
    assert main(["reconstruct", str(tmp_path / "dirty.npy"), "-o", str(tmp_path / "b.h5"), "--chunk-size", "2",
                 *argv]) == 0
    a, b = io.read_result(tmp_path / "a.npz"), io.read_result(tmp_path / "b.h5")
    for key in ("amplitude", "phase", "chi2"):
        np.testing.assert_allclose(b[key], a[key], atol=1e-5, err_msg=key)
    assert "using the mask" not in capsys.readouterr().err


def test_the_inputs_own_mask_is_used(tmp_path, capsys, monkeypatch):
    from napari_cdinn import physics

    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "--count", "8", "--oversampling", "2", "--beamstop", "2", "--out", "f.npz"]) == 0
    assert main(["reconstruct", "f.npz", "-o", "r.npz", "--iterations", "40"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"using the mask in f\.npz \(13 unmeasured pixels per frame( on average)?\)", err), err
    with np.load("f.npz") as f:
        inten, mask = f["intensity"], f["mask"]
    res, attrs = io.read_result("r.npz", with_attrs=True)
    assert "f.npz" in attrs["mask"]
    fit = physics.intensity(res["amplitude"] * np.exp(1j * res["phase"]))
    # chi2 is that of the measured pixels: the beamstop's zeros are not data
    np.testing.assert_allclose(physics.chi2(inten, fit, np.broadcast_to(mask, inten.shape)), res["chi2"], rtol=0.05)
    assert (physics.chi2(inten, fit) > 2 * res["chi2"]).all()


def test_init_nn_records_its_start_and_is_never_worse(tmp_path, capsys):

    data = simulate(6, seed=23, oversampling=2)["intensity"]
    data[5] = np.roll(data[5], 9, axis=0)  # not a diffraction pattern the network knows: untrusted
    np.save(tmp_path / "p.npy", data)
    common = ["--device", "cpu", "--seed", "3"]
    assert main(["reconstruct", str(tmp_path / "p.npy"), "-o", str(tmp_path / "random.npz"), *common]) == 0
    random = io.read_result(tmp_path / "random.npz")
    assert (random["start"] == 0).all()
    runs = {}
    for rule in ("always", "auto", "never"):
        out = tmp_path / f"{rule}.h5"
        assert main(["reconstruct", str(tmp_path / "p.npy"), "-o", str(out), "--init", "nn", "--iterations", "20",
                     "--fallback", rule, *common]) == 0, capsys.readouterr().err
        runs[rule] = io.read_result(out)
        assert runs[rule]["start"].dtype == np.uint8 and runs[rule]["start"].shape == (6,)
    assert (runs["never"]["start"] == 1).all()
    assert (runs["always"]["chi2"] <= random["chi2"]).all()  # the same protocol runs on every frame
    auto = runs["auto"]
    kept = auto["start"] == 1
    assert ((auto["chi2"] <= random["chi2"] * (1 + 1e-4)) | (kept & (auto["chi2"] <= RESTART_CHI2))).all()
    assert auto["chi2"][5] <= random["chi2"][5] * (1 + 1e-4)  # an untrusted guess: the protocol ran too


def test_predict_and_init_nn_read_the_mask(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "--count", "4", "--oversampling", "2", "--beamstop", "3", "--out", "f.npz"]) == 0
    with np.load("f.npz") as f:
        clean, mask = f["intensity"], f["mask"]
    dirty = clean.copy()
    dirty[np.broadcast_to(mask, clean.shape)] = 1e6
    np.save("dirty.npy", dirty)
    np.save("mask.npy", mask)
    assert main(["predict", "f.npz", "-o", "a.npz"]) == 0
    err = capsys.readouterr().err
    assert "using the mask in f.npz" in err
    assert main(["predict", "dirty.npy", "-o", "b.h5", "--mask", "mask.npy", "--chunk-size", "3"]) == 0
    a, b = io.read_result("a.npz"), io.read_result("b.h5")
    for key in ("amplitude", "phase", "chi2"):
        np.testing.assert_allclose(b[key], a[key], atol=1e-5, err_msg=key)
    # one line on how many frames the trust rule passes
    assert f"{int(a['trusted'].sum())} of 4 frames trusted (chi2 - chi2_noise <= " in err
    assert main(["reconstruct", "dirty.npy", "-o", "r.npz", "--mask", "mask.npy", "--init", "nn",
                 "--iterations", "20", "--fallback", "never"]) == 0
    r = io.read_result("r.npz")
    assert (r["start"] == 1).all()
    # the counting-noise floor of the measured pixels (0: noise-free data are not counts), and the verdict
    np.testing.assert_allclose(r["chi2_noise"], physics.noise_chi2(np.where(mask, 0, clean), mask), rtol=1e-5)
    fit = int((r["chi2"] - r["chi2_noise"] <= np.maximum(RESTART_CHI2, RESTART_NOISE * r["chi2_noise"])).sum())
    assert f"{fit} of 4 frames fit the data within the counting noise" in capsys.readouterr().err


# --------------------------------------------------------------------------- PRTF
def test_prtf_streams_per_frame_and_prints_the_median_resolution(tmp_path, capsys):
    data = simulate(5, seed=24, oversampling=2, photons=1e5)
    np.save(tmp_path / "p.npy", data["intensity"])
    argv = ["reconstruct", str(tmp_path / "p.npy"), "--starts", "2", "--prtf", "--iterations", "60", "--device", "cpu"]
    assert main([*argv, "-o", str(tmp_path / "a.npz")]) == 0
    assert main([*argv, "-o", str(tmp_path / "b.h5"), "--chunk-size", "2"]) == 0
    err = capsys.readouterr().err
    lines = re.findall(r"PRTF resolution .*median of 5 frame\(s\): ([0-9.]+) cycles/pixel \(half-period ([0-9.]+) "
                       r"pixels\)", err)
    assert len(lines) == 2, err
    q, half = (float(v) for v in lines[0])
    assert 0 < q <= 0.5 and half == pytest.approx(1 / (2 * q), rel=0.01)
    (a, a_attrs), (b, b_attrs) = (io.read_result(tmp_path / f, with_attrs=True) for f in ("a.npz", "b.h5"))
    assert a["prtf"].shape == (5, 32) and a["resolution"].shape == (5,)
    np.testing.assert_allclose(b["prtf"], a["prtf"], atol=1e-5)  # streamed in chunks of 2: the same
    np.testing.assert_allclose(b["resolution"], a["resolution"])
    for attrs in (a_attrs, b_attrs):  # the shells' frequencies: an attribute written once
        np.testing.assert_allclose(attrs["prtf_q"], (np.arange(32) + 0.5) / 64)
        assert attrs["prtf"] is True and attrs["prtf_level"] == "1/e"
    with h5py.File(tmp_path / "b.h5") as f:
        assert f["prtf"].shape == (5, 32) and "prtf_q" not in f


def test_prtf_needs_two_starts(tmp_path, capsys):
    """``--starts 1`` with ``--prtf``: one error line (the default, ``protocol.STARTS``, is enough)."""
    np.save(tmp_path / "p.npy", simulate(2, seed=25, oversampling=2)["intensity"])
    out = tmp_path / "r.npz"
    assert main(["reconstruct", str(tmp_path / "p.npy"), "-o", str(out), "--prtf", "--starts", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --prtf") and "--starts" in err[0]
    assert not out.exists()


def test_prtf_with_init_nn_comes_from_the_protocols_random_starts(tmp_path, capsys):
    np.save(tmp_path / "p.npy", simulate(3, seed=26, oversampling=2)["intensity"])
    common = ["reconstruct", str(tmp_path / "p.npy"), "--device", "cpu", "--starts", "2", "--prtf"]
    assert main([*common, "-o", str(tmp_path / "random.npz")]) == 0
    assert main([*common, "-o", str(tmp_path / "nn.npz"), "--init", "nn", "--iterations", "20",
                 "--fallback", "never"]) == 0, capsys.readouterr().err
    random, seeded = io.read_result(tmp_path / "random.npz"), io.read_result(tmp_path / "nn.npz")
    assert (seeded["start"] == 1).all()  # the rule still picks the kept result
    np.testing.assert_allclose(seeded["prtf"], random["prtf"], atol=1e-5)
    np.testing.assert_allclose(seeded["resolution"], random["resolution"])


def test_faint_frames_that_fit_are_named_with_what_to_do(tmp_path, capsys, monkeypatch):
    from napari_cdinn.pipelines import LOW_DOSE_CHI2, fits

    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "--count", "4", "--oversampling", "2", "--photons", "1000", "--seed", "5",
                 "--out", "faint.npz"]) == 0
    assert main(["reconstruct", "faint.npz", "-o", "r.npz", "--iterations", "100"]) == 0
    r = io.read_result("r.npz")
    faint = fits(r["chi2"], r["chi2_noise"]) & (r["chi2_noise"] > LOW_DOSE_CHI2)
    assert (r["chi2_noise"] > LOW_DOSE_CHI2).all() and faint.any()  # 1e3 photons: every frame is faint
    err = capsys.readouterr().err
    assert f"{int(faint.sum())} of them too faint" in err and "on faint frames --init nn is right" in err
