"""Forward model, FFT conventions, data-consistency and comparison scores.

Conventions (used everywhere in the package)
--------------------------------------------
* Arrays are ``(..., H, W)``: a single frame or a stack with any leading axes.
* Real space is *centred*: the origin of the object frame is pixel ``(H // 2, W // 2)``.
* Reciprocal space is *centred*: zero frequency sits at pixel ``(H // 2, W // 2)``.
* The transform is the plain (unnormalised) DFT,
  ``F = fftshift(fft2(ifftshift(obj)))``, so that the pattern of an object padded
  ``k`` times, taken at every ``k``-th pixel, is *exactly* the pattern of the unpadded
  object (:func:`decimate`), amplitudes and phases alike.
* Files and layers hold **intensities** ``|F|**2``; the networks read **amplitudes** ``|F|``.

Every function here takes NumPy arrays; the ones the retrieval engine and the networks
need on tensors (:func:`forward`, :func:`intensity`, :func:`chi2`, :func:`decimate`, :func:`pad`,
:func:`twin`, :func:`mirror`, :func:`align`, :func:`roll_frames`, :func:`support_from_amplitude`) take
``torch.Tensor`` too and return the same type.  This module never imports torch for NumPy input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from numpy.typing import ArrayLike

    #: What the functions here take and give back: a NumPy array or a torch tensor (same type out).
    Array = np.ndarray | torch.Tensor

__all__ = [
    "SHAPE_THRESHOLD",
    "align",
    "amplitude_error",
    "amplitude_from_intensity",
    "arange_like",
    "array_lib",
    "as_float32",
    "autocorrelation_extent",
    "chi2",
    "compare",
    "crop",
    "decimate",
    "forward",
    "intensity",
    "intensity_from_amplitude",
    "inverse",
    "is_tensor",
    "measured",
    "mirror",
    "noise_chi2",
    "pad",
    "pad_to",
    "phase_rms",
    "ramp_phase",
    "roll_frames",
    "shift",
    "support_from_amplitude",
    "support_extent",
    "support_iou",
    "twin",
]

#: Relative amplitude threshold that defines the object (the paper's 0.1).
SHAPE_THRESHOLD = 0.1


def is_tensor(x) -> bool:
    """Whether ``x`` is a torch tensor (told without importing torch)."""
    return type(x).__module__.startswith("torch")


def as_float32(x):
    """``x`` as float32 of its kind: a tensor (on its device) or a NumPy array."""
    return x.float() if is_tensor(x) else np.asarray(x, dtype=np.float32)


def _fft_pair(x):
    """Return ``(fft module, shift keyword)`` for NumPy arrays or torch tensors."""
    if is_tensor(x):
        import torch

        return torch.fft, "dim"
    return np.fft, "axes"


def forward(obj: Array) -> Array:
    """Centred far-field of a real-space object: ``fftshift(fft2(ifftshift(obj)))``.

    Parameters
    ----------
    obj : ndarray or torch.Tensor, shape (..., H, W)
        Complex (or real) object, centred in its frame.

    Returns
    -------
    ndarray or torch.Tensor, complex, shape (..., H, W)
        Centred diffracted wave field (zero frequency at ``(H // 2, W // 2)``).
    """
    fft, kw = _fft_pair(obj)
    ax = {kw: (-2, -1)}
    return fft.fftshift(fft.fft2(fft.ifftshift(obj, **ax), **ax), **ax)


def inverse(field: Array) -> Array:
    """Inverse of :func:`forward`: centred field to centred real-space object."""
    fft, kw = _fft_pair(field)
    ax = {kw: (-2, -1)}
    return fft.fftshift(fft.ifft2(fft.ifftshift(field, **ax), **ax), **ax)


def intensity(obj: Array) -> Array:
    """Diffraction intensity ``|forward(obj)|**2`` (float, same type as ``obj``)."""
    f = forward(obj)
    return f.real**2 + f.imag**2


def amplitude_from_intensity(intens: Array) -> Array:
    """Amplitudes ``sqrt(max(I, 0))``; negative and NaN intensities become 0.

    Parameters
    ----------
    intens : ndarray, shape (..., H, W)
        Measured intensities on any non-negative scale.

    Returns
    -------
    ndarray, float32
    """
    a = np.asarray(intens, dtype=np.float32)
    a = np.where(np.isfinite(a) & (a > 0), a, 0.0).astype(np.float32)
    return np.sqrt(a)


def intensity_from_amplitude(amp: Array) -> Array:
    """Intensities ``amp**2`` as float32."""
    a = np.asarray(amp, dtype=np.float32)
    return a * a


def pad(obj: Array, factor: int = 2) -> Array:
    """Zero-pad a centred object ``factor`` times in each direction, keeping it centred.

    The object's origin pixel ``(H // 2, W // 2)`` lands on the origin pixel of the
    larger frame, so ``decimate(intensity(pad(o, k)), k) == intensity(o)`` exactly.

    Parameters
    ----------
    obj : ndarray or torch.Tensor, shape (..., H, W)
    factor : int
        Oversampling factor (1 returns a copy).

    Returns
    -------
    ndarray or torch.Tensor (differentiable), shape (..., factor * H, factor * W), same dtype.
    """
    factor = int(factor)
    if factor < 1:
        raise ValueError("the oversampling factor must be a positive integer")
    h, w = np.shape(obj)[-2:] if not is_tensor(obj) else obj.shape[-2:]
    return pad_to(obj, (factor * h, factor * w))


def pad_to(obj: Array, shape: Sequence[int]) -> Array:
    """Zero-pad a centred ``(..., H, W)`` array to ``shape = (h, w)`` (at least as large), keeping its
    origin pixel ``(H // 2, W // 2)`` on the origin pixel ``(h // 2, w // 2)``; inverse of :func:`crop`.

    Returns
    -------
    ndarray or torch.Tensor (differentiable), shape (..., h, w), same dtype.
    """
    if not is_tensor(obj):
        obj = np.asarray(obj)
    h, w = obj.shape[-2:]
    big_h, big_w = (int(v) for v in shape)
    if big_h < h or big_w < w:
        raise ValueError(f"cannot pad {h} x {w} to the smaller {big_h} x {big_w}")
    out_shape = tuple(obj.shape[:-2]) + (big_h, big_w)
    out = obj.new_zeros(out_shape) if is_tensor(obj) else np.zeros(out_shape, dtype=obj.dtype)
    r0 = big_h // 2 - h // 2
    c0 = big_w // 2 - w // 2
    out[..., r0 : r0 + h, c0 : c0 + w] = obj
    return out


def crop(obj: Array, shape: Sequence[int]) -> Array:
    """Central crop of ``(..., H, W)`` to ``shape = (h, w)``; inverse of :func:`pad`."""
    h, w = shape
    big_h, big_w = obj.shape[-2:]
    r0 = big_h // 2 - h // 2
    c0 = big_w // 2 - w // 2
    return obj[..., r0 : r0 + h, c0 : c0 + w]


def decimate(pattern: Array, factor: int = 2) -> Array:
    """Exact decimation of an oversampled, centred pattern to the unpadded object's.

    Takes every ``factor``-th pixel on the sub-lattice that contains zero frequency.
    Works on intensities, amplitudes or complex fields, NumPy or torch.

    Parameters
    ----------
    pattern : ndarray or torch.Tensor, shape (..., M, M')
        Centred pattern; ``M`` and ``M'`` must be multiples of ``factor``.
    factor : int

    Returns
    -------
    Same type, shape (..., M // factor, M' // factor).
    """
    factor = int(factor)
    m, n = pattern.shape[-2:]
    if m % factor or n % factor:
        raise ValueError(
            f"a {m} x {n} pattern cannot be decimated by {factor}: the size must be a multiple of it"
        )
    r0 = (m // 2) % factor
    c0 = (n // 2) % factor
    return pattern[..., r0::factor, c0::factor]


def mirror(obj: Array, dims: tuple[int, ...] = (-2, -1)) -> Array:
    """Mirror a centred frame about its origin pixel along ``dims`` (``i -> 2 (n // 2) - i``), NumPy or torch.

    The far field of a mirrored object is the same mirror of its far field.
    """
    # flipping maps i -> n-1-i; the mirror about n//2 maps i -> 2*(n//2)-i: a flip, then a roll
    dims = tuple(dims)
    roll = tuple(2 * (obj.shape[d] // 2) - (obj.shape[d] - 1) for d in dims)
    if is_tensor(obj):
        return array_lib(obj).roll(obj.flip(dims), roll, dims)
    return np.roll(np.flip(np.asarray(obj), dims), roll, axis=dims)


def twin(obj: Array) -> Array:
    """Twin image: centro-symmetric inversion about the origin pixel plus complex conjugate.

    ``|forward(twin(o))| == |forward(o)|`` exactly.  NumPy or torch (a real tensor stays real).
    """
    inverted = mirror(obj)
    if is_tensor(obj):
        return inverted.conj() if inverted.is_complex() else inverted
    return np.conj(inverted)


def shift(obj: ArrayLike, shifts: Sequence[int]) -> np.ndarray:
    """Circular integer shift by ``shifts = (dy, dx)`` over the last two axes."""
    return np.roll(np.asarray(obj), tuple(int(s) for s in shifts), axis=(-2, -1))


def array_lib(x):
    """The array library of ``x``: ``numpy`` or ``torch`` (imported only for a tensor)."""
    if is_tensor(x):
        import torch

        return torch
    return np


def arange_like(n, like):
    """``0..n-1`` in the library (and on the device) of ``like``."""
    return np.arange(n) if array_lib(like) is np else array_lib(like).arange(n, device=like.device)


def roll_frames(x: Array, shifts: Array) -> Array:
    """Roll each frame ``x[i]`` of ``(N, H, W)`` by its own ``shifts[i] = (dy, dx)``, as ``np.roll``.

    NumPy arrays or tensors (``shifts`` integer, ``(N, 2)``, of the same kind).
    """
    n, h, w = x.shape
    rows = (arange_like(h, x)[None, :] - shifts[:, :1]) % h  # np.roll: out[i] = x[i - s]
    cols = (arange_like(w, x)[None, :] - shifts[:, 1:]) % w
    return x[arange_like(n, x)[:, None, None], rows[:, :, None], cols[:, None, :]]


def ramp_phase(phase: Array, shifts, side: int, where: Array | None = None) -> Array:
    """Phases of objects ``(N, S, S)`` whose ``side``-pixel far fields are moved by ``shifts[i] = (dy, dx)`` pixels.

    The far field of ``o(x) exp(2 pi i k . x / side)`` is that of ``o`` moved by ``k``, so the phase gains
    that ramp (about the frame's centre pixel), wrapped to -pi..pi; it is left as it is outside
    ``where`` (bool, like ``phase``).  NumPy arrays or tensors (``shifts`` array-like ``(N, 2)``, any
    values: whole pixels move the pattern exactly, as ``np.roll``); the phases keep their dtype.
    """
    n = phase.shape[-1]
    grid = arange_like(n, phase) - n // 2
    shifts = np.asarray(shifts, dtype=np.float32).reshape(-1, 2)
    xp = array_lib(phase)
    dy, dx = (v[:, None, None] if xp is np else xp.as_tensor(v[:, None, None], device=phase.device)
              for v in (shifts[:, 0], shifts[:, 1]))
    ramped = (phase + (dy * grid[None, :, None] + dx * grid[None, None, :]) * (2 * np.pi / side) + np.pi) % (
        2 * np.pi) - np.pi
    ramped = ramped.astype(phase.dtype, copy=False) if xp is np else ramped.to(phase.dtype)
    return ramped if where is None else xp.where(where, ramped, phase)


#: Frames aligned together by :func:`align` (bounds its memory: about 100 kB per 32 x 32 frame).
_ALIGN_CHUNK = 4096


def _align_frames(res, ref, allow_twin):
    """:func:`align` of ``(N, H, W)`` stacks, vectorised: NumPy arrays or tensors (on their device)."""
    # stacks of frames: scipy.fft (the same pocketfft, here in double precision) is faster than
    # numpy.fft, which transforms a stack axis by axis (docs/decisions.md, "Batched FFTs")
    if is_tensor(res):
        fft = _fft_pair(res)[0]
    else:
        from scipy import fft
    xp = array_lib(res)
    n, h, w = res.shape
    cands = xp.stack([res, twin(res)] if allow_twin else [res])  # (C, N, H, W)
    corr = fft.ifft2(fft.fft2(ref)[None] * fft.fft2(cands).conj()).reshape(len(cands), n, h * w)
    k = abs(corr).argmax(-1)  # (C, N): the peak of each candidate's cross-correlation
    rows = arange_like(n, res)
    peaks = xp.stack([corr[c, rows, k[c]] for c in range(len(cands))])  # (C, N)
    choice = abs(peaks).argmax(0)  # the first on ties: the result itself before its twin
    k, peak = k[choice, rows], peaks[choice, rows]
    phase = xp.where(abs(peak) > 0, xp.angle(peak), xp.zeros_like(abs(peak)))
    aligned = roll_frames(cands[choice, rows], xp.stack([k // w, k % w], 1)) * xp.exp(1j * phase)[:, None, None]
    return aligned, choice, k, phase


def align(
    result: Array, reference: Array, allow_twin: bool = True, return_params: bool = False
) -> Array | tuple[Array, Any]:
    """Align a complex result to a reference up to twin, integer shift and global phase.

    The least-squares match ``min || reference - c * T(result) ||`` over the unit-modulus
    constant ``c`` and the transforms ``T`` (circular integer shifts, optionally applied to the
    twin) is found exactly from the peak of the complex cross-correlation, for all frames at once.

    Parameters
    ----------
    result, reference : ndarray or torch.Tensor, complex, shape (H, W) or (N, H, W)
    allow_twin : bool
        Also consider the twin of ``result``.
    return_params : bool
        Also return ``(is_twin, (dy, dx), phase)`` per frame.

    Returns
    -------
    aligned : complex128 ndarray (a tensor stays a tensor, of its dtype and device), shape of ``result``
    params : list of tuples, only if ``return_params``
    """
    torch_in = is_tensor(result)
    res = result if torch_in else np.asarray(result, dtype=np.complex128)
    ref = reference if torch_in else np.asarray(reference, dtype=np.complex128)
    if res.shape != ref.shape:
        raise ValueError(f"result {tuple(res.shape)} and reference {tuple(ref.shape)} differ in shape")
    single = res.ndim == 2
    res2 = res.reshape((-1,) + tuple(res.shape[-2:]))
    ref2 = ref.reshape((-1,) + tuple(ref.shape[-2:]))
    step = _ALIGN_CHUNK
    parts = [_align_frames(res2[lo : lo + step], ref2[lo : lo + step], allow_twin) for lo in range(0, len(res2), step)]
    if torch_in:
        import torch

        out = torch.cat([p[0] for p in parts]).reshape(res.shape)
    else:
        out = np.concatenate([p[0] for p in parts]).reshape(res.shape)
    if not return_params:
        return out
    w = res.shape[-1]
    params = [(bool(c), (int(k) // w, int(k) % w), float(ph))
              for _, choice, ks, phase in parts for c, k, ph in zip(choice.tolist(), ks.tolist(), phase.tolist())]
    return out, (params[0] if single else params)


def support_from_amplitude(amp: Array, threshold: float = SHAPE_THRESHOLD) -> Array:
    """Object support: amplitude above ``threshold`` times its per-frame maximum (NumPy or torch)."""
    if is_tensor(amp):
        a = amp.abs()
        peak = a.amax((-2, -1), keepdim=True)
        return (a > threshold * peak) & (peak > 0)
    a = np.abs(np.asarray(amp))
    peak = a.max(axis=(-2, -1), keepdims=True)
    return a > threshold * np.where(peak > 0, peak, np.inf)


def support_extent(support: ArrayLike) -> np.ndarray:
    """Width in pixels of each support's bounding box along its wider axis, per frame (0 when empty)."""
    s = np.asarray(support, dtype=bool)
    idx = np.arange(s.shape[-1])

    def span(on):
        lo = np.where(on, idx, s.shape[-1]).min(-1)
        return np.maximum(np.where(on, idx, -1).max(-1) - lo + 1, 0)

    return np.maximum(span(s.any(-1)), span(s.any(-2)))


def measured(intensity: ArrayLike, mask: ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(values, bad)``: the intensities with 0 on unmeasured pixels and for negative readings, and
    ``bad``, True on the unmeasured pixels (NaN/inf, and ``mask`` broadcast to the intensities' shape).

    Parameters
    ----------
    intensity : array_like, (..., H, W)
    mask : array_like of bool, broadcastable to ``intensity``, optional
        True on unmeasured pixels.

    Returns
    -------
    values : ndarray of the intensities' dtype, same shape
    bad : ndarray of bool, same shape
    """
    i = np.asarray(intensity)
    bad = ~np.isfinite(i)
    if mask is not None:
        bad = bad | np.broadcast_to(np.asarray(mask, dtype=bool), i.shape)
    return np.where(bad | ~(i > 0), 0, i), bad


def autocorrelation_extent(intensity: ArrayLike, mask: ArrayLike | None = None, threshold: float = 0.1,
                           sigma: float = 1.0) -> np.ndarray:
    """A lower bound of each object's width (pixels) from its pattern alone: half the autocorrelation's.

    The inverse transform of the intensity is the object's autocorrelation, twice as wide as the
    object along every axis.  Its modulus, blurred by ``sigma`` pixels and thresholded at
    ``threshold`` of its maximum, gives :func:`support_extent` / 2, which falls 10-40 % short of
    the object's width (the autocorrelation tapers to its edge; measured on the simulator's
    families at 1e3 photons to noise-free: docs/decisions.md, "Object size").  Unmeasured pixels
    (NaN/inf, ``mask``) read 0; a frame whose central 3 x 3 pixels are not all measured (a
    beamstop) gets NaN: without the low frequencies the autocorrelation bounds nothing.

    Parameters
    ----------
    intensity : array_like, (M, M) or (N, M, M)
        Centred intensities.
    mask : array_like bool, optional
        True on unmeasured pixels.

    Returns
    -------
    ndarray float64, (N,) (a scalar for one frame)
    """
    i, bad = measured(np.array(intensity, dtype=np.float64, ndmin=3), mask)
    ac = _blur_wrap(np.abs(inverse(i)), sigma)
    on = ac > threshold * ac.max(axis=(-2, -1), keepdims=True)
    h, w = i.shape[-2:]
    centre = bad[:, h // 2 - 1 : h // 2 + 2, w // 2 - 1 : w // 2 + 2].any(axis=(-2, -1))
    extent = np.where(centre | (i.sum(axis=(-2, -1)) <= 0), np.nan, support_extent(on) / 2.0)
    return extent[0] if np.ndim(intensity) == 2 else extent


#: Elements up to which :func:`_blur_wrap` blurs in NumPy (a sample of frames: no scipy.ndimage import).
_SMALL_BLUR = 2**18


def _blur_wrap(a: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Gaussian blur of the last two axes with periodic edges: ``scipy.ndimage.gaussian_filter`` with
    ``mode="wrap"`` (the same kernel, truncated at ``truncate`` sigma), which it calls for big stacks;
    small ones (a sample, one frame) are blurred in NumPy, so that a small job does not import
    scipy.ndimage (cold start: benchmarks/bench_speed.py)."""
    import sys

    if a.size > _SMALL_BLUR or "scipy.ndimage" in sys.modules:
        from scipy.ndimage import gaussian_filter

        return gaussian_filter(a, (0,) * (a.ndim - 2) + (sigma, sigma), mode="wrap")
    radius = int(truncate * sigma + 0.5)
    w = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    w /= w.sum()
    for axis in (-2, -1):
        n = a.shape[axis]
        padded = np.take(a, np.arange(-radius, n + radius) % n, axis=axis)
        a = sum(wk * np.take(padded, np.arange(k, k + n), axis=axis) for k, wk in enumerate(w))
    return a


def support_iou(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Intersection over union of two boolean supports, per frame (1.0 when both empty)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    inter = (a & b).sum(axis=(-2, -1))
    union = (a | b).sum(axis=(-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def phase_rms(phase: ArrayLike, true_phase: ArrayLike, support: ArrayLike) -> np.ndarray:
    """RMS of the wrapped phase difference inside ``support``, global offset removed.

    The constant offset is the circular mean of the difference inside the support, so the
    score is invariant to a global phase.  Returns radians per frame (NaN for an empty support).
    """
    d = np.exp(1j * (np.asarray(phase, dtype=np.float64) - np.asarray(true_phase, dtype=np.float64)))
    s = np.asarray(support, dtype=bool)
    mean = (d * s).sum(axis=(-2, -1), keepdims=True)
    n = s.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):  # a NaN phase (a diverged network) scores NaN, quietly
        mean = np.where(np.abs(mean) > 0, mean / np.maximum(np.abs(mean), 1e-300), 1.0)
        err = np.angle(d * np.conj(mean))
        return np.sqrt((err**2 * s).sum(axis=(-2, -1)) / n)


def amplitude_error(amp: ArrayLike, true_amp: ArrayLike) -> np.ndarray:
    """Relative RMS amplitude error after the least-squares scale, per frame.

    ``|| s * amp - true || / || true ||`` with ``s = <amp, true> / <amp, amp>``.
    """
    a = np.abs(np.asarray(amp)).astype(np.float64)
    t = np.abs(np.asarray(true_amp)).astype(np.float64)
    aa = (a * a).sum(axis=(-2, -1))
    s = np.where(aa > 0, (a * t).sum(axis=(-2, -1)) / np.where(aa > 0, aa, 1), 0.0)
    num = ((s[..., None, None] * a - t) ** 2).sum(axis=(-2, -1))
    den = (t * t).sum(axis=(-2, -1))
    return np.sqrt(num / np.where(den > 0, den, 1))


def chi2(measured: Array, predicted: Array, mask: Array | None = None) -> Array:
    """Reciprocal-space chi^2 with a least-squares scale, per frame.

    ``chi2 = sum (I_t - s I_p)**2 / sum I_t**2`` with ``s = sum I_t I_p / sum I_p**2``,
    so the score needs no ground truth and ignores the overall scale of either input.
    0 means perfect data consistency; 1 means no better than predicting nothing.  A frame
    with no measured signal (all zero) scores 1: there is nothing to trust it on.

    Parameters
    ----------
    measured, predicted : ndarray or torch.Tensor, shape (..., H, W)
        Measured and predicted *intensities*.
    mask : array of bool, optional
        True on pixels that were **not** measured (beamstop, gaps); they are ignored, and so are
        NaN and infinite pixels of ``measured``.

    Returns
    -------
    ndarray (float64) or torch.Tensor (dtype of the input), shape (...)
    """
    it, ip = measured, predicted
    if not is_tensor(it):
        it = np.asarray(it, dtype=np.float64)
        ip = np.asarray(ip, dtype=np.float64)
    bad = _unmeasured(it, mask)
    it, ip = _where_measured(bad, it), _where_measured(bad, ip)
    # each frame divided by its largest value first: the score ignores the scale, and squares of
    # intensities scaled by 1e25 or 1e-22 would leave float32's range (inf, or 0)
    it, ip = it / _frame_max(it), ip / _frame_max(ip)
    tp = (it * ip).sum(-1).sum(-1)
    pp = (ip * ip).sum(-1).sum(-1)
    tt = (it * it).sum(-1).sum(-1)
    if is_tensor(it):
        import torch

        s = torch.where(pp > 0, tp / torch.where(pp > 0, pp, torch.ones_like(pp)), torch.zeros_like(pp))
        num = ((it - s[..., None, None] * ip) ** 2).sum(-1).sum(-1)
        out = torch.where(tt > 0, num / torch.where(tt > 0, tt, torch.ones_like(tt)), torch.ones_like(tt))
        return torch.where(torch.isfinite(out), out, torch.ones_like(out))  # never NaN: no fit is 1
    with np.errstate(invalid="ignore", over="ignore"):
        s = np.where(pp > 0, tp / np.where(pp > 0, pp, 1), 0.0)
        num = ((it - s[..., None, None] * ip) ** 2).sum(-1).sum(-1)
        out = np.where(tt > 0, num / np.where(tt > 0, tt, 1), 1.0)
    return np.where(np.isfinite(out), out, 1.0)


def _unmeasured(measured, mask):
    """True on pixels left out of a score: ``mask`` and the non-finite pixels of ``measured``."""
    if is_tensor(measured):
        import torch

        bad = ~torch.isfinite(measured)
    else:
        bad = ~np.isfinite(measured)
    return bad if mask is None else bad | mask


def _where_measured(bad, x):
    """``x`` with 0 on the ``bad`` pixels (a product would keep NaN)."""
    if is_tensor(x):
        import torch

        return torch.where(bad, torch.zeros((), dtype=x.dtype, device=x.device), x)
    return np.where(bad, 0.0, x)


def _frame_max(x):
    """Per-frame largest absolute value of ``x`` (..., H, W), shaped (..., 1, 1); 1 where it is 0 or not finite."""
    if is_tensor(x):
        import torch

        m = x.abs().amax((-2, -1), keepdim=True)
        return torch.where(torch.isfinite(m) & (m > 0), m, torch.ones_like(m))
    with np.errstate(invalid="ignore"):
        m = np.abs(x).max(axis=(-2, -1), keepdims=True)
    return np.where(np.isfinite(m) & (m > 0), m, 1.0)


def noise_chi2(measured: Array, mask: Array | None = None) -> Array:
    """Expected :func:`chi2` of a perfect fit under counting noise, per frame.

    A pattern of photon counts ``I ~ Poisson(lam)`` misses even the true intensity by
    ``E[(I - lam)**2] = lam``, so its chi^2 is about ``sum I / sum I**2`` (measured pixels only)
    however good the fit: about 1e-2 at 1e4 photons.  Frames that hold whole numbers are taken as
    counts; other frames (noise-free simulations, normalised data) score 0.

    Parameters
    ----------
    measured : ndarray or torch.Tensor, (..., H, W), non-negative intensities
    mask : bool array of the same kind, optional
        True on unmeasured pixels (NaN and infinite pixels count as unmeasured too).

    Returns
    -------
    float64 ndarray or float32 tensor, shape (...)
    """
    if is_tensor(measured):
        import torch

        it = measured.float()
        it = _where_measured(_unmeasured(it, mask), it)
        counts = ((it - it.round()).abs().amax((-2, -1)) == 0) & (it.amax((-2, -1)) > 0)
        m = _frame_max(it)  # sum I / sum I^2 = sum u / (m sum u^2), u = I / m: no overflow in float32
        u = it / m
        power = (u * u).sum((-2, -1)) * m[..., 0, 0]
        out = torch.where(counts, u.sum((-2, -1)) / power.clamp_min(1e-30), torch.zeros_like(power))
        return torch.where(torch.isfinite(out), out, torch.zeros_like(out))
    it = np.asarray(measured, dtype=np.float64)
    it = _where_measured(_unmeasured(it, None if mask is None else np.asarray(mask, dtype=bool)), it)
    counts = (np.abs(it - np.round(it)).max(axis=(-2, -1)) == 0) & (it.max(axis=(-2, -1)) > 0)
    m = _frame_max(it)
    u = it / m
    power = (u * u).sum(axis=(-2, -1)) * m[..., 0, 0]
    with np.errstate(invalid="ignore", over="ignore"):
        out = np.where(counts, u.sum(axis=(-2, -1)) / np.where(power > 0, power, 1.0), 0.0)
    return np.where(np.isfinite(out), out, 0.0)


def compare(
    result: ArrayLike, true_amplitude: ArrayLike, true_phase: ArrayLike, threshold: float = SHAPE_THRESHOLD
) -> dict[str, np.ndarray]:
    """Score complex results against the truth, up to twin, shift and global phase.

    Parameters
    ----------
    result : ndarray, complex, shape (H, W) or (N, H, W)
        Reconstructed objects, in a frame of the same size as the truth (crop first).
    true_amplitude, true_phase : ndarray, same shape
    threshold : float
        Relative amplitude threshold defining both supports.

    Returns
    -------
    dict of per-frame arrays: ``iou``, ``phase_rms`` (radians, inside the true support),
    ``amplitude_error``, ``twin`` (bool: the twin matched better) and the ``aligned`` results.
    """
    truth = np.asarray(true_amplitude) * np.exp(1j * np.asarray(true_phase))
    aligned, params = align(result, truth, return_params=True)
    if np.asarray(result).ndim == 2:
        params = [params]
    true_sup = support_from_amplitude(true_amplitude, threshold)
    return {
        "iou": support_iou(support_from_amplitude(aligned, threshold), true_sup),
        "phase_rms": phase_rms(np.angle(aligned), true_phase, true_sup),
        "amplitude_error": amplitude_error(aligned, true_amplitude),
        "twin": np.array([p[0] for p in params]).reshape(np.shape(aligned)[:-2]),
        "aligned": aligned,
    }
