"""Real detector data: object families, the detector model, the mask channel and the noise-aware trust rule."""

import dataclasses

import numpy as np
import pytest
import torch

from napari_cdinn import physics
from napari_cdinn.nn import predict
from napari_cdinn.nn.checkpoint import load_model, save_model
from napari_cdinn.nn.data import make_examples, make_objects, network_input
from napari_cdinn.nn.inference import is_trusted
from napari_cdinn.nn.networks import add_mask_channel, build_model, mask_channel_of
from napari_cdinn.simulate import (
    BLOCK,
    DETECTORS,
    Detector,
    apply_detector,
    detector_mask,
    draw_detector,
    simulate,
    simulate_objects,
)


def test_families_keep_the_paper_examples_and_are_deterministic():
    paper, _ = simulate_objects(64, seed=4)
    mixed, _ = simulate_objects(64, seed=4, families="realistic")
    again, _ = simulate_objects(64, seed=4, families="realistic")
    np.testing.assert_array_equal(mixed, again)
    same = (mixed == paper).all(axis=(1, 2))
    assert 0.3 < same.mean() < 0.8  # the paper's half of the mix is the paper's objects, untouched
    assert mixed.max(axis=(1, 2)).min() == pytest.approx(1.0)


def test_textured_objects_vary_inside_and_holes_are_not_convex():
    amp, pha = simulate_objects(32, seed=2, families="textured")
    sup = amp > physics.SHAPE_THRESHOLD
    inner = [a[s] for a, s in zip(amp, sup)]
    assert np.median([np.percentile(v, 90) - np.percentile(v, 30) for v in inner]) > 0.2
    assert np.all(pha[~sup] == 0)
    from scipy.spatial import ConvexHull, Delaunay

    yy, xx = np.mgrid[0:32, 0:32]
    grid = np.stack([xx.ravel(), yy.ravel()], 1)

    def hull_deficit(objects):  # median fraction of the support's convex hull outside the support
        out = []
        for a in objects:
            pts = np.argwhere(a > physics.SHAPE_THRESHOLD)[:, ::-1]
            inside = (Delaunay(pts[ConvexHull(pts).vertices]).find_simplex(grid) >= 0).reshape(32, 32)
            out.append(1 - (a > physics.SHAPE_THRESHOLD).sum() / inside.sum())
        return np.median(out)

    holes, _ = simulate_objects(32, seed=2, families="holes")
    paper, _ = simulate_objects(32, seed=2)
    assert hull_deficit(holes) > 0.05
    assert hull_deficit(paper) < 0.02


def test_detector_settings_are_deterministic_per_example():
    det = DETECTORS["realistic"]
    a = draw_detector(det, BLOCK + 10, seed=3)
    b = draw_detector(det, 10, seed=3, start=BLOCK)
    for key in a:
        np.testing.assert_array_equal(a[key][BLOCK:], b[key])
    noisy = np.isfinite(a["photons"])
    assert 0.75 < noisy.mean() < 0.95
    assert 1e3 <= a["photons"][noisy].min() and a["photons"][noisy].max() <= 1e9
    assert 0.4 < np.mean(a["beamstop"] > 0) < 0.6


