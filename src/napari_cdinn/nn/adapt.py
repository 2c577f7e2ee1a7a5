"""Adapt a network to the user's own patterns, without ground truth (physics-aware fine-tuning).

However wide the simulated training mixture, a beamline's data differ from it.  :func:`adapt`
fine-tunes a trained model on the measured patterns themselves, in the spirit of AutoPhaseNN
(Yao et al., npj Comput. Mater. 8, 124, 2022): the loss needs no truth.

Loss
----
On the measured frames: the trainer's data-consistency term
(:func:`napari_cdinn.nn.trainer.data_consistency_loss`), the amplitude chi^2 of each prediction
against its own pattern in the measured frame, on measured pixels only (NaN/inf pixels and the
mask are left out, as :func:`napari_cdinn.nn.inference.prepare` marks them).  It is blind to the
twin, shift and global-phase ambiguities by construction.  Taken on amplitudes, the weak
high-frequency fringes that carry the phase count, and the square root makes Poisson counts
nearly homoscedastic, so the same loss serves every dose.

Guard rail
----------
A network that only fits its own patterns can drift to answers that fit the data and are still
wrong, and forget what it knew.  Every step also takes one batch of simulated, labelled examples
(:func:`napari_cdinn.nn.data.make_objects`, then :func:`napari_cdinn.nn.trainer.batch_examples`)
drawn from the base model's own training distribution (its card's ``config``: ``families`` and
``detector``; the realistic mixture when the card says nothing), scored by the base recipe's loss
(:func:`napari_cdinn.nn.trainer.recipe_loss`: twin-invariant BCE with the recipe's weights, plus
its data-consistency term), weighted by ``guard_weight`` (:data:`GUARD_WEIGHT`; the choice:
docs/decisions.md, "Adapting to the user's stack").  The weight is a controller, not a constant:
after an evaluation whose recall (below) forgets, it is multiplied by :data:`GUARD_GROWTH` (up to
:data:`GUARD_MAX`); after one that remembers it is divided by it again, never below ``guard_weight``.

Held-out frames, recall and early stopping
------------------------------------------
What is evaluated and kept is an exponential moving average of the weights over the last steps
(:data:`EMA_DECAY`, ``torch.optim.swa_utils``): steadier than the last step's weights, whose scores
jitter from step to step by as much as the tolerance below.  A fraction ``holdout`` of the usable
frames (deterministic by ``seed``, :func:`split_frames`) is never trained on.  Its chi^2, exactly as
:func:`napari_cdinn.nn.predict` reports it (median over the held-out frames), is measured before
the first step and every ``eval_every`` steps.  So is
the *recall*: the median support IoU, against the truth, of ``recall_count`` simulated patterns
of each of the project's own sets for the base (its training mixture and the paper's noise-free
objects, :data:`RECALL_SEED`, disjoint from the test sets the card reports).  The weights with the
lowest held-out chi^2 among those whose recall lost at most ``forget_tolerance`` against the base
are kept (the base weights when nothing beats them, so the adapted model is never worse than its
base on held-out data, and never forgets beyond the tolerance what the recall sets measure;
docs/decisions.md, "Adapting keeps only weights that remember").  The run ends when ``patience``
evaluations of weights that remember bring no improvement (those that forget are not counted while
the guard rail's weight brings them back), at the time limit, after ``max_steps`` or on ``stop``; in
every case the best weights are written.

Output
------
A new model folder ``out`` (as ``--model DIR`` and the napari pickers read it):
``model.safetensors`` (float32) and ``model.json``, the card: the base model (name, path,
SHA-256), the data (path if known, frames, SHA-256 of the frames read), the held-out chi^2 before
and after, scores of the base and the adapted model on the project's own simulated test sets
(:data:`napari_cdinn.nn.evaluate.TEST_SEED`), the recall of the base and of the kept weights, steps,
time and the history of evaluations (held-out chi^2, recall, guard weight).  The
folder is written under a temporary name beside ``out`` and renamed at the end: a stop or crash
leaves no half-written model; an existing ``out`` is refused; the base model's files are only read.

Patterns are read at the scale ``predict`` reads the stack at (:func:`napari_cdinn.nn.choose_scale`, the fit
to a sample of it; :mod:`napari_cdinn.nn.models`, "Object size and scale"): at a coarser scale the network
adapts to the central crop it reads (the card's ``data.scale``), the guard rail's and recall sets'
patterns cut to that crop's size.
Frames whose mean pattern's centre of symmetry lies off the centre pixel
(:func:`napari_cdinn.nn.inference.centre_offset`) are adapted to re-centred there
(:func:`napari_cdinn.nn.inference.recentre`), as ``predict`` reads them; the card's ``data`` says so
(``recentred``).

No Qt or napari import; torch is imported when :func:`adapt` runs.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["FORGET_TOLERANCE", "GUARD_WEIGHT", "MAX_FRAMES", "MIN_FRAMES", "RECALL_COUNT", "adapt", "check_out",
           "data_sha256", "split_frames"]

#: Frames with measured signal that adapting needs at least (``cdinn adapt`` refuses fewer).
MIN_FRAMES = 200
#: Frames read at most; a larger stack contributes a random subset of this many (by ``seed``).
MAX_FRAMES = 10_000
#: Weight of the simulated, labelled guard-rail batch against the measured batch's loss.
GUARD_WEIGHT = 0.3
#: Factor on the guard-rail weight after an evaluation that forgets (divided after one that remembers,
#: never below ``guard_weight``), and the weight it grows to at most.
GUARD_GROWTH, GUARD_MAX = 2.0, 10.0
#: Decay per step of the exponential moving average of the weights that is evaluated and kept.
EMA_DECAY = 0.98
#: Simulator seed offset of the guard-rail examples (``seed + GUARD_SEED``): fresh examples.
GUARD_SEED = 3_000_000
#: Adam learning rate of the fine-tuning (constant; the best held-out weights are kept).
LR = 3e-5
#: Evaluations of weights that remember without improvement before the run ends (``patience``).
PATIENCE = 25
#: Simulated test patterns per set for the card's base / adapted scores.
TEST_COUNT = 500
#: Simulated, labelled patterns per recall set scored at every evaluation (see the module notes).
RECALL_COUNT = 256
#: Median IoU a recall set may lose against the base for weights to be kept (docs/decisions.md,
#: "Adapting keeps only weights that remember").
FORGET_TOLERANCE = 0.005
#: Simulator seed of the recall sets: disjoint from the guard-rail batches, ``TEST_SEED`` and the benchmarks'.
RECALL_SEED = 3_500_000
#: Name of the weights in the model folder (:func:`napari_cdinn.nn.models.resolve_model_path` finds it).
WEIGHTS_NAME = "model"


def check_out(out) -> Path:
    """``out`` as a Path, checked: it must not exist and its parent folder must (``ValueError`` otherwise)."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{str(out)!r} exists; adapting writes a new model folder (choose another name, or delete it)")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise ValueError(f"the folder {str(parent)!r} for the adapted model does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"the folder {str(parent)!r} for the adapted model is not writable")
    return out


def split_frames(count: int, holdout: float = 0.1, seed: int = 0):
    """Adapted and held-out positions among ``count`` usable frames, deterministic by ``seed``.

    Returns
    -------
    train, held : ndarray int64, sorted; ``held`` holds ``max(1, round(holdout * count))`` positions.
    """
    if not 0 < holdout <= 0.5:
        raise ValueError(f"holdout must be a fraction in (0, 0.5], got {holdout!r}")
    n_held = max(1, int(round(holdout * count)))
    if count - n_held < 1:
        raise ValueError(f"{count} frame(s) leave nothing to adapt on after holding out {n_held}")
    perm = np.random.default_rng([int(seed), 25]).permutation(count)
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def data_sha256(intensity) -> str:
    """Hex SHA-256 of frames as float32 in C order (the card's fingerprint of the data adapted to)."""
    return hashlib.sha256(np.ascontiguousarray(intensity, dtype=np.float32).tobytes()).hexdigest()


def _file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_frames(intensity, mask, seed, min_frames, max_frames):
    """The usable frames (some measured signal) of a stack, at most ``max_frames`` of them (by ``seed``).

    Returns ``(raw, mask, info)``: float32 frames ``(n, H, W)``, their mask (None, ``(H, W)`` or
    ``(n, H, W)`` bool) and a dict of counts.  ``intensity`` may be lazy (dask, h5py): it is read
    in blocks.
    """
    from .inference import _check_mask, prepare

    shape = tuple(intensity.shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"expected intensities shaped (H, W) or (N, H, W), got {len(shape)} dimensions")
    if len(shape) == 2:
        intensity, shape = np.asarray(intensity)[None], (1,) + shape
    mask = _check_mask(mask, shape)
    n, block = shape[0], 1024
    signal = np.zeros(n, bool)
    for lo in range(0, n, block):
        frames = np.asarray(intensity[lo : lo + block], dtype=np.float32)
        part = None if mask is None else mask if mask.ndim == 2 else mask[lo : lo + block]
        signal[lo : lo + len(frames)] = prepare(frames, mask=part)[1].any(axis=(1, 2))
    usable = np.flatnonzero(signal)
    if len(usable) < min_frames:
        raise ValueError(f"adapting needs at least {min_frames} frames with measured signal, got {len(usable)}"
                         + (f" of {n}" if len(usable) < n else ""))
    if len(usable) > max_frames:
        usable = np.sort(np.random.default_rng([int(seed), 26]).choice(usable, max_frames, replace=False))
    raw = np.asarray(intensity[usable] if len(usable) < n else intensity[:], dtype=np.float32)
    if mask is not None and mask.ndim == 3:
        mask = mask[usable]
    return raw, mask, {"frames": int(n), "usable_frames": int(signal.sum()), "used_frames": len(usable)}


def _guard_config(card: dict, net):
    """The base recipe the guard rail follows: the card's ``config`` (else the realistic mixture), on the net's input."""
    import dataclasses

    from .config import TrainConfig

    config = None
    if isinstance(card.get("config"), dict):
        try:
            config = TrainConfig.from_dict(card["config"])
        except (TypeError, ValueError):
            config = None
    if config is None:
        config = TrainConfig(families="realistic", detector="realistic")
    return dataclasses.replace(config, arch=net.arch, input=net.input_transform, mask_channel=net.mask_channel)


def _guard_batches(config, seed, batch_size):
    """Endless batches of simulated objects of the recipe's families and detector (fresh every block)."""
    from ..simulate import BLOCK
    from .models import object_size_of
    from .trainer import _epoch_batches

    epoch = 0
    while True:
        yield from _epoch_batches(seed, epoch, BLOCK, batch_size, fresh=True, families=config.families,
                                  detector=config.detector, size=object_size_of(config.arch))
        epoch += 1


def _simulated_sets(config, shape, count, seed) -> dict:
    """The project's simulated sets for a base of recipe ``config``, patterns shaped like ``shape``.

    ``training_mixture``: the base's training distribution (the guard rail's); ``paper``: the
    paper's noise-free objects (one set when they are the same).  Objects of the network's size,
    oversampled to the pattern's side; ``count`` patterns each from ``seed``.  Returns
    ``{name: (simulate's dict, its description)}``.
    """
    from ..simulate import simulate
    from .models import object_size_of, oversampling_factor

    size = object_size_of(config.arch)
    factor = oversampling_factor(shape, size)
    sets = {"training_mixture": (config.families, config.detector), "paper": (None, None)}
    if (config.families or "paper") == "paper" and (config.detector or "ideal") == "ideal":
        sets.pop("training_mixture")
    return {name: (simulate(count, seed=seed, oversampling=factor, size=size, families=families, detector=detector),
                   {"families": families or "paper", "detector": detector or "ideal", "count": int(count),
                    "seed": int(seed)})
            for name, (families, detector) in sets.items()}


class _Adapter:
    """A fine-tuning run: the net, its optimiser, the data, the guard rail, the recall sets; :meth:`run` runs it."""

    def __init__(self, net, raw, mask, card, dev, settings):
        import torch

        from .runtime import bf16_supported

        self.net, self.raw, self.mask, self.dev, self.s = net, raw, mask, dev, settings
        self.bf16 = settings["precision"] == "bf16" or (settings["precision"] == "auto" and bf16_supported(dev))
        self.train_idx, self.held_idx = split_frames(len(raw), settings["holdout"], settings["seed"])
        self.held = self._prepared(self.held_idx)
        self.config = _guard_config(card, net)
        self.recall = {}  # name: (prepared patterns, true amplitude, true phase)
        if settings["recall_count"]:
            sets = _simulated_sets(self.config, raw.shape, settings["recall_count"], RECALL_SEED)
            self.recall = {name: (self._prepare(d["intensity"], d.get("mask")), d["amplitude"], d["phase"])
                           for name, (d, _meta) in sets.items()}
        self.base_recall = None
        self.guard_weight = settings["guard_weight"]  # grows while the weights forget
        self.guard = _guard_batches(self.config, settings["seed"] + GUARD_SEED, settings["batch_size"])
        self.generator = torch.Generator(device=dev).manual_seed(int(settings["seed"]) * 7919 + 25)
        self.rng = np.random.default_rng([int(settings["seed"]), 27])
        self.opt = torch.optim.Adam(net.parameters(), lr=settings["lr"])
        # the weights evaluated and kept: an average over the last steps, steadier than the last step's
        self.ema = torch.optim.swa_utils.AveragedModel(
            net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(EMA_DECAY), use_buffers=True)
        self.step_count, self.examples, self.history = 0, 0, []
        self.best = None  # (median held-out chi2, step, weights on the CPU, mean held-out chi2)

    def _prepare(self, frames, mask):
        """:func:`napari_cdinn.nn.inference.prepare` of ``frames`` for the net."""
        from .inference import prepare

        return prepare(frames, transform=self.net.input_transform, input_factor=self.net.input_factor, mask=mask,
                       size=self.net.size)

    def _prepared(self, idx):
        """The prepared frames of the stack at positions ``idx``."""
        mask = None if self.mask is None else self.mask if self.mask.ndim == 2 else self.mask[idx]
        return self._prepare(self.raw[idx], mask)

    def _outputs(self, prepared):
        """Amplitude, phase and chi^2 of prepared frames, as :func:`napari_cdinn.nn.predict` reports them."""
        import torch

        from .inference import _run_batch

        net = self.ema.module
        net.eval()
        parts = []
        with torch.inference_mode():
            for lo in range(0, len(prepared[0]), 256):
                part = tuple(a if np.ndim(a) == 0 else a[lo : lo + 256] for a in prepared)
                amp, phase, _support, chi, _noise = _run_batch(net, part, self.dev, self.bf16, self.s["threshold"])
                parts.append((amp, phase, chi))
        net.train()
        return tuple(np.concatenate(p) for p in zip(*parts))

    def holdout_chi2(self):
        """Per-frame chi^2 of the held-out frames, as :func:`napari_cdinn.nn.predict` reports it."""
        return self._outputs(self.held)[2]

    def recall_iou(self):
        """Median support IoU, against the truth, of the net on each recall set."""
        from .. import physics

        out = {}
        for name, (prepared, amplitude, phase) in self.recall.items():
            amp, ph, _chi = self._outputs(prepared)
            out[name] = float(np.median(physics.compare(amp * np.exp(1j * ph), amplitude, phase)["iou"]))
        return out

    def measured_loss(self, idx):
        """Mean data-consistency loss of the measured frames at positions ``idx`` (measured pixels only)."""
        import torch

        from .data import network_input, normalise_amplitudes
        from .runtime import autocast
        from .trainer import data_consistency_loss

        inputs, measured, factor, unmeasured, input_mask = self._prepared(idx)
        x = network_input(inputs, input_mask, self.net.mask_channel).to(self.dev)
        with autocast(self.dev, self.bf16):
            la, lp = self.net.logits(x.contiguous(memory_format=torch.channels_last))
        amp = torch.from_numpy(normalise_amplitudes(np.sqrt(measured))).to(self.dev)
        return data_consistency_loss(la, lp, amp, factor, torch.from_numpy(unmeasured).to(self.dev)).mean()

    def step(self, idx):
        """One optimiser step on the measured frames ``idx`` and one guard-rail batch; returns the loss."""
        from .trainer import batch_examples, recipe_loss

        loss = self.measured_loss(idx)
        if self.guard_weight > 0:
            ex = batch_examples(next(self.guard), self.config, self.net.input_factor, self.dev, self.generator)
            loss = loss + self.guard_weight * recipe_loss(self.net, ex, self.config, self.net.input_factor,
                                                          self.dev, self.bf16)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.ema.update_parameters(self.net)
        self.step_count += 1
        self.examples += len(idx)
        return float(loss.detach())

    def evaluate(self, elapsed, loss=None):
        """Score the held-out frames, keep the weights if they are the best so far; the history record."""
        chi = self.holdout_chi2()
        median = float(np.median(chi))
        recall = self.recall_iou()
        if self.base_recall is None:
            self.base_recall = recall
        remembers = all(recall[k] >= self.base_recall[k] - self.s["forget_tolerance"] for k in recall)
        improved = self.best is None or (median < self.best[0] and remembers)
        if not remembers:
            self.guard_weight = min(self.guard_weight * GUARD_GROWTH, max(GUARD_MAX, self.guard_weight))
        else:
            self.guard_weight = max(self.guard_weight / GUARD_GROWTH, self.s["guard_weight"])
        if improved:
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.ema.module.state_dict().items()}
            self.best = (median, self.step_count, state, float(np.mean(chi)))
        record = {"event": "evaluation", "step": self.step_count, "examples": self.examples,
                  "elapsed_s": float(elapsed), "train_loss": loss, "holdout_chi2": median,
                  "holdout_chi2_mean": float(np.mean(chi)), "recall_iou": recall, "remembers": bool(remembers),
                  "guard_weight": self.guard_weight, "best_chi2": self.best[0], "best_step": self.best[1],
                  "improved": bool(improved)}
        self.history.append(record)
        return record

    def batches(self):
        """Endless batches of positions of the adapted frames, reshuffled every pass."""
        size = self.s["batch_size"]
        while True:
            order = self.train_idx[self.rng.permutation(len(self.train_idx))]
            for lo in range(0, len(order), size):
                yield order[lo : lo + size]

    def run(self, emit, stop):
        """Fine-tune until patience, time limit, ``max_steps`` or ``stop``; returns how it ended."""
        from ..jobs import stop_requested

        s, t0 = self.s, time.monotonic()
        limit = 60.0 * s["time_limit_min"]
        emit(self.evaluate(0.0))
        stale, losses, ended = 0, [], None
        for idx in self.batches():
            elapsed = time.monotonic() - t0
            if stop_requested(stop):
                ended = "stopped"
            elif elapsed >= limit:
                ended = "time limit"
            elif s["max_steps"] is not None and self.step_count >= s["max_steps"]:
                ended = "steps"
            if ended:
                break
            losses.append(self.step(idx))
            if self.step_count % 10 == 0:
                emit({"event": "step", "step": self.step_count, "examples": self.examples,
                      "elapsed_s": time.monotonic() - t0, "train_loss": float(np.mean(losses[-10:]))})
            if self.step_count % s["eval_every"] == 0:
                record = emit(self.evaluate(time.monotonic() - t0, float(np.mean(losses[-s["eval_every"]:]))))
                # weights that forget do not count: the guard rail's weight is at work on them
                stale = 0 if record["improved"] else stale + record["remembers"]
                if stale >= s["patience"]:
                    ended = "converged"
                    break
        if self.history[-1]["step"] != self.step_count:  # the last steps' weights compete too
            emit(self.evaluate(time.monotonic() - t0, float(np.mean(losses[-s["eval_every"]:]))))
        self.elapsed = time.monotonic() - t0
        return ended


