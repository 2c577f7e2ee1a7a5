"""Fast inference: shape, phase and a trust score per frame from measured intensities.

Input sizes and the default model
---------------------------------
Which model reads which pattern, and how the pattern is decimated for it, is decided once by
:func:`napari_cdinn.nn.models.resolve_model` (see :mod:`napari_cdinn.nn.models`).

Normalisation
-------------
Amplitudes ``sqrt(I)`` are divided by their per-frame maximum, so results do not depend on the
overall scale of the input, then encoded as the model was trained (linear or log10,
:func:`napari_cdinn.nn.data.encode_inputs`, recorded in the weights' metadata).

Test-time views
---------------
A pattern and its object share the symmetries of the square pixel grid about the origin pixel
(transposition and the two mirrors, :func:`dihedral`): the pattern of a mirrored object is the
mirrored pattern.  The network is not exactly equivariant, so each view gives a slightly
different answer.  With ``views = V`` the network reads the first ``V`` of the eight views
(:data:`VIEWS`), each answer is mapped back, aligned to the one with the best trust score (up to
twin, shift and global phase, :func:`napari_cdinn.physics.align`) and averaged with weights
``(chi2_best / chi2)**2``; the trust score is then computed for the average.  Decision: the
default stays 1 (the network alone, the fastest): docs/decisions.md ("Test-time views"); gains and
costs measured: benchmarks/README.md, bench_nn.

Unmeasured pixels
-----------------
NaN and infinite pixels, and those of ``mask`` (True = unmeasured: beamstop, gaps, saturated
pixels), are unmeasured: they read 0 in the network's amplitudes, a model with the mask channel
(:mod:`napari_cdinn.nn.networks`) is told where they are, and they are left out of the scores.

Trust score
-----------
``chi2`` is computed from the prediction itself, in the *measured* frame: the predicted
32 x 32 object is zero-padded ``k`` times (:func:`napari_cdinn.physics.pad`) and its intensity
compared to the measured pixels with :func:`napari_cdinn.physics.chi2` (least-squares scale).
For ``k = 2`` this also tests the oversampled pixels, which carry the support information; it is
invariant to the shift, twin and global phase ambiguities.  Counting noise alone gives a perfect
fit a chi^2 of ``chi2_noise`` (:func:`napari_cdinn.physics.noise_chi2`, about 1e-2 at 1e4 photons;
0 for data that are not whole counts), so a frame is ``trusted`` when the misfit beyond the
noise, ``chi2 - chi2_noise``, is at most ``TRUST_CHI2``: one rule at every dose (the decision and
its measurements: ``docs/decisions.md``).  A frame without signal (all zero or all unmeasured)
gets ``chi2 = 1``, is never trusted and has an empty (all-zero) amplitude, phase and support.

Engines
-------
A small job on the CPU in a process that has not imported torch (``cdinn predict`` of a few
patterns, a dock's first frame) runs on the NumPy engine: the network's forward pass in NumPy
(:class:`napari_cdinn.nn.numpy_net.NumpyNet`) and the rest of this module on NumPy arrays, so that
torch, whose import costs several times the job, is never imported (:func:`numpy_engine`; the
crossover :data:`NUMPY_MAX_PATTERNS`: docs/decisions.md, "Cold start: small CPU jobs run in
NumPy").  Every other job runs on torch.  The per-batch code below takes NumPy arrays or tensors
alike (as :mod:`napari_cdinn.physics` does).  The NumPy engine computes in float32, the torch
engine in bf16 autocast on CPUs that have fast bf16 (``precision="auto"``): the results differ in
the last digits, so a frame whose ``chi2 - chi2_noise`` lies at :data:`TRUST_CHI2` may be trusted
by one and not the other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import warnings

import numpy as np

from .. import physics
from ..checks import check_mask_layout, number_in, whole_number
from ..device import device_name, resolve_device
from ..physics import array_lib, as_float32, is_tensor  # NumPy arrays or torch tensors alike
from . import TRUST_CHI2
from .data import SIZE, encode_inputs, network_input
from .models import (  # which model reads which pattern: resolved in one place, without torch
    DEFAULT_MODELS,
    ModelInfo,
    candidates,
    decimation_factor,
    default_model,
    model_for,
    oversampling_factor,
    read_side,
    resolve_model,
    resolve_model_path,
)
from .numpy_net import load_numpy_model

__all__ = [
    "DEFAULT_MODELS",
    "ENGINE",
    "NUMPY_MAX_PATTERNS",
    "REFINE_OPTIONS",
    "TRUST_CHI2",
    "VIEWS",
    "check_views",
    "choose_scale",
    "decimation_factor",
    "decode_outputs",
    "default_model",
    "dihedral",
    "embed",
    "is_trusted",
    "model_for",
    "numpy_engine",
    "oversampling_factor",
    "predict",
    "predict_chunk",
    "prepare",
    "refine_options",
    "upsample",
    "with_evidence",
]

#: :func:`napari_cdinn.retrieval.reconstruct` options of the NN-seeded refinement
#: (``cdinn reconstruct --init nn``): a short HIO/ER run (the last 10 iterations ER, averaged)
#: from the network's guess and support, the support shrink-wrapped every 10 iterations with a
#: blur narrowing from 2 to 1 pixel.  Chosen on 200 fresh test patterns against 20 and 80
#: iterations and the 620-iteration protocol (measured: benchmarks/README.md, bench_nn,
#: "NN-seeded refinement"; the decision: docs/decisions.md).
REFINE_OPTIONS = {"iterations": 50, "average": 10, "shrinkwrap_every": 10, "sigma": (2.0, 1.0)}


def refine_options(side: int, iterations: int | None = None) -> dict:
    """The refinement's options for a guess of ``side`` x ``side`` pixels (its object frame).

    :data:`REFINE_OPTIONS` with its iterations per 32 pixels of the side: 50 for the networks'
    32-pixel objects, 100 for 64, 200 for 128 (a larger object has more unknowns and a guess read
    at a coarser scale more to sharpen; measured: docs/decisions.md, "The refinement grows with
    the object").  ``iterations`` (``--iterations``) replaces the count.
    """
    if iterations is None:
        iterations = round(REFINE_OPTIONS["iterations"] * max(1.0, float(side) / SIZE))
    return dict(REFINE_OPTIONS, iterations=int(iterations))


#: Network reads (frames x views) up to which a CPU job in a process without torch runs on the NumPy engine
#: (see the module notes).  A one-off cold job gains up to about 250; at 64 the NumPy engine costs about a
#: quarter of torch's import beyond torch's own time, what a process that never imports torch loses per job
#: (docs/decisions.md, "Cold start: small CPU jobs run in NumPy").
NUMPY_MAX_PATTERNS = 64
#: Frames :func:`choose_scale` predicts at every scale (evenly spaced through the stack) by default.
SCALE_SAMPLE = 64
#: Relative amplitude below which a decoded phase is 0 (:func:`decode_outputs`), under the shape
#: threshold: the network's phase on the faint rim of its shape is reported, not replaced by 0
#: (docs/decisions.md, "The phase on the rim of the shape").
PHASE_FLOOR = 0.02
#: The engine of :func:`predict`: ``"auto"`` (:func:`numpy_engine` decides), ``"numpy"`` or ``"torch"`` (tests).
ENGINE = "auto"

#: Where :func:`predict` prepares its batches: ``"auto"`` (on the device for a GPU, in NumPy on the CPU), ``"device"``
#: (tensors on the engine's device, the CPU's included: tests) or ``"host"`` (NumPy, then copied to the device).
PREPARE = "auto"
#: Frames per network call when :func:`predict` is given no ``batch_size``, by device type (the NumPy engine: the
#: CPU's).  A GPU reads 4,096 at once (docs/decisions.md, "GPU end to end").
BATCH_SIZES = {"cpu": 256, "cuda": 4096, "mps": 4096}
#: The results of :func:`_run_batch`, in its order.
_KEYS = ("amplitude", "phase", "support", "chi2", "chi2_noise")

#: Loaded networks by (weights file, its modification time, device), the most recently used last.
_CACHE: dict = {}
#: Networks :func:`_cached_model` keeps loaded (a dock that switches between models does not reload them).
CACHE_SIZE = 4

#: The eight symmetries of the square grid as (transpose, mirror rows, mirror columns), applied in that
#: order, in the order ``predict(views=V)`` uses the first ``V``: identity, the two axis mirrors, the
#: two diagonal mirrors, the two quarter turns, the half turn (the centro-inversion).
VIEWS = ((0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (1, 1, 1), (1, 0, 1), (1, 1, 0), (0, 1, 1))


def prepare(intensity, transform="linear", input_factor=1, mask=None, scale=1, size=SIZE):
    """Measured intensities ``(N, H, W)`` to the networks' normalised amplitudes.

    NumPy in, NumPy out; a tensor in, tensors out on its device (:func:`predict` prepares a batch
    on a GPU where it is: docs/decisions.md, "GPU end to end").

    Parameters
    ----------
    intensity : array-like or Tensor (N, H, W)
    transform : str
        Input encoding of the model (:func:`napari_cdinn.nn.data.encode_inputs`).
    input_factor : int
        Oversampling the model reads (``model.input_factor``; see the module notes).
    mask : array-like bool, (H, W) or (N, H, W), optional
        True on unmeasured pixels; NaN and infinite pixels are unmeasured too.
    scale : int or float
        The network reads the central ``H / scale`` pixels (the object at ``scale`` times the
        pixel size: :mod:`napari_cdinn.nn.models`, "Object size and scale").
    size : int
        Side of the objects the model draws (``model.size``: 32, or 64 for ``deep2x``).

    Returns
    -------
    inputs : float32 (N, S m, S m), ``S = size``, ``m = input_factor``, encoded by
        :func:`napari_cdinn.nn.data.encode_inputs`
    measured : float32 (N, H, W), non-negative intensities (negatives and unmeasured pixels as 0)
    factor : int, the oversampling of the measured patterns (of ``size``-pixel objects)
    unmeasured : bool (N, H, W), True on unmeasured pixels
    input_mask : float32 like ``inputs``, 1 on unmeasured pixels
        Of the kind of ``intensity`` (NumPy arrays, or tensors on its device).
    """
    raw = as_float32(intensity)
    xp = array_lib(raw)
    unmeasured = ~xp.isfinite(raw)
    if mask is not None:
        unmeasured = unmeasured | _mask_like(mask, raw)  # a 2-D mask broadcasts over the frames
    measured = as_float32(xp.where(unmeasured | ~(raw > 0), 0.0, raw))  # counts stay whole numbers
    factor = oversampling_factor(measured.shape, size)
    side = read_side(measured.shape, scale)
    step = decimation_factor((side, side), input_factor, size)
    inputs = encode_inputs(xp.sqrt(physics.decimate(physics.crop(measured, (side, side)), step)), transform)
    input_mask = as_float32(physics.decimate(physics.crop(unmeasured, (side, side)), step))
    return _contiguous(inputs), measured, factor, unmeasured, _contiguous(input_mask)


def embed(amplitude, phase, factor: int = 2):
    """Complex 32 x 32 predictions zero-padded into the ``factor``-times oversampled frame.

    Returns
    -------
    obj : ndarray complex64 (..., 32 k, 32 k)
    support : ndarray bool, same shape (amplitude above the shape threshold)
    """
    obj = (np.asarray(amplitude) * np.exp(1j * np.asarray(phase))).astype(np.complex64)
    sup = physics.support_from_amplitude(amplitude)
    return physics.pad(obj, factor), physics.pad(sup, factor)


def upsample(obj, scale):
    """Complex objects ``(N, h, w)`` read at ``scale`` (see :func:`prepare`) back at the pattern's pixel size.

    Fourier interpolation: the far field of the coarse object is the central part of the
    pattern, so it is zero-padded to ``scale`` times its side and transformed back
    (``(N, scale h, scale w)``, of the input's kind: a NumPy array, or a tensor on the input's
    device; ``scale h`` is a whole number, :func:`napari_cdinn.nn.models.scales_for`).  The
    pattern of the result equals the network's on the pixels it read.
    """
    if scale == 1:
        return obj
    h, w = obj.shape[-2:]
    return physics.inverse(physics.pad_to(physics.forward(obj), (round(h * scale), round(w * scale))))


def load_model(model=None, device="cpu"):
    """:func:`napari_cdinn.nn.checkpoint.load_model` (torch is imported when it is called)."""
    from .checkpoint import load_model as _load

    return _load(model, device)


def _load(path, device):
    """``(net, card)`` of the weights ``path`` for the engine of ``device`` (None: the NumPy engine)."""
    if device is None:
        return load_numpy_model(path)
    import torch

    net, card = load_model(path, device)
    return net.to(memory_format=torch.channels_last), card


def _cached_model(model, device):
    """``(net, card)`` of ``model`` on ``device`` (None: a :class:`~napari_cdinn.nn.numpy_net.NumpyNet`), loaded
    once per process: the weights are read again only when their file changed; up to :data:`CACHE_SIZE`
    networks stay loaded (the least recently used goes)."""
    path = resolve_model_path(model)
    key = (str(path.resolve()), path.stat().st_mtime_ns, "numpy" if device is None else str(device))
    if key in _CACHE:
        _CACHE[key] = _CACHE.pop(key)  # the most recently used last
    else:
        for old in [k for k in _CACHE if k[0] == key[0] and k[2] == key[2]]:  # a rewritten file's old weights
            del _CACHE[old]
        _CACHE[key] = _load(path, device)
        while len(_CACHE) > CACHE_SIZE:
            del _CACHE[next(iter(_CACHE))]
    return _CACHE[key]


def numpy_engine(device="auto", count: int = 1, precision: str = "auto") -> bool:
    """Whether :func:`predict` runs ``count`` network reads (frames x views) on ``device`` on the NumPy engine.

    True for a CPU job of at most :data:`NUMPY_MAX_PATTERNS` reads in float32 (``precision`` not
    ``bf16``) in a process that has not imported torch (once it is imported, torch is the faster
    engine); :data:`ENGINE` overrides the choice.  Resolving ``device`` imports torch only where the
    device is not evidently the CPU (:func:`napari_cdinn.device.device_name`).
    """
    if ENGINE != "auto":
        return ENGINE == "numpy"
    return (count <= NUMPY_MAX_PATTERNS and precision != "bf16" and "torch" not in sys.modules
            and device_name(device) == "cpu")


def _contiguous(x):
    """``x`` in C order, of its kind."""
    return x.contiguous() if is_tensor(x) else np.ascontiguousarray(x)


def _mask_like(mask, like):
    """``mask`` as bool of the kind of ``like``: a tensor on its device, or a NumPy array."""
    if not is_tensor(like):
        return np.asarray(mask, dtype=bool)
    return array_lib(like).as_tensor(mask, device=like.device).bool()


def _at_least(x, floor):
    """``max(x, floor)`` elementwise, of the kind of ``x``."""
    return x.clamp_min(floor) if is_tensor(x) else np.maximum(x, floor)


def _frame_peak(a):
    """The per-frame maximum of ``a`` (N, H, W), shaped (N, 1, 1), at least 1e-12."""
    peak = a.amax((-2, -1), keepdim=True) if is_tensor(a) else a.max(axis=(-2, -1), keepdims=True)
    return _at_least(peak, 1e-12)


def _polar(amplitude, phase):
    """The complex ``amplitude * exp(i phase)`` (complex64 for float32 input), of the inputs' kind."""
    if is_tensor(amplitude):
        return array_lib(amplitude).polar(amplitude, phase)
    return (amplitude * np.exp(1j * phase)).astype(np.complex64)


def _on(device, array):
    """A NumPy array where the engine computes: itself on the NumPy engine (``device`` None), else a tensor on ``device``
    (a tensor, already there, passes through)."""
    if device is None or is_tensor(array):
        return array
    import torch

    return torch.from_numpy(array).to(device)


def _numpy(x):
    """A result as a NumPy array (a tensor comes back from its device)."""
    return x.cpu().numpy() if is_tensor(x) else np.asarray(x)


def _run_net(net, x, device, bf16):
    """The network's sigmoid outputs ``(amp, unit)`` for inputs ``x``: in bf16 autocast and channels-last on a torch
    ``device`` where ``bf16``, as they are on the NumPy engine (``device`` None)."""
    if device is None:
        return net(x)
    import torch

    from .runtime import autocast

    with autocast(device, bf16):
        return net(x.contiguous(memory_format=torch.channels_last))


def decode_outputs(amp, unit, threshold=physics.SHAPE_THRESHOLD):
    """The object a network's sigmoid outputs describe (differentiable).

    Parameters
    ----------
    amp, unit : Tensor or ndarray (N, 1, H, W)
        Sigmoid outputs: shape, and phase scaled to 0..1.
    threshold : float
        Relative amplitude of the shape (the support; the paper's shape threshold).

    Returns
    -------
    amplitude : float32 (N, H, W), divided by its per-frame maximum
    phase : float32 (N, H, W), radians in -pi..pi, 0 where the amplitude is at most
        ``min(threshold, PHASE_FLOOR)`` (:data:`PHASE_FLOOR`)
    support : bool (N, H, W), amplitude above ``threshold``
        Of the inputs' kind (tensors or NumPy arrays).
    """
    amp = as_float32(amp[:, 0])
    amp = amp / _frame_peak(amp)
    return amp, _phase_where_drawn(amp, as_float32(unit[:, 0]) * (2 * np.pi) - np.pi, threshold), amp > threshold


def _phase_where_drawn(amp, phase, threshold):
    """``phase`` where the relative amplitude ``amp`` exceeds ``min(threshold, PHASE_FLOOR)``, else 0."""
    xp = array_lib(amp)
    return xp.where(amp > min(threshold, PHASE_FLOOR), phase, xp.zeros_like(amp))


def _fit_intensity(amplitude, phase, factor):
    """Diffraction intensities of objects ``(N, H, W)`` zero-padded ``factor`` times, of the inputs' kind."""
    return physics.intensity(physics.pad(_polar(amplitude, phase), factor))


def oversampled_intensity(amplitude, phase, factor: int = 2):
    """Diffraction intensities of objects ``(N, H, W)`` zero-padded ``factor`` times (a float32 Tensor).

    Accepts NumPy arrays or tensors (differentiable, kept on their device): the data of the
    trainer's data-consistency loss (:func:`predict`'s trust score computes it on either engine).
    """
    import torch

    a, p = (torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v, dtype=torch.float32)
            for v in (amplitude, phase))
    return _fit_intensity(a, p, factor)


