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
name, nor overwrites an existing one; the file follows the umask, and a full disk is one
``OSError`` naming it (:func:`disk_full`).

Memory is bounded by bytes, not frames: :func:`memory_budget` (``CDINN_MEMORY``, default 1 GiB)
bounds the frames a job holds at once (:func:`frames_in_budget`), a whole read
(``read_stack(lazy=False)``, :func:`read_result`) and a mask; ``.npz`` members are memory-mapped
where stored and decompressed frame range by frame range where compressed (a member whose size
exceeds the budget is refused before it is read).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .checks import check_mask_layout

if TYPE_CHECKING:
    import dask.array as da
    from numpy.typing import ArrayLike

__all__ = [
    "RESULT_EXTENSIONS",
    "STACK_EXTENSIONS",
    "H5ResultWriter",
    "MEMORY_BUDGET",
    "atomic_output",
    "check_not_input",
    "check_writable",
    "detector_markers",
    "disk_full",
    "file_beam_centre",
    "file_mask",
    "float32_frames",
    "input_exists",
    "input_identity",
    "frames_in_budget",
    "memory_budget",
    "open_stack",
    "parse_size",
    "h5_chunk_frames",
    "h5_dataset_options",
    "read_frames",
    "read_mask",
    "read_result",
    "read_stack",
    "series_files",
    "stack_shape",
    "write_json",
    "write_npz",
    "write_result",
]


def check_writable(path: str | os.PathLike) -> None:
    """Raise ``OSError`` with one clear sentence when ``path`` cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OSError(f"the output folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise OSError(f"the output {path!r} is a folder")
    if not os.access(folder, os.W_OK):
        raise OSError(f"the output folder {folder!r} is not writable")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only on success.

    The temporary name keeps the extension (``.name.XXXX.tmp.npz``) so that libraries that
    choose a format by extension behave; on any exception it is removed and the error re-raised.
    """
    check_writable(path)
    folder, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=folder)
    except OSError as exc:  # a folder that refuses new files (a read-only mount, /proc): name the output, not ours
        raise OSError(f"could not write {os.fspath(path)!r}: {exc.strerror or _first_line(exc)}") from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600: a result follows the umask
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if disk_full(exc):
            raise OSError(f"could not write {os.fspath(path)!r}: {disk_full(exc)}") from None
        raise


def current_umask() -> int:
    """The process's file-creation mask (read without changing it for long)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def disk_full(exc: BaseException) -> str | None:
    """The reason when ``exc`` is a write that failed for want of space (full disk, quota, ``ulimit -f``), else None.

    h5py reports HDF5's failed writes as ``OSError`` or ``RuntimeError`` with the errno in its text.
    """
    import errno

    reasons = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
               errno.EFBIG: "the file size limit is reached (ulimit -f)"}
    if not isinstance(exc, OSError | RuntimeError):
        return None
    if isinstance(exc, OSError) and exc.errno in reasons:
        return reasons[exc.errno]
    text = str(exc)
    for code, reason in reasons.items():
        if f"errno = {code}," in text or os.strerror(code) in text:
            return reason
    return None


def check_not_input(out: str | os.PathLike, *inputs: str | os.PathLike | None, what: str = "the output") -> None:
    """Raise ``ValueError`` when ``out`` is (or links to) one of ``inputs``: a result never replaces its data."""
    if not os.path.exists(out):
        return
    for src in inputs:
        if src is None or not isinstance(src, str | os.PathLike) or not os.path.exists(src):
            continue
        if os.path.samefile(out, src) or os.path.realpath(out) == os.path.realpath(src):
            raise ValueError(f"{what} {os.fspath(out)!r} is the input file {os.fspath(src)!r}; "
                             "choose another output name (the input is never overwritten)")


#: Default memory budget in bytes (``CDINN_MEMORY`` or ``--memory`` change it): chunk and batch
#: sizes are chosen so that a run's arrays stay within it.
MEMORY_BUDGET = 2**30
#: Bytes of working memory per byte of a float32 input frame that a chunk costs (input, results,
#: complex intermediates of the retrieval): a chunk of ``k`` frames needs about ``k * frame * WORK_FACTOR``.
WORK_FACTOR = 16
_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}


def parse_size(text: str | int | float, what: str = "size") -> int:
    """Bytes of a size such as ``512M``, ``2G``, ``1.5GiB`` or ``1000000`` (ValueError naming ``what``)."""
    import re

    if isinstance(text, int | float) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        value, unit = (float(m.group(1)), m.group(2).upper()) if m else (0.0, "?")
    if unit not in _UNITS or not np.isfinite(value) or value * _UNITS[unit] < 2**20:
        raise ValueError(f"{what}: expected a size of at least 1M, such as 512M or 2G, got {text!r}")
    return int(value * _UNITS[unit])


def memory_budget(value: str | int | None = None) -> int:
    """The memory budget in bytes: ``value`` if given, else the ``CDINN_MEMORY`` variable, else :data:`MEMORY_BUDGET`."""
    if value is not None:
        return parse_size(value, "--memory")
    env = os.environ.get("CDINN_MEMORY")
    return parse_size(env, "CDINN_MEMORY") if env else MEMORY_BUDGET


def format_bytes(n: float) -> str:
    """``n`` bytes in words: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def frames_in_budget(frame_shape: Sequence[int], budget: int | None = None, factor: int = WORK_FACTOR,
                     what: str = "the data") -> int:
    """Frames of ``frame_shape`` that fit a memory budget at ``factor`` bytes of work per float32 byte (at least 1).

    Raises ``ValueError`` (one sentence) when a single frame does not fit.
    """
    budget = memory_budget() if budget is None else int(budget)
    frame = int(np.prod([int(s) for s in frame_shape], dtype=np.int64)) * 4
    count = budget // max(frame * factor, 1)
    if count < 1:
        size = " x ".join(str(int(s)) for s in frame_shape)
        raise ValueError(f"one frame of {what} ({size}) needs about {format_bytes(frame * factor)} of memory, "
                         f"more than the memory budget of {format_bytes(budget)} (CDINN_MEMORY or --memory sets it)")
    return int(count)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (NumPy scalars and arrays become numbers and lists)."""
    with atomic_output(path) as tmp, open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, default=_json_default)


def write_npz(path: str | os.PathLike, arrays: Mapping[str, ArrayLike]) -> None:
    """Write a dict of arrays to an ``.npz`` file atomically (uncompressed, fast to load)."""
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})


# =========================================================================== reading stacks
#: File extensions :func:`read_stack` understands (lower case).
STACK_EXTENSIONS = (".npy", ".npz", ".tif", ".tiff", ".h5", ".hdf5", ".nxs", ".cxi", ".cbf", ".edf")
#: Formats that hold one detector frame per file (read through fabio).
FRAME_EXTENSIONS = (".cbf", ".edf")
#: Formats of files holding one detector frame each, read as a stack from a folder or a glob pattern.
SERIES_EXTENSIONS = (".cbf", ".edf", ".tif", ".tiff", ".npy")
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


def read_stack(path: str | os.PathLike, lazy: bool | None = None) -> np.ndarray | da.Array:
    """Read measured diffraction intensities from a file as ``(N, H, W)`` or ``(H, W)`` float32.

    Formats (design.md): ``.npy``; ``.npz`` (key ``intensity``, else ``data``, else the only
    array); ``.tif``/``.tiff`` (its stack of frames, frames written one by one included);
    ``.h5``/``.hdf5``/``.nxs`` (dataset ``data``, else
    ``intensity``, else the NeXus default plot's signal, else the ``data_NNNNNN`` datasets of a Dectris
    Eiger master file's ``entry/data`` as one stack, else the only 2-D/3-D numeric dataset anywhere in
    the file; compression filters by ``hdf5plugin``); ``.cxi``
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
    frames_in_budget(source.shape[-2:], factor=1, what=repr(_name(path)))  # one frame must fit, even lazily
    if lazy:
        return _to_dask(source).map_blocks(float32_frames, dtype=np.float32)
    budget = memory_budget()
    if source.size * 4 > budget:
        raise ValueError(f"{_name(path)!r} holds {format_bytes(source.size * 4)} as float32, more than the memory "
                         f"budget of {format_bytes(budget)}; read it lazily (lazy=None) or set CDINN_MEMORY")
    try:
        data = source if isinstance(source, np.ndarray) else source[...]
        return _as_float32(data, path)  # a copy: never a view of a memory map
    except (OSError, EOFError) as exc:
        raise ValueError(f"{_name(path)!r} could not be read completely (truncated?): {_first_line(exc)}") from None
    except ValueError as exc:
        if "float32" in str(exc):
            raise
        raise ValueError(f"{_name(path)!r} could not be read completely (truncated?): {_first_line(exc)}") from None


