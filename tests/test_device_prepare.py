"""GPU end to end: a batch prepared on the device gives what the NumPy path gives (checked on CPU tensors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_cdinn import simulate
from napari_cdinn.nn import inference

_FIELDS = ("inputs", "measured", "factor", "unmeasured", "input_mask")


@pytest.fixture(scope="module")
def patterns():
    """Six 2x-oversampled 64 x 64 patterns and four 128 x 128 ones (64-pixel objects)."""
    return (simulate.simulate(6, seed=31, oversampling=2)["intensity"],
            simulate.simulate(4, size=64, seed=32, oversampling=2)["intensity"])


def _dirty(intensity):
    """A copy with NaN, +inf, -inf and negative pixels."""
    data = np.array(intensity, dtype=np.float32)
    data[:, 3, 4] = np.nan
    data[1, 10, :] = np.inf
    data[2, :, 7] = -np.inf
    data[0, 20, 20] = -5.0
    return data


def _beamstop(side):
    """A 2-D mask: a 5 x 5 beamstop at the centre."""
    mask = np.zeros((side, side), bool)
    c = side // 2
    mask[c - 2 : c + 3, c - 2 : c + 3] = True
    return mask


def _frame_masks(count, side, seed=3):
    """A 3-D mask: a few random pixels per frame."""
    return np.random.default_rng(seed).random((count, side, side)) < 0.05


CASES = {
    "plain": lambda small, large: (small, {}),
    "plain, input_factor 1": lambda small, large: (small, {"input_factor": 1}),
    "log transform": lambda small, large: (small, {"transform": "log"}),
    "NaN and inf": lambda small, large: (_dirty(small), {}),
    "2-D mask": lambda small, large: (_dirty(small), {"mask": _beamstop(64)}),
    "3-D mask": lambda small, large: (small, {"mask": _frame_masks(6, 64)}),
    "scale 2, 128 x 128": lambda small, large: (large, {"scale": 2, "mask": _beamstop(128)}),
    "scale 2, input_factor 1": lambda small, large: (_dirty(large)[:, :128, :128], {"scale": 2, "input_factor": 1}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prepare_on_tensors_equals_numpy(case, patterns):
    data, options = CASES[case](*patterns)
    options = {"input_factor": 2, **options}
    expected = inference.prepare(data, **options)
    tensor_options = dict(options)
    if "mask" in options:
        tensor_options["mask"] = torch.from_numpy(options["mask"])
    got = inference.prepare(torch.from_numpy(np.ascontiguousarray(data)), **tensor_options)
    for name, want, have in zip(_FIELDS, expected, got, strict=True):
        if name == "factor":
            assert have == want
            continue
        assert torch.is_tensor(have), name
        assert have.dtype == {"unmeasured": torch.bool}.get(name, torch.float32), name
        assert have.shape == want.shape, name
        np.testing.assert_allclose(have.numpy(), want, rtol=1e-6, atol=1e-6, err_msg=name)  # log10: last bits
    assert got[0].is_contiguous() and got[4].is_contiguous()


def test_prepare_on_tensors_takes_a_numpy_mask(patterns):
    small = patterns[0]
    mask = _beamstop(64)
    want = inference.prepare(small, mask=mask)[3]
    assert np.array_equal(inference.prepare(torch.from_numpy(small), mask=mask)[3].numpy(), want)


def _paths(monkeypatch, intensity, **options):
    """:func:`predict`'s results with batches prepared in NumPy (``host``) and on the device (``device``: the CPU)."""
    monkeypatch.setattr(inference, "ENGINE", "torch")
    calls = []
    device_batches = inference._device_batches
    monkeypatch.setattr(inference, "_device_batches", lambda *a: calls.append(1) or device_batches(*a))
    out = {}
    for where in ("host", "device"):
        monkeypatch.setattr(inference, "PREPARE", where)
        out[where] = inference.predict(intensity, device="cpu", **options)
        assert bool(calls) == (where == "device")
    return out["host"], out["device"]


def _assert_same(host, device):
    assert host.keys() == device.keys()
    for key in host:
        assert device[key].shape == host[key].shape and device[key].dtype == host[key].dtype, key
        if host[key].dtype == bool:
            assert np.mean(device[key] != host[key]) < 1e-3, key  # a pixel at the threshold may flip
        else:
            np.testing.assert_allclose(device[key], host[key], rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("options", [
    {"batch_size": 2},  # 5 frames: batches of 2, 2 and 1
    {"batch_size": 2, "mask": "3-D"},
    {"batch_size": 4, "mask": "2-D", "views": 2},
    {},  # the default batch: one
])
def test_predict_on_the_device_path_equals_the_host_path(options, monkeypatch, patterns):
    data = _dirty(patterns[0])[:5]
    options = dict(options)
    if options.get("mask") == "2-D":
        options["mask"] = _beamstop(64)
    elif options.get("mask") == "3-D":
        options["mask"] = _frame_masks(5, 64)
    _assert_same(*_paths(monkeypatch, data, **options))


def test_predict_on_the_device_path_at_scale_2_and_one_frame(monkeypatch, patterns):
    _assert_same(*_paths(monkeypatch, patterns[1][:3], model="model2x", scale=2, batch_size=2))
    host, device = _paths(monkeypatch, patterns[0][0], batch_size=3)  # a single (H, W) frame
    assert device["amplitude"].shape == (32, 32)
    _assert_same(host, device)


def test_predict_on_the_device_path_reads_read_only_and_other_dtypes(monkeypatch, patterns):
    counts = np.round(patterns[0][:3] * 100).astype(np.uint16)
    _assert_same(*_paths(monkeypatch, counts, batch_size=2))
    frozen = np.array(patterns[0][:3])
    frozen.flags.writeable = False
    _assert_same(*_paths(monkeypatch, frozen, batch_size=2))


def test_default_batch_is_256_on_the_cpu_and_4096_on_a_gpu():
    assert inference._batch_size(None, None) == 256  # the NumPy engine
    assert inference._batch_size(None, torch.device("cpu")) == 256
    assert inference._batch_size(None, torch.device("cuda")) == 4096
    assert inference._batch_size(7, torch.device("cuda")) == 7
    with pytest.raises(ValueError):
        inference.predict(np.ones((2, 64, 64), np.float32), batch_size=0)


def test_batches_are_prepared_on_the_device_only_on_a_gpu(monkeypatch):
    assert not inference._prepare_on_device(None)
    assert not inference._prepare_on_device(torch.device("cpu"))
    assert inference._prepare_on_device(torch.device("cuda"))
    monkeypatch.setattr(inference, "PREPARE", "device")
    assert inference._prepare_on_device(torch.device("cpu")) and not inference._prepare_on_device(None)
    monkeypatch.setattr(inference, "PREPARE", "host")
    assert not inference._prepare_on_device(torch.device("cuda"))


def test_cli_batch_size_default_and_explicit(tmp_path, capsys):
    from napari_cdinn.cli import main

    np.save(tmp_path / "in.npy", simulate.simulate(3, seed=33, oversampling=2)["intensity"])
    assert main(["predict", str(tmp_path / "in.npy"), "-o", str(tmp_path / "a.npz")]) == 0
    assert main(["predict", str(tmp_path / "in.npy"), "-o", str(tmp_path / "b.npz"), "--batch-size", "2"]) == 0
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    np.testing.assert_allclose(a["chi2"], b["chi2"], rtol=1e-5)
