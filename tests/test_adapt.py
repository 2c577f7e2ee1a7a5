"""Adapting a network to a measured stack without ground truth (``nn.adapt``, ``cdinn adapt``)."""

import hashlib

import numpy as np
import pytest

from napari_cdinn.cli import main
from napari_cdinn.jobs import Kind
from napari_cdinn.nn import load_model, predict, resolve_model
from napari_cdinn.nn.adapt import adapt, data_sha256, split_frames
from napari_cdinn.nn.models import read_card
from napari_cdinn.simulate import simulate

SIM = simulate(48, seed=5, oversampling=2, families="textured")
#: A few steps of batch 8 from the shipped model2x on 48 frames, 12 held out.
TINY = {"model": "model2x", "holdout": 0.25, "min_frames": 16, "batch_size": 8, "eval_every": 2, "test_count": 8,
        "recall_count": 16, "device": "cpu"}


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """A model adapted for 6 steps, its card and events, and the base file's hash before the run."""
    base = resolve_model("model2x").path
    before = _sha(base)
    out = tmp_path_factory.mktemp("adapt") / "adapted"
    events = []
    card = adapt(SIM["intensity"], out, max_steps=6, callback=events.append, source="sim.npz", **TINY)
    return out, card, events, base, before


def test_adapt_writes_a_loadable_model_folder_naming_its_base_and_data(adapted):
    out, card, _events, base, before = adapted
    assert resolve_model(out).path.name == "model.safetensors"
    res = predict(SIM["intensity"], model=out, device="cpu")
    assert res["amplitude"].shape == (48, 32, 32) and np.all(np.isfinite(res["chi2"]))
    stored = read_card(out / "model.safetensors")
    assert stored == {k: v for k, v in card.items() if k != "path"} and card["path"] == str(out)
    assert card["base"]["name"] == "model2x" and card["base"]["sha256"] == before
    assert card["data"]["sha256"] == data_sha256(SIM["intensity"]) and card["data"]["frames"] == 48
    assert card["data"]["holdout_frames"] == 12 and card["data"]["adapted_frames"] == 36
    assert card["data"]["path"].endswith("sim.npz") and card["steps"] == 6 and card["ended"] == "steps"
    for scores in card["test_scores"].values():
        assert set(scores["base"]) == set(scores["adapted"]) and 0 <= scores["adapted"]["iou_median"] <= 1
    assert _sha(base) == before  # the base model's file is only read
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_a_stack_read_at_a_coarser_scale_is_adapted_at_that_scale(tmp_path):
    """192 x 192 patterns of 4x-oversampled 48-pixel objects: predict reads them at 1.5x the pixel size (the
    central 128 pixels decimated twice), so the network adapts to that crop, and reads it the same way after."""
    from napari_cdinn import nn

    wide = simulate(24, size=48, seed=6, oversampling=4, families="textured")["intensity"]
    card = adapt(wide, tmp_path / "wide", max_steps=2, **dict(TINY, test_count=4, recall_count=8))
    assert card["data"]["scale"] == 1.5 and card["data"]["frames"] == 24
    assert nn.choose_scale(wide, tmp_path / "wide").scale == 1.5
    assert predict(wide[:2], model=tmp_path / "wide", device="cpu")["amplitude"].shape == (2, 48, 48)
    # 2x-oversampled 32-pixel objects: the network reads them whole
    full = adapt(SIM["intensity"][:16], tmp_path / "full", max_steps=1,
                 **dict(TINY, min_frames=8, test_count=0, recall_count=0))
    assert full["data"]["scale"] == 1


