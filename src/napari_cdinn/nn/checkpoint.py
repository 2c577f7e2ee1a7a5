"""Saving and loading network weights as safetensors (never pickle) with a JSON card beside.

A model file ``NAME.safetensors`` holds the state dict (float32) and its architecture in the
safetensors metadata; ``NAME.json`` beside it is the model card (command, seed, data sizes,
epochs, losses, metrics).  A *model directory* (``cdinn train --out DIR``) holds
``best.safetensors`` (best validation score so far), ``last.safetensors`` (latest
checkpoint), their cards, and the optimizer state ``optimizer.pt`` used only by ``--resume``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .models import (
    DEFAULT_MODEL,
    WEIGHTS_DIR,
    model_arch,
    nonfinite_weights,
    read_card,
    read_metadata,
    resolve_model_path,
    wrong_weights,
)
from .networks import build_model, mask_channel_of

# DEFAULT_MODEL, WEIGHTS_DIR, model_arch, read_card and resolve_model_path live in .models (torch-free);
# re-exported here for older imports
__all__ = ["DEFAULT_MODEL", "WEIGHTS_DIR", "load_model", "model_arch", "read_card", "resolve_model_path", "save_model"]


def _atomic_write_text(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp.json")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_model(model, path, card: dict | None = None, dtype=torch.float32, input_transform=None):
    """Write ``model``'s weights to ``path`` (.safetensors) and ``card`` to the .json beside it.

    Both files are written under temporary names and renamed, so a reader never sees half a file.
    ``dtype=torch.float16`` halves the file (the shipped weights); loading restores float32.
    ``input_transform`` (default: the model's ``input_transform`` attribute, else ``linear``) is
    stored in the metadata, so inference encodes inputs as in training.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp.safetensors")
    transform = input_transform or getattr(model, "input_transform", "linear")
    meta = {"arch": model.arch, "format": "napari-cdinn/1", "input": transform,
            "mask": "1" if getattr(model, "mask_channel", False) else "0"}
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    if card is not None:
        _atomic_write_text(path.with_suffix(".json"), json.dumps(card, indent=2, default=float) + "\n")


def load_model(model=None, device="cpu"):
    """Load a model from safetensors (no pickle involved).

    Parameters
    ----------
    model : None, str or path
        See :func:`resolve_model_path`.
    device : str or torch.device

    Returns
    -------
    net : torch.nn.Module in eval mode, with ``net.input_transform`` (``linear`` or ``log``),
        ``net.input_factor`` (the oversampling of the patterns it reads) and ``net.mask_channel``
        (whether it reads the unmeasured-pixel map beside the amplitudes)
    card : dict
    """
    path = resolve_model_path(model)
    meta = read_metadata(path)
    card = read_card(path)
    arch = model_arch(path)
    try:
        state = {k: v.float() for k, v in load_file(str(path), device="cpu").items()}
        net = build_model(arch, mask_channel_of(state, arch))
        net.load_state_dict(state)
    except (RuntimeError, KeyError, IndexError, OSError) as exc:  # safetensors' and torch's loading errors
        raise wrong_weights(path.name, arch, exc) from None
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise nonfinite_weights(path.name, bad[0])
    net.input_transform = meta.get("input") or card.get("config", {}).get("input", "linear")
    net.to(device).eval()
    return net, card
