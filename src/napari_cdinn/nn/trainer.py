"""Training loop for the CDI NN networks on the paper's simulated data.

Recipe (``preset="paper"``): binary cross-entropy on the sigmoid outputs (phase scaled to
0..1), Adam (lr 1e-3), batch 256, 10 epochs of 180,000 training examples, 20,000 validation
examples.  The preset's architecture is the shared-encoder variant (``arch="shared"``); the
paper's separate pair is ``arch="paper"``.  Measured here: with the twin-invariant loss the
pair's phase network stayed at the zero-phase answer (validation phase RMS 0.83 rad, the
trivial value) for 460,000 examples, while the shared encoder, whose two heads read the same
features and so agree on which twin to draw, was at 0.67 rad after 70,000 and kept improving.
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
"""

from __future__ import annotations

import collections
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import physics
from ..retrieval.engine import stop_requested
from ..simulate import BLOCK
from .checkpoint import load_model, resolve_model_path, save_model
from .data import make_examples, make_objects, prepare_examples
from .inference import decode_outputs, oversampled_intensity
from .networks import build_model, count_parameters, input_factor_of, widen_state_dict
from .runtime import autocast, bf16_supported, resolve_device

__all__ = [
    "PRESETS",
    "VAL_SEED_OFFSET",
    "data_consistency_loss",
    "evaluate",
    "oversampled_intensity",
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

PRESETS = {
    "paper": {"arch": "shared", "train_size": 180_000, "val_size": 20_000, "epochs": 10, "batch_size": 256,
              "lr": 1e-3, "schedule": "constant", "input": "linear"},
    "tiny": {"arch": "paper", "train_size": 2048, "val_size": 256, "epochs": 2, "batch_size": 64,
             "lr": 1e-3, "schedule": "constant", "input": "linear"},
}


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
        probability over ``1 / (1 + w)``.  Measured: at 1 (the most probable support) the
        shipped network drew a tighter support, missing more of the object (3.6 % -> 4.8 % of
        its pixels), and the masked phase got worse; a missed pixel costs the phase error, an
        extra one only the IoU, so ``w > 1``.

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


def data_consistency_loss(amp_logit, phase_logit, measured, factor=DATA_OVERSAMPLING):
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

    Returns
    -------
    Tensor (N,) float32
    """
    amp, phase, _ = decode_outputs(torch.sigmoid(amp_logit.float()), torch.sigmoid(phase_logit.float()))
    fit = (oversampled_intensity(amp, phase, factor) + 1e-12).sqrt()
    m = measured.float()
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
            x = _to_tensor(data["input"][sl], device)
            with autocast(device, bf16):
                la, lp = model.logits(x)
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


def _epoch_batches(seed, epoch, train_size, batch_size, skip_examples=0, fresh=False, pool=None, ahead=2):
    """Yield the objects of one epoch's training batches (dicts of ``amplitude`` and ``phase`` arrays),
    skipping the first ``skip_examples``; :func:`napari_cdinn.nn.data.prepare_examples` makes them examples.

    With ``fresh`` every epoch draws new examples: epoch ``e`` uses the simulator's examples from
    ``e * train_size`` (rounded up to a whole ``BLOCK``) on, so no example is seen twice.  With a
    process ``pool`` the chunks are simulated ``ahead`` at a time, in parallel; the batches are the same.
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
        job = {"count": count, "seed": seed, "start": offset + start}
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
    else all cores but one, at most 8."""
    return 0 if torch.device(device).type == "cpu" else min(8, max((os.cpu_count() or 2) - 1, 1))


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


def _progress(config, step, total_steps, elapsed_s=0.0):
    """Fraction of the schedule done: of its steps or, with a ``time_limit_min``, of its time if further."""
    frac = step / max(total_steps, 1)
    limit = config.get("time_limit_min")
    if limit:
        frac = max(frac, elapsed_s / (60.0 * limit))
    return min(frac, 1.0)


def _lr_at(config, step, total_steps, elapsed_s=0.0):
    if config["schedule"] == "cosine":
        frac = _progress(config, step, total_steps, elapsed_s)
        return config["lr"] * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))
    return config["lr"]


def _initial_weights(model, config, arch, input_transform):
    """State dict of the model ``init_from`` names, and ``config`` updated to its architecture.

    ``shared`` weights started as ``arch="shared2x"`` are widened (:func:`widen_state_dict`): the
    2x-input net then begins exactly where the 32 x 32 one stands.
    """
    path = resolve_model_path(model)
    net, card = load_model(path)
    state = net.state_dict()
    found = {"arch": net.arch, "input": net.input_transform}
    if arch is not None and net.arch == "shared" and input_factor_of(arch) > 1:
        state, found["arch"] = widen_state_dict(state, input_factor_of(arch)), arch
    for key, given in (("arch", arch), ("input", input_transform)):
        if given is not None and given != found[key]:
            raise ValueError(f"--{key} {given} conflicts with the {found[key]!r} of the initial weights {str(path)!r}")
    config = dict(config, **found, init_from=str(path), init_examples=card.get("examples"))
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


def train(
    out,
    preset="paper",
    arch=None,
    train_size=None,
    val_size=None,
    epochs=None,
    batch_size=None,
    lr=None,
    schedule=None,
    device="auto",
    seed=0,
    resume=False,
    callback=None,
    stop=None,
    checkpoint_minutes=5.0,
    quick_val_size=2000,
    precision="auto",
    command=None,
    input_transform=None,
    shift=None,
    fresh_data=None,
    init_from=None,
    phase_weight=None,
    data_weight=None,
    support_weight=None,
    miss_weight=None,
    data_workers=None,
    time_limit=None,
    average_from=None,
):
    """Train the networks and write checkpoints to the directory ``out``.

    Parameters
    ----------
    out : str or Path
        Model directory (created): ``best``/``last`` .safetensors + .json, ``optimizer.pt``.
    preset : str
        Base settings (:data:`PRESETS`); any other argument given overrides them.
    arch : {"paper", "shared", "shared2x"}
        ``shared2x`` reads the 2x-oversampled patterns (:mod:`napari_cdinn.nn.networks`); with
        ``init_from`` naming ``shared`` weights it starts from them, widened.
    train_size, val_size, epochs, batch_size, lr : optional overrides
    schedule : {"constant", "cosine"}
        Learning rate schedule (cosine decays to 2 % of ``lr`` over all epochs).
    device : "auto", "cpu", "cuda", "mps"
    seed : int
        Simulator seed of the training data (validation: ``seed + VAL_SEED_OFFSET``).
    resume : bool
        Continue from ``out/last.safetensors`` and ``out/optimizer.pt`` if they exist; the
        settings stored there win, except an explicit ``epochs``: it sets the schedule's new
        length (longer or shorter, at least one epoch past the current one), and a cosine
        schedule continues from the fraction of it already done.
    callback : callable(dict), optional
        Receives events: ``{"event": "start"|"step"|"checkpoint"|"validation"|"epoch"|"stopped"|"done",
        "epoch", "step", "examples", "train_loss", "lr", "elapsed_s", "examples_per_s"}``, plus
        ``val_loss`` and ``metrics`` on validation events.
    stop : threading.Event or callable returning bool, optional
        Checked every step; when set, a checkpoint is saved and training returns.
    checkpoint_minutes : float
        Wall-clock interval between checkpoints (each with a quick validation).
    quick_val_size : int
        Validation examples used by the checkpoint-time validation.
    precision : {"auto", "fp32", "bf16"}
        bf16 autocast (weights stay float32); ``auto`` uses it where the hardware has bf16.
    command : str, optional
        Command line recorded in the card: ``command`` holds the latest, ``commands`` every start
        and resume with the examples done when it began.
    input_transform : {"linear", "log"}, optional
        Input encoding (:func:`napari_cdinn.nn.data.encode_inputs`); the paper's is ``linear``.
    shift : int, optional
        Position tolerance of the loss in pixels (:func:`twin_invariant_loss`; default 0).
    phase_weight : float, optional
        Weight of the phase term of the loss (:func:`twin_invariant_loss`; default 1).
    data_weight : float, optional
        Weight of the data-consistency term (:func:`data_consistency_loss` against the 2x
        oversampled pattern) added to the supervised loss (default 0: the paper's loss alone).
    support_weight : float, optional
        Weight of the support term of the loss (:func:`twin_invariant_loss`; default 0: none).
    miss_weight : float, optional
        Weight of object against background pixels in the support term (:func:`twin_invariant_loss`;
        default 1).
    fresh_data : bool, optional
        Draw new simulated examples every epoch instead of repeating the same ``train_size``
        (default False, the paper's fixed set); an "epoch" is then ``train_size`` examples.
    init_from : str or path, optional
        Start from these weights (a model name, file or directory, as ``cdinn predict --model``)
        with a fresh optimizer and schedule: fine-tuning or continuing shipped weights.  Their
        architecture and input encoding are used unless given; a conflict raises ``ValueError``.
        Ignored when ``resume`` finds a checkpoint in ``out``.
    data_workers : int, optional
        Processes simulating the training examples ahead of the network (:func:`data_pool`;
        default :func:`default_data_workers`: none on a CPU, up to 8 beside a GPU).  The
        examples are the same for any number.
    time_limit : float, optional
        Minutes of training (validation included, across resumes) after which the run ends as
        if its last epoch had: a final checkpoint and full validation.  The schedule's progress is
        then the larger of its steps' and its time's fraction, so a cosine schedule decays to its
        end by the deadline whatever the hardware's speed: give ``epochs`` generously.  The
        examples seen then depend on the speed; the card records them.  Kept on ``resume``
        unless given again.
    average_from : float, optional
        Stochastic weight averaging (Izmailov et al. 2018, ``torch.optim.swa_utils.AveragedModel``):
        from this fraction of the schedule on (0 <= f < 1, see ``time_limit``), the running mean of
        the weights after every step is kept and saved beside ``last`` as ``average.safetensors``
        (+ ``.json``: ``averaged_steps``).  Every checkpoint's quick validation also scores the
        average (``average_metrics`` in the history and the events), and ``best`` is whichever of
        the current and the averaged weights scored best (``best["weights"]``: ``"current"`` or
        ``"average"``).  Default: off.  Kept on ``resume`` (with the average so far) unless given again.

    Returns
    -------
    dict : the final training state (as in ``last.json``), with ``ended``: ``"done"`` (all
        epochs), ``"time limit"`` or ``"stopped"`` (also in the last event).
    """
    out = Path(out)
    emit = callback or (lambda event: None)
    config = dict(PRESETS[preset]) if preset in PRESETS else None
    if config is None:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    overrides = {"arch": arch, "train_size": train_size, "val_size": val_size, "epochs": epochs,
                 "batch_size": batch_size, "lr": lr, "schedule": schedule, "input": input_transform,
                 "shift": shift, "fresh_data": fresh_data, "phase_weight": phase_weight, "data_weight": data_weight,
                 "support_weight": support_weight, "miss_weight": miss_weight}
    config.update({k: v for k, v in overrides.items() if v is not None})
    config.update(preset=preset, seed=int(seed), precision=precision)
    if time_limit is not None:
        config["time_limit_min"] = float(time_limit)
    if average_from is not None:
        if not 0.0 <= float(average_from) < 1.0:
            raise ValueError(f"average_from must be a fraction of the schedule in [0, 1), got {average_from}")
        config["average_from"] = float(average_from)
    if config["train_size"] < config["batch_size"]:
        raise ValueError("the training set must hold at least one batch")
    dev = resolve_device(device)
    state_path = out / "last.json"
    state = None
    if resume and state_path.is_file() and (out / "last.safetensors").is_file():
        state = json.loads(state_path.read_text())
        saved = state["config"]
        if epochs is not None:  # a new schedule length, never shorter than what is already done
            saved["epochs"] = max(int(epochs), state["epoch"] + 1)
        for key in ("time_limit_min", "average_from"):
            if key in config:  # given again with this resume
                saved[key] = config[key]
        config = saved
        init_from = None
    resumed = state is not None
    init = None
    if init_from is not None:
        init, config = _initial_weights(init_from, config, arch, input_transform)
    bf16 = precision == "bf16" or (precision == "auto" and bf16_supported(dev))
    torch.set_flush_denormal(True)  # denormal activations are very slow on CPUs
    torch.manual_seed(config["seed"])
    model = build_model(config["arch"])
    if init is not None:
        model.load_state_dict(init)
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    if state is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(out / "last.safetensors")))
        if (out / "optimizer.pt").is_file():
            opt.load_state_dict(torch.load(out / "optimizer.pt", map_location="cpu", weights_only=True))
    else:
        state = {
            "config": config,
            "epoch": 0,
            "step_in_epoch": 0,
            "step": 0,
            "examples": 0,
            "elapsed_s": 0.0,
            "history": [],
            "best": None,
            "parameters": count_parameters(model),
        }
    state["command"] = command or state.get("command")
    if command:  # every start and resume, with the examples done when it began
        state.setdefault("commands", []).append({"command": command, "from_examples": state["examples"]})
    state["torch"] = torch.__version__
    model.to(dev).to(memory_format=torch.channels_last)
    for g in opt.state.values():
        for k, v in g.items():
            if torch.is_tensor(v):
                g[k] = v.to(dev)
    average = _load_average(out, model, dev) if resumed and config.get("average_from") is not None else None
    factor = input_factor_of(config["arch"])
    val = make_examples(config["val_size"], config["seed"] + VAL_SEED_OFFSET, transform=config.get("input", "linear"),
                        input_factor=factor)
    quick = {k: v[: min(quick_val_size, config["val_size"])] for k, v in val.items()}
    steps_per_epoch = config["train_size"] // config["batch_size"]
    total_steps = steps_per_epoch * config["epochs"]
    t0 = time.monotonic() - state["elapsed_s"]
    last_ckpt = time.monotonic()
    run_loss, run_n = 0.0, 0
    t_rate, n_rate = time.monotonic(), 0

    def base_event(name):
        return {
            "event": name,
            "epoch": state["epoch"],
            "step": state["step"],
            "examples": state["examples"],
            "train_loss": float(run_loss) / run_n if run_n else None,
            "lr": opt.param_groups[0]["lr"],
            "elapsed_s": time.monotonic() - t0,
        }

    def checkpoint(kind, full=False):
        state["elapsed_s"] = time.monotonic() - t0
        metrics = evaluate(model, val if full else quick, dev, bf16)
        record = dict(base_event(kind), val_loss=metrics["loss"], metrics=metrics, full_validation=full)
        candidates = [("current", model, metrics)]
        if average is not None and not full:  # the average is scored by the quick validation only
            avg_metrics = evaluate(average.module, quick, dev, bf16)
            record.update(average_metrics=avg_metrics, averaged_steps=int(average.n_averaged))
            candidates.append(("average", average.module, avg_metrics))
        model.train()
        state["history"].append(record)
        name, net, m = min(candidates, key=lambda c: _score(c[2]))  # the current weights win a tie
        best = state.get("best")
        improved = not full and (best is None or _score(m) < _score(best["metrics"]))  # by the quick validation
        if improved:
            state["best"] = {"step": state["step"], "examples": state["examples"], "metrics": m, "weights": name}
            if name == "average":
                state["best"]["averaged_steps"] = int(average.n_averaged)
        card = dict(state, arch=config["arch"], val_metrics=metrics, train_loss=record["train_loss"], val_loss=metrics["loss"])
        transform = config.get("input", "linear")
        save_model(model, out / "last.safetensors", card, input_transform=transform)
        torch.save(opt.state_dict(), out / "optimizer.pt")
        if average is not None:
            save_model(average.module, out / "average.safetensors",
                       dict(card, averaged_steps=int(average.n_averaged), average_from=config["average_from"]),
                       input_transform=transform)
        if improved:
            save_model(net, out / "best.safetensors", card, input_transform=transform)
        emit(dict(record, event="validation" if full else "checkpoint"))
        return metrics

    emit(dict(base_event("start"), config=config, parameters=count_parameters(model), device=str(dev), bf16=bf16))
    workers = default_data_workers(dev) if data_workers is None else int(data_workers)
    pool = data_pool(workers)
    model.train()
    stopped = False
    timed_out = _progress(config, state["step"], total_steps, state["elapsed_s"]) >= 1.0  # a finished run resumed
    try:
        while state["epoch"] < config["epochs"] and not (stopped or timed_out):
            batches = _epoch_batches(config["seed"], state["epoch"], config["train_size"], config["batch_size"],
                                     state["step_in_epoch"] * config["batch_size"], config.get("fresh_data", False),
                                     pool, 2 * workers)
            for batch in batches:
                if stop_requested(stop):
                    stopped = True
                    break
                for g in opt.param_groups:
                    g["lr"] = _lr_at(config, state["step"], total_steps, time.monotonic() - t0)
                # the simulator processes drew the objects; their patterns and targets are computed here
                ex = prepare_examples(*(torch.from_numpy(batch[k]).to(dev) for k in ("amplitude", "phase")),
                                      config.get("input", "linear"), factor)
                x = _nchw(ex["input"])
                t = [_nchw(ex[k], False) for k in _TARGETS]
                with autocast(dev, bf16):
                    la, lp = model.logits(x)
                loss, _ = twin_invariant_loss(la, lp, *t, shift=config.get("shift", 0),
                                              phase_weight=config.get("phase_weight", 1.0),
                                              support_weight=config.get("support_weight", 0.0),
                                              miss_weight=config.get("miss_weight", 1.0))
                if config.get("data_weight", 0.0) > 0:
                    measured = _measured_amplitudes(ex, factor, config.get("input", "linear"))
                    loss = loss + config["data_weight"] * data_consistency_loss(la, lp, measured).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                n = len(x)
                state["step"] += 1
                if config.get("average_from") is not None and average is None and (
                        _progress(config, state["step"], total_steps, time.monotonic() - t0) >= config["average_from"]):
                    average = torch.optim.swa_utils.AveragedModel(model)
                if average is not None:
                    average.update_parameters(model)
                state["step_in_epoch"] += 1
                state["examples"] += n
                run_loss, run_n = run_loss + loss.detach() * n, run_n + n  # no device sync per step
                n_rate += n
                if state["step"] % 20 == 0:
                    now = time.monotonic()
                    emit(dict(base_event("step"), examples_per_s=n_rate / max(now - t_rate, 1e-9)))
                    t_rate, n_rate = now, 0
                if time.monotonic() - last_ckpt > 60 * checkpoint_minutes:
                    checkpoint("checkpoint")
                    run_loss, run_n = 0.0, 0
                    last_ckpt = time.monotonic()
                if _progress(config, state["step"], total_steps, time.monotonic() - t0) >= 1.0:
                    timed_out = True  # the schedule is done (by its steps or its time limit)
                    break
            if stopped:
                break
            if timed_out and state["step_in_epoch"] < steps_per_epoch:  # mid-epoch: end as an epoch ends
                checkpoint("checkpoint")
                checkpoint("epoch", full=True)
                break
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            checkpoint("checkpoint")
            checkpoint("epoch", full=True)
            emit(base_event("epoch"))
            run_loss, run_n = 0.0, 0
            last_ckpt = time.monotonic()
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    if stopped:
        checkpoint("checkpoint")
    state["ended"] = "stopped" if stopped else "time limit" if state["epoch"] < config["epochs"] else "done"
    emit(dict(base_event("stopped" if stopped else "done"), ended=state["ended"]))
    return state
