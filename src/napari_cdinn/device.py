"""Compute devices, thread counts and machine facts shared by the engines, the CLI and the benchmarks.

Threads (docs/decisions.md, "Threads never exceed the free cores"): torch's intra-op threads
busy-wait for each other, so a job never runs more threads than there are *free* cores.
:func:`free_cores` counts them: the cores this process may use (CPU affinity, a cgroup CPU quota)
minus those other processes keep busy, measured from the kernel's per-CPU counters
(``/proc/stat``) over a short window with this process's own CPU time taken out (the 1-minute load
average stands in where there is no ``/proc/stat``).  :func:`apply_threads` is the one place that
sets torch's thread count: every ``cdinn`` command, the napari docks (which leave a core to the
viewer) and the dask chunk tasks call it.  No torch import here at module level.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass

from .checks import whole_number

__all__ = [
    "BUSY_FRACTION",
    "DEVICES",
    "CpuSample",
    "apply_threads",
    "busy_cores",
    "cpu_only",
    "cpu_sample",
    "default_threads",
    "device_name",
    "free_cores",
    "machine_info",
    "refresh_window",
    "resolve_device",
    "threads_applied",
    "usable_cores",
]

#: Device names accepted everywhere (``--device``, widget choices).
DEVICES = ("auto", "cpu", "cuda", "mps")
#: Device nodes of the GPU drivers torch can use on Linux: NVIDIA, NVIDIA under WSL2, AMD ROCm.
GPU_NODES = ("/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def cpu_only() -> bool:
    """Whether torch evidently has no device but the CPU here, told without importing torch.

    True on Linux without a GPU driver's device node (:data:`GPU_NODES`), or where the installed
    torch is a CPU build (its version ends in ``+cpu``); never on macOS (MPS).  False means "ask
    torch", not "there is a GPU".
    """
    if sys.platform == "darwin":
        return False
    if sys.platform.startswith("linux") and not any(os.path.exists(node) for node in GPU_NODES):
        return True
    from importlib import metadata

    try:
        return metadata.version("torch").endswith("+cpu")
    except metadata.PackageNotFoundError:
        return False


def device_name(name: str = "auto") -> str:
    """The device :func:`resolve_device` picks, as its name (``cpu``, ``cuda``, ``cuda:1``, ``mps``).

    torch is not imported where the answer is evidently the CPU: ``cpu`` (or ``cpu:0``), and
    ``auto`` on a machine :func:`cpu_only` tells has nothing else.  Raises ``ValueError`` as
    :func:`resolve_device` does.
    """
    if type(name).__module__.startswith("torch"):  # a torch.device
        return str(name)
    text = str(name or "auto").lower()
    if text in ("cpu", "cpu:0") or (text == "auto" and cpu_only()):
        return "cpu"
    return str(resolve_device(text))


def resolve_device(name: str = "auto"):
    """Turn a device name into a ``torch.device``, with one clear sentence when unavailable.

    ``auto`` picks CUDA, then Apple's MPS, then the CPU.  ``cuda:1`` style names are accepted;
    a ``torch.device`` passes through unchanged.

    Raises
    ------
    ValueError
        Unknown name, or a device that this machine does not have.
    """
    import torch

    if isinstance(name, torch.device):
        return name
    name = str(name or "auto").lower()
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    has_mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if has_mps else torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but no CUDA device is available")
    if kind == "mps" and not has_mps:
        raise ValueError("MPS was requested but no Apple MPS device is available")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}, or cuda:N") from None
    if kind == "cpu" and dev.index not in (None, 0):
        raise ValueError(f"unknown device {name!r}; the CPU is 'cpu'")
    if kind == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"there is no device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def machine_info(device=None) -> dict:
    """Name the machine (CPU model, cores, Python, NumPy, torch, fast bf16 on the CPU) and the device a
    figure came from: CPUs of one core count differ several-fold in speed."""
    import numpy as np

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        import torch

        from .nn.runtime import bf16_supported

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cpu_bf16"] = bf16_supported(torch.device("cpu"))
        dev = torch.device(device) if device is not None else None
        if dev is not None and dev.type == "cuda":
            info["device"] = torch.cuda.get_device_name(dev)
        elif dev is not None:
            info["device"] = dev.type
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return info


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------- threads
#: A core counts as busy when other processes used at least this fraction of it over the window.
BUSY_FRACTION = 0.5
#: Seconds of a fresh measurement of the per-CPU counters when no recent window is at hand.
SAMPLE_SECONDS = 0.05
#: A window longer than this (seconds) describes the past, not now: a fresh one is measured.
SAMPLE_MAX_AGE = 30.0


@dataclass(frozen=True)
class CpuSample:
    """The CPU counters at one moment (:func:`cpu_sample`); two of them make a window.

    Attributes
    ----------
    time : float
        ``time.monotonic()`` seconds.
    busy, total : dict of int to int, or None
        Per CPU of this process's affinity: non-idle and all clock ticks since boot (``/proc/stat``;
        idle and iowait are idle).  None where the system has no ``/proc/stat``.
    own : float
        CPU seconds this process has used, all its threads (``os.times``).
    """

    time: float
    busy: dict | None
    total: dict | None
    own: float


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (else ``os.cpu_count()``), bounded by a
    cgroup v2 CPU quota (``/sys/fs/cgroup/cpu.max``, rounded up) where one applies; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, quota)
    return max(1, int(cores))


def _cgroup_quota():
    """CPUs of this process's cgroup v2 quota (``quota period``, rounded up), or None (no quota, no file)."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as fh:
            quota, period = fh.read().split()[:2]
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # no file, "max" (no quota), garbled
        return None


