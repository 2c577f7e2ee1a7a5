"""Raw detector frames to the centred, square patterns the rest of the package reads.

A detector records the direct beam somewhere on its chip, on a rectangle, often at a finer pixel
than the object needs.  :func:`prepare_frames` crops a square of the pattern around the beam's
position (the zero frequency), padding with *unmeasured* pixels where the square runs off the chip,
and optionally sums ``bin x bin`` pixels (counts stay whole numbers, so the counting-noise floor
:func:`napari_cdinn.physics.noise_chi2` still applies).  The result follows the package's
convention: zero frequency at pixel ``(n // 2, n // 2)`` of an ``n x n`` frame.

The beam's position is found by :func:`friedel_centre`, the centre of inversion symmetry of the
pattern (Friedel's law: ``I(c + q) = I(c - q)`` for a real object, and nearly so for a weak phase),
on the frames' mean (:func:`signal_shares`: each frame counts by its share of its signal, each pixel
over the frames that measure it): it is a peak of the pattern's self-convolution, which unmeasured pixels
(beamstop, gaps) do not bias because the score is normalised by the overlap of measured pixels.

Masks are True on unmeasured pixels.  A binned pixel is unmeasured when any of its pixels is: a
sum over part of a block is not a count of the whole block (docs/decisions.md, "Preparing
detector frames").  NaN/inf pixels are unmeasured, and so are the values integer detectors write
where they measure nothing (:func:`napari_cdinn.io.detector_markers`).  Everything here is NumPy.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from . import io, physics
from .checks import check_mask_layout, whole_number

__all__ = [
    "NOT_SQUARE_HINT",
    "centre_note",
    "choose_centre",
    "crop_origin",
    "default_size",
    "describe",
    "check_centre",
    "check_side",
    "frames_in_budget",
    "friedel_centre",
    "symmetry_centre",
    "mean_dark",
    "parse_centre",
    "prepare_chunk",
    "prepare_frames",
    "signal_shares",
    "stack_centre",
    "to_photons",
]

#: Shifts whose overlap of measured pixels is below this fraction of the largest are not scored
#: (a symmetry seen on a few pixels at the chip's edge is no evidence).
MIN_OVERLAP = 0.25
#: Added to the error for a frame that is not square: where raw detector frames become patterns.
NOT_SQUARE_HINT = " (cdinn prepare, or the Prepare detector frames dock, cuts centred squares out of detector frames)"
#: Frames wider than this are searched for their centre coarse to fine (:func:`friedel_centre`).
MAX_SIDE = 1024
#: Pixels :func:`stack_centre` reads at once at most (frames of a large chip come a few at a time).
CHUNK_PIXELS = 2**26
#: Frames :func:`stack_centre` reads at most, in :data:`CENTRE_BLOCKS` runs spread over a longer stack:
#: the centre is exact from a few dozen frames (benchmarks/README.md, "Preparing detector frames"), so a
#: stack of 100,000 is not read twice.
CENTRE_FRAMES = 1024
CENTRE_BLOCKS = 16
#: Sizes (after binning) the default prefers: the networks read 32-pixel multiples.
SIZE_STEP = 32
#: The smallest pattern side (after binning) the other commands take: ``cdinn reconstruct`` inverts
#: patterns from 8 x 8 on (the networks read 32 x 32 and larger).
MIN_SIDE = 8
#: Bytes of working memory per frame and per detector pixel of the square :func:`prepare_frames`
#: cuts: the crop in float64, its mask, their temporaries and the float32 result, with room for the
#: writer (measured peak: about 18 where the chip fills the square, 13 where the square runs off it).
WORK_BYTES = 32


def _measured(image, mask):
    """Float weights 1 on measured, finite pixels (0 elsewhere) and the image with 0 there."""
    image = np.asarray(image, dtype=np.float64)
    good = np.isfinite(image)
    if mask is not None:
        good &= ~np.asarray(mask, dtype=bool)
    return np.where(good, image, 0.0), good.astype(np.float64)


def friedel_centre(image, mask=None):
    """The zero-frequency position of a diffraction pattern: its centre of inversion symmetry.

    Frames wider than :data:`MAX_SIDE` are searched coarse to fine: :func:`symmetry_centre` of the
    frame binned to at most that side, then of the full-resolution square of that side around the
    coarse centre (the bright, symmetric middle), so that a large detector costs neither minutes nor
    gigabytes.  Arguments, result and errors: :func:`symmetry_centre`.
    """
    values, good = _measured(image, mask)
    if values.ndim != 2:
        raise ValueError(f"a pattern must be 2-D to find its centre, got shape {values.shape}")
    h, w = values.shape
    if max(h, w) <= MAX_SIDE:
        return symmetry_centre(values, ~good.astype(bool))
    k = -(-max(h, w) // MAX_SIDE)
    hh, ww = -(-h // k) * k, -(-w // k) * k
    pad_v = np.zeros((hh, ww))
    pad_g = np.zeros((hh, ww), dtype=bool)
    pad_v[:h, :w], pad_g[:h, :w] = values, good > 0
    coarse_v = pad_v.reshape(hh // k, k, ww // k, k).sum(axis=(1, 3))
    coarse_bad = ~pad_g.reshape(hh // k, k, ww // k, k).all(axis=(1, 3))
    cy, cx = symmetry_centre(coarse_v, coarse_bad)
    cy, cx = int(cy * k + k // 2), int(cx * k + k // 2)  # the middle of the coarse pixel
    half = MAX_SIDE // 2
    y0, x0 = min(max(cy - half, 0), max(h - MAX_SIDE, 0)), min(max(cx - half, 0), max(w - MAX_SIDE, 0))
    window = (slice(y0, y0 + MAX_SIDE), slice(x0, x0 + MAX_SIDE))
    fy, fx = symmetry_centre(values[window], ~good[window].astype(bool))
    return fy + y0, fx + x0


def symmetry_centre(image, mask=None):
    """The pixel about which a pattern is most nearly inversion-symmetric, every pixel scored at once.

    Scores every pixel ``c`` as the centre by the normalised self-convolution of the
    amplitudes ``w = sqrt(I)`` on measured pixels, ``sum_q w(q) w(2c - q) / sum_q w(q)**2 m(2c - q)``
    (1 for a perfectly symmetric pattern), over the centres where the measured pixels and their
    mirror images overlap on at least :data:`MIN_OVERLAP` of the best case.

    Parameters
    ----------
    image : array_like, (H, W)
        Intensities (a frame or the sum of a stack); negative values count as 0.
    mask : array_like of bool, (H, W), optional
        True on unmeasured pixels.

    Returns
    -------
    tuple of float
        ``(y, x)``, the pixel of ``image`` that holds the zero frequency.

    Raises
    ------
    ValueError
        For a frame that is not 2-D or has no measured signal.
    """
    values, good = _measured(image, mask)
    if values.ndim != 2:
        raise ValueError(f"a pattern must be 2-D to find its centre, got shape {values.shape}")
    w = np.sqrt(np.clip(values, 0.0, None))
    if not np.any(w > 0):
        raise ValueError("the frames hold no measured signal to find the centre from")
    from scipy import fft

    h, wd = w.shape
    shape = (2 * h - 1, 2 * wd - 1)  # every sum of two indices, no wrap-around
    padded = (fft.next_fast_len(shape[0]), fft.next_fast_len(shape[1], real=True))  # a detector's 2h - 1 is often slow

    def conv(a, b):
        spec = fft.rfft2(a, padded) * fft.rfft2(b, padded)
        return fft.irfft2(spec, padded)[: shape[0], : shape[1]]

    pairs = conv(w, w)
    norm = conv(w * w, good)
    overlap = conv(good, good)
    ok = (overlap >= MIN_OVERLAP * overlap.max()) & (norm > 1e-12 * norm.max())
    score = np.where(ok, pairs / np.where(ok, norm, 1.0), -np.inf)[::2, ::2]  # whole-pixel centres
    y, x = np.unravel_index(int(np.argmax(score)), score.shape)
    return float(y), float(x)


def signal_shares(frames, mask=None):
    """What frames add to their mean pattern: per pixel, the sum over the frames that measure it of
    each frame's share of its own measured signal, and how many frames measure it.

    Each frame counts alike whatever its flux (the bright frames, which saturate, do not outweigh the
    rest), and a pixel one frame misses (a saturated peak, a beamstop that moved) is still averaged
    over the frames that measure it: ``shares / max(seen, 1)`` is the stack's mean pattern, unmeasured
    where ``seen == 0`` (docs/decisions.md, "The centre of a stack").

    Parameters
    ----------
    frames : array_like, (N, H, W)
        Intensities; NaN/inf pixels are unmeasured, negative values count as 0.
    mask : array_like of bool, (H, W) or (N, H, W), optional
        True on unmeasured pixels.

    Returns
    -------
    shares : ndarray of float64, (H, W)
    seen : ndarray of int64, (H, W)
    """
    values, bad = physics.measured(np.asarray(frames, dtype=np.float32), mask)
    totals = values.sum((-2, -1), dtype=np.float64)
    scale = np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)
    shares = np.tensordot(scale.astype(np.float32), values, axes=(0, 0))  # float32: no float64 copy of the chunk
    return shares.astype(np.float64), (~bad).sum(0, dtype=np.int64)


def stack_centre(stack, mask=None, chunk_size=256, progress=None, should_stop=None, dark=None):
    """:func:`friedel_centre` of a stack's mean pattern (:func:`signal_shares`, read chunk by chunk).

    Parameters
    ----------
    stack : array_like, (N, H, W) or (H, W)
        Anything sliceable along its first axis (NumPy, dask, a lazy file stack), read as
        :func:`napari_cdinn.io.float32_frames` reads frames (an integer detector's marks: unmeasured).
    mask : array_like of bool, (H, W) or (N, H, W), optional
        True on unmeasured pixels; with a per-frame mask a pixel is unmeasured only where no frame
        measures it.  NaN/inf pixels of a frame are unmeasured in that frame.
    chunk_size : int
        Frames read at once (fewer where the frames are large).  A stack longer than
        :data:`CENTRE_FRAMES` is sampled: that many frames, in :data:`CENTRE_BLOCKS` runs spread
        evenly over it.
    progress : callable(done, total), optional
        Called after every chunk, with the frames read of those to read.
    should_stop : callable or threading.Event, optional
        Checked before every chunk; a stop raises :class:`napari_cdinn.jobs.Cancelled`.
    dark : array_like, (H, W), optional
        Subtracted from every frame (an integrating detector's reading without beam).

    Returns
    -------
    tuple of float, ``(y, x)``.
    """
    from .jobs import Cancelled, stop_requested
    from .stream import chunk_bounds

    shape = tuple(stack.shape)
    dark = None if dark is None else _check_dark(dark, shape[-2:])
    if len(shape) == 2:  # one frame: a stack of one
        stack = np.asarray(stack[...])[None]
    shares = np.zeros(shape[-2:], dtype=np.float64)
    seen = np.zeros(shape[-2:], dtype=np.int64)
    if mask is not None:
        check_mask_layout(mask, shape)
        mask = np.asarray(mask, dtype=bool)
    chunk_size = max(1, min(whole_number(chunk_size, "chunk_size", 1), CHUNK_PIXELS // max(shape[-2] * shape[-1], 1)))
    runs = sample_runs(stack.shape[0], CENTRE_FRAMES, CENTRE_BLOCKS)
    total, done = sum(b - a for a, b in runs), 0
    for start, stop in runs:
        for a, b in chunk_bounds(stop - start, chunk_size):
            a, b = start + a, start + b
            if stop_requested(should_stop):
                raise Cancelled(f"stopped after {done} of {total} frames while finding the centre")
            frames = io.float32_frames(stack[a:b])
            if dark is not None:
                frames = frames - dark
            part = signal_shares(frames, None if mask is None else mask if mask.ndim == 2 else mask[a:b])
            shares += part[0]
            seen += part[1]
            done += b - a
            if progress is not None:
                progress(done, total)
    return friedel_centre(shares / np.maximum(seen, 1), seen == 0)


def sample_runs(n, most, runs):
    """``[(start, stop), ...]``: all of ``n`` frames where ``n <= most``, else ``runs`` runs of
    ``most // runs`` consecutive frames spread evenly from the first frame to the last (consecutive
    frames read fast from chunked files)."""
    if n <= most:
        return [(0, n)]
    size = max(1, most // runs)
    starts = np.unique(np.linspace(0, n - size, runs).round().astype(int))
    return [(int(s), int(s) + size) for s in starts]


def _centre_values(centre):
    """The centre ``(row, column)`` as two finite floats, else ``ValueError`` (one sentence)."""
    try:
        cy, cx = (float(c) for c in centre)
        ok = math.isfinite(cy) and math.isfinite(cx)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"the centre must be two finite numbers (row, column) in detector pixels, got {centre!r}")
    return cy, cx


def _centre_pixel(centre):
    """The pixel that holds the zero frequency: the centre ``(row, column)`` rounded (halves up)."""
    cy, cx = _centre_values(centre)
    return int(np.floor(cy + 0.5)), int(np.floor(cx + 0.5))


def check_centre(centre, shape):
    """Raise ``ValueError`` (one sentence) unless ``centre`` (row, column) lies on the detector frame.

    ``shape`` is the frame's ``(H, W)`` or a stack's shape (its last two axes); the centre is two
    finite numbers in detector pixels, ``0 <= row < H`` and ``0 <= column < W``.
    """
    (cy, cx), (h, w) = _centre_values(centre), tuple(int(s) for s in shape[-2:])
    if not (0 <= cy < h and 0 <= cx < w):
        raise ValueError(f"the centre ({cy:g}, {cx:g}) lies outside the {h} x {w} detector frame")


def crop_origin(centre, size, bin=1):
    """Top-left detector pixel of the square that :func:`prepare_frames` cuts.

    The square is ``size * bin`` detector pixels wide; the block of ``bin x bin`` pixels that
    becomes output pixel ``(size // 2, size // 2)`` holds the centre pixel at its middle (odd
    ``bin``) or just past it (even ``bin``: half a detector pixel off, which the refinement's phase
    ramp absorbs).
    """
    cy, cx = _centre_pixel(centre)
    k = int(bin)
    return cy - k // 2 - k * (int(size) // 2), cx - k // 2 - k * (int(size) // 2)


def default_size(shape, centre, bin=1):
    """The largest output side whose square stays on the detector: a multiple of :data:`SIZE_STEP`
    where one fits (what the networks read), else the largest even side (at least 2).

    Parameters
    ----------
    shape : sequence of int
        Detector frame ``(H, W)`` (or a stack's shape: the last two axes).
    centre : (float, float)
    bin : int
    """
    h, w = (int(v) for v in shape[-2:])
    cy, cx = _centre_pixel(centre)
    k = int(bin)
    # size // 2 blocks before the centre pixel's block start, size // 2 blocks from it to the end
    half = min((cy - k // 2) // k, (h - cy + k // 2) // k, (cx - k // 2) // k, (w - cx + k // 2) // k)
    size = 2 * max(half, 1)
    return size - size % SIZE_STEP if size >= SIZE_STEP else size


def check_side(size, what="the size", option="--size"):
    """Raise ``ValueError`` (one sentence) where ``size x size`` patterns are smaller than :data:`MIN_SIDE`.

    ``what`` names where the size came from, ``option`` what sets it (the command's ``--size``, the
    dock's *size*).
    """
    if size < MIN_SIDE:
        raise ValueError(f"{what} gives {size} x {size} patterns, smaller than the {MIN_SIDE} x {MIN_SIDE} the "
                         f"other commands take: give {option} {MIN_SIDE} or more")


def frames_in_budget(shape, size, bin=1, budget=None) -> int:
    """Frames of ``shape`` that :func:`prepare_frames` may cut to ``size x size`` patterns (``bin``
    x ``bin`` detector pixels each) at once within a memory budget (at least 1).

    A frame costs :data:`WORK_BYTES` per detector pixel of the square cut, besides the frame read
    (float32).  Raises ``ValueError`` (one sentence, giving the size and the budget) when one frame
    does not fit.

    Parameters
    ----------
    shape : sequence of int
        Detector frame ``(H, W)`` (or a stack's shape: the last two axes).
    size, bin : int
    budget : int, optional
        Bytes (default :func:`napari_cdinn.io.memory_budget`).
    """
    side = int(size) * int(bin)
    h, w = (int(v) for v in shape[-2:])
    each = WORK_BYTES * side * side + 4 * h * w
    budget = io.memory_budget() if budget is None else int(budget)
    if each > budget:
        binned = f", binned {bin} x {bin}" if bin > 1 else ""
        raise ValueError(f"{size} x {size} patterns ({side} x {side} detector pixels{binned}) need about "
                         f"{io.format_bytes(each)} of memory per frame, more than the memory budget of "
                         f"{io.format_bytes(budget)} (CDINN_MEMORY or --memory sets it)")
    return int(budget // each)


def _check_geometry(size, bin):
    even = "an even number of pixels, at least 2"
    size = whole_number(size, "the output size", 2, what=even)
    if size % 2:
        raise ValueError(f"the output size must be {even}, got {size}")
    return size, whole_number(bin, "the bin", 1, what="a whole number of pixels, at least 1")


def to_photons(frames, dark=None, adu_per_photon=None):
    """Integrating-detector (CCD) frames to photon counts: ``rint(max(frames - dark, 0) / adu_per_photon)``.

    Parameters
    ----------
    frames : array_like
        Detector readings.
    dark : array_like, broadcastable to ``frames``, optional
        The reading without beam (the mean of dark frames), subtracted first.
    adu_per_photon : float, optional
        Detector units one photon gives: the result is rounded to whole photons (what the counting-noise
        floor :func:`napari_cdinn.physics.noise_chi2` needs), negative readings to 0.  None keeps the
        units and the sign (after the dark).

    Returns
    -------
    numpy.ndarray, float64.
    """
    out = np.asarray(frames, dtype=np.float64)
    if dark is not None:
        out = out - np.asarray(dark, dtype=np.float64)
    if adu_per_photon is not None:
        gain = float(adu_per_photon)
        if not (np.isfinite(gain) and gain > 0):
            raise ValueError(f"the detector units per photon must be a positive number, got {adu_per_photon!r}")
        out = np.rint(np.clip(out, 0.0, None) / gain)
    return out


def prepare_frames(frames, centre, size, bin=1, mask=None, dark=None, adu_per_photon=None):
    """Crop (and bin) detector frames to centred ``size x size`` patterns with their mask.

    Parameters
    ----------
    frames : array_like, (N, H, W) or (H, W)
        Detector frames (counts or any non-negative scale).
    centre : (float, float)
        Zero-frequency position ``(y, x)`` in detector pixels (rounded to a pixel).
    size : int
        Output side (even), in output pixels.
    bin : int
        Detector pixels summed along each axis into one output pixel.
    mask : array_like of bool, (H, W) or (N, H, W), optional
        True on unmeasured detector pixels.
    dark, adu_per_photon : optional
        An integrating detector's dark frame ``(H, W)`` and gain: :func:`to_photons`, before binning.
        An integer type's marker values are unmeasured (:func:`napari_cdinn.io.detector_markers`).

    Returns
    -------
    intensity : numpy.ndarray, float32, (N, size, size) or (size, size)
        0 on unmeasured output pixels.
    mask : numpy.ndarray, bool, same shape
        True on unmeasured output pixels: off the chip, masked, NaN/inf, or binned with one such.
    """
    size, k = _check_geometry(size, bin)
    data = np.asarray(frames)
    single = data.ndim == 2
    if single:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"frames must be (H, W) or (N, H, W), got shape {data.shape}")
    check_centre(centre, data.shape)
    n, h, w = data.shape
    y0, x0 = crop_origin(centre, size, k)
    side = size * k
    out = np.zeros((n, side, side), dtype=np.float64)
    bad = np.ones((n, side, side), dtype=bool)  # off the chip: unmeasured
    ys, xs = slice(max(y0, 0), min(y0 + side, h)), slice(max(x0, 0), min(x0 + side, w))
    dy, dx = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
    if ys.start < ys.stop and xs.start < xs.stop:
        raw = data[:, ys, xs]
        markers = io.detector_markers(raw, data.dtype)
        part = np.asarray(raw, dtype=np.float64)
        if dark is not None or adu_per_photon is not None:
            dark = None if dark is None else _check_dark(dark, (h, w))[ys, xs]
            with np.errstate(invalid="ignore"):
                part = to_photons(part, dark, adu_per_photon)
        miss = ~np.isfinite(part)
        if markers is not None:
            miss |= markers
        if mask is not None:
            check_mask_layout(mask, data.shape)
            m = np.asarray(mask, dtype=bool)
            miss |= m[..., ys, xs] if m.ndim == 3 else m[ys, xs][None]
        out[:, dy, dx] = np.where(miss, 0.0, part)
        bad[:, dy, dx] = miss
    if k > 1:
        out = out.reshape(n, size, k, size, k).sum(axis=(2, 4))
        bad = bad.reshape(n, size, k, size, k).any(axis=(2, 4))
    out[bad] = 0.0
    out = out.astype(np.float32)
    return (out[0], bad[0]) if single else (out, bad)


def _check_dark(dark, frame):
    dark = np.asarray(dark, dtype=np.float64)
    if dark.shape != tuple(frame):
        raise ValueError(f"the dark frame is shaped {dark.shape}, the detector frames {tuple(frame)}")
    return dark


def mean_dark(stack):
    """One dark frame ``(H, W)`` from a dark file's frames: their mean (NaN where none is finite)."""
    data = np.asarray(stack, dtype=np.float64)
    if data.ndim == 2:
        return data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: NaN, unmeasured
        return np.nanmean(np.where(np.isfinite(data), data, np.nan), axis=0)


def prepare_chunk(intensity, first_frame=0, mask=None, *, centre, size, bin=1, dark=None, adu_per_photon=None):
    """Chunk function of :func:`napari_cdinn.stream.process_stack`: ``intensity`` and ``mask`` (the
    reader has made an integer detector's marker values NaN: unmeasured)."""
    out, bad = prepare_frames(intensity, centre, size, bin, mask, dark, adu_per_photon)
    return {"intensity": out, "mask": bad}


#: How far (pixels, either axis) a file's beam centre may lie from the frames' symmetry centre before it is said.
DISAGREE_PX = 2
#: ``--centre`` words: the file's beam centre where it records one, else the symmetry centre; the file's; the frames'.
CENTRE_MODES = ("auto", "file", "symmetry")
#: What each source of the centre is called in messages and metadata.
CENTRE_SOURCES = {"file": "from the file's beam centre", "symmetry": "found by Friedel symmetry", "given": "given"}


def choose_centre(stack, mask=None, file_centre=None, mode="auto", **options):
    """The centre by ``mode``, with where it came from and the frames' own symmetry centre.

    Parameters
    ----------
    stack, mask
        As for :func:`stack_centre` (``options``: its keywords).
    file_centre : (float, float), optional
        The beam centre the input file records (:func:`napari_cdinn.io.file_beam_centre`).
    mode : str
        ``"auto"``: ``file_centre`` where given, else the symmetry centre; ``"file"``: ``file_centre``
        (ValueError without one); ``"symmetry"``: the symmetry centre.

    Returns
    -------
    centre : (float, float)
    source : str, a key of :data:`CENTRE_SOURCES`
    symmetry : (float, float), the frames' symmetry centre (computed in every mode, to check a file's)
    """
    if mode not in CENTRE_MODES:
        raise ValueError(f"the centre is found by one of {', '.join(CENTRE_MODES)}, got {mode!r}")
    if mode == "file" and file_centre is None:
        raise ValueError("the input records no beam centre (entry/instrument/detector/beam_center_x and _y); "
                         "give ROW,COLUMN or let the frames' symmetry find it")
    symmetry = stack_centre(stack, mask, **options)
    if mode != "symmetry" and file_centre is not None:
        return tuple(float(c) for c in file_centre), "file", symmetry
    return symmetry, "symmetry", symmetry


def centre_note(centre, source, symmetry):
    """A sentence when a file's beam centre and the frames' symmetry centre disagree by more than
    :data:`DISAGREE_PX`, else None."""
    if source != "file":
        return None
    apart = max(abs(_centre_pixel(centre)[i] - symmetry[i]) for i in (0, 1))
    if apart <= DISAGREE_PX:
        return None
    return (f"the file's beam centre ({centre[0]:g}, {centre[1]:g}) lies {apart:g} px from the frames' symmetry "
            f"centre ({symmetry[0]:g}, {symmetry[1]:g}); the file's is used (check the cross, or choose the frames')")


def describe(shape, centre, size, bin, source) -> str:
    """One line on what :func:`prepare_frames` does to frames of ``shape`` (``source``: a key of
    :data:`CENTRE_SOURCES`)."""
    y0, x0 = crop_origin(centre, size, bin)
    side = size * bin
    h, w = (int(v) for v in shape[-2:])
    off = (max(0, -y0) + max(0, y0 + side - h)) or (max(0, -x0) + max(0, x0 + side - w))
    binned = f", binned {bin} x {bin}" if bin > 1 else ""
    edge = "; the square runs off the detector there (unmeasured)" if off else ""
    return (f"centre (y, x) = ({centre[0]:g}, {centre[1]:g}) {CENTRE_SOURCES[source]}; {side} x {side} detector "
            f"pixels from ({y0}, {x0}){binned} -> {size} x {size} patterns{edge}")


def parse_centre(text: str | Sequence[float] | None):
    """A ``--centre`` value: a word of :data:`CENTRE_MODES` (None: ``"auto"``), or ``"Y,X"`` / a pair -> ``(y, x)``."""
    if text is None:
        return "auto"
    if isinstance(text, str) and text.strip().lower() in CENTRE_MODES:
        return text.strip().lower()
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        y, x = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"the centre must be {', '.join(CENTRE_MODES)} or ROW,COLUMN in detector pixels, "
                         f"got {text!r}") from None
    if not (np.isfinite(y) and np.isfinite(x)):
        raise ValueError(f"the centre must be finite, got {text!r}")
    return y, x
