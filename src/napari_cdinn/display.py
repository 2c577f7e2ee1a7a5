"""Complex images for the eye: amplitude as brightness, phase as hue on a cyclic colour map.

The display PyNX and cohere users look at (PyNX's ``complex2rgbalin``): one RGB(A) image per
complex frame, with the phase undefined (transparent) where the object is absent.  Pure NumPy
(matplotlib only for a named colour map other than ``"hsv"``); no Qt, no napari.
"""

from __future__ import annotations

import numpy as np

__all__ = ["colour_wheel", "complex_to_rgb", "phase_colours"]


def _hsv_hue(h):
    """RGB (..., 3) of the fully saturated, full-value HSV hue ``h`` in [0, 1)."""
    h6 = (np.asarray(h, np.float32) % 1.0) * 6.0
    # the distance of each channel's hue centre (0, 2, 4 sixths for r, g, b) on the circle of six
    channels = [np.clip(np.abs((h6 - c + 3.0) % 6.0 - 3.0), 0.0, 3.0) for c in (0.0, 2.0, 4.0)]
    return np.stack([np.clip(2.0 - d, 0.0, 1.0) for d in channels], axis=-1).astype(np.float32)


def phase_colours(phase, *, cmap="hsv"):
    """RGB colours (..., 3), float32 in [0, 1], of phases in radians on a cyclic colour map.

    Parameters
    ----------
    phase : array_like, float
        Radians; any value (the map is periodic: ``phase`` and ``phase + 2 pi`` look the same).
    cmap : str
        ``"hsv"`` (NumPy, the default) or the name of a cyclic matplotlib colour map
        (``"twilight"``, ``"twilight_shifted"``).
    """
    h = (np.asarray(phase, np.float64) + np.pi) / (2 * np.pi) % 1.0
    if cmap == "hsv":
        return _hsv_hue(h)
    import matplotlib

    return np.asarray(matplotlib.colormaps[cmap](h)[..., :3], dtype=np.float32)


def complex_to_rgb(amplitude, phase=None, *, cmap="hsv", alpha=False, vmax=None):
    """One colour image per complex frame: brightness = amplitude, hue = phase.

    Parameters
    ----------
    amplitude : array_like, float or complex, (..., H, W)
        Amplitudes (then ``phase`` is required), or complex values (``phase`` None).
    phase : array_like, float, (..., H, W), optional
        Radians.
    cmap : str
        Cyclic colour map of the phase (:func:`phase_colours`).
    alpha : bool
        Return RGBA with alpha = brightness: transparent where the object is absent.
    vmax : float, optional
        Amplitude shown at full brightness.  Default: each frame's maximum (frames of a stack
        are the trailing two axes).

    Returns
    -------
    ndarray, float32, (..., H, W, 3) or (..., H, W, 4), values in [0, 1].
    """
    a = np.asarray(amplitude)
    if np.iscomplexobj(a):
        if phase is not None:
            raise ValueError("give complex values, or amplitudes and phases, not both")
        a, phase = np.abs(a), np.angle(a)
    elif phase is None:
        raise ValueError("real amplitudes need their phases")
    a = np.asarray(a, np.float32)
    phase = np.asarray(phase, np.float32)
    if a.shape != phase.shape or a.ndim < 2:
        raise ValueError(f"amplitude {a.shape} and phase {phase.shape} must be the same (..., H, W) shape")
    if vmax is None:
        top = np.nanmax(np.abs(a), axis=(-2, -1), keepdims=True) if a.size else np.ones((1, 1), np.float32)
    else:
        top = np.float32(vmax)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(top > 0, np.abs(a) / top, 0.0)
    value = np.clip(np.nan_to_num(value), 0.0, 1.0).astype(np.float32)
    rgb = phase_colours(np.nan_to_num(phase), cmap=cmap) * value[..., None]
    if alpha:
        rgb = np.concatenate([rgb, value[..., None]], axis=-1)
    return rgb.astype(np.float32)


def colour_wheel(size=64, *, cmap="hsv"):
    """The legend of :func:`complex_to_rgb`: hue = phase (angle), brightness = amplitude (radius).

    Returns
    -------
    ndarray, float32, (size, size, 4): RGBA, transparent outside the disc; phase 0 points right
    (+x), +pi/2 up on screen (rows grow downwards, so up is -y).
    """
    c = (size - 1) / 2.0
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = x - c, c - y
    radius = np.hypot(dx, dy) / max(c, 1.0)
    rgba = complex_to_rgb(np.clip(radius, 0, 1), np.arctan2(dy, dx), cmap=cmap, alpha=True, vmax=1.0)
    rgba[..., 3] = (radius <= 1.0).astype(np.float32)
    return rgba
