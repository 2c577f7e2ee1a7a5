"""What uses both engines: iterative phase retrieval seeded by the network's guess.

:mod:`napari_cdinn.nn` and :mod:`napari_cdinn.retrieval` never import each other; this module
sits above both and imports them only when a function is called (torch stays unimported).

NN-seeded refinement with a fallback (:func:`refine_with_fallback`)
-------------------------------------------------------------------
Every frame is refined from the network's guess and support by a short run
(:func:`napari_cdinn.nn.inference.refine_options`: 50 iterations per 32 pixels of the guess's
side; on frames whose counting noise is above
:data:`NOISY_CHI2`, by error reduction alone, :data:`NOISY_REFINE`).  The frames
:func:`fallback_frames` selects are also inverted by the full protocol from random starts (the
caller's reconstruct options: by default :mod:`napari_cdinn.protocol`'s, not the refinement's), and
each of them keeps the result that fits the data better beyond the counting noise
(:func:`keep_lower_chi2`: the lower chi^2 on noise-free data; on counts, a fit under the noise
floor counts as at it, so a protocol that follows the noise does not win by it); ``start``
records which one won (1 = network, 0 = protocol).
With ``prtf=True`` the protocol runs on every frame, whatever the rule, with all its random
starts (``n_starts >= 2``), and the PRTF and resolution come from those starts
(:func:`napari_cdinn.retrieval.reconstruct`); which result is kept follows the rule as without it
(the protocol's result is the best of all its starts).  The network-seeded refinement is one
deterministic short run from one guess, not a sample of the solutions the data allow, so the
PRTF measures how reproducibly the data are inverted from random starts.
Rules:

* ``"auto"`` (default): the protocol runs on the frames that the protocol's own restart rule
  would start again (:func:`napari_cdinn.protocol.needs_restart`): those whose refined chi^2
  exceeds the chi^2 of counting noise alone (:func:`napari_cdinn.physics.noise_chi2`, 0 for data
  that are not counts) by more than ``max(RESTART_CHI2, RESTART_NOISE * chi2_noise)``, or is not
  finite; faint frames (:func:`faint`) only where the refinement has no chi^2, since the protocol
  could not replace it there (:func:`keep_lower_chi2`).  The network's own trust flag is not
  asked: a refinement that fits the data is kept whatever its start looked like.
* ``"always"``: the protocol runs on every frame; the result is then never worse by chi^2 beyond
  the noise than the protocol alone with the same options and seed (its random starts are those of
  the whole stack), faint frames aside, at the cost of both runs.
* ``"never"``: the refinement alone (start 1 everywhere).

Why this rule: one rule decides when a pattern deserves another start from random phases, after a
protocol run and after the refinement alike.  A frame refined within it has converged as far as a
restart could tell; a refinement stuck above it may be beaten by the protocol, so the protocol is
run and the better fit kept.  The refinement itself is one run (``n_starts=1``) from the
network's guess.  A stricter threshold (1e-4 beyond the noise, the rule until 2026-12-06) sent
twice as many frames to the protocol for the same medians (measured: docs/decisions.md,
"Refinement falls back under the restart rule").  Asking the network's trust flag as well sent
many noise-free frames to the protocol for no gain in quality (docs/decisions.md, "Refinement of
noisy frames").
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .checks import check_mask_layout, whole_number

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from .nn import ModelInfo

    #: A model as the engines take it: a shipped name, a weights file or folder, a resolved model.
    Model = str | os.PathLike | ModelInfo | None

__all__ = [
    "FALLBACK_RULES",
    "LOW_DOSE_CHI2",
    "curves_on_one_grid",
    "fallback_frames",
    "faint",
    "fit_summary",
    "fits",
    "guess_fits_autocorrelation",
    "keep_lower_chi2",
    "make_report",
    "network_guess",
    "network_start",
    "noise_floor",
    "reconstruct_chunk",
    "refine_with_fallback",
    "seeding_model",
]

#: Fallback rules of :func:`refine_with_fallback` (see the module notes).
FALLBACK_RULES = ("auto", "always", "never")
#: Frames whose counting noise alone gives a chi^2 above this (:func:`napari_cdinn.physics.noise_chi2`;
#: about 1e5 photons per 64 x 64 pattern) are refined by error reduction alone: HIO's feedback
#: amplifies the noise (measured: ``benchmarks/README.md``, bench_realistic, and docs/decisions.md).
NOISY_CHI2 = 2e-4
#: Frames whose counting noise alone gives a chi^2 above this (a few thousand photons per pattern) hold
#: too few photons for a retrieval's fit within the noise to single out the object: many objects fit
#: (:func:`fit_summary` says so; measured: ``benchmarks/README.md``, bench_verdict).
LOW_DOSE_CHI2 = 1e-2
#: A network guess narrower than this fraction of the autocorrelation's bound
#: (:func:`guess_fits_autocorrelation`) does not seed its frame (measured: docs/decisions.md,
#: "Object size").
GUESS_EXTENT = 1.0
#: What the refinement of noisy frames changes in the refinement options.
NOISY_REFINE = {"algorithm": "er"}
#: Per-frame arrays a refinement returns (besides ``start``).
RESULT_KEYS = ("amplitude", "phase", "support", "chi2")


def network_guess(
    intensity: ArrayLike, model: Model = None, device: str = "auto", mask: ArrayLike | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CDI NN guess embedded in the pattern's frame, with its trust flag.

    Parameters
    ----------
    intensity : array_like, (H, W) or (N, H, W)
        Measured, centred intensities, ``H == W == 32 k``.
    model : str or path, optional
        Network weights (default: the best shipped model for the pattern size).
    device : str
    mask : array_like of bool, (H, W) or (N, H, W), optional
        True on unmeasured pixels (given to the network).

    Returns
    -------
    obj : ndarray complex64, like ``intensity``: the guess zero-padded into the pattern's frame
    support : ndarray bool, same shape
    trusted : ndarray bool, (N,) (or a scalar for one frame)

    Raises
    ------
    ValueError
        When no trained weights are found, or the pattern size is not one the networks read.
    """
    from .nn import predict
    from .nn.inference import embed

    guess = predict(intensity, model=model, device=device, mask=mask)
    obj, support = embed(guess["amplitude"], guess["phase"], np.shape(intensity)[-1] // guess["amplitude"].shape[-1])
    return obj, support, np.asarray(guess["trusted"], dtype=bool)


def network_start(
    intensity: ArrayLike, model: Model = None, device: str = "auto", mask: ArrayLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The CDI NN guess embedded in the pattern's frame: ``(init object, support)`` for ``reconstruct``.

    See :func:`network_guess`.
    """
    obj, support, _ = network_guess(intensity, model=model, device=device, mask=mask)
    return obj, support


def fallback_frames(chi2: ArrayLike, rule: str = "auto", chi2_noise: ArrayLike = 0.0) -> np.ndarray:
    """Which refined frames also get the protocol (see the module notes).

    Parameters
    ----------
    chi2 : array_like of float, (N,)
        chi^2 of the refined frames (the network's own trust is not asked: the refined fit says
        more, docs/decisions.md).
    rule : {"auto", "always", "never"}
        ``"auto"``: the frames :func:`napari_cdinn.protocol.needs_restart` would start again, but
        faint ones (:func:`faint`) with a refined chi^2: the protocol could not replace them
        (:func:`keep_lower_chi2`).
    chi2_noise : array_like of float, (N,), optional
        The chi^2 counting noise alone gives each frame (:func:`napari_cdinn.physics.noise_chi2`).

    Returns
    -------
    ndarray of bool, (N,)
    """
    from .protocol import needs_restart

    if rule not in FALLBACK_RULES:
        raise ValueError(f"fallback must be one of {', '.join(FALLBACK_RULES)}, got {rule!r}")
    chi2 = np.asarray(chi2, dtype=np.float64).reshape(-1)
    if rule == "never":
        return np.zeros(chi2.shape, dtype=bool)
    if rule == "always":
        return np.ones(chi2.shape, dtype=bool)
    return needs_restart(chi2, chi2_noise) & ~(faint(chi2_noise, chi2.shape) & np.isfinite(chi2))  # NaN falls back


def faint(chi2_noise: ArrayLike, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Frames too faint for a fit within the counting noise to single out the object: ``chi2_noise``
    above :data:`LOW_DOSE_CHI2` (broadcast to ``shape`` where given)."""
    noise = np.asarray(chi2_noise, dtype=np.float64)
    noise = noise.reshape(-1) if shape is None else np.broadcast_to(noise.reshape(-1), shape)
    return noise > LOW_DOSE_CHI2


def fits(chi2: ArrayLike, chi2_noise: ArrayLike = 0.0, command: str = "reconstruct") -> np.ndarray:
    """Which frames fit their data: ``predict``'s trust rule (:func:`napari_cdinn.nn.inference.is_trusted`)
    or, for ``reconstruct``, within the restart rule's limit beyond the counting noise
    (:func:`napari_cdinn.protocol.needs_restart`); a frame without a chi^2 (no data) does not fit.

    Parameters
    ----------
    chi2, chi2_noise : array_like of float, (N,) (``chi2_noise`` also a scalar)
    command : {"predict", "reconstruct"}

    Returns
    -------
    ndarray of bool, (N,)
    """
    chi2 = np.asarray(chi2, dtype=np.float64).reshape(-1)
    noise = np.broadcast_to(np.asarray(chi2_noise, dtype=np.float64).reshape(-1), chi2.shape)
    if command == "predict":
        from .nn.inference import is_trusted

        return is_trusted(chi2, noise) & np.isfinite(chi2)
    from .protocol import needs_restart

    return ~needs_restart(chi2, noise)


def fit_summary(chi2: ArrayLike, chi2_noise: ArrayLike = 0.0, command: str = "reconstruct") -> str:
    """``"K of N frames ..."``: how many frames :func:`fits` passes, with its rule; for ``reconstruct``
    also how many of those hold too few photons for the fit to single out the object
    (``chi2_noise`` above :data:`LOW_DOSE_CHI2`)."""
    from .protocol import RESTART_CHI2, RESTART_NOISE

    good = fits(chi2, chi2_noise, command)
    text = f"{int(good.sum())} of {good.size} frame{'s' if good.size != 1 else ''} "
    if command == "predict":
        from .nn.inference import TRUST_CHI2

        return text + f"trusted (chi2 - chi2_noise <= {TRUST_CHI2:g})"
    text += (f"fit the data within the counting noise (chi2 - chi2_noise <= max({RESTART_CHI2:g}, "
             f"{RESTART_NOISE:g} x chi2_noise))")
    dim = int((good & faint(chi2_noise, good.shape)).sum())
    if dim:
        text += f"; {dim} of them too faint (chi2_noise > {LOW_DOSE_CHI2:g}) for a fit to single out the object"
    return text


def keep_lower_chi2(
    refined: dict[str, np.ndarray], protocol: dict[str, np.ndarray] | None, frames: ArrayLike,
    chi2_noise: ArrayLike | None = None,
) -> dict[str, np.ndarray]:
    """Per frame, the refined result or the protocol's, whichever fits the data better beyond the noise.

    Without ``chi2_noise`` (or where it is 0: data that are not counts) the lower chi^2 wins.
    On counts, a chi^2 under the counting-noise floor is no better than one at it: the fit has
    begun to follow the noise (the discrepancy principle), which the 620-iteration protocol does
    at low doses.  So each result's misfit is taken beyond the floor,
    ``max(chi2 - chi2_noise, 0)``, and the protocol wins only where its misfit is lower; two fits
    within the noise keep the network-seeded one.  On faint frames (:func:`faint`) a lower misfit is
    no evidence either (many objects fit so few photons, and the protocol's random starts fit the
    wrong one far more often: docs/decisions.md, "Faint frames keep the network-seeded refinement"):
    the protocol replaces only a refinement that has no chi^2.

    Parameters
    ----------
    refined : dict of per-frame arrays with leading length N, ``chi2`` among them
    protocol : dict of the same keys for ``frames`` only (leading length ``len(frames)``), or None
    frames : array_like of int
        The frames the protocol ran on.
    chi2_noise : array_like of float, (N,), optional
        The chi^2 counting noise alone gives each frame (:func:`napari_cdinn.physics.noise_chi2`).

    Returns
    -------
    dict
        The keys of ``refined`` (copies), the protocol's frames swapped in where its chi^2 is
        lower (a NaN chi^2 never wins; on a tie the refined result stays), plus ``start`` uint8
        (N,): 1 where the network-seeded refinement was kept, 0 where the protocol was.
    """
    out = {k: np.array(v, copy=True) for k, v in refined.items()}
    start = np.ones(len(out["chi2"]), dtype=np.uint8)
    frames = np.asarray(frames, dtype=np.int64).reshape(-1)
    if protocol is not None and len(frames):
        floor = 0.0 if chi2_noise is None else np.asarray(chi2_noise, dtype=np.float64).reshape(-1)[frames]
        new = np.maximum(np.asarray(protocol["chi2"], dtype=np.float64) - floor, 0.0)
        old = np.maximum(out["chi2"][frames].astype(np.float64) - floor, 0.0)
        better = ((new < old) & ~faint(floor, old.shape)) | (np.isnan(old) & ~np.isnan(new))
        picked = frames[better]
        for key, value in out.items():
            value[picked] = np.asarray(protocol[key])[better]
        start[picked] = 0
    out["start"] = start
    return out


def noise_floor(stack: ArrayLike, mask: ArrayLike | None = None) -> np.ndarray:
    """:func:`napari_cdinn.physics.noise_chi2` of each frame's measured pixels (NaN/inf and ``mask`` left
    out; negative readings count as 0): the chi^2 counting noise alone gives, 0 for data that are not counts.

    Parameters
    ----------
    stack : array_like, float, (N, H, W)
    mask : array_like of bool, (H, W) or (N, H, W), optional
        True on unmeasured pixels.

    Returns
    -------
    ndarray of float64, (N,)
    """
    from . import physics

    return physics.noise_chi2(*physics.measured(stack, mask))


def refine_with_fallback(intensity: ArrayLike, *, model: Model = None, mask: ArrayLike | None = None,
                         fallback: str = "auto", refine: Mapping[str, Any] | None = None, first_frame: int = 0,
                         **options: Any) -> dict[str, np.ndarray]:
    """Invert patterns from the network's guess, falling back to the protocol where it may do better.

    See the module notes for the rules.

    Parameters
    ----------
    intensity : array_like, float, (N, M, M) or (M, M)
        Centred measured intensities, ``M = 32 k`` (the networks' sizes).
    model : str or path, optional
        Network weights (default: the best shipped model for the pattern size).
    mask : array_like of bool, (M, M) or (N, M, M), optional
        True on unmeasured pixels: given to the network and to both runs.
    fallback : {"auto", "always", "never"}
    refine : dict, optional
        :func:`napari_cdinn.retrieval.reconstruct` options of the refinement, over ``options``
        (default :func:`napari_cdinn.nn.inference.refine_options` for the guess's size).
    first_frame : int
        Index of the first pattern in a larger stack (random starts follow it).
    **options
        :func:`napari_cdinn.retrieval.reconstruct` options of both runs (``algorithm``,
        ``device``, ``seed``, ``progress``, ``should_stop``, ``snapshot``...; ``n_starts`` of the
        protocol only: the refinement is one run); the protocol runs with these alone.  A
        ``support`` (True inside, (M, M) or (N, M, M)) replaces the network's as the refinement's
        starting support and starts the protocol's runs too.  ``prtf=True``
        (with ``n_starts >= 2``): the protocol runs on every frame and gives the PRTF (see the
        module notes); the refinement runs without it.

    Returns
    -------
    dict
        ``amplitude``, ``phase``, ``support`` (N, M, M), ``chi2`` and ``chi2_noise`` (N,: the chi^2 that
        counting noise alone gives, :func:`napari_cdinn.physics.noise_chi2`) and ``start`` uint8 (N,)
        (1: the refinement from the network was kept; 0: the protocol from random starts);
        ``nn_trusted`` bool (N,) (the network's own trust in its guess, :func:`napari_cdinn.nn.is_trusted`;
        False where it declined the patterns); ``errors`` float32 (N, E), the Fourier-error curve of
        the kept run at ``error_iterations`` (E,) (the iterations either run sampled; NaN where the
        kept run has no sample: a refinement is shorter than the protocol);
        with ``prtf``, the protocol's ``prtf`` (N, M // 2), ``resolution`` (N,) and ``prtf_q``
        (M // 2,); unbatched for a 2-D input.
    """
    from .nn.inference import embed, refine_options
    from .retrieval import reconstruct

    if fallback not in FALLBACK_RULES:
        raise ValueError(f"fallback must be one of {', '.join(FALLBACK_RULES)}, got {fallback!r}")
    for key in ("init", "frame_ids"):
        if key in options:
            raise ValueError(f"refine_with_fallback sets {key!r} itself")
    given = options.pop("support", None)
    prtf = bool(options.pop("prtf", False))
    if prtf and int(options.get("n_starts", 1)) < 2:
        raise ValueError("the PRTF compares several runs of each pattern: prtf=True needs n_starts >= 2")
    single = np.ndim(intensity) == 2
    stack = np.asarray(intensity, dtype=np.float32)
    stack = stack[None] if single else stack
    if mask is not None:
        check_mask_layout(mask, stack.shape)
        mask = np.asarray(mask, dtype=bool)
    ids = whole_number(first_frame, "first_frame", 0) + np.arange(stack.shape[0])
    if given is not None:
        check_mask_layout(given, stack.shape, "support", "True/1 = inside")
        given = np.broadcast_to(np.asarray(given, dtype=bool), stack.shape)
        options["support"] = given  # the protocol's start too: _for_frames cuts it to a run's frames

    noise = noise_floor(stack, mask)
    n, m = stack.shape[0], stack.shape[-1]
    refined = {"amplitude": np.zeros((n, m, m), np.float32), "phase": np.zeros((n, m, m), np.float32),
               "support": np.zeros((n, m, m), bool), "chi2": np.full(n, np.nan, np.float32)}
    curves = []  # (frames, errors, error_iterations) of every run
    trusted = np.zeros(n, bool)
    info, guess = _seeding_guess(stack, model, mask, options.get("device", "auto"))
    if info is not None:  # else every frame gets the protocol: the network cannot read these patterns
        obj, sup = embed(guess["amplitude"], guess["phase"], m // guess["amplitude"].shape[-1])
        trusted = np.asarray(guess["trusted"], bool)
        seeded = guess_fits_autocorrelation(stack, sup, mask)  # a guess too small for the data seeds nothing
        if given is not None:
            sup = given
        side = guess["amplitude"].shape[-1]
        settings = {**options, "n_starts": 1, **(refine_options(side) if refine is None else refine)}
        settings.pop("support", None)
        noisy = noise > NOISY_CHI2
        for frames, extra in ((np.flatnonzero(seeded & ~noisy), {}), (np.flatnonzero(seeded & noisy), NOISY_REFINE)):
            if len(frames):
                part = reconstruct(stack[frames], init=obj[frames], support=sup[frames], mask=_frames_of(mask, frames),
                                   frame_ids=ids[frames], **_for_frames({**settings, **extra}, frames))
                refined = _merge(refined, {k: part[k] for k in RESULT_KEYS}, frames, n)
                curves.append((frames, part["errors"], part["error_iterations"]))
    # frames not refined keep a NaN chi^2: they always get the protocol, and it always wins
    todo = np.flatnonzero(fallback_frames(refined["chi2"], fallback, noise) | np.isnan(refined["chi2"]))
    protocol = extra = None
    if prtf:  # every frame, for its PRTF; the rule still picks the frames whose result may be swapped
        run = reconstruct(stack, mask=mask, frame_ids=ids, prtf=True, **options)
        protocol = {k: run[k][todo] for k in RESULT_KEYS}
        curves.append((todo, run["errors"][todo], run["error_iterations"]))
        extra = {k: run[k] for k in ("prtf", "resolution")}
    elif len(todo):
        run = reconstruct(stack[todo], mask=_frames_of(mask, todo), frame_ids=ids[todo], **_for_frames(options, todo))
        protocol = {k: run[k] for k in RESULT_KEYS}
        curves.append((todo, run["errors"], run["error_iterations"]))
    grid, on_grid = curves_on_one_grid([(iterations, errors) for _, errors, iterations in curves])
    if protocol is not None:
        protocol["errors"] = on_grid.pop()
    refined["errors"] = np.full((n, len(grid)), np.nan, np.float32)
    for (frames, _, _), errors in zip(curves, on_grid):
        refined["errors"][frames] = errors
    out = keep_lower_chi2(refined, protocol, todo, chi2_noise=noise)
    out.update(extra or {}, chi2_noise=noise.astype(np.float32), nn_trusted=trusted)
    out = {k: v[0] for k, v in out.items()} if single else out
    out["error_iterations"] = grid
    if prtf:
        out["prtf_q"] = run["prtf_q"]
    return out


def curves_on_one_grid(curves):
    """Fourier-error curves of several runs on the union of the iterations they sampled.

    Parameters
    ----------
    curves : list of (iterations (E_i,), errors (n_i, E_i))

    Returns
    -------
    grid : ndarray of int64, (G,), the iterations any run sampled
    errors : list of float32 arrays (n_i, G), NaN where a run has no sample (a refinement is
        shorter than the protocol)
    """
    if not curves:
        return np.zeros(0, np.int64), []
    grid = np.unique(np.concatenate([np.asarray(it) for it, _ in curves])).astype(np.int64)
    out = []
    for it, errors in curves:
        errors = np.asarray(errors)
        placed = np.full((len(errors), len(grid)), np.nan, np.float32)
        placed[:, np.searchsorted(grid, np.asarray(it)[: errors.shape[1]])] = errors
        out.append(placed)
    return grid, out


def _for_frames(options, frames):
    """``options`` of a run on ``frames`` of the stack: a per-frame starting support cut to them, and a
    ``snapshot`` callback told the frames' indices in the stack (a run numbers its frames from 0)."""
    out = dict(options)
    if out.get("support") is not None and np.ndim(out["support"]) == 3:
        out["support"] = out["support"][frames]
    snapshot = out.get("snapshot")
    if snapshot is not None:
        out["snapshot"] = lambda picked, amplitude, phase: snapshot(frames[picked], amplitude, phase)
    return out


def seeding_model(stack: np.ndarray, model: Model, mask: np.ndarray | None, device: str = "auto") -> ModelInfo | None:
    """The network that seeds the refinement of ``stack``, at its scale, or None where it cannot read it.

    A :class:`~napari_cdinn.nn.ModelInfo` from :func:`napari_cdinn.nn.choose_scale` (callers that
    stream a stack choose once for it) is used as it is; anything else is resolved for these
    patterns by :func:`napari_cdinn.nn.choose_scale`.  None when :func:`napari_cdinn.nn.declined`
    gives a reason (the protocol then inverts every frame).
    """
    from .nn import ModelInfo, choose_scale, declined

    info = model if isinstance(model, ModelInfo) and model.misfit is not None else choose_scale(
        stack, model, mask=mask, device=device)
    return None if declined(info) else info


def _seeding_guess(stack, model, mask, device):
    """``(the network that seeds the refinement at its scale, its prediction of every frame)``, or
    ``(None, None)`` where it declines (:func:`seeding_model`).

    Where there is one model at one scale for the pattern size and the stack is centred, there is nothing to
    choose (:func:`napari_cdinn.nn.inference.choice_to_make`): the prediction of every frame is the evidence
    :func:`napari_cdinn.nn.declined` reads, and no sample is predicted first
    (:func:`napari_cdinn.nn.inference.with_evidence`).
    """
    from .nn import ModelInfo, declined, predict
    from .nn.inference import SCALE_SAMPLE, _sample, choice_to_make, with_evidence
    from .nn.models import candidates

    if not (isinstance(model, ModelInfo) and model.misfit is not None):
        if not choice_to_make(stack, model, mask, stack.shape):
            base = candidates(model, stack.shape)[0]
            guess = predict(stack, model=base, device=device, mask=mask, scale=base.scale)
            info = with_evidence(base, guess, *_sample(stack, mask, SCALE_SAMPLE))
            return (None, None) if declined(info) else (info, guess)
    info = seeding_model(stack, model, mask, device)
    return (None, None) if info is None else (info, predict(stack, model=info, device=device, mask=mask))


def guess_fits_autocorrelation(intensity: np.ndarray, support: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Per frame, whether the network's support is at least as wide as the autocorrelation allows.

    The autocorrelation's extent is a lower bound of the object's (:func:`napari_cdinn.physics.autocorrelation_extent`);
    a guess narrower than :data:`GUESS_EXTENT` of it would trap the refinement in too small a
    support, so such frames are not seeded (they get the protocol).  Frames whose centre is unmeasured (a beamstop: no bound) pass.
    """
    from . import physics

    bound = physics.autocorrelation_extent(intensity, mask)
    return ~(physics.support_extent(support) < GUESS_EXTENT * bound)  # NaN bound: passes


def _frames_of(mask, frames):
    """The mask of ``frames``: a 2-D mask serves every frame."""
    return mask if mask is None or mask.ndim == 2 else mask[frames]


def _merge(into, part, frames, n):
    """Per-frame arrays ``part`` of ``frames`` written into ``into`` (created for ``n`` frames when None)."""
    if into is None:
        into = {k: np.zeros((n,) + np.shape(v)[1:], dtype=np.asarray(v).dtype) for k, v in part.items()}
    for k, v in part.items():
        into[k][frames] = v
    return into


def reconstruct_chunk(intensity: ArrayLike, first_frame: int = 0, init: str = "random", model: Model = None,
                      mask: ArrayLike | None = None, fallback: str = "auto", refine: Mapping[str, Any] | None = None,
                      **options: Any) -> dict[str, np.ndarray]:
    """Chunk function of ``cdinn reconstruct`` for :func:`napari_cdinn.stream.process_stack` (picklable via ``partial``).

    Parameters
    ----------
    intensity : ndarray, float32, (n, M, M)
    first_frame : int
        Index of the chunk's first frame in the stack: random starts follow the frame index,
        so the result does not depend on the chunk size.
    init : {"random", "nn"}
        Random phases (the protocol given by ``options``,
        :func:`napari_cdinn.retrieval.reconstruct_chunk`), or the network's guess with its support
        refined by a short run (``refine``), with a fallback to the protocol (:func:`refine_with_fallback`).
    model : str, path or ModelInfo, optional
        Network weights for ``init="nn"`` (ignored otherwise).
    mask : ndarray of bool, (M, M) or (n, M, M), optional
        True on unmeasured pixels (left free by the modulus step, out of chi^2).
    fallback : {"auto", "always", "never"}
        ``init="nn"``: which frames also get the protocol (see the module notes).
    refine : dict, optional
        ``init="nn"``: the refinement's options over ``options`` (default
        :func:`napari_cdinn.nn.inference.refine_options` for the guess's size).
    **options
        Passed to :func:`napari_cdinn.retrieval.reconstruct` (with ``init="nn"``, the protocol's
        options).  ``prtf=True`` (with ``n_starts >= 2``) adds the PRTF of each frame's random
        starts; with ``init="nn"`` the protocol then runs on every frame for it (see the module notes).

    Returns
    -------
    dict of ``amplitude``, ``phase``, ``support`` (n, M, M), ``chi2`` and ``chi2_noise`` (n,) and ``start``
    uint8 (n,): 1 where the result started from the network, 0 from random phases; with ``prtf``, also
    ``prtf`` (n, M // 2) and ``resolution`` (n,) (per-frame arrays only: the shells' frequencies
    are :func:`napari_cdinn.postprocess.prtf_frequencies`).
    """
    if isinstance(init, str) and init == "nn":
        res = refine_with_fallback(intensity, model=model, mask=mask, fallback=fallback, refine=refine,
                                   first_frame=first_frame, **options)
        return {k: res[k] for k in (*RESULT_KEYS, "chi2_noise", "start", "prtf", "resolution") if k in res}
    from .retrieval import reconstruct_chunk as protocol_chunk

    return protocol_chunk(intensity, first_frame=first_frame, init=init, mask=mask, **options)


def make_report(
    out_dir: str | os.PathLike, model: Model = None, count: int = 1000, examples: int = 4, device: str = "cpu",
    iterations: int = 620,
) -> dict[str, Any]:
    """The paper-figure report of a model (:func:`napari_cdinn.nn.report.make_report`), with the
    iterative results of Fig. 3 from :func:`napari_cdinn.retrieval.reconstruct`.

    Writes ``fig2_training.png``, ``fig3_examples.png``, ``fig45_chi2.png``,
    ``fig6_activations.png`` and ``report.json`` to ``out_dir``; returns the JSON dict.
    """
    from .nn.report import make_report as nn_report
    from .retrieval import reconstruct

    return nn_report(out_dir, model=model, count=count, examples=examples, device=device, iterations=iterations,
                     reconstruct=reconstruct)
