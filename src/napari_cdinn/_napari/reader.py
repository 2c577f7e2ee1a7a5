"""npe2 reader: diffraction stacks (and result files) as napari layers.

``get_reader`` returns ``None`` for anything it does not understand (an unknown extension, a
foreign or broken file), so napari can try other readers; it never raises.  Intensities open on
a log scale (:mod:`napari_cdinn._napari.layers`); big HDF5/CXI/TIFF/NPY stacks open lazily (dask), so
the first frame shows at once.  Files holding ``amplitude``/``phase`` results (from
``cdinn predict``/``reconstruct``, ``cdinn simulate`` or the writer) also open those as layers.
A file that carries its own mask of unmeasured pixels (:func:`napari_cdinn.io.file_mask`: the
``mask`` of ``cdinn simulate --beamstop``, a CXI detector mask) also opens it as a Labels layer
``"<name> mask"`` (1 = unmeasured) over the intensities, ready for the docks' mask picker.
A folder of one-frame files (PILATUS CBF, EDF, TIFF, ``.npy``: :func:`napari_cdinn.io.series_files`)
opens as one lazy stack.
"""

from __future__ import annotations

import os

from .. import io
from . import layers as _layers

#: What a result file gives: the images, and per frame the scores kept as the layers' metadata.
_RESULT_KEYS = ("amplitude", "phase", "support", *_layers.SCORES)


def get_reader(path):
    """Return a reader function for ``path`` (a path or a list of paths), or None."""
    try:
        paths = [path] if isinstance(path, str | os.PathLike) else list(path)
        layers = []
        for p in paths:
            found = _layer_tuples(os.fspath(p))
            if not found:
                return None
            layers.extend(found)
    except Exception:  # noqa: BLE001 - a reader never raises into napari: not ours, or unreadable
        return None
    if not layers:
        return None

    def reader(_path):
        return layers

    return reader


def _layer_tuples(path):
    """Layer tuples for one file; an empty list when it is not a file this plugin reads."""
    folder = os.path.isdir(path)
    if folder:
        try:
            io.series_files(path)  # a folder of one-frame files opens as one stack
        except ValueError:
            return []
    elif os.path.splitext(path)[1].lower() not in io.STACK_EXTENSIONS or not os.path.isfile(path):
        return []
    stem = os.path.basename(os.path.normpath(path)) if folder else os.path.splitext(os.path.basename(path))[0]
    layers = []
    try:
        stack = io.read_stack(path)
        layers.append(_layers.intensity_tuple(stack, f"{stem} intensity", cdinn_source=path))
    except Exception:  # noqa: BLE001 - any unreadable file (foreign, broken, too big for memory) is not ours
        stack = None
    if stack is not None:
        layers.extend(_mask_tuples(path, stem, stack.shape))
    layers = _result_tuples(path, stem, stack) + layers
    return layers


def _result_tuples(path, stem, stack):
    """Amplitude/phase layers of a result (or simulated) file; [] when there are none."""
    if os.path.splitext(path)[1].lower() not in io.RESULT_EXTENSIONS:
        return []
    try:
        res = io.read_result(path, keys=_RESULT_KEYS)
    except Exception:  # noqa: BLE001 - see _layer_tuples
        return []
    meta = {"cdinn_source": path, **{k: res[k] for k in _layers.SCORES if k in res}}
    out = []
    for key, make in (("amplitude", _layers.amplitude_tuple), ("phase", _layers.phase_tuple)):
        if key in res and res[key].ndim in (2, 3) and res[key].dtype.kind in "biuf":
            offset = None
            if stack is not None and res[key].ndim == stack.ndim:
                offset = (0.0,) * (stack.ndim - 2) + _layers.centre_offset(stack.shape, res[key].shape)
            extra = {"support": _object_support(res)} if key == "phase" else {}
            out.append(make(res[key], f"{stem} {key}", translate=offset, **extra, **meta))
    return out


def _object_support(res):
    """Where a result's object is: its ``support``, else amplitude above the shape threshold, else None."""
    from .. import physics

    shape = res["phase"].shape
    if "support" in res and res["support"].shape == shape:
        return res["support"] != 0
    if "amplitude" in res and res["amplitude"].shape == shape:
        return physics.support_from_amplitude(res["amplitude"])
    return None


def _mask_tuples(path, stem, shape):
    """The file's own mask as a Labels layer tuple (1 = unmeasured); [] when it has none or a bad one."""
    try:
        mask = io.file_mask(path, shape)
    except Exception:  # noqa: BLE001 - see _layer_tuples
        return []
    if mask is None:
        return []
    return [_layers.mask_tuple(mask, f"{stem} mask", cdinn_source=path)]
