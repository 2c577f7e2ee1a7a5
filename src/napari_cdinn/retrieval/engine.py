"""The batched iteration loop: a schedule of updates with shrinkwrap, averaging, progress and stop.

:func:`iterate` works on tensors already on the device, in the FFT layout of :mod:`.steps`;
:func:`napari_cdinn.retrieval.reconstruct` prepares them from NumPy stacks and finishes the
results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..jobs import Cancelled, stop_requested
from . import steps as st
from .schedule import expand_schedule
from .support import shrinkwrap, shrinkwrap_sigma

# ``Cancelled`` and ``stop_requested`` live in :mod:`napari_cdinn.jobs`; re-exported for older imports
__all__ = ["Cancelled", "Shrinkwrap", "align_global_phase", "iterate", "stop_requested"]


@dataclass
class Shrinkwrap:
    """Shrinkwrap settings.

    Attributes
    ----------
    every : int
        Update the support every ``every`` iterations (0 disables shrinkwrap).
    sigma_start, sigma_end : float
        Blur width (pixels), shrinking linearly over the shrinkwrap window.
    threshold : float
        Relative threshold on the blurred modulus.
    stop_before_end : int
        No support update during the last ``stop_before_end`` iterations (the averaged tail).
    """

    every: int = 20
    sigma_start: float = 3.0
    sigma_end: float = 1.0
    threshold: float = 0.15
    stop_before_end: int = 20

    def due(self, iteration, total):
        """Whether the support is updated after ``iteration`` (0-based) of ``total``."""
        done = iteration + 1
        return self.every > 0 and done % self.every == 0 and done <= total - self.stop_before_end

    def sigma(self, iteration, total):
        """Blur width after ``iteration``."""
        return shrinkwrap_sigma(iteration + 1, max(total - self.stop_before_end, 1), self.sigma_start, self.sigma_end)


def align_global_phase(estimate, reference):
    """Multiply each frame of ``estimate`` by the unit constant that best matches ``reference``.

    Parameters
    ----------
    estimate, reference : torch.Tensor, complex64, (B, M, M)

    Returns
    -------
    torch.Tensor, the aligned estimate (a new tensor).
    """
    c = (reference * estimate.conj()).sum(dim=(-2, -1))
    c = c / c.abs().clamp_min(1e-30)
    return estimate * c[:, None, None]


@dataclass
class _Outcome:
    estimate: torch.Tensor
    support: torch.Tensor
    errors: list = field(default_factory=list)
    error_iterations: list = field(default_factory=list)
    iterations: int = 0
    stopped: bool = False


def iterate(
    x,
    amp,
    support,
    schedule,
    *,
    beta=0.9,
    free=None,
    shrink=None,
    average=20,
    block=20,
    error_every=10,
    progress=None,
    should_stop=None,
    snapshot=None,
):
    """Run a schedule of updates on a batch.

    Parameters
    ----------
    x : torch.Tensor, complex64, (B, M, M)
        Starting iterate in FFT layout (modified in place).
    amp : torch.Tensor, float32, (B, M, M)
        Measured amplitudes divided by ``M * M``, 0 on unmeasured pixels.
    support : torch.Tensor, float32, (B, M, M)
        Initial support (1 inside).
    schedule : list of (str, int)
        Updates to run (:mod:`.schedule`).
    beta : float
        HIO / RAAR parameter.
    free : torch.Tensor, float32, optional
        1 on unmeasured pixels (left free by the modulus projection).
    shrink : Shrinkwrap or None
        Support updates; None keeps the support fixed.
    average : int
        Number of final iterations whose estimates (support-projected modulus projections) are
        averaged after aligning their global phase.
    block : int
        Iterations between calls of ``progress`` and checks of ``should_stop``.
    error_every : int
        Record the Fourier error every ``error_every`` iterations (and at the last one).
    progress : callable(int), optional
        Called after every block with the number of iterations done.
    should_stop : callable or threading.Event, optional
        Checked after every block; when set, the loop ends early (``stopped`` is True).
    snapshot : callable(estimate, support), optional
        Called after every block with the current estimate (the modulus projection inside the
        support, FFT layout) and support, for live display.  The tensors must not be modified.

    Returns
    -------
    _Outcome with ``estimate`` (B, M, M) complex64, ``support`` (B, M, M) float32, ``errors``
    (list of (B,) tensors), ``error_iterations``, ``iterations`` and ``stopped``.
    """
    plan = expand_schedule(schedule)
    total = len(plan)
    average = min(max(int(average), 0), total)
    measured = None if free is None else 1.0 - free
    # the inverse transform is unnormalised: free pixels keep their value through a gain 1 / M**2
    free_gain = None if free is None else free / float(x.shape[-2] * x.shape[-1])
    # the masks as complex64 once per support: a complex tensor times a float one converts the
    # float one on every call (a copy per update), a complex product does not
    inside, outside = _complex_masks(support)
    acc = None
    n_acc = 0
    out = _Outcome(estimate=x, support=support)
    block = max(int(block), 1)
    error_every = max(int(error_every), 1)
    estimate = x
    for it, step in enumerate(plan):
        field = st.fourier(x)  # a new tensor: with ``out=`` torch computes into a temporary and copies
        _, mag2 = st.modulus_projection(field, amp, free_gain)
        if (it + 1) % error_every == 0 or it + 1 == total:
            out.errors.append(st.fourier_error(mag2, amp, measured, scale=float(x.shape[-2] * x.shape[-1])))
            out.error_iterations.append(it + 1)
        y = st.inverse_fourier(field)
        st.update(step, x, y, inside, outside, beta)
        if it >= total - average or (shrink is not None and shrink.due(it, total)):
            estimate = x if step == "er" else y * inside
        if it >= total - average:
            if acc is None:
                acc = estimate.clone()
            else:
                acc.add_(align_global_phase(estimate, acc))
            n_acc += 1
        if shrink is not None and shrink.due(it, total):
            support = shrinkwrap(estimate, shrink.sigma(it, total), shrink.threshold)
            inside, outside = _complex_masks(support)
        out.iterations = it + 1
        if (it + 1) % block == 0 or it + 1 == total:
            if progress is not None:
                progress(it + 1)
            if snapshot is not None:
                snapshot(y * inside, support)
            if it + 1 < total and stop_requested(should_stop):
                out.stopped = True
                break
    if acc is not None:
        out.estimate = acc.div_(n_acc)
    else:
        out.estimate = x * inside if plan and plan[out.iterations - 1] == "er" else y * inside
    out.support = support
    return out


def _complex_masks(support):
    """``(inside, outside)``: the support (1 inside) and its complement as complex64 tensors."""
    inside = support.to(torch.complex64)
    return inside, 1.0 - inside