def dihedral(x, view: int, inverse: bool = False):
    """Symmetry ``VIEWS[view]`` of the square pixel grid about the origin pixel, on ``(..., H, W)`` tensors or
    NumPy arrays.

    The far field of a transformed object is the same transform of its far field, so a pattern's
    view is the pattern of the object's view (``inverse=True`` undoes it).
    """
    ops = list(zip(("transpose", "rows", "columns"), VIEWS[view], strict=True))
    for op, on in reversed(ops) if inverse else ops:
        if on:
            x = x.swapaxes(-2, -1) if op == "transpose" else physics.mirror(x, (-2 if op == "rows" else -1,))
    return x


def _network_object(net, x, device, bf16, threshold, view, scale=1):
    """The complex object the network predicts from the ``view`` of inputs ``x`` (N, 1, h, w), back in the
    input's frame, at the pattern's pixel size (:func:`upsample`)."""
    amp, unit = _run_net(net, dihedral(x, view), device, bf16)
    amp, phase, _ = decode_outputs(amp, unit, threshold)
    return upsample(dihedral(_polar(amp, phase), view, inverse=True), scale)


def _decode_object(obj, threshold):
    """Amplitude (max 1 per frame), phase and support of complex objects, as :func:`decode_outputs`."""
    amp = abs(obj)
    amp = amp / _frame_peak(amp)
    return amp, _phase_where_drawn(amp, array_lib(obj).angle(obj), threshold), amp > threshold


