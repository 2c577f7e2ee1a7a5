"""Stopping and typed progress events, shared by every long job (no Qt, no napari, no torch).

Every long call of the core (retrieval, training, streaming a stack) takes a *stop flag*: a
``threading.Event``, a callable returning True to stop, or None.  :func:`stop_requested` reads
any of them.  A job that ends early raises :class:`Cancelled`, carrying how much work was done.

Progress is one dataclass, :class:`ProgressEvent`, whose :class:`Kind` says what happened and
whose ``payload`` carries results for live display.  The trainer sends such events to its
``callback``; the retrieval engine and the stack loop keep the plain ``progress(done, total)``
callbacks of their public API, and :func:`progress_events` turns an event listener (a dock, the
command line's progress bar) into such a callback.  :class:`PartsProgress` sums the counts of
parts that run side by side (batches on worker threads) into one ``progress(done, total)``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = [
    "Cancelled",
    "Kind",
    "PartsProgress",
    "ProgressEvent",
    "check_stop",
    "progress_events",
    "stop_requested",
]

#: What asks a job to stop: a ``threading.Event``, a callable returning a bool, or None (never).
StopFlag = threading.Event | Callable[[], bool] | None


def stop_requested(stop: StopFlag) -> bool:
    """True when ``stop`` (a ``threading.Event``, a callable returning a bool, or None) asks for a stop."""
    if stop is None:
        return False
    is_set = getattr(stop, "is_set", None)
    if is_set is not None:
        return bool(is_set())
    return bool(stop())


class Cancelled(RuntimeError):
    """A long job stopped because its stop flag was set.

    Parameters
    ----------
    message : str, optional
        One sentence (default: says how much work was done).
    done : int
        Work completed when the stop was seen, in the job's unit (iterations of the running
        batch for the retrieval engine, frames for a stack).
    unit : str
        The unit of ``done``, for the default message.

    Attributes
    ----------
    done : int
    iterations : int
        ``done``, under the retrieval engine's older name.
    """

    def __init__(self, message: str | None = None, *, done: int = 0, unit: str = "steps"):
        super().__init__(message or f"stopped after {done} {unit}")
        self.done = done

    @property
    def iterations(self) -> int:
        return self.done


def check_stop(stop: StopFlag, done: int = 0, message: str | None = None, unit: str = "steps") -> None:
    """Raise :class:`Cancelled` (with ``done``) when ``stop`` asks for a stop (:func:`stop_requested`)."""
    if stop_requested(stop):
        raise Cancelled(message, done=done, unit=unit)


class Kind(Enum):
    """What a :class:`ProgressEvent` reports."""

    #: The job started (``total`` known).
    START = "start"
    #: Work done so far (``done`` of ``total``).
    PROGRESS = "progress"
    #: Live, unfinished estimates for display (``payload``: the frames and their current arrays).
    SNAPSHOT = "snapshot"
    #: A finished piece of the results (``payload``: the piece's arrays and where they go).
    CHUNK = "chunk"
    #: A checkpoint was written (training).
    CHECKPOINT = "checkpoint"
    #: The job finished.
    DONE = "done"
    #: The job stopped early on request; what was done is kept.
    STOPPED = "stopped"


@dataclass(frozen=True)
class ProgressEvent(Mapping):
    """One typed progress event of a long job.

    Attributes
    ----------
    kind : Kind
    done, total : float
        Work done and planned, in the job's unit (frames, iterations, examples).
    message : str
        A short status text, or "".
    payload : dict
        Results that come with the event (arrays of a finished chunk, live estimates...).

    The event also reads as a read-only mapping: ``event["kind"]`` is the kind's value (a str),
    ``event["done"]``, ``event["total"]`` and ``event["message"]`` the fields, any other key the
    payload's (the dict messages the docks used before).
    """

    kind: Kind = Kind.PROGRESS
    done: float = 0
    total: float = 0
    message: str = ""
    payload: dict = field(default_factory=dict)

    __hash__ = None  # a mapping with a dict inside: not hashable
    _FIELDS = ("kind", "done", "total", "message")

    @property
    def fraction(self) -> float:
        """``done / total`` (0 when nothing is planned)."""
        return float(self.done) / float(self.total) if self.total else 0.0

    def __getitem__(self, key: str) -> Any:
        if key == "kind":
            return self.kind.value
        if key in self._FIELDS:
            return getattr(self, key)
        return self.payload[key]

    def __iter__(self):
        yield from self._FIELDS
        yield from (k for k in self.payload if k not in self._FIELDS)

    def __len__(self) -> int:
        return len(self._FIELDS) + sum(k not in self._FIELDS for k in self.payload)


def progress_events(listener: Callable[[ProgressEvent], Any], kind: Kind = Kind.PROGRESS, *, offset: float = 0,
                    scale: float = 1, total: float | None = None, **payload) -> Callable[[float, float], None]:
    """A ``progress(done, total)`` callback that sends ``listener`` a :class:`ProgressEvent` per call.

    ``done`` is reported as ``offset + scale * done`` and ``total`` replaced by ``total`` when
    given: a part of a larger job (a chunk of a stack, iterations mapped to frames) reports in
    the job's unit.  ``payload`` goes with every event.
    """

    def report(done, part_total):
        listener(ProgressEvent(kind, offset + scale * done, part_total if total is None else total,
                               payload=dict(payload)))

    return report


class PartsProgress:
    """Sums the counts of parts that run side by side into one ``callback(done, total)``.

    ``total`` is ``planned parts x units per part``; :meth:`plan` adds parts as they are
    scheduled.  Thread-safe: parts running on worker threads report through :meth:`reporter`.
    """

    def __init__(self, callback: Callable[[float, float], Any] | None, units: int):
        self.callback, self.units = callback, units
        self.planned = 0
        self.done: dict = {}
        self.lock = threading.Lock()

    def plan(self, parts: int) -> None:
        """Schedule ``parts`` more parts."""
        self.planned += parts

    def reporter(self, key: Any) -> Callable[[float], None]:
        """A ``progress(done)`` callable for the part ``key`` (its units done so far)."""

        def report(done):
            with self.lock:
                self.done[key] = done
                if self.callback is not None:
                    self.callback(sum(self.done.values()), self.planned * self.units)

        return report