def detector_markers(values, dtype):
    """Pixels that an integer detector marks as not measured, in ``values`` read from ``dtype`` data.

    Negative values (PILATUS: -1 in the gaps, -2 on bad pixels) and, for unsigned data, the largest
    value (Dectris EIGER: ``2**bits - 1`` in the gaps and on defective pixels; a counter stuck at its
    top is saturated).  Float data have no markers (a negative reading less its dark is noise).

    Parameters
    ----------
    values : array_like
        Frames as stored, or converted to float (an unsigned type's largest value survives float32).
    dtype : numpy dtype
        The stored data's type.

    Returns
    -------
    numpy.ndarray of bool, or None for float data.
    """
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        return None
    values = np.asarray(values)
    marked = values < 0 if dtype.kind == "i" else np.zeros(values.shape, dtype=bool)
    if dtype.kind == "u":
        marked |= values == values.dtype.type(np.iinfo(dtype).max)
    return marked


def float32_frames(block):
    """A block of stored frames as a float32 NumPy array, an integer detector's marker values as NaN
    (unmeasured): what every reader of frames gives, from files and from in-memory stacks alike."""
    block = np.asarray(block)  # read once (a dask chunk, a lazy source)
    out = block.astype(np.float32)
    markers = detector_markers(block, block.dtype)
    if markers is not None and markers.any():
        out[markers] = np.nan
    return out


def _as_float32(data, path, first=0):
    """``data`` as a float32 copy, an integer detector's marker values as NaN (:func:`detector_markers`);
    values beyond float32's range raise ``ValueError`` (they would become infinite, and so unmeasured,
    without a word).  ``first``: the stack index of ``data``'s first frame."""
    data = np.asarray(data)
    if data.dtype.kind == "f" and data.dtype.itemsize > 4:
        with np.errstate(invalid="ignore"):
            big = (np.abs(data) > np.finfo(np.float32).max) & np.isfinite(data)
        if big.any():
            where = np.argwhere(big)[0]
            frame = f", frame {first + int(where[0])}" if data.ndim == 3 else ""
            raise ValueError(f"{_name(path)!r} holds values beyond float32's range (such as "
                             f"{float(data[tuple(where)]):.3g}{frame}); rescale the data (results do not depend "
                             "on the scale)")
    return float32_frames(data)


