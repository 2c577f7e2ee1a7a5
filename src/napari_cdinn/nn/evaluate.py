"""Test metrics of a model on fresh simulated patterns (the numbers in the model card).

Test patterns come from the simulator with seed :data:`TEST_SEED`, disjoint from the training
(``seed``) and validation (``seed + 1_000_000``) streams of the default training seeds.  The
networks see the paper's 2x-oversampled 64 x 64 intensities through :func:`predict` (so the
decimation path is part of the test), and results are compared to the truth up to twin, shift
and global phase (:func:`napari_cdinn.physics.compare`).
"""

from __future__ import annotations

import numpy as np

from .. import physics
from ..simulate import simulate
from .inference import predict

__all__ = ["TEST_SEED", "score_model", "summarise"]

#: Simulator seed of the held-out test patterns.
TEST_SEED = 20_241_000


def summarise(cmp, chi2):
    """Median/p90 summary of per-frame ``compare`` results and chi^2 values."""
    rms = np.asarray(cmp["phase_rms"], dtype=np.float64)
    iou = np.asarray(cmp["iou"], dtype=np.float64)
    chi2 = np.asarray(chi2, dtype=np.float64)
    return {
        "count": len(iou),
        "iou_median": float(np.median(iou)),
        "iou_p10": float(np.percentile(iou, 10)),
        "phase_rms_median": float(np.nanmedian(rms)),
        "phase_rms_p90": float(np.nanpercentile(rms, 90)),
        "chi2_median": float(np.median(chi2)),
        "chi2_p90": float(np.percentile(chi2, 90)),
        "twin_rate": float(np.mean(cmp["twin"])),
    }


def score_model(model=None, count=1000, seed=TEST_SEED, photons=None, device="cpu", oversampling=2, data=None,
                precision="auto", views=1, size=32):
    """Quality of ``model`` on ``count`` fresh patterns, optionally with Poisson noise.

    Parameters
    ----------
    model : None, str or path
        As in :func:`predict`.
    count, seed : int
        Test patterns ``simulate(count, seed=seed, oversampling=oversampling, photons=photons, size=size)``.
    photons : float, optional
        Mean photons per pattern (Poisson noise).
    data : dict, optional
        Pre-simulated patterns (``intensity``, ``amplitude``, ``phase``, optionally ``mask``) instead.
    precision : "auto", "fp32" or "bf16"
        As in :func:`predict`.
    views : int
        Test-time views, as in :func:`predict` (1: the network alone).
    size : int
        Side of the test objects (the model's object size: 32, or 64 for ``deep2x``).

    Returns
    -------
    dict
        ``iou_median``, ``phase_rms_median``/``p90`` (radians, inside the true support),
        ``chi2_median``/``p90`` (measured frame, as reported by :func:`predict`),
        ``chi2_32_median`` (on the pattern decimated to the object's frame, 32 x 32 as in the paper), ``twin_rate``,
        ``trusted_fraction``, ``count``, ``photons``.
    """
    if data is None:
        data = simulate(count, seed=seed, oversampling=oversampling, photons=photons, size=size)
    res = predict(data["intensity"], model=model, device=device, precision=precision, views=views, mask=data.get("mask"))
    obj = res["amplitude"] * np.exp(1j * res["phase"])
    cmp = physics.compare(obj, data["amplitude"], data["phase"])
    out = summarise(cmp, res["chi2"])
    inten = np.asarray(data["intensity"], dtype=np.float32)
    factor = inten.shape[-1] // obj.shape[-1]
    chi32 = physics.chi2(physics.decimate(inten, factor), physics.intensity(obj))
    out.update(
        chi2_32_median=float(np.median(chi32)),
        trusted_fraction=float(np.mean(res["trusted"])),
        photons=photons,
        seed=int(seed),
        views=int(views),
    )
    return out
