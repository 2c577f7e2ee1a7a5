"""The NumPy engine of inference: the networks in NumPy agree with torch, and small CPU jobs never import torch."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from napari_cdinn import device
from napari_cdinn.nn import inference
from napari_cdinn.nn.checkpoint import load_model, save_model
from napari_cdinn.nn.networks import build_model
from napari_cdinn.nn.numpy_net import NumpyNet, load_numpy_model
from napari_cdinn.simulate import simulate

ARCHS = [("paper", False), ("shared", False), ("shared", True), ("shared2x", False), ("shared2x", True),
         ("deep2x", True)]


def _inputs(net, n=3, seed=0):
    """Random network inputs ``(n, C, S m, S m)`` for ``net``: amplitudes in 0..1 and, with the mask channel, a 0/1 map."""
    rng = np.random.default_rng(seed)
    side = net.size * net.input_factor
    x = rng.random((n, 1, side, side), dtype=np.float32)
    if net.mask_channel:
        x = np.concatenate([x, (rng.random(x.shape) < 0.1).astype(np.float32)], 1)
    return x


def _assert_same_outputs(numpy_net, torch_net, x, atol=1e-4):
    with torch.inference_mode():
        expected = torch_net(torch.from_numpy(x))
    got = numpy_net(x)
    for g, e in zip(got, expected):
        assert g.dtype == np.float32 and g.shape == (len(x), 1, numpy_net.size, numpy_net.size)
        np.testing.assert_allclose(g, e.numpy(), atol=atol, rtol=0)


@pytest.mark.parametrize(("arch", "mask"), ARCHS)
def test_random_weights_match_torch(arch, mask, tmp_path):
    torch.manual_seed(1)
    model = build_model(arch, mask)
    with torch.no_grad():  # weights of a trained net's spread, so the outputs are not all near 0.5
        for p in model.parameters():
            p.mul_(3.0)
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    net, card = load_numpy_model(path)
    assert (net.arch, net.input_factor, net.mask_channel, net.input_transform, card) == (
        arch, 2 if arch.endswith("2x") else 1, mask, "linear", {})
    _assert_same_outputs(net, load_model(path)[0], _inputs(net))


@pytest.mark.parametrize("name", ["model", "model2x"])
def test_shipped_weights_match_torch(name):
    net, _ = load_numpy_model(name)
    ref, _ = load_model(name)  # float32: the torch engine's precision="fp32"
    assert (net.arch, net.mask_channel, net.input_transform) == (ref.arch, ref.mask_channel, ref.input_transform)
    intensity = simulate(4, seed=5, oversampling=2 * net.input_factor)["intensity"]
    inputs, _, _, unmeasured, input_mask = inference.prepare(intensity, net.input_transform, net.input_factor)
    x = inference.network_input(inputs, input_mask, net.mask_channel, as_numpy=True)
    _assert_same_outputs(net, ref, x)


def test_weights_of_another_network_are_refused(tmp_path):
    state = {k: v.numpy() for k, v in build_model("shared").state_dict().items()}
    wrong = tmp_path / "wrong.safetensors"
    save_file(state, str(wrong), metadata={"arch": "paper"})  # the shared net's names under the pair's architecture
    with pytest.raises(ValueError, match="does not hold the weights of a 'paper' network"):
        load_numpy_model(wrong)
    with pytest.raises(KeyError):
        NumpyNet({**state, "extra.weight": np.zeros(1, np.float32)}, "shared")
    state["shape.layers.0.bias"][0] = np.nan
    diverged = tmp_path / "nan.safetensors"
    save_file(state, str(diverged), metadata={"arch": "shared"})
    with pytest.raises(ValueError) as numpy_error:
        load_numpy_model(diverged)
    with pytest.raises(ValueError) as torch_error:
        load_model(diverged)
    assert str(numpy_error.value) == str(torch_error.value)


def _both_engines(monkeypatch, intensity, **options):
    """:func:`predict`'s results on the NumPy engine and on torch in float32."""
    out = {}
    for engine in ("numpy", "torch"):
        monkeypatch.setattr(inference, "ENGINE", engine)
        out[engine] = inference.predict(intensity, device="cpu", precision="fp32", **options)
    return out["numpy"], out["torch"]


def _masked(intensity):
    """A copy with a NaN column in every frame, and a 3 x 3 beamstop mask at the centre."""
    data = intensity.copy()
    data[..., 5] = np.nan
    mask = np.zeros(data.shape[-2:], bool)
    c = data.shape[-1] // 2
    mask[c - 1 : c + 2, c - 1 : c + 2] = True
    return data, mask