def _natural_key(path):
    """Sort key that orders ``frame_2`` before ``frame_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", os.path.basename(path))]


def series_files(path: str | os.PathLike) -> list[str] | None:
    """The files of a frame series, in natural order, or None when ``path`` names one file.

    A series is a folder (its files of one extension of :data:`SERIES_EXTENSIONS`) or a glob pattern
    (``scan_*.cbf``), each file one detector frame (PILATUS CBF, EDF, TIFF or ``.npy``).

    Raises
    ------
    ValueError
        When nothing matches, or the files mix formats.
    """
    import glob

    path = os.fspath(path)
    if os.path.isdir(path):  # hidden files (``.name``, macOS ``._name``) are not frames, as for a glob
        candidates = [os.path.join(path, name) for name in os.listdir(path) if not name.startswith(".")]
    elif glob.has_magic(path) and not os.path.exists(path):
        candidates = glob.glob(path)
    else:
        return None
    files = [f for f in candidates if os.path.isfile(f) and _ext(f) in SERIES_EXTENSIONS]
    if not files:
        raise ValueError(f"no frame files ({', '.join(SERIES_EXTENSIONS)}) in {path!r}")
    kinds = sorted({_ext(f) for f in files})
    if len(kinds) > 1:
        raise ValueError(f"{path!r} holds frames of several formats ({', '.join(kinds)}); name one with a pattern "
                         f"such as {os.path.join(path if os.path.isdir(path) else os.path.dirname(path), '*' + kinds[0])!r}")
    return sorted(files, key=_natural_key)


@contextlib.contextmanager
def _quiet(*loggers):
    """Silence the named libraries' log records (fabio, tifffile) for a read: a broken file becomes one
    error sentence, not their warnings on stderr beside it."""
    import logging

    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


#: What starts the binary data of a CBF file (after its ASCII header).
CBF_BINARY_START = b"\x0c\x1a\x04\xd5"


def _check_cbf(path):
    """Raise ValueError when a CBF file lacks its binary section or holds fewer bytes than its header
    declares (a frame cut off while written): fabio would wait for them forever."""
    with open(path, "rb") as fh:
        raw = fh.read()
    start = raw.find(CBF_BINARY_START)
    if start < 0:
        raise ValueError(f"{_name(path)!r} is truncated or not a CBF file (no binary section)")
    size = re.search(rb"X-Binary-Size:\s*(\d+)", raw[:start])
    if size and len(raw) - start - len(CBF_BINARY_START) < int(size.group(1)):
        raise ValueError(f"{_name(path)!r} is truncated (its binary section is incomplete)")


def _read_fabio(path):
    """A CBF or EDF file's frame through fabio, checked whole first."""
    import fabio

    if _ext(path) == ".cbf":
        _check_cbf(path)
    with _quiet("fabio"):
        image = fabio.open(path)
        data = np.asarray(image.data)
    if getattr(image, "incomplete_file", False):
        raise ValueError(f"{_name(path)!r} is truncated (its data are incomplete)")
    return data


def _read_tiff(path, what="file", **kwargs):
    """``tifffile.imread(path, **kwargs)``; a broken or truncated file is one ValueError naming it."""
    import tifffile

    try:
        with _quiet("tifffile"):
            return tifffile.imread(path, **kwargs)
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for foreign or broken files
        raise ValueError(f"{_name(path)!r} is not a readable TIFF {what} ({_first_line(exc)})") from None


