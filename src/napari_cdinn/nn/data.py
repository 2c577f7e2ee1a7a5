"""Training data for the networks: simulated patterns, normalised inputs, canonical targets.

Input normalisation
-------------------
The networks read 32 x 32 diffraction *amplitudes* divided by their per-frame maximum
(:func:`normalise_amplitudes`), so a result never depends on the overall scale of the input.

Targets
-------
The 32 x 32 amplitude of an unpadded object determines it only up to a circular shift, a
global phase and the twin (``physics.twin``).  The shift ambiguity is removed from the targets
by rolling every true object so that the bounding box of its support (amplitude > 0.1) is
centred at pixel ``(16, 16)`` (:func:`centre_objects`); the twin ambiguity by the twin-invariant
loss (:mod:`napari_cdinn.nn.trainer`), which needs the twin targets, centred the same way.  The
network input is unchanged by the roll (a circular shift only ramps the far-field phase).
"""

from __future__ import annotations

import numpy as np

from .. import physics

__all__ = [
    "INPUT_TRANSFORMS",
    "SIZE",
    "centre_objects",
    "encode_inputs",
    "make_examples",
    "normalise_amplitudes",
    "twin_targets",
]

#: Side of the networks' input and output frames (the paper's 32 x 32).
SIZE = 32
#: Input encodings: ``linear`` (amplitude / max, the paper) and ``log`` (its log10 over 4 decades, in 0..1).
INPUT_TRANSFORMS = ("linear", "log")
_LOG_DECADES = 4.0


def normalise_amplitudes(amp):
    """Divide each frame of ``(..., H, W)`` amplitudes by its maximum (all-zero frames stay 0).

    Returns
    -------
    ndarray, float32, same shape.
    """
    a = np.asarray(amp, dtype=np.float32)
    peak = a.max(axis=(-2, -1), keepdims=True)
    return (a / np.where(peak > 0, peak, 1.0)).astype(np.float32)


def encode_inputs(amp, transform: str = "linear"):
    """Network inputs from amplitudes ``(..., H, W)``: per-frame max normalisation, then ``transform``.

    ``linear`` keeps ``amp / max``; ``log`` maps it to ``1 + log10(max(amp / max, 1e-4)) / 4``, which
    shows the weak high-frequency fringes that carry the phase.  Both are scale-free.
    """
    a = normalise_amplitudes(amp)
    if transform == "linear":
        return a
    if transform == "log":
        return (1.0 + np.log10(np.maximum(a, 10.0**-_LOG_DECADES)) / _LOG_DECADES).astype(np.float32)
    raise ValueError(f"unknown input transform {transform!r}; expected one of {', '.join(INPUT_TRANSFORMS)}")


def _bbox_shifts(support):
    """Per-frame ``(dy, dx)`` rolls that centre the bounding box of ``support (N, H, W)``."""
    n, h, w = support.shape
    shifts = np.zeros((n, 2), dtype=np.int64)
    for axis, size in ((1, h), (2, w)):
        prof = support.any(axis=3 - axis)  # (N, size): rows (axis 1) or columns (axis 2)
        has = prof.any(axis=1)
        first = np.argmax(prof, axis=1)
        last = size - 1 - np.argmax(prof[:, ::-1], axis=1)
        shifts[:, axis - 1] = np.where(has, size // 2 - (first + last) // 2, 0)
    return shifts


def centre_objects(amplitude, phase, threshold: float = physics.SHAPE_THRESHOLD):
    """Roll each object so the bounding box of its support is centred in the frame.

    Parameters
    ----------
    amplitude, phase : ndarray, shape (N, H, W)
    threshold : float
        Relative amplitude threshold defining the support.

    Returns
    -------
    amplitude, phase : ndarray, float32, shape (N, H, W)
    """
    amplitude = np.asarray(amplitude, dtype=np.float32)
    phase = np.asarray(phase, dtype=np.float32)
    shifts = _bbox_shifts(physics.support_from_amplitude(amplitude, threshold))
    out_a, out_p = np.empty_like(amplitude), np.empty_like(phase)
    for i, (dy, dx) in enumerate(shifts):
        out_a[i] = np.roll(amplitude[i], (dy, dx), axis=(0, 1))
        out_p[i] = np.roll(phase[i], (dy, dx), axis=(0, 1))
    return out_a, out_p


def twin_targets(amplitude, phase):
    """Amplitude and phase of the twins (``physics.twin``), re-centred by :func:`centre_objects`."""
    # twin = centro-inverted complex conjugate: inverted amplitude, inverted and negated phase
    amp_t = physics.twin(np.asarray(amplitude, dtype=np.float32)).real.astype(np.float32)
    pha_t = -physics.twin(np.asarray(phase, dtype=np.float32)).real.astype(np.float32)
    return centre_objects(amp_t, pha_t)


def make_examples(count: int, seed: int, start: int = 0, twins: bool = True, transform: str = "linear",
                  input_factor: int = 1):
    """Simulate ``count`` training examples from index ``start`` (a multiple of ``BLOCK``).

    Parameters
    ----------
    count : int
    seed : int
        Simulator seed; example ``i`` depends only on ``seed`` and ``start + i``.
    start : int
    twins : bool
        Also return the centred twin targets.
    transform : str
        Input encoding (:func:`encode_inputs`).
    input_factor : int
        Oversampling of the input patterns (1: the paper's 32 x 32; 2: 64 x 64 for ``shared2x``).

    Returns
    -------
    dict of float32 arrays, shape (count, 32, 32)
        ``input`` (normalised amplitudes, ``32 input_factor`` wide), ``amplitude``/``phase`` (the raw truth),
        ``target_amplitude``/``target_phase`` (centred truth) and, if ``twins``,
        ``twin_amplitude``/``twin_phase``.
    """
    # imported here: the simulator pulls in scipy, which inference does not need
    from ..simulate import BLOCK, patterns_from_objects, simulate_objects

    if start % BLOCK:
        raise ValueError(f"start must be a multiple of {BLOCK}")
    amp, pha = simulate_objects(count, SIZE, seed, start)
    inten = patterns_from_objects(amp, pha, oversampling=input_factor)
    out = {"input": encode_inputs(physics.amplitude_from_intensity(inten), transform), "amplitude": amp, "phase": pha}
    out["target_amplitude"], out["target_phase"] = centre_objects(amp, pha)
    if twins:
        out["twin_amplitude"], out["twin_phase"] = twin_targets(out["target_amplitude"], out["target_phase"])
    return out
