"""The networks' forward pass in NumPy: a small CPU job without importing torch.

Importing torch costs about 0.8 s, several times what a handful of patterns costs to predict, so
:func:`napari_cdinn.nn.inference.predict` runs small CPU jobs through :class:`NumpyNet` while torch
is not imported (docs/decisions.md, "Cold start: small CPU jobs run in NumPy").  It computes what
:mod:`napari_cdinn.nn.networks` computes, every architecture (``paper``, ``shared``, ``shared2x``,
with or without the mask channel), from the same safetensors weights, in float32: the outputs
agree with torch's float32 ones to about 1e-6 (the summation order differs); the torch engine runs
bf16 autocast on CPUs that have it, so the two differ in the last digits.

Layout: activations are channels-last ``(N, H, W, C)``; a 3 x 3 convolution is an im2col (the
nine shifted views of the zero-padded input side by side, ``(N H W, 9 C)``) times the kernel laid
out as ``(9 C, O)``, one float32 matrix product per layer.

No torch import.
"""

from __future__ import annotations

import re

import numpy as np

from .models import (
    ModelInfo,
    input_factor_of,
    level_widths,
    nonfinite_weights,
    object_size_of,
    resolve_model,
    wrong_weights,
)

__all__ = ["NumpyNet", "load_numpy_model"]


#: Where each head's encoder and decoder sit in the state dict: the paper's pair has one encoder per head.
_PREFIXES = {
    "paper": {"shape": ("shape.encoder.", "shape.decoder."), "phase": ("phase.encoder.", "phase.decoder.")},
    "shared": {"shape": ("encoder.", "shape."), "phase": ("encoder.", "phase.")},
}


def _sigmoid(x):
    """The logistic function in float32 (0 and 1 at the extremes, no overflow warning)."""
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def _im2col(x):
    """The nine 3 x 3 neighbours of every pixel of channels-last ``x`` (N, H, W, C), zero-padded: (N H W, 9 C)."""
    n, h, w, c = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = np.empty((n, h, w, 9, c), np.float32)
    for k in range(9):
        cols[:, :, :, k] = padded[:, k // 3 : k // 3 + h, k % 3 : k % 3 + w]
    return cols.reshape(n * h * w, 9 * c)


def _conv(x, layer, relu=True):
    """3 x 3 convolution with zero padding 1 (``torch.nn.Conv2d(C, O, 3, padding=1)``), then ReLU."""
    kernel, bias = layer
    n, h, w, _ = x.shape
    out = _im2col(x) @ kernel
    out += bias
    if relu:
        np.maximum(out, 0, out=out)
    return out.reshape(n, h, w, -1)


def _pool(x):
    """2 x 2 max-pooling of channels-last ``x``."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _upsample(x):
    """2 x nearest-neighbour upsampling of channels-last ``x``."""
    n, h, w, c = x.shape
    return np.broadcast_to(x[:, :, None, :, None], (n, h, 2, w, 2, c)).reshape(n, 2 * h, 2 * w, c)


def _encode(x, convs):
    """The encoder: blocks of (conv + ReLU) x 2 and 2 x 2 max-pooling (two convolutions each)."""
    for block in range(len(convs) // 2):
        x = _pool(_conv(_conv(x, convs[2 * block]), convs[2 * block + 1]))
    return x


def _decode(z, convs):
    """A decoder: blocks of (conv + ReLU) x 2 and 2 x upsampling, then the last conv (logits, one channel)."""
    for block in range(len(convs) // 2):
        z = _upsample(_conv(_conv(z, convs[2 * block]), convs[2 * block + 1]))
    return _conv(z, convs[-1], relu=False)


def _kernel(weight):
    """A ``torch.nn.Conv2d`` weight (O, C, 3, 3) as the (9 C, O) matrix :func:`_im2col`'s columns multiply."""
    o, c = weight.shape[:2]
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0).reshape(9 * c, o), dtype=np.float32)


def _indices(state, prefix):
    """Layer indices of the weights under ``prefix`` (``PREFIXlayers.I.weight``)."""
    return [int(m.group(1)) for k in state if (m := re.fullmatch(re.escape(prefix) + r"layers\.(\d+)\.weight", k))]


def _convs(state, prefix, count):
    """The ``count`` convolutions ``(kernel, bias)`` of the sequential module at ``prefix``, in order."""
    found = sorted(_indices(state, prefix))
    if len(found) != count:
        raise KeyError(f"{prefix}layers: {len(found)} convolutions, expected {count}")
    return [(_kernel(state[f"{prefix}layers.{i}.weight"]), state[f"{prefix}layers.{i}.bias"].astype(np.float32))
            for i in found]