def _read_frame_file(path):
    """The one frame a series file holds, as stored (2-D)."""
    ext = _ext(path)
    try:
        if ext in (".cbf", ".edf"):
            data = _read_fabio(path)
        elif ext in (".tif", ".tiff"):
            data = np.asarray(_read_tiff(path, "frame"))
        else:
            data = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if str(exc).startswith(repr(_name(path))):
            raise
        raise ValueError(f"{_name(path)!r} is not a readable frame ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - each library reports a broken file its own way
        raise ValueError(f"{_name(path)!r} is not a readable frame ({_first_line(exc)})") from None
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise ValueError(f"{_name(path)!r} holds a {data.ndim}-D array {data.shape}; a series file holds one frame")
    return data


def _single_frame(path):
    """A CBF/EDF file: its one frame, read when indexed."""
    first = _read_frame_file(path)
    return _Eager(lambda: first, first.shape, first.dtype)


def _open_source(path):
    """``(path, source)``: the checked, sliceable array-like behind a stack file or a frame series (nothing
    read yet but a series' first frame)."""
    files = series_files(path)
    if files is not None:
        source = _FileSeries(files, _read_frame_file(files[0]))
        _check_stack(source, path)
        return os.fspath(path), source
    path, ext = _input_path(path, STACK_EXTENSIONS)
    if os.path.getsize(path) == 0:
        raise ValueError(f"{_name(path)!r} is empty")
    opener = {".npy": _open_npy, ".npz": _open_npz, ".tif": _open_tiff, ".tiff": _open_tiff,
              ".h5": _open_h5, ".hdf5": _open_h5, ".nxs": _open_h5, ".cxi": _open_h5,
              ".cbf": _single_frame, ".edf": _single_frame}[ext]
    source = opener(path)
    _check_stack(source, path)
    return path, source


def input_identity(path: str | os.PathLike) -> dict:
    """What identifies an input on disk (for resuming): path, size and modification time of a file, or
    of a series its count, first and last files, total size and latest modification."""
    files = series_files(path)
    if files is None:
        st = os.stat(path)
        return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    stats = [os.stat(f) for f in files]
    return {"series": os.path.abspath(os.fspath(path)), "files": len(files), "first": os.path.abspath(files[0]),
            "last": os.path.abspath(files[-1]), "size": sum(st.st_size for st in stats),
            "mtime_ns": max(st.st_mtime_ns for st in stats)}


def input_exists(path: str | os.PathLike) -> bool:
    """True for an existing file, a folder, or a glob pattern that matches (a frame series)."""
    import glob

    path = os.fspath(path)
    return os.path.isfile(path) or os.path.isdir(path) or (glob.has_magic(path) and bool(glob.glob(path)))


def stack_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """Shape ``(N, H, W)`` or ``(H, W)`` of a stack file, checked as :func:`read_stack` checks it, without reading it."""
    return tuple(_open_source(path)[1].shape)


def open_stack(path: str | os.PathLike, float32: bool = False) -> Any:
    """The stack of a file as a sliceable array-like that reads only the frames indexed (nothing read yet).

    No dask graph (nor dask's import, nor a scheduler lookup): for a job that reads a few frames,
    such as a sample.  Index it with integers, slices or increasing integer arrays on the first
    axis (``stack[idx]``, ``stack[...]``); values come back as stored (any numeric dtype, not
    converted or checked beyond what :func:`stack_shape` checks), or with ``float32`` as
    :func:`read_stack` gives them (float32, an integer detector's marker values NaN).
    """
    path, source = _open_source(path)
    return _Float32Source(source, path) if float32 else source


def read_frames(path: str | os.PathLike, start: int, stop: int) -> np.ndarray:
    """Frames ``start:stop`` of a stack file as float32 ``(n, H, W)``, reading only those frames.

    A 2-D file is one frame.  The streaming jobs read their chunks this way: no dask graph and no
    scheduler lookup per chunk (same formats and errors as :func:`read_stack`).
    """
    path, source = _open_source(path)
    if len(source.shape) == 2:
        return _as_float32(source[:, :], path)[None][start:stop]
    return _as_float32(source[start:stop], path, start)


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


def _h5py():
    """h5py, with the compression filters of detector files registered where ``hdf5plugin`` is installed
    (bitshuffle/LZ4 of Dectris Eiger files, Blosc, Zstd...: HDF5 itself reads only gzip and szip)."""
    import h5py

    with contextlib.suppress(ImportError):
        import hdf5plugin  # noqa: F401 - importing it registers the filters
    return h5py


def _open_h5_file(path):
    """An open read-only ``h5py.File``, or ValueError for a file that is not HDF5."""
    h5py = _h5py()

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
    if source.shape is None:
        raise ValueError(f"{name!r} holds an empty (null) data set")
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
        if "pickle" in str(exc) or "objects" in str(exc):
            raise ValueError(f"{_name(path)!r} is not a NumPy .npy file (or holds Python objects)") from None
        raise ValueError(f"{_name(path)!r} is truncated or not a valid .npy file") from None


def _open_npz(path):
    keys = [k for k in _npz_keys(path) if k != _ATTRS_KEY]
    for key in ("intensity", "data"):
        if key in keys:
            return _npz_member(path, key)
    keys = [k for k in keys if k != _MASK_KEY]  # a mask beside the data is not the data
    if len(keys) == 1:
        return _npz_member(path, keys[0])
    if not keys:
        raise ValueError(f"{_name(path)!r} holds no intensity arrays")
    raise ValueError(f"{_name(path)!r} holds several arrays ({', '.join(keys)}) and none named 'intensity' or 'data'")


def _npz_bad(path, exc):
    return ValueError(f"{_name(path)!r} is truncated or not a valid .npz file ({_first_line(exc)})")


def _npz_keys(path):
    """The array names of an ``.npz`` file (its ``.npy`` members), read from the zip directory alone."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise _npz_bad(path, exc) from None
    return [n[:-4] if n.endswith(".npy") else n for n in names]


def _npz_member(path, key):
    """The array ``key`` of an ``.npz`` file, not read yet: a memory map where it is stored uncompressed,
    else a source that decompresses the frames asked for (:class:`_NpzStream`), whose decompressed
    size must fit the memory budget (:func:`memory_budget`)."""
    import zipfile

    name = repr(_name(path))
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(key + ".npy") if key + ".npy" in zf.namelist() else zf.getinfo(key)
            if info.flag_bits & 0x1:
                raise ValueError(f"the array {key!r} in {name} is encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                                          zipfile.ZIP_LZMA):
                raise ValueError(f"the array {key!r} in {name} uses an unsupported zip compression "
                                 f"(method {info.compress_type})")
            with zf.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(fh)
                header = fh.tell()
            with open(path, "rb") as raw:  # where the member's bytes start: after its local header
                raw.seek(info.header_offset)
                local = raw.read(30)
            start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    except ValueError as exc:
        if str(exc).startswith("the array"):
            raise
        raise _npz_bad(path, exc) from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, NotImplementedError, RuntimeError) as exc:
        raise _npz_bad(path, exc) from None
    if dtype.hasobject:
        raise ValueError(f"the array {key!r} in {name} holds Python objects, not numbers")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if info.file_size != header + nbytes or local[:4] != b"PK\x03\x04":
        raise ValueError(f"{name} is truncated or not a valid .npz file (the array {key!r} is incomplete)")
    if nbytes == 0:
        return np.empty(shape, dtype)
    if info.compress_type == zipfile.ZIP_STORED:
        if start + header + nbytes > os.path.getsize(path):
            raise ValueError(f"{name} is truncated (the array {key!r} is incomplete)")
        return np.memmap(path, dtype=dtype, mode="r", offset=start + header, shape=shape,
                         order="F" if fortran else "C")
    budget = memory_budget()
    if nbytes > budget or (fortran and len(shape) > 2 and nbytes > LAZY_THRESHOLD):
        raise ValueError(f"the array {key!r} in {name} is compressed and decompresses to {format_bytes(nbytes)}, "
                         f"more than the memory budget of {format_bytes(budget)} allows; save it uncompressed "
                         "(numpy.savez) or as .h5 to stream it, or set CDINN_MEMORY")
    return _NpzStream(path, info.filename, shape, dtype, header, fortran)


def _open_tiff(path):
    import tifffile

    try:
        with _quiet("tifffile"), tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, dtype, axes = tuple(series.shape), series.dtype, series.axes
            n_pages = len(series.pages)
            every = [s for s in tif.series if not getattr(s, "is_reduced", False)]
            sizes = sorted({tuple(s.shape[-2:]) for s in every})
            dtypes = sorted({str(s.dtype) for s in every})
            frames = [len(s.pages) for s in every
                      if (s.ndim == 2 and len(s.pages) == 1) or (s.ndim == 3 and s.shape[0] == len(s.pages))]
            n_all = len(tif.pages)
            whole = len(frames) == len(every) and sum(frames) == n_all
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for foreign or broken files
        raise ValueError(f"{_name(path)!r} is not a readable TIFF file ({_first_line(exc)})") from None
    if len(sizes) > 1:  # tifffile puts pages of another size in other series: never read page 1 alone
        listed = ", ".join(f"{h} x {w}" for h, w in sizes[:4])
        raise ValueError(f"{_name(path)!r} holds images of different sizes ({listed}); "
                         "expected one stack of equal frames (save each size to its own file)")
    if len(dtypes) > 1:
        raise ValueError(f"{_name(path)!r} holds images of different types ({', '.join(dtypes)}); "
                         "expected one stack of equal frames")
    if axes.endswith("S") and len(shape) >= 3:
        raise ValueError(f"{_name(path)!r} is a colour (RGB) image; expected grey-level intensities")
    if len(every) > 1:  # frames written one by one (several series of one size): every page, in order
        if not whole:
            raise ValueError(f"{_name(path)!r} holds {len(every)} image series that are not one page per frame; "
                             "expected one stack of equal frames")
        return _TiffPages(path, (n_all,) + sizes[0], dtype)
    try:
        return tifffile.memmap(path, mode="r")
    except (ValueError, OSError):
        pass
    if len(shape) == 3 and n_pages == shape[0]:
        return _TiffPages(path, shape, dtype)
    return _Eager(lambda: _read_tiff(path), shape, dtype)


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


class _Float32Source(_LazySource):
    """A stack source read as float32, an integer detector's marker values as NaN (:func:`open_stack`)."""

    def __init__(self, source, path):
        super().__init__(source.shape, np.float32)
        self.source, self.path = source, path

    def __getitem__(self, key):
        return _as_float32(self.source[key], self.path)


class _Eager(_LazySource):
    """A source that reads everything at the first access (TIFF layouts tifffile cannot map)."""

    def __init__(self, load, shape, dtype):
        super().__init__(shape, dtype)
        self._load = load

    def __getitem__(self, key):
        return np.asarray(self._load())[key]


class _FileSeries(_LazySource):
    """Frames in one file each (a folder or a glob pattern), read file by file on demand."""

    def __init__(self, files, first):
        super().__init__((len(files),) + first.shape, first.dtype)
        self.files = files

    def __getitem__(self, key):
        frames, rest, squeeze = _first_axis(key, self.shape)
        out = np.empty((len(frames),) + self.shape[1:], dtype=self.dtype)
        for i, f in enumerate(frames):
            frame = _read_frame_file(self.files[f])
            if frame.shape != self.shape[1:]:
                raise ValueError(f"{_name(self.files[f])!r} is {frame.shape[0]} x {frame.shape[1]} pixels, the series' "
                                 f"first frame {self.shape[1]} x {self.shape[2]}")
            if frame.dtype != self.dtype:  # never cast: a wider type would wrap, a detector's marks change
                raise ValueError(f"{_name(self.files[f])!r} stores {frame.dtype} values, the series' first frame "
                                 f"{self.dtype}; a stack's frames must share one type")
            out[i] = frame
        out = out[(slice(None),) + rest]
        return out[0] if squeeze else out


def _first_axis(key, shape):
    """Split an index into a stack of ``shape``: ``(frames, rest, squeeze)``, ``frames`` the list of
    first-axis indices, ``rest`` the index into each frame, ``squeeze`` whether the first axis goes."""
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        at = next(i for i, k in enumerate(key) if k is Ellipsis)
        fill = len(shape) - (len(key) - 1 - sum(k is None for k in key))
        key = key[:at] + (slice(None),) * max(fill, 0) + key[at + 1:]
    first = key[0] if key else slice(None)
    if isinstance(first, int | np.integer):
        return [int(first) % shape[0]], key[1:], True
    return list(np.arange(shape[0])[first].reshape(-1)), key[1:], False


class _TiffPages(_LazySource):
    """A multi-page TIFF stack read page by page (compressed TIFF that cannot be memory-mapped)."""

    def __init__(self, path, shape, dtype):
        super().__init__(shape, dtype)
        self.path = path

    def __getitem__(self, key):
        pages, rest, squeeze = _first_axis(key, self.shape)
        if not pages:
            return np.empty((0,) + self.shape[1:], dtype=self.dtype)[(slice(None),) + rest]
        out = np.asarray(_read_tiff(self.path, key=pages)).reshape((len(pages),) + self.shape[1:])
        out = out[(slice(None),) + rest]
        return out[0] if squeeze else out


class _NpzStream(_LazySource):
    """A compressed ``.npz`` member read by decompressing up to the frames asked for (nothing kept)."""

    def __init__(self, path, member, shape, dtype, header, fortran):
        super().__init__(shape, dtype)
        self.path, self.member, self.header, self.fortran = path, member, header, fortran

    def _read(self, offset, count):
        import zipfile

        with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as fh:
            fh.seek(self.header + offset)
            data = fh.read(count)
        if len(data) != count:
            raise ValueError(f"{_name(self.path)!r} is truncated (the array {self.member!r} is incomplete)")
        return data

    def __getitem__(self, key):
        if self.fortran or len(self.shape) < 3:  # small (checked when opened): read whole
            whole = np.frombuffer(self._read(0, self.size * self.dtype.itemsize), self.dtype)
            return whole.reshape(self.shape, order="F" if self.fortran else "C")[key]
        frames, rest, squeeze = _first_axis(key, self.shape)
        frame = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        if not frames:
            return np.empty((0,) + self.shape[1:], dtype=self.dtype)[(slice(None),) + rest]
        lo, hi = min(frames), max(frames) + 1
        block = np.frombuffer(self._read(lo * frame, (hi - lo) * frame), self.dtype).reshape((hi - lo,) + self.shape[1:])
        out = block[[f - lo for f in frames]][(slice(None),) + rest]
        return out[0] if squeeze else out


class _H5Dataset(_LazySource):
    """An HDF5 dataset that reopens its file on each read, so it pickles and never holds it open."""

    def __init__(self, path, name, shape, dtype):
        super().__init__(shape, dtype)
        self.path, self.name = path, name

    def __getitem__(self, key):
        with _h5py().File(self.path, "r") as fh:
            return fh[self.name][key]


class _H5Frames(_LazySource):
    """Several HDF5 datasets of frames read as one stack along the first axis (a Dectris Eiger master
    file's ``entry/data/data_000001``, ``data_000002``... external links); reopens the file per read."""

    def __init__(self, path, names, lengths, frame, dtype):
        super().__init__((sum(lengths),) + tuple(frame), dtype)
        self.path, self.names = path, list(names)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])

    def __getitem__(self, key):
        frames, rest, squeeze = _first_axis(key, self.shape)
        out = np.empty((len(frames),) + self.shape[1:], dtype=self.dtype)
        frames = np.asarray(frames, dtype=np.int64)
        part = np.searchsorted(self.starts, frames, side="right") - 1
        with _h5py().File(self.path, "r") as fh:
            for p in np.unique(part):
                at = np.flatnonzero(part == p)
                local = frames[at] - self.starts[p]
                lo, hi = int(local.min()), int(local.max()) + 1
                out[at] = fh[self.names[p]][lo:hi][local - lo]
        out = out[(slice(None),) + rest]
        return out[0] if squeeze else out


