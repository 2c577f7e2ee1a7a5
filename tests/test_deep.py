"""Networks for larger objects: ``deep2x`` draws 64-pixel objects from 2x-oversampled 128 x 128 patterns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_cdinn import physics, simulate
from napari_cdinn.nn import inference, predict, train
from napari_cdinn.nn.checkpoint import load_model, save_model
from napari_cdinn.nn.models import candidates, default_model, object_size_of, resolve_model, scales_for
from napari_cdinn.nn.networks import build_model, count_parameters, deepen_state_dict, level_widths


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A ``deep2x`` model with the mask channel and random weights, saved as safetensors."""
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("deep") / "deep.safetensors"
    save_model(build_model("deep2x", mask_channel=True), path)
    return path


@pytest.fixture(scope="module")
def patterns():
    """128 x 128 patterns of 64-pixel objects, noisy, behind a 2-pixel beamstop."""
    return simulate.simulate(4, size=64, seed=21, oversampling=2, photons=1e5, beamstop=2)


def test_one_more_level_per_doubling_of_the_object():
    assert level_widths(32) == ((32, 64, 128), (128, 64, 32))  # the paper's
    assert level_widths(64) == ((32, 64, 128, 256), (256, 128, 64, 32))
    assert (object_size_of("shared2x"), object_size_of("deep2x")) == (32, 64)
    net = build_model("deep2x", mask_channel=True)
    assert (net.arch, net.input_factor, net.size, net.mask_channel) == ("deep2x", 2, 64, True)
    assert count_parameters(net) == 4_696_706  # the figure networks.py documents
    amp, phase = net(torch.rand(2, 2, 128, 128))
    assert amp.shape == phase.shape == (2, 1, 64, 64)
    # every output pixel hears every input pixel: a change in one corner moves the opposite one
    x = torch.zeros(1, 2, 128, 128, requires_grad=True)
    net.logits(x)[0][0, 0, -1, -1].backward()
    assert x.grad[0, 0, :2, :2].abs().sum() > 0


def test_sizes_a_64_pixel_model_reads(deep):
    assert scales_for((128, 128), 2, 64) == (1,)
    assert scales_for((256, 256), 2, 64) == (1, 2)
    info = resolve_model(deep, (128, 128))
    assert (info.arch, info.size, info.decimation, info.scale) == ("deep2x", 64, 1, 1)
    assert resolve_model(deep, (256, 256)).decimation == 2
    with pytest.raises(ValueError, match=r"2x-oversampled patterns of 128 x 128 pixels or more, got 64 x 64"):
        resolve_model(deep, (64, 64))
    with pytest.raises(ValueError, match="64 x 64"):
        resolve_model(deep, (96, 96))
    assert [c.scale for c in candidates(deep, (256, 256))] == [1, 2]


def test_with_no_model_named_the_policy_weighs_one_shipped_model_per_object_size():
    assert [(c.name, c.scale) for c in candidates(None, (64, 64))] == [("model2x", 1)]
    assert [(c.name, c.scale) for c in candidates(None, (128, 128))] == [("model2x", 1), ("model2x", 2),
                                                                         ("model128", 1)]
    assert [(c.name, c.size) for c in candidates(None, (256, 256))][-2:] == [("model128", 64)] * 2
    assert [(c.name, c.scale) for c in candidates(None, (32, 32))] == [("model", 1)]
    assert default_model((128, 128)) == "model2x"


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_predict_draws_64_pixel_objects(deep, patterns, engine, monkeypatch):
    monkeypatch.setattr(inference, "ENGINE", engine)
    res = predict(patterns["intensity"], model=deep, device="cpu", mask=patterns["mask"], precision="fp32")
    assert res["amplitude"].shape == res["phase"].shape == res["support"].shape == (4, 64, 64)
    assert np.isfinite(res["chi2"]).all() and (res["chi2"] <= 1).all()
    # the chi^2 is the misfit of the 64-pixel object padded twice, on the measured pixels
    obj = physics.pad(res["amplitude"] * np.exp(1j * res["phase"]), 2)
    measured = np.where(patterns["mask"], 0, patterns["intensity"])
    expected = physics.chi2(measured, physics.intensity(obj), patterns["mask"])
    np.testing.assert_allclose(res["chi2"], expected, rtol=1e-3)


