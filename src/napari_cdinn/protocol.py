"""The default iterative protocol of every face, and when a pattern gets another start.

:func:`napari_cdinn.retrieval.reconstruct`, ``cdinn reconstruct`` and the retrieval dock take their
defaults from here, so the three run the same protocol.  Nothing here imports torch or NumPy at
import time: the command line builds its parser and the dock its widgets from these values
without loading the engine.

Restarts that pay
-----------------
Every pattern gets one run of :data:`ITERATIONS` iterations of the paper's HIO/ER cycles with
shrinkwrap from random phases; a pattern gets another run (new random phases, the same schedule),
up to :data:`STARTS` in all, only while its best fit still misfits the data beyond what counting
noise explains (:func:`needs_restart`)::

    chi2 - chi2_noise > max(RESTART_CHI2, RESTART_NOISE * chi2_noise)

``chi2_noise`` is the chi^2 that counting noise alone gives the true pattern
(:func:`napari_cdinn.physics.noise_chi2`: about ``1 / photons`` per frame; 0 for data that are not
counts).  A rule on ``chi2`` alone restarts every noisy frame, whose chi^2 never falls below its
noise; the relative term leaves the frames whose misfit is a small part of their noise.  The run
with the lowest chi^2 is kept.  Measured on the held-out sets against the paper's single
620-iteration run: ``benchmarks/README.md`` ("Restarts") and docs/decisions.md ("Restarts that
pay").
"""

from __future__ import annotations

__all__ = ["ITERATIONS", "RESTART_CHI2", "RESTART_NOISE", "STARTS", "needs_restart", "restart_limit"]

#: Iterations of every run of the default protocol (HIO x80 / ER x20 cycles, the last 20 ER averaged).
ITERATIONS = 400
#: Runs per pattern at most; the second and later only where :func:`needs_restart` says so.
STARTS = 3
#: A pattern is started again while its misfit beyond the counting noise is above this...
RESTART_CHI2 = 3e-4
#: ...and above this fraction of its counting noise's chi^2.
RESTART_NOISE = 0.2
#: The HIO/RAAR feedback ``beta`` lies in (0, BETA_MAX) (``cdinn reconstruct --beta`` and
#: :func:`napari_cdinn.retrieval.reconstruct` refuse other values).
BETA_MAX = 2.0


def restart_limit(chi2_noise, threshold=RESTART_CHI2, relative=RESTART_NOISE):
    """The misfit beyond the counting noise above which a pattern is started again.

    Parameters
    ----------
    chi2_noise : array_like of float, (N,)
        The chi^2 counting noise alone gives each pattern (:func:`napari_cdinn.physics.noise_chi2`;
        0 for data that are not counts).
    threshold : float
        Absolute part: the limit of patterns without counting noise.
    relative : float
        Relative part: a fraction of ``chi2_noise``.

    Returns
    -------
    ndarray of float64, (N,): ``max(threshold, relative * chi2_noise)``.
    """
    import numpy as np

    return np.maximum(float(threshold), float(relative) * np.asarray(chi2_noise, dtype=np.float64))


def needs_restart(chi2, chi2_noise=0.0, threshold=RESTART_CHI2, relative=RESTART_NOISE):
    """Which patterns get another start: those whose fit misfits the data beyond the counting noise.

    Parameters
    ----------
    chi2 : array_like of float, (N,)
        Each pattern's best chi^2 so far (:func:`napari_cdinn.physics.chi2`, on measured pixels).
    chi2_noise : array_like of float, (N,) or scalar
        The chi^2 counting noise alone gives each pattern (0: no counting noise).
    threshold, relative : float
        :func:`restart_limit`.

    Returns
    -------
    ndarray of bool, (N,): ``chi2 - chi2_noise > max(threshold, relative * chi2_noise)``; a NaN
    chi^2 (a run that did not finish) is restarted.
    """
    import numpy as np

    chi2 = np.asarray(chi2, dtype=np.float64).reshape(-1)
    noise = np.broadcast_to(np.asarray(chi2_noise, dtype=np.float64).reshape(-1), chi2.shape)
    return ~(chi2 - noise <= restart_limit(noise, threshold, relative))