def test_the_kept_weights_are_the_best_held_out(adapted):
    out, card, events, _base, _before = adapted
    history = card["history"]
    chi2 = [h["holdout_chi2"] for h in history]
    assert [h["step"] for h in history] == [0, 2, 4, 6]
    held = card["holdout_chi2"]
    # the lowest held-out chi^2 among the weights that remember (the base's always does)
    kept = [h for h in history if h["remembers"]]
    assert history[0]["remembers"] and held["before"] == chi2[0]
    assert held["after"] == min(h["holdout_chi2"] for h in kept) <= held["before"]
    assert card["best_step"] == min(kept, key=lambda h: h["holdout_chi2"])["step"]
    base_recall, tol = card["recall"]["iou_base"], card["recall"]["tolerance"]
    assert base_recall == history[0]["recall_iou"] and set(base_recall) == {"training_mixture", "paper"}
    for h in history:
        assert h["remembers"] == all(h["recall_iou"][k] >= base_recall[k] - tol for k in base_recall)
    assert card["recall"]["iou_kept"] == next(h["recall_iou"] for h in history if h["step"] == card["best_step"])
    # the chi^2 predict reports on the held-out frames is the one the card records
    train, hold = split_frames(48, 0.25, 0)
    assert len(np.intersect1d(train, hold)) == 0 and len(train) + len(hold) == 48
    again = predict(SIM["intensity"][hold], model=out, device="cpu")["chi2"]
    np.testing.assert_allclose(np.median(again), held["after"], rtol=1e-4)
    kinds = [e.kind for e in events]
    assert kinds[0] == Kind.START and kinds[-1] == Kind.DONE and kinds.count(Kind.CHECKPOINT) == 4
    assert events[1]["holdout_chi2"] == chi2[0]


def test_the_base_weights_are_kept_when_nothing_improves(tmp_path):
    card = adapt(SIM["intensity"], tmp_path / "worse", max_steps=4, lr=10.0, **TINY)  # a step that wrecks the net
    assert card["best_step"] == 0 and card["holdout_chi2"]["after"] == card["holdout_chi2"]["before"]
    assert max(h["holdout_chi2"] for h in card["history"][1:]) > card["holdout_chi2"]["before"]
    base, _ = load_model("model2x")
    kept, _ = load_model(tmp_path / "worse")
    for key, value in base.state_dict().items():
        assert np.array_equal(value.numpy(), kept.state_dict()[key].numpy()), key


def test_weights_that_forget_are_not_kept_however_well_they_fit(tmp_path, monkeypatch):
    from napari_cdinn.nn import adapt as adapt_module

    scores = iter([0.9, 0.8, 0.89, 0.7])  # recall IoU at steps 0, 2, 4, 6: only step 4 stays within 0.02
    monkeypatch.setattr(adapt_module._Adapter, "recall_iou", lambda self: {"paper": next(scores)})
    monkeypatch.setattr(adapt_module._Adapter, "holdout_chi2", lambda self: np.array([1.0 - 0.1 * self.step_count]))
    card = adapt(SIM["intensity"], tmp_path / "m", max_steps=6, forget_tolerance=0.02, **dict(TINY, test_count=0))
    assert [h["remembers"] for h in card["history"]] == [True, False, True, False]
    assert card["best_step"] == 4 and card["recall"]["iou_kept"] == {"paper": 0.89}


def test_weights_that_forget_do_not_use_up_the_patience_and_raise_the_guard_weight(tmp_path, monkeypatch):
    from napari_cdinn.nn import adapt as adapt_module

    scores = iter([0.9, 0.5, 0.5, 0.5, 0.9, 0.9])
    monkeypatch.setattr(adapt_module._Adapter, "recall_iou", lambda self: {"paper": next(scores)})
    card = adapt(SIM["intensity"], tmp_path / "m", max_steps=10, patience=2, guard_weight=0.5,
                 **dict(TINY, test_count=0))
    assert card["ended"] == "steps" and card["steps"] == 10  # three forgetting evaluations in a row, no stop
    factor = adapt_module.GUARD_GROWTH
    assert [h["guard_weight"] for h in card["history"]] == [0.5, 0.5 * factor, 0.5 * factor**2, 0.5 * factor**3,
                                                            0.5 * factor**2, 0.5 * factor]


def test_a_stop_keeps_the_best_weights_and_writes_the_model(tmp_path):
    events = []

    def stop():
        return sum(e["event"] == "evaluation" for e in events) >= 3

    card = adapt(SIM["intensity"], tmp_path / "stopped", time_limit_min=30, callback=events.append, stop=stop, **TINY)
    assert card["ended"] == "stopped" and card["steps"] == 4 and events[-1].kind == Kind.STOPPED
    assert card["holdout_chi2"]["after"] == min(h["holdout_chi2"] for h in card["history"] if h["remembers"])
    assert (tmp_path / "stopped" / "model.safetensors").is_file()