@pytest.mark.parametrize(("oversampling", "views", "masked", "scale"), [
    (2, 1, False, "auto"),  # model2x (mask channel)
    (2, 1, True, "auto"),
    (2, 2, True, "auto"),
    (1, 1, True, "auto"),  # model (no mask channel)
    (1, 2, False, "auto"),
    (4, 1, False, 2),  # read at twice the pixel size, interpolated back
])
def test_predict_engines_agree(monkeypatch, oversampling, views, masked, scale):
    intensity = simulate(4, seed=11, oversampling=oversampling, photons=1e5)["intensity"]
    mask = None
    if masked:
        intensity, mask = _masked(intensity)
    intensity[-1] = 0  # a frame without signal: chi2 1, untrusted, empty
    got, ref = _both_engines(monkeypatch, intensity, views=views, mask=mask, scale=scale)
    assert got.keys() == ref.keys()
    for key in got:
        assert got[key].dtype == ref[key].dtype and got[key].shape == ref[key].shape, key
    np.testing.assert_allclose(got["amplitude"], ref["amplitude"], atol=1e-4)
    inside = got["support"] & ref["support"]
    assert (got["support"] != ref["support"]).mean() < 1e-3  # only pixels at the threshold may flip
    wrapped = np.angle(np.exp(1j * (got["phase"] - ref["phase"])))
    assert np.abs(wrapped[inside]).max() < 1e-3
    np.testing.assert_allclose(got["chi2"], ref["chi2"], rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(got["chi2_noise"], ref["chi2_noise"], rtol=1e-6)  # float64 in NumPy, float32 in torch
    np.testing.assert_array_equal(got["trusted"], ref["trusted"])
    assert got["chi2"][-1] == 1 and not got["trusted"][-1] and not got["amplitude"][-1].any()


def test_single_frame_on_the_numpy_engine(monkeypatch):
    monkeypatch.setattr(inference, "ENGINE", "numpy")
    frame = simulate(1, seed=2, oversampling=2)["intensity"][0]
    res = inference.predict(frame, device="cpu")
    assert res["amplitude"].shape == (32, 32) and res["chi2"].shape == () and res["trusted"].dtype == bool
    with pytest.raises(ValueError, match="unknown device"):
        inference.predict(frame, device="gpu")


def test_engine_choice(monkeypatch):
    assert not inference.numpy_engine("cpu", 1)  # torch is imported in this process: it is the faster engine
    monkeypatch.delitem(sys.modules, "torch")  # as in a fresh process (restored after the test)
    assert inference.numpy_engine("cpu", inference.NUMPY_MAX_PATTERNS)
    assert not inference.numpy_engine("cpu", inference.NUMPY_MAX_PATTERNS + 1)
    assert not inference.numpy_engine("cpu", 1, precision="bf16")
    monkeypatch.setattr(inference, "ENGINE", "torch")
    assert not inference.numpy_engine("cpu", 1)


@pytest.mark.parametrize(("platform", "nodes", "version", "expected"), [
    ("linux", [], None, True),  # no GPU driver
    ("linux", ["/dev/nvidiactl"], "2.5.0", False),  # a driver and a CUDA build: ask torch
    ("linux", ["/dev/kfd"], "2.5.0+cpu", True),  # a CPU build
    ("darwin", [], "2.5.0", False),  # MPS
])
def test_cpu_only(monkeypatch, platform, nodes, version, expected):
    from importlib import metadata

    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(device.os.path, "exists", lambda p: p in nodes)
    monkeypatch.setattr(metadata, "version", lambda name: version)
    assert device.cpu_only() is expected


def test_device_name():
    assert device.device_name("cpu") == device.device_name("CPU:0") == "cpu"
    assert device.device_name(torch.device("cpu")) == "cpu"
    for bad in ("cpu:1", "cpu:x", "gpu"):
        with pytest.raises(ValueError, match="unknown device"):
            device.device_name(bad)


def _fresh(code):
    """Run ``code`` in a fresh interpreter; return what it printed."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_small_cpu_jobs_do_not_import_torch(tmp_path):
    path = tmp_path / "two.npz"
    np.savez(path, intensity=simulate(2, seed=3, oversampling=2)["intensity"])
    code = ("import sys; from napari_cdinn.cli import main; "
            f"code = main(['predict', {str(path)!r}, '-o', {str(tmp_path / 'p.h5')!r}, '--views', '2']); "
            "print(code, 'torch' in sys.modules)")
    assert _fresh(code) == "0 False"
    script = ("import sys, numpy as np; from napari_cdinn.nn import inference; inference.NUMPY_MAX_PATTERNS = 2; "
              f"x = np.load({str(path)!r})['intensity']; ")
    assert _fresh(script + "inference.predict(x, device='auto'); print('torch' in sys.modules)") == "False"
    # a larger job, and one asking for bf16, run on torch
    assert _fresh(script + "inference.predict(x, views=2); print('torch' in sys.modules)") == "True"
    assert _fresh(script + "inference.predict(x, precision='bf16'); print('torch' in sys.modules)") == "True"


def test_a_device_that_is_not_the_cpu_asks_torch():
    code = ("import sys, numpy as np; from napari_cdinn.nn import predict\n"
            "try:\n    predict(np.ones((1, 64, 64), np.float32), device='cuda')\n"
            "except ValueError as exc:\n    print(type(exc).__name__)\n"
            "print('torch' in sys.modules)")
    assert _fresh(code).split()[-1] == "True"  # the device was resolved by torch (and refused, without CUDA)
