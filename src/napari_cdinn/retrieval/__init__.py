"""Batched iterative phase retrieval (ER, HIO, RAAR with shrinkwrap) on torch tensors.

No Qt or napari import.  The building blocks are small composable steps:

* :mod:`.steps` -- modulus projection and the ER / HIO / RAAR updates (in place, FFT layout);
* :mod:`.support` -- autocorrelation support, Gaussian blur, shrinkwrap;
* :mod:`.schedule` -- one-line schedules such as ``"(hio:80, er:20) x6, er:20"``;
* :mod:`.engine` -- the batched loop with averaging, progress and cancellation;
* :func:`reconstruct` -- NumPy stacks in, centred and phase-normalised objects out.

This package never imports :mod:`napari_cdinn.nn`: what uses both (the network's guess as a
start) is in :mod:`napari_cdinn.pipelines`.
"""

from ..device import resolve_device
from ..jobs import Cancelled
from .api import (
    default_batch_size,
    make_schedule,
    reconstruct,
    reconstruct_chunk,
)
from .engine import Shrinkwrap, iterate
from .schedule import ALGORITHMS, STEPS, default_schedule, parse_schedule

__all__ = [
    "ALGORITHMS",
    "STEPS",
    "Cancelled",
    "Shrinkwrap",
    "default_batch_size",
    "default_schedule",
    "iterate",
    "make_schedule",
    "parse_schedule",
    "reconstruct",
    "reconstruct_chunk",
    "resolve_device",
]