def test_an_off_centre_stack_is_adapted_to_re_centred(tmp_path, adapted):
    card = adapt(np.roll(SIM["intensity"], (1, 0), (-2, -1)), tmp_path / "moved", max_steps=2, **TINY)
    assert card["data"]["recentred"] == [1, 0] and adapted[1]["data"]["recentred"] is None
    from napari_cdinn.nn.adapt import recentred_note

    assert "(+1, +0)" in recentred_note(card) and recentred_note(adapted[1]) is None


def test_a_crash_leaves_no_half_written_model(tmp_path):
    def callback(event):
        if event["event"] == "evaluation" and event["step"] > 0:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        adapt(SIM["intensity"], tmp_path / "crashed", callback=callback, **TINY)
    assert list(tmp_path.iterdir()) == []


def test_bad_input_is_one_sentence(tmp_path):
    (tmp_path / "there").mkdir()
    with pytest.raises(ValueError, match="exists"):
        adapt(SIM["intensity"], tmp_path / "there", **TINY)
    with pytest.raises(ValueError, match="at least 64 frames with measured signal, got 48"):
        adapt(SIM["intensity"], tmp_path / "m", **dict(TINY, min_frames=64))
    dark = SIM["intensity"][:24].copy()
    dark[::2] = 0.0  # frames without signal do not count
    with pytest.raises(ValueError, match="got 12 of 24"):
        adapt(dark, tmp_path / "m", **TINY)
    with pytest.raises(ValueError, match="32k"):
        adapt(np.ones((40, 48, 48), np.float32), tmp_path / "m", **TINY)
    with pytest.raises(ValueError, match="must not be negative"):
        adapt(SIM["intensity"], tmp_path / "m", **dict(TINY, forget_tolerance=-0.1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there"]


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_bad_input_exits_2_with_one_error_line(tmp_path, capsys):
    few = tmp_path / "few.npy"
    np.save(few, SIM["intensity"])
    odd = tmp_path / "odd.npy"
    np.save(odd, np.ones((250, 48, 48), np.float32))
    (tmp_path / "exists").mkdir()
    cases = [([str(few), "--out", str(tmp_path / "m")], "at least 200 frames, got 48"),
             ([str(odd), "--out", str(tmp_path / "m")], "32k"),
             ([str(few), "--out", str(tmp_path / "exists")], "exists"),
             ([str(tmp_path / "missing.npy"), "--out", str(tmp_path / "m")], "does not exist"),
             ([str(few), "--out", str(tmp_path / "m"), "--holdout", "0.7"], "fraction in (0, 0.5]")]
    for argv, words in cases:
        code, _out, err = _run(["adapt", *argv], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert not (tmp_path / "m").exists()


def test_cli_adapts_a_file_with_its_own_mask(tmp_path, capsys):
    path = tmp_path / "beamline.npz"
    assert main(["simulate", "--count", "200", "--oversampling", "2", "--beamstop", "1.5", "--photons", "1e5",
                 "--seed", "3", "--out", str(path)]) == 0
    capsys.readouterr()
    code, out, err = _run(["adapt", str(path), "--out", str(tmp_path / "mine"), "--time-limit", "0.01",
                           "--threads", "1", "--device", "cpu", "--seed", "2"], capsys)
    assert code == 0, err
    assert "using the mask in beamline.npz" in err and "held-out chi2 (median of 20 frames): before" in out
    assert "recall, simulated IoU of the base -> the kept weights: training mixture 0." in out
    card = read_card(tmp_path / "mine" / "model.safetensors")
    assert card["data"]["path"] == str(path) and card["data"]["mask"] and card["settings"]["seed"] == 2
    assert card["command"].startswith("cdinn adapt") and card["base"]["name"] == "model2x"
    assert predict(np.load(path)["intensity"][:4], model=tmp_path / "mine", device="cpu")["chi2"].shape == (4,)