def _affinity():
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def cpu_sample() -> CpuSample:
    """The per-CPU counters of this process's CPUs and its own CPU time, now (cheap: one file read)."""
    busy = total = None
    try:
        with open("/proc/stat") as fh:
            lines = fh.read().splitlines()
    except OSError:
        lines = []
    cpus = _affinity()
    for line in lines:
        head, _, rest = line.partition(" ")
        if not head.startswith("cpu") or head == "cpu":
            continue
        try:
            cpu, ticks = int(head[3:]), [int(t) for t in rest.split()]
        except ValueError:
            continue
        if cpus is not None and cpu not in cpus:
            continue
        if busy is None:
            busy, total = {}, {}
        # user nice system idle iowait irq softirq steal (guest time is already in user and nice)
        all_ticks = sum(ticks[:8])
        busy[cpu], total[cpu] = all_ticks - ticks[3] - (ticks[4] if len(ticks) > 4 else 0), all_ticks
    t = os.times()
    return CpuSample(time.monotonic(), busy, total, t.user + t.system)


def busy_cores(before: CpuSample, after: CpuSample, ticks_per_second: float | None = None) -> float:
    """Cores other processes kept busy between two samples, on average (this process's own use taken out).

    Parameters
    ----------
    before, after : CpuSample
        The window's ends (:func:`cpu_sample`), ``after`` the later.
    ticks_per_second : float, optional
        The kernel's clock ticks per second (default ``os.sysconf("SC_CLK_TCK")``).

    Returns
    -------
    float
        ``>= 0``.  From the per-CPU counters where both samples have them: the busy ticks of this
        process's CPUs, minus its own CPU time, over the window's length.  Elsewhere the 1-minute
        load average, minus this process's share of it (its CPU seconds over the last minute, at
        most 1 per second: an estimate), or 0 where there is no load average either.
    """
    if before.busy and after.busy:
        hz = ticks_per_second or os.sysconf("SC_CLK_TCK")
        cpus = set(before.busy) & set(after.busy)
        span = max(after.total[c] - before.total[c] for c in cpus) if cpus else 0
        if span <= 0:
            return 0.0
        others = sum(after.busy[c] - before.busy[c] for c in cpus) - (after.own - before.own) * hz
        return max(0.0, others / span)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return 0.0
    return max(0.0, load - min(after.own, 60.0) / 60.0)


_LOCK = threading.Lock()
_LAST: dict = {}  # the latest sample and the busy cores measured up to it; the count apply_threads set


def _measured_busy(since):
    """Busy cores over the window from ``since`` (else the latest sample, if recent) to now."""
    with _LOCK:
        last, busy = _LAST.get("sample"), _LAST.get("busy")
    now = time.monotonic()
    if since is None and last is not None and now - last.time < SAMPLE_SECONDS and busy is not None:
        return busy  # measured a moment ago
    start = since if since is not None else last
    if start is None or now - start.time > SAMPLE_MAX_AGE:
        start = cpu_sample()
    wait = SAMPLE_SECONDS - (time.monotonic() - start.time)
    if wait > 0:
        time.sleep(wait)
    end = cpu_sample()
    busy = busy_cores(start, end)
    with _LOCK:
        _LAST.update(sample=end, busy=busy)
    return busy


