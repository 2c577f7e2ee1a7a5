"""Layer conventions of the napari face: how intensities, amplitudes and phases are shown.

napari 0.9 has no logarithmic contrast mapping (``gamma`` is a power law, and a colormap
with log-spaced controls is resolved by a 1,024-entry lookup table, i.e. three decades).
Diffraction spans five or more decades, so **intensity layers hold ``log10(1 + I)``** (lazily
for dask stacks; negative intensities are shown as 0, NaN stays NaN) with the metadata

``{"cdinn_kind": "intensity", "cdinn_display": "log10(1 + I)", "cdinn_counts": bool}``

and every consumer gets the true intensities back through :func:`layer_intensities` (counts back
as whole numbers), which also accepts any plain image layer (its data are then taken as linear
intensities).
Amplitude layers are ``gray`` on 0..1, phase layers ``twilight`` on -pi..pi (or the data's range
when it is wider: unwrapped phases); both carry ``cdinn_kind`` and, when known, the per-frame
``chi2`` in their metadata.  A phase layer given the object's support is transparent outside it:
its displayed data hold NaN there (napari draws NaN transparent) where the phase is 0, the core's
value outside the object, so no phase value is hidden; consumers read phase layers back through
:func:`layer_phase` (NaN as 0).  The docks show a result first as one RGBA "complex" layer
(brightness = amplitude, hue = phase, transparent where the object is absent:
:func:`complex_tuple`), its amplitude and phase layers added hidden beneath.  Masks of unmeasured
pixels are Labels layers (1 = unmeasured) with ``cdinn_kind`` ``"mask"``; supports (the object's
extent found by phase retrieval) Labels layers (1 = inside) with ``cdinn_kind`` ``"support"``.
No Qt import here; napari only for layer types in annotations.
"""

from __future__ import annotations

import numpy as np

LOG_DISPLAY = "log10(1 + I)"
KIND = "cdinn_kind"
#: Per-frame scores a result layer keeps in its metadata, read from and written to result files.
SCORES = ("chi2", "chi2_noise", "trusted")
DISPLAY = "cdinn_display"
#: Metadata of an intensity layer: True when it holds whole numbers (photon counts), kept through the log display.
COUNTS = "cdinn_counts"


def _is_dask(data):
    return type(data).__module__.startswith("dask")


def to_log_display(intensity):
    """``log10(1 + max(I, 0))`` as float32, lazily for dask arrays (NaN stays NaN)."""
    if _is_dask(intensity):
        import dask.array as da

        return (da.log1p(da.maximum(intensity, 0)) / np.log(10)).astype(np.float32)
    i = np.asarray(intensity, dtype=np.float32)
    return (np.log1p(np.maximum(i, 0)) / np.float32(np.log(10))).astype(np.float32)


def from_log_display(display):
    """Inverse of :func:`to_log_display`: ``10**x - 1`` as float32 (lazily for dask)."""
    if _is_dask(display):
        import dask.array as da

        return da.expm1(display * np.log(10)).astype(np.float32)
    return np.expm1(np.asarray(display, dtype=np.float32) * np.float32(np.log(10))).astype(np.float32)


def whole_numbers(intensity):
    """True when the intensities are whole numbers (photon counts): every finite value of a NumPy array,
    the first frame of a lazy (dask) stack."""
    sample = intensity[0] if _is_dask(intensity) and intensity.ndim == 3 else intensity
    values = np.asarray(sample)
    values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    return bool(values.size) and (values.dtype.kind in "iub" or bool(np.all(values == np.round(values))))


def layer_intensities(data, metadata=None):
    """True intensities of an image layer's ``data`` given its ``metadata``.

    Inverts the log display of intensity layers made by this plugin, rounding back to whole numbers
    where the layer holds counts (``cdinn_counts``: float32's log round trip is off by up to a third of a
    count, which would hide counts from the counting-noise floor); any other layer's data are taken as
    linear intensities.
    """
    metadata = metadata or {}
    if metadata.get(DISPLAY) == LOG_DISPLAY:
        values = from_log_display(data)
        if metadata.get(COUNTS):
            if _is_dask(values):
                import dask.array as da

                return da.rint(values)
            return np.rint(values)
        return values
    return data


def _display_limits(display):
    """Contrast limits for a log display: 0 to the maximum of the first frame (cheap for dask)."""
    sample = np.asarray(display[0] if display.ndim == 3 and _is_dask(display) else display)
    # fmax skips NaN without nanmax's warning where every pixel is unmeasured (NaN) and without a copy
    top = float(np.fmax.reduce(sample, axis=None)) if sample.size else 1.0
    return (0.0, top if np.isfinite(top) and top > 0 else 1.0)


