"""CDI NN: the paper's networks, their trainer, shipped weights and fast inference.

No Qt or napari import here; torch is imported only when a function is called.

Public API
----------
predict(intensity, model=None, device="auto", batch_size=None, threshold=0.1)
    Shape, phase and a chi^2 trust score per frame from measured intensities.
load_model(model=None, device="cpu") -> (net, card)
train(out, preset="paper", **options) -> state
    Options are the fields of :class:`TrainConfig` (the recipe); ``PRESETS`` holds its named instances.
adapt.adapt(intensity, out, model=None, mask=None, time_limit_min=10, holdout=0.1, ...) -> card
    Fine-tune a model on measured patterns without ground truth: the submodule :mod:`.adapt`
    (torch-free to import; its function is not re-exported here, as the submodule's name would shadow it).
resolve_model(model=None, shape=None) -> ModelInfo
    Which model reads patterns of ``shape`` (file, architecture, input), checked once, without torch.
predict_chunk, is_trusted, REFINE_OPTIONS
    The chunk function of ``cdinn predict``, the trust rule, the NN-seeded refinement's options.

The command line and the docks use only the names here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import (
    PRESETS,
    TrainConfig,
    check_option,
    cli_fields,
    describe_option,
    option_help,
)
from .models import DEFAULT_MODELS, WEIGHTS_DIR, ModelInfo, read_side, resolve_model

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "DECLINE_CHI2",
    "DEFAULT_MODELS",
    "PRESETS",
    "REFINE_OPTIONS",
    "TRUST_CHI2",
    "WEIGHTS_DIR",
    "ModelInfo",
    "TrainConfig",
    "check_option",
    "choose_scale",
    "cli_fields",
    "declined",
    "describe_option",
    "is_trusted",
    "load_model",
    "off_centre",
    "option_help",
    "predict",
    "predict_chunk",
    "read_side",
    "resolve_model",
    "train",
]

#: Frames whose data-consistency chi^2 beyond counting noise (``chi2 - chi2_noise``, see
#: :func:`predict`) exceeds this are flagged untrusted; they are the ones to refine
#: (``cdinn reconstruct --init nn``).  Chosen so that at most 2 % of frames are trusted but wrong
#: on every condition of the selection sets: docs/decisions.md ("TRUST_CHI2"); the trusted
#: fractions per condition: benchmarks/README.md (bench_realistic).
TRUST_CHI2 = 0.015
#: The network declines patterns that misfit beyond the noise by more than this at the best scale
#: (:func:`choose_scale`) *and* whose objects the autocorrelation shows to be at least as wide as
#: the largest scale reads (:func:`declined`).  The misfit alone does not separate them: a 3-pixel
#: beamstop gives 0.2 and the guess still seeds a good refinement (measured: docs/decisions.md,
#: "Object size").
DECLINE_CHI2 = 0.15


def declined(info: ModelInfo) -> str | None:
    """Why the network should not seed a reconstruction of the patterns :func:`choose_scale` resolved
    ``info`` for (one sentence), or None when it may.

    Declined: the median misfit beyond the noise exceeds :data:`DECLINE_CHI2` at the best scale and
    the autocorrelation's lower bound of the objects' width reaches the largest object the
    network reads at any scale (its object size times the largest scale).  Behind a beamstop the bound is
    unknown and the network is never declined (the fallback to the protocol still runs per frame).
    """
    from .models import scales_for

    if info.misfit is None or info.extent is None or info.frame is None or not info.misfit > DECLINE_CHI2:
        return None
    widest = round(info.size * max(scales_for(info.frame, info.input_factor, info.size)))
    if not info.extent >= widest:
        return None
    return (f"the network cannot read these patterns (median chi2 beyond the noise {info.misfit:.3g} at the best "
            f"scale, above {DECLINE_CHI2}, and the autocorrelation shows objects at least {info.extent:.0f} "
            f"pixels wide, more than the {widest} it reads): the patterns may not be oversampled; the retrieval "
            f"runs from random starts alone")


def off_centre(info: ModelInfo) -> str | None:
    """One sentence when :func:`choose_scale` re-centred the patterns it resolved ``info`` for (their
    mean pattern's centre of symmetry lies off the centre pixel, and the network fits them better re-centred:
    :func:`napari_cdinn.nn.inference.recentre`), else None."""
    if not info.offset:
        return None
    dy, dx = info.offset
    size = f" --size {info.frame[-1]}" if info.frame else ""
    return (f"the patterns are symmetric about a pixel ({dy:+d}, {dx:+d}) from their centre pixel: the network "
            f"reads them re-centred there (the pixels moved in unmeasured; its objects carry the matching phase "
            f"ramp); `cdinn prepare --centre symmetry{size}` cuts them centred")


def choose_scale(*args: Any, **kwargs: Any) -> ModelInfo:
    from .inference import choose_scale as _choose_scale

    return _choose_scale(*args, **kwargs)


def predict(*args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
    from .inference import predict as _predict

    return _predict(*args, **kwargs)


def load_model(*args: Any, **kwargs: Any) -> tuple[torch.nn.Module, dict]:
    from .checkpoint import load_model as _load

    return _load(*args, **kwargs)


def train(*args: Any, **kwargs: Any) -> dict:
    from .trainer import train as _train

    return _train(*args, **kwargs)


def predict_chunk(*args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
    from .inference import predict_chunk as _predict_chunk

    return _predict_chunk(*args, **kwargs)


def is_trusted(*args: Any, **kwargs: Any) -> np.ndarray:
    from .inference import is_trusted as _is_trusted

    return _is_trusted(*args, **kwargs)


def __getattr__(name):
    # constants defined beside torch code, read only when asked for (keeps this import torch-free)
    if name == "REFINE_OPTIONS":
        from .inference import REFINE_OPTIONS

        return REFINE_OPTIONS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