def free_cores(leave: int = 0, *, since: CpuSample | None = None, busy: float | None = None) -> int:
    """Cores a job may use now: the usable cores minus the busy ones and ``leave``, at least 1.

    Parameters
    ----------
    leave : int, optional
        Cores to leave to something else of this process (the napari docks leave 1 to the viewer).
    since : CpuSample, optional
        The start of the window over which other processes' use is averaged (the ``cdinn`` command
        passes the sample taken when it started, so its imports are the window); default: the
        latest window of this process if it is at most :data:`SAMPLE_MAX_AGE` old, else a fresh
        :data:`SAMPLE_SECONDS` one.  A window is never shorter than :data:`SAMPLE_SECONDS`.
    busy : float, optional
        Busy cores, measured already (:func:`busy_cores`); skips the measurement.

    Returns
    -------
    int
        ``max(1, min(quota, affinity - busy) - leave)``: cores of the CPU affinity minus those that
        other processes keep at least :data:`BUSY_FRACTION` busy (from :func:`busy_cores`), bounded
        by a cgroup CPU quota (other tenants' use does not take it), minus ``leave``.
    """
    leave = whole_number(leave, "leave", 0, what="a whole number of cores >= 0")
    if busy is None:
        busy = _measured_busy(since)
    affinity = _affinity()
    cores = len(affinity) if affinity is not None else usable_cores()
    taken = int(math.floor(float(busy) + 1.0 - BUSY_FRACTION))
    return max(1, min(usable_cores(), cores - max(0, taken)) - int(leave))


def _env_threads():
    """``OMP_NUM_THREADS`` as a positive int where it is set so (an explicit choice), else None."""
    try:
        value = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return value if value > 0 else None


def apply_threads(threads: int | None = None, *, leave: int = 0, since: CpuSample | None = None) -> int:
    """Set torch's intra-op thread count for this process and return it; the one place that does.

    Parameters
    ----------
    threads : int, optional
        An explicit count (``--threads N``): at least 1 and at most :func:`usable_cores`.  Default:
        ``OMP_NUM_THREADS`` where set (bounded by the usable cores), else :func:`free_cores`
        ``(leave, since=since)``.
    leave, since
        See :func:`free_cores` (used only for the default).

    Raises
    ------
    ValueError
        ``threads`` is not a whole number from 1 to the usable cores.
    """
    import torch  # before the measurement: a command's torch import is part of its window

    usable = usable_cores()
    if threads is None:
        env = _env_threads()
        threads = min(env, usable) if env is not None else free_cores(leave, since=since)
    elif whole_number(threads, "threads", 1) > usable:
        raise ValueError(f"{int(threads)} threads are more than the {usable} core(s) this process may use")
    threads = int(threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    with _LOCK:
        _LAST["applied"] = threads
    return threads


def default_threads() -> int:
    """The thread count of a job given none: the last :func:`apply_threads` count of this process,
    else :func:`free_cores` (library calls that no command or dock set up)."""
    with _LOCK:
        applied = _LAST.get("applied")
    return applied if applied is not None else free_cores()


@contextlib.contextmanager
def threads_applied(threads: int | None = None, *, leave: int = 0, since: CpuSample | None = None):
    """:func:`apply_threads` inside the block (it yields the count); torch's previous count, and
    :func:`default_threads`'s, come back after it (a command run in-process, a dock's job)."""
    import torch

    before = torch.get_num_threads()
    with _LOCK:
        applied = _LAST.get("applied")
    try:
        yield apply_threads(threads, leave=leave, since=since)
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
        with _LOCK:
            _LAST["applied"] = applied


def refresh_window(max_age: float = 10.0) -> None:
    """Start a new measurement window when the latest is older than ``max_age`` seconds (one file read).

    A napari dock calls it on a timer, so that a job it starts finds a recent window of at least
    :data:`SAMPLE_SECONDS` and never waits for a fresh one (:func:`free_cores`).
    """
    with _LOCK:
        last = _LAST.get("sample")
    if last is None or time.monotonic() - last.time > max_age:
        sample = cpu_sample()
        with _LOCK:
            _LAST.update(sample=sample, busy=None)
