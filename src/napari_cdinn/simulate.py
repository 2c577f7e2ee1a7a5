"""The paper's simulated objects and their diffraction patterns (Cherukara et al. 2018).

Recipe (the default everywhere)
-------------------------------
* **Shape**: the convex hull of 5..15 random points scattered uniformly in the central part
  of a ``size x size`` grid (a margin of ``size // 16 + 1`` pixels keeps the blurred edge inside
  the frame), value 1 inside and 0 outside, blurred by a Gaussian of sigma 1 pixel.
  Hulls covering less than 5 % of the grid are redrawn.
* **Phase**: a random mix of up to 3 sine gratings (random direction, period 4..size pixels,
  offset) and up to 3 Gaussians (random centre, sigma size/16..size/4), each with a random
  weight; at least one term.  The mix is rescaled so that its peak-to-peak span inside the object
  is uniform in ``(0.1 * 2 pi, 2 pi]`` and centred, so it lies within -pi..pi; it is set to 0
  outside the object (amplitude <= 0.1, the paper's shape threshold).
* **Pattern**: ``|forward(amplitude * exp(i phase))|**2``, centred (:mod:`napari_cdinn.physics`),
  of the object zero-padded ``oversampling`` times.

Options: Poisson noise at a given mean number of photons per pattern, a beamstop that masks the
central disc of the pattern (its pixels set to 0 and reported in ``mask``), the seed.

Determinism: examples are generated in blocks of :data:`BLOCK` from
``numpy.random.default_rng([seed, block])``, so example ``i`` depends only on the seed and ``i``
(and on the options): ``simulate(n, seed=s)`` is a prefix of ``simulate(m, seed=s)`` for
``m > n``.  Generation is vectorised over a block and uses both FFT workers.
"""

from __future__ import annotations

import numpy as np
import scipy.fft
from scipy import ndimage

from . import physics

__all__ = ["BLOCK", "patterns_from_objects", "simulate", "simulate_objects"]

#: Examples per random block; example ``i`` is drawn from block ``i // BLOCK``.
BLOCK = 1024

_MIN_POINTS, _MAX_POINTS = 5, 15
_MAX_SINES, _MAX_GAUSS = 3, 3
_MIN_AREA_FRACTION = 0.05


def _hull_vertices(pts):
    """Convex hulls of point sets by a gift-wrapping march vectorised over the batch.

    Parameters
    ----------
    pts : ndarray, float64, shape (B, n, 2)
        ``(x, y)`` coordinates; duplicated points are allowed.

    Returns
    -------
    ndarray, shape (B, n + 1, 2)
        Counter-clockwise hull vertices (in ``y``-up orientation), starting at the lowest point,
        padded by repeating the start vertex, so consecutive pairs are the hull's edges
        (zero-length edges included).
    """
    b, n, _ = pts.shape
    rows = np.arange(b)
    # lowest y, ties broken by lowest x
    key = pts[..., 1] * 1e6 + pts[..., 0]
    start = pts[rows, np.argmin(key, axis=1)]
    verts = np.empty((b, n + 1, 2))
    verts[:, 0] = start
    cur = start.copy()
    d_ang = np.zeros(b)  # direction of the previous edge; start heading along +x
    done = np.zeros(b, dtype=bool)
    for step in range(1, n + 1):
        v = pts - cur[:, None, :]
        dist = np.hypot(v[..., 0], v[..., 1])
        rel = np.mod(np.arctan2(v[..., 1], v[..., 0]) - d_ang[:, None], 2 * np.pi)
        rel = np.where(rel > 2 * np.pi - 1e-9, 0.0, rel)  # collinear ahead, rounded below 2 pi
        rel = np.where(dist < 1e-9, np.inf, rel)
        best = rel.min(axis=1, keepdims=True)
        far = np.where(rel <= best + 1e-9, dist, -1.0)
        nxt = pts[rows, np.argmax(far, axis=1)]
        nxt = np.where(done[:, None], start, nxt)
        verts[:, step] = nxt
        step_vec = nxt - cur
        d_ang = np.where(done, d_ang, np.arctan2(step_vec[:, 1], step_vec[:, 0]))
        done |= np.all(np.abs(nxt - start) < 1e-9, axis=1)
        cur = nxt
    verts[~done, -1] = start[~done]  # cannot happen for a true hull; keeps the polygon closed
    return verts


