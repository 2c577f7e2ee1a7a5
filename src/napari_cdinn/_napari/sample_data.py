"""npe2 sample data: a small paper-recipe stack with its ground truth; raw detector frames to prepare."""

from __future__ import annotations

import numpy as np

from ..physics import support_from_amplitude
from ..simulate import raw_detector_frames, simulate
from . import layers as _layers

#: Frames, object size and oversampling of the sample (the paper's 2x iterative protocol).
SAMPLE_COUNT, SAMPLE_SIZE, SAMPLE_OVERSAMPLING = 16, 32, 2


def paper_stack():
    """Paper-recipe diffraction stack: 16 noise-free 64 x 64 patterns of 2x-padded objects.

    Returns LayerDataTuples: the true amplitude and phase (32 x 32, centred in the pattern's
    frame) and, on top, the intensities on a log scale (see :mod:`napari_cdinn._napari.layers`).
    """
    data = simulate(SAMPLE_COUNT, size=SAMPLE_SIZE, seed=0, oversampling=SAMPLE_OVERSAMPLING)
    offset = (0.0,) + _layers.centre_offset(data["intensity"].shape, data["amplitude"].shape)
    meta = {"cdinn_source": "paper-recipe sample", "cdinn_oversampling": SAMPLE_OVERSAMPLING}
    return [
        _layers.amplitude_tuple(data["amplitude"], "true amplitude", translate=offset, **meta),
        _layers.phase_tuple(data["phase"], "true phase", translate=offset,
                            support=support_from_amplitude(data["amplitude"]), **meta),
        _layers.intensity_tuple(data["intensity"], "paper-recipe intensity", **meta),
    ]


def raw_frames():
    """Raw detector frames: 32 frames of a 300 x 260 photon-counting chip with the beam off-centre at
    (141, 97), a beamstop and module gaps marked -1, as a reader gives them (the marks unmeasured,
    NaN), for the *Prepare detector frames* dock."""
    raw = raw_detector_frames()
    frames = raw["frames"].astype(np.float32)
    frames[raw["frames"] < 0] = np.nan
    return [_layers.intensity_tuple(frames, "raw detector frames", cdinn_source="raw detector sample")]
