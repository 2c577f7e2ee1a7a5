"""Post-processing of reconstructions: phase-ramp removal, phase unwrapping, centring, PRTF.

Pure functions on NumPy arrays, frames on the trailing two axes (``(H, W)`` or ``(N, H, W)``),
objects centred as everywhere in the package (:mod:`napari_cdinn.physics`).  A linear phase ramp in
real space is a shift of the pattern, and a global phase, a translation and the twin leave the
pattern unchanged: these functions remove such ambiguities for display and comparison.
"""

from __future__ import annotations

import numpy as np

from . import physics

__all__ = ["STEPS", "apply_steps", "centre_object", "chunk_with_steps", "prtf", "prtf_resolution", "remove_phase_ramp", "unwrap_phase"]

#: The steps :func:`apply_steps` knows, in the order it applies them.
STEPS = ("centre", "ramp", "unwrap")


def _stack(a, dtype):
    a = np.asarray(a, dtype=dtype)
    if a.ndim not in (2, 3):
        raise ValueError(f"expected a frame (H, W) or a stack (N, H, W), got shape {a.shape}")
    return a[None] if a.ndim == 2 else a, a.ndim == 2


def _weights(obj, support):
    amp = np.abs(obj)
    if support is None:
        support = physics.support_from_amplitude(amp)
    return amp * np.asarray(support, dtype=bool)


def remove_phase_ramp(obj, *, support=None):
    """Remove the linear phase ramp (and the mean phase) of complex objects.

    The ramp is the amplitude-weighted mean phase difference between neighbouring pixels inside
    the support (wrap-safe while the ramp stays below pi per pixel); then the weighted mean phase
    inside the support is set to 0.

    Parameters
    ----------
    obj : array_like, complex, (H, W) or (N, H, W)
    support : array_like, bool, same shape or (H, W), optional
        Where the object is (default: amplitude above 0.1 of each frame's maximum).

    Returns
    -------
    ndarray, complex64, the shape of ``obj``.
    """
    o, single = _stack(obj, np.complex128)
    sup = None if support is None else np.broadcast_to(np.asarray(support, bool), o.shape)
    w = _weights(o, sup)
    gy = np.sum(o[:, 1:, :] * np.conj(o[:, :-1, :]) * (w[:, 1:, :] * w[:, :-1, :] > 0), axis=(1, 2))
    gx = np.sum(o[:, :, 1:] * np.conj(o[:, :, :-1]) * (w[:, :, 1:] * w[:, :, :-1] > 0), axis=(1, 2))
    ky, kx = np.angle(gy), np.angle(gx)  # radians per pixel
    h, wd = o.shape[-2:]
    y = np.arange(h)[:, None] - h // 2
    x = np.arange(wd)[None, :] - wd // 2
    out = o * np.exp(-1j * (ky[:, None, None] * y + kx[:, None, None] * x))
    mean = np.sum(out * w, axis=(1, 2))
    out = out * np.exp(-1j * np.angle(mean))[:, None, None]
    out = out.astype(np.complex64)
    return out[0] if single else out


def unwrap_phase(phase, *, support=None):
    """Unwrapped phases (radians, float32), 0 outside the support.

    scikit-image's reliability-sorting unwrapper (:func:`skimage.restoration.unwrap_phase`) on the
    support; without scikit-image, NumPy's 1-D unwrapping along rows then columns (fine for smooth
    phases, no guarantee on noisy ones).

    Parameters
    ----------
    phase : array_like, float, (H, W) or (N, H, W)
    support : array_like, bool, same shape or (H, W), optional
        Where the phase is defined (default: everywhere).
    """
    p, single = _stack(phase, np.float64)
    sup = np.ones(p.shape, bool) if support is None else np.broadcast_to(np.asarray(support, bool), p.shape)
    out = np.zeros(p.shape, np.float32)
    try:
        from skimage.restoration import unwrap_phase as _unwrap
    except ImportError:  # pragma: no cover - scikit-image is a dependency
        _unwrap = None
    for i in range(len(p)):
        if not sup[i].any():
            continue
        if _unwrap is not None:
            u = np.asarray(_unwrap(np.ma.masked_array(p[i], mask=~sup[i]))).astype(np.float64)
        else:
            u = np.unwrap(np.unwrap(np.where(sup[i], p[i], 0.0), axis=1), axis=0)
        u = u - 2 * np.pi * np.round(np.mean(u[sup[i]]) / (2 * np.pi))  # the mean in (-pi, pi]
        out[i] = np.where(sup[i], u, 0.0)
    return out[0] if single else out