def intensity_tuple(intensity, name, **extra_metadata):
    """LayerDataTuple of an intensity stack shown on a log scale (see the module docstring)."""
    display = to_log_display(intensity)
    meta = {KIND: "intensity", DISPLAY: LOG_DISPLAY, COUNTS: whole_numbers(intensity), **extra_metadata}
    kwargs = {
        "name": name,
        "colormap": "magma",
        "contrast_limits": _display_limits(display),
        "metadata": meta,
    }
    return (display, kwargs, "image")


def amplitude_tuple(amplitude, name, translate=None, **extra_metadata):
    """LayerDataTuple of real-space amplitudes (gray, 0..1)."""
    kwargs = {"name": name, "colormap": "gray", "contrast_limits": (0.0, 1.0),
              "metadata": {KIND: "amplitude", **extra_metadata}}
    if translate is not None:
        kwargs["translate"] = translate
    return (np.asarray(amplitude, dtype=np.float32), kwargs, "image")


def phase_tuple(phase, name, translate=None, support=None, **extra_metadata):
    """LayerDataTuple of real-space phases in radians (twilight, :func:`phase_limits`).

    ``support`` (bool, broadcastable to ``phase``): where the object is; outside it, pixels whose
    phase is 0 are shown transparent (NaN in the displayed data, see the module docstring).
    """
    data = np.array(phase, dtype=np.float32)
    if support is not None:
        data[~np.broadcast_to(np.asarray(support, dtype=bool), data.shape) & (data == 0)] = np.nan
    kwargs = {"name": name, "colormap": "twilight", "contrast_limits": phase_limits(data),
              "metadata": {KIND: "phase", **extra_metadata}}
    if translate is not None:
        kwargs["translate"] = translate
    return (data, kwargs, "image")


def phase_limits(phase):
    """Contrast limits of phases: -pi..pi, widened to the data's range when it exceeds it (unwrapped phases)."""
    values = np.asarray(phase, dtype=np.float32)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    slack = 1e-3  # rounding of wrapped phases at +-pi
    if lo >= -np.pi - slack and hi <= np.pi + slack:
        return (-np.pi, np.pi)
    return (min(lo, -np.pi), max(hi, np.pi))


def layer_phase(data):
    """The phases of a phase layer's ``data`` as float32 NumPy, the transparent (NaN) pixels as 0."""
    return np.nan_to_num(np.asarray(data, dtype=np.float32), nan=0.0)


def mask_tuple(mask, name, translate=None, **extra_metadata):
    """LayerDataTuple of a mask of unmeasured pixels: a Labels layer, 1 = unmeasured, 0 = measured."""
    kwargs = {"name": name, "opacity": 0.5, "metadata": {KIND: "mask", **extra_metadata}}
    if translate is not None:
        kwargs["translate"] = translate
    return ((np.asarray(mask) != 0).astype(np.uint8), kwargs, "labels")


def complex_tuple(amplitude, phase, name, translate=None, **extra_metadata):
    """LayerDataTuple of a complex result as one RGBA image: brightness = amplitude, hue = phase.

    :func:`napari_cdinn.display.complex_to_rgb` on the HSV wheel, alpha = brightness (transparent
    where the object is absent); ``cdinn_kind`` ``"complex"``.
    """
    from ..display import complex_to_rgb

    rgba = complex_to_rgb(amplitude, phase, alpha=True)
    kwargs = {"name": name, "rgb": True, "contrast_limits": (0.0, 1.0),
              "metadata": {KIND: "complex", DISPLAY: "brightness = amplitude, hue = phase (hsv)", **extra_metadata}}
    if translate is not None:
        kwargs["translate"] = translate
    return (rgba, kwargs, "image")


def support_tuple(support, name, translate=None, **extra_metadata):
    """LayerDataTuple of a support (the object's extent): a Labels layer, 1 = inside."""
    kwargs = {"name": name, "opacity": 0.4, "metadata": {KIND: "support", **extra_metadata}}
    if translate is not None:
        kwargs["translate"] = translate
    return ((np.asarray(support) != 0).astype(np.uint8), kwargs, "labels")


def centre_offset(pattern_shape, object_shape):
    """Translation that centres a real-space frame in the pattern's frame (the 2x protocol)."""
    return tuple(float(p // 2 - o // 2) for p, o in zip(pattern_shape[-2:], object_shape[-2:], strict=True))
