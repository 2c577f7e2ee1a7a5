"""Checks of the arguments the Python API shares: a bad value is one ``ValueError`` sentence.

The command line checks its options with argparse types; functions that scripts call check their
arguments here, so that a NaN, a fraction where a count is meant or a float mask never runs as
something else (docs/bad_input.md lists what each function refuses).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["check_mask_layout", "number_in", "whole_number"]


def whole_number(value, name, minimum=0, maximum=None, what=None):
    """``value`` as an ``int`` from ``minimum`` to ``maximum``, else ``ValueError``.

    Parameters
    ----------
    value : int-like
        Whole numbers given as floats (``4.0``) are accepted; ``True``/``False``, fractions, NaN
        and text are not.
    name : str
        Argument name, for the message.
    minimum, maximum : int, optional
        Inclusive bounds (``maximum`` None: no upper bound).
    what : str, optional
        What is expected, for the message (default: "a whole number >= minimum", or "from ... to ...").

    Returns
    -------
    int
    """
    if what is None:
        what = f"a whole number >= {minimum}" if maximum is None else f"a whole number from {minimum} to {maximum}"
    ok = not isinstance(value, (bool, np.bool_, str, bytes))
    if ok:
        try:
            number = int(value) if isinstance(value, (int, np.integer)) else float(value)
        except (TypeError, ValueError, OverflowError):
            ok = False
        else:
            ok = isinstance(number, int) or (math.isfinite(number) and number.is_integer())
    if ok:
        number = int(number)
        ok = number >= minimum and (maximum is None or number <= maximum)
    if not ok:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return number


def number_in(value, name, low, high, *, low_inclusive=False, high_inclusive=False, what=None):
    """``value`` as a finite ``float`` between ``low`` and ``high``, else ``ValueError``.

    The bounds are open unless ``low_inclusive`` / ``high_inclusive``; ``what`` overrides the
    expected range written in the message (default: "a number in (low, high)").
    """
    if what is None:
        what = f"a number in {'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
    ok = not isinstance(value, (bool, np.bool_, str, bytes))
    if ok:
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            ok = False
    if ok:  # NaN fails every comparison
        ok = (number >= low if low_inclusive else number > low) and (number <= high if high_inclusive else number < high)
    if not ok:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return number


def check_mask_layout(mask, shape, what="the mask", meaning="True/1 = unmeasured"):
    """Raise ``ValueError`` unless ``mask`` holds flags for one frame or for every frame of ``shape``.

    Only ``dtype`` and ``shape`` are read, so a lazy array (an h5py data set) is checked before
    it is loaded.

    Parameters
    ----------
    mask : array_like
        Booleans or integers (0 = False): a float mask is refused, since 0.5 would mean True.
    shape : tuple of int
        The patterns' shape, ``(H, W)`` or ``(N, H, W)``.
    what : str
        The mask's name in the message.
    meaning : str
        What True means, for the message.

    Returns
    -------
    tuple of int
        The mask's shape, either ``(H, W)`` or ``(N, H, W)``.
    """
    if not hasattr(mask, "dtype") or not hasattr(mask, "shape"):
        mask = np.asarray(mask)
    dtype = np.dtype(mask.dtype)
    if dtype.kind not in "bui":
        raise ValueError(f"{what} must hold booleans or integers ({meaning}), got {dtype}")
    shape = tuple(int(s) for s in shape)
    frame = shape[-2:]
    stack = ((shape[0] if len(shape) == 3 else 1),) + frame
    got = tuple(int(s) for s in mask.shape)
    if got not in (frame, stack):
        raise ValueError(f"{what} must be shaped {frame} or {stack} like the patterns, got {got}")
    return got
