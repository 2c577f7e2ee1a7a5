"""The CDI NN networks (Cherukara, Nashed & Harder, Sci. Rep. 8, 16520, 2018).

Every model maps a batch of normalised 32 x 32 diffraction amplitudes ``(N, 1, 32, 32)`` to
two sigmoid maps ``(amplitude, phase_unit)`` of the same shape: the object's shape (amplitude,
0..1) and its phase scaled to 0..1 (``phase = 2 pi * phase_unit - pi``).  ``model.logits(x)``
returns the pre-sigmoid maps as float32 (the training loss uses them for numerical stability,
and the sigmoid is always evaluated in float32, also under bf16 autocast).

Architectures
-------------
``paper`` (:class:`PaperPair`)
    Two independent encoder-decoders, sCDI NN (shape) and pCDI NN (phase), as in the paper.
    Encoder: three blocks of two 3 x 3 convolutions + ReLU with 32, 64 and 128 filters, each
    followed by 2 x 2 max-pooling (32 -> 16 -> 8 -> 4).  Decoder: three blocks of two 3 x 3
    convolutions + ReLU with 128, 64 and 32 filters, each followed by 2 x nearest upsampling
    (4 -> 8 -> 16 -> 32), then a 3 x 3 convolution to one channel and a sigmoid.
    The sigmoid outputs of sCDI NN are the shape, of pCDI NN the phase scaled to 0..1.
    Conv layer 2 is the second 32-filter convolution (32 x 32), conv layer 4 the second
    64-filter one (16 x 16).  Parameters: 720,321 per network, 1,440,642 for the pair.
``shared`` (:class:`SharedNet`, the shipped default)
    One encoder of the same shape feeding both decoders: 1,154,210 parameters and less training
    time than the pair.  Because both heads read the same features they agree on which of the
    twin solutions to draw, which the twin-invariant loss needs: trained the same way, the
    pair's phase network stayed at the trivial zero-phase answer while the shared net learned
    the phase (measured: docs/decisions.md, "--preset paper trains the shared encoder").
``shared2x`` (:class:`SharedNet` with ``input_factor=2``, beyond the paper)
    The shared net reading the whole 2x-oversampled 64 x 64 pattern instead of its decimated
    32 x 32 sub-lattice.  The paper throws away three quarters of the measured pixels, and with
    them the oversampling that makes the phase unique; here the pattern is split into its four
    32 x 32 sub-lattices (``pixel_unshuffle``), stacked as four input channels of the same
    encoder (only the first convolution grows: 1,155,074 parameters, the same compute within
    1 %).  Channel 0 is the sub-lattice holding zero frequency, i.e. exactly the paper's input,
    so :func:`widen_state_dict` turns trained ``shared`` weights into ``shared2x`` weights that
    give the same output until fine-tuning teaches the other three channels.  Patterns must be
    2k-times oversampled (64 x 64, 128 x 128, ...).
``deep2x`` (:class:`SharedNet` with ``input_factor=2, size=64``, beyond the paper)
    ``shared2x`` for 64-pixel objects in 2x-oversampled 128 x 128 patterns: four 64 x 64
    sub-lattice channels and one more level in the encoder and in each decoder, 256 filters
    (64 -> 32 -> 16 -> 8 -> 4 and back), so that the features still end on 4 x 4 and every output
    pixel depends on every measured pixel, as in the paper's nets (:func:`level_widths`).
    4,696,706 parameters (mask channel included), 5.4 times the multiply-adds of ``shared2x`` per
    pattern.  No trained level maps onto the deeper one exactly; :func:`deepen_state_dict` starts it
    from trained ``shared2x`` weights on its outer levels (``cdinn train --arch deep2x --init-from
    model2x``), which trains faster than a random start (docs/decisions.md).

Mask channel (beyond the paper)
-------------------------------
With ``mask_channel=True`` a model reads ``(N, 2, H, W)``: the normalised amplitudes (0 where
unmeasured) and a map that is 1 on unmeasured pixels (beamstop, gaps, saturation), so that a
hole in the data is not read as "no photons".  The mask goes through the same sub-lattice split,
so only the first convolution grows (``2 input_factor**2`` input channels).
:func:`add_mask_channel` turns trained weights without it into weights with it that give the same
output (the new kernels start at zero): the network then learns what the mask means by
fine-tuning.  The loaders tell the two apart from the first convolution's shape.

No Qt or napari import; torch is imported by this module (import it lazily from UI code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .models import ARCHITECTURES, SIZE, input_factor_of, level_widths, object_size_of
from .models import INPUT_FACTORS as _INPUT_FACTORS

__all__ = [
    "ARCHITECTURES",
    "CDINet",
    "Decoder",
    "Encoder",
    "PaperPair",
    "SharedNet",
    "add_mask_channel",
    "build_model",
    "count_parameters",
    "deepen_state_dict",
    "input_factor_of",
    "level_widths",
    "mask_channel_of",
    "widen_state_dict",
]

# ARCHITECTURES (the names build_model accepts), the input factors and input_factor_of are in
# .models, which resolves a model without importing torch.

# level_widths (the widths per object size) is in .models, which the NumPy engine reads without torch.
_ENCODER_WIDTHS, _DECODER_WIDTHS = level_widths(SIZE)


def _conv_relu(c_in, c_out):
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]


class Encoder(nn.Module):
    """Blocks of (conv 3x3 + ReLU) x 2 then 2 x 2 max-pooling, one per width: the paper's three, 32 x 32 -> 4 x 4 x 128."""

    def __init__(self, widths=_ENCODER_WIDTHS, in_channels=1):
        super().__init__()
        layers, c = [], in_channels
        for w in widths:
            layers += _conv_relu(c, w) + _conv_relu(w, w) + [nn.MaxPool2d(2)]
            c = w
        self.layers = nn.Sequential(*layers)
        self.out_channels = c

    def forward(self, x):
        return self.layers(x)