def _open_h5(path):

    with _open_h5_file(path) as fh:
        return _h5_lazy(path, fh, _find_h5_dataset(fh, path))


def _nexus_signal(fh):
    """The dataset a NeXus file names as its default plot (``@default`` of the root and the entry, the
    NXdata group's ``@signal``), or None."""
    import h5py

    def text(value):
        return value.decode() if isinstance(value, bytes) else None if value is None else str(value)

    entry = text(fh.attrs.get("default"))
    group = fh.get(entry) if entry else None
    if isinstance(group, h5py.Group):
        data = text(group.attrs.get("default"))
        nxdata = group.get(data) if data else None
        if isinstance(nxdata, h5py.Group):
            signal = text(nxdata.attrs.get("signal"))
            if signal and isinstance(nxdata.get(signal), h5py.Dataset):
                return nxdata[signal].name.lstrip("/")
    return None


#: The data of a NeXus file that names no default plot (its usual NXdata place).
NEXUS_DATA = "entry/data/data"
#: Where Dectris Eiger master files keep their frames: ``data_000001``, ``data_000002``... in this group.
EIGER_DATA_GROUP = "entry/data"
#: Detector pixel masks of NeXus/Dectris files (nonzero = bad pixel or gap), looked for by :func:`file_mask`.
NEXUS_MASK_PATHS = ("entry/instrument/detector/detectorSpecific/pixel_mask", "entry/instrument/detector/pixel_mask")


