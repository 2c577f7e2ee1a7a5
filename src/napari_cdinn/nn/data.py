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

Realistic data
--------------
With ``families`` and ``detector`` (:mod:`napari_cdinn.simulate`) the objects are drawn from a
mix of families and the pattern the network reads goes through the detector model: counts,
background, unmeasured pixels.  The per-pattern detector settings are drawn with the objects
(deterministic per example); the Poisson draws are made where the patterns are computed (the
training device), from a generator seeded per chunk.  Unmeasured pixels read 0 in ``input`` and 1
in ``mask``.

torch is imported only by the functions that compute on tensors: inference reads its inputs
(:func:`encode_inputs`, :func:`network_input`) without it.
"""

from __future__ import annotations

import numpy as np

from .. import physics
from .models import SIZE  # the paper's networks' frame side (32)

__all__ = [
    "INPUT_TRANSFORMS",
    "SIZE",
    "centre_objects",
    "encode_inputs",
    "make_examples",
    "make_objects",
    "network_input",
    "normalise_amplitudes",
    "prepare_examples",
    "split_detector",
    "twin_targets",
]

#: Input encodings: ``linear`` (amplitude / max, the paper) and ``log`` (its log10 over 4 decades, in 0..1).
INPUT_TRANSFORMS = ("linear", "log")
_LOG_DECADES = 4.0


def _tensor(x):
    """float32 tensor view of an array or tensor (kept on its device)."""
    import torch

    return x.float() if torch.is_tensor(x) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _like(x, like):
    """``x`` as float32 of the kind of ``like``: a tensor on its device, or a NumPy array."""
    return _tensor(x).to(like.device) if physics.is_tensor(like) else np.asarray(x, dtype=np.float32)


def _same_kind(t, like):
    """``t`` as the kind of ``like``: a tensor for a tensor, else a NumPy array."""
    return t if physics.is_tensor(like) else t.cpu().numpy()


def normalise_amplitudes(amp):
    """Divide each frame of ``(..., H, W)`` amplitudes by its maximum (all-zero frames stay 0).

    Returns
    -------
    float32, same shape and kind (NumPy array or tensor, on its device).
    """
    a = physics.as_float32(amp)
    peak = a.amax((-2, -1), keepdim=True) if physics.is_tensor(a) else a.max(axis=(-2, -1), keepdims=True)
    xp = physics.array_lib(a)
    return a / xp.where(peak > 0, peak, xp.ones_like(peak))


def encode_inputs(amp, transform: str = "linear"):
    """Network inputs from amplitudes ``(..., H, W)``: per-frame max normalisation, then ``transform``.

    ``linear`` keeps ``amp / max``; ``log`` maps it to ``1 + log10(max(amp / max, 1e-4)) / 4``, which
    shows the weak high-frequency fringes that carry the phase.  Both are scale-free.  NumPy arrays
    or tensors (same kind out).
    """
    if transform not in INPUT_TRANSFORMS:
        raise ValueError(f"unknown input transform {transform!r}; expected one of {', '.join(INPUT_TRANSFORMS)}")
    a = normalise_amplitudes(amp)
    if transform == "log":
        floor = 10.0**-_LOG_DECADES
        a = 1.0 + physics.array_lib(a).log10(a.clamp_min(floor) if physics.is_tensor(a) else np.maximum(a, floor)) / _LOG_DECADES
    return a


def _bbox_shifts(support):
    """Per-frame ``(dy, dx)`` rolls (int64 tensor ``(N, 2)``) centring the bounding box of ``support``."""
    import torch

    shifts = []
    for dim in (-2, -1):
        size = support.shape[dim]
        hit = support.any(dim=-1 if dim == -2 else -2)  # (N, size): rows, then columns
        prof = hit.to(torch.uint8)
        first = prof.argmax(1)  # torch returns the first maximum
        last = size - 1 - prof.flip(1).argmax(1)
        shifts.append(torch.where(hit.any(1), size // 2 - (first + last) // 2, torch.zeros_like(first)))
    return torch.stack(shifts, 1)


def centre_objects(amplitude, phase, threshold: float = physics.SHAPE_THRESHOLD):
    """Roll each object so the bounding box of its support is centred in the frame.

    Parameters
    ----------
    amplitude, phase : ndarray or tensor, shape (N, H, W)
    threshold : float
        Relative amplitude threshold defining the support.

    Returns
    -------
    amplitude, phase : float32, shape (N, H, W), the kind of ``amplitude`` (tensors stay on their device)
    """
    a, p = _tensor(amplitude), _tensor(phase)
    shifts = _bbox_shifts(physics.support_from_amplitude(a, threshold))
    return _same_kind(physics.roll_frames(a, shifts), amplitude), _same_kind(physics.roll_frames(p, shifts), amplitude)


def twin_targets(amplitude, phase):
    """Amplitude and phase of the twins (``physics.twin``), re-centred by :func:`centre_objects`."""
    # twin = centro-inverted complex conjugate: inverted amplitude, inverted and negated phase
    amp_t, pha_t = physics.twin(_tensor(amplitude)), -physics.twin(_tensor(phase))
    a, p = centre_objects(amp_t, pha_t)
    return _same_kind(a, amplitude), _same_kind(p, amplitude)


def network_input(inputs, mask=None, mask_channel=False, as_numpy=False):
    """The ``(N, C, H, W)`` float32 tensor a network reads: encoded amplitudes ``(N, H, W)`` and, for a
    model with the mask channel, the unmeasured-pixel map (1 = unmeasured; all 0 when ``mask`` is None).

    ``as_numpy=True``: a NumPy array from NumPy inputs (no torch import: the NumPy engine of inference)."""
    x = (np.asarray(inputs, dtype=np.float32) if as_numpy else _tensor(inputs))[:, None]
    if mask_channel:
        xp = physics.array_lib(x)
        m = xp.zeros_like(x) if mask is None else _like(mask, x)[:, None]
        x = xp.concatenate([x, xp.broadcast_to(m, x.shape)], 1)
    return x


#: Keys of the per-example detector settings carried beside the objects (``det_`` + the settings' names).
DETECTOR_PREFIX = "det_"


def prepare_examples(amplitude, phase, transform: str = "linear", input_factor: int = 1, twins: bool = True,
                     detector=None, generator=None):
    """Network inputs and targets of objects: all of :func:`make_examples` after the simulator.

    Runs where the tensors are: the trainer feeds it the objects its simulator processes drew, on
    the training device, so that the GPU, not the CPU, computes the patterns and targets.

    Parameters
    ----------
    amplitude, phase : ndarray or tensor, shape (N, S, S)
        Objects from :func:`napari_cdinn.simulate.simulate_objects`.
    transform, input_factor, twins
        As in :func:`make_examples`.
    detector : dict, optional
        Per-example detector settings (:func:`napari_cdinn.simulate.draw_detector`); None: ideal patterns.
    generator : torch.Generator, optional
        Source of the Poisson draws (on the tensors' device).

    Returns
    -------
    dict of float32 tensors on the input's device (keys as :func:`make_examples`), with ``mask``
    (1 on unmeasured pixels of the input pattern).
    """
    import torch

    from ..simulate import apply_detector, offset_phase

    a, p = _tensor(amplitude), _tensor(phase)
    if detector is not None:  # an off-centre pattern: the truth carries the ramp (offsets in input pixels)
        p = offset_phase(a, p, detector, a.shape[-1] * input_factor)
    inten = physics.intensity(physics.pad(torch.polar(a, p), input_factor))
    mask = torch.zeros_like(inten)
    if detector is not None:
        inten, unmeasured = apply_detector(inten, {k: np.asarray(v) for k, v in detector.items()}, generator)
        mask = unmeasured.float()
    out = {"input": encode_inputs(inten.clamp_min(0).sqrt(), transform), "mask": mask, "amplitude": a, "phase": p}
    out["target_amplitude"], out["target_phase"] = centre_objects(a, p)
    if twins:
        out["twin_amplitude"], out["twin_phase"] = twin_targets(out["target_amplitude"], out["target_phase"])
    return out


def split_detector(batch):
    """The detector settings carried in a batch of :func:`make_objects` (None when there are none)."""
    found = {k[len(DETECTOR_PREFIX):]: v for k, v in batch.items() if k.startswith(DETECTOR_PREFIX)}
    return found or None


def make_objects(count: int, seed: int, start: int = 0, families=None, detector=None, size: int = SIZE):
    """The simulator's ``count`` objects of ``size`` pixels from index ``start`` (as :func:`make_examples`).

    Returns ``{"amplitude", "phase"}`` and, with a ``detector`` (a
    :class:`napari_cdinn.simulate.Detector` or a name of ``DETECTORS``), its per-example settings
    under ``det_`` keys.
    """
    # imported here: the simulator pulls in scipy, which inference does not need
    from ..simulate import BLOCK, as_detector, draw_detector, simulate_objects

    if start % BLOCK:
        raise ValueError(f"start must be a multiple of {BLOCK}")
    amp, pha = simulate_objects(count, size, seed, start, families=families)
    out = {"amplitude": amp, "phase": pha}
    if detector is not None:
        det = as_detector(detector)
        if not det.ideal:
            settings = draw_detector(det, count, seed, start)
            out.update({DETECTOR_PREFIX + k: v for k, v in settings.items()})
    return out


def make_examples(count: int, seed: int, start: int = 0, twins: bool = True, transform: str = "linear",
                  input_factor: int = 1, families=None, detector=None, size: int = SIZE):
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
    families, detector : optional
        Object families and detector model (:func:`make_objects`); default: the paper's ideal data.
    size : int
        Side of the objects (the architecture's, :data:`napari_cdinn.nn.models.OBJECT_SIZES`).

    Returns
    -------
    dict of float32 arrays, shape (count, size, size)
        ``input`` (normalised amplitudes, ``size input_factor`` wide) and ``mask`` (1 = unmeasured,
        same shape), ``amplitude``/``phase`` (the raw truth), ``target_amplitude``/``target_phase``
        (centred truth) and, if ``twins``, ``twin_amplitude``/``twin_phase``.
    """
    import torch

    objects = make_objects(count, seed, start, families, detector, size)
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(start))
    out = prepare_examples(objects["amplitude"], objects["phase"], transform, input_factor, twins,
                           split_detector(objects), generator)
    return {k: v.numpy() for k, v in out.items()}
