"""Choice of the torch device for the retrieval engine."""

from __future__ import annotations

__all__ = ["resolve_device"]

_NAMES = ("auto", "cpu", "cuda", "mps")


def _mps_available(torch) -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device="auto"):
    """Turn a device name into a ``torch.device``.

    Parameters
    ----------
    device : str or torch.device
        ``"auto"`` (CUDA if available, else MPS, else CPU), ``"cpu"``, ``"cuda"``,
        ``"cuda:N"``, ``"mps"`` or a ``torch.device``.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        For an unknown name, or a device that this machine does not have.
    """
    import torch

    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = str(device).strip().lower()
    base = name.split(":")[0]
    if base not in _NAMES:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or mps")
    if base == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available(torch):
            return torch.device("mps")
        return torch.device("cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but no CUDA device is available")
    if base == "mps" and not _mps_available(torch):
        raise ValueError("MPS was requested but no MPS device is available")
    return torch.device(name)
