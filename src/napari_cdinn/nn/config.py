"""One training configuration: :class:`TrainConfig`, its presets, and the rules its values obey.

The trainer (:mod:`napari_cdinn.nn.trainer`) consumes a :class:`TrainConfig`; ``cdinn train``
generates its recipe options from the fields (name, help, choices, bounds and flag live in each
field's ``metadata``); the napari training dock builds one from its widgets, its tooltips taken
from the same help.  Adding an option means adding one field here.  Its dict form
(:meth:`TrainConfig.to_dict`, i.e. :func:`dataclasses.asdict`) is the ``config`` of a model
directory's ``last.json`` and of every model card; :meth:`TrainConfig.from_dict` reads it back,
filling keys an older run did not record with their defaults.

No torch import here: the command line builds its parser from this module.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_SEED", "PRESETS", "RESUMABLE", "TrainConfig", "check_option", "chosen_fields", "cli_fields",
           "describe_option", "option_help", "resolve_options", "run_files"]

#: The largest seed a run takes: torch's generators take 64-bit seeds, and a run seeds them with
#: ``seed * 7919 + step`` (:mod:`napari_cdinn.nn.trainer`, :mod:`napari_cdinn.nn.adapt`).
MAX_SEED = 2**32 - 1

#: Checks a numeric option may carry: name -> (test, words for "expected ...").
_CHECKS = {
    "positive": (lambda v: v > 0, "positive"),
    "non-negative": (lambda v: v >= 0, ">= 0"),
    "fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "seed": (lambda v: 0 <= v <= MAX_SEED, f"from 0 to {MAX_SEED}"),
}

#: Fields a resumed run takes from the caller when given (the checkpoint's config wins for the others).
RESUMABLE = ("epochs", "time_limit_min", "average_from", "precision")

#: Former keyword names of :func:`napari_cdinn.nn.train`, still accepted.
_ALIASES = {"input_transform": "input", "time_limit": "time_limit_min"}


def _option(default, help, kind, *, choices=None, check=None, cli="", metavar=None):
    """A :class:`TrainConfig` field: its default and its metadata, the one description of the option.

    ``kind`` is the value's type (int, float, str or bool); ``choices`` its allowed values;
    ``check`` a key of ``_CHECKS``; ``cli`` the command-line flag ("" for ``--name-with-dashes``,
    None for a field the trainer records but no one sets); ``metavar`` the flag's value name.
    """
    meta = {"help": help, "kind": kind, "choices": choices, "check": check, "cli": cli, "metavar": metavar}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    """The recipe of a training run: data, network, loss, optimiser and schedule.

    Defaults are the ``paper`` preset (:data:`PRESETS`).  Each field's ``metadata["help"]`` says
    what it does (``cdinn train --help`` prints them all).  Values are checked on construction
    (``ValueError``); a ``float`` field takes an ``int``.

    Not part of the recipe, and so not fields, are the options that say where and how a run
    happens but not what it learns: the model directory ``out``, ``device``, ``resume``, the
    ``callback`` and ``stop`` hooks, ``checkpoint_minutes``, ``quick_val_size``, the recorded
    ``command``, ``data_workers`` (the examples do not depend on it) and the CLI's ``threads``.
    They are arguments of :func:`napari_cdinn.nn.trainer.train` (and options of ``cdinn train``).

    Notes
    -----
    * ``init_from`` starts from trained weights with a fresh optimizer and schedule; their
      architecture and input encoding replace the preset's, but one the caller chose that
      conflicts with them raises ``ValueError`` (``shared`` weights started as ``shared2x`` are
      widened, ``shared2x`` ones started as ``deep2x`` deepened).  Their mask channel, object
      families and detector model go on too, unless chosen (weights without the mask channel get
      it with ``mask_channel``).  The trainer then records the resolved file and ``init_examples``.
    * ``time_limit_min``: the schedule's progress is the larger of its steps' and its time's
      fraction, so a cosine schedule decays by the deadline whatever the hardware: give ``epochs``
      generously.  The run then ends as if its last epoch had (checkpoint, full validation).
    * ``average_from``: stochastic weight averaging (Izmailov et al. 2018) from this fraction of
      the schedule on; the mean is saved as ``average.safetensors`` and is scored at every
      checkpoint, becoming ``best`` when it validates better.
    * On resume the checkpoint's config wins, except for the :data:`RESUMABLE` fields the caller
      gives: ``epochs`` sets the schedule's new length (at least one epoch past the current one).
    """

    arch: str = _option("shared", "network: shared (one encoder, two heads), paper (the paper's separate pair), "
                        "shared2x (the shared net reading the whole 2x-oversampled pattern; started from "
                        "shared weights, widened) or deep2x (shared2x with one more level: 64-pixel objects "
                        "in 2x-oversampled 128 x 128 patterns)", str, choices=("paper", "shared", "shared2x", "deep2x"))
    train_size: int = _option(180_000, "training examples per epoch", int, check="positive")
    val_size: int = _option(20_000, "validation examples", int, check="positive")
    epochs: int = _option(10, "epochs (with --resume: the schedule's new length)", int, check="positive")
    batch_size: int = _option(256, "batch size", int, check="positive")
    lr: float = _option(1e-3, "Adam learning rate", float, check="positive")
    schedule: str = _option("constant", "learning-rate schedule (cosine: decays to 2 percent of lr by the "
                            "schedule's end)", str, choices=("constant", "cosine"))
    input: str = _option("linear", "input encoding of the diffraction amplitudes", str, choices=("linear", "log"))
    shift: int = _option(0, "position tolerance of the loss in pixels", int, check="non-negative")
    fresh_data: bool = _option(False, "new simulated examples every epoch instead of the paper's fixed "
                               "training set (an epoch is then train_size examples)", bool)
    phase_weight: float = _option(1.0, "weight of the phase term of the loss (the paper's: 1)", float,
                                  check="positive")
    data_weight: float = _option(0.0, "weight of the data-consistency term (amplitude chi^2 of each prediction "
                                 "against its own oversampled pattern) added to the loss (0: the paper's loss)",
                                 float, check="non-negative")
    support_weight: float = _option(0.0, "weight of the support term (BCE of the shape's 0.1 threshold against "
                                    "the true support) added to the loss (0: the paper's loss)",
                                    float, check="non-negative")
    miss_weight: float = _option(1.0, "weight of object against background pixels in the support term (above 1 "
                                 "the shape threshold draws more of the object)", float, check="positive")
    families: str | None = _option(None, "object families of the training data (default: the paper's convex "
                                   "flat objects; realistic mixes in textured and non-convex objects; realistic-paper: more of "
                                   "the paper's)", str, choices=("paper", "textured", "holes", "realistic",
                                                                 "realistic-paper"))
    detector: str | None = _option(None, "detector model of the training patterns (default ideal; realistic: "
                                   "counting noise, background, beamstop, gaps, saturation; realistic-clean: 40 percent "
                                   "noise-free; realistic-offcentre: that with half the patterns cut up to 2 px "
                                   "off-centre)", str, choices=("ideal", "realistic", "realistic-clean",
                                                                "realistic-offcentre"))
    mask_channel: bool = _option(False, "give the network the map of unmeasured pixels as an input (added, "
                                 "zero-initialised, to initial weights without it)", bool)
    preset: str = _option("paper", "base settings the other options change", str)
    seed: int = _option(0, "simulator seed of the training data (validation: seed + 1000000)", int, check="seed")
    precision: str = _option("auto", "bf16 autocast (weights stay float32); auto: where the hardware has bf16",
                             str, choices=("auto", "fp32", "bf16"))
    time_limit_min: float | None = _option(None, "end training after MIN minutes, a cosine schedule decaying by "
                                           "then (give --epochs generously)", float, check="positive",
                                           cli="--time-limit", metavar="MIN")
    average_from: float | None = _option(None, "stochastic weight averaging from this fraction (0..1) of the "
                                         "schedule on: the mean of the weights is saved as average.safetensors "
                                         "and becomes best when it validates better", float, check="fraction",
                                         metavar="F")
    init_from: str | None = _option(None, "start from these weights (model name, file or directory) with a fresh "
                                    "optimizer and schedule", str, metavar="MODEL")
    init_examples: int | None = _option(None, "examples the initial weights had seen (recorded from their card)",
                                        int, cli=None)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            object.__setattr__(self, f.name, check_option(f.name, value))
        if self.train_size < self.batch_size:
            raise ValueError("the training set must hold at least one batch")

    def to_dict(self) -> dict[str, Any]:
        """The dict form (``dataclasses.asdict``): the ``config`` of ``last.json`` and of model cards."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config: dict) -> TrainConfig:
        """A config from its dict form; keys it lacks (an older run's) take their defaults, unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def replace(self, **changes) -> TrainConfig:
        """This config with ``changes`` (field names; a value of None keeps the field as it is)."""
        changes = _canonical(changes)
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_preset(cls, preset: str = "paper", **options) -> TrainConfig:
        """The preset named ``preset`` with ``options`` (field names; None: the preset's value)."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
        return PRESETS[preset].replace(**options)


def _canonical(options: dict) -> dict:
    """``options`` under field names (former keyword names translated); unknown names raise ``TypeError``."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in options.items():
        key = _ALIASES.get(key, key)
        if key not in names:
            raise TypeError(f"unknown training option {key!r}")
        out[key] = value
    return out


def resolve_options(preset: str = "paper", **options) -> tuple[TrainConfig, frozenset[str]]:
    """The preset with ``options`` applied, and the names of the fields the options chose (not None)."""
    config = TrainConfig.from_preset(preset, **options)
    return config, frozenset(k for k, v in _canonical(options).items() if v is not None)


def chosen_fields(config: TrainConfig) -> frozenset[str]:
    """The fields of ``config`` that differ from the preset it names (all set fields if it names none)."""
    base = PRESETS.get(config.preset)
    return frozenset(f.name for f in dataclasses.fields(config)
                     if getattr(config, f.name) is not None
                     and (base is None or getattr(config, f.name) != getattr(base, f.name)))


def _field(name: str) -> dataclasses.Field:
    for f in dataclasses.fields(TrainConfig):
        if f.name == name:
            return f
    raise TypeError(f"unknown training option {name!r}")


def option_help(name: str) -> str:
    """The help text of the option ``name`` (a :class:`TrainConfig` field)."""
    return _field(name).metadata["help"]


def describe_option(name: str) -> str:
    """What a value of the option ``name`` must be, in words (e.g. ``a positive integer``)."""
    meta = _field(name).metadata
    kind = meta["kind"]
    if meta["choices"]:
        return "one of " + ", ".join(meta["choices"])
    if meta["check"] == "fraction":
        return "a fraction in [0, 1)"
    noun = {int: "an integer", float: "a number", bool: "true or false"}.get(kind, "a string")
    words = _CHECKS[meta["check"]][1] if meta["check"] else None
    if words == "positive":
        return "a positive " + noun.split(" ", 1)[1]
    return f"{noun} {words}" if words else noun


def check_option(name: str, value):
    """``value`` as the option ``name`` holds it (an int as a float where it takes floats), or ``ValueError``."""
    meta = _field(name).metadata
    kind = meta["kind"]
    ok = True
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        value = int(value) if ok else value
    elif kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    if ok and meta["choices"]:
        ok = value in meta["choices"]
    if ok and meta["check"]:
        ok = _CHECKS[meta["check"]][0](value)
    if not ok:
        raise ValueError(f"{name} must be {describe_option(name)}, got {value!r}")
    return value


def cli_fields() -> list[tuple[dataclasses.Field, str]]:
    """``(field, flag)`` of every option ``cdinn train`` sets (all fields but those only recorded)."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        flag = f.metadata["cli"]
        if flag is not None:
            out.append((f, flag or "--" + f.name.replace("_", "-")))
    return out


#: The files a training run writes to its model directory (:mod:`napari_cdinn.nn.trainer`).
RUN_FILES = ("last.safetensors", "last.json", "best.safetensors", "best.json", "average.safetensors", "average.json",
             "optimizer.pt")


def run_files(out) -> list[str]:
    """The files of a training run (:data:`RUN_FILES`) that the model directory ``out`` holds (none if it is no folder).

    A new run (no ``resume``) into a directory that holds any would overwrite them: the trainer
    and ``cdinn train`` refuse it.
    """
    return [name for name in RUN_FILES if os.path.isfile(os.path.join(os.fspath(out), name))]


#: Named starting points: ``paper`` (the paper's sizes, the shared-encoder network) and ``tiny`` (a smoke run).
PRESETS: dict[str, TrainConfig] = {
    "paper": TrainConfig(),
    "tiny": TrainConfig(preset="tiny", arch="paper", train_size=2048, val_size=256, epochs=2, batch_size=64),
}