def _fill_convex(verts, size):
    """Rasterise convex polygons: pixel centres inside or on the boundary are True.

    Row by row: every edge bounds ``x`` from one side on each row, so the inside of a convex
    polygon on a row is one interval.  Cost ``O(B * edges * size)`` plus ``O(B * size**2)``.
    """
    v0 = verts[:, :-1]
    e = verts[:, 1:] - v0  # (B, E, 2)
    ex, ey = e[..., 0][..., None], e[..., 1][..., None]  # (B, E, 1)
    y = np.arange(size, dtype=np.float64)[None, None, :]  # (1, 1, H)
    # inside: cross(e, p - v0) >= 0  <=>  ey * x <= ex * (y - v0y) + ey * v0x
    c = ex * (y - v0[..., 1][..., None]) + ey * v0[..., 0][..., None]
    eps = 1e-9
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = c / ey
    upper = np.where(ey > eps, bound, np.inf).min(axis=1)  # (B, H)
    lower = np.where(ey < -eps, bound, -np.inf).max(axis=1)
    flat_ok = np.where(np.abs(ey) <= eps, c >= -eps, True).all(axis=1)
    x = np.arange(size, dtype=np.float64)[None, None, :]
    return (x >= lower[..., None] - eps) & (x <= upper[..., None] + eps) & flat_ok[..., None]


def _shapes(rng, count, size):
    """Binary convex-hull shapes, ``(count, size, size)`` bool, redrawing too-small hulls."""
    margin = size // 16 + 1
    out = np.empty((count, size, size), dtype=bool)
    todo = np.arange(count)
    while todo.size:
        n_pts = rng.integers(_MIN_POINTS, _MAX_POINTS + 1, size=todo.size)
        pts = rng.uniform(margin, size - 1 - margin, size=(todo.size, _MAX_POINTS, 2))
        # unused slots repeat the first point, which leaves the hull unchanged
        unused = np.arange(_MAX_POINTS)[None, :] >= n_pts[:, None]
        pts = np.where(unused[..., None], pts[:, :1, :], pts)
        masks = _fill_convex(_hull_vertices(pts), size)
        ok = masks.mean(axis=(1, 2)) >= _MIN_AREA_FRACTION
        out[todo[ok]] = masks[ok]
        todo = todo[~ok]
    return out


