"""Copy a training checkpoint into the package as the shipped weights, with a measured card.

Usage: ``python -m napari_cdinn.nn.ship runs/paper [--name model] [--count 1000]``

The checkpoint (``best.safetensors`` of a model directory, or a file) is stored as float16
safetensors in :data:`napari_cdinn.nn.checkpoint.WEIGHTS_DIR`, and its card gets the training
record plus test metrics measured *with the stored weights* on fresh patterns
(:func:`napari_cdinn.nn.evaluate.score_model`): clean, with Poisson noise (1e5 photons), and clean
with the 8-view test-time ensemble (``predict(views=8)``), and on the realistic mixture (objects
and detector, :data:`napari_cdinn.simulate.MIXTURES` / ``DETECTORS``), also cut off-centre
(:data:`OFFCENTRE_TEST`).  The card also describes
the training distribution (``training_data``: object families, detector model, mask channel).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
from pathlib import Path

import torch

from ..simulate import DETECTORS, simulate
from . import TRUST_CHI2
from .checkpoint import (
    WEIGHTS_DIR,
    load_model,
    read_card,
    resolve_model_path,
    save_model,
)
from .evaluate import TEST_SEED, score_model
from .models import object_size_of

__all__ = ["card_from_state", "ship", "training_data"]

#: The off-centre test set's detector: the realistic one, every pattern's zero frequency up to 2 pixels
#: from the centre pixel per axis (a centre found from few frames; docs/decisions.md, "Off-centre patterns").
OFFCENTRE_TEST = dataclasses.replace(DETECTORS["realistic"], offset=2.0, offset_rate=1.0)

_KEEP = ("config", "epoch", "step", "examples", "elapsed_s", "parameters", "command", "commands", "torch", "best",
         "train_loss", "val_loss", "val_metrics")


def card_from_state(state: dict) -> dict:
    """The training record kept in a shipped card (checkpoint-time history, epoch validations).

    A run started with ``--init-from`` inherits the record of the weights it started from, when
    their card is still there: their ``history`` and ``epoch_validations`` come first and this
    run's follow with ``examples`` counted on from theirs; ``lineage`` lists every run, and
    ``examples`` is the total (``run_examples``: this run's).  Their floats keep 4 significant
    digits (the record of a long chain of runs would otherwise grow the card by ~50 KB a run).
    """
    card = _own_record(state)
    config = state.get("config", {})
    if config.get("init_from"):
        card = _inherit(card, config["init_from"], _commands(state))
    for key in ("history", "epoch_validations"):  # the curves of every run in the chain: 4 digits suffice
        card[key] = _rounded(card[key])
    return card


def _rounded(record, digits=4):
    """``record`` (nested lists and dicts) with every float rounded to ``digits`` significant digits."""
    if isinstance(record, float):
        return float(f"{record:.{digits}g}")
    if isinstance(record, dict):
        return {k: _rounded(v, digits) for k, v in record.items()}
    if isinstance(record, list):
        return [_rounded(v, digits) for v in record]
    return record


def _inherit(card, init_from, commands):
    """``card`` continued from the card of the weights at ``init_from`` (see :func:`card_from_state`)."""
    parent = read_card(init_from)
    if "run_examples" not in parent and parent.get("config", {}).get("init_from"):
        parent = card_from_state(parent)  # a checkpoint of a continued run: merge its own ancestry first
    offset = int(parent.get("examples") or card.get("config", {}).get("init_examples") or 0)
    run = card.get("examples", 0)
    out = dict(card, examples=offset + run, run_examples=run)
    for key in ("history", "epoch_validations"):
        out[key] = parent.get(key, []) + [dict(r, examples=r["examples"] + offset) for r in card[key]]
    how = ", then ".join(f"`{c['command']}`" + (f" from {c['from_examples']:,} examples" if c["from_examples"] else "")
                         for c in commands)
    step = f"continued from {_display(init_from)} ({offset:,} examples) by {how}: {run:,} more examples"
    out["lineage"] = (parent.get("lineage") or _first_run(parent)) + [step]
    return out


def _commands(card):
    """A run's commands (start and resumes) with the examples done when each began, as its card records them."""
    return card.get("commands") or ([{"command": card["command"], "from_examples": 0}] if card.get("command") else [])


def _first_run(card):
    """Lineage entries of a run that started from random weights: its commands."""
    return [f"`{r['command']}` from {r['from_examples']:,} examples" for r in _commands(card)]


def _display(path):
    """``path`` relative to the working directory where it lies below it (cards stay readable)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _own_record(state):
    card = {k: state[k] for k in _KEEP if k in state}
    hist = [h for h in state.get("history", []) if h.get("full_validation")]
    card["history"] = [
        {k: h.get(k) for k in ("event", "epoch", "step", "examples", "train_loss", "val_loss", "metrics", "full_validation")}
        for h in state.get("history", [])
    ]
    card["epoch_validations"] = [
        {"epoch": h["epoch"], "examples": h["examples"], "val_loss": h["val_loss"], "metrics": h["metrics"]} for h in hist
    ]
    return card


def training_data(config: dict) -> dict:
    """What the networks were trained on, from a training ``config``: object families, detector, mask channel."""
    from ..simulate import DETECTORS, MIXTURES

    families = config.get("families") or "paper"
    detector = config.get("detector") or "ideal"
    size = object_size_of(config.get("arch") or "paper")
    return {
        "families": {"name": families, "weights": MIXTURES.get(families, families)},
        "detector": {"name": detector,
                     "settings": dataclasses.asdict(DETECTORS[detector]) if detector in DETECTORS else detector},
        "mask_channel": bool(config.get("mask_channel", False)),
        "objects": f"{size} x {size} frames; patterns of the object zero-padded by the architecture's input factor",
    }


def ship(source, name="model", count=1000, device="cpu", photons=1e5):
    """Store ``source``'s weights as ``WEIGHTS_DIR/name.safetensors`` (+ card); return the card."""
    path = resolve_model_path(source)
    net, state = load_model(path, device)
    side = net.size * net.input_factor  # the frame the network reads
    card = card_from_state(state)
    card.update(
        arch=net.arch,
        source=str(path),
        shipped=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        storage="float16 safetensors (loaded as float32)",
        input=f"sqrt(intensity), decimated to {side} x {side}, divided by its per-frame maximum",
        output="amplitude (max 1), phase (radians, 0 outside amplitude 0.1); targets centred by bounding box",
        trust_chi2=TRUST_CHI2,
        trust_rule="chi2 - chi2_noise <= trust_chi2 (chi2_noise: the chi^2 counting noise alone gives)",
        training_data=training_data(card.get("config", {})),
    )
    if getattr(net, "mask_channel", False):
        card["input"] += "; a second channel marks the unmeasured pixels (1), whose amplitudes read 0"
    target = WEIGHTS_DIR / f"{name}.safetensors"
    tmp = WEIGHTS_DIR / f".{name}.tmp.safetensors"
    save_model(net, tmp, None, dtype=torch.float16)
    card["test_metrics"] = score_model(tmp, count=count, seed=TEST_SEED, device=device, size=net.size)
    card["test_metrics_noisy"] = score_model(tmp, count=count, seed=TEST_SEED, photons=photons, device=device,
                                             size=net.size)
    card["test_metrics_views8"] = score_model(tmp, count=count, seed=TEST_SEED, device=device, views=8, size=net.size)
    mixture = simulate(count, seed=TEST_SEED, oversampling=2, families="realistic", detector="realistic",
                       size=net.size)
    card["test_metrics_realistic"] = dict(score_model(tmp, data=mixture, device=device), families="realistic",
                                          detector="realistic")
    offcentre = simulate(count, seed=TEST_SEED, oversampling=2, families="realistic", detector=OFFCENTRE_TEST,
                         size=net.size)
    card["test_metrics_offcentre"] = dict(score_model(tmp, data=offcentre, device=device), families="realistic",
                                          detector="realistic", offset=OFFCENTRE_TEST.offset)
    save_model(net, target, card, dtype=torch.float16)
    os.remove(tmp)
    return read_card(target)


def main(argv=None):
    """Command-line entry: ship a checkpoint and print its test metrics."""
    p = argparse.ArgumentParser(prog="python -m napari_cdinn.nn.ship", description=__doc__.splitlines()[0])
    p.add_argument("source", help="model directory or .safetensors checkpoint")
    p.add_argument("--name", default="model")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    card = ship(args.source, args.name, args.count)
    keys = ("examples", "test_metrics", "test_metrics_noisy", "test_metrics_views8", "test_metrics_realistic",
            "test_metrics_offcentre")
    print({k: card[k] for k in keys}, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