def test_detector_model_counts_and_masks():
    clean = simulate(20, seed=1, oversampling=2)["intensity"]
    settings = {"photons": np.full(20, 1e4), "background": np.zeros(20), "beamstop": np.full(20, 2.0),
                "gap_row": np.full(20, 0.1), "gap_col": np.full(20, -0.2), "gap_width": np.full(20, 2),
                "saturation": np.full(20, np.inf)}
    counts, mask = apply_detector(clean, settings, np.random.default_rng(0))
    assert counts.dtype == np.float32 and np.all(counts == np.round(counts))
    assert mask[:, 32, 32].all() and mask[:, 32 + 6, 5].all() and mask[:, 5, 32 - 13].all()
    assert np.all(counts[mask] == 0)
    assert 0.4e4 < np.median(counts.sum(axis=(1, 2))) < 1e4
    # the same settings on tensors give the same mask
    t_counts, t_mask = apply_detector(torch.from_numpy(clean), settings, torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(t_mask.numpy(), mask)
    assert torch.all(t_counts[t_mask] == 0)
    np.testing.assert_array_equal(detector_mask(settings, 64), mask)
    # saturation masks the brightest pixels
    sat = dict(settings, photons=np.full(20, np.inf), beamstop=np.zeros(20), gap_width=np.zeros(20),
               saturation=np.full(20, 0.5))
    out, m = apply_detector(clean, sat)
    brightest = clean.reshape(20, -1).argmax(1)
    assert m.reshape(20, -1)[np.arange(20), brightest].all()
    assert np.all(out <= 0.5 * clean.max(axis=(1, 2))[:, None, None] + 1e-3)


def test_simulate_with_a_detector_writes_per_frame_masks_and_photons():
    d = simulate(16, seed=5, oversampling=2, families="realistic", detector="realistic")
    assert d["intensity"].shape == (16, 64, 64)
    if "mask" in d:
        assert d["mask"].shape in ((64, 64), (16, 64, 64))
        assert np.all(d["intensity"][np.broadcast_to(d["mask"], d["intensity"].shape)] == 0)
    assert d["photons"].shape == (16,)
    assert simulate(4, oversampling=2, detector=Detector(gaps=1.0))["mask"].ndim == 3
    with pytest.raises(ValueError):
        Detector(photons=(10.0, 1.0))
    with pytest.raises(ValueError):
        simulate(2, detector="nonsense")


def test_examples_carry_the_mask_of_the_pattern():
    ex = make_examples(32, seed=9, input_factor=2, detector=Detector(beamstop=(2.0, 2.0)))
    assert ex["mask"].shape == ex["input"].shape == (32, 64, 64)
    assert np.all(ex["mask"][:, 32, 32] == 1) and np.all(ex["input"][ex["mask"] > 0] == 0)
    objects = make_objects(8, seed=9, detector="realistic")
    assert {"det_photons", "det_beamstop"} <= set(objects)
    x = network_input(ex["input"][:4], ex["mask"][:4], True)
    assert tuple(x.shape) == (4, 2, 64, 64) and float(x[:, 1, 32, 32].min()) == 1.0


def test_mask_channel_starts_where_the_weights_stand(tmp_path):
    net, _ = load_model("model")  # the shipped 32 x 32 model reads no mask
    state = add_mask_channel(net.state_dict(), "shared")
    assert mask_channel_of(state, "shared") and not mask_channel_of(net.state_dict(), "shared")
    assert add_mask_channel(state, "shared") is state  # weights that have it stay as they are
    wide = build_model("shared", mask_channel=True)
    wide.load_state_dict(state)
    save_model(wide, tmp_path / "m.safetensors", {"arch": "shared"})
    loaded, _ = load_model(tmp_path / "m.safetensors")
    assert loaded.mask_channel
    d = simulate(6, seed=3, oversampling=1, beamstop=2)
    a = predict(d["intensity"], model="model", precision="fp32", mask=d["mask"])
    b = predict(d["intensity"], model=tmp_path / "m.safetensors", precision="fp32", mask=d["mask"])
    np.testing.assert_allclose(a["amplitude"], b["amplitude"], atol=1e-5)
    assert load_model("model2x")[0].mask_channel  # the shipped 2x model was trained with it
    with pytest.raises(ValueError):
        build_model("paper", mask_channel=True)


def test_predict_ignores_unmeasured_pixels_and_scores_against_the_noise():
    d = simulate(8, seed=7, oversampling=2, photons=1e4)
    res = predict(d["intensity"], model="model2x")
    np.testing.assert_allclose(res["chi2_noise"], physics.noise_chi2(d["intensity"]), rtol=1e-4)
    assert np.all(res["chi2_noise"] > 1e-3)
    np.testing.assert_array_equal(res["trusted"], is_trusted(res["chi2"], res["chi2_noise"]))
    # NaN pixels and a mask file's pixels are the same thing; their values never matter
    mask = np.zeros((64, 64), bool)
    mask[30:35, 30:35] = True
    hot = d["intensity"].copy()
    hot[:, mask] = 1e9
    nan = d["intensity"].copy()
    nan[:, mask] = np.nan
    a = predict(hot, model="model2x", mask=mask)
    b = predict(nan, model="model2x")
    np.testing.assert_allclose(a["chi2"], b["chi2"], rtol=1e-5)
    np.testing.assert_allclose(a["amplitude"], b["amplitude"], atol=1e-6)
    with pytest.raises(ValueError, match="mask"):
        predict(d["intensity"], model="model2x", mask=np.zeros((32, 32), bool))
    with pytest.raises(ValueError, match="booleans or integers"):
        predict(d["intensity"], model="model2x", mask=np.zeros((64, 64), np.float32))


def test_an_all_masked_frame_is_empty_and_untrusted():
    d = simulate(2, seed=7, oversampling=2)
    mask = np.zeros((2, 64, 64), bool)
    mask[1] = True
    res = predict(d["intensity"], model="model2x", mask=mask)
    assert res["chi2"][1] == 1 and not res["trusted"][1] and not res["amplitude"][1].any()
    assert res["chi2"][0] < 1


def test_noise_chi2_is_the_chi2_of_the_truth():
    noisy = simulate(64, seed=2, oversampling=2, photons=1e4)["intensity"]
    clean = simulate(64, seed=2, oversampling=2)["intensity"]
    floor = physics.noise_chi2(noisy)
    truth = physics.chi2(noisy, clean)
    assert 0.8 < np.median(truth / floor) < 1.2
    assert np.all(physics.noise_chi2(clean) == 0)  # not whole counts: no counting noise
    np.testing.assert_allclose(physics.noise_chi2(torch.from_numpy(noisy)).numpy(), floor, rtol=1e-4)


def test_cli_simulate_detector_options(tmp_path, capsys):
    from napari_cdinn.cli import main

    out = tmp_path / "d.npz"
    argv = ["simulate", "--count", "6", "--oversampling", "2", "--photons", "1e4", "--background", "0.05",
            "--beamstop", "2", "--gaps", "1", "--saturation", "0.5", "--families", "holes", "--out", str(out)]
    assert main(argv) == 0
    with np.load(out) as f:
        mask, inten = f["mask"], f["intensity"]
        assert mask.shape == (6, 64, 64) and mask[:, 32, 32].all()
        assert np.all(inten[mask] == 0) and np.all(inten == np.round(inten))
        assert np.all(f["photons"] == 1e4)
        # the gaps cross the whole frame: a full row and a full column unmeasured in every frame
        assert mask.all(axis=2).any(axis=1).all() and mask.all(axis=1).any(axis=1).all()
    capsys.readouterr()
    bad = tmp_path / "bad.npz"
    for extra in (["--background", "1"], ["--saturation", "0"], ["--saturation", "2"], ["--families", "x"]):
        assert main(["simulate", "--count", "2", "--out", str(bad), *extra]) == 2
        assert capsys.readouterr().err.startswith("error:")
        assert not bad.exists()


def test_an_off_centre_pattern_is_the_centred_one_moved_and_its_object_carries_the_ramp():
    from napari_cdinn.simulate import offset_phase, patterns_from_objects

    centred = simulate(4, seed=3, oversampling=2, families="realistic")
    moves = {"offset_row": np.array([1.0, 0.0, -2.0, 1.0]), "offset_col": np.array([0.0, 1.0, 1.0, -1.0])}
    phase = offset_phase(centred["amplitude"], centred["phase"], moves, 64)
    moved = patterns_from_objects(centred["amplitude"], phase, 2)
    for i in range(4):
        rolled = np.roll(centred["intensity"][i], (int(moves["offset_row"][i]), int(moves["offset_col"][i])), (0, 1))
        np.testing.assert_allclose(moved[i], rolled, atol=1e-5 * rolled.max())
    assert np.all(np.abs(phase) <= np.pi + 1e-6) and np.all(phase[centred["amplitude"] == 0] == 0)
    assert phase.dtype == np.float32 and simulate(2, oversampling=2, detector=Detector(offset=1.0))["phase"].dtype == \
        np.float32
    # the same ramp on tensors, and no offset changes nothing
    t = offset_phase(torch.from_numpy(centred["amplitude"]), torch.from_numpy(centred["phase"]), moves, 64)
    np.testing.assert_allclose(t.numpy(), phase, atol=1e-5)
    assert offset_phase(centred["amplitude"], centred["phase"], {"offset_row": np.zeros(4),
                                                                 "offset_col": np.zeros(4)}, 64) is centred["phase"]


def test_the_offcentre_preset_moves_half_the_patterns_and_keeps_every_other_setting():
    from dataclasses import replace

    det = DETECTORS["realistic-offcentre"]
    assert det == replace(DETECTORS["realistic-clean"], offset=2.0, offset_rate=0.5)
    drawn, plain = draw_detector(det, 4096, seed=5), draw_detector(DETECTORS["realistic-clean"], 4096, seed=5)
    moved = (drawn["offset_row"] != 0) | (drawn["offset_col"] != 0)
    assert 0.47 < moved.mean() < 0.53 and np.abs(drawn["offset_row"]).max() <= 2.0
    assert all(np.array_equal(drawn[k], plain[k]) for k in plain if not k.startswith("offset"))
    assert not np.any(plain["offset_row"]) and not Detector(offset=1.0).ideal and Detector().ideal
    with pytest.raises(ValueError):
        Detector(offset=-1.0)
    # training examples: the pattern the network reads is the (ramped) truth's, moved in the input's pixels
    ex = make_examples(16, seed=2, input_factor=2, detector=Detector(offset=1.5))
    truth = physics.intensity(physics.pad(ex["amplitude"] * np.exp(1j * ex["phase"]), 2))
    fit = physics.chi2(ex["input"] ** 2, truth / truth.max(axis=(-2, -1), keepdims=True))
    assert float(np.max(fit)) < 1e-6


def test_cli_simulate_offset_writes_off_centre_patterns(tmp_path, capsys):
    from napari_cdinn.cli import main

    out = tmp_path / "off.npz"
    assert main(["simulate", "--count", "4", "--oversampling", "2", "--offset", "1.5", "--out", str(out)]) == 0
    with np.load(out) as f:
        inten = f["intensity"]
    centred = simulate(4, oversampling=2)["intensity"]
    assert not np.allclose(inten, centred) and np.allclose(inten.sum((1, 2)), centred.sum((1, 2)), rtol=1e-4)
    capsys.readouterr()
    assert main(["simulate", "--count", "2", "--offset", "-1", "--out", str(tmp_path / "bad.npz")]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_a_stack_cut_off_centre_is_noticed_from_enough_frames():
    from napari_cdinn.nn.inference import centre_offset

    sim = simulate(32, seed=4, oversampling=2, families="realistic", detector="realistic")
    frames, mask = sim["intensity"], sim.get("mask")
    assert centre_offset(frames, mask) is None  # centred, with per-frame beamstops, gaps and saturated peaks
    moved = np.roll(frames, (1, 0), (-2, -1))
    moved_mask = None if mask is None else np.roll(np.broadcast_to(mask, frames.shape), (1, 0), (-2, -1))
    assert centre_offset(moved, moved_mask) == (1, 0)
    assert centre_offset(moved[:8], None if moved_mask is None else moved_mask[:8]) is None  # within a pixel: told
    assert centre_offset(np.roll(frames, (0, -2), (-2, -1))[:8]) == (0, -2)
    assert centre_offset(moved[:4]) is None and centre_offset(np.zeros((32, 64, 64))) is None  # nothing to tell


def test_cli_notes_an_off_centre_stack_and_not_a_centred_one(tmp_path, capsys):
    from napari_cdinn.cli import main

    sim = simulate(32, seed=4, oversampling=2, photons=1e5)
    for name, frames in (("centred", sim["intensity"]), ("moved", np.roll(sim["intensity"], (0, 2), (-2, -1)))):
        np.save(tmp_path / f"{name}.npy", frames)
        assert main(["predict", str(tmp_path / f"{name}.npy"), "-o", str(tmp_path / f"{name}_nn.h5"),
                     "--device", "cpu"]) == 0
        err = capsys.readouterr().err
        assert ("symmetric about a pixel (+0, +2) from their centre pixel" in err) == (name == "moved"), err


def test_ship_measures_the_card_sets_and_the_off_centre_set(tmp_path, monkeypatch):
    import importlib.util
    import json
    from pathlib import Path

    from napari_cdinn.nn import ship, train

    monkeypatch.setattr(ship, "WEIGHTS_DIR", tmp_path)
    train(tmp_path / "run", preset="tiny", arch="shared2x", mask_channel=True, families="realistic",
          detector="realistic-offcentre", train_size=256, val_size=32, epochs=1, batch_size=32, quick_val_size=32)
    card = ship.ship(tmp_path / "run", name="tiny", count=8)
    off = card["test_metrics_offcentre"]
    assert off["count"] == 8 and off["offset"] == 2.0 and 0 <= off["trusted_fraction"] <= 1
    assert card["training_data"]["detector"]["settings"]["offset"] == 2.0
    assert json.loads((tmp_path / "tiny.json").read_text())["test_metrics_offcentre"] == off
    spec = importlib.util.spec_from_file_location("model_card", Path(__file__).parents[1] / "docs" / "model_card.py")
    model_card = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_card)
    text = "\n".join(model_card.metrics_table(card) + model_card.training_data_text(card))
    assert "cut up to 2 px off-centre (`test_metrics_offcentre`) | 8 |" in text
    assert "cut off-centre (zero frequency up to 2 px from the centre pixel, per axis) on 50%" in text


def test_predict_reads_an_off_centre_stack_re_centred_and_ramps_its_objects_back():
    from napari_cdinn import nn
    from napari_cdinn.nn.inference import _fit_intensity, recentre

    sim = simulate(32, seed=4, oversampling=2, photons=1e5)
    centred = predict(sim["intensity"], device="cpu")
    moved = np.roll(sim["intensity"], (0, 2), (-2, -1))
    info = nn.choose_scale(moved, device="cpu")
    assert info.offset == (0, 2) and "(+0, +2)" in nn.off_centre(info)
    res = predict(moved, device="cpu")
    assert res["phase"].dtype == np.float32 and np.abs(res["phase"]).max() <= np.pi + 1e-6
    # the objects are those of the measured (moved) patterns: their own far fields fit the data as reported
    own = physics.chi2(moved, _fit_intensity(res["amplitude"], res["phase"], 2))
    np.testing.assert_allclose(np.median(own), np.median(res["chi2"]), rtol=0.05)
    assert np.median(res["chi2"]) < 1.2 * np.median(centred["chi2"])
    assert res["trusted"].mean() >= centred["trusted"].mean() - 0.1
    assert physics.support_iou(res["support"], centred["support"]).min() > 0.9
    # read as cut, the network fits them worse: that is why the sample decides
    as_cut = predict(moved, model=dataclasses.replace(info, offset=None), device="cpu")
    assert np.median(as_cut["chi2"]) > 2 * np.median(res["chi2"])
    # the moved-in pixels are unmeasured; a 2-D mask stays 2-D
    frames, mask = recentre(moved[:2], None, (0, 2))
    assert mask.shape == (64, 64) and mask[:, -2:].all() and not mask[:, :-2].any()
    np.testing.assert_array_equal(frames[:, :, :-2], sim["intensity"][:2, :, :-2])
