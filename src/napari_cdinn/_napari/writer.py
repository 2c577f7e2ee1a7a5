"""npe2 writer: image layers (amplitude, phase, intensity, a complex result) and labels (support, mask) to
.npz/.h5/.cxi.

Each layer becomes one array named by its ``cdinn_kind`` metadata (``amplitude``, ``phase``,
``intensity``, ``support``, ``mask``...) or else by its name (non-alphanumerics replaced by ``_``);
labels are written as booleans (nonzero).  A complex-valued layer is split into ``<name>`` amplitude
and phase.  The docks' RGBA "complex" view (:func:`napari_cdinn._napari.layers.complex_tuple`) holds
only colours: saved with its amplitude and phase layers it is left out, saved alone it is refused
with one sentence naming them (``RuntimeError``, which napari shows).  Intensities shown on a log
scale are written as true intensities; phases shown transparent outside the object (NaN) are written as 0
(:func:`napari_cdinn._napari.layers.layer_phase`); the per-frame scores in a layer's metadata
(``chi2``, ``chi2_noise``, ``trusted``: :data:`napari_cdinn._napari.layers.SCORES`) are written under
their names, and the frames that kept the network's start (``nn_start``, the retrieval dock's) as
``start`` (uint8), as ``cdinn reconstruct --init nn`` writes it.  Writing goes through :func:`napari_cdinn.io.write_result` (atomic, compressed HDF5, a
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
    shown = [meta.get("name", "layer") for _data, meta, _kind in layer_data
             if (meta.get("metadata") or {}).get(_layers.KIND) == "complex"]
    if shown and len(shown) == len(layer_data):
        # not ValueError: napari takes that for "no writer here" and drops the sentence
        raise RuntimeError(f"{shown[0]!r} shows the result as colours (brightness = amplitude, hue = phase): "
                           "select its amplitude and phase layers (hidden beneath it) to save the result")
    arrays, attrs = {}, {}
    for data, meta, kind in layer_data:
        metadata = meta.get("metadata") or {}
        if metadata.get(_layers.KIND) == "complex":  # colours of the amplitude and phase saved beside it
            continue
        fallback = "labels" if kind == "labels" else "layer"
        key = _key(metadata.get(_layers.KIND) or meta.get("name") or fallback, arrays)
        if kind == "labels":  # a support (1 inside) or a mask (1 unmeasured): booleans
            arrays[key] = np.asarray(data) != 0
        else:
            data = np.asarray(_layers.layer_intensities(data, metadata))
            if metadata.get(_layers.KIND) == "phase":
                data = _layers.layer_phase(data)
            if np.iscomplexobj(data):
                arrays[_key("amplitude" if key == "object" else f"{key}_amplitude", arrays)] = (
                    np.abs(data).astype(np.float32))
                arrays[_key("phase" if key == "object" else f"{key}_phase", arrays)] = np.angle(data).astype(np.float32)
            else:
                arrays[key] = data
            for score in _layers.SCORES:  # per-frame scores, once
                if metadata.get(score) is not None and score not in arrays:
                    value = np.asarray(metadata[score])
                    arrays[score] = value if value.dtype == bool else value.astype(np.float32)
            if metadata.get("nn_start") is not None and "start" not in arrays:  # as reconstruct --init nn writes it
                arrays["start"] = np.asarray(metadata["nn_start"]).astype(np.uint8)
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
