"""Readers and writers for diffraction stacks and results (no Qt, no napari import).

* :func:`read_stack` reads measured intensities from ``.npy .npz .tif .tiff .h5 .hdf5 .cxi``
  as float32 ``(N, H, W)`` or ``(H, W)``; big stacks come back as dask arrays that read whole
  frames on demand.  Bad input raises ``ValueError``/``OSError`` with one sentence.
  :func:`stack_shape` and :func:`read_frames` give a file's shape and a range of its frames
  without a dask graph (the streaming jobs read their chunks this way).
* :func:`read_mask` reads a mask of unmeasured pixels (True = unmeasured) from a file of its
  own; :func:`file_mask` finds the mask a stack file carries beside its data, if any.
* :func:`write_result` / :func:`read_result` write and read result arrays (``amplitude``,
  ``phase``, ``chi2``, ``support``...) as ``.npz``, ``.h5``/``.hdf5`` or ``.cxi``.

Writing is atomic: every writer writes to a temporary file beside the target and renames it
at the end, so a failed or interrupted run never leaves a half-written file under the final
name, nor overwrites an existing one.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import tempfile

import numpy as np

__all__ = [
    "RESULT_EXTENSIONS",
    "STACK_EXTENSIONS",
    "H5ResultWriter",
    "atomic_output",
    "check_writable",
    "file_mask",
    "h5_chunk_frames",
    "h5_dataset_options",
    "read_frames",
    "read_mask",
    "read_result",
    "read_stack",
    "stack_shape",
    "write_json",
    "write_npz",
    "write_result",
]


def check_writable(path):
    """Raise ``OSError`` with one clear sentence when ``path`` cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OSError(f"the output folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise OSError(f"the output {path!r} is a folder")
    if not os.access(folder, os.W_OK):
        raise OSError(f"the output folder {folder!r} is not writable")


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path beside ``path``; rename it to ``path`` only on success.

    The temporary name keeps the extension (``.name.XXXX.tmp.npz``) so that libraries that
    choose a format by extension behave; on any exception it is removed and the error re-raised.
    """
    check_writable(path)
    folder, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path, obj):
    """Write ``obj`` as indented JSON atomically (NumPy scalars and arrays become numbers and lists)."""
    with atomic_output(path) as tmp, open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, default=_json_default)


def write_npz(path, arrays):
    """Write a dict of arrays to an ``.npz`` file atomically (uncompressed, fast to load)."""
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})


# =========================================================================== reading stacks
#: File extensions :func:`read_stack` understands (lower case).
STACK_EXTENSIONS = (".npy", ".npz", ".tif", ".tiff", ".h5", ".hdf5", ".cxi")
#: File extensions :func:`write_result` and :func:`read_result` understand.
RESULT_EXTENSIONS = (".npz", ".h5", ".hdf5", ".cxi")
#: Stacks whose stored data exceed this many bytes are read lazily when ``lazy=None``.
LAZY_THRESHOLD = 256 * 2**20
#: Target size of one dask chunk (whole frames) for lazy stacks.
CHUNK_BYTES = 32 * 2**20
#: HDF5 paths tried in a ``.cxi`` file, in order.
CXI_PATHS = ("entry_1/data_1/data", "entry_1/instrument_1/detector_1/data")
_ATTRS_KEY = "__attrs__"
#: Name of a mask beside the data: an NPZ key, or an HDF5 dataset in the data's group.
_MASK_KEY = "mask"
#: HDF5 paths of the detector mask tried in a ``.cxi`` file, in order (CXI: nonzero = bad pixel).
CXI_MASK_PATHS = ("entry_1/instrument_1/detector_1/mask", "entry_1/data_1/mask")


def _ext(path):
    return os.path.splitext(str(path))[1].lower()


def _name(path):
    return os.path.basename(str(path))


def read_stack(path, lazy=None):
    """Read measured diffraction intensities from a file as ``(N, H, W)`` or ``(H, W)`` float32.

    Formats (design.md): ``.npy``; ``.npz`` (key ``intensity``, else ``data``, else the only
    array); ``.tif``/``.tiff`` (the first series); ``.h5``/``.hdf5`` (dataset ``data``, else
    ``intensity``, else the only 2-D/3-D numeric dataset anywhere in the file); ``.cxi``
    (``entry_1/data_1/data``, else ``entry_1/instrument_1/detector_1/data``).

    Parameters
    ----------
    path : str or os.PathLike
    lazy : bool, optional
        True: return a dask array that reads whole frames on demand (``.npy`` by memory map,
        TIFF by memory map or page by page, HDF5/CXI by reopening the file per chunk, so the
        array pickles to dask workers). False: a NumPy array. None (default): lazy when the
        stored data exceed :data:`LAZY_THRESHOLD`. ``.npz`` files are always read eagerly.

    Returns
    -------
    ndarray or dask.array.Array, float32, shape (N, H, W) or (H, W)
        Values are returned as stored, converted to float32 (integer counts of any width,
        float64): the reader does not clean them. NaN and negative values are kept;
        the core treats them as unmeasured/zero where it matters
        (:func:`napari_cdinn.physics.amplitude_from_intensity` maps both to amplitude 0), and
        ``~np.isfinite(stack)`` gives a mask of the NaN pixels.

    Raises
    ------
    OSError
        The file is missing or cannot be opened.
    ValueError
        Unsupported extension; empty, truncated or mislabelled file; no suitable data set;
        data that are not 2-D or 3-D, are empty, complex or not numeric.  One sentence each.
    """
    path, source = _open_source(path)
    if lazy is None:
        lazy = source.size * source.dtype.itemsize > LAZY_THRESHOLD
    if lazy:
        return _to_dask(source).astype(np.float32)
    try:
        data = source if isinstance(source, np.ndarray) else source[...]
        return np.array(data, dtype=np.float32)  # a copy: never a view of a memory map
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{_name(path)!r} could not be read completely (truncated?): {_first_line(exc)}") from None


def _open_source(path):
    """``(path, source)``: the checked, sliceable array-like behind a stack file (nothing read yet)."""
    path, ext = _input_path(path, STACK_EXTENSIONS)
    if os.path.getsize(path) == 0:
        raise ValueError(f"{_name(path)!r} is empty")
    opener = {".npy": _open_npy, ".npz": _open_npz, ".tif": _open_tiff, ".tiff": _open_tiff,
              ".h5": _open_h5, ".hdf5": _open_h5, ".cxi": _open_h5}[ext]
    source = opener(path)
    _check_stack(source, path)
    return path, source


def stack_shape(path):
    """Shape ``(N, H, W)`` or ``(H, W)`` of a stack file, checked as :func:`read_stack` checks it, without reading it."""
    return tuple(_open_source(path)[1].shape)


def read_frames(path, start, stop):
    """Frames ``start:stop`` of a stack file as float32 ``(n, H, W)``, reading only those frames.

    A 2-D file is one frame.  The streaming jobs read their chunks this way: no dask graph and no
    scheduler lookup per chunk (same formats and errors as :func:`read_stack`).
    """
    _, source = _open_source(path)
    if len(source.shape) == 2:
        return np.asarray(source[:, :], dtype=np.float32)[None][start:stop]
    return np.asarray(source[start:stop], dtype=np.float32)


def _input_path(path, extensions):
    """``(path, extension)`` of an existing file with one of ``extensions``, else one clear error."""
    path = os.fspath(path)
    ext = _ext(path)
    if ext not in extensions:
        raise ValueError(f"{_name(path)!r} has an unsupported extension; expected one of {', '.join(extensions)}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a folder, not a file")
    return path, ext


def _open_h5_file(path):
    """An open read-only ``h5py.File``, or ValueError for a file that is not HDF5."""
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError:
        raise ValueError(f"{_name(path)!r} is not a valid HDF5 file (truncated or another format)") from None


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_stack(source, path):
    """Raise ValueError unless ``source`` holds a non-empty real numeric 2-D or 3-D array."""
    name = _name(path)
    dtype = np.dtype(source.dtype)
    if dtype.kind == "c":
        raise ValueError(f"{name!r} holds complex data; expected real intensities")
    if dtype.kind not in "uif":
        raise ValueError(f"{name!r} holds {dtype} data; expected numeric intensities")
    if len(source.shape) not in (2, 3):
        raise ValueError(f"{name!r} holds a {len(source.shape)}-D array {tuple(source.shape)}; expected (H, W) or (N, H, W)")
    if 0 in source.shape:
        raise ValueError(f"{name!r} holds an empty array {tuple(source.shape)}")


def _to_dask(source):
    """Wrap an array-like of frames in a dask array with whole-frame chunks of ~CHUNK_BYTES."""
    import dask.array as da

    shape = tuple(source.shape)
    if len(shape) == 2:
        chunks = shape
    else:
        frame = shape[1] * shape[2] * np.dtype(source.dtype).itemsize
        chunks = (max(1, min(shape[0], CHUNK_BYTES // max(frame, 1))),) + shape[1:]
    meta = np.empty((0,) * len(shape), dtype=source.dtype)
    return da.from_array(source, chunks=chunks, lock=False, asarray=True, meta=meta)


def _open_npy(path):
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise ValueError(f"{_name(path)!r} is not a NumPy .npy file (or holds Python objects)") from None
        raise ValueError(f"{_name(path)!r} is truncated or not a valid .npy file") from None


def _open_npz(path):
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = [k for k in npz.files if k != _ATTRS_KEY]
            for key in ("intensity", "data"):
                if key in keys:
                    return npz[key]
            keys = [k for k in keys if k != _MASK_KEY]  # a mask beside the data is not the data
            if len(keys) == 1:
                return npz[keys[0]]
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise ValueError(f"{_name(path)!r} is truncated or not a valid .npz file ({_first_line(exc)})") from None
    if not keys:
        raise ValueError(f"{_name(path)!r} holds no intensity arrays")
    raise ValueError(f"{_name(path)!r} holds several arrays ({', '.join(keys)}) and none named 'intensity' or 'data'")


def _open_tiff(path):
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, dtype, axes = tuple(series.shape), series.dtype, series.axes
            n_pages = len(series.pages)
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for foreign or broken files
        raise ValueError(f"{_name(path)!r} is not a readable TIFF file ({_first_line(exc)})") from None
    if axes.endswith("S") and len(shape) >= 3:
        raise ValueError(f"{_name(path)!r} is a colour (RGB) image; expected grey-level intensities")
    try:
        return tifffile.memmap(path, mode="r")
    except (ValueError, OSError):
        pass
    if len(shape) == 3 and n_pages == shape[0]:
        return _TiffPages(path, shape, dtype)
    return _Eager(lambda: tifffile.imread(path), shape, dtype)


class _LazySource:
    """Minimal array-like (shape, dtype, ndim, size, __getitem__) for dask.array.from_array."""

    def __init__(self, shape, dtype):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return int(np.prod(self.shape))


class _Eager(_LazySource):
    """A source that reads everything at the first access (TIFF layouts tifffile cannot map)."""

    def __init__(self, load, shape, dtype):
        super().__init__(shape, dtype)
        self._load = load

    def __getitem__(self, key):
        return np.asarray(self._load())[key]


class _TiffPages(_LazySource):
    """A multi-page TIFF stack read page by page (compressed TIFF that cannot be memory-mapped)."""

    def __init__(self, path, shape, dtype):
        super().__init__(shape, dtype)
        self.path = path

    def __getitem__(self, key):
        import tifffile

        key = key if isinstance(key, tuple) else (key,)
        first = key[0] if key else slice(None)
        if isinstance(first, int | np.integer):
            pages = [int(first) % self.shape[0]]
            rest, squeeze = key[1:], True
        else:
            pages = list(range(self.shape[0]))[first]
            rest, squeeze = key[1:], False
        if not pages:
            return np.empty((0,) + self.shape[1:], dtype=self.dtype)[(slice(None),) + rest]
        out = np.asarray(tifffile.imread(self.path, key=pages)).reshape((len(pages),) + self.shape[1:])
        out = out[(slice(None),) + rest]
        return out[0] if squeeze else out


class _H5Dataset(_LazySource):
    """An HDF5 dataset that reopens its file on each read, so it pickles and never holds it open."""

    def __init__(self, path, name, shape, dtype):
        super().__init__(shape, dtype)
        self.path, self.name = path, name

    def __getitem__(self, key):
        import h5py

        with h5py.File(self.path, "r") as fh:
            return fh[self.name][key]


def _open_h5(path):

    with _open_h5_file(path) as fh:
        name = _find_h5_dataset(fh, path)
        dset = fh[name]
        return _H5Dataset(path, name, dset.shape, dset.dtype)


def _find_h5_dataset(fh, path):
    """Name of the dataset holding the intensities in an open HDF5/CXI file (rules: read_stack)."""
    import h5py

    if _ext(path) == ".cxi":
        for name in CXI_PATHS:
            if isinstance(fh.get(name), h5py.Dataset):
                return name
        raise ValueError(f"{_name(path)!r} has no {CXI_PATHS[0]} or {CXI_PATHS[1]} data set")
    for name in ("data", "intensity"):
        if isinstance(fh.get(name), h5py.Dataset):
            return name
    found = []

    def visit(name, obj):
        if (isinstance(obj, h5py.Dataset) and obj.ndim in (2, 3) and obj.dtype.kind in "uifc"
                and posixpath.basename(name) != _MASK_KEY):  # a mask beside the data is not the data
            found.append(name)

    fh.visititems(visit)
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"{_name(path)!r} holds no 2-D or 3-D data set")
    raise ValueError(f"{_name(path)!r} holds several image data sets ({', '.join(found[:4])}) and none named 'data'")


# =========================================================================== masks
def read_mask(path, shape):
    """Read a mask of unmeasured pixels (beamstop, gaps, bad pixels) from a file.

    Formats: ``.npy``; ``.npz`` (key ``mask``, else the only array); ``.tif``/``.tiff``;
    ``.h5``/``.hdf5`` (dataset ``mask``, else the only 2-D/3-D dataset); ``.cxi`` (the CXI
    detector mask, :data:`CXI_MASK_PATHS`, else as ``.h5``).

    Parameters
    ----------
    path : str or os.PathLike
    shape : tuple of int
        Shape of the stack the mask belongs to, ``(N, H, W)`` or ``(H, W)``.

    Returns
    -------
    ndarray, bool, (H, W) or (N, H, W)
        True on unmeasured pixels.  Boolean masks are taken as they are; integer masks are
        True where nonzero.  A 2-D mask holds for every frame.

    Raises
    ------
    OSError
        The file is missing or cannot be opened.
    ValueError
        Unsupported extension; an unreadable file; no suitable array; an array that is not
        boolean or integer; a shape other than ``(H, W)`` or ``(N, H, W)`` of the stack.
    """
    path, ext = _input_path(path, STACK_EXTENSIONS)
    if os.path.getsize(path) == 0:
        raise ValueError(f"the mask {_name(path)!r} is empty")
    loader = {".npy": _mask_npy, ".npz": _mask_npz, ".tif": _mask_tiff, ".tiff": _mask_tiff,
              ".h5": _mask_h5, ".hdf5": _mask_h5, ".cxi": _mask_h5}[ext]
    name = repr(_name(path))
    try:
        raw = loader(path)
    except ValueError as exc:  # say that it is the mask that is bad
        text = str(exc)
        raise ValueError(f"the mask {text}" if text.startswith(name) else f"the mask {name}: {text}") from None
    return _check_mask(raw, shape, f"the mask {name}")


def file_mask(path, shape=None):
    """The mask a stack file carries beside its data, or None.

    Looked for: the key ``mask`` of an ``.npz`` file (``cdinn simulate --beamstop`` writes it);
    a dataset ``mask`` in the group of the data of an ``.h5``/``.hdf5`` file; in a ``.cxi`` file
    the detector mask (:data:`CXI_MASK_PATHS`, CXI's convention: nonzero = bad pixel), else a
    ``mask`` beside the data.  Checked as :func:`read_mask` checks a mask file.

    Parameters
    ----------
    path : str or os.PathLike
        A stack file readable by :func:`read_stack`.
    shape : tuple of int, optional
        The stack's shape (default: :func:`stack_shape` of ``path``).

    Returns
    -------
    ndarray of bool, (H, W) or (N, H, W), True = unmeasured; or None.
    """
    path, ext = _input_path(path, STACK_EXTENSIONS)
    shape = stack_shape(path) if shape is None else tuple(shape)
    raw = None
    if ext == ".npz":
        raw = _npz_mask_beside_data(path)
    elif ext in (".h5", ".hdf5", ".cxi"):
        raw = _h5_mask_beside_data(path, ext)
    return None if raw is None else _check_mask(raw, shape, f"the mask in {_name(path)!r}")


def _check_mask(mask, shape, what):
    """``mask`` as bool after checking its dtype and its shape against the stack's ``shape``."""
    mask = np.asarray(mask)
    if mask.dtype.kind not in "bui":
        raise ValueError(f"{what} must hold booleans or integers (True/1 = unmeasured), got {mask.dtype}")
    shape = tuple(int(s) for s in shape)
    frame = shape[-2:]
    stack = ((shape[0] if len(shape) == 3 else 1),) + frame
    if mask.shape not in (frame, stack):
        raise ValueError(f"{what} is shaped {tuple(mask.shape)} but the data are {shape}; "
                         f"expected {frame} or {stack}")
    return mask != 0 if mask.dtype.kind != "b" else np.array(mask, dtype=bool)


def _mask_npy(path):
    return np.asarray(_open_npy(path))


def _mask_npz(path):
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = [k for k in npz.files if k != _ATTRS_KEY]
            if _MASK_KEY in keys:
                return npz[_MASK_KEY]
            if len(keys) == 1:
                return npz[keys[0]]
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise ValueError(f"{_name(path)!r} is truncated or not a valid .npz file ({_first_line(exc)})") from None
    if not keys:
        raise ValueError(f"{_name(path)!r} holds no arrays")
    raise ValueError(f"{_name(path)!r} holds several arrays ({', '.join(keys)}) and none named 'mask'")


def _mask_tiff(path):
    import tifffile

    try:
        return tifffile.imread(path)
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for foreign or broken files
        raise ValueError(f"{_name(path)!r} is not a readable TIFF file ({_first_line(exc)})") from None


def _mask_h5(path):
    import h5py

    with _open_h5_file(path) as fh:
        names = list(CXI_MASK_PATHS) if _ext(path) == ".cxi" else []
        for name in names + [_MASK_KEY]:
            if isinstance(fh.get(name), h5py.Dataset):
                return fh[name][()]
        found = []

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.ndim in (2, 3) and obj.dtype.kind in "buif":
                found.append(name)

        fh.visititems(visit)
        if len(found) == 1:
            return fh[found[0]][()]
    if not found:
        raise ValueError(f"{_name(path)!r} holds no 2-D or 3-D data set")
    raise ValueError(f"{_name(path)!r} holds several data sets ({', '.join(found[:4])}) and none named 'mask'")


def _npz_mask_beside_data(path):
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = [k for k in npz.files if k != _ATTRS_KEY]
            return npz[_MASK_KEY] if _MASK_KEY in keys and len(keys) > 1 else None
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise ValueError(f"{_name(path)!r} is truncated or not a valid .npz file ({_first_line(exc)})") from None


def _h5_mask_beside_data(path, ext):
    import h5py

    with _open_h5_file(path) as fh:
        data = _find_h5_dataset(fh, path)
        names = list(CXI_MASK_PATHS) if ext == ".cxi" else []
        names.append(posixpath.join(posixpath.dirname(data), _MASK_KEY))
        for name in names:
            if name != data and isinstance(fh.get(name), h5py.Dataset):
                return fh[name][()]
    return None


# =========================================================================== results
def write_result(path, arrays, attrs=None):
    """Write result arrays (``amplitude``, ``phase``, ``chi2``, ``support``...) atomically.

    The format follows the extension:

    * ``.npz``: one array per key (uncompressed, fast to load); ``attrs`` as JSON text under
      the key ``__attrs__``.
    * ``.h5``/``.hdf5``: one dataset per key at the root, gzip-compressed (level 4, shuffle)
      and chunked by whole frames (:func:`h5_chunk_frames`); ``attrs`` as root attributes.
      Written by :class:`H5ResultWriter`, the writer of streamed results too, so a result
      streamed by :func:`napari_cdinn.stream.process_stack` gives the same file.
    * ``.cxi``: the ``.h5`` layout plus a minimal CXI tree: ``cxi_version`` (150), and
      ``entry_1/result_1/<key>`` hard links to every dataset (no data are duplicated);
      ``entry_1/data_1/data`` links to ``intensity`` when it is written, so that
      :func:`read_stack` reads such a file back; ``entry_1/image_1/data`` holds the complex
      object ``amplitude * exp(1j * phase)`` when both are given (CXI's reconstruction image).

    Attributes round-trip as str, int, float, bool and numeric lists; anything else is stored
    as its JSON text.

    Parameters
    ----------
    path : str or os.PathLike
    arrays : dict of str -> array_like
        Non-empty; keys are names without ``/``; values numeric or boolean arrays.
    attrs : dict, optional
        Metadata (model name, algorithm, iterations...).

    Raises
    ------
    ValueError
        Unsupported extension, no arrays, a bad key or a non-numeric array.
    OSError
        The output cannot be written; an existing file is then left untouched.
    """
    path = os.fspath(path)
    ext = _ext(path)
    if ext not in RESULT_EXTENSIONS:
        raise ValueError(f"{_name(path)!r} has an unsupported extension; results are written to {', '.join(RESULT_EXTENSIONS)}")
    arrays = _check_result_arrays(arrays)
    attrs = dict(attrs or {})
    with atomic_output(path) as tmp:
        if ext == ".npz":
            with open(tmp, "wb") as fh:
                extra = {_ATTRS_KEY: np.array(json.dumps(attrs, default=_json_default))} if attrs else {}
                np.savez(fh, **arrays, **extra)
        else:
            _write_h5(tmp, arrays, attrs, cxi=ext == ".cxi")


def _check_result_arrays(arrays):
    if not arrays:
        raise ValueError("there are no result arrays to write")
    out = {}
    for key, value in arrays.items():
        if not isinstance(key, str) or not key or "/" in key or key == _ATTRS_KEY:
            raise ValueError(f"{key!r} is not a valid result name")
        arr = np.asarray(value)
        if arr.dtype.kind not in "biufc":
            raise ValueError(f"the result {key!r} holds {arr.dtype} data; expected numbers")
        out[key] = arr
    return out


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


#: HDF5 results are stored in whole-frame chunks of about this many bytes...
H5_CHUNK_BYTES = 2**20
#: ...and at most this many frames: a power of two, so that it divides the default run chunk of
#: ``cdinn predict``/``reconstruct`` (4096 frames).
H5_CHUNK_FRAMES = 4096


def h5_chunk_frames(n, frame_bytes, run_chunk=None):
    """Frames per HDF5 storage chunk of a result dataset of ``n`` frames of ``frame_bytes`` each.

    The largest power of two up to :data:`H5_CHUNK_FRAMES` whose chunk stays within
    :data:`H5_CHUNK_BYTES`, at most ``n``.  When the frames are written in several runs of
    ``run_chunk`` frames (:func:`napari_cdinn.stream.process_stack`), the storage chunk must divide
    the run chunk, so that no compressed chunk is ever shared by two runs (rewriting half of one
    when a killed run is resumed can corrupt the other half): it is then the largest divisor of
    ``run_chunk`` not above that size, or None (store contiguous and uncompressed) when that
    divisor is under a sixteenth of it (a prime ``run_chunk``, say).  Any ``run_chunk`` that is
    a multiple of the in-memory choice (every multiple of 4096 frames is) gives the in-memory
    layout: the streamed file then equals the file :func:`write_result` writes.

    Returns
    -------
    int, or None for a contiguous dataset.
    """
    n = max(int(n), 1)
    rows = 1
    while rows * 2 <= H5_CHUNK_FRAMES and rows * 2 * frame_bytes <= H5_CHUNK_BYTES:
        rows *= 2
    rows = min(rows, n)
    if run_chunk is None or run_chunk >= n or run_chunk % rows == 0:
        return rows
    fit = max(d for d in range(1, rows + 1) if run_chunk % d == 0)
    return fit if 16 * fit >= rows else None


def h5_dataset_options(shape, dtype, run_chunk=None):
    """``h5py.Group.create_dataset`` keywords of a result dataset: gzip (level 4, shuffle) in
    whole-frame chunks of :func:`h5_chunk_frames` frames along the first axis; contiguous and
    uncompressed for scalars, empty arrays, or where :func:`h5_chunk_frames` says so."""
    shape = tuple(int(s) for s in shape)
    if not shape or 0 in shape:
        return {}
    frame_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    rows = h5_chunk_frames(shape[0], frame_bytes, run_chunk)
    if rows is None:
        return {}
    return {"chunks": (rows,) + shape[1:], "compression": "gzip", "compression_opts": 4, "shuffle": True}


class H5ResultWriter:
    """The one writer of HDF5/CXI results, for streamed and in-memory output alike.

    Datasets are created at their first write with :func:`h5_dataset_options`, attributes are
    encoded by one rule (:meth:`set_attrs`) and :meth:`finish` adds the CXI tree.  A stream
    (:func:`napari_cdinn.stream.process_stack`) calls :meth:`write_frames` once per run chunk of
    ``run_chunk`` frames; an in-memory result (:func:`write_result`) is the one-chunk case,
    :meth:`write_arrays`.  So a streamed file and an in-memory file of the same results hold the
    same datasets (values, dtypes, shapes, chunks, filters) and attributes whenever the run
    chunk is a multiple of the in-memory storage chunk (:func:`h5_chunk_frames`).

    Parameters
    ----------
    fh : h5py.File
        Open for writing.
    frames : int, optional
        Frames of the whole result (streams: the datasets' first dimension).
    run_chunk : int, optional
        Frames per :meth:`write_frames` call (the last may be shorter); storage chunks divide it.
    """

    def __init__(self, fh, frames=None, run_chunk=None):
        self.fh, self.frames, self.run_chunk = fh, frames, run_chunk

    def write_frames(self, start, stop, arrays):
        """Write frames ``start:stop`` of every per-frame array of ``arrays`` (leading length ``stop - start``)."""
        for key, value in arrays.items():
            value = np.asarray(value)
            if key not in self.fh:
                shape = (self.frames,) + value.shape[1:]
                self.fh.create_dataset(key, shape=shape, dtype=value.dtype,
                                       **h5_dataset_options(shape, value.dtype, self.run_chunk))
            self.fh[key][start:stop] = value

    def write_arrays(self, arrays):
        """Write whole arrays of any shape (the in-memory, one-chunk case)."""
        for key, arr in arrays.items():
            arr = np.asarray(arr)
            self.fh.create_dataset(key, data=arr, **h5_dataset_options(arr.shape, arr.dtype))

    def set_attrs(self, attrs):
        """Store metadata as root attributes: str, bool, numbers and numeric lists as they are,
        anything else as its JSON text."""
        for key, value in (attrs or {}).items():
            self.fh.attrs[key] = _h5_attr(value)

    def finish(self, cxi=False):
        """Add the minimal CXI tree over the root datasets (``cxi``: the output is a ``.cxi`` file)."""
        if cxi:
            _write_cxi_tree(self.fh, [k for k in self.fh if k != "cxi_version"])


def _write_h5(tmp, arrays, attrs, cxi):
    import h5py

    with h5py.File(tmp, "w") as fh:
        writer = H5ResultWriter(fh)
        writer.write_arrays(arrays)
        writer.set_attrs(attrs)
        writer.finish(cxi)


def _h5_attr(value):
    if isinstance(value, str | bool | int | float | np.generic):
        return value
    arr = np.asarray(value) if isinstance(value, list | tuple | np.ndarray) else None
    if arr is not None and arr.dtype.kind in "biuf":
        return arr
    return json.dumps(value, default=_json_default)


def _write_cxi_tree(fh, names):
    """Add the minimal CXI tree over the root datasets ``names`` of an open HDF5 file.

    The complex image is computed frame block by frame block from the stored datasets, so a
    streamed stack of any length is converted with bounded memory.
    """
    fh.create_dataset("cxi_version", data=150)
    entry = fh.create_group("entry_1")
    result = entry.create_group("result_1")
    for key in names:
        result[key] = fh[key]  # hard link
    if "intensity" in names:
        entry.create_group("data_1")["data"] = fh["intensity"]
    if "amplitude" in names and "phase" in names and fh["amplitude"].shape == fh["phase"].shape:
        amp, pha = fh["amplitude"], fh["phase"]
        image = entry.create_group("image_1")
        if amp.ndim < 3:  # one frame: small
            data = image.create_dataset("data", data=(amp[()] * np.exp(1j * pha[()])).astype(np.complex64))
        else:
            options = h5_dataset_options(amp.shape, np.complex64)
            data = image.create_dataset("data", shape=amp.shape, dtype=np.complex64, **options)
            step = options["chunks"][0] if options else max(amp.shape[0], 1)
            for a in range(0, amp.shape[0], step):
                b = a + step
                data[a:b] = (amp[a:b] * np.exp(1j * pha[a:b])).astype(np.complex64)
        data.attrs["data_type"] = "reconstruction"


def read_result(path, with_attrs=False, keys=None):
    """Read a file written by :func:`write_result` back into a dict of NumPy arrays.

    For ``.h5``/``.cxi`` the datasets at the root are returned (``cxi_version`` excepted); a
    CXI file without root datasets gives those in ``entry_1/result_1``.

    Parameters
    ----------
    path : str or os.PathLike
    with_attrs : bool
        Also return the attributes dict.
    keys : iterable of str, optional
        Read only these arrays (those missing from the file are skipped).

    Returns
    -------
    dict of str -> ndarray, or (dict, attrs) when ``with_attrs``.
    """
    path, ext = _input_path(path, RESULT_EXTENSIONS)
    keys = None if keys is None else set(keys)
    arrays, attrs = _read_npz_result(path, keys) if ext == ".npz" else _read_h5_result(path, keys)
    return (arrays, attrs) if with_attrs else arrays


def _read_npz_result(path, keys):
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files if keys is None or k in keys or k == _ATTRS_KEY}
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise ValueError(f"{_name(path)!r} is truncated or not a valid .npz file ({_first_line(exc)})") from None
    text = arrays.pop(_ATTRS_KEY, None)
    return arrays, (json.loads(str(text)) if text is not None else {})


def _read_h5_result(path, keys):
    import h5py

    with _open_h5_file(path) as fh:
        group = fh
        names = [k for k, v in fh.items() if isinstance(v, h5py.Dataset) and k != "cxi_version"]
        if not names and isinstance(fh.get("entry_1/result_1"), h5py.Group):
            group = fh["entry_1/result_1"]
            names = [k for k, v in group.items() if isinstance(v, h5py.Dataset)]
        arrays = {k: group[k][()] for k in names if keys is None or k in keys}
        attrs = {k: (v.item() if isinstance(v, np.generic) else v.tolist() if isinstance(v, np.ndarray) else v)
                 for k, v in fh.attrs.items()}
    if not arrays and keys is None:
        raise ValueError(f"{_name(path)!r} holds no result data sets")
    return arrays, attrs