def _view_ensemble(net, x, meas, factor, device, bf16, threshold, views, unmeasured=None, scale=1):
    """Amplitude, phase and support of the views' predictions, aligned and averaged (see :func:`predict`)."""
    xp = array_lib(meas)
    objs = xp.stack([_network_object(net, x, device, bf16, threshold, v, scale)
                     for v in range(views)])  # (V, N, 32 scale, 32 scale)
    chis = xp.stack([physics.chi2(meas, physics.intensity(physics.pad(o, factor)), unmeasured) for o in objs])
    rows = physics.arange_like(objs.shape[1], objs)
    best = chis.argmin(0)
    weights = (chis[best, rows] / _at_least(chis, 1e-12)) ** 2  # (chi2_best / chi2)^2: 1 for the best view
    mean = sum(w[:, None, None] * physics.align(o, objs[best, rows]) for o, w in zip(objs, weights)) / weights.sum(0)[
        :, None, None]
    return _decode_object(mean, threshold)


def _run_batch(net, prepared, device, bf16, threshold, views=1, scale=1):
    """Amplitude, phase, support, chi2 and chi2_noise (NumPy) of one batch of :func:`prepare`'s output
    (objects at the pattern's pixel size, ``32 scale`` pixels wide), computed on the torch ``device``, or on
    NumPy arrays with the NumPy engine's ``net`` (``device`` None)."""
    return tuple(_numpy(t) for t in _batch_results(net, prepared, device, bf16, threshold, views, scale))


