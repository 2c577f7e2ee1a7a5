"""Training loop for the CDI NN networks on the paper's simulated data.

Recipe (``preset="paper"``): binary cross-entropy on the sigmoid outputs (phase scaled to
0..1), Adam (lr 1e-3), batch 256, 10 epochs of 180,000 training examples, 20,000 validation
examples.  The preset's architecture is the shared-encoder variant (``arch="shared"``); the
paper's separate pair is ``arch="paper"``: with the twin-invariant loss the pair's phase network
stayed at the zero-phase answer, while the shared encoder, whose two heads read the same
features and so agree on which twin to draw, learned the phase (measured: docs/decisions.md,
"--preset paper trains the shared encoder").
Two further changes make the recipe learn the phase at all (design.md):

* **twin-invariant loss**: per example, the smaller of the joint (shape + phase) BCE against
  the truth and against its twin, so both outputs pick the same one of the two solutions;
* **centred targets**: every target is rolled so the bounding box of its support is centred
  (:func:`napari_cdinn.nn.data.centre_objects`), which removes the shift ambiguity of
  unpadded patterns; the inputs are unchanged.

Beyond the paper, ``data_weight`` adds a **data-consistency term** (:func:`data_consistency_loss`):
the amplitude chi^2 of each prediction against its own 2x-oversampled pattern, the quantity the
trust score measures.  It needs no target, so it is blind to the twin, shift and global phase
ambiguities, and it rewards the weak high-frequency fringes that carry the phase, which the
supervised BCE (whose optimum under ambiguity is a blurred average) does not.

Data come from the simulator on the fly: training examples from ``seed`` (examples
``0 .. train_size - 1``, the same in every epoch, shuffled in chunks), validation examples from
``seed + VAL_SEED_OFFSET``.  Validation reports the twin-invariant loss, the support IoU and the
phase RMS inside the true support after alignment (``physics.compare``); judge by those.

Checkpoints (``out`` is a directory): every ``checkpoint_minutes`` and at the end of every
epoch, ``last.safetensors`` + ``last.json`` (state: position, history, config),
``optimizer.pt`` (the only pickle, for ``resume``), and ``best.safetensors`` + ``best.json``
whenever the quick validation score (phase RMS median + 1 - IoU median) improves.  With
``average_from``, ``average.safetensors`` + ``average.json`` hold the running mean of the weights
over the schedule's last part (stochastic weight averaging), a candidate for ``best`` too.

The recipe is one :class:`~napari_cdinn.nn.config.TrainConfig` (presets: ``PRESETS``), stored as
``last.json``'s ``config``.  :func:`fit` runs it; :func:`train` builds it from a preset and keywords.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import physics
from ..jobs import Kind, ProgressEvent, stop_requested
from ..simulate import BLOCK
from .checkpoint import load_model, resolve_model_path, save_model
from .config import PRESETS, RESUMABLE, TrainConfig, chosen_fields, resolve_options, run_files
from .data import (
    SIZE,
    make_examples,
    make_objects,
    network_input,
    prepare_examples,
    split_detector,
)
from .inference import decode_outputs, oversampled_intensity
from .models import object_size_of
from .networks import (
    add_mask_channel,
    build_model,
    count_parameters,
    deepen_state_dict,
    input_factor_of,
    mask_channel_of,
    widen_state_dict,
)
from .runtime import autocast, bf16_supported, resolve_device

__all__ = [
    "PRESETS",
    "VAL_SEED_OFFSET",
    "TrainConfig",
    "batch_examples",
    "data_consistency_loss",
    "evaluate",
    "fit",
    "oversampled_intensity",
    "recipe_loss",
    "train",
    "twin_invariant_loss",
]

#: Validation data use the simulator seed ``seed + VAL_SEED_OFFSET``.
VAL_SEED_OFFSET = 1_000_000
#: Oversampling of the patterns the data-consistency loss compares with (the paper's measured frame).
DATA_OVERSAMPLING = 2
#: Logit of the shape threshold: ``sigmoid(logit) > SHAPE_THRESHOLD`` where ``logit > SUPPORT_LOGIT``.
SUPPORT_LOGIT = math.log(physics.SHAPE_THRESHOLD / (1 - physics.SHAPE_THRESHOLD))
#: Examples simulated at once and shuffled together during training (a multiple of BLOCK).
CHUNK = 4 * BLOCK

def twin_invariant_loss(amp_logit, phase_logit, target_amp, target_phase, twin_amp, twin_phase, shift=0,
                        phase_weight=1.0, support_weight=0.0, miss_weight=1.0):
    """Per-example min of the joint BCE against the truth and against its twin.

    With ``shift > 0`` the minimum also runs over circular shifts of both targets by up to
    ``shift`` pixels in each direction (the output's position is free within that range).

    Parameters
    ----------
    amp_logit, phase_logit : Tensor (N, 1, H, W)
        Pre-sigmoid outputs.
    target_amp, twin_amp : Tensor (N, 1, H, W)
        Amplitudes in 0..1.
    target_phase, twin_phase : Tensor (N, 1, H, W)
        Phases in radians (scaled to 0..1 here).
    shift : int
        Position tolerance in pixels (0: none).
    phase_weight : float
        Weight of the phase BCE in the joint loss (1: the paper's plain sum).  The phase BCE
        spans a narrow range (ln 2 for zero phase against ~0.686 for a perfect answer), so the
        shared encoder hears little of it unless it is weighted up.
    support_weight : float
        Weight of a **support term** (0: none, the paper's loss): the BCE of the shape output's
        own 0.1 threshold as a classifier of the target's support, i.e. of
        ``amp_logit - logit(SHAPE_THRESHOLD)`` against ``support_from_amplitude(target)``.  The
        amplitude BCE's optimum under an uncertain edge is a blurred average that falls under
        the threshold on the object's rim, where the masked phase is then 0; this term asks the
        threshold itself to draw the most probable support.
    miss_weight : float
        Weight of the support term's object pixels against its background pixels (its
        ``pos_weight``): with ``w`` the threshold draws a pixel when it is in the object with
        probability over ``1 / (1 + w)``.  At 1 (the most probable support) the network drew a
        tighter support, missing more of the object, and the masked phase got worse; a missed
        pixel costs the phase error, an extra one only the IoU, so ``w > 1`` (measured:
        docs/decisions.md, "A support term").

    Returns
    -------
    loss : Tensor, scalar (mean over the batch)
    chose_twin : Tensor bool (N,)
    """

    def joint(amp, phase):
        la = F.binary_cross_entropy_with_logits(amp_logit, amp, reduction="none").mean((1, 2, 3))
        unit = (phase + math.pi) / (2 * math.pi)
        lp = F.binary_cross_entropy_with_logits(phase_logit, unit, reduction="none").mean((1, 2, 3))
        loss = la + phase_weight * lp
        if support_weight:
            support = physics.support_from_amplitude(amp).to(amp_logit.dtype)
            ls = F.binary_cross_entropy_with_logits(amp_logit - SUPPORT_LOGIT, support, reduction="none",
                                                    pos_weight=amp_logit.new_tensor(miss_weight))
            loss = loss + support_weight * ls.mean((1, 2, 3))
        return loss

    def best(amp, phase):
        losses = [
            joint(torch.roll(amp, (dy, dx), (-2, -1)), torch.roll(phase, (dy, dx), (-2, -1)))
            for dy in range(-shift, shift + 1)
            for dx in range(-shift, shift + 1)
        ]
        return torch.stack(losses).amin(0)

    l_true = best(target_amp, target_phase)
    l_twin = best(twin_amp, twin_phase)
    return torch.minimum(l_true, l_twin).mean(), l_twin < l_true


def _nchw(t, channels_last=True):
    """``(N, H, W)`` tensor as ``(N, 1, H, W)``, channels-last where the networks read it."""
    t = t[:, None]
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _to_tensor(a, device, channels_last=True):
    return _nchw(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device), channels_last)


_TARGETS = ("target_amplitude", "target_phase", "twin_amplitude", "twin_phase")


def data_consistency_loss(amp_logit, phase_logit, measured, factor=DATA_OVERSAMPLING, mask=None):
    """Per-example misfit between the predicted object's far field and the measured amplitudes.

    The object is decoded as ``predict`` decodes it (:func:`napari_cdinn.nn.inference.decode_outputs`:
    amplitude over its maximum, phase zeroed outside the shape threshold), zero-padded ``factor``
    times and Fourier transformed; its amplitudes ``|F|`` are compared with ``measured`` (same
    frame) after the least-squares scale ``s``: ``sum (m - s |F|)**2 / sum m**2``.  This is the
    trust score's chi^2 taken on amplitudes instead of intensities, so the weak high-frequency
    fringes that carry the phase count, and it needs no target: it is blind to the twin, shift and
    global phase ambiguities that make the supervised loss uncertain.

    Parameters
    ----------
    amp_logit, phase_logit : Tensor (N, 1, H, W)
    measured : Tensor (N, factor * H, factor * W)
        Amplitudes of the oversampled patterns (``oversampled_intensity(...).sqrt()``).
    mask : Tensor (N, factor * H, factor * W), optional
        1 (or True) on unmeasured pixels, which are left out of the fit and the sums.

    Returns
    -------
    Tensor (N,) float32
    """
    amp, phase, _ = decode_outputs(torch.sigmoid(amp_logit.float()), torch.sigmoid(phase_logit.float()))
    fit = (oversampled_intensity(amp, phase, factor) + 1e-12).sqrt()
    m = measured.float()
    if mask is not None:
        keep = 1.0 - mask.float()
        m, fit = m * keep, fit * keep
    scale = (m * fit).sum((-2, -1), keepdim=True) / (fit * fit).sum((-2, -1), keepdim=True).clamp_min(1e-12)
    return ((m - scale * fit) ** 2).sum((-2, -1)) / (m * m).sum((-2, -1)).clamp_min(1e-12)


def evaluate(model, data, device, bf16=False, batch_size=512):
    """Validation loss and quality metrics of ``model`` on examples from :func:`make_examples`.

    Returns
    -------
    dict
        ``loss`` (twin-invariant), ``iou_median``, ``phase_rms_median``, ``phase_rms_p90``,
        ``chi2_median`` (the trust score of ``predict`` on the 2x oversampled patterns),
        ``twin_rate`` (fraction of examples matching the twin better), ``count``.
    """
    model.eval()
    losses, amps, phases, chi2 = [], [], [], []
    n = len(data["input"])
    with torch.inference_mode():
        for lo in range(0, n, batch_size):
            sl = slice(lo, lo + batch_size)
            x = network_input(data["input"][sl], data["mask"][sl] if "mask" in data else None,
                              getattr(model, "mask_channel", False)).to(device)
            with autocast(device, bf16):
                la, lp = model.logits(x.contiguous(memory_format=torch.channels_last))
            t = [_to_tensor(data[k][sl], device, False) for k in _TARGETS]
            loss, _ = twin_invariant_loss(la, lp, *t)
            losses.append(float(loss) * len(x))
            a, p, _ = decode_outputs(torch.sigmoid(la), torch.sigmoid(lp))  # as predict decodes them
            measured = oversampled_intensity(data["amplitude"][sl], data["phase"][sl])
            chi2.append(physics.chi2(measured, oversampled_intensity(a.cpu(), p.cpu())).numpy())
            amps.append(a.cpu().numpy())
            phases.append(p.cpu().numpy())
    a, p = np.concatenate(amps), np.concatenate(phases)
    cmp = physics.compare(a * np.exp(1j * p), data["amplitude"], data["phase"])
    rms = cmp["phase_rms"]
    return {
        "loss": sum(losses) / n,
        "iou_median": float(np.median(cmp["iou"])),
        "phase_rms_median": float(np.nanmedian(rms)),
        "phase_rms_p90": float(np.nanpercentile(rms, 90)),
        "chi2_median": float(np.median(np.concatenate(chi2))),
        "twin_rate": float(np.mean(cmp["twin"])),
        "count": int(n),
    }


def _epoch_batches(seed, epoch, train_size, batch_size, skip_examples=0, fresh=False, pool=None, ahead=2,
                   families=None, detector=None, size=SIZE):
    """Yield the objects of one epoch's training batches (dicts of ``amplitude`` and ``phase`` arrays),
    skipping the first ``skip_examples``; :func:`napari_cdinn.nn.data.prepare_examples` makes them examples.

    With ``fresh`` every epoch draws new examples: epoch ``e`` uses the simulator's examples from
    ``e * train_size`` (rounded up to a whole ``BLOCK``) on, so no example is seen twice.  With a
    process ``pool`` the chunks are simulated ``ahead`` at a time, in parallel; the batches are the same.
    ``families`` and ``detector`` (:func:`napari_cdinn.nn.data.make_objects`) draw realistic data;
    the batches then carry the detector settings of their examples.  ``size``: the objects' side.
    """
    rng = np.random.default_rng([int(seed), 7, int(epoch)])
    offset = int(epoch) * (-(-int(train_size) // BLOCK) * BLOCK) if fresh else 0
    starts = np.arange(0, train_size, CHUNK)
    plan, consumed = [], 0
    for j in rng.permutation(len(starts)):
        start = int(starts[j])
        count = min(CHUNK, train_size - start)
        perm = rng.permutation(count)  # drawn for skipped chunks too: the stream matches an unskipped run
        if consumed + count <= skip_examples:
            consumed += count
            continue
        job = {"count": count, "seed": seed, "start": offset + start, "families": families, "detector": detector,
               "size": size}
        plan.append((job, perm))
    buffer = None
    chunks = _simulated([kw for kw, _ in plan], pool, ahead)
    for chunk, (_, perm) in zip(chunks, plan):
        chunk = {k: v[perm] for k, v in chunk.items()}
        if consumed < skip_examples:
            drop = skip_examples - consumed
            chunk = {k: v[drop:] for k, v in chunk.items()}
            consumed = skip_examples
        if buffer is not None:
            chunk = {k: np.concatenate([buffer[k], chunk[k]]) for k in chunk}
        m = len(chunk["amplitude"])
        full = (m // batch_size) * batch_size
        for lo in range(0, full, batch_size):
            yield {k: v[lo : lo + batch_size] for k, v in chunk.items()}
        buffer = {k: v[full:] for k, v in chunk.items()} if full < m else None


def _simulated(jobs, pool=None, ahead=2):
    """``make_objects(**job)`` for each job, in order; with a pool, ``ahead`` jobs in flight."""
    if pool is None:
        for job in jobs:
            yield make_objects(**job)
        return
    pending = collections.deque(pool.submit(make_objects, **job) for job in jobs[:ahead])
    for job in jobs[ahead:] + [None] * len(pending):
        done = pending.popleft().result()
        if job is not None:
            pending.append(pool.submit(make_objects, **job))
        yield done


def default_data_workers(device) -> int:
    """Simulator processes for training on ``device``: none on a CPU (its cores run the network),
    else the free cores but one (:func:`napari_cdinn.device.free_cores`), at least 1, at most 8."""
    from ..device import free_cores

    return 0 if torch.device(device).type == "cpu" else min(8, free_cores(leave=1))


def data_pool(workers):
    """A process pool that simulates training examples ahead of the network (None for 0 workers).

    Worth it where the network outruns the simulator: on a GPU, or a CPU with many cores.
    Processes are spawned (no fork of a process holding torch threads), run one thread each (many
    processes each using every core would oversubscribe the CPU tenfold) and ignore Ctrl-C, which
    stops the training process itself (a checkpoint, then the pool is shut down).
    """
    if not workers:
        return None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(int(workers), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_data_worker_init)


def _data_worker_init():
    """Set up a simulator process: one thread (the pool is the parallelism), Ctrl-C ignored."""
    import signal

    from .. import simulate

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    simulate.FFT_WORKERS = 1
    torch.set_num_threads(1)


def _measured_amplitudes(examples, input_factor, transform):
    """Oversampled amplitudes of the true objects of :func:`prepare_examples` tensors, for
    :func:`data_consistency_loss`.

    The linear input of a model reading ``DATA_OVERSAMPLING``-times oversampled patterns already
    holds them, normalised: the loss's least-squares scale removes the normalisation, so they are
    not computed again.
    """
    if input_factor == DATA_OVERSAMPLING and transform == "linear":
        return examples["input"]
    return oversampled_intensity(examples["amplitude"], examples["phase"]).sqrt()


def batch_examples(batch, config, factor, device, generator=None):
    """Network inputs and targets (:func:`prepare_examples` tensors on ``device``) of a batch of objects.

    ``batch``: objects from :func:`_epoch_batches` (simulator processes drew them, with their
    detector settings); their patterns and targets are computed here, on the training device,
    with the input encoding of ``config`` and the input oversampling ``factor``.
    """
    objects = (torch.from_numpy(batch[k]).to(device) for k in ("amplitude", "phase"))
    return prepare_examples(*objects, config.input, factor, detector=split_detector(batch), generator=generator)


def recipe_loss(model, examples, config, factor, device, bf16=False):
    """The training loss of the recipe ``config`` on ``examples`` (:func:`batch_examples`): a scalar tensor.

    The twin-invariant loss with the recipe's shift tolerance and phase, support and miss weights,
    plus ``config.data_weight`` times the data-consistency term (:func:`data_consistency_loss`).
    """
    x = network_input(examples["input"], examples["mask"], model.mask_channel).contiguous(
        memory_format=torch.channels_last)
    t = [_nchw(examples[k], False) for k in _TARGETS]
    with autocast(device, bf16):
        la, lp = model.logits(x)
    loss, _ = twin_invariant_loss(la, lp, *t, shift=config.shift, phase_weight=config.phase_weight,
                                  support_weight=config.support_weight, miss_weight=config.miss_weight)
    if config.data_weight > 0:
        measured = _measured_amplitudes(examples, factor, config.input)
        mask = examples["mask"] if measured is examples["input"] else None  # the input's unmeasured pixels
        loss = loss + config.data_weight * data_consistency_loss(la, lp, measured, mask=mask).mean()
    return loss


def _progress(config, step, total_steps, elapsed_s=0.0):
    """Fraction of the schedule done: of its steps or, with a ``time_limit_min``, of its time if further."""
    frac = step / max(total_steps, 1)
    if config.time_limit_min:
        frac = max(frac, elapsed_s / (60.0 * config.time_limit_min))
    return min(frac, 1.0)


def _lr_at(config, step, total_steps, elapsed_s=0.0):
    if config.schedule == "cosine":
        frac = _progress(config, step, total_steps, elapsed_s)
        return config.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))
    return config.lr


def _deepens(arch, deeper):
    """Whether weights of ``arch`` start ``deeper`` by :func:`deepen_state_dict` (same input, twice the object)."""
    return (arch != "paper" and input_factor_of(arch) == input_factor_of(deeper)
            and object_size_of(deeper) == 2 * object_size_of(arch))


def _initial_weights(config, chosen):
    """State dict of the model ``config.init_from`` names, and ``config`` updated to its architecture.

    Its architecture and input encoding replace the config's unless ``chosen`` names them: then a
    conflict raises ``ValueError``, except that ``shared`` weights started as ``arch="shared2x"``
    are widened (:func:`widen_state_dict`): the 2x-input net then begins exactly where the 32 x 32
    one stands, and ``shared2x`` weights started as ``arch="deep2x"`` keep their outer levels
    (:func:`deepen_state_dict`).  Weights that read the mask channel keep it, and the object
    families and detector model of their training (their card's) go on unless ``chosen`` names
    them: continuing ``model2x`` continues it on its realistic mixture.
    """
    path = resolve_model_path(config.init_from)
    net, card = load_model(path)
    state = net.state_dict()
    found = {"arch": net.arch, "input": net.input_transform}
    given = {key: getattr(config, key) if key in chosen else None for key in found}
    if given["arch"] is not None and net.arch == "shared" and input_factor_of(given["arch"]) > 1:
        state, found["arch"] = widen_state_dict(state, input_factor_of(given["arch"])), given["arch"]
    if config.mask_channel:
        state = add_mask_channel(state, found["arch"])
    if given["arch"] is not None and _deepens(found["arch"], given["arch"]):
        torch.manual_seed(config.seed)
        fresh = build_model(given["arch"], mask_channel=mask_channel_of(state, found["arch"])).state_dict()
        state, found["arch"] = deepen_state_dict(state, fresh), given["arch"]
    for key, value in given.items():
        if value is not None and value != found[key]:
            what = {"arch": "architecture", "input": "input transform"}[key]  # words of the CLI and the dock alike
            raise ValueError(f"the {what} {value!r} conflicts with the {found[key]!r} of the initial weights "
                             f"{str(path)!r}: leave it as the start model's")
    # what the weights read and were trained on goes on unless the caller chose otherwise
    found["mask_channel"] = mask_channel_of(state, found["arch"])
    trained_on = card.get("config") or {}
    found.update({key: trained_on[key] for key in ("families", "detector") if key not in chosen and key in trained_on})
    config = dataclasses.replace(config, **found, init_from=str(path), init_examples=card.get("examples"))
    return state, config


def _load_average(out, model, device):
    """The weight average a resumed run continues (``average.safetensors`` in ``out``), or None."""
    path = Path(out) / "average.safetensors"
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    average = torch.optim.swa_utils.AveragedModel(model)
    average.module.load_state_dict(load_file(str(path)))
    average.n_averaged.fill_(int(json.loads(path.with_suffix(".json").read_text())["averaged_steps"]))
    return average.to(device)


def _score(metrics):
    """Model selection score (lower is better): phase RMS median (rad) + (1 - IoU median)."""
    return metrics["phase_rms_median"] + (1.0 - metrics["iou_median"])


def _resume_point(out, config, chosen):
    """The config and the saved state a resumed run continues from; state None: no checkpoint, a new run.

    The checkpoint's config wins (keys an older run lacks take their defaults), except for the
    :data:`~napari_cdinn.nn.config.RESUMABLE` fields in ``chosen``; a new ``epochs`` is at least
    one past the current epoch.
    """
    path = out / "last.json"
    if not (path.is_file() and (out / "last.safetensors").is_file()):
        return config, None
    state = json.loads(path.read_text())
    changes = {key: getattr(config, key) for key in RESUMABLE if key in chosen}
    if "epochs" in changes:  # a new schedule length, never shorter than what is already done
        changes["epochs"] = max(int(changes["epochs"]), state["epoch"] + 1)
    return TrainConfig.from_dict(state["config"]).replace(**changes), state


def _new_state(config, model):
    """The training state of a run that starts now (``last.json`` without the card's extras)."""
    return {"config": config.to_dict(), "epoch": 0, "step_in_epoch": 0, "step": 0, "examples": 0, "elapsed_s": 0.0,
            "history": [], "best": None, "parameters": count_parameters(model)}


class _Run:
    """A training run under way: the model, its optimiser, the state saved as ``last.json``, the hooks.

    :meth:`loop` runs the epochs; each is a sequence of :meth:`step` calls, with :meth:`checkpoint`
    every ``checkpoint_minutes`` and at the epoch's end.
    """

    def __init__(self, out, config, state, init, dev, callback=None, quick_val_size=2000, command=None):
        self.out, self.config, self.dev = Path(out), config, dev
        self.emit = _event_sender(callback, config)
        self.bf16 = config.precision == "bf16" or (config.precision == "auto" and bf16_supported(dev))
        torch.manual_seed(config.seed)
        self.model = model = build_model(config.arch, config.mask_channel)
        if init is not None:
            model.load_state_dict(init)
        self.opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        resumed = state is not None
        if resumed:
            self._load_checkpoint()
            state["config"] = config.to_dict()
        else:
            state = _new_state(config, model)
        self.state = state
        state["command"] = command or state.get("command")
        if command:  # every start and resume, with the examples done when it began
            state.setdefault("commands", []).append({"command": command, "from_examples": state["examples"]})
        state["torch"] = torch.__version__
        model.to(dev).to(memory_format=torch.channels_last)
        for g in self.opt.state.values():
            for k, v in g.items():
                if torch.is_tensor(v):
                    g[k] = v.to(dev)
        self.average = _load_average(out, model, dev) if resumed and config.average_from is not None else None
        self.factor = input_factor_of(config.arch)
        self.size = object_size_of(config.arch)
        self.val = make_examples(config.val_size, config.seed + VAL_SEED_OFFSET, transform=config.input,
                                 input_factor=self.factor, families=config.families, detector=config.detector,
                                 size=self.size)
        self.generator = torch.Generator(device=dev).manual_seed(int(config.seed) * 7919 + int(state["step"]))
        self.quick = {k: v[: min(quick_val_size, config.val_size)] for k, v in self.val.items()}
        self.steps_per_epoch = config.train_size // config.batch_size
        self.total_steps = self.steps_per_epoch * config.epochs
        self.t0 = time.monotonic() - state["elapsed_s"]
        self.last_ckpt = time.monotonic()
        self.run_loss, self.run_n = 0.0, 0
        self.t_rate, self.n_rate = time.monotonic(), 0

    def _load_checkpoint(self):
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(str(self.out / "last.safetensors")))
        if (self.out / "optimizer.pt").is_file():
            try:
                saved = torch.load(self.out / "optimizer.pt", map_location="cpu", weights_only=True)
                self.opt.load_state_dict(saved)
            except Exception:  # noqa: BLE001 - unpickling refused (not plain tensors), truncated, foreign
                raise ValueError(f"{str(self.out / 'optimizer.pt')!r} cannot be resumed from (it holds more than plain "
                                 "tensors, or is damaged); delete it to resume without the optimizer's state") from None

    def elapsed(self):
        """Seconds of training, across resumes."""
        return time.monotonic() - self.t0

    def progress(self):
        """Fraction of the schedule done (:func:`_progress`)."""
        return _progress(self.config, self.state["step"], self.total_steps, self.elapsed())

    def event(self, name):
        """The fields every event carries."""
        s = self.state
        return {"event": name, "epoch": s["epoch"], "step": s["step"], "examples": s["examples"],
                "train_loss": float(self.run_loss) / self.run_n if self.run_n else None,
                "lr": self.opt.param_groups[0]["lr"], "elapsed_s": self.elapsed()}

    def _reset_running_loss(self):
        self.run_loss, self.run_n = 0.0, 0
        self.last_ckpt = time.monotonic()

    def step(self, batch):
        """One optimiser step on ``batch`` (objects from :func:`_epoch_batches`), then its bookkeeping."""
        cfg, dev = self.config, self.dev
        for g in self.opt.param_groups:
            g["lr"] = _lr_at(cfg, self.state["step"], self.total_steps, self.elapsed())
        ex = batch_examples(batch, cfg, self.factor, dev, self.generator)
        loss = recipe_loss(self.model, ex, cfg, self.factor, dev, self.bf16)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self._count(loss.detach(), len(ex["input"]))

    def _count(self, loss, n):
        """Bookkeeping after a step of ``n`` examples: counters, weight average, running loss, step events."""
        state, cfg = self.state, self.config
        state["step"] += 1
        if cfg.average_from is not None and self.average is None and self.progress() >= cfg.average_from:
            self.average = torch.optim.swa_utils.AveragedModel(self.model)
        if self.average is not None:
            self.average.update_parameters(self.model)
        state["step_in_epoch"] += 1
        state["examples"] += n
        self.run_loss, self.run_n = self.run_loss + loss * n, self.run_n + n  # no device sync per step
        self.n_rate += n
        if state["step"] % 20 == 0:
            event = self.event("step")
            self._check_loss(event["train_loss"], "training")  # a NaN stays in the running sum
            now = time.monotonic()
            self.emit(dict(event, examples_per_s=self.n_rate / max(now - self.t_rate, 1e-9)))
            self.t_rate, self.n_rate = now, 0

    def _check_loss(self, value, what):
        """Raise ``ValueError`` (one sentence) where the ``what`` ("training", "validation") loss is not finite.

        The weights have diverged: training stops, and nothing is saved (the checkpoints already in
        the model directory stay as they were).
        """
        if math.isfinite(value):
            return
        s = self.state
        word = "NaN" if math.isnan(value) else "infinite"
        raise ValueError(f"the {what} loss became {word} by step {s['step']} ({s['examples']} examples): the "
                         f"weights diverged and were not saved; lower the learning rate (--lr, now {self.config.lr:g})")

    def _check_weights(self):
        """Raise ``ValueError`` as :meth:`_check_loss` does where a weight (or buffer) is not finite."""
        tensors = [t for t in self.model.state_dict().values() if torch.is_floating_point(t)]
        if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            self._check_loss(math.nan, "training")

    def checkpoint(self, kind, full=False):
        """Validate (quick, or ``full``), record it in the history, save ``last`` (and ``best``, ``average``).

        Weights that diverged (a non-finite training or validation loss, or weight) are never saved:
        ``ValueError`` (:meth:`_check_loss`).
        """
        state = self.state
        state["elapsed_s"] = self.elapsed()
        if self.run_n:
            self._check_loss(float(self.run_loss) / self.run_n, "training")
        self._check_weights()
        metrics = evaluate(self.model, self.val if full else self.quick, self.dev, self.bf16)
        self._check_loss(metrics["loss"], "validation")
        record = dict(self.event(kind), val_loss=metrics["loss"], metrics=metrics, full_validation=full)
        candidates = [("current", self.model, metrics)]
        if self.average is not None and not full:  # the average is scored by the quick validation only
            avg_metrics = evaluate(self.average.module, self.quick, self.dev, self.bf16)
            record.update(average_metrics=avg_metrics, averaged_steps=int(self.average.n_averaged))
            candidates.append(("average", self.average.module, avg_metrics))
        self.model.train()
        state["history"].append(record)
        best = None if full else self._new_best(candidates)  # best is chosen by the quick validation
        self._save(record, metrics, best)
        self.emit(dict(record, event="validation" if full else "checkpoint"))
        return metrics

    def _new_best(self, candidates):
        """The best of ``candidates`` (name, net, metrics) if it beats ``state["best"]`` (recorded then), else None."""
        name, net, m = min(candidates, key=lambda c: _score(c[2]))  # the current weights win a tie
        best = self.state.get("best")
        if best is not None and _score(m) >= _score(best["metrics"]):
            return None
        self.state["best"] = {"step": self.state["step"], "examples": self.state["examples"], "metrics": m,
                              "weights": name}
        if name == "average":
            self.state["best"]["averaged_steps"] = int(self.average.n_averaged)
        return net

    def _save(self, record, metrics, best):
        """Write ``last`` with its card and the optimizer state, the weight average, and ``best`` (a net or None)."""
        cfg, out = self.config, self.out
        card = dict(self.state, arch=cfg.arch, val_metrics=metrics, train_loss=record["train_loss"],
                    val_loss=metrics["loss"])
        save_model(self.model, out / "last.safetensors", card, input_transform=cfg.input)
        torch.save(self.opt.state_dict(), out / "optimizer.pt")
        if self.average is not None:
            save_model(self.average.module, out / "average.safetensors",
                       dict(card, averaged_steps=int(self.average.n_averaged), average_from=cfg.average_from),
                       input_transform=cfg.input)
        if best is not None:
            save_model(best, out / "best.safetensors", card, input_transform=cfg.input)

    def run_epoch(self, batches, stop, checkpoint_minutes):
        """Train on ``batches``; returns ``"stopped"``, ``"timed out"`` (the schedule is done) or None (all done)."""
        for batch in batches:
            if stop_requested(stop):
                return "stopped"
            self.step(batch)
            if time.monotonic() - self.last_ckpt > 60 * checkpoint_minutes:
                self.checkpoint("checkpoint")
                self._reset_running_loss()
            if self.progress() >= 1.0:
                return "timed out"  # by its steps or its time limit
        return None

    def loop(self, stop=None, checkpoint_minutes=5.0, data_workers=None):
        """Run the remaining epochs (or until ``stop`` or the time limit); returns the final state."""
        cfg, state = self.config, self.state
        self.emit(dict(self.event("start"), config=cfg.to_dict(), parameters=count_parameters(self.model),
                       device=str(self.dev), bf16=self.bf16))
        workers = default_data_workers(self.dev) if data_workers is None else int(data_workers)
        pool = data_pool(workers)
        self.model.train()
        ended = "timed out" if self.progress() >= 1.0 else None  # a finished run resumed
        try:
            while state["epoch"] < cfg.epochs and ended is None:
                batches = _epoch_batches(cfg.seed, state["epoch"], cfg.train_size, cfg.batch_size,
                                         state["step_in_epoch"] * cfg.batch_size, cfg.fresh_data, pool, 2 * workers,
                                         cfg.families, cfg.detector, self.size)
                ended = self.run_epoch(batches, stop, checkpoint_minutes)
                if ended == "stopped":
                    break
                if ended == "timed out" and state["step_in_epoch"] < self.steps_per_epoch:
                    self.checkpoint("checkpoint")  # mid-epoch: end as an epoch ends
                    self.checkpoint("epoch", full=True)
                    break
                self._end_epoch()
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        stopped = ended == "stopped"
        if stopped:
            self.checkpoint("checkpoint")
        state["ended"] = "stopped" if stopped else "time limit" if state["epoch"] < cfg.epochs else "done"
        self.emit(dict(self.event("stopped" if stopped else "done"), ended=state["ended"]))
        return state

    def _end_epoch(self):
        self.state["epoch"] += 1
        self.state["step_in_epoch"] = 0
        self.checkpoint("checkpoint")
        self.checkpoint("epoch", full=True)
        self.emit(self.event("epoch"))
        self._reset_running_loss()


#: The trainer's events as the kinds of :class:`napari_cdinn.jobs.ProgressEvent`.
_EVENT_KINDS = {"start": Kind.START, "step": Kind.PROGRESS, "epoch": Kind.PROGRESS, "checkpoint": Kind.CHECKPOINT,
                "validation": Kind.CHECKPOINT, "stopped": Kind.STOPPED, "done": Kind.DONE}


def _event_sender(callback, config):
    """``emit(record)``: ``callback`` gets the record as a :class:`napari_cdinn.jobs.ProgressEvent`.

    Its kind follows the record's ``event`` (:data:`_EVENT_KINDS`), ``done``/``total`` count the
    examples done and planned, and the payload is the record (``event`` its name in the trainer).
    """
    if callback is None:
        return lambda record: None
    total = config.epochs * (config.train_size // config.batch_size) * config.batch_size

    def emit(record):
        callback(ProgressEvent(_EVENT_KINDS[record["event"]], record.get("examples", 0), total, payload=record))

    return emit


def fit(out, config: TrainConfig, *, chosen=None, resume=False, device="auto", callback=None, stop=None,
        checkpoint_minutes=5.0, quick_val_size=2000, command=None, data_workers=None) -> dict:
    """Train the networks with the recipe ``config`` and write checkpoints to the directory ``out``.

    ``chosen`` names the fields the caller set (default: those that differ from the preset
    ``config.preset`` names): they win over the initial weights' architecture and input encoding,
    and on ``resume`` the :data:`~napari_cdinn.nn.config.RESUMABLE` ones among them replace the
    checkpoint's.  The other arguments are those of :func:`train`.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the model folder {str(out)!r} is a file, not a folder")
    if not resume and run_files(out):
        raise ValueError(f"the model folder {str(out)!r} already holds a training run: resume it, or choose a new "
                         "folder")
    if chosen is None:
        chosen = chosen_fields(config)
    dev = resolve_device(device)
    config, state = _resume_point(out, config, chosen) if resume else (config, None)
    init = None
    if state is None and config.init_from is not None:  # a resumed run has its weights
        init, config = _initial_weights(config, chosen)
    # denormal activations are very slow on CPUs; the flag is the process's, so it is set back after the run
    # (a dock trains in the viewer's process, whose other numbers must keep their subnormals)
    torch.set_flush_denormal(True)
    try:
        run = _Run(out, config, state, init, dev, callback=callback, quick_val_size=quick_val_size, command=command)
        return run.loop(stop, checkpoint_minutes, data_workers)
    finally:
        torch.set_flush_denormal(False)


def train(out, preset="paper", *, device="auto", resume=False, callback=None, stop=None, checkpoint_minutes=5.0,
          quick_val_size=2000, command=None, data_workers=None, **options) -> dict:
    """Train the networks and write checkpoints to the directory ``out``.

    Parameters
    ----------
    out : str or Path
        Model directory (created): ``best``/``last`` .safetensors + .json, ``optimizer.pt``.
    preset : str
        Base recipe (:data:`~napari_cdinn.nn.config.PRESETS`).
    **options
        Fields of :class:`~napari_cdinn.nn.config.TrainConfig` that change the preset (each one's
        ``metadata["help"]`` says what it does; None: the preset's value).  ``input_transform`` and
        ``time_limit`` are accepted for ``input`` and ``time_limit_min``.
    device : "auto", "cpu", "cuda", "mps"
    resume : bool
        Continue from ``out/last.safetensors`` and ``out/optimizer.pt`` if they exist; the
        settings stored there win, except ``epochs``, ``time_limit`` (``time_limit_min``),
        ``average_from`` and ``precision`` when given: ``epochs`` sets the schedule's new length
        (longer or shorter, at least one epoch past the current one), and a cosine schedule
        continues from the fraction of it already done.
    callback : callable(ProgressEvent), optional
        Receives :class:`napari_cdinn.jobs.ProgressEvent` (``done``/``total``: examples) whose
        payload, also read as ``event[key]``, is ``{"event": "start"|"step"|"checkpoint"|"validation"|
        "epoch"|"stopped"|"done", "epoch", "step", "examples", "train_loss", "lr", "elapsed_s",
        "examples_per_s"}``, plus ``val_loss`` and ``metrics`` on validation events (and
        ``average_metrics`` with averaging).
    stop : threading.Event or callable returning bool, optional
        Checked every step; when set, a checkpoint is saved and training returns.
    checkpoint_minutes : float
        Wall-clock interval between checkpoints (each with a quick validation).
    quick_val_size : int
        Validation examples used by the checkpoint-time validation.
    command : str, optional
        Command line recorded in the card: ``command`` holds the latest, ``commands`` every start
        and resume with the examples done when it began.
    data_workers : int, optional
        Processes simulating the training examples ahead of the network (:func:`data_pool`;
        default :func:`default_data_workers`: none on a CPU, up to 8 beside a GPU).  The
        examples are the same for any number.

    Returns
    -------
    dict : the final training state (as in ``last.json``), with ``ended``: ``"done"`` (all
        epochs), ``"time limit"`` or ``"stopped"`` (also in the last event).

    Raises
    ------
    ValueError
        One sentence: bad options; ``out`` a file, or (without ``resume``) a folder that already
        holds a training run (:func:`~napari_cdinn.nn.config.run_files`); the training or
        validation loss became NaN or infinite (the diverged weights are not saved; the
        checkpoints already in ``out`` stay as they were).
    """
    config, chosen = resolve_options(preset, **options)
    return fit(out, config, chosen=chosen, resume=resume, device=device, callback=callback, stop=stop,
               checkpoint_minutes=checkpoint_minutes, quick_val_size=quick_val_size, command=command,
               data_workers=data_workers)
