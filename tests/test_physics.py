"""Properties of the physics core: FFT conventions, invariances, chi^2, alignment."""

import numpy as np
import pytest
import torch

from napari_cdinn import physics
from napari_cdinn.simulate import simulate_objects


@pytest.fixture(scope="module")
def objects():
    amp, pha = simulate_objects(6, size=32, seed=11)
    return amp * np.exp(1j * pha)


def test_forward_inverse_roundtrip(objects):
    back = physics.inverse(physics.forward(objects))
    np.testing.assert_allclose(back, objects, atol=1e-5)


def test_forward_is_centred_dft(objects):
    o = objects[0]
    ref = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(o)))
    np.testing.assert_allclose(physics.forward(o), ref, atol=1e-6)
    # zero frequency (sum of the object) sits at the frame centre
    f = physics.forward(o)
    assert np.isclose(f[16, 16], o.sum())


def test_torch_and_numpy_agree(objects):
    i_np = physics.intensity(objects)
    i_t = physics.intensity(torch.from_numpy(objects.astype(np.complex64)))
    assert isinstance(i_t, torch.Tensor)
    np.testing.assert_allclose(i_t.numpy(), i_np, rtol=1e-4, atol=1e-3)
    c_np = physics.chi2(i_np, i_np * 1.5)
    c_t = physics.chi2(torch.from_numpy(i_np), torch.from_numpy(i_np * 1.5))
    np.testing.assert_allclose(c_t.numpy(), c_np, atol=1e-9)


@pytest.mark.parametrize("factor", [2, 3])
def test_decimation_identity(objects, factor):
    small = physics.intensity(objects)
    big = physics.intensity(physics.pad(objects, factor))
    assert big.shape[-1] == factor * 32
    np.testing.assert_allclose(physics.decimate(big, factor), small, rtol=1e-6, atol=1e-6 * small.max())
    # complex fields decimate exactly too
    np.testing.assert_allclose(
        physics.decimate(physics.forward(physics.pad(objects, factor)), factor),
        physics.forward(objects),
        atol=1e-6 * np.abs(physics.forward(objects)).max(),
    )


def test_decimate_rejects_bad_size():
    with pytest.raises(ValueError, match="multiple"):
        physics.decimate(np.zeros((63, 63)), 2)


def test_pad_of_a_tensor_matches_numpy_and_passes_gradients(objects):
    import torch

    t = torch.from_numpy(objects).requires_grad_(True)
    big = physics.pad(t, 2)
    np.testing.assert_array_equal(big.detach().numpy(), physics.pad(objects, 2))
    (big.real.sum() + big.imag.sum()).backward()
    assert torch.all(t.grad != 0)


def test_pad_crop_roundtrip(objects):
    np.testing.assert_array_equal(physics.crop(physics.pad(objects, 2), (32, 32)), objects)


def test_invariances_of_the_modulus(objects):
    ref = np.abs(physics.forward(objects))
    tol = 1e-6 * ref.max()
    np.testing.assert_allclose(np.abs(physics.forward(physics.twin(objects))), ref, atol=tol)
    np.testing.assert_allclose(np.abs(physics.forward(physics.shift(objects, (3, -5)))), ref, atol=tol)
    np.testing.assert_allclose(np.abs(physics.forward(objects * np.exp(1.234j))), ref, atol=tol)
    # the twin is an involution and differs from the object
    np.testing.assert_allclose(physics.twin(physics.twin(objects)), objects)
    assert np.abs(physics.twin(objects) - objects).max() > 0.1


@pytest.mark.parametrize("size", [31, 32])
def test_twin_of_odd_and_even_frames_keeps_modulus(size):
    rng = np.random.default_rng(0)
    o = rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))
    np.testing.assert_allclose(np.abs(physics.forward(physics.twin(o))), np.abs(physics.forward(o)), rtol=1e-9)


def test_chi2_zero_for_truth_and_scale_free(objects):
    i = physics.intensity(objects)
    np.testing.assert_allclose(physics.chi2(i, i), 0.0, atol=1e-12)
    np.testing.assert_allclose(physics.chi2(i * 7.0, i * 0.01), 0.0, atol=1e-12)
    other = np.roll(i, 1, axis=0)
    c = physics.chi2(i, other)
    assert c.shape == (len(i),)
    assert np.all(c > 1e-3) and np.all(c <= 1.0)
    np.testing.assert_allclose(physics.chi2(3 * i, 0.2 * other), c, rtol=1e-6)
    # single frame gives a scalar
    assert np.ndim(physics.chi2(i[0], i[0])) == 0


def test_chi2_mask_ignores_masked_pixels(objects):
    i = physics.intensity(objects[0])
    bad = i.copy()
    mask = np.zeros(i.shape, dtype=bool)
    mask[14:18, 14:18] = True
    bad[mask] = 1e9
    assert physics.chi2(bad, i) > 0.5
    assert physics.chi2(bad, i, mask=mask) < 1e-12


