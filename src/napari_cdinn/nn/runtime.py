"""Device and precision choices shared by training and inference."""

from __future__ import annotations

import contextlib

import torch

from ..device import DEVICES, resolve_device

__all__ = ["DEVICES", "autocast", "bf16_supported", "resolve_device"]


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is fast on ``device`` (CPU with native bf16, or a bf16 GPU)."""
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return False


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast context on ``device`` when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