def _batch_results(net, prepared, device, bf16, threshold, views=1, scale=1):
    """:func:`_run_batch`'s results where they were computed: NumPy arrays, or tensors on ``device`` (the
    :func:`prepare` output given as tensors stays there)."""
    inputs, measured, factor, unmeasured, input_mask = prepared
    factor = round(factor / scale)  # the padding of the object to the pattern's frame (whole: see scales_for)
    x = _on(device, network_input(inputs, input_mask, getattr(net, "mask_channel", False),
                                  as_numpy=not is_tensor(inputs)))
    meas = _on(device, measured)
    # a tensor's map is kept whole: asking whether any pixel is unmeasured would wait for the device
    unmeasured = _on(device, unmeasured) if is_tensor(unmeasured) or unmeasured.any() else None
    if views == 1:
        amp, unit = _run_net(net, x, device, bf16)
        amp, phase, support = decode_outputs(amp, unit, threshold)
        if scale > 1:
            amp, phase, support = _decode_object(upsample(_polar(amp, phase), scale), threshold)
    else:
        amp, phase, support = _view_ensemble(net, x, meas, factor, device, bf16, threshold, views, unmeasured, scale)
    chi = physics.chi2(meas, _fit_intensity(amp, phase, factor), unmeasured)
    noise = physics.noise_chi2(meas, unmeasured)
    signal = (meas > 0).any(-1).any(-1)  # not a sum: 1e33 counts per pixel would overflow float32
    xp = array_lib(meas)
    chi = xp.where(signal, chi, xp.ones_like(chi))  # no signal: nothing to trust
    keep = signal[:, None, None]
    return amp * keep, phase * keep, support & keep, chi, noise  # and nothing to show


