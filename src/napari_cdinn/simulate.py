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

Beyond the paper
----------------
* **Object families** (:data:`FAMILIES`): ``paper`` (the recipe above: convex, flat), ``textured``
  (the paper's shape with a smooth random amplitude field inside, like a real particle's varying
  thickness) and ``holes`` (non-convex: the union of 2-3 small convex hulls with 1-3 round holes
  punched in).  ``families`` mixes them with given weights; the paper's examples are the same
  whatever the mix (the other families draw from their own random stream).
* **A detector model** (:class:`Detector`), applied to the pattern: Poisson counting at a total
  photon count per pattern (log-uniform over a range, or noise-free for a fraction), a flat
  background, a central beamstop disc of random radius, detector gaps (a row and a column band at
  random offsets), saturation (pixels above a fraction of the frame's brightest count) and a
  pattern cut off-centre (its zero frequency up to ``offset`` pixels from the centre pixel: the
  object carries the matching phase ramp, :func:`offset_phase`, so the truth is what was measured).
  Beamstop, gaps and saturated pixels are *unmeasured*: their intensity is set to 0 and they are
  reported in ``mask`` (True = unmeasured).  Every part is off by default (the paper's ideal
  pattern); :data:`DETECTORS` holds the named presets (``realistic`` is the training mixture).

Determinism: examples are generated in blocks of :data:`BLOCK` from
``numpy.random.default_rng([seed, block])``, so example ``i`` depends only on the seed and ``i``
(and on the options): ``simulate(n, seed=s)`` is a prefix of ``simulate(m, seed=s)`` for
``m > n``.  Generation is vectorised over a block and uses both FFT workers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import scipy.fft
from scipy import ndimage

from . import physics
from .checks import number_in, whole_number

if TYPE_CHECKING:
    import torch

__all__ = ["BLOCK", "DETECTORS", "FAMILIES", "MAX_PHOTONS", "MIXTURES", "Detector", "apply_detector", "as_detector",
           "detector_mask", "draw_detector", "offset_phase", "patterns_from_objects", "raw_detector_frames", "simulate",
           "simulate_objects"]

#: Examples per random block; example ``i`` is drawn from block ``i // BLOCK``.
BLOCK = 1024
#: The most photons per pattern, and of background per pixel, that the detector model draws: a pixel's
#: Poisson rate is at most their sum, and NumPy's Poisson draws stop at rates near 9.2e18.
MAX_PHOTONS = 1e18

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


#: Object families of :func:`simulate_objects` (see the module notes).
FAMILIES = ("paper", "textured", "holes")
#: Named family mixes (weights); ``realistic`` is the training mixture of the shipped networks;
#: ``realistic-paper`` leans towards the paper's objects (a specialisation stage: docs/decisions.md).
MIXTURES = {"paper": {"paper": 1.0}, "textured": {"textured": 1.0}, "holes": {"holes": 1.0},
            "realistic": {"paper": 0.5, "textured": 0.3, "holes": 0.2},
            "realistic-paper": {"paper": 0.7, "textured": 0.2, "holes": 0.1}}


def _nonconvex(rng, count, size):
    """Non-convex shapes with holes, ``(count, size, size)`` bool: the union of 2-3 small convex
    hulls (4-8 points each in a box of 30-60 % of the usable span, centred within 20 % of the
    span from the frame's centre, so the parts mostly overlap), minus up to 3 discs of
    radius 1-2.5 pixels centred on object pixels.  Shapes covering less than 5 % are redrawn."""
    margin = size // 16 + 1
    span = size - 1 - 2 * margin
    out = np.empty((count, size, size), dtype=bool)
    yy, xx = np.mgrid[0:size, 0:size]
    todo = np.arange(count)
    while todo.size:
        b, parts, npts = todo.size, 3, 8
        side = rng.uniform(0.3, 0.6, size=(b, parts, 1, 1)) * span
        centre = margin + span / 2 + rng.uniform(-0.2, 0.2, size=(b, parts, 1, 2)) * span  # parts overlap mostly
        corner = np.clip(centre - side / 2, margin, margin + span - side)
        pts = corner + rng.uniform(0, 1, size=(b, parts, npts, 2)) * side
        n_pts = rng.integers(4, npts + 1, size=(b, parts))
        unused = np.arange(npts)[None, None, :] >= n_pts[..., None]
        pts = np.where(unused[..., None], pts[:, :, :1, :], pts)
        fills = _fill_convex(_hull_vertices(pts.reshape(b * parts, npts, 2)), size).reshape(b, parts, size, size)
        used = np.arange(parts)[None, :] < rng.integers(2, parts + 1, size=b)[:, None]
        masks = (fills & used[..., None, None]).any(1)
        for _ in range(3):  # holes, centred on random object pixels
            score = np.where(masks, rng.uniform(size=masks.shape), -1.0).reshape(b, -1)
            centre = score.argmax(1)
            cy, cx = (centre // size)[:, None, None], (centre % size)[:, None, None]
            r = rng.uniform(1.0, 2.5, size=(b, 1, 1))
            on = (rng.uniform(size=(b, 1, 1)) < 0.7) & masks.any((1, 2))[:, None, None]
            masks &= ~(on & ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r))
        ok = masks.mean(axis=(1, 2)) >= _MIN_AREA_FRACTION
        out[todo[ok]] = masks[ok]
        todo = todo[~ok]
    return out


def _textures(rng, count, size):
    """Smooth random fields in ``lo..1`` (float32, ``(count, size, size)``): Gaussian-filtered white
    noise (correlation length 0.7-4 pixels), rescaled per frame so its minimum is ``lo``, drawn in 0.2..0.7."""
    noise = rng.standard_normal((count, size, size)).astype(np.float32)
    k = np.fft.fftfreq(size).astype(np.float32)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    sigma = rng.uniform(0.7, 4.0, size=(count, 1, 1)).astype(np.float32)
    field = np.fft.ifft2(np.fft.fft2(noise) * np.exp(-2 * (np.pi * sigma) ** 2 * k2)).real
    lo_f, hi_f = field.min(axis=(1, 2), keepdims=True), field.max(axis=(1, 2), keepdims=True)
    unit = (field - lo_f) / np.maximum(hi_f - lo_f, 1e-12)
    lo = rng.uniform(0.2, 0.7, size=(count, 1, 1))
    return (lo + (1 - lo) * unit).astype(np.float32)


def _family_weights(families):
    """``{family: weight}`` from None (the paper), a family or mixture name, or a dict; validated."""
    if families is None:
        return {"paper": 1.0}
    if isinstance(families, str):
        if families not in MIXTURES:
            raise ValueError(f"unknown object family {families!r}; expected one of {', '.join(MIXTURES)}")
        return MIXTURES[families]
    weights = {str(k): float(v) for k, v in dict(families).items()}
    bad = sorted(set(weights) - set(FAMILIES))
    if bad or any(not v >= 0 for v in weights.values()) or not sum(weights.values()) > 0:
        raise ValueError(f"families must map {', '.join(FAMILIES)} to non-negative weights, got {families!r}")
    return weights


def _draw_families(rng, count, weights):
    """Index into :data:`FAMILIES` of each of ``count`` examples (int8)."""
    p = np.array([weights.get(f, 0.0) for f in FAMILIES])
    return rng.choice(len(FAMILIES), size=count, p=p / p.sum()).astype(np.int8)


def simulate_objects(
    count: int, size: int = 32, seed: int = 0, start: int = 0, families: str | Mapping[str, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Random objects (amplitude and phase): the paper's, or a mix of :data:`FAMILIES`.

    Parameters
    ----------
    count : int
        Number of objects.
    size : int
        Side of the square object frame in pixels (>= 8).
    seed : int
        Random seed; example ``i`` depends only on ``seed`` and ``start + i`` (and the mix).
    start : int
        Index of the first example, to continue a sequence (must be a multiple of BLOCK).
    families : None, str or dict, optional
        None: the paper's objects.  A name of :data:`MIXTURES` (a family, or ``realistic``) or a
        ``{family: weight}`` dict draws each object's family with these weights.

    Returns
    -------
    amplitude, phase : ndarray, float32, shape (count, size, size)
        Amplitude in 0..1 (max 1 per object); phase in radians, 0 outside the object.
    """
    if start % BLOCK:
        raise ValueError(f"start must be a multiple of {BLOCK}")
    weights = _family_weights(families)
    amp = np.empty((count, size, size), dtype=np.float32)
    pha = np.empty((count, size, size), dtype=np.float32)
    first_block = start // BLOCK
    for j, lo in enumerate(range(0, count, BLOCK)):
        n = min(BLOCK, count - lo)
        rng = np.random.default_rng([int(seed), first_block + j])
        shapes = _shapes(rng, BLOCK, size)[:n]
        texture = None
        if set(weights) != {"paper"}:  # the other families draw from a stream of their own
            extra = np.random.default_rng([int(seed), first_block + j, 1])
            family = _draw_families(extra, BLOCK, weights)[:n]
            holes = family == FAMILIES.index("holes")
            if holes.any():
                shapes[holes] = _nonconvex(extra, int(holes.sum()), size)
            textured = family == FAMILIES.index("textured")
            if textured.any():
                texture = np.ones((n, size, size), np.float32)
                texture[textured] = _textures(extra, int(textured.sum()), size)
        a = ndimage.gaussian_filter(shapes.astype(np.float32), sigma=(0, 1, 1), mode="constant")
        if texture is not None:
            a *= texture
        a /= np.maximum(a.max(axis=(1, 2), keepdims=True), 1e-12)
        support = a > physics.SHAPE_THRESHOLD
        p = _phases(rng, BLOCK, size, np.pad(support, ((0, BLOCK - n), (0, 0), (0, 0))))[:n]
        amp[lo : lo + n] = a
        pha[lo : lo + n] = p
    return amp, pha


@dataclass(frozen=True)
class Detector:
    """What a detector does to an ideal pattern; every part off by default.

    Parameters
    ----------
    photons : (float, float), optional
        Total photon count per pattern, drawn log-uniformly in this range (equal ends: a fixed
        count; at most :data:`MAX_PHOTONS`); the pattern is then ``Poisson(photons * I / sum I +
        background)``.  None: noise-free.
    clean : float
        Fraction of patterns left noise-free although ``photons`` is given.
    background : (float, float)
        Mean flat background in photons per pixel, drawn uniformly (noisy patterns only; at most
        :data:`MAX_PHOTONS`).
    background_rate : float
        Fraction of noisy patterns with a background.
    beamstop : (float, float)
        Radius in pixels of the unmeasured central disc, drawn uniformly (0: none).
    beamstop_rate : float
        Fraction of patterns with a beamstop.
    gaps : float
        Fraction of patterns with detector gaps: one row band and one column band, each of width
        ``gap_width`` pixels (drawn), at random offsets within a quarter of the frame from the centre.
    gap_width : (int, int)
        Range of gap widths in pixels.
    saturation : float
        Fraction of patterns whose brightest pixels saturate (unmeasured).
    saturation_level : (float, float)
        Saturation level as a fraction of the frame's brightest count, drawn log-uniformly.
    offset : float
        Largest distance, per axis and in pixels of the pattern, of the zero frequency from the
        centre pixel (a centre found a little off, or a beam that moved): drawn uniformly in
        ``[-offset, offset]`` per axis.  The object's phase carries the ramp that moves it there.
    offset_rate : float
        Fraction of patterns cut off-centre.
    """

    photons: tuple | None = None
    clean: float = 0.0
    background: tuple = (0.0, 0.0)
    background_rate: float = 1.0
    beamstop: tuple = (0.0, 0.0)
    beamstop_rate: float = 1.0
    gaps: float = 0.0
    gap_width: tuple = (1, 2)
    saturation: float = 0.0
    saturation_level: tuple = (0.05, 0.5)
    offset: float = 0.0
    offset_rate: float = 1.0

    def __post_init__(self):
        if self.photons is not None and not (0 < self.photons[0] <= self.photons[1] <= MAX_PHOTONS):
            raise ValueError(f"photons must be a positive range up to {MAX_PHOTONS:g}, got {self.photons!r}")
        if not (0 <= self.background[0] <= self.background[1] <= MAX_PHOTONS):
            raise ValueError(f"the background must be a non-negative range up to {MAX_PHOTONS:g}, got "
                             f"{self.background!r}")
        if not (0 <= self.beamstop[0] <= self.beamstop[1] < np.inf):
            raise ValueError(f"the beamstop radius must be a non-negative range, got {self.beamstop!r}")
        if not (1 <= self.gap_width[0] <= self.gap_width[1]):
            raise ValueError(f"gap widths must be a range of at least 1 pixel, got {self.gap_width!r}")
        if not (0 < self.saturation_level[0] <= self.saturation_level[1] <= 1):
            raise ValueError(f"saturation levels must be a range of fractions in (0, 1], got {self.saturation_level!r}")
        if not 0 <= self.offset < np.inf:
            raise ValueError(f"the centre offset must be a non-negative number of pixels, got {self.offset!r}")
        for name in ("clean", "background_rate", "beamstop_rate", "gaps", "saturation", "offset_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {getattr(self, name)!r}")

    @property
    def ideal(self) -> bool:
        """True when the detector changes nothing."""
        no_beamstop = self.beamstop[1] == 0 or self.beamstop_rate == 0
        off_centre = self.offset > 0 and self.offset_rate > 0
        return self.photons is None and no_beamstop and not self.gaps and not self.saturation and not off_centre


#: Named detector presets.  ``realistic`` is the training mixture of the shipped networks: counts
#: from 1e3 to 1e9 photons per pattern (15 % noise-free), a background on 30 % of the noisy
#: patterns, a beamstop of radius 0.5-3.5 pixels on half, gaps on 20 %, saturation on 10 %.
#: ``realistic-clean`` is the same with 40 % noise-free patterns (a specialisation stage).
DETECTORS = {
    "ideal": Detector(),
    "realistic": Detector(photons=(1e3, 1e9), clean=0.15, background=(0.0, 0.3), background_rate=0.3,
                          beamstop=(0.5, 3.5), beamstop_rate=0.5, gaps=0.2, saturation=0.1),
}
DETECTORS["realistic-clean"] = replace(DETECTORS["realistic"], clean=0.4)
#: ``realistic-offcentre``: ``realistic-clean`` with half the patterns cut up to 2 pixels off-centre
#: (what a centre found from few frames leaves; docs/decisions.md, "Off-centre patterns").
DETECTORS["realistic-offcentre"] = replace(DETECTORS["realistic-clean"], offset=2.0, offset_rate=0.5)


def draw_detector(detector: Detector, count: int, seed: int = 0, start: int = 0) -> dict:
    """Per-pattern detector settings, deterministic per ``(seed, start + i)`` (blocks of :data:`BLOCK`).

    Returns
    -------
    dict of ``(count,)`` arrays: ``photons`` (inf: noise-free), ``background`` (photons per pixel),
    ``beamstop`` (radius, 0: none), ``gap_row`` and ``gap_col`` (offsets from the centre),
    ``gap_width`` (0: no gaps), ``saturation`` (fraction of the brightest count; inf: none),
    ``offset_row`` and ``offset_col`` (pixels of the zero frequency from the centre pixel).
    """
    if start % BLOCK:
        raise ValueError(f"start must be a multiple of {BLOCK}")
    d = detector
    parts = []
    for j, lo in enumerate(range(0, int(count), BLOCK)):
        rng = np.random.default_rng([int(seed), start // BLOCK + j, 2])
        u = rng.uniform(size=(8, BLOCK))
        out = {"photons": np.full(BLOCK, np.inf), "background": np.zeros(BLOCK)}
        if d.photons is not None:
            out["photons"] = np.where(u[0] < d.clean, np.inf, _log_uniform(d.photons, u[1]))
            out["background"] = np.where(u[2] < d.background_rate,
                                         d.background[0] + (d.background[1] - d.background[0]) * u[3], 0.0)
        out["beamstop"] = np.where(u[4] < d.beamstop_rate, d.beamstop[0] + (d.beamstop[1] - d.beamstop[0]) * u[5], 0.0)
        gapped = rng.uniform(size=BLOCK) < d.gaps
        out["gap_width"] = np.where(gapped, rng.integers(d.gap_width[0], d.gap_width[1] + 1, size=BLOCK), 0)
        out["gap_row"] = rng.uniform(-0.25, 0.25, size=BLOCK)
        out["gap_col"] = rng.uniform(-0.25, 0.25, size=BLOCK)
        out["saturation"] = np.where(u[6] < d.saturation, _log_uniform(d.saturation_level, u[7]), np.inf)
        off = rng.uniform(size=(3, BLOCK))  # drawn last: the settings above do not depend on the offset
        moved = (off[0] < d.offset_rate) * d.offset
        out["offset_row"], out["offset_col"] = moved * (2 * off[1] - 1), moved * (2 * off[2] - 1)
        parts.append({k: v[: min(BLOCK, count - lo)] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _log_uniform(bounds, u):
    """``u`` (uniform in 0..1) mapped log-uniformly onto ``bounds``; equal bounds give that value exactly."""
    lo, hi = float(bounds[0]), float(bounds[1])
    return np.full(np.shape(u), lo) if lo == hi else np.exp(np.log(lo) + (np.log(hi) - np.log(lo)) * u)


def _column(values, like):
    """Per-frame ``values`` as an ``(N, 1, 1)`` float32 array in the library (and on the device) of ``like``."""
    v = np.asarray(values, dtype=np.float32)[:, None, None]
    return v if physics.array_lib(like) is np else physics.array_lib(like).as_tensor(v, device=like.device)


def offset_phase(amplitude, phase, settings: dict, side: int):
    """Phases of objects whose ``side``-pixel patterns have their zero frequency ``settings["offset_row"]``,
    ``settings["offset_col"]`` pixels from the centre pixel: :func:`napari_cdinn.physics.ramp_phase` where
    the amplitude is not 0.  NumPy arrays or tensors ``(N, S, S)``; without offsets the phase is returned as is.
    """
    if "offset_row" not in settings or not (np.any(settings["offset_row"]) or np.any(settings["offset_col"])):
        return phase
    shifts = np.stack([np.asarray(settings["offset_row"]), np.asarray(settings["offset_col"])], 1)
    return physics.ramp_phase(phase, shifts, side, amplitude > 0)


def detector_mask(settings: dict, m: int, like: np.ndarray | torch.Tensor | None = None) -> np.ndarray | torch.Tensor:
    """Unmeasured pixels (beamstop and gaps) of ``M x M`` centred patterns, ``(N, M, M)`` bool.

    ``settings`` as :func:`draw_detector` returns; with a tensor ``like`` the mask is a tensor on its device.
    """
    grid = physics.arange_like(m, like if like is not None else np.zeros(1)) - m // 2

    def col(key):
        return _column(settings[key], grid)

    yy, xx = grid[None, :, None], grid[None, None, :]
    r = col("beamstop")
    mask = (yy * yy + xx * xx <= r * r) & (r > 0)
    w = col("gap_width")
    row, cl = (col("gap_row") * m).round(), (col("gap_col") * m).round()
    in_row = (yy >= row) & (yy < row + w)
    in_col = (xx >= cl) & (xx < cl + w)
    return mask | ((in_row | in_col) & (w > 0))


def apply_detector(
    intensity: np.ndarray | torch.Tensor, settings: dict, rng: np.random.Generator | torch.Generator | None = None
) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]:
    """Counts and unmeasured pixels of ideal patterns under per-pattern detector ``settings``.

    Parameters
    ----------
    intensity : ndarray or Tensor, (N, M, M), centred ideal intensities
    settings : dict
        Per-pattern settings from :func:`draw_detector`.
    rng : numpy.random.Generator or torch.Generator, optional
        Source of the Poisson draws (NumPy input: a Generator is required when any pattern is noisy).

    Returns
    -------
    counts : float32, same kind, unmeasured pixels set to 0 (noise-free patterns keep their scale)
    mask : bool, same kind, True = unmeasured (beamstop, gaps, saturated)
    """
    lib = physics.array_lib(intensity)
    m = intensity.shape[-1]
    photons = np.asarray(settings["photons"], dtype=np.float64)
    noisy = np.isfinite(photons)

    def col(v):
        return _column(v, intensity)

    counts = intensity
    if noisy.any():
        total = intensity.sum(axis=(-2, -1), keepdims=True) if lib is np else intensity.sum((-2, -1), keepdim=True)
        total = total + (total == 0) if lib is np else total.clamp_min(1e-30)
        lam = intensity * col(np.where(noisy, photons, 0.0)) / total + col(np.where(noisy, settings["background"], 0.0))
        if lib is np:
            drawn = rng.poisson(lam).astype(np.float32)
        else:
            drawn = lib.poisson(lam.float(), generator=rng)
        keep = col(noisy) > 0
        counts = lib.where(keep, drawn, intensity)
    mask = detector_mask(settings, m, intensity if lib is not np else None)
    peak = counts.max(axis=(-2, -1), keepdims=True) if lib is np else counts.amax((-2, -1), keepdim=True)
    with np.errstate(invalid="ignore"):  # an all-zero frame without saturation: inf * 0 (NaN), never above it
        mask = mask | (counts > col(settings["saturation"]) * peak)
    zero = 0.0 if lib is np else lib.zeros((), dtype=counts.dtype, device=counts.device)
    counts = lib.where(mask, zero, counts)
    return (counts.astype(np.float32) if lib is np else counts.float()), mask


#: Threads of the simulator's FFTs (scipy's ``workers``; -1: all cores).  A process that is one
#: of several simulating in parallel sets it to 1 (:func:`napari_cdinn.nn.trainer.data_pool`).
FFT_WORKERS = -1


def patterns_from_objects(amplitude: np.ndarray, phase: np.ndarray, oversampling: int = 2) -> np.ndarray:
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
    *,
    families: str | Mapping[str, float] | None = None,
    detector: Detector | str | None = None,
) -> dict[str, np.ndarray]:
    """Simulate objects and their diffraction intensities as a detector records them.

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
        Total photon count per pattern; Poisson noise is applied (counts returned).  Shorthand
        for ``detector=Detector(photons=(photons, photons))``.
    beamstop : float
        Radius in pattern pixels of a central disc that is not measured (0: none); shorthand for
        ``Detector(beamstop=(beamstop, beamstop))``.
    families : None, str or dict, optional
        Object families (:func:`simulate_objects`); None: the paper's.
    detector : Detector or str, optional
        The detector model (:class:`Detector`, or a name of :data:`DETECTORS`); ``photons`` and
        ``beamstop``, when given, override its counts and beamstop.

    Returns
    -------
    dict
        ``intensity`` (count, M, M) float32 (unmeasured pixels 0), ``amplitude`` and ``phase``
        (count, size, size) float32 (the truth), ``mask`` bool when any pixel is unmeasured
        (True = unmeasured): (M, M) when it is the same for every frame, else (count, M, M);
        ``photons`` (count,) float64 (inf: noise-free) when the patterns are noisy.
    """
    count, oversampling = whole_number(count, "count", 1), whole_number(oversampling, "oversampling", 1)
    size, seed = whole_number(size, "size", 8, what="a whole number of pixels >= 8"), whole_number(seed, "seed", 0)
    if photons is not None and not photons > 0:
        raise ValueError("photons must be positive")
    beamstop = number_in(beamstop, "the beamstop radius", 0.0, math.inf, low_inclusive=True,
                         what="a number of pixels >= 0")
    det = as_detector(detector, photons, beamstop)
    amp, pha = simulate_objects(count, size, seed, families=families)
    m = size * oversampling
    settings = None if det.ideal else draw_detector(det, count, seed)
    if settings is not None:
        pha = offset_phase(amp, pha, settings, m)
    out = {"amplitude": amp, "phase": pha}
    inten = np.empty((count, m, m), dtype=np.float32)
    chunk = 8192
    for lo in range(0, count, chunk):
        inten[lo : lo + chunk] = patterns_from_objects(amp[lo : lo + chunk], pha[lo : lo + chunk], oversampling)
    if settings is not None:
        mask = np.empty(inten.shape, dtype=bool)
        for j, lo in enumerate(range(0, count, BLOCK)):
            sl = slice(lo, lo + BLOCK)
            rng = np.random.default_rng([int(seed), j, 3])
            inten[sl], mask[sl] = apply_detector(inten[sl], {k: v[sl] for k, v in settings.items()}, rng)
        if mask.any():
            out["mask"] = mask[0] if (mask == mask[:1]).all() else mask
        if det.photons is not None:
            out["photons"] = settings["photons"]
    out["intensity"] = inten
    return out


def as_detector(detector: Detector | str | None, photons: float | None = None, beamstop: float = 0.0) -> Detector:
    """The :class:`Detector` that ``simulate``'s arguments describe: a Detector, a name of
    :data:`DETECTORS` (ValueError for another) or None (ideal), with ``photons``/``beamstop`` overriding."""
    if detector is None:
        detector = Detector()
    elif isinstance(detector, str):
        if detector not in DETECTORS:
            raise ValueError(f"unknown detector {detector!r}; expected one of {', '.join(DETECTORS)}")
        detector = DETECTORS[detector]
    changes = {}
    if photons is not None:
        changes.update(photons=(float(photons), float(photons)), clean=0.0)
    if beamstop > 0:
        changes.update(beamstop=(float(beamstop), float(beamstop)), beamstop_rate=1.0)
    return replace(detector, **changes) if changes else detector


def raw_detector_frames(count: int = 32, shape=(300, 260), beam=(141, 97), seed: int = 0, photons: float = 1e5,
                        families: str = "realistic", oversampling: int = 6) -> dict[str, np.ndarray]:
    """Frames as a photon-counting detector writes them, for trying ``cdinn prepare``: the beam off-centre
    on a rectangular chip, a beamstop over it, and module gaps, marked as PILATUS marks them (-1).

    Parameters
    ----------
    count, seed, photons, families
        As in :func:`simulate` (32-pixel objects, Poisson counts).
    shape : (int, int)
        The chip ``(rows, columns)``.
    beam : (int, int)
        The direct beam's pixel (the patterns' zero frequency).
    oversampling : int
        The patterns are ``32 * oversampling`` pixels wide, cut to the chip; the default 6 gives
        192-pixel patterns, as wide as the square ``cdinn prepare`` cuts around the beam, so that
        every pixel it keeps holds the pattern (a narrower pattern leaves a ring of zeros around it
        that no compact object gives, and phase retrieval cannot fit).

    Returns
    -------
    dict with ``frames`` (int32, ``(count, *shape)``, -1 where unmeasured) and ``beam``, ``amplitude``
    and ``phase`` (the truth).
    """
    data = simulate(count, seed=seed, oversampling=oversampling, photons=photons, families=families)
    side = data["intensity"].shape[-1]
    frames = np.zeros((count, *shape), dtype=np.int32)
    by, bx = (int(v) for v in beam)
    y0, x0 = by - side // 2, bx - side // 2
    ys, xs = slice(max(y0, 0), min(y0 + side, shape[0])), slice(max(x0, 0), min(x0 + side, shape[1]))
    frames[:, ys, xs] = data["intensity"][:, ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    unmeasured = (rows - by) ** 2 + (cols - bx) ** 2 <= 3**2  # beamstop
    unmeasured |= ((cols - bx) % 100 == 33) | ((cols - bx) % 100 == 34)  # module gaps, 2 wide, every 100 px
    unmeasured |= ((rows - by) % 100 == 48) | ((rows - by) % 100 == 49)
    frames[:, unmeasured] = -1
    return {"frames": frames, "beam": np.array(beam), "amplitude": data["amplitude"], "phase": data["phase"]}
