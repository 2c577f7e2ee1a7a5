"""Tests of the CDI NN networks, trainer and inference (CPU, small, correctness only)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from napari_cdinn import physics
from napari_cdinn.cli import main
from napari_cdinn.nn import TRUST_CHI2, load_model, predict, train
from napari_cdinn.nn.checkpoint import WEIGHTS_DIR, save_model
from napari_cdinn.nn.data import (
    centre_objects,
    encode_inputs,
    make_examples,
    normalise_amplitudes,
    twin_targets,
)
from napari_cdinn.nn.inference import PHASE_FLOOR
from napari_cdinn.nn.networks import build_model, count_parameters, widen_state_dict
from napari_cdinn.simulate import simulate

SHIPPED = WEIGHTS_DIR / "model.safetensors"


@pytest.fixture(scope="module")
def patterns():
    return simulate(8, oversampling=2, seed=11)


@pytest.mark.parametrize("arch, params, side", [("paper", 1_440_642, 32), ("shared", 1_154_210, 32),
                                                ("shared2x", 1_155_074, 64)])
def test_network_shapes_and_parameters(arch, params, side):
    net = build_model(arch).eval()
    assert count_parameters(net) == params and net.arch == arch and net.input_factor * 32 == side
    with torch.inference_mode():
        amp, phase = net(torch.rand(3, 1, side, side))
    assert amp.shape == phase.shape == (3, 1, 32, 32)
    assert amp.dtype == torch.float32
    assert float(amp.min()) >= 0 and float(amp.max()) <= 1


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("resnet")


def test_targets_are_centred_and_consistent_with_the_input():
    d = make_examples(64, seed=3)
    for prefix in ("target", "twin"):
        obj = d[f"{prefix}_amplitude"] * np.exp(1j * d[f"{prefix}_phase"])
        amp = np.abs(physics.forward(obj))
        np.testing.assert_allclose(amp / amp.max(axis=(1, 2), keepdims=True), d["input"], atol=1e-5)
    # the twin of the twin is the (centred) truth
    a2, p2 = twin_targets(d["twin_amplitude"], d["twin_phase"])
    np.testing.assert_allclose(a2, d["target_amplitude"], atol=1e-6)
    np.testing.assert_allclose(p2, d["target_phase"], atol=1e-6)
    a, _ = centre_objects(d["target_amplitude"], d["target_phase"])
    np.testing.assert_array_equal(a, d["target_amplitude"])  # centring is idempotent


@pytest.mark.parametrize(("factor", "transform"), [(1, "log"), (2, "linear")])
def test_prepare_examples_on_tensors_matches_the_numpy_examples(factor, transform):
    from napari_cdinn.nn.data import make_objects, prepare_examples

    ref = make_examples(64, seed=7, start=1024, input_factor=factor, transform=transform)
    obj = make_objects(64, seed=7, start=1024)
    out = prepare_examples(torch.from_numpy(obj["amplitude"]), torch.from_numpy(obj["phase"]), transform, factor)
    assert set(out) == set(ref) and all(torch.is_tensor(v) for v in out.values())
    for key, value in ref.items():
        np.testing.assert_allclose(out[key].numpy(), value, atol=1e-6, err_msg=key)
    # the inputs are the simulator's own patterns (SciPy FFTs), encoded
    from napari_cdinn.simulate import patterns_from_objects

    amp = np.sqrt(patterns_from_objects(obj["amplitude"], obj["phase"], factor))
    np.testing.assert_allclose(ref["input"], encode_inputs(amp, transform), atol=1e-4 if transform == "log" else 1e-6)
    # each target is the object rolled so that its support's bounding box is centred
    sup = physics.support_from_amplitude(ref["target_amplitude"])
    rows, cols = np.flatnonzero(sup[0].any(1)), np.flatnonzero(sup[0].any(0))
    assert ((rows[0] + rows[-1]) // 2, (cols[0] + cols[-1]) // 2) == (16, 16)
    # the same targets as the NumPy twin: physics.twin on arrays, inverted and negated phase
    np.testing.assert_allclose(twin_targets(ref["twin_amplitude"], ref["twin_phase"])[0], ref["target_amplitude"], atol=1e-6)
    np.testing.assert_allclose(physics.twin(torch.from_numpy(ref["phase"])).numpy(), physics.twin(ref["phase"]).real)


def test_shipped_weights_load_without_pickle(monkeypatch):
    assert SHIPPED.is_file() and SHIPPED.with_suffix(".json").is_file()
    assert not [p for p in WEIGHTS_DIR.iterdir() if p.suffix in (".pt", ".pth", ".pkl", ".ckpt")]

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load (pickle) must not be used for weights")

    monkeypatch.setattr(torch, "load", no_pickle)
    net, card = load_model()
    assert card["arch"] == net.arch
    assert "test_metrics" in card and "command" in card
    for path in WEIGHTS_DIR.glob("*.safetensors"):  # every shipped model loads and has its card
        net, card = load_model(path.stem)
        assert card["config"]["arch"] == net.arch and "test_metrics" in card, path.name


def test_default_model_is_the_best_shipped_one_that_reads_the_size(patterns, tmp_path):
    from napari_cdinn.io import read_result
    from napari_cdinn.nn.inference import default_model

    # model2x reads 96 x 96 too (at 1.5x the pixel size), so it replaces the 1x model there
    assert default_model((64, 64)) == default_model((5, 128, 128)) == default_model((96, 96)) == "model2x"
    assert default_model((32, 32)) == default_model() == "model"
    with pytest.raises(ValueError, match="32k"):
        default_model((50, 50))
    small = physics.decimate(patterns["intensity"], 2)
    for inten, name in ((patterns["intensity"][:3], "model2x"), (small[:3], "model")):
        auto, named = predict(inten, device="cpu"), predict(inten, model=name, device="cpu")
        np.testing.assert_array_equal(auto["phase"], named["phase"])
        np.save(tmp_path / f"{name}_in.npy", inten)
        assert main(["predict", str(tmp_path / f"{name}_in.npy"), "-o", str(tmp_path / f"{name}.h5")]) == 0
        _, attrs = read_result(tmp_path / f"{name}.h5", with_attrs=True)
        assert attrs["model"].endswith(f"{name}.safetensors")


def test_predict_shapes_dtypes_and_single_frame(patterns):
    res = predict(patterns["intensity"], device="cpu")
    assert res["amplitude"].shape == res["phase"].shape == (8, 32, 32)
    assert res["amplitude"].dtype == res["phase"].dtype == np.float32
    assert res["chi2"].shape == res["trusted"].shape == (8,)
    np.testing.assert_allclose(res["amplitude"].max(axis=(1, 2)), 1.0, rtol=1e-6)
    # the phase is 0 where nothing is drawn, and the network's own on the faint rim of the shape
    assert np.all(res["phase"][res["amplitude"] <= PHASE_FLOOR] == 0)
    rim = ~res["support"] & (res["amplitude"] > PHASE_FLOOR)
    assert rim.any() and np.all(res["phase"][rim] != 0)
    assert np.all(np.abs(res["phase"]) <= np.pi + 1e-6)
    np.testing.assert_array_equal(res["trusted"], res["chi2"] <= TRUST_CHI2)
    one = predict(patterns["intensity"][0], device="cpu")
    assert one["amplitude"].shape == (32, 32) and one["chi2"].shape == ()
    np.testing.assert_allclose(one["amplitude"], res["amplitude"][0], atol=1e-5)


def test_predict_is_scale_invariant(patterns):
    a = predict(patterns["intensity"], device="cpu", precision="fp32")
    b = predict(patterns["intensity"] * 3.7e4, device="cpu", precision="fp32")
    np.testing.assert_allclose(a["amplitude"], b["amplitude"], atol=1e-4)
    np.testing.assert_allclose(a["chi2"], b["chi2"], rtol=1e-3, atol=1e-6)


def test_predict_decimates_oversampled_patterns(patterns):
    big = predict(patterns["intensity"], model="model", device="cpu", precision="fp32")
    small = predict(physics.decimate(patterns["intensity"], 2), model="model", device="cpu", precision="fp32")
    np.testing.assert_allclose(big["amplitude"], small["amplitude"], atol=1e-5)
    np.testing.assert_allclose(big["phase"] * big["support"], small["phase"] * big["support"], atol=1e-3)


def test_predict_rejects_bad_sizes_and_devices(patterns):
    with pytest.raises(ValueError, match="32 x 32"):
        predict(np.ones((2, 48, 48), np.float32))
    with pytest.raises(ValueError, match="32 x 32"):
        predict(np.ones((2, 64, 32), np.float32))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            predict(patterns["intensity"], device="cuda")


def test_dihedral_views_are_symmetries_of_the_forward_model():
    from napari_cdinn.nn.inference import VIEWS, dihedral

    d = simulate(3, oversampling=2, seed=9)
    obj = torch.from_numpy((d["amplitude"] * np.exp(1j * d["phase"])).astype(np.complex64))
    inten = torch.from_numpy(d["intensity"])
    assert len(set(VIEWS)) == 8
    for v in range(8):
        fit = physics.intensity(physics.pad(dihedral(obj, v), 2))
        torch.testing.assert_close(fit / fit.amax(), dihedral(inten, v) / inten.amax(), atol=1e-5, rtol=0)
        assert torch.equal(dihedral(dihedral(obj, v), v, inverse=True), obj)
    moved = physics.twin(torch.roll(obj, (3, -5), (-2, -1))) * np.exp(0.7j)
    torch.testing.assert_close(physics.align(moved, obj), obj, atol=1e-5, rtol=0)


def test_view_ensemble_keeps_the_contract_and_is_symmetric(patterns):
    from napari_cdinn.nn.inference import dihedral

    inten = patterns["intensity"][:4]
    res = predict(inten, device="cpu", precision="fp32", views=8)
    assert res["amplitude"].shape == res["phase"].shape == (4, 32, 32) and res["chi2"].dtype == np.float32
    np.testing.assert_allclose(res["amplitude"].max(axis=(1, 2)), 1.0, rtol=1e-6)
    assert np.all(res["phase"][res["amplitude"] <= PHASE_FLOOR] == 0)
    np.testing.assert_array_equal(res["trusted"], res["chi2"] <= TRUST_CHI2)
    single = predict(inten, device="cpu", precision="fp32")
    assert np.median(res["chi2"]) < np.median(single["chi2"])  # the averaged answer fits the data better
    # with all eight views, a mirrored pattern gives the mirrored answer
    mirrored = predict(dihedral(torch.from_numpy(inten), 3).numpy(), device="cpu", precision="fp32", views=8)
    back = dihedral(torch.from_numpy(mirrored["amplitude"] * np.exp(1j * mirrored["phase"])), 3, inverse=True).numpy()
    cmp = physics.compare(back, res["amplitude"], res["phase"])
    assert np.all(cmp["iou"] > 0.99) and np.all(cmp["phase_rms"] < 1e-3)
    np.testing.assert_allclose(mirrored["chi2"], res["chi2"], rtol=1e-3, atol=1e-7)
    for bad in (0, 9, 2.5):
        with pytest.raises(ValueError, match="views"):
            predict(inten, views=bad)
    blank = predict(np.zeros((1, 64, 64), np.float32), views=8)  # no signal: nothing to show or trust
    assert blank["chi2"][0] == 1 and not blank["amplitude"].any() and not blank["trusted"][0]


def test_cli_predict_views_are_recorded_and_checked(patterns, tmp_path, capsys):
    from napari_cdinn.io import read_result

    np.save(tmp_path / "in.npy", patterns["intensity"][:3])
    assert main(["predict", str(tmp_path / "in.npy"), "-o", str(tmp_path / "v.h5"), "--views", "4"]) == 0
    res, attrs = read_result(tmp_path / "v.h5", with_attrs=True)
    assert attrs["views"] == 4
    np.testing.assert_allclose(res["chi2"], predict(patterns["intensity"][:3], views=4)["chi2"], rtol=1e-5)
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "in.npy"), "-o", str(tmp_path / "bad.h5"), "--views", "9"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: argument --views")
    assert not (tmp_path / "bad.h5").exists()


def test_chi2_is_small_for_the_true_object():
    d = simulate(4, oversampling=2, seed=2)
    fit = physics.intensity(physics.pad(d["amplitude"] * np.exp(1j * d["phase"]), 2))
    assert np.all(physics.chi2(d["intensity"], fit) < 1e-6)


def test_tiny_training_loss_falls_and_resumes(tmp_path):
    events = []
    out = tmp_path / "model"
    train(out, preset="tiny", train_size=1024, val_size=64, epochs=2, batch_size=32, lr=2e-3,
          callback=events.append, quick_val_size=64)
    assert (torch.tensor([1e-40]) * 1.0).item() != 0.0  # the run set the process's denormal flag back
    steps = [e for e in events if e["event"] == "step"]
    assert steps[0]["train_loss"] > steps[-1]["train_loss"]
    vals = [e for e in events if e["event"] == "validation"]
    assert len(vals) == 2 and {"iou_median", "phase_rms_median"} <= set(vals[0]["metrics"])
    for name in ("best", "last"):
        assert (out / f"{name}.safetensors").is_file()
    state = json.loads((out / "last.json").read_text())
    assert state["step"] == 64 and state["epoch"] == 2
    net, _ = load_model(out)
    assert net.arch == "paper"
    # resume with more epochs continues from step 64
    state = train(out, preset="tiny", train_size=1024, val_size=64, epochs=3, batch_size=32, resume=True, quick_val_size=64)
    assert state["step"] == 96 and state["epoch"] == 3 and state["ended"] == "done"


def test_stop_flag_saves_a_usable_checkpoint(tmp_path):
    stop = threading.Event()
    seen = []

    def on_event(ev):
        seen.append(ev)
        if ev["event"] == "step":
            stop.set()

    state = train(tmp_path / "m", preset="tiny", train_size=1024, val_size=32, epochs=1, batch_size=32,
                  callback=on_event, stop=stop, quick_val_size=32)
    assert seen[-1]["event"] == "stopped"
    assert 0 < state["step"] < 1024 // 32
    resumed = train(tmp_path / "m", preset="tiny", train_size=1024, val_size=32, epochs=1, batch_size=32,
                    resume=True, quick_val_size=32)
    assert resumed["step"] == 1024 // 32 and resumed["examples"] == 1024


def test_resume_with_epochs_sets_a_new_schedule_length(tmp_path):
    stop = threading.Event()
    lrs = []

    def on_event(ev):
        if ev["event"] == "step":
            lrs.append(ev["lr"])
        if ev["event"] == "epoch":
            stop.set()

    kw = {"preset": "tiny", "train_size": 1024, "val_size": 32, "batch_size": 32, "schedule": "cosine", "quick_val_size": 32}
    state = train(tmp_path / "m", epochs=4, callback=on_event, stop=stop, command="first", **kw)
    assert state["epoch"] == 1 and state["config"]["epochs"] == 4
    # asking for fewer epochs than are done ends one epoch later, on the shortened cosine schedule
    state = train(tmp_path / "m", epochs=1, resume=True, callback=on_event, command="second", **kw)
    assert state["epoch"] == 2 and state["step"] == 64 and state["config"]["epochs"] == 2
    assert state["commands"] == [{"command": "first", "from_examples": 0}, {"command": "second", "from_examples": 1024}]
    assert lrs[-1] < 0.1 * lrs[0]


def test_time_limit_ends_the_schedule_by_the_deadline(tmp_path):
    events = []
    kw = {"preset": "tiny", "train_size": 1024, "val_size": 32, "batch_size": 32, "schedule": "cosine",
          "quick_val_size": 32, "lr": 1e-3}
    state = train(tmp_path / "m", epochs=10_000, time_limit=0.05, callback=events.append, **kw)
    assert events[-1]["event"] == "done"
    assert state["step"] > 0 and state["epoch"] < 10_000 and state["config"]["time_limit_min"] == 0.05
    assert state["ended"] == "time limit" == events[-1]["ended"]
    assert state["elapsed_s"] >= 3.0
    last = state["history"][-1]
    assert last["full_validation"] and last["lr"] < 1e-3  # the cosine decays with the time spent ...
    from napari_cdinn.nn.config import TrainConfig
    from napari_cdinn.nn.trainer import _lr_at

    config = TrainConfig(**{k: v for k, v in kw.items() if k != "quick_val_size"}, epochs=10_000, time_limit_min=0.05)
    assert _lr_at(config, 1, 10**6, elapsed_s=3.0) == pytest.approx(0.02 * 1e-3)  # ... to its floor by the deadline
    # a finished run resumed trains no further
    again = train(tmp_path / "m", epochs=10_000, resume=True, **kw)
    assert again["step"] == state["step"]


def test_weight_averaging_keeps_the_mean_of_the_last_steps_across_resume(tmp_path):
    from safetensors.torch import load_file

    kw = {"preset": "tiny", "train_size": 512, "val_size": 32, "batch_size": 32, "epochs": 2, "quick_val_size": 32,
          "lr": 2e-3}
    events = []
    state = train(tmp_path / "a", average_from=0.5, callback=events.append, **kw)
    assert state["step"] == 32 and state["config"]["average_from"] == 0.5
    card = json.loads((tmp_path / "a" / "average.json").read_text())
    assert card["averaged_steps"] == 17  # the weights after steps 16..32: from half the schedule on
    scored = [e for e in events if "average_metrics" in e]
    assert scored and {"iou_median", "phase_rms_median"} <= set(scored[-1]["average_metrics"])
    assert state["best"]["weights"] in ("current", "average")
    average = load_file(str(tmp_path / "a" / "average.safetensors"))
    last = load_file(str(tmp_path / "a" / "last.safetensors"))
    assert any(not torch.equal(average[k], last[k]) for k in last)
    # stopped after 20 steps (5 averaged) and resumed: the same average as the run without a stop
    stop = threading.Event()
    part = train(tmp_path / "b", average_from=0.5, stop=stop,
                 callback=lambda e: e["event"] == "step" and stop.set(), **kw)
    assert part["step"] == 20 and json.loads((tmp_path / "b" / "average.json").read_text())["averaged_steps"] == 5
    train(tmp_path / "b", resume=True, **kw)
    assert json.loads((tmp_path / "b" / "average.json").read_text())["averaged_steps"] == 17
    resumed = load_file(str(tmp_path / "b" / "average.safetensors"))
    for k in average:
        torch.testing.assert_close(resumed[k], average[k], rtol=1e-5, atol=1e-6)
    # averaging only the last step gives the last weights; the CLI refuses fractions outside [0, 1)
    train(tmp_path / "c", average_from=0.97, **kw)
    only = load_file(str(tmp_path / "c" / "average.safetensors"))
    assert all(torch.equal(only[k], v) for k, v in load_file(str(tmp_path / "c" / "last.safetensors")).items())
    assert main(["train", "--out", str(tmp_path / "d"), "--preset", "tiny", "--average-from", "1"]) == 2
    assert not (tmp_path / "d").exists()


def test_data_workers_simulate_the_same_batches():
    from napari_cdinn.nn.trainer import CHUNK, _epoch_batches, data_pool

    args = (3, 1, 2 * CHUNK + 100, 512, 700, True)  # skip into the first chunk, fresh data
    inline = list(_epoch_batches(*args))
    pool = data_pool(2)
    try:
        ahead = list(_epoch_batches(*args, pool=pool, ahead=2))
    finally:
        pool.shutdown()
    assert len(inline) == len(ahead) == (2 * CHUNK + 100 - 700) // 512
    for a, b in zip(inline, ahead):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert inline[0]["amplitude"].shape == (512, 32, 32) and set(inline[0]) == {"amplitude", "phase"}


def test_training_with_data_workers_gives_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    common = ["--preset", "tiny", "--train-size", "256", "--val-size", "32", "--batch-size", "32", "--epochs", "1",
              "--fresh-data", "--seed", "4"]
    for workers in ("0", "1"):
        assert main(["train", "--out", str(tmp_path / workers), *common, "--data-workers", workers]) == 0
    a, b = (load_file(str(tmp_path / w / "last.safetensors")) for w in ("0", "1"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert main(["train", "--out", str(tmp_path / "x"), *common, "--data-workers", "-1"]) == 2


def test_init_from_starts_at_the_given_weights(tmp_path):
    start = build_model("shared")
    save_model(start, tmp_path / "start.safetensors", {"arch": "shared", "examples": 123})
    stop = threading.Event()
    stop.set()  # stop before the first step: the checkpoint holds the initial weights
    state = train(tmp_path / "m", preset="tiny", train_size=1024, val_size=32, epochs=1, batch_size=32,
                  init_from=tmp_path / "start.safetensors", stop=stop, quick_val_size=32)
    assert state["step"] == 0
    assert state["config"]["arch"] == "shared" and state["config"]["init_examples"] == 123
    back, _ = load_model(tmp_path / "m" / "last.safetensors")
    for (k, v), (_, w) in zip(start.state_dict().items(), back.state_dict().items()):
        assert torch.equal(v, w), k
    with pytest.raises(ValueError, match="the architecture 'paper' conflicts with the 'shared' of the initial weights"):
        train(tmp_path / "n", preset="tiny", arch="paper", init_from=tmp_path / "start.safetensors")


def test_init_from_goes_on_with_the_mask_channel_and_the_data_of_the_weights(tmp_path):
    start = build_model("shared2x", mask_channel=True)
    card = {"arch": "shared2x", "config": {"arch": "shared2x", "families": "realistic", "detector": "realistic"}}
    save_model(start, tmp_path / "start.safetensors", card)
    stop = threading.Event()
    stop.set()
    common = {"preset": "tiny", "train_size": 1024, "val_size": 32, "epochs": 1, "batch_size": 32, "stop": stop,
              "quick_val_size": 32, "init_from": tmp_path / "start.safetensors"}
    config = train(tmp_path / "m", **common)["config"]  # no --mask-channel: the weights' channel goes on
    assert (config["mask_channel"], config["families"], config["detector"]) == (True, "realistic", "realistic")
    config = train(tmp_path / "n", families="paper", **common)["config"]  # what the caller chose wins
    assert (config["mask_channel"], config["families"], config["detector"]) == (True, "paper", "realistic")


def test_phase_weight_scales_the_phase_term_of_the_loss():
    import torch.nn.functional as F

    from napari_cdinn.nn.trainer import twin_invariant_loss

    g = torch.Generator().manual_seed(0)
    la, lp = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    amp, phase = torch.rand(4, 1, 8, 8, generator=g), (torch.rand(4, 1, 8, 8, generator=g) - 0.5) * 6
    args = (la, lp, amp, phase, amp, phase)  # the twin equals the truth: no minimum involved
    l_amp = F.binary_cross_entropy_with_logits(la, amp)
    l_phase = F.binary_cross_entropy_with_logits(lp, (phase + np.pi) / (2 * np.pi))
    for w in (0.0, 1.0, 4.0):
        loss, _ = twin_invariant_loss(*args, phase_weight=w)
        assert torch.allclose(loss, l_amp + w * l_phase, atol=1e-6)


def test_support_weight_adds_the_threshold_classifier_term():
    import torch.nn.functional as F

    from napari_cdinn.nn.trainer import SUPPORT_LOGIT, twin_invariant_loss

    g = torch.Generator().manual_seed(1)
    amp = torch.zeros(2, 1, 8, 8)
    amp[:, :, 2:6, 2:6] = 0.05 + torch.rand(2, 1, 4, 4, generator=g)  # some object pixels under 0.1 of the peak
    phase = torch.zeros_like(amp)
    support = (amp > 0.1 * amp.amax((-2, -1), keepdim=True)).float()
    assert 0 < support.sum() < (amp > 0).sum()
    la, lp = torch.randn(2, 1, 8, 8, generator=g), torch.zeros(2, 1, 8, 8)
    args = (la, lp, amp, phase, amp, phase)
    base, _ = twin_invariant_loss(*args)
    for w, miss in ((0.0, 1.0), (2.0, 1.0), (0.5, 3.0)):
        loss, _ = twin_invariant_loss(*args, support_weight=w, miss_weight=miss)
        weights = 1 + (miss - 1) * support  # object pixels count ``miss`` times
        extra = w * F.binary_cross_entropy_with_logits(la - SUPPORT_LOGIT, support, weight=weights)
        assert torch.allclose(loss, base + extra, atol=1e-6)
    # the term is small where the shape output's 0.1 threshold draws the true support
    sure = torch.where(support > 0, SUPPORT_LOGIT + 8, SUPPORT_LOGIT - 8)
    assert 1 / (1 + np.exp(-SUPPORT_LOGIT)) == pytest.approx(0.1)
    fit, _ = twin_invariant_loss(sure, lp, amp, phase, amp, phase, support_weight=1.0)
    plain, _ = twin_invariant_loss(sure, lp, amp, phase, amp, phase)
    assert float(fit - plain) < 1e-3


def _logits_of(amplitude, phase):
    """Logits whose sigmoid outputs decode to ``amplitude`` (max 1) and ``phase``."""
    a = torch.as_tensor(np.asarray(amplitude, np.float32)).clamp(1e-6, 1 - 1e-6)
    u = ((torch.as_tensor(np.asarray(phase, np.float32)) + np.pi) / (2 * np.pi)).clamp(1e-6, 1 - 1e-6)
    return torch.logit(a)[:, None], torch.logit(u)[:, None]


def test_data_consistency_loss_is_blind_to_twin_and_shift_and_sees_wrong_phases():
    from napari_cdinn.nn.trainer import data_consistency_loss, oversampled_intensity

    ex = make_examples(16, seed=4)
    measured = oversampled_intensity(ex["amplitude"], ex["phase"]).sqrt()
    assert measured.shape == (16, 64, 64) and measured.dtype == torch.float32
    # truth, its centred copy and its centred twin all fit the data (numerically 0)
    for a, p in ((ex["amplitude"], ex["phase"]), (ex["target_amplitude"], ex["target_phase"]),
                 (ex["twin_amplitude"], ex["twin_phase"])):
        assert float(data_consistency_loss(*_logits_of(a, p), measured).max()) < 1e-4
    # the right shape with the phase flattened does not
    flat = data_consistency_loss(*_logits_of(ex["amplitude"], np.zeros_like(ex["phase"])), measured)
    assert float(flat.median()) > 0.05


def test_data_consistency_loss_is_differentiable_and_train_records_its_weight(tmp_path):
    from napari_cdinn.nn.trainer import data_consistency_loss, oversampled_intensity

    ex = make_examples(4, seed=5)
    la, lp = _logits_of(ex["amplitude"], np.zeros_like(ex["phase"]))
    la.requires_grad_(True)
    lp.requires_grad_(True)
    data_consistency_loss(la, lp, oversampled_intensity(ex["amplitude"], ex["phase"]).sqrt()).sum().backward()
    assert torch.isfinite(lp.grad).all() and float(lp.grad.abs().max()) > 0
    events = []
    state = train(tmp_path / "m", preset="tiny", train_size=256, val_size=64, epochs=1, batch_size=32,
                  data_weight=2.0, support_weight=1.0, callback=events.append, quick_val_size=64)
    assert state["config"]["data_weight"] == 2.0 and state["config"]["support_weight"] == 1.0
    val = [e for e in events if e["event"] == "validation"][-1]["metrics"]
    assert 0 < val["chi2_median"] <= 1


def test_evaluate_scores_chi2_as_predict_does():
    from napari_cdinn.nn.trainer import evaluate

    net, _ = load_model(SHIPPED)
    ex = make_examples(32, seed=6)
    m = evaluate(net, ex, torch.device("cpu"))
    res = predict(simulate(32, oversampling=2, seed=6)["intensity"], model=SHIPPED, precision="fp32")
    # same objects: the simulator's example i depends only on (seed, i)
    assert m["chi2_median"] == pytest.approx(float(np.median(res["chi2"])), rel=0.05)


def test_a_continued_run_inherits_the_record_of_its_initial_weights(tmp_path):
    from napari_cdinn.nn.ship import card_from_state

    record = {"event": "checkpoint", "epoch": 1, "examples": 100, "val_loss": 0.912345678,
              "metrics": {"phase_rms_median": 0.30712345}, "full_validation": False}
    parent = {"examples": 1000, "history": [record], "epoch_validations": [], "lineage": ["first run"]}
    save_model(build_model("shared"), tmp_path / "parent.safetensors", parent)
    state = {"config": {"init_from": str(tmp_path / "parent.safetensors")}, "examples": 500, "command": "cdinn train",
             "history": [dict(record, examples=250), dict(record, examples=500, full_validation=True)]}
    card = card_from_state(state)
    assert card["examples"] == 1500 and card["run_examples"] == 500
    assert [h["examples"] for h in card["history"]] == [100, 1250, 1500]
    assert [h["examples"] for h in card["epoch_validations"]] == [1500]
    # the chain's curves keep 4 significant digits; counts stay exact
    assert card["history"][-1]["val_loss"] == 0.9123 and card["history"][0]["metrics"]["phase_rms_median"] == 0.3071
    assert card["lineage"][0] == "first run" and "1,000 examples" in card["lineage"][1]
    # a run continued from that run's checkpoint (not yet shipped) gets the whole chain
    save_model(build_model("shared"), tmp_path / "child.safetensors", state)
    grandchild = card_from_state(dict(state, config={"init_from": str(tmp_path / "child.safetensors")}))
    assert grandchild["examples"] == 2000 and len(grandchild["lineage"]) == 3
    assert [h["examples"] for h in grandchild["history"]] == [100, 1250, 1500, 1750, 2000]
    # a parent trained from random weights starts the lineage with its own commands
    first = {"examples": 1000, "history": [], "commands": [{"command": "cdinn train A", "from_examples": 0},
                                                          {"command": "cdinn train A --resume", "from_examples": 600}]}
    save_model(build_model("shared"), tmp_path / "first.safetensors", first)
    card = card_from_state(dict(state, config={"init_from": str(tmp_path / "first.safetensors")}))
    assert card["lineage"][:2] == ["`cdinn train A` from 0 examples", "`cdinn train A --resume` from 600 examples"]
    assert len(card["lineage"]) == 3
    # a continued run that was resumed names both of its commands
    resumed = dict(state, commands=[{"command": "cdinn train B", "from_examples": 0},
                                    {"command": "cdinn train B --resume", "from_examples": 300}])
    assert card_from_state(resumed)["lineage"][-1].endswith(
        "by `cdinn train B`, then `cdinn train B --resume` from 300 examples: 500 more examples")


def test_fresh_data_draws_new_examples_every_epoch():
    from napari_cdinn.nn.trainer import _epoch_batches

    def first_inputs(epoch, fresh):
        batches = _epoch_batches(0, epoch, 1024, 1024, fresh=fresh)
        return np.sort(next(batches)["amplitude"].reshape(1024, -1).sum(axis=1))

    assert np.array_equal(first_inputs(0, False), first_inputs(1, False))
    assert np.array_equal(first_inputs(0, True), first_inputs(0, False))
    assert not np.allclose(first_inputs(0, True), first_inputs(1, True))


def test_save_and_load_roundtrip(tmp_path):
    net = build_model("shared")
    save_model(net, tmp_path / "m.safetensors", {"arch": "shared"})
    back, card = load_model(tmp_path / "m.safetensors")
    assert back.arch == "shared" and card == {"arch": "shared"}
    for (k, v), (_, w) in zip(net.state_dict().items(), back.state_dict().items()):
        assert torch.equal(v, w), k


def test_cli_predict(tmp_path, patterns):
    src = tmp_path / "in.npz"
    np.savez(src, intensity=patterns["intensity"])
    out = tmp_path / "out.npz"
    assert main(["predict", str(src), "-o", str(out), "--device", "cpu"]) == 0
    with np.load(out) as f:
        assert f["amplitude"].shape == (8, 32, 32) and f["chi2"].shape == (8,) and "trusted" in f.files


def test_cli_predict_bad_input_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.ones((2, 40, 40), np.float32))
    out = tmp_path / "out.npz"
    assert main(["predict", str(bad), "-o", str(out)]) == 2
    assert main(["predict", str(tmp_path / "missing.npy"), "-o", str(out)]) == 2
    assert main(["predict", str(bad), "-o", str(out), "--model", str(tmp_path / "none.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "Traceback" not in err
    assert not out.exists()


def test_short_refinement_from_the_network_lowers_chi2(patterns):
    from napari_cdinn.nn.inference import embed
    from napari_cdinn.retrieval import reconstruct

    guess = predict(patterns["intensity"], device="cpu")
    obj, sup = embed(guess["amplitude"], guess["phase"], 2)
    assert obj.shape == sup.shape == (8, 64, 64)
    np.testing.assert_array_equal(physics.crop(sup, (32, 32)), guess["support"])
    refined = reconstruct(patterns["intensity"], init=obj, support=sup, iterations=20, average=5,
                          fixed_support=True, device="cpu")
    assert np.median(refined["chi2"]) < np.median(guess["chi2"])


def test_cli_report_writes_figures_and_json(tmp_path):
    out = tmp_path / "rep"
    assert main(["report", "--out", str(out), "--count", "16"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["test"]["count"] == 16 and len(rep["worst5"]) == 5 and 0 <= rep["twin_rate"] <= 1
    for name in ("fig2_training", "fig3_examples", "fig45_chi2", "fig6_activations"):
        assert (out / f"{name}.png").stat().st_size > 1000


def test_blank_frames_are_not_trusted():
    res = predict(np.zeros((2, 64, 64), np.float32), device="cpu")
    assert np.all(res["chi2"] == 1) and not res["trusted"].any()
    assert np.all(res["amplitude"] == 0) and np.all(res["phase"] == 0) and not res["support"].any()


def test_nn_train_stays_callable_after_the_trainer_is_imported():
    import napari_cdinn.nn.trainer  # noqa: F401
    from napari_cdinn import nn

    assert callable(nn.train)


def _shared2x_from(net):
    wide = build_model("shared2x").eval()
    wide.load_state_dict(widen_state_dict(net.state_dict()))
    return wide


def test_widened_weights_read_the_decimated_channel_exactly(patterns):
    torch.manual_seed(0)
    narrow = build_model("shared").eval()
    wide = _shared2x_from(narrow)
    amp = np.sqrt(patterns["intensity"])
    amp /= amp.max(axis=(1, 2), keepdims=True)
    with torch.inference_mode():
        a1, p1 = narrow(torch.from_numpy(np.ascontiguousarray(physics.decimate(amp, 2)))[:, None])
        a2, p2 = wide(torch.from_numpy(amp)[:, None])
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(p1, p2)
    with pytest.raises(ValueError, match="shared"):
        widen_state_dict(wide.state_dict())


def test_make_examples_gives_oversampled_inputs_for_2x_models():
    d = make_examples(16, seed=3, input_factor=2)
    assert d["input"].shape == (16, 64, 64) and d["target_amplitude"].shape == (16, 32, 32)
    decimated = normalise_amplitudes(physics.decimate(d["input"], 2))  # the 64 x 64 maximum may lie off the sub-lattice
    np.testing.assert_allclose(decimated, make_examples(16, seed=3)["input"], atol=1e-5)


def test_a_2x_model_predicts_oversampled_patterns_and_rejects_32x32(tmp_path, patterns, capsys):
    model = tmp_path / "wide.safetensors"
    shipped, _ = load_model()
    save_model(_shared2x_from(shipped), model, {"arch": "shared2x"})
    ref = predict(patterns["intensity"], model="model", device="cpu")
    res = predict(patterns["intensity"], model=model, device="cpu")
    assert res["amplitude"].shape == (8, 32, 32)
    # the widened shipped weights give the shipped answer (up to bf16 rounding)
    assert np.median(np.abs(res["chi2"] - ref["chi2"])) < 0.2 * np.median(ref["chi2"])
    four = simulate(2, oversampling=4, seed=11)["intensity"]  # 4x patterns are decimated by 2
    assert predict(four, model=model, device="cpu")["amplitude"].shape == (2, 32, 32)
    with pytest.raises(ValueError, match="2x-oversampled"):
        predict(physics.decimate(patterns["intensity"], 2), model=model, device="cpu")
    src, out = tmp_path / "in32.npy", tmp_path / "out.npz"
    np.save(src, physics.decimate(patterns["intensity"], 2))
    assert main(["predict", str(src), "-o", str(out), "--model", str(model)]) == 2
    assert "2x-oversampled" in capsys.readouterr().err and not out.exists()


def test_data_term_reads_the_linear_2x_input_as_the_measured_amplitudes():
    from napari_cdinn.nn.trainer import _measured_amplitudes, data_consistency_loss

    batch = {k: torch.from_numpy(v) for k, v in make_examples(6, seed=5, input_factor=2).items()}
    logits = [torch.randn(6, 1, 32, 32) for _ in range(2)]
    reused = data_consistency_loss(*logits, _measured_amplitudes(batch, 2, "linear"))
    recomputed = data_consistency_loss(*logits, _measured_amplitudes(batch, 1, "linear"))
    assert _measured_amplitudes(batch, 2, "linear").shape == (6, 64, 64)
    torch.testing.assert_close(reused, recomputed, rtol=1e-4, atol=1e-6)


def test_training_a_2x_model_from_shared_weights(tmp_path):
    from napari_cdinn.nn.report import activation_maps

    start = build_model("shared")
    save_model(start, tmp_path / "start.safetensors", {"arch": "shared", "examples": 5})
    state = train(tmp_path / "m", preset="tiny", arch="shared2x", train_size=64, val_size=32, epochs=1,
                  batch_size=32, init_from=tmp_path / "start.safetensors", data_weight=1.0, quick_val_size=32)
    assert state["config"]["arch"] == "shared2x" and state["step"] == 2
    net, _ = load_model(tmp_path / "m")
    assert net.arch == "shared2x" and net.input_factor == 2
    maps = activation_maps(net, make_examples(3, seed=1, input_factor=2)["input"])
    assert maps["shared"]["conv2"].shape == (3, 32, 32)