#: Arithmetic of the network's forward pass: "auto" (bf16 where the device computes it fast), "fp32", "bf16".
PRECISIONS = ("auto", "fp32", "bf16")


def _engine(device, count, precision):
    """``(device, bf16)`` of a :func:`predict` job of ``count`` network reads: ``(None, False)`` on the NumPy
    engine (:func:`numpy_engine`), else the torch device and whether it runs in bf16 autocast."""
    if numpy_engine(device, count, precision):
        device_name(device)  # an unknown name fails on either engine
        return None, False
    from .runtime import bf16_supported

    dev = resolve_device(device)
    return dev, precision == "bf16" or (precision == "auto" and bf16_supported(dev))


def _no_grad(device):
    """``torch.inference_mode()`` on a torch device, nothing on the NumPy engine (``device`` None)."""
    if device is None:
        return contextlib.nullcontext()
    import torch

    return torch.inference_mode()


def predict(intensity, model=None, device="auto", batch_size=None, threshold=physics.SHAPE_THRESHOLD, precision="auto",
            views=1, mask=None, scale="auto"):
    """Shape and phase of the object behind each diffraction pattern, with a trust score.

    Parameters
    ----------
    intensity : array-like, shape (H, W) or (N, H, W)
        Measured, centred intensities on any scale; ``H == W == 32 k`` (see the module notes).
        Any array supporting slicing (NumPy, dask, h5py) is read one batch at a time.
    model : None, str, path or ModelInfo
        None: the best shipped model for the pattern size (:func:`default_model`); a shipped
        name; a .safetensors file or a model directory; or a model already resolved by
        :func:`napari_cdinn.nn.resolve_model`.
    device : "auto", "cpu", "cuda" or "mps"
    batch_size : int, optional
        Frames per network call; default by device (:data:`BATCH_SIZES`: 256 on the CPU, 4,096 on a GPU).
    threshold : float
        Relative amplitude defining the object (``support``); the phase is 0 where the amplitude is at
        most the lower of it and :data:`PHASE_FLOOR`.
    precision : "auto", "fp32" or "bf16"
        bf16 autocast where the hardware has fast bf16 (``auto``), else float32.
    views : int, 1..8
        Test-time ensemble (see the module notes): the network also reads the first ``views``
        symmetric views of each pattern (:data:`VIEWS`), and the predictions are aligned and
        averaged, weighted by their trust scores.  1 (default) is the network alone; 8 costs
        about 8 network calls and is the most accurate.
    mask : array-like bool, (H, W) or (N, H, W), optional
        True on unmeasured pixels (beamstop, gaps); NaN and infinite pixels are unmeasured too.
    scale : "auto", int or float
        Read the objects at this scale (:mod:`napari_cdinn.nn.models`, "Object size and scale"), and
        re-centre the patterns where :func:`choose_scale` finds that the network fits them better so
        (a :class:`~napari_cdinn.nn.models.ModelInfo`'s ``offset``, :func:`recentre`).
        ``"auto"``: the scale of a :class:`~napari_cdinn.nn.models.ModelInfo` that
        :func:`choose_scale` returned (callers that stream a stack choose it once), else the one
        :func:`choose_scale` picks from these patterns.

    Returns
    -------
    dict
        ``amplitude`` float32 (N, S s, S s) (``S`` the model's object size, ``s`` the scale), max 1 per frame;
        ``phase`` float32 radians, 0 where the amplitude is at most :data:`PHASE_FLOOR`; ``support`` bool;
        ``chi2`` float32 (N,) (measured pixels only); ``chi2_noise``
        float32 (N,), the chi^2 that counting noise alone gives; ``trusted`` bool (N,)
        (``chi2 - chi2_noise <= TRUST_CHI2``).  A single (H, W) frame gives unbatched arrays.

    Notes
    -----
    On a GPU each batch is copied to the device once, raw, and everything else (:func:`prepare`, the
    network, the scores) runs there; the next batch is read and copied while the device computes
    (:func:`_device_batches`).  On the CPU a batch is prepared in NumPy.
    """
    if batch_size is not None:
        batch_size = whole_number(batch_size, "batch_size", 1)
    check_views(views)
    threshold = number_in(threshold, "threshold", 0.0, 1.0, what="a fraction in (0, 1)")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not (isinstance(scale, str) and scale == "auto") and scale is not None:
        scale = number_in(scale, "scale", 0.0, math.inf, what="'auto' or a scale the model has (1, 2, 1.5...)")
    shape = tuple(intensity.shape) if hasattr(intensity, "shape") else np.shape(intensity)
    if len(shape) not in (2, 3):
        raise ValueError(f"expected intensities shaped (H, W) or (N, H, W), got {len(shape)} dimensions")
    single = len(shape) == 2
    if not single and shape[0] == 0:
        raise ValueError("the stack holds no pattern (0 frames)")
    if scale == "auto" and not (isinstance(model, ModelInfo) and model.misfit is not None):
        if choice_to_make(intensity, model, mask, shape):
            model = choose_scale(intensity, model, mask=mask, device=device)
    info = resolve_model(model, shape, None if scale == "auto" else scale)  # checked once before any work
    side = round(info.size * info.scale)
    n = 1 if single else shape[0]
    dev, bf16 = _engine(device, n * int(views), precision)
    net, _ = _cached_model(info.path, dev)
    out = {
        "amplitude": np.empty((n, side, side), np.float32),
        "phase": np.empty((n, side, side), np.float32),
        "support": np.empty((n, side, side), bool),
        "chi2": np.empty(n, np.float32),
        "chi2_noise": np.empty(n, np.float32),
    }
    size = min(n, _batch_size(batch_size, dev))
    blocks = _blocks(intensity, _check_mask(mask, shape), n, shape, size)
    if info.offset:
        blocks = ((lo, *recentre(block, block_mask, info.offset)) for lo, block, block_mask in blocks)
    settings = (net, dev, bf16, threshold, int(views), info.scale)
    with _no_grad(dev):
        if _prepare_on_device(dev):
            for lo, res in _device_batches(blocks, size, settings):
                _store(out, lo, res)
        else:
            for lo, block, block_mask in blocks:
                prepared = prepare(block, net.input_transform, net.input_factor, block_mask, info.scale, net.size)
                _store(out, lo, _run_batch(net, prepared, *settings[1:]))
    if info.offset:  # the objects of the measured patterns: their far fields moved back by the offset
        drawn = out["amplitude"] > min(threshold, PHASE_FLOOR)
        out["phase"] = physics.ramp_phase(out["phase"], np.tile(info.offset, (n, 1)), shape[-1], drawn)
    out["trusted"] = is_trusted(out["chi2"], out["chi2_noise"])
    if single:
        out = {k: v[0] for k, v in out.items()}
    return out