def _emitter(callback, limit_s):
    """``emit(record)``: ``callback`` gets a :class:`napari_cdinn.jobs.ProgressEvent` (done/total: seconds); returns the record."""
    from ..jobs import Kind, ProgressEvent

    kinds = {"start": Kind.START, "step": Kind.PROGRESS, "evaluation": Kind.CHECKPOINT, "done": Kind.DONE,
             "stopped": Kind.STOPPED}

    def emit(record):
        if callback is not None:
            callback(ProgressEvent(kinds[record["event"]], min(record.get("elapsed_s", 0.0), limit_s), limit_s,
                                   payload=record))
        return record

    return emit


def _test_scores(base_path, adapted_path, config, shape, count, device):
    """Base and adapted scores (:func:`napari_cdinn.nn.evaluate.score_model`) on the project's simulated
    test sets (:func:`_simulated_sets`, seed ``TEST_SEED``) for patterns shaped like ``shape``."""
    from .evaluate import TEST_SEED, score_model

    keys = ("iou_median", "phase_rms_median", "phase_rms_p90", "chi2_median", "trusted_fraction")
    out = {}
    for name, (data, meta) in _simulated_sets(config, shape, count, TEST_SEED).items():
        scores = dict(meta)
        for which, path in (("base", base_path), ("adapted", adapted_path)):
            res = score_model(path, data=data, device=device)
            scores[which] = {k: res[k] for k in keys}
        out[name] = scores
    return out


