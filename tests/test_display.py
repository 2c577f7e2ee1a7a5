"""Complex display: amplitude as brightness, phase as hue (pure NumPy)."""

import colorsys

import numpy as np
import pytest

from napari_cdinn.display import colour_wheel, complex_to_rgb, phase_colours


def test_hsv_hue_matches_colorsys():
    phase = np.linspace(-np.pi, np.pi, 37)[:-1]
    want = [colorsys.hsv_to_rgb((p + np.pi) / (2 * np.pi), 1.0, 1.0) for p in phase]
    np.testing.assert_allclose(phase_colours(phase), want, atol=1e-6)
    np.testing.assert_allclose(phase_colours(phase + 2 * np.pi), phase_colours(phase), atol=1e-5)  # cyclic


def test_complex_to_rgb_brightness_hue_and_alpha():
    amp = np.array([[[0.0, 0.5], [1.0, 2.0]]], np.float32)  # one frame, max 2
    pha = np.array([[[1.0, -np.pi], [0.0, np.pi / 2]]], np.float32)
    rgba = complex_to_rgb(amp, pha, alpha=True)
    assert rgba.shape == (1, 2, 2, 4) and rgba.dtype == np.float32
    np.testing.assert_allclose(rgba[..., 3], amp / 2)  # transparent where the object is absent
    np.testing.assert_allclose(rgba[..., :3].max(axis=-1), amp / 2, atol=1e-6)  # brightness = amplitude
    assert np.all(rgba[0, 0, 0] == 0)
    # complex input and the twilight map give the same brightness
    z = amp * np.exp(1j * pha)
    rgb = complex_to_rgb(z)
    np.testing.assert_allclose(rgb, rgba[..., :3], atol=1e-6)
    assert complex_to_rgb(z, cmap="twilight").shape == (1, 2, 2, 3)
    # each frame of a stack is scaled by its own maximum unless vmax is given
    stack = np.stack([amp[0], 10 * amp[0]])
    np.testing.assert_allclose(complex_to_rgb(stack, np.zeros_like(stack)).max(axis=(1, 2, 3)), 1.0)
    assert complex_to_rgb(stack, np.zeros_like(stack), vmax=20.0)[0].max() == pytest.approx(0.1)
    with pytest.raises(ValueError):
        complex_to_rgb(amp)


def test_colour_wheel_legend():
    wheel = colour_wheel(33)
    assert wheel.shape == (33, 33, 4) and wheel[0, 0, 3] == 0 and wheel[16, 16, 3] == 1
    np.testing.assert_allclose(wheel[16, 32, :3], phase_colours(0.0), atol=1e-6)  # phase 0 to the right
    np.testing.assert_allclose(wheel[0, 16, :3], phase_colours(np.pi / 2), atol=1e-6)  # +pi/2 up
