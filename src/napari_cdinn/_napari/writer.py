"""npe2 writer: image layers (amplitude, phase, intensity, a complex result) to .npz/.h5/.cxi.

Each layer becomes one array named by its ``cdinn_kind`` metadata (``amplitude``, ``phase``,
``intensity``...) or else by its name (non-alphanumerics replaced by ``_``).  A complex layer is
split into ``<name>`` amplitude and phase; intensities shown on a log scale are written as true
intensities; phases shown transparent outside the object (NaN) are written as 0
(:func:`napari_cdinn._napari.layers.layer_phase`); the per-frame scores in a layer's metadata
(``chi2``, ``chi2_noise``, ``trusted``: :data:`napari_cdinn._napari.layers.SCORES`) are written under
their names.  Writing goes through :func:`napari_cdinn.io.write_result` (atomic, compressed HDF5, a
minimal CXI tree).
"""

from __future__ import annotations

import re

import numpy as np

from .. import io
from . import layers as _layers


def write_layers(path, layer_data):
    """npe2 multi-layer writer: ``layer_data`` is a list of ``(data, attributes, layer_type)``.

    Returns the list of written paths (empty when there is nothing to write).
    """
    arrays, attrs = {}, {}
    for data, meta, _kind in layer_data:
        metadata = meta.get("metadata") or {}
        data = np.asarray(_layers.layer_intensities(data, metadata))
        if metadata.get(_layers.KIND) == "phase":
            data = _layers.layer_phase(data)
        key = _key(metadata.get(_layers.KIND) or meta.get("name") or "layer", arrays)
        if np.iscomplexobj(data):
            arrays[_key("amplitude" if key == "object" else f"{key}_amplitude", arrays)] = np.abs(data).astype(np.float32)
            arrays[_key("phase" if key == "object" else f"{key}_phase", arrays)] = np.angle(data).astype(np.float32)
        else:
            arrays[key] = data
        for score in _layers.SCORES:  # per-frame scores, once
            if metadata.get(score) is not None and score not in arrays:
                value = np.asarray(metadata[score])
                arrays[score] = value if value.dtype == bool else value.astype(np.float32)
        attrs[f"{key}_layer"] = str(meta.get("name", key))
    if not arrays:
        return []
    io.write_result(path, arrays, attrs)
    return [path]


def _key(name, taken):
    """A dataset name from a layer name, unique among ``taken``."""
    base = re.sub(r"[^0-9A-Za-z_]+", "_", str(name)).strip("_") or "layer"
    key, n = base, 2
    while key in taken:
        key, n = f"{base}_{n}", n + 1
    return key