def _eiger_parts(fh):
    """The sorted names of an Eiger master file's frame datasets (external links, which a search of the
    file does not follow), or None when it has none."""
    import h5py

    group = fh.get(EIGER_DATA_GROUP)
    if not isinstance(group, h5py.Group):
        return None
    names = sorted(k for k in group if re.fullmatch(r"data_\d+", k))
    parts = [posixpath.join(EIGER_DATA_GROUP, k) for k in names]
    try:
        dsets = [fh[p] for p in parts]  # an external link to a missing data file raises here
    except KeyError as exc:
        raise ValueError(f"the frames of {_name(fh.filename)!r} are in files beside it that cannot be opened "
                         f"({_first_line(exc)}); keep the master file with its data files") from None
    if not parts or any(not isinstance(d, h5py.Dataset) or d.ndim != 3 for d in dsets):
        return None
    if len({d.shape[1:] for d in dsets}) > 1:
        raise ValueError(f"the frame data sets of {_name(fh.filename)!r} differ in frame size")
    if len({d.dtype for d in dsets}) > 1:
        raise ValueError(f"the frame data sets of {_name(fh.filename)!r} differ in type "
                         f"({', '.join(sorted({str(d.dtype) for d in dsets}))}); a stack's frames must share one type")
    return parts


def _find_h5_dataset(fh, path):
    """Name of the dataset holding the intensities in an open HDF5/CXI file (rules: read_stack), or the
    names of an Eiger master file's frame datasets (a list)."""
    import h5py

    if _ext(path) == ".cxi":
        for name in CXI_PATHS:
            if isinstance(fh.get(name), h5py.Dataset):
                return name
        raise ValueError(f"{_name(path)!r} has no {CXI_PATHS[0]} or {CXI_PATHS[1]} data set")
    for name in ("data", "intensity"):
        if isinstance(fh.get(name), h5py.Dataset):
            return name
        link = fh.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):  # the data live in another file, which cannot be opened
            raise ValueError(f"{_name(path)!r}: its data set {name!r} is in {link.filename!r}, which cannot be "
                             "opened; keep the file with the files it links to")
    signal = _nexus_signal(fh)
    if signal is not None:
        return signal
    if isinstance(fh.get(NEXUS_DATA), h5py.Dataset):
        return NEXUS_DATA
    parts = _eiger_parts(fh)
    if parts is not None:
        return parts
    found = []

    def visit(name, obj):
        if (isinstance(obj, h5py.Dataset) and obj.shape is not None and obj.ndim in (2, 3) and obj.dtype.kind in "uifc"
                and not posixpath.basename(name).lower().endswith(_MASK_KEY)):  # a (pixel_)mask is not the data
            found.append(name)

    fh.visititems(visit)
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"{_name(path)!r} holds no 2-D or 3-D data set")
    raise ValueError(f"{_name(path)!r} holds several image data sets ({', '.join(found[:4])}) and none named 'data'")


# =========================================================================== masks
def read_mask(path: str | os.PathLike, shape: Sequence[int]) -> np.ndarray:
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
              ".h5": _mask_h5, ".hdf5": _mask_h5, ".nxs": _mask_h5, ".cxi": _mask_h5,
              ".cbf": _read_frame_file, ".edf": _read_frame_file}[ext]
    name = repr(_name(path))
    try:
        raw = loader(path)
    except ValueError as exc:  # say that it is the mask that is bad
        text = str(exc)
        raise ValueError(f"the mask {text}" if text.startswith(name) else f"the mask {name}: {text}") from None
    return _check_mask(raw, shape, f"the mask {name}")


