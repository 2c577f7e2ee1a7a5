"""Support estimation: thresholded autocorrelation and shrinkwrap (batched torch).

Every function takes and returns ``(B, M, M)`` tensors in the unshifted FFT layout used by
:mod:`.steps`; Gaussian blurs are circular and computed by FFT, so the layout does not matter.
"""

from __future__ import annotations

import math

import torch

from .steps import squared_modulus

__all__ = [
    "autocorrelation_support",
    "gaussian_blur",
    "gaussian_transfer",
    "shrinkwrap",
    "shrinkwrap_sigma",
    "threshold_support",
]


def gaussian_transfer(shape, sigma, device=None):
    """Fourier transfer function of a circular Gaussian blur for :func:`torch.fft.rfft2`.

    Parameters
    ----------
    shape : (int, int)
        Real-space frame shape ``(H, W)``.
    sigma : float
        Standard deviation in pixels (0 gives the identity).
    device : torch.device, optional

    Returns
    -------
    torch.Tensor, float32, shape (H, W // 2 + 1)
    """
    h, w = shape
    ky = torch.fft.fftfreq(h, device=device)[:, None]
    kx = torch.fft.rfftfreq(w, device=device)[None, :]
    return torch.exp(-2.0 * math.pi**2 * float(sigma) ** 2 * (ky * ky + kx * kx)).float()


def gaussian_blur(image, sigma):
    """Circular Gaussian blur of real ``(..., H, W)`` images.

    Parameters
    ----------
    image : torch.Tensor, float32
    sigma : float
        Standard deviation in pixels.

    Returns
    -------
    torch.Tensor, float32, same shape.
    """
    if sigma <= 0:
        return image.clone()
    shape = image.shape[-2:]
    spec = torch.fft.rfft2(image)
    spec.mul_(gaussian_transfer(shape, sigma, image.device))
    return torch.fft.irfft2(spec, s=shape)


def threshold_support(image, threshold):
    """Pixels above ``threshold`` times the per-frame maximum, as a float 0/1 tensor.

    Parameters
    ----------
    image : torch.Tensor, float32, (B, H, W)
        Non-negative map (blurred amplitude, autocorrelation).
    threshold : float
        Relative threshold in (0, 1).

    Returns
    -------
    torch.Tensor, float32, (B, H, W)
    """
    peak = image.amax(dim=(-2, -1), keepdim=True)
    return (image > threshold * peak).float()


def autocorrelation_support(intensity, threshold=0.04, sigma=1.0):
    """Initial support from the thresholded autocorrelation of the object.

    The inverse transform of the intensity is the object's autocorrelation, whose support
    contains every difference of two object points: a safe, loose first support.

    Parameters
    ----------
    intensity : torch.Tensor, float32, (B, M, M)
        Intensities in FFT layout (unmeasured pixels 0).
    threshold : float
        Relative threshold on the blurred autocorrelation modulus.
    sigma : float
        Blur (pixels) applied before thresholding.

    Returns
    -------
    torch.Tensor, float32, (B, M, M), 1 inside.
    """
    auto = torch.fft.ifft2(intensity.to(torch.complex64)).abs()
    return threshold_support(gaussian_blur(auto, sigma), threshold)


def shrinkwrap(estimate, sigma, threshold=0.15):
    """Shrinkwrap (Marchesini et al. 2003): threshold the blurred modulus of the estimate.

    Parameters
    ----------
    estimate : torch.Tensor, complex64, (B, M, M)
        Current object estimate (support-projected).
    sigma : float
        Blur in pixels.
    threshold : float
        Relative threshold on the blurred modulus.

    Returns
    -------
    torch.Tensor, float32, (B, M, M), the new support (1 inside).
    """
    return threshold_support(gaussian_blur(squared_modulus(estimate).sqrt_(), sigma), threshold)


def shrinkwrap_sigma(iteration, last, sigma_start=3.0, sigma_end=1.0):
    """Blur width at ``iteration``: linear from ``sigma_start`` at 0 to ``sigma_end`` at ``last``."""
    if last <= 0:
        return float(sigma_end)
    t = min(max(iteration / last, 0.0), 1.0)
    return float(sigma_start + (sigma_end - sigma_start) * t)