def recentred_note(card: dict) -> str | None:
    """One sentence when the adapted model's card says its frames were adapted to re-centred, else None."""
    shift = (card.get("data") or {}).get("recentred")
    if not shift:
        return None
    return (f"the frames are symmetric about a pixel ({shift[0]:+d}, {shift[1]:+d}) from their centre pixel: the "
            "network adapted to them re-centred there, as predict reads them")


def _card(info, run, raw, counts, settings, ended, source, command):
    """The adapted model's card (see the module notes)."""
    import torch

    base = info.card
    first, best = run.history[0], run.best
    card = {
        "kind": "adapted",
        "base": {"name": info.name, "path": str(info.path), "sha256": _file_sha256(info.path),
                 "examples": base.get("examples")},
        "arch": run.net.arch,
        "config": base.get("config", {}),
        "training_data": base.get("training_data"),
        "data": dict(counts, path=None if source is None else str(Path(source).absolute()),
                     shape=[int(d) for d in raw.shape[-2:]], sha256=data_sha256(raw), mask=run.mask is not None,
                     adapted_frames=len(run.train_idx), holdout_frames=len(run.held_idx)),
        "holdout_chi2": {"before": first["holdout_chi2"], "after": best[0], "before_mean": first["holdout_chi2_mean"],
                         "after_mean": best[3], "count": len(run.held_idx), "statistic": "median"},
        "recall": {"iou_base": run.base_recall, "iou_kept": next(h["recall_iou"] for h in run.history
                                                                  if h["step"] == best[1]),
                   "count": settings["recall_count"], "seed": RECALL_SEED, "tolerance": settings["forget_tolerance"]},
        "ended": ended, "steps": run.step_count, "best_step": best[1], "examples": run.examples,
        "elapsed_s": run.elapsed, "settings": settings, "guard": {"families": run.config.families,
                                                                  "detector": run.config.detector},
        "history": run.history,
        "command": command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    return card


def _publish(tmp: Path, out: Path):
    """Rename the finished folder ``tmp`` to ``out`` (refused if ``out`` appeared meanwhile)."""
    if out.exists():
        raise ValueError(f"{str(out)!r} appeared while adapting; the adapted model was not written")
    os.rename(tmp, out)


def adapt(intensity, out, *, model=None, mask=None, time_limit_min=10.0, holdout=0.1, seed=0, device="auto",
          threads=None, callback=None, stop=None, guard_weight=GUARD_WEIGHT, lr=LR, batch_size=64, eval_every=20,
          patience=PATIENCE, max_steps=None, min_frames=MIN_FRAMES, max_frames=MAX_FRAMES, test_count=TEST_COUNT,
          recall_count=RECALL_COUNT, forget_tolerance=FORGET_TOLERANCE, precision="auto", threshold=None, source=None,
          command=None) -> dict:
    """Fine-tune a model on measured patterns without ground truth and write it as a new model folder.

    Parameters
    ----------
    intensity : array-like (N, H, W)
        Measured, centred intensities (any scale; NumPy, dask or h5py: read in blocks).
    out : str or Path
        The new model folder (must not exist; its parent must).
    model : None, str, path or ModelInfo
        The base model (:func:`napari_cdinn.nn.resolve_model`; None: the best shipped model for
        the pattern size).  Its files are only read.
    mask : array-like bool, (H, W) or (N, H, W), optional
        True on unmeasured pixels; NaN and infinite pixels are unmeasured too.
    time_limit_min : float
        Minutes of fine-tuning at most (reading the data and the final scoring come on top).
    holdout : float
        Fraction (0..0.5] of the usable frames held out to score the weights (:func:`split_frames`).
    seed : int
        Seed of the split, the batch order and the guard-rail examples.
    device : "auto", "cpu", "cuda" or "mps"
    threads : int, optional
        torch CPU threads during the run (restored afterwards).
    callback : callable(ProgressEvent), optional
        Receives :class:`napari_cdinn.jobs.ProgressEvent` (``done``/``total``: seconds of the time
        limit) whose payload, also read as ``event[key]``, is ``{"event": "start"|"step"|"evaluation"|
        "done"|"stopped", "step", "examples", "elapsed_s", "train_loss"}``; evaluations add
        ``holdout_chi2`` (median), ``holdout_chi2_mean``, ``recall_iou`` (``{set: median IoU}``),
        ``remembers`` (within the forget tolerance), ``best_chi2``, ``best_step``, ``improved``;
        ``done``/``stopped`` (the fine-tuning ended; the model is written and scored next) add
        ``ended`` and ``best_step``.
    stop : threading.Event or callable returning bool, optional
        Checked every step; the best weights so far are then written all the same.
    guard_weight : float
        Weight of the simulated, labelled guard-rail batch (0: none; see the module notes).
    lr, batch_size : float, int
        Adam learning rate; measured frames (and simulated examples) per step.
    eval_every, patience : int
        Steps between held-out evaluations; evaluations of weights that remember without improvement
        before stopping.
    max_steps : int, optional
        Steps at most.
    min_frames, max_frames : int
        Usable frames needed (``ValueError`` below); frames read at most (a random subset beyond).
    test_count : int
        Patterns per simulated test set of the card's scores (0: none).
    recall_count : int
        Patterns per simulated recall set scored at every evaluation (0: no recall check).
    forget_tolerance : float
        Median IoU a recall set may lose against the base for weights to be kept (see the module notes).
    precision : "auto", "fp32" or "bf16"
        bf16 autocast where the hardware has it (``auto``), as the trainer.
    threshold : float, optional
        Shape threshold of the held-out chi^2 (default :data:`napari_cdinn.physics.SHAPE_THRESHOLD`, as ``predict``).
    source : str or path, optional
        Where ``intensity`` came from (recorded in the card).
    command : str, optional
        The command line (recorded in the card).

    Returns
    -------
    dict
        The card written to ``out/model.json`` (see the module notes), with ``path``: the folder.

    Raises
    ------
    ValueError
        One sentence: ``out`` exists, a pattern size no model reads, fewer than ``min_frames``
        usable frames, a bad mask or option.
    """
    import torch

    from .. import physics
    from ..device import threads_applied
    from ..io import current_umask
    from .checkpoint import load_model, save_model
    from .inference import centre_offset, choice_to_make, choose_scale, recentre
    from .models import read_side, resolve_model
    from .runtime import resolve_device

    out = check_out(out)
    info = resolve_model(model, np.shape(intensity))  # a size no model reads fails before any work
    dev = resolve_device(device)
    for name, value in (("batch_size", batch_size), ("eval_every", eval_every), ("patience", patience)):
        if int(value) < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if int(recall_count) < 0 or not forget_tolerance >= 0:
        raise ValueError(f"recall_count and forget_tolerance must not be negative, got {recall_count!r} and "
                         f"{forget_tolerance!r}")
    if not time_limit_min > 0:
        raise ValueError(f"the time limit must be positive, got {time_limit_min!r}")
    settings = {"time_limit_min": float(time_limit_min), "holdout": float(holdout), "seed": int(seed),
                "guard_weight": float(guard_weight), "lr": float(lr), "batch_size": int(batch_size),
                "eval_every": int(eval_every), "patience": int(patience), "max_steps": max_steps,
                "recall_count": int(recall_count), "forget_tolerance": float(forget_tolerance),
                "guard_growth": GUARD_GROWTH, "guard_max": GUARD_MAX, "ema_decay": EMA_DECAY,
                "precision": precision, "threshold": physics.SHAPE_THRESHOLD if threshold is None else float(threshold),
                "device": str(dev)}
    split_frames(max(int(min_frames), 2), holdout)  # a bad holdout fails before the data are read
    raw, mask, counts = _read_frames(intensity, mask, seed, int(min_frames), int(max_frames))
    split_frames(len(raw), holdout)
    offset = centre_offset(raw, mask)
    if offset:  # the network reads centred patterns: it adapts to the stack re-centred, as predict then reads it
        raw, mask = recentre(raw, mask, offset)
    counts["recentred"] = list(offset) if offset else None
    # the network reads the stack at the scale predict then reads it at (the fit to the data decides): at a
    # coarser scale it reads the central crop, decimated, which is what it adapts to
    chosen = choose_scale(raw, info, mask=mask, device=device) if choice_to_make(raw, info, mask, raw.shape) else info
    scale = chosen.scale
    if scale != 1:
        side = read_side(raw.shape, scale)
        raw = np.ascontiguousarray(physics.crop(raw, (side, side)))
        mask = None if mask is None else np.ascontiguousarray(physics.crop(mask, (side, side)))
    counts["scale"] = scale
    emit = _emitter(callback, 60.0 * settings["time_limit_min"])
    with threads_applied(int(threads)) if threads else contextlib.nullcontext():  # the count comes back after
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.absolute().parent))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700: the model folder follows the umask
        try:
            torch.manual_seed(int(seed))
            net, _ = load_model(info.path, dev)
            net.to(memory_format=torch.channels_last).train()
            run = _Adapter(net, raw, mask, info.card, dev, settings)
            emit({"event": "start", "step": 0, "examples": 0, "elapsed_s": 0.0, "train_loss": None, **counts,
                  "holdout_frames": len(run.held_idx)})
            ended = run.run(emit, stop)
            emit({"event": "stopped" if ended == "stopped" else "done", "step": run.step_count, "examples": run.examples,
                  "elapsed_s": run.elapsed, "train_loss": None, "ended": ended, "best_step": run.best[1]})
            net.load_state_dict(run.best[2])
            card = _card(info, run, raw, counts, settings, ended, source, command)
            weights = tmp / f"{WEIGHTS_NAME}.safetensors"
            save_model(net, weights, card, input_transform=net.input_transform)
            if test_count:
                card["test_scores"] = _test_scores(info.path, weights, run.config, raw.shape, int(test_count), dev)
                save_model(net, weights, card, input_transform=net.input_transform)
            _publish(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    card["path"] = str(out)
    return card