def _batch_size(batch_size, device):
    """``batch_size``, or the default of the engine's ``device`` (:data:`BATCH_SIZES`; None: the NumPy engine)."""
    if batch_size is not None:
        return int(batch_size)
    return BATCH_SIZES.get("cpu" if device is None else device.type, BATCH_SIZES["cpu"])


def _prepare_on_device(device) -> bool:
    """Whether :func:`predict` prepares its batches on the torch ``device`` (:data:`PREPARE`; None: the NumPy engine)."""
    if device is None or PREPARE == "host":
        return False
    return PREPARE == "device" or device.type != "cpu"


def _blocks(intensity, mask, n, shape, size):
    """``(first frame, frames (m, H, W) as read, their mask or None)`` of each batch of ``size`` frames."""
    for lo in range(0, n, size):
        block = np.asarray(intensity) if len(shape) == 2 else np.asarray(intensity[lo : lo + size])
        block_mask = None if mask is None else mask if mask.ndim == 2 else mask[lo : lo + size]
        yield lo, block.reshape((-1,) + shape[-2:]), block_mask


def _store(out, lo, results):
    """Write one batch's :func:`_run_batch` results into ``out`` from frame ``lo`` on."""
    for key, val in zip(_KEYS, results, strict=True):
        out[key][lo : lo + len(val)] = val


def _device_batches(blocks, size, settings):
    """``(first frame, NumPy results)`` of each batch of ``blocks``, prepared and computed on the device.

    Each batch goes to the device once, raw (float32, through a pinned buffer on CUDA, without waiting),
    and comes back once per result; its results are collected only after the next batch was read,
    copied and queued, so that the host's reading overlaps the device's work.  Two pinned buffers of
    each kind alternate: a buffer is filled again only after the batch that used it was collected.
    """
    net, dev, *_, scale = settings
    staged, fetched, pending = {}, {}, None
    for k, (lo, block, block_mask) in enumerate(blocks):
        x = _upload(block, staged, k % 2, size, dev)
        m = None if block_mask is None else _on(dev, np.ascontiguousarray(block_mask))
        prepared = prepare(x, net.input_transform, net.input_factor, m, scale, net.size)
        queued = (lo, _download(_batch_results(net, prepared, *settings[1:]), fetched, k % 2, size, dev), _mark(dev))
        if pending is not None:
            yield _collect(pending, dev)
        pending = queued
    if pending is not None:
        yield _collect(pending, dev)