def _phases(rng, count, size, support):
    """Random sine-grating + Gaussian phases, span uniform in (0.2 pi, 2 pi], 0 outside."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy, xx = yy[None, None], xx[None, None]
    n_sin = rng.integers(0, _MAX_SINES + 1, size=count)
    n_gau = rng.integers(0, _MAX_GAUSS + 1, size=count)
    n_gau = np.where(n_sin + n_gau == 0, 1, n_gau)
    # sine gratings
    theta = rng.uniform(0, np.pi, size=(count, _MAX_SINES, 1, 1))
    period = rng.uniform(4.0, size, size=(count, _MAX_SINES, 1, 1))
    offset = rng.uniform(0, 2 * np.pi, size=(count, _MAX_SINES, 1, 1))
    w_sin = rng.uniform(0.2, 1.0, size=(count, _MAX_SINES)) * (np.arange(_MAX_SINES) < n_sin[:, None])
    k = (2 * np.pi / period).astype(np.float32)
    arg = k * (np.cos(theta).astype(np.float32) * xx + np.sin(theta).astype(np.float32) * yy) + offset
    phase = np.einsum("bk,bkhw->bhw", w_sin.astype(np.float32), np.sin(arg, dtype=np.float32))
    # Gaussians
    cy = rng.uniform(0, size, size=(count, _MAX_GAUSS, 1, 1)).astype(np.float32)
    cx = rng.uniform(0, size, size=(count, _MAX_GAUSS, 1, 1)).astype(np.float32)
    sig = rng.uniform(size / 16, size / 4, size=(count, _MAX_GAUSS, 1, 1)).astype(np.float32)
    w_gau = rng.uniform(-1.0, 1.0, size=(count, _MAX_GAUSS)) * (np.arange(_MAX_GAUSS) < n_gau[:, None])
    g = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sig * sig))
    phase += np.einsum("bk,bkhw->bhw", w_gau.astype(np.float32), g)
    # span inside the object rescaled to a random target within 2 pi, centred on 0
    lo = np.where(support, phase, np.inf).min(axis=(1, 2))
    hi = np.where(support, phase, -np.inf).max(axis=(1, 2))
    has = support.any(axis=(1, 2))
    lo, hi = np.where(has, lo, 0.0), np.where(has, hi, 0.0)
    span = hi - lo
    target = rng.uniform(0.1, 1.0, size=count) * 2 * np.pi
    scale = np.where(span > 1e-6, target / np.where(span > 1e-6, span, 1), 0.0)
    phase = (phase - ((hi + lo) / 2)[:, None, None]) * scale[:, None, None]
    phase = np.clip(phase, -np.pi, np.pi)
    return np.where(support, phase, 0.0).astype(np.float32)


def simulate_objects(count: int, size: int = 32, seed: int = 0, start: int = 0):
    """The paper's random objects (amplitude and phase).

    Parameters
    ----------
    count : int
        Number of objects.
    size : int
        Side of the square object frame in pixels (>= 8).
    seed : int
        Random seed; example ``i`` depends only on ``seed`` and ``start + i``.
    start : int
        Index of the first example, to continue a sequence (must be a multiple of BLOCK).

    Returns
    -------
    amplitude, phase : ndarray, float32, shape (count, size, size)
        Amplitude in 0..1 (max 1 where the object is thick); phase in radians, 0 outside.
    """
    if start % BLOCK:
        raise ValueError(f"start must be a multiple of {BLOCK}")
    amp = np.empty((count, size, size), dtype=np.float32)
    pha = np.empty((count, size, size), dtype=np.float32)
    first_block = start // BLOCK
    for j, lo in enumerate(range(0, count, BLOCK)):
        n = min(BLOCK, count - lo)
        rng = np.random.default_rng([int(seed), first_block + j])
        shapes = _shapes(rng, BLOCK, size)[:n]
        a = ndimage.gaussian_filter(shapes.astype(np.float32), sigma=(0, 1, 1), mode="constant")
        a /= np.maximum(a.max(axis=(1, 2), keepdims=True), 1e-12)
        support = a > physics.SHAPE_THRESHOLD
        p = _phases(rng, BLOCK, size, np.pad(support, ((0, BLOCK - n), (0, 0), (0, 0))))[:n]
        amp[lo : lo + n] = a
        pha[lo : lo + n] = p
    return amp, pha


#: Threads of the simulator's FFTs (scipy's ``workers``; -1: all cores).  A process that is one
#: of several simulating in parallel sets it to 1 (:func:`napari_cdinn.nn.trainer.data_pool`).
FFT_WORKERS = -1


def patterns_from_objects(amplitude, phase, oversampling: int = 2):
    """Centred diffraction intensities of objects padded ``oversampling`` times (float32)."""
    obj = (amplitude * np.exp(1j * phase)).astype(np.complex64)
    obj = physics.pad(obj, oversampling)
    ax = (-2, -1)
    f = scipy.fft.fftshift(scipy.fft.fft2(scipy.fft.ifftshift(obj, axes=ax), axes=ax, workers=FFT_WORKERS), axes=ax)
    return (f.real**2 + f.imag**2).astype(np.float32)


def simulate(
    count: int,
    size: int = 32,
    seed: int = 0,
    oversampling: int = 1,
    photons: float | None = None,
    beamstop: float = 0.0,
):
    """Simulate the paper's training data: objects and their diffraction intensities.

    Parameters
    ----------
    count : int
        Number of examples (>= 1).
    size : int
        Object frame side in pixels (the paper: 32).
    seed : int
        Random seed (deterministic per example; see the module docstring).
    oversampling : int
        Zero-padding factor of the object before the FFT; the pattern is
        ``oversampling * size`` pixels wide (1: the networks' input, 2: the iterative protocol).
    photons : float, optional
        Mean total photon count per pattern; Poisson noise is applied (counts returned).
    beamstop : float
        Radius in pattern pixels of a central disc that is not measured (0: none).

    Returns
    -------
    dict
        ``intensity`` (count, M, M) float32, ``amplitude`` and ``phase`` (count, size, size)
        float32 (the truth), and ``mask`` (M, M) bool when ``beamstop > 0`` (True = masked).
    """
    count, size, oversampling = int(count), int(size), int(oversampling)
    if count < 1:
        raise ValueError("count must be at least 1")
    if size < 8:
        raise ValueError("size must be at least 8 pixels")
    if oversampling < 1:
        raise ValueError("oversampling must be a positive integer")
    if photons is not None and not photons > 0:
        raise ValueError("photons must be positive")
    if beamstop < 0:
        raise ValueError("the beamstop radius must not be negative")
    amp, pha = simulate_objects(count, size, seed)
    out = {"amplitude": amp, "phase": pha}
    inten = np.empty((count, size * oversampling, size * oversampling), dtype=np.float32)
    chunk = 8192
    for lo in range(0, count, chunk):
        inten[lo : lo + chunk] = patterns_from_objects(amp[lo : lo + chunk], pha[lo : lo + chunk], oversampling)
    if photons is not None:
        rng = np.random.default_rng([int(seed), 2**31 - 1])
        total = inten.sum(axis=(1, 2), keepdims=True)
        inten = rng.poisson(inten * (photons / np.maximum(total, 1e-30))).astype(np.float32)
    if beamstop > 0:
        m = size * oversampling
        yy, xx = np.mgrid[0:m, 0:m]
        mask = (yy - m // 2) ** 2 + (xx - m // 2) ** 2 <= beamstop**2
        inten[:, mask] = 0.0
        out["mask"] = mask
    out["intensity"] = inten
    return out
