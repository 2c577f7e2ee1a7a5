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
    One encoder of the same shape feeding both decoders: 1,154,210 parameters and about
    2/3 of the pair's training time on this CPU.  Because both heads read the same features they
    agree on which of the twin solutions to draw, which the twin-invariant loss needs: trained
    the same way, the pair's phase network stayed at the trivial zero-phase answer for 460,000
    examples, while the shared net learned the phase within 70,000.

No Qt or napari import; torch is imported by this module (import it lazily from UI code).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Encoder", "Decoder", "CDINet", "PaperPair", "SharedNet", "build_model", "ARCHITECTURES", "count_parameters"]

#: Names accepted by :func:`build_model`.
ARCHITECTURES = ("paper", "shared")

_ENCODER_WIDTHS = (32, 64, 128)
_DECODER_WIDTHS = (128, 64, 32)


def _conv_relu(c_in, c_out):
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]


class Encoder(nn.Module):
    """Three blocks of (conv 3x3 + ReLU) x 2 then 2 x 2 max-pooling: 32 x 32 -> 4 x 4 x 128."""

    def __init__(self, widths=_ENCODER_WIDTHS):
        super().__init__()
        layers, c = [], 1
        for w in widths:
            layers += _conv_relu(c, w) + _conv_relu(w, w) + [nn.MaxPool2d(2)]
            c = w
        self.layers = nn.Sequential(*layers)
        self.out_channels = c

    def forward(self, x):  # noqa: D102
        return self.layers(x)


class Decoder(nn.Module):
    """Three blocks of (conv 3x3 + ReLU) x 2 then 2 x upsampling and a last conv (logits).

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

    def forward(self, x):  # noqa: D102
        return self.layers(x)


class CDINet(nn.Module):
    """One encoder-decoder of the paper (sCDI NN or pCDI NN): ``(N,1,32,32) -> (N,1,32,32)`` logits."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder(self.encoder.out_channels)

    def forward(self, x):  # noqa: D102
        return self.decoder(self.encoder(x))


class PaperPair(nn.Module):
    """The paper's two networks side by side: ``shape`` (sCDI NN) and ``phase`` (pCDI NN)."""

    arch = "paper"

    def __init__(self):
        super().__init__()
        self.shape = CDINet()
        self.phase = CDINet()

    def logits(self, x):
        """Pre-sigmoid ``(amplitude, phase_unit)`` maps, float32, each ``(N, 1, 32, 32)``."""
        return self.shape(x).float(), self.phase(x).float()

    def forward(self, x):
        """Return ``(amplitude, phase_unit)``, each ``(N, 1, 32, 32)`` float32 in 0..1."""
        a, p = self.logits(x)
        return torch.sigmoid(a), torch.sigmoid(p)


class SharedNet(nn.Module):
    """One shared encoder and two decoders (shape and phase heads)."""

    arch = "shared"

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.shape = Decoder(self.encoder.out_channels)
        self.phase = Decoder(self.encoder.out_channels)

    def logits(self, x):
        """Pre-sigmoid ``(amplitude, phase_unit)`` maps, float32, each ``(N, 1, 32, 32)``."""
        z = self.encoder(x)
        return self.shape(z).float(), self.phase(z).float()

    def forward(self, x):
        """Return ``(amplitude, phase_unit)``, each ``(N, 1, 32, 32)`` float32 in 0..1."""
        a, p = self.logits(x)
        return torch.sigmoid(a), torch.sigmoid(p)


def build_model(arch: str = "paper") -> nn.Module:
    """A freshly initialised model of architecture ``arch`` (one of :data:`ARCHITECTURES`)."""
    if arch == "paper":
        return PaperPair()
    if arch == "shared":
        return SharedNet()
    raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