class NumpyNet:
    """A network of :mod:`napari_cdinn.nn.networks` evaluated in NumPy (float32), for small CPU jobs.

    Parameters
    ----------
    state : dict of str to ndarray
        The model's state dict (``torch`` names, NumPy arrays of any float dtype).
    arch : str
        One of :data:`napari_cdinn.nn.models.ARCHITECTURES`.
    mask_channel : bool
        Whether the weights read the unmeasured-pixel map beside the amplitudes.
    input_transform : str
        The input encoding the weights were trained with (read by :func:`napari_cdinn.nn.inference.prepare`).

    Attributes
    ----------
    arch, input_factor, mask_channel, input_transform, size
        As the torch model's (:func:`napari_cdinn.nn.checkpoint.load_model`).

    Raises
    ------
    KeyError, ValueError
        The weights are not those of ``arch`` (missing, extra or misshapen layers).
    """

    def __init__(self, state: dict, arch: str, mask_channel: bool = False, input_transform: str = "linear"):
        self.arch = arch
        self.input_factor = input_factor_of(arch)
        self.size = object_size_of(arch)
        self.mask_channel = bool(mask_channel)
        self.input_transform = input_transform
        heads = _PREFIXES["paper" if arch == "paper" else "shared"]
        levels = len(level_widths(object_size_of(arch))[0])
        counts = {enc: 2 * levels for enc, _ in heads.values()}
        counts.update({dec: 2 * levels + 1 for _, dec in heads.values()})
        layers = {p: _convs(state, p, count) for p, count in counts.items()}
        extra = set(state) - {f"{p}layers.{i}.{kind}" for p in counts for i in _indices(state, p)
                              for kind in ("weight", "bias")}
        if extra:
            raise KeyError(f"unexpected weights {sorted(extra)[0]!r}")
        self._heads = tuple((layers[enc], layers[dec]) for enc, dec in heads.values())  # (shape, phase)
        channels = self.input_factor**2 * (2 if self.mask_channel else 1)
        if any(enc[0][0].shape[0] != 9 * channels for enc, _ in self._heads):
            raise ValueError(f"the first convolution does not read {channels} input channels")

    def encoder_input(self, x):
        """Network input ``(N, C, S m, S m)`` as the encoder's channels-last ``(N, S, S, C m^2)``:
        the ``m = input_factor`` squared sub-lattices as channels, in ``torch.nn.functional.pixel_unshuffle``'s order."""
        x = np.asarray(x, dtype=np.float32)
        n, c, h, w = x.shape
        r = self.input_factor
        return np.ascontiguousarray(
            x.reshape(n, c, h // r, r, w // r, r).transpose(0, 2, 4, 1, 3, 5).reshape(n, h // r, w // r, c * r * r))

    def logits(self, x):
        """Pre-sigmoid ``(amplitude, phase_unit)`` maps, float32, each ``(N, 1, S, S)`` (``S`` the object size)."""
        z = self.encoder_input(x)
        features = {}  # the shared encoder runs once for both heads
        out = []
        for encoder, decoder in self._heads:
            if id(encoder) not in features:
                features[id(encoder)] = _encode(z, encoder)
            out.append(_decode(features[id(encoder)], decoder)[..., 0][:, None])
        return tuple(out)

    def __call__(self, x):
        """Return ``(amplitude, phase_unit)``, each ``(N, 1, S, S)`` float32 in 0..1 (the sigmoid outputs)."""
        return tuple(_sigmoid(t) for t in self.logits(x))


def load_numpy_model(model=None):
    """Load a model's weights into a :class:`NumpyNet` (the safetensors file, without torch).

    Parameters
    ----------
    model : None, str, path or ModelInfo
        As :func:`napari_cdinn.nn.models.resolve_model`: the architecture, mask channel and input
        encoding come from its resolution.

    Returns
    -------
    net : NumpyNet
    card : dict

    Raises
    ------
    ValueError
        One sentence, as :func:`napari_cdinn.nn.checkpoint.load_model`: weights of another
        network, or NaN or infinite weights.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    info = model if isinstance(model, ModelInfo) else resolve_model(model)
    name = info.path.name
    try:
        state = {k: np.asarray(v, dtype=np.float32) for k, v in load_file(str(info.path)).items()}
        net = NumpyNet(state, info.arch, info.mask_channel, info.input_transform)
    except (SafetensorError, KeyError, IndexError, ValueError, OSError) as exc:
        raise wrong_weights(name, info.arch, exc) from None
    bad = [k for k, v in state.items() if not np.isfinite(v).all()]
    if bad:
        raise nonfinite_weights(name, bad[0])
    return net, info.card