def test_both_engines_agree_on_64_pixel_objects(deep, patterns, monkeypatch):
    out = {}
    for engine in ("numpy", "torch"):
        monkeypatch.setattr(inference, "ENGINE", engine)
        out[engine] = predict(patterns["intensity"], model=deep, device="cpu", mask=patterns["mask"], precision="fp32")
    np.testing.assert_allclose(out["numpy"]["amplitude"], out["torch"]["amplitude"], atol=1e-4)
    np.testing.assert_allclose(out["numpy"]["chi2"], out["torch"]["chi2"], rtol=1e-4)


def test_a_64_pixel_model_reads_a_larger_pattern_at_a_coarser_scale(deep):
    big = simulate.simulate(2, size=64, seed=22, oversampling=4)["intensity"]  # 256 x 256
    res = predict(big, model=deep, device="cpu", scale=2)
    assert res["amplitude"].shape == (2, 128, 128)
    assert predict(big, model=deep, device="cpu", scale=1)["amplitude"].shape == (2, 64, 64)


def test_training_a_deep2x_network_simulates_64_pixel_objects(tmp_path):
    state = train(tmp_path / "m", preset="tiny", arch="deep2x", mask_channel=True, families="realistic",
                  detector="realistic", train_size=64, val_size=16, batch_size=16, epochs=1, quick_val_size=16)
    assert state["step"] == 4 and np.isfinite(state["history"][-1]["val_loss"])
    net, card = load_model(tmp_path / "m")
    assert (net.arch, net.size, card["config"]["arch"]) == ("deep2x", 64, "deep2x")
    data = simulate.simulate(2, size=64, seed=23, oversampling=2)
    assert predict(data["intensity"], model=tmp_path / "m", device="cpu")["amplitude"].shape == (2, 64, 64)


def test_a_deep2x_network_starts_from_trained_32_pixel_weights(tmp_path):
    small = build_model("shared2x", mask_channel=True)
    fresh = build_model("deep2x", mask_channel=True).state_dict()
    state = deepen_state_dict(small.state_dict(), fresh)
    trained = small.state_dict()
    # the outer levels are the trained ones: the encoder's first three, the decoders' last three and last conv
    assert torch.equal(state["encoder.layers.12.weight"], trained["encoder.layers.12.weight"])
    assert torch.equal(state["phase.layers.20.weight"], trained["phase.layers.15.weight"])
    assert torch.equal(state["shape.layers.10.weight"], trained["shape.layers.5.weight"])
    # the conv after the new level reads twice the channels: the trained kernel on the first half
    assert torch.equal(state["shape.layers.5.weight"][:, :128], trained["shape.layers.0.weight"])
    assert torch.equal(state["shape.layers.5.weight"][:, 128:], fresh["shape.layers.5.weight"][:, 128:])
    assert torch.equal(state["encoder.layers.15.weight"], fresh["encoder.layers.15.weight"])  # the new level
    with pytest.raises(ValueError, match="do not fit"):
        deepen_state_dict(build_model("shared2x").state_dict(), fresh)  # no mask channel against one
    # the trainer does it when 32-pixel weights start a deep2x run
    save_model(small, tmp_path / "small.safetensors")
    train(tmp_path / "m", preset="tiny", arch="deep2x", mask_channel=True, init_from=str(tmp_path / "small.safetensors"),
          train_size=16, val_size=8, batch_size=16, epochs=1, quick_val_size=8, lr=1e-12)
    net, card = load_model(tmp_path / "m")
    assert (net.arch, card["config"]["init_from"]) == ("deep2x", str(tmp_path / "small.safetensors"))
    assert torch.allclose(net.state_dict()["encoder.layers.0.weight"], trained["encoder.layers.0.weight"], atol=1e-6)