def test_chi2_and_its_noise_floor_leave_out_non_finite_measured_pixels(objects):
    """A NaN pixel made the frame score 1 (no fit) unless a caller masked it first."""
    i = np.round(physics.intensity(objects[:2]) * 1e3 / physics.intensity(objects[:2]).max())
    holed = i.copy()
    holed[:, 5, 7], holed[:, 30, 2] = np.nan, np.inf
    mask = ~np.isfinite(holed[0])
    for cast in (np.asarray, torch.as_tensor):
        got = physics.chi2(cast(holed), cast(1.1 * i))
        assert np.all(np.asarray(got) < 1e-10)
        np.testing.assert_allclose(physics.noise_chi2(cast(holed)), physics.noise_chi2(cast(i), cast(mask)), rtol=1e-6)
    predicted = i.copy()
    predicted[0, 5, 8] = np.nan  # a broken prediction is still no fit
    assert physics.chi2(i, predicted)[0] == 1.0


def test_mirror_about_the_origin_pixel_mirrors_the_pattern(objects):
    for dims in ((-2,), (-1,), (-2, -1)):
        np.testing.assert_allclose(physics.intensity(physics.mirror(objects, dims)),
                                   physics.mirror(physics.intensity(objects), dims), rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(physics.mirror(physics.mirror(objects, (-1,)), (-1,)), objects)


def test_alignment_recovers_shifted_twin(objects):
    truth = physics.pad(objects, 2)  # room to shift
    result = physics.shift(physics.twin(truth), (5, -7)) * np.exp(-2.1j)
    aligned, params = physics.align(result, truth, return_params=True)
    np.testing.assert_allclose(aligned, truth, atol=1e-6)
    assert all(p[0] for p in params)  # every frame matched through its twin
    # without the twin the match is worse
    no_twin = physics.align(result, truth, allow_twin=False)
    assert np.abs(no_twin - truth).max() > 0.1


def test_alignment_of_stacks_in_chunks_and_on_tensors(objects, monkeypatch):
    import torch

    truth = physics.pad(objects, 2).astype(np.complex128)
    result = physics.shift(physics.twin(truth), (5, -7)) * np.exp(-2.1j)
    result[1] = physics.shift(truth[1], (2, 3))  # one frame without its twin
    whole, params = physics.align(result, truth, return_params=True)
    monkeypatch.setattr(physics, "_ALIGN_CHUNK", 4)  # chunks of 4 frames give the same answer
    np.testing.assert_array_equal(physics.align(result, truth), whole)
    on_tensors, tensor_params = physics.align(torch.from_numpy(result), torch.from_numpy(truth), return_params=True)
    assert torch.is_tensor(on_tensors) and on_tensors.dtype == torch.complex128
    np.testing.assert_allclose(on_tensors.numpy(), whole, atol=1e-9)
    assert [p[:2] for p in tensor_params] == [p[:2] for p in params] and not params[1][0] and params[0][0]
    shifts = np.array([[1, -2], [0, 5], [-3, 0]])
    rolled = physics.roll_frames(truth[:3], shifts)
    for frame, s, r in zip(truth[:3], shifts, rolled, strict=True):
        np.testing.assert_array_equal(r, np.roll(frame, tuple(s), axis=(0, 1)))


def test_scores(objects):
    amp, pha = np.abs(objects), np.angle(objects) * (np.abs(objects) > 0.1)
    truth = amp * np.exp(1j * pha)
    s = physics.compare(physics.shift(physics.twin(truth), (2, 1)) * 1j, amp, pha)
    np.testing.assert_allclose(s["iou"], 1.0)
    np.testing.assert_allclose(s["phase_rms"], 0.0, atol=1e-6)
    np.testing.assert_allclose(s["amplitude_error"], 0.0, atol=1e-6)
    # a flat phase scores the rms of the (offset-free) true phase
    flat = physics.compare(amp.astype(complex), amp, pha)
    sup = physics.support_from_amplitude(amp)
    expected = [np.std(p[m]) for p, m in zip(pha, sup)]
    np.testing.assert_allclose(flat["phase_rms"], expected, rtol=0.05)
    # IoU of disjoint supports is 0; of empty supports 1
    a = np.zeros((4, 4), bool)
    b = a.copy()
    a[0, 0], b[3, 3] = True, True
    assert physics.support_iou(a, b) == 0.0
    assert physics.support_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0
    # amplitude error is scale-free
    np.testing.assert_allclose(physics.amplitude_error(3 * amp, amp), 0.0, atol=1e-6)


def test_amplitude_from_intensity_cleans_input():
    i = np.array([[4.0, -1.0], [np.nan, np.inf]])
    np.testing.assert_array_equal(physics.amplitude_from_intensity(i), [[2.0, 0.0], [0.0, 0.0]])
    assert physics.amplitude_from_intensity(i).dtype == np.float32


def test_chi2_of_an_empty_frame_is_one():
    z = np.zeros((2, 8, 8))
    np.testing.assert_array_equal(physics.chi2(z, np.ones_like(z)), [1.0, 1.0])
    np.testing.assert_array_equal(physics.chi2(torch.zeros(8, 8), torch.zeros(8, 8)).numpy(), 1.0)