def file_mask(path: str | os.PathLike, shape: Sequence[int] | None = None) -> np.ndarray | None:
    """The mask a stack file carries beside its data, or None.

    Looked for: the key ``mask`` of an ``.npz`` file (``cdinn simulate --beamstop`` writes it);
    in an ``.h5``/``.hdf5``/``.nxs`` file the NeXus/Dectris pixel mask (:data:`NEXUS_MASK_PATHS`,
    nonzero = gap or bad pixel), else a dataset ``mask`` in the group of the data; in a ``.cxi`` file
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
    if series_files(path) is not None:  # one frame per file: no mask beside them
        return None
    path, ext = _input_path(path, STACK_EXTENSIONS)
    shape = stack_shape(path) if shape is None else tuple(shape)
    raw = None
    if ext == ".npz":
        raw = _npz_mask_beside_data(path)
    elif ext in (".h5", ".hdf5", ".nxs", ".cxi"):
        raw = _h5_mask_beside_data(path, ext)
    return None if raw is None else _check_mask(raw, shape, f"the mask in {_name(path)!r}")


#: Where NeXus/Dectris files record the direct beam on the detector (NXdetector), and the pixel size.
NEXUS_DETECTOR = "entry/instrument/detector"
_LENGTH_UNITS = {"m": 1.0, "mm": 1e-3, "um": 1e-6, "µm": 1e-6, "micron": 1e-6, "microns": 1e-6}


def file_beam_centre(path: str | os.PathLike) -> tuple[float, float] | None:
    """The direct beam's position ``(row, column)`` in pixels that a NeXus/Dectris file records, or None.

    Read from ``entry/instrument/detector/beam_center_y`` and ``beam_center_x`` (Dectris and NeXus
    NXdetector: ``x`` along a row, the fast axis).  Values in pixels (``units`` "pixel", or none) are
    taken as they are; lengths (``m``, ``mm``, ``um``) are divided by ``y_pixel_size``/``x_pixel_size``.
    A file without them, or with values that are not finite numbers, gives None.
    """
    if series_files(path) is not None:
        return None
    path, ext = _input_path(path, STACK_EXTENSIONS)
    if ext not in (".h5", ".hdf5", ".nxs"):
        return None
    import h5py

    def pixels(fh, axis):
        field = fh.get(f"{NEXUS_DETECTOR}/beam_center_{axis}")
        if not isinstance(field, h5py.Dataset) or field.shape not in ((), (1,)):
            return None
        value = float(np.asarray(field[()]).reshape(-1)[0])
        units = field.attrs.get("units", b"pixel")
        units = (units.decode() if isinstance(units, bytes) else str(units)).strip().lower()
        if units in _LENGTH_UNITS:
            size = fh.get(f"{NEXUS_DETECTOR}/{axis}_pixel_size")
            if not isinstance(size, h5py.Dataset):
                return None
            size_units = size.attrs.get("units", b"m")
            size_units = (size_units.decode() if isinstance(size_units, bytes) else str(size_units)).strip().lower()
            pitch = float(np.asarray(size[()]).reshape(-1)[0]) * _LENGTH_UNITS.get(size_units, 1.0)
            value = value * _LENGTH_UNITS[units] / pitch if pitch > 0 else float("nan")
        return value if np.isfinite(value) else None

    try:
        with _open_h5_file(path) as fh:
            y, x = pixels(fh, "y"), pixels(fh, "x")
    except (ValueError, TypeError, OSError):
        return None
    return None if y is None or x is None else (y, x)


def _check_mask(mask, shape, what):
    """``mask`` as bool after checking its dtype, its shape against the stack's ``shape``
    (:func:`napari_cdinn.checks.check_mask_layout`) and its size against the memory budget (a lazy
    source is read only then)."""
    if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
        mask = np.asarray(mask)
    got = check_mask_layout(mask, shape, what)
    budget = memory_budget()
    if int(np.prod(got, dtype=np.int64)) > budget:
        raise ValueError(f"{what} holds {format_bytes(int(np.prod(got, dtype=np.int64)))} of flags, more than "
                         f"the memory budget of {format_bytes(budget)}; give one (H, W) mask or set CDINN_MEMORY")
    mask = np.asarray(mask[...] if not isinstance(mask, np.ndarray) else mask)
    return mask != 0 if mask.dtype.kind != "b" else np.array(mask, dtype=bool)


def _mask_npy(path):
    return _open_npy(path)


def _mask_npz(path):
    keys = [k for k in _npz_keys(path) if k != _ATTRS_KEY]
    if _MASK_KEY in keys:
        return _npz_member(path, _MASK_KEY)
    if len(keys) == 1:
        return _npz_member(path, keys[0])
    if not keys:
        raise ValueError(f"{_name(path)!r} holds no arrays")
    raise ValueError(f"{_name(path)!r} holds several arrays ({', '.join(keys)}) and none named 'mask'")


def _mask_tiff(path):
    return _read_tiff(path)


def _mask_h5(path):
    import h5py

    with _open_h5_file(path) as fh:
        names = list(CXI_MASK_PATHS) if _ext(path) == ".cxi" else list(NEXUS_MASK_PATHS)
        for name in names + [_MASK_KEY]:
            if isinstance(fh.get(name), h5py.Dataset):
                return _h5_lazy(path, fh, name)
        found = []

        def visit(name, obj):
            if (isinstance(obj, h5py.Dataset) and obj.shape is not None and obj.ndim in (2, 3)
                    and obj.dtype.kind in "buif"):
                found.append(name)

        fh.visititems(visit)
        if len(found) == 1:
            return _h5_lazy(path, fh, found[0])
    if not found:
        raise ValueError(f"{_name(path)!r} holds no 2-D or 3-D data set")
    raise ValueError(f"{_name(path)!r} holds several data sets ({', '.join(found[:4])}) and none named 'mask'")


def _npz_mask_beside_data(path):
    keys = [k for k in _npz_keys(path) if k != _ATTRS_KEY]
    return _npz_member(path, _MASK_KEY) if _MASK_KEY in keys and len(keys) > 1 else None


def _h5_mask_beside_data(path, ext):
    import h5py

    with _open_h5_file(path) as fh:
        data = _find_h5_dataset(fh, path)
        names = list(CXI_MASK_PATHS) if ext == ".cxi" else list(NEXUS_MASK_PATHS)
        names.append(posixpath.join(posixpath.dirname(data[0] if isinstance(data, list) else data), _MASK_KEY))
        for name in names:
            if name != data and isinstance(fh.get(name), h5py.Dataset):
                return _h5_lazy(path, fh, name)
    return None


def _h5_lazy(path, fh, name):
    """A data set of an open file as a source read when needed (:class:`_H5Dataset`; a list of names:
    :class:`_H5Frames`); an empty (null) one raises."""
    if isinstance(name, list):
        dsets = [fh[n] for n in name]
        return _H5Frames(path, name, [d.shape[0] for d in dsets], dsets[0].shape[1:], dsets[0].dtype)
    dset = fh[name]
    if dset.shape is None:
        raise ValueError(f"the data set {name!r} in {_name(path)!r} is empty (it holds no array)")
    return _H5Dataset(path, name, dset.shape, dset.dtype)


# =========================================================================== results
def write_result(
    path: str | os.PathLike, arrays: Mapping[str, ArrayLike], attrs: Mapping[str, Any] | None = None
) -> None:
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
      ``entry_1/data_1/data`` links to ``intensity`` when it is written (and ``entry_1/data_1/mask``
      to ``mask``), so that :func:`read_stack` and :func:`file_mask` read such a file back; ``entry_1/image_1/data`` holds the complex
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


def h5_chunk_frames(n: int, frame_bytes: int, run_chunk: int | None = None) -> int | None:
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


def h5_dataset_options(shape: Sequence[int], dtype: Any, run_chunk: int | None = None) -> dict[str, Any]:
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

    def write_frames(self, start: int, stop: int, arrays: Mapping[str, ArrayLike]) -> None:
        """Write frames ``start:stop`` of every per-frame array of ``arrays`` (leading length ``stop - start``)."""
        for key, value in arrays.items():
            value = np.asarray(value)
            if key not in self.fh:
                shape = (self.frames,) + value.shape[1:]
                self.fh.create_dataset(key, shape=shape, dtype=value.dtype,
                                       **h5_dataset_options(shape, value.dtype, self.run_chunk))
            self.fh[key][start:stop] = value

    def write_arrays(self, arrays: Mapping[str, ArrayLike]) -> None:
        """Write whole arrays of any shape (the in-memory, one-chunk case)."""
        for key, arr in arrays.items():
            arr = np.asarray(arr)
            self.fh.create_dataset(key, data=arr, **h5_dataset_options(arr.shape, arr.dtype))

    def set_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Store metadata as root attributes: str, bool, numbers and numeric lists as they are,
        anything else as its JSON text."""
        for key, value in (attrs or {}).items():
            self.fh.attrs[key] = _h5_attr(value)

    def finish(self, cxi: bool = False) -> None:
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
        data_1 = entry.create_group("data_1")
        data_1["data"] = fh["intensity"]
        if "mask" in names:  # the unmeasured pixels beside the data, where file_mask looks
            data_1["mask"] = fh["mask"]
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