def centre_object(obj, *, support=None):
    """Roll each frame so that its amplitude's (circular) centre of mass sits at ``(H // 2, W // 2)``.

    Returns ``(centred, shifts)``: the rolled objects (the dtype of ``obj``) and the integer
    ``(dy, dx)`` per frame, (N, 2) (or (2,) for one frame).
    """
    o, single = _stack(obj, np.asarray(obj).dtype if np.iscomplexobj(obj) else np.float64)
    sup = None if support is None else np.broadcast_to(np.asarray(support, bool), o.shape)
    w = _weights(o, sup).astype(np.float64)
    h, wd = o.shape[-2:]
    shifts = np.zeros((len(o), 2), np.int64)
    out = np.empty_like(o)
    for i in range(len(o)):
        total = w[i].sum()
        if total <= 0:
            out[i] = o[i]
            continue
        # circular centre of mass: the angle of the mean of exp(2 pi i y / H), wrap-safe
        cy = np.angle(np.sum(w[i].sum(axis=1) * np.exp(2j * np.pi * np.arange(h) / h))) * h / (2 * np.pi)
        cx = np.angle(np.sum(w[i].sum(axis=0) * np.exp(2j * np.pi * np.arange(wd) / wd))) * wd / (2 * np.pi)
        dy = int(np.round((h // 2 - cy) % h))
        dx = int(np.round((wd // 2 - cx) % wd))
        dy, dx = (dy + h // 2) % h - h // 2, (dx + wd // 2) % wd - wd // 2
        shifts[i] = (dy, dx)
        out[i] = np.roll(o[i], (dy, dx), axis=(0, 1))
    return (out[0], shifts[0]) if single else (out, shifts)


def prtf(objects, intensity=None, *, bins=None):
    """Phase-retrieval transfer function from several reconstructions of one pattern.

    ``PRTF(q) = |<F_k(q)>| / sqrt(I(q))`` ring-averaged, with ``F_k`` the far fields of the runs
    after aligning each to the first (twin, integer shift and global phase: :func:`napari_cdinn.physics.align`),
    and ``I`` the measured intensity (default: the runs' mean ``<|F_k|**2>``, i.e. the phase-only
    PRTF ``|<exp(i phi_k)>|``).  1 where every run agrees on the phase, falling towards
    ``1 / sqrt(runs)`` where the phases are random.

    Parameters
    ----------
    objects : array_like, complex, (K, M, M)
        K reconstructions of one pattern (centred, in the pattern's frame).
    intensity : array_like, float, (M, M), optional
        The measured pattern (centred), on any scale.
    bins : int, optional
        Number of frequency shells (default ``M // 2``).

    Returns
    -------
    q : ndarray, float64, (bins,)
        Spatial frequency of each shell's centre, in cycles per pixel (0 .. 0.5).
    values : ndarray, float64, (bins,)
        The ring-averaged PRTF (NaN for an empty shell).
    """
    objs = np.asarray(objects, np.complex128)
    if objs.ndim != 3 or len(objs) < 2:
        raise ValueError("the PRTF needs several reconstructions, shaped (K, M, M) with K >= 2")
    ref = np.broadcast_to(objs[0], objs.shape)
    aligned = physics.align(objs, ref)
    fields = physics.forward(aligned)
    mean_field = np.abs(fields.mean(axis=0))
    if intensity is None:
        norm = np.sqrt(np.mean(np.abs(fields) ** 2, axis=0))
    else:
        i = np.clip(np.asarray(intensity, np.float64), 0, None)
        # scale the measured intensity to the runs' (any input scale)
        runs = np.mean(np.abs(fields) ** 2, axis=0)
        s = np.sum(runs * i) / max(np.sum(i * i), 1e-300)
        norm = np.sqrt(s * i)
    m = objs.shape[-1]
    y, x = np.indices(objs.shape[-2:])
    r = np.hypot((y - objs.shape[-2] // 2) / objs.shape[-2], (x - m // 2) / m)
    nbins = int(bins or m // 2)
    edges = np.linspace(0.0, 0.5, nbins + 1)
    which = np.digitize(r.ravel(), edges) - 1
    ok = (which >= 0) & (which < nbins) & (norm.ravel() > 1e-12 * max(norm.max(), 1e-300))
    ratio = np.where(norm > 0, mean_field / np.where(norm > 0, norm, 1.0), 0.0).ravel()
    sums = np.bincount(which[ok], weights=ratio[ok], minlength=nbins)[:nbins]
    counts = np.bincount(which[ok], minlength=nbins)[:nbins]
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return 0.5 * (edges[:-1] + edges[1:]), values


def prtf_resolution(q, values, level=1 / np.e):
    """The first spatial frequency (cycles per pixel) where the PRTF falls below ``level`` (NaN: never)."""
    values = np.asarray(values, np.float64)
    below = np.flatnonzero(np.nan_to_num(values, nan=1.0) < level)
    return float(np.asarray(q)[below[0]]) if below.size else float("nan")


def apply_steps(amplitude, phase, steps, *, support=None):
    """Apply post-processing ``steps`` (a subset of :data:`STEPS`, in that order) to a result.

    Returns ``(amplitude, phase, support)``: float32, float32 and bool.  ``"centre"`` rolls the
    object's centre of mass to the frame centre (the support rolls with it), ``"ramp"`` removes the
    linear phase ramp and the mean phase, ``"unwrap"`` unwraps the phase inside the support (0
    outside).
    """
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise ValueError(f"unknown post-processing step(s) {sorted(unknown)}: choose from {', '.join(STEPS)}")
    obj = np.asarray(amplitude, np.float64) * np.exp(1j * np.asarray(phase, np.float64))
    sup = physics.support_from_amplitude(np.abs(obj)) if support is None else np.broadcast_to(
        np.asarray(support, bool), obj.shape)
    if "centre" in steps:
        obj, shifts = centre_object(obj, support=sup)
        sup = np.stack([np.roll(s, tuple(d), axis=(0, 1)) for s, d in zip(
            sup.reshape((-1,) + sup.shape[-2:]), np.reshape(shifts, (-1, 2)), strict=True)]).reshape(obj.shape)
    if "ramp" in steps:
        obj = remove_phase_ramp(obj, support=sup)
    amp = np.abs(obj).astype(np.float32)
    pha = np.where(sup, np.angle(obj), 0.0).astype(np.float32)
    if "unwrap" in steps:
        pha = unwrap_phase(pha, support=sup)
    return amp, pha, np.asarray(sup, bool)


def chunk_with_steps(fn, intensity, first_frame=0, mask=None, *, steps=()):
    """A stream chunk function: ``fn``'s result with :func:`apply_steps` on its amplitude and phase.

    Picklable through ``functools.partial(chunk_with_steps, fn, steps=...)`` (``cdinn reconstruct --post``).
    """
    res = dict(fn(intensity, first_frame=first_frame, mask=mask))
    amp, pha, sup = apply_steps(res["amplitude"], res["phase"], steps, support=res.get("support"))
    res.update(amplitude=amp, phase=pha)
    if "support" in res:
        res["support"] = sup
    return res