def _buffer(shape, dtype, device):
    """An empty host tensor for copies to or from ``device``: pinned for CUDA."""
    import torch

    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")


def _upload(block, staged, slot, size, device):
    """Frames ``block`` (NumPy) as float32 on ``device``, through the host buffer ``staged[slot]`` (made once)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only array: it is only read
        src = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
    if slot not in staged:
        staged[slot] = _buffer((size, *src.shape[1:]), torch.float32, device)
    return staged[slot][: len(src)].copy_(src).to(device, non_blocking=True)


def _download(results, fetched, slot, size, device):
    """Tensors ``results`` queued for copying into the host buffers ``fetched[slot]`` (made once); read them after
    :func:`_collect`."""
    if slot not in fetched:
        fetched[slot] = [_buffer((size, *r.shape[1:]), r.dtype, device) for r in results]
    return [host[: len(r)].copy_(r, non_blocking=True) for host, r in zip(fetched[slot], results, strict=True)]


def _mark(device):
    """A CUDA event recorded after the work queued so far on ``device`` (None elsewhere)."""
    if device.type != "cuda":
        return None
    import torch

    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _collect(pending, device):
    """``(first frame, NumPy results)`` of a queued batch, once its copies are done."""
    lo, hosts, event = pending
    if event is not None:
        event.synchronize()
    elif device.type == "mps":
        import torch

        torch.mps.synchronize()
    return lo, [h.numpy() for h in hosts]


def _sample(intensity, mask, count):
    """Up to ``count`` frames of a stack, evenly spaced (increasing indices: h5py reads them), with their mask."""
    n = intensity.shape[0]
    idx = np.unique(np.linspace(0, n - 1, min(n, int(count))).round().astype(int))
    with np.errstate(over="ignore"):  # values beyond float32 become inf (unmeasured); a stack's reader reports them
        frames = np.asarray(intensity[idx] if len(idx) < n else intensity[:], dtype=np.float32)
    if mask is not None and mask.ndim == 3:
        mask = mask[idx]
    return frames, mask


def choose_scale(intensity, model=None, mask=None, device="auto", sample=None):
    """The model resolved for these patterns at the scale that fits them best (the size policy).

    The network reads a sample of the frames (up to ``sample``, evenly spaced) at every scale the
    model has for the pattern size (:func:`napari_cdinn.nn.models.scales_for`) and, with no model
    named, every shipped model that reads the size does so too (:func:`napari_cdinn.nn.models.candidates`:
    ``model2x`` at scales 1 and 2 beside a 64-pixel model on 128 x 128 patterns); the model and
    scale whose predictions fit the measured pixels best (lowest median ``chi2 - chi2_noise``) are
    kept.  An object too large for a scale does not fit at it (its far field is read aliased), one
    read coarser than needed loses its fine fringes: the data decide, beamstop and noise included,
    which the autocorrelation's extent does not survive (docs/decisions.md, "Object size").  Where the
    sample's mean pattern's centre of symmetry lies off the centre pixel (:func:`centre_offset`), each is also
    tried on the patterns re-centred there (:func:`recentre`), and kept so where it fits better.

    Parameters
    ----------
    intensity : array-like (N, H, W) or (H, W)
    model : None, str, path or ModelInfo
    mask : array-like bool, (H, W) or (N, H, W), optional
    device : str
    sample : int, optional
        Frames predicted at every scale (default :data:`SCALE_SAMPLE`).

    Returns
    -------
    ModelInfo
        With ``scale``, ``misfit`` (that median at the chosen scale), ``extent`` (the median
        autocorrelation bound of the objects' width), which :func:`napari_cdinn.nn.declined` reads,
        and ``offset`` (the re-centring kept, or None), which :func:`napari_cdinn.nn.off_centre` reads.
    """
    shape = tuple(intensity.shape) if hasattr(intensity, "shape") else np.shape(intensity)
    if len(shape) == 2:
        intensity, shape = np.asarray(intensity)[None], (1, *shape)
    if len(shape) != 3 or shape[0] == 0:
        raise ValueError(f"expected a stack of patterns shaped (N, H, W) with N >= 1, got {shape}")
    options = candidates(model, shape)
    frames, mask = _sample(intensity, _check_mask(mask, shape),
                          SCALE_SAMPLE if sample is None else whole_number(sample, "sample", 1))
    offset = centre_offset(frames, mask)
    best = None
    for info in options:
        for shift in (None, offset) if offset else (None,):
            tried = dataclasses.replace(info, offset=shift)
            res = predict(frames, model=tried, device=device, mask=mask, scale=tried.scale)
            if best is None or _misfit(res) < _misfit(best[1]):
                best = (tried, res)
    return with_evidence(best[0], best[1], frames, mask)


def choice_to_make(intensity, model, mask, shape) -> bool:
    """Whether :func:`choose_scale` has anything to choose for these patterns: several models or scales
    read them, or a sample of the stack is off-centre (:func:`centre_offset`: then whether to re-centre).
    Reads the sample only for a stack of one model and scale, large enough to tell its centre."""
    if len(candidates(model, shape)) > 1:
        return True
    if len(shape) != 3 or shape[0] < CENTRE_CHECK[-1][0]:
        return False
    return centre_offset(*_sample(intensity, _check_mask(mask, shape), SCALE_SAMPLE)) is not None


def _misfit(result):
    """The median misfit beyond the counting noise, ``chi2 - chi2_noise``, of a :func:`predict` result."""
    return float(np.median(result["chi2"] - result["chi2_noise"]))


def with_evidence(info, result, frames, mask=None):
    """``info`` with what :func:`napari_cdinn.nn.declined` reads: its ``misfit`` (the median of
    ``chi2 - chi2_noise`` of ``result``, its :func:`predict` of patterns at ``info``'s scale) and the
    ``extent`` of the objects (the median autocorrelation bound of ``frames``, a sample of them, with
    their ``mask``; NaN behind a beamstop)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # every frame behind a beamstop: NaN
        extent = float(np.nanmedian(physics.autocorrelation_extent(frames, mask)))
    return dataclasses.replace(info, misfit=_misfit(result), extent=extent)


#: ``(frames, pixels)``: from that many frames on, a centre of symmetry of their mean more than that far
#: from the centre pixel is an off-centre stack (benchmarks/README.md, "Preparing detector frames":
#: exact from 32 frames, within a pixel from 8); fewer frames tell nothing.
CENTRE_CHECK = ((32, 0), (8, 1))


def centre_offset(frames, mask=None):
    """``(dy, dx)`` from the centre pixel ``(M // 2, M // 2)`` to the pixel about which the mean of
    ``frames`` (N, M, M) is inversion-symmetric, found as ``cdinn prepare`` finds a stack's centre
    (:func:`napari_cdinn.prepare.stack_centre`; ``mask``, NaN: unmeasured), where :data:`CENTRE_CHECK`
    finds it off-centre; None where it is centred, or too few frames (or no signal) tell."""
    frames = np.asarray(frames, dtype=np.float32)
    tolerance = next((px for n, px in CENTRE_CHECK if len(frames) >= n), None)
    if frames.ndim != 3 or tolerance is None:
        return None
    from ..prepare import stack_centre  # imported only where it can tell
    try:
        cy, cx = stack_centre(frames, mask)
    except ValueError:  # no measured signal
        return None
    off = (int(round(cy)) - frames.shape[-2] // 2, int(round(cx)) - frames.shape[-1] // 2)
    return off if max(abs(v) for v in off) > tolerance else None


def recentre(frames, mask, offset):
    """Frames ``(m, H, W)`` whose zero frequency lies ``offset = (dy, dx)`` pixels from the centre pixel,
    moved by ``-offset`` so that it lies there, with their mask: the pixels moved in from beyond the
    edge are unmeasured (``mask`` None, ``(H, W)`` or ``(m, H, W)``; the result's mask keeps its shape,
    ``(H, W)`` for None)."""
    frames = np.asarray(frames, dtype=np.float32)
    mask = np.zeros(frames.shape[-2:], bool) if mask is None else np.asarray(mask, dtype=bool)
    return _shifted(frames, offset, 0.0), _shifted(mask, offset, True)


def _shifted(x, offset, fill):
    """``x`` (..., H, W) moved by ``-offset`` pixels (``out[i] = x[i + offset]``), ``fill`` where nothing was."""
    out = np.full_like(x, fill)
    h, w = x.shape[-2:]
    (dy, dx) = offset
    out[..., max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)] = x[..., max(dy, 0):h + min(dy, 0),
                                                                          max(dx, 0):w + min(dx, 0)]
    return out


def is_trusted(chi2, chi2_noise=0.0):
    """The trust rule: the misfit beyond counting noise, ``chi2 - chi2_noise``, is at most :data:`TRUST_CHI2`."""
    return (np.asarray(chi2) - np.asarray(chi2_noise)) <= TRUST_CHI2


def _check_mask(mask, shape):
    """``mask`` as a bool array of shape ``(H, W)`` or ``(N, H, W)`` of the patterns ``shape``, or None."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    check_mask_layout(mask, shape)
    frames = (1,) + tuple(shape) if len(shape) == 2 else tuple(shape)
    return mask.astype(bool).reshape(mask.shape if mask.ndim == 2 else frames)


def check_views(views):
    """Raise ``ValueError`` unless ``views`` is a whole number of views, 1 to ``len(VIEWS)``."""
    whole_number(views, "views", 1, len(VIEWS))


def predict_chunk(intensity, first_frame=0, model=None, device="auto", batch_size=None, views=1, mask=None, scale=None):
    """Chunk function for :func:`napari_cdinn.stream.process_stack` (picklable via ``partial``).

    The prediction is deterministic, so ``first_frame`` (the chunk's place in the stack) is unused.
    The scale is the model's when :func:`choose_scale` chose it once for the stack, else ``scale``
    (default 1): never chosen per chunk.

    Returns ``amplitude``, ``phase``, ``chi2``, ``chi2_noise`` and ``trusted`` of :func:`predict` for an
    ``(n, H, W)`` block; the network is loaded once per process.
    """
    if scale is None:
        scale = "auto" if isinstance(model, ModelInfo) and model.misfit is not None else 1
    res = predict(intensity, model=model, device=device, batch_size=batch_size, views=views, mask=mask, scale=scale)
    return {k: res[k] for k in ("amplitude", "phase", "chi2", "chi2_noise", "trusted")}