def read_result(
    path: str | os.PathLike, with_attrs: bool = False, keys: Iterable[str] | None = None
) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], dict[str, Any]]:
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
        with zipfile.ZipFile(path) as zf:
            sizes = {(i.filename[:-4] if i.filename.endswith(".npy") else i.filename): i.file_size for i in zf.infolist()}
        _check_result_size(path, sum(v for k, v in sizes.items() if keys is None or k in keys))
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files if keys is None or k in keys or k == _ATTRS_KEY}
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, RuntimeError, OSError) as exc:
        if "memory budget" in str(exc):
            raise
        raise ValueError(f"{_name(path)!r} is truncated or not a valid .npz file ({_first_line(exc)})") from None
    text = arrays.pop(_ATTRS_KEY, None)
    return arrays, (json.loads(str(text)) if text is not None else {})


def _check_result_size(path, nbytes):
    """Results are read whole: refuse more than the memory budget (:func:`memory_budget`) in one sentence."""
    budget = memory_budget()
    if nbytes > budget:
        raise ValueError(f"{_name(path)!r} holds {format_bytes(nbytes)} of results, more than the memory budget of "
                         f"{format_bytes(budget)} allows reading at once (CDINN_MEMORY sets it)")


def _read_h5_result(path, keys):
    import h5py

    with _open_h5_file(path) as fh:
        group = fh
        names = [k for k, v in fh.items() if isinstance(v, h5py.Dataset) and k != "cxi_version"]
        if not names and isinstance(fh.get("entry_1/result_1"), h5py.Group):
            group = fh["entry_1/result_1"]
            names = [k for k, v in group.items() if isinstance(v, h5py.Dataset)]
        names = [k for k in names if group[k].shape is not None and (keys is None or k in keys)]
        _check_result_size(path, sum(group[k].size * group[k].dtype.itemsize for k in names))
        arrays = {k: group[k][()] for k in names}
        attrs = {k: (v.item() if isinstance(v, np.generic) else v.tolist() if isinstance(v, np.ndarray) else v)
                 for k, v in fh.attrs.items()}
    if not arrays and keys is None:
        raise ValueError(f"{_name(path)!r} holds no result data sets")
    return arrays, attrs
