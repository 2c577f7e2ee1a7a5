"""Elementary steps of iterative phase retrieval on batched torch tensors.

Internal layout
---------------
The engine works on ``(B, M, M)`` tensors in the *unshifted* FFT layout (origin at pixel
``(0, 0)``, i.e. ``ifftshift`` of the centred arrays of :mod:`napari_cdinn.physics`), so that an
iteration is one plain ``fft2``/``ifft2`` pair with no shifts.  :func:`to_fft_layout` and
:func:`to_centred_layout` convert at the boundaries.

Amplitudes are stored pre-divided by the number of pixels ``M * M``, so that the unnormalised
inverse transform (``norm="forward"``) returns the object on the right scale and no separate
scaling pass is needed.

All update functions work in place on complex64 tensors and avoid ``exp``/``angle``: the
modulus projection is a real rescaling ``F * (A / |F|)`` computed with ``rsqrt``.
"""

from __future__ import annotations

import torch

__all__ = [
    "er_update",
    "fourier",
    "fourier_error",
    "hio_update",
    "inverse_fourier",
    "modulus_projection",
    "raar_update",
    "squared_modulus",
    "to_centred_layout",
    "to_fft_layout",
    "update",
]

#: Added to ``|F|**2`` before ``rsqrt``; a zero field stays zero (``0 * huge == 0``).
_TINY = 1e-30


def to_fft_layout(x):
    """Centred ``(..., M, M)`` array to the unshifted FFT layout (``ifftshift``)."""
    return torch.fft.ifftshift(x, dim=(-2, -1))


def to_centred_layout(x):
    """Unshifted FFT layout back to centred (``fftshift``)."""
    return torch.fft.fftshift(x, dim=(-2, -1))


def fourier(x, out=None):
    """Unnormalised 2-D DFT over the last two axes (FFT layout)."""
    return torch.fft.fft2(x, out=out)


def inverse_fourier(field, out=None):
    """Unnormalised inverse 2-D DFT (no ``1 / M**2``; amplitudes carry it, see module doc)."""
    return torch.fft.ifft2(field, norm="forward", out=out)


def squared_modulus(z):
    """``|z|**2`` of a complex64 tensor through its real view (``abs`` uses a slower ``hypot``)."""
    sq = torch.view_as_real(z).square()
    return torch.add(sq[..., 0], sq[..., 1])


def modulus_projection(field, amp, free=None):
    """Replace the modulus of a field by the measured one, in place.

    ``field <- field * amp / |field|`` on measured pixels; on free (unmeasured) pixels the field
    is only multiplied by its gain ``free``.

    Parameters
    ----------
    field : torch.Tensor, complex64, shape (B, M, M)
        Far field (modified in place).
    amp : torch.Tensor, float32, shape (B, M, M) or (M, M)
        Measured amplitudes, 0 on free pixels.
    free : torch.Tensor, float32, same shape as ``amp``, optional
        Gain of unmeasured pixels, 0 on measured ones: 1 leaves them unchanged; the engine
        passes ``1 / M**2`` to undo the unnormalised inverse transform (see the module doc).

    Returns
    -------
    field : the same tensor.
    mag2 : torch.Tensor, float32, ``|field|**2`` before the projection, shape (B, M, M)
        (plus ``_TINY``).
    """
    mag2 = squared_modulus(field).add_(_TINY)
    factor = torch.rsqrt(mag2).mul_(amp)
    if free is not None:
        factor.add_(free)
    field.mul_(factor)
    return field, mag2


def fourier_error(mag2, amp, measured=None, scale=1.0):
    """Relative Fourier-modulus error ``sum (|F| / scale - A)**2 / sum A**2`` per frame.

    A Fourier R-factor on the measured pixels: scale-free, ~0 at convergence on noise-free data.

    Parameters
    ----------
    mag2 : torch.Tensor, float32, (B, M, M)
        ``|F|**2`` of the current iterate (as returned by :func:`modulus_projection`).
    amp : torch.Tensor, float32
        Measured amplitudes (0 on free pixels).
    measured : torch.Tensor, float32, optional
        1 on measured pixels, 0 on free ones.
    scale : float
        ``|F|`` is divided by it first: the engine passes ``M * M``, since its amplitudes are
        stored pre-divided by the number of pixels (see the module doc).

    Returns
    -------
    torch.Tensor, float32, shape (B,)
    """
    d = torch.sqrt(mag2)
    if scale != 1.0:
        d.mul_(1.0 / float(scale))
    d.sub_(amp)
    if measured is not None:
        d.mul_(measured)
    num = d.square_().sum(dim=(-2, -1))
    den = amp.square().sum(dim=(-2, -1)).clamp_min(1e-30)
    return num / den


def er_update(x, y, support):
    """Error reduction: ``x <- y`` inside the support, 0 outside (in place).

    Parameters
    ----------
    x : torch.Tensor, complex64, (B, M, M)
        Current iterate, overwritten.
    y : torch.Tensor, complex64, (B, M, M)
        Its modulus projection.
    support : torch.Tensor, float32 or complex64, (B, M, M)
        1 inside the support, 0 outside (complex64 saves a conversion per call).
    """
    return torch.mul(y, support, out=x)


def hio_update(x, y, outside, beta=0.9):
    """Hybrid input-output (Fienup): ``y`` inside, ``x - beta * y`` outside (in place).

    Written as ``x <- y + outside * (x - (1 + beta) * y)``: three passes, no ``where``.

    Parameters
    ----------
    x, y : torch.Tensor, complex64, (B, M, M)
        Current iterate (overwritten) and its modulus projection.
    outside : torch.Tensor, float32 or complex64, (B, M, M)
        1 outside the support, 0 inside (complex64 saves a conversion per call).
    beta : float
        Feedback parameter.
    """
    xr, yr = torch.view_as_real(x), torch.view_as_real(y)
    xr.add_(yr, alpha=-(1.0 + beta))
    x.mul_(outside)
    xr.add_(yr)
    return x


def raar_update(x, y, outside, beta=0.9):
    """Relaxed averaged alternating reflections (Luke): ``y`` inside, ``beta x + (1 - 2 beta) y`` outside.

    Written as ``x <- y + outside * beta * (x - 2 y)`` (in place).

    Parameters
    ----------
    x, y : torch.Tensor, complex64, (B, M, M)
    outside : torch.Tensor, float32 or complex64, (B, M, M)
        1 outside the support, 0 inside (complex64 saves a conversion per call).
    beta : float
        Relaxation parameter.
    """
    xr, yr = torch.view_as_real(x), torch.view_as_real(y)
    xr.add_(yr, alpha=-2.0).mul_(beta)
    x.mul_(outside)
    xr.add_(yr)
    return x


def update(step, x, y, support, outside, beta):
    """Apply the named update (``"er"``, ``"hio"`` or ``"raar"``) in place."""
    if step == "er":
        return er_update(x, y, support)
    if step == "hio":
        return hio_update(x, y, outside, beta)
    if step == "raar":
        return raar_update(x, y, outside, beta)
    raise ValueError(f"unknown step {step!r}: use er, hio or raar")
