"""The size policy: objects larger than the network's 32 pixels are read at a coarser scale, or declined."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from napari_cdinn import nn, physics, pipelines, simulate
from napari_cdinn.nn.models import resolve_model, scales_for


@pytest.fixture(scope="module")
def large():
    """128 x 128 patterns of 64-pixel objects (2x oversampled): too large for the network at full resolution."""
    return simulate.simulate(8, size=64, seed=11, oversampling=2)


def test_scales_for_lists_the_crops_a_model_can_read():
    assert scales_for((64, 64), 2) == (1,)
    assert scales_for((128, 128), 2) == (1, 2)
    assert scales_for((256, 256), 2) == (1, 2, 4)
    assert scales_for((64, 64), 1) == (1, 2)
    # sides that are not a power of 2 times the input: the central 64 b pixels decimated b times,
    # where the object's side 32 c is a whole number (160: 40 and 80 pixels; 224: not 37.3)
    assert scales_for((192, 192), 2) == (1, 1.5, 3)
    assert scales_for((96, 96), 2) == (1.5,)
    assert scales_for((160, 160), 2) == (1.25, 2.5)
    assert scales_for((224, 224), 2) == (1.75, 3.5)
    assert scales_for((192, 192), 2, 64) == (1.5,)
    assert all(type(c) is int for c in scales_for((256, 256), 2))
    for shape, size in (((32, 32), 32), ((64, 64), 64), ((96, 96), 64), ((48, 48), 32)):
        with pytest.raises(ValueError):
            scales_for(shape, 2, size)


def test_a_model_reads_a_192_pixel_pattern_at_1_5_times_the_pixel_size():
    """48-pixel objects 4x oversampled (192 x 192, as ``cdinn prepare`` cuts them from many detectors): the
    central 128 pixels decimated twice are the 2x-oversampled pattern of the object at 1.5x the pixel size."""
    data = simulate.simulate(8, size=48, seed=15, oversampling=4)
    info = nn.choose_scale(data["intensity"], "model2x")
    assert (info.scale, info.decimation) == (1.5, 2)
    res = nn.predict(data["intensity"], model=info)
    assert res["amplitude"].shape == (8, 48, 48)
    for scale in (1, 3):  # the data decide: the other scales fit worse
        assert np.median(nn.predict(data["intensity"], model="model2x", scale=scale)["chi2"]) > 1.5 * np.median(res["chi2"])
    scores = physics.compare(res["amplitude"] * np.exp(1j * res["phase"]), data["amplitude"], data["phase"])
    assert np.median(scores["iou"]) > 0.75
    refined = pipelines.refine_with_fallback(data["intensity"][:4], model="model2x", fallback="never")
    assert refined["amplitude"].shape == (4, 192, 192) and refined["start"].all()
    scores = physics.compare(physics.crop(refined["amplitude"] * np.exp(1j * refined["phase"]), (48, 48)),
                             data["amplitude"][:4], data["phase"][:4])
    assert np.median(scores["iou"]) > 0.9 and np.median(refined["chi2"]) < 1e-3
    with pytest.raises(ValueError, match="it can at 1, 1.5, 3"):
        nn.predict(data["intensity"][:1], model="model2x", scale=2)


def test_cli_reads_a_192_pixel_stack_at_1_5_and_refines_it_for_a_48_pixel_guess(tmp_path, capsys):
    from napari_cdinn.cli import main
    from napari_cdinn.nn.inference import REFINE_OPTIONS

    src = tmp_path / "wide.npy"
    np.save(src, simulate.simulate(8, size=48, seed=15, oversampling=4)["intensity"])
    out = tmp_path / "nn.h5"
    assert main(["predict", str(src), "-o", str(out), "--model", "model2x", "--device", "cpu"]) == 0
    assert "read at 1.5x the pixel size (the central 128 x 128 pixels" in capsys.readouterr().err
    with h5py.File(out) as fh:
        assert fh["amplitude"].shape == (8, 48, 48) and float(fh.attrs["scale"]) == 1.5
    out = tmp_path / "pr.h5"
    assert main(["reconstruct", str(src), "--init", "nn", "-o", str(out), "--model", "model2x", "--fallback", "never",
                 "--device", "cpu"]) == 0
    with h5py.File(out) as fh:  # 50 iterations per 32 pixels of the guess: 75 for 48
        assert json.loads(fh.attrs["refine"]) == json.loads(json.dumps(dict(REFINE_OPTIONS, iterations=75)))
        assert fh["amplitude"].shape == (8, 192, 192) and fh["start"][:].all()



def test_resolve_model_at_a_scale_sets_the_decimation_and_rejects_what_it_cannot_read():
    info = resolve_model("model2x", (128, 128), 2)
    assert (info.scale, info.decimation) == (2, 1)
    assert resolve_model("model2x", (256, 256), 2).decimation == 2
    with pytest.raises(ValueError, match="scale 4"):
        resolve_model("model2x", (128, 128), 4)
    # a scale is chosen for one pattern size: another size starts again at 1
    assert resolve_model(info, (64, 64)).scale == 1


def test_choose_scale_reads_large_objects_coarser_and_returns_them_at_the_pattern_pixel_size(large):
    info = nn.choose_scale(large["intensity"], "model2x")
    assert info.scale == 2 and info.misfit is not None and nn.declined(info) is None
    res = nn.predict(large["intensity"], model=info)
    assert res["amplitude"].shape == (8, 64, 64)
    full = nn.predict(large["intensity"], model="model2x", scale=1)
    assert np.median(res["chi2"]) < 0.5 * np.median(full["chi2"])
    scores = physics.compare(res["amplitude"] * np.exp(1j * res["phase"]), large["amplitude"], large["phase"])
    assert np.median(scores["iou"]) > 0.7  # the network alone, at half resolution
    # "auto" with a name chooses the same scale itself
    assert nn.predict(large["intensity"][:2], model="model2x")["amplitude"].shape == (2, 64, 64)


def test_small_objects_in_large_frames_stay_at_full_resolution():
    small = simulate.simulate(8, size=32, seed=12, oversampling=4)  # 128 x 128 patterns of 32-pixel objects
    assert nn.choose_scale(small["intensity"], "model2x").scale == 1


def test_predict_chunk_never_chooses_per_chunk(large):
    from napari_cdinn.nn.inference import predict_chunk

    chosen = nn.choose_scale(large["intensity"], "model2x")
    assert predict_chunk(large["intensity"][:2], model=chosen)["amplitude"].shape == (2, 64, 64)
    assert predict_chunk(large["intensity"][:2], model="model2x")["amplitude"].shape == (2, 32, 32)


def test_patterns_no_scale_reads_are_declined_with_a_sentence():
    flat = simulate.simulate(6, size=64, seed=13, oversampling=1)  # 64-pixel objects in 64 x 64: not oversampled
    info = nn.choose_scale(flat["intensity"], "model2x")
    reason = nn.declined(info)
    assert reason is not None and "random starts" in reason and "\n" not in reason
    assert pipelines.seeding_model(flat["intensity"], "model2x", None) is None
    # the refinement reads the same evidence from its prediction of every frame (one scale: no sample pass)
    res = pipelines.refine_with_fallback(flat["intensity"], model="model2x", iterations=20, n_starts=1)
    assert not res["start"].any() and np.isfinite(res["chi2"]).all()
    ok = simulate.simulate(4, seed=13, oversampling=2)["intensity"]
    info, guess = pipelines._seeding_guess(ok, "model2x", None, "cpu")
    assert info.misfit == pytest.approx(np.median(guess["chi2"] - guess["chi2_noise"])) and guess["chi2"].shape == (4,)


def test_autocorrelation_extent_is_a_lower_bound_and_says_nothing_behind_a_beamstop():
    y, x = np.indices((64, 64)) - 32
    disk = (np.hypot(y, x) < 12).astype(np.complex64)  # 23-24 pixels wide
    intensity = physics.intensity(disk)
    width = physics.support_extent(disk != 0)
    bound = physics.autocorrelation_extent(intensity)
    assert 0.6 * width <= bound <= width
    stop = np.zeros((64, 64), bool)
    stop[31:34, 31:34] = True
    assert np.isnan(physics.autocorrelation_extent(intensity, stop))
    assert physics.autocorrelation_extent(np.stack([intensity, intensity])).shape == (2,)


def test_a_guess_narrower_than_the_autocorrelation_seeds_nothing():
    y, x = np.indices((64, 64)) - 32
    disk = np.hypot(y, x) < 12
    intensity = physics.intensity(disk.astype(np.complex64))[None]
    assert pipelines.guess_fits_autocorrelation(intensity, disk[None], None).all()
    assert not pipelines.guess_fits_autocorrelation(intensity, (np.hypot(y, x) < 4)[None], None).any()


def test_refinement_from_the_coarse_guess_fits_large_objects(large, monkeypatch):
    from napari_cdinn import retrieval

    runs, reconstruct = [], retrieval.reconstruct
    monkeypatch.setattr(retrieval, "reconstruct", lambda *a, **kw: runs.append(kw["iterations"]) or reconstruct(*a, **kw))
    res = pipelines.refine_with_fallback(large["intensity"][:4], model="model2x", fallback="never")
    assert res["amplitude"].shape == (4, 128, 128)
    assert res["start"].all()
    assert np.median(res["chi2"]) < 1e-3
    assert runs == [100]  # a 64-pixel guess is refined twice as long as a 32-pixel one


def test_the_refinement_grows_with_the_object():
    from napari_cdinn.nn.inference import REFINE_OPTIONS, refine_options

    assert [refine_options(side)["iterations"] for side in (16, 32, 64, 128)] == [50, 50, 100, 200]
    assert refine_options(128, iterations=30) == dict(REFINE_OPTIONS, iterations=30)


def test_cli_reconstruct_declines_the_network_and_runs_the_protocol(tmp_path):
    flat = simulate.simulate(4, size=64, seed=14, oversampling=1)
    src = tmp_path / "flat.npz"
    np.savez(src, intensity=flat["intensity"])
    out = tmp_path / "out.h5"
    run = subprocess.run([sys.executable, "-m", "napari_cdinn.cli", "reconstruct", str(src), "--init", "nn",
                          "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "cannot read these patterns" in run.stderr
    with h5py.File(out) as fh:
        assert not fh["start"][:].any()
        assert fh.attrs["refine"] == "null"  # no refinement ran: none is recorded


def test_cli_reconstruct_records_the_refinement_grown_with_the_guess(tmp_path, large):
    from napari_cdinn.cli import main
    from napari_cdinn.nn.inference import REFINE_OPTIONS

    src = tmp_path / "large.npy"
    np.save(src, large["intensity"][:2])
    common = ["--model", "model2x", "--fallback", "never", "--device", "cpu"]
    for extra, iterations in (([], 100), (["--iterations", "30"], 30)):  # a 64-pixel guess: twice 32 pixels'
        out = tmp_path / f"out{iterations}.h5"
        assert main(["reconstruct", str(src), "--init", "nn", "-o", str(out), *common, *extra]) == 0
        with h5py.File(out) as fh:
            assert json.loads(fh.attrs["refine"]) == json.loads(json.dumps(dict(REFINE_OPTIONS, iterations=iterations)))
            assert int(fh.attrs["scale"]) == 2


def test_cli_predict_announces_the_scale_and_records_it(tmp_path, large):
    src = tmp_path / "large.npz"
    np.savez(src, intensity=large["intensity"])
    out = tmp_path / "out.h5"
    run = subprocess.run([sys.executable, "-m", "napari_cdinn.cli", "predict", str(src), "--out", str(out),
                          "--model", "model2x"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "2x the pixel size" in run.stderr
    with h5py.File(out) as fh:
        assert fh["amplitude"].shape == (8, 64, 64)
        assert int(fh.attrs["scale"]) == 2
    # with no model named, the policy weighs the 64-pixel network too, which fits these patterns better
    out = tmp_path / "auto.h5"
    run = subprocess.run([sys.executable, "-m", "napari_cdinn.cli", "predict", str(src), "--out", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "pixel size" not in run.stderr
    with h5py.File(out) as fh:
        assert fh["amplitude"].shape == (8, 64, 64)
        assert (Path(fh.attrs["model"]).stem, fh.attrs["arch"], int(fh.attrs["scale"])) == ("model128", "deep2x", 1)