class Decoder(nn.Module):
    """Blocks of (conv 3x3 + ReLU) x 2 then 2 x upsampling, one per width (the paper's three), and a last conv (logits).

    The sigmoid of the paper is applied by the model, in float32 (see :meth:`PaperPair.forward`).
    """

    def __init__(self, c_in=_ENCODER_WIDTHS[-1], widths=_DECODER_WIDTHS):
        super().__init__()
        layers, c = [], c_in
        for w in widths:
            layers += _conv_relu(c, w) + _conv_relu(w, w) + [nn.Upsample(scale_factor=2, mode="nearest")]
            c = w
        layers += [nn.Conv2d(c, 1, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class CDINet(nn.Module):
    """One encoder-decoder of the paper (sCDI NN or pCDI NN): ``(N,1,32,32) -> (N,1,32,32)`` logits."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder(self.encoder.out_channels)

    def forward(self, x):
        return self.decoder(self.encoder(x))


class PaperPair(nn.Module):
    """The paper's two networks side by side: ``shape`` (sCDI NN) and ``phase`` (pCDI NN)."""

    arch = "paper"
    input_factor = 1
    mask_channel = False
    size = SIZE

    def __init__(self):
        super().__init__()
        self.shape = CDINet()
        self.phase = CDINet()

    def encoder_input(self, x):
        """The encoders' input for network input ``x`` (unchanged)."""
        return x

    def logits(self, x):
        """Pre-sigmoid ``(amplitude, phase_unit)`` maps, float32, each ``(N, 1, 32, 32)``."""
        return self.shape(x).float(), self.phase(x).float()

    def forward(self, x):
        """Return ``(amplitude, phase_unit)``, each ``(N, 1, 32, 32)`` float32 in 0..1."""
        a, p = self.logits(x)
        return torch.sigmoid(a), torch.sigmoid(p)


class SharedNet(nn.Module):
    """One shared encoder and two decoders (shape and phase heads).

    Parameters
    ----------
    input_factor : int
        Oversampling of the input patterns: 1 reads ``(N, 1, 32, 32)`` (``shared``), 2 reads the
        2x-oversampled ``(N, 1, 64, 64)`` as four 32 x 32 sub-lattice channels (``shared2x``).
    mask_channel : bool
        Read ``(N, 2, H, W)``: amplitudes and the unmeasured-pixel map (see the module notes).
    size : int
        Side of the objects drawn (:func:`level_widths`): 32, or 64 with one more level.
    arch : str, optional
        Its architecture name (default: ``shared`` or ``shared{input_factor}x``).
    """

    def __init__(self, input_factor=1, mask_channel=False, size=SIZE, arch=None):
        super().__init__()
        self.input_factor = int(input_factor)
        self.mask_channel = bool(mask_channel)
        self.size = int(size)
        self.arch = arch or ("shared" if self.input_factor == 1 else f"shared{self.input_factor}x")
        enc, dec = level_widths(self.size)
        self.encoder = Encoder(enc, in_channels=self.input_factor**2 * (2 if self.mask_channel else 1))
        self.shape = Decoder(self.encoder.out_channels, dec)
        self.phase = Decoder(self.encoder.out_channels, dec)

    def encoder_input(self, x):
        """The encoder's input for network input ``x``: its ``input_factor``-squared sub-lattices as channels."""
        return F.pixel_unshuffle(x, self.input_factor) if self.input_factor > 1 else x

    def logits(self, x):
        """Pre-sigmoid ``(amplitude, phase_unit)`` maps, float32, each ``(N, 1, size, size)``."""
        z = self.encoder(self.encoder_input(x))
        return self.shape(z).float(), self.phase(z).float()

    def forward(self, x):
        """Return ``(amplitude, phase_unit)``, each ``(N, 1, 32, 32)`` float32 in 0..1."""
        a, p = self.logits(x)
        return torch.sigmoid(a), torch.sigmoid(p)


def build_model(arch: str = "paper", mask_channel: bool = False) -> nn.Module:
    """A freshly initialised model of architecture ``arch`` (one of :data:`ARCHITECTURES`), with or
    without the mask channel (the shared architectures only)."""
    if arch == "paper":
        if mask_channel:
            raise ValueError("the paper's separate pair has no mask channel; use the shared or shared2x architecture")
        return PaperPair()
    if arch in _INPUT_FACTORS:
        return SharedNet(_INPUT_FACTORS[arch], mask_channel, object_size_of(arch), arch)
    raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")


def widen_state_dict(state: dict, factor: int = 2) -> dict:
    """``shared`` weights as ``shared{factor}x`` weights with the same outputs (a warm start).

    The first convolution gets ``factor**2`` input channels; channel 0, the sub-lattice that
    holds zero frequency (:func:`napari_cdinn.physics.decimate` of a centred ``32 factor`` frame),
    keeps the trained kernel and the others start at zero, so the widened net computes exactly
    what the narrow one computed from the decimated pattern.
    """
    key = "encoder.layers.0.weight"
    w = state[key]
    if w.shape[1] != 1:
        raise ValueError(f"expected weights of the 'shared' architecture (1 input channel), got {w.shape[1]}")
    wide = w.new_zeros((w.shape[0], factor * factor) + tuple(w.shape[2:]))
    wide[:, :1] = w
    return dict(state, **{key: wide})


def deepen_state_dict(state: dict, fresh: dict) -> dict:
    """Trained 32-pixel ``shared2x`` weights carried into a freshly initialised deeper net (a warm start).

    The deeper net (``deep2x``: one more level, :func:`level_widths`) keeps the encoder's outer
    levels and the decoders' outer levels and last convolution of ``state`` wherever the shapes
    agree: the filters that read sub-lattice speckle and draw edges at pixel scale.  The new inner
    levels keep ``fresh``'s random weights; the first convolution after them, which reads twice
    the channels, takes the trained kernel on its first half.  Unlike :func:`widen_state_dict` the
    result does not compute what the smaller net computed: it is a start for training, measured
    against a random start in docs/decisions.md ("Warm start of the 64-pixel network").

    Parameters
    ----------
    state : dict
        Weights of a ``SharedNet`` drawing ``n``-pixel objects (with or without the mask channel,
        as ``fresh``).
    fresh : dict
        Freshly initialised weights of the ``SharedNet`` drawing ``2 n``-pixel objects.
    """
    out = dict(fresh)
    for key, w in state.items():
        head, idx, name = key.rsplit(".", 2)
        decoder = not head.startswith("encoder")
        if decoder:  # decoders: the deeper net's level ``l + 1`` is the smaller one's level ``l``
            key = f"{head}.{int(idx) + 5}.{name}"
        if key not in out:
            raise ValueError(f"weights {key!r} have no place in the deeper network")
        target = out[key]
        if target.shape == w.shape:
            out[key] = w.clone()
        elif decoder and target.ndim == 4 and target.shape[0] == w.shape[0] and target.shape[1] == 2 * w.shape[1]:
            out[key] = torch.cat([w, target[:, w.shape[1]:]], 1)
        else:
            raise ValueError(f"weights {key!r} of shape {tuple(w.shape)} do not fit {tuple(target.shape)}")
    return out


def mask_channel_of(state: dict, arch: str) -> bool:
    """Whether the weights ``state`` of architecture ``arch`` read the mask channel (from the first convolution)."""
    if arch == "paper":
        return False
    return int(state["encoder.layers.0.weight"].shape[1]) == 2 * input_factor_of(arch) ** 2


def add_mask_channel(state: dict, arch: str) -> dict:
    """Weights of architecture ``arch`` without the mask channel as weights with it, giving the same outputs.

    The first convolution gets one more set of ``input_factor**2`` input channels (the mask's
    sub-lattices), its kernels zero.  Weights that already have it are returned unchanged.
    """
    if arch == "paper":
        raise ValueError("the paper's separate pair has no mask channel; use the shared or shared2x architecture")
    if mask_channel_of(state, arch):
        return state
    key = "encoder.layers.0.weight"
    w = state[key]
    return dict(state, **{key: torch.cat([w, torch.zeros_like(w)], 1)})


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
