"""Compute devices and machine facts shared by the engines, the CLI and the benchmarks."""

from __future__ import annotations

import os
import platform

__all__ = ["DEVICES", "machine_info", "resolve_device"]

#: Device names accepted everywhere (``--device``, widget choices).
DEVICES = ("auto", "cpu", "cuda", "mps")


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
    """Name the machine (CPU, cores, Python, NumPy, torch) and the device a figure came from."""
    import numpy as np

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        dev = torch.device(device) if device is not None else None
        if dev is not None and dev.type == "cuda":
            info["device"] = torch.cuda.get_device_name(dev)
        elif dev is not None:
            info["device"] = dev.type
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return info
