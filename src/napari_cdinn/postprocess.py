"""Post-processing of reconstructions: phase-ramp removal, phase unwrapping, centring, PRTF.

Pure functions on NumPy arrays (and :class:`PrtfSums`, the PRTF's running sums), frames on the
trailing two axes (``(H, W)`` or ``(N, H, W)``), objects centred as everywhere in the package
(:mod:`napari_cdinn.physics`).  A linear phase ramp in real space is a shift of the pattern, and a
global phase, a translation and the twin leave the pattern unchanged: these functions remove such
ambiguities for display and comparison.
"""

from __future__ import annotations

import numpy as np

from . import physics
from .checks import check_mask_layout

__all__ = ["STEPS", "PrtfSums", "apply_steps", "centre_object", "chunk_with_steps", "describe_resolution",
           "median_resolution", "prtf", "prtf_frequencies", "prtf_resolution", "remove_phase_ramp", "unwrap_phase"]

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


class PrtfSums:
    """Running sums behind the PRTF of several reconstructions per pattern, added one run at a time.

    Per frame it keeps the first run added (the reference every later run is aligned to: twin,
    integer shift and global phase, :func:`napari_cdinn.physics.align`), the sum of the aligned
    far fields, the sum of their power and the number of runs, in single precision: the memory is
    that of about three objects per frame whatever the number of runs.  :func:`prtf` is this for
    one frame.

    Parameters
    ----------
    n : int
        Frames.
    shape : (int, int)
        Frame shape ``(M, M)``.
    """

    def __init__(self, n, shape):
        shape = (int(n),) + tuple(int(s) for s in shape)
        self.reference = np.zeros(shape, np.complex64)
        self.field = np.zeros(shape, np.complex64)
        self.power = np.zeros(shape, np.float32)
        self.count = np.zeros(shape[0], np.int64)

    def add(self, objects, frames=None, *, block=256):
        """Add one run of each of ``frames`` (default: every frame).

        Parameters
        ----------
        objects : array_like, complex, (len(frames), M, M)
            The runs' objects, centred, in the pattern's frame (any overall scale, the same for
            every run of a frame).
        frames : array_like of int, optional
            Which frames the runs belong to (each at most once per call).
        block : int
            Frames aligned at once (bounds the double-precision work arrays).
        """
        frames = np.arange(len(self.count)) if frames is None else np.asarray(frames, np.int64).reshape(-1)
        objects = np.asarray(objects)
        if objects.shape != (len(frames),) + self.reference.shape[1:]:
            raise ValueError(f"expected {len(frames)} objects shaped {self.reference.shape[1:]}, got {objects.shape}")
        for lo in range(0, len(frames), block):
            idx, obj = frames[lo : lo + block], np.asarray(objects[lo : lo + block], np.complex128)
            first = self.count[idx] == 0
            self.reference[idx[first]] = obj[first]
            aligned = obj.copy()
            if (~first).any():
                aligned[~first] = physics.align(obj[~first], self.reference[idx[~first]])
            fields = physics.forward(aligned)
            self.field[idx] += fields.astype(np.complex64)
            self.power[idx] += (fields.real**2 + fields.imag**2).astype(np.float32)
            self.count[idx] += 1

    def values(self, intensity=None, *, mask=None, bins=None, frames=None):
        """The ring-averaged PRTF of each frame (see :func:`prtf`).

        Parameters
        ----------
        intensity : array_like, float, (n, M, M) or (M, M), optional
            The measured patterns (centred, any scale) of ``frames``; default: the runs' mean power.
        mask : array_like of bool, (n, M, M) or (M, M), optional
            True on unmeasured pixels, left out of the scale and of every shell (as are the
            non-finite pixels of ``intensity``).
        bins : int, optional
            Frequency shells (default ``M // 2``).
        frames : array_like of int, optional
            The frames to evaluate (default: all).

        Returns
        -------
        q : ndarray, float64, (bins,)
            Spatial frequency of each shell's centre, cycles per pixel (0 .. 0.5).
        values : ndarray, float64, (n, bins)
            NaN for an empty shell and for a frame with fewer than two runs.
        """
        frames = np.arange(len(self.count)) if frames is None else np.asarray(frames, np.int64).reshape(-1)
        n, (h, w) = len(frames), self.reference.shape[1:]
        runs = np.maximum(self.count[frames], 1)[:, None, None].astype(np.float64)
        mean_field = np.abs(self.field[frames].astype(np.complex128)) / runs
        mean_power = self.power[frames].astype(np.float64) / runs
        measured = np.ones((n, h, w), bool)
        if mask is not None:
            measured &= ~np.broadcast_to(np.asarray(mask, bool), (n, h, w))
        if intensity is None:
            signal = norm = np.sqrt(mean_power)
        else:
            i = np.broadcast_to(np.asarray(intensity, np.float64), (n, h, w))
            measured &= np.isfinite(i)
            i = np.where(measured, np.clip(np.nan_to_num(i), 0, None), 0.0)
            # the measured intensity on the runs' scale (any input scale), fitted on measured pixels
            s = np.sum(mean_power * i, axis=(1, 2)) / np.maximum(np.sum(i * i, axis=(1, 2)), 1e-300)
            signal = np.sqrt(s[:, None, None] * i)
            norm = np.maximum(signal, np.sqrt(mean_power))  # never above 1 where the runs exceed the data
        y, x = np.indices((h, w))
        r = np.hypot((y - h // 2) / h, (x - w // 2) / w)
        nbins = int(bins or w // 2)
        edges = np.linspace(0.0, 0.5, nbins + 1)
        shell = np.broadcast_to(np.digitize(r, edges) - 1, (n, h, w))
        top = signal.max(axis=(1, 2), keepdims=True)
        ok = measured & (shell >= 0) & (shell < nbins) & (signal > 1e-12 * np.maximum(top, 1e-300))
        ratio = mean_field / np.where(ok, norm, 1.0)
        which = (np.arange(n)[:, None, None] * nbins + shell)[ok]
        sums = np.bincount(which, weights=ratio[ok], minlength=n * nbins).reshape(n, nbins)
        counts = np.bincount(which, minlength=n * nbins).reshape(n, nbins)
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        values[self.count[frames] < 2] = np.nan
        return prtf_frequencies(w, nbins), values


def prtf_frequencies(size, bins=None):
    """The PRTF's shell centres in cycles per pixel (float64, (bins,)) for ``size`` x ``size`` patterns.

    ``bins`` shells of equal width from 0 to 0.5 cycles per pixel (default ``size // 2``).
    """
    nbins = int(bins or int(size) // 2)
    edges = np.linspace(0.0, 0.5, nbins + 1)
    return 0.5 * (edges[:-1] + edges[1:])


def prtf(objects, intensity=None, *, bins=None, mask=None):
    """Phase-retrieval transfer function from several reconstructions of one pattern.

    ``PRTF(q) = |<F_k(q)>| / max(sqrt(I(q)), sqrt(<|F_k(q)|**2>))`` per pixel, averaged over
    rings of equal ``|q|``, with ``F_k`` the far fields of the runs after aligning each to the
    first (twin, integer shift and global phase: :func:`napari_cdinn.physics.align`), and ``I`` the
    measured intensity scaled to the runs' mean power ``<|F_k|**2>`` by least squares over the
    measured pixels (default: that mean power itself, i.e. the phase agreement).  Where the runs
    fit the data this is the usual ``|<F_k>| / sqrt(I)``; the runs' own rms amplitude in the
    denominator keeps it at most 1 where they put more power than was measured (unconverged runs,
    weak high-frequency pixels), where the plain ratio exceeds 1 and hides their disagreement.
    Only measured pixels with signal count: those in ``mask``, the non-finite pixels of
    ``intensity`` and pixels that measured nothing are left out.  1 where every run agrees,
    falling towards ``1 / sqrt(runs)`` where their phases are random.  Running sums for many
    frames and runs: :class:`PrtfSums`.

    Parameters
    ----------
    objects : array_like, complex, (K, M, M)
        K reconstructions of one pattern (centred, in the pattern's frame).
    intensity : array_like, float, (M, M), optional
        The measured pattern (centred), on any scale.
    bins : int, optional
        Number of frequency shells (default ``M // 2``).
    mask : array_like of bool, (M, M), optional
        True on unmeasured pixels (beamstop, gaps).

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
    if mask is not None:
        check_mask_layout(mask, objs.shape[-2:])
    sums = PrtfSums(1, objs.shape[-2:])
    for obj in objs:
        sums.add(obj[None])
    q, values = sums.values(None if intensity is None else np.asarray(intensity)[None], bins=bins,
                            mask=None if mask is None else np.asarray(mask, bool)[None])
    return q, values[0]


def prtf_resolution(q, values, level=1 / np.e):
    """The first spatial frequency (cycles per pixel) where the PRTF falls below ``level`` (NaN: never).

    ``values`` may be one curve (bins,) or one per frame (N, bins) (then an (N,) array).  Empty
    (NaN) shells are skipped.
    """
    values = np.asarray(values, np.float64)
    below = np.nan_to_num(values, nan=1.0) < level
    first = np.argmax(below, axis=-1)
    out = np.where(below.any(axis=-1), np.asarray(q, np.float64)[first], np.nan)
    return float(out) if out.ndim == 0 else out


def median_resolution(values, resolution):
    """Median of per-frame PRTF resolutions (cycles per pixel) over the frames that have a PRTF.

    A frame whose PRTF never falls below the level counts as beyond the pattern's edge (``inf``);
    the median is the lower one of an even count (a frame's own value, never an average with
    ``inf``).  NaN when no frame has a PRTF.

    Parameters
    ----------
    values : array_like, (N, bins)
        The frames' PRTF curves (rows all NaN: no PRTF, e.g. fewer than two runs).
    resolution : array_like, (N,)
        :func:`prtf_resolution` of each row.
    """
    values = np.asarray(values, np.float64).reshape(-1, np.shape(values)[-1])
    resolution = np.asarray(resolution, np.float64).reshape(-1)
    have = np.isfinite(values).any(axis=1)
    if not have.any():
        return float("nan")
    return float(np.percentile(np.where(np.isnan(resolution[have]), np.inf, resolution[have]), 50, method="lower"))


def describe_resolution(q):
    """``q`` (cycles per pixel, from :func:`median_resolution`) as words: with its half-period ``1 / (2 q)`` in pixels."""
    if np.isnan(q):
        return "no PRTF (it needs at least two runs per pattern)"
    if np.isinf(q):
        return "beyond 0.5 cycles/pixel (the PRTF stays above the level up to the pattern's edge)"
    return f"{q:.3g} cycles/pixel (half-period {1 / (2 * q):.3g} pixels)"


def apply_steps(amplitude, phase, steps, *, support=None):
    """Apply post-processing ``steps`` (a subset of :data:`STEPS`, in that order) to a result.

    Returns ``(amplitude, phase, support)``: float32, float32 and bool.  ``"centre"`` rolls the
    object's centre of mass to the frame centre (the support rolls with it), ``"ramp"`` removes the
    linear phase ramp and the mean phase, ``"unwrap"`` unwraps the phase inside the support (0
    outside).  ``steps`` may be one string, ``"centre,ramp"`` as the command line's ``--post``.
    """
    if isinstance(steps, str):
        steps = tuple(step.strip() for step in steps.split(",") if step.strip())
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
