"""Iteration schedules: which update runs at which iteration.

A schedule is a list of ``(step, count)`` pairs, ``step`` one of :data:`STEPS`.  It can be
written as one line of text::

    "(hio:80, er:20) x6, er:20"      # HIO x80 then ER x20, six times, then ER x20
    "raar:600 er:20"                 # commas and spaces both separate items
    "er"                             # a count of 1

Groups in parentheses may be repeated with ``xN`` (or ``*N``) and nested.
"""

from __future__ import annotations

import re

__all__ = ["ALGORITHMS", "STEPS", "default_schedule", "expand_schedule", "parse_schedule", "schedule_length"]

#: Update rules the engine knows.
STEPS = ("er", "hio", "raar")

#: Named protocols accepted by :func:`default_schedule` (and ``reconstruct(algorithm=...)``).
ALGORITHMS = ("hio-er", "er", "hio", "raar")

_TOKEN = re.compile(r"\s*(?:(\()|(\))\s*(?:[x*]\s*(\d+))?|([A-Za-z]+)\s*(?:[:x*]\s*(\d+))?|(,))")


def parse_schedule(text):
    """Parse a one-line schedule into a flat list of ``(step, count)`` pairs.

    Parameters
    ----------
    text : str or sequence of (str, int)
        For example ``"(hio:80, er:20) x6, er:20"``; a list of pairs is validated and returned.

    Returns
    -------
    list of (str, int)

    Raises
    ------
    ValueError
        On an unknown step, a bad count or unbalanced parentheses (one sentence).
    """
    if not isinstance(text, str):
        out = []
        for item in text:
            step, count = item
            step = str(step).lower()
            if step not in STEPS or int(count) < 0:
                raise ValueError(f"bad schedule item {item!r}: use (er|hio|raar, count >= 0)")
            if int(count):
                out.append((step, int(count)))
        return _merge(out)
    stack = [[]]
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot read the schedule {text!r} at {text[pos:]!r}")
        pos = m.end()
        opening, closing, repeat, name, count, _comma = m.groups()
        if opening:
            stack.append([])
        elif closing:
            if len(stack) == 1:
                raise ValueError(f"unbalanced ')' in the schedule {text!r}")
            group = stack.pop()
            stack[-1].extend(group * (int(repeat) if repeat else 1))
        elif name:
            step = name.lower()
            if step not in STEPS:
                raise ValueError(f"unknown step {name!r} in the schedule {text!r}: use er, hio or raar")
            n = int(count) if count else 1
            if n:
                stack[-1].append((step, n))
    if len(stack) != 1:
        raise ValueError(f"unbalanced '(' in the schedule {text!r}")
    return _merge(stack[0])


def _merge(pairs):
    """Merge neighbouring pairs of the same step."""
    out = []
    for step, n in pairs:
        if out and out[-1][0] == step:
            out[-1] = (step, out[-1][1] + n)
        else:
            out.append((step, n))
    return out


def default_schedule(algorithm="hio-er", iterations=620, average=20, cycle=(80, 20)):
    """The schedule of a named protocol.

    Parameters
    ----------
    algorithm : str
        ``"hio-er"`` (the paper: HIO x80 / ER x20 cycles, then ER for the averaged tail),
        ``"er"``, ``"hio"`` or ``"raar"`` (that step throughout).
    iterations : int
        Total number of iterations.
    average : int
        Length of the final tail whose estimates are averaged; ``hio-er`` ends with ER there.
    cycle : (int, int)
        HIO and ER counts of one ``hio-er`` cycle.

    Returns
    -------
    list of (str, int), summing to ``iterations``.
    """
    iterations = int(iterations)
    if iterations < 1:
        raise ValueError("iterations must be at least 1")
    name = str(algorithm).lower()
    if name in STEPS:
        return [(name, iterations)]
    if name != "hio-er":
        raise ValueError(f"unknown algorithm {algorithm!r}: use hio-er, er, hio or raar")
    tail = min(max(int(average), 0), iterations)
    body = iterations - tail
    n_hio, n_er = cycle
    pairs = []
    while body > 0:
        h = min(n_hio, body)
        pairs.append(("hio", h))
        body -= h
        e = min(n_er, body)
        if e:
            pairs.append(("er", e))
            body -= e
    if tail:
        pairs.append(("er", tail))
    return _merge(pairs)


def schedule_length(pairs):
    """Total number of iterations of a schedule."""
    return sum(n for _, n in pairs)


def expand_schedule(pairs):
    """One step name per iteration (a list as long as the schedule)."""
    out = []
    for step, n in pairs:
        out.extend([step] * n)
    return out
