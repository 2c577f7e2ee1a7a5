"""Chunked processing of large stacks: bounded memory, incremental HDF5 output, resume, clusters.

A *chunk function* ``fn(intensity, first_frame) -> dict`` maps a NumPy block of frames
``(n, H, W)`` float32, whose first frame is frame ``first_frame`` of the stack, to per-frame
result arrays with leading length ``n`` (for example ``amplitude``, ``phase``, ``chi2``).
``first_frame`` lets a randomised method draw per-frame random numbers from the frame's index,
so that results do not depend on the chunking (streamed, in-memory and cluster runs agree).
Given a mask of unmeasured pixels, :func:`process_stack` also passes the chunk's part of it as
the keyword ``mask`` (a 2-D mask whole, a 3-D one sliced like the frames); without one the
keyword is not passed.  :func:`process_stack` runs the function over a stack chunk by chunk:

* the input is read one chunk at a time (:func:`napari_cdinn.io.read_frames`), so memory
  stays bounded by a few chunks whatever the stack's length; locally the next chunk is read in a
  thread while the chunk function runs on the current one (reading overlaps computing); the chunk size is at most what the
  memory budget allows for the frame size (:func:`napari_cdinn.io.frames_in_budget`);
* ``.h5``/``.hdf5``/``.cxi`` outputs are written as the job streams, into datasets named by the
  result keys, in a *partial* file beside the target (``.NAME.partial``) that is renamed to the
  target only when every chunk is done.  They are written by the writer of in-memory results,
  :class:`napari_cdinn.io.H5ResultWriter`: gzip-compressed in whole-frame storage chunks that
  divide the run's chunk size (:func:`napari_cdinn.io.h5_chunk_frames`), so a run chunk never
  rewrites part of a compressed chunk another run chunk wrote (resuming after a kill cannot mix
  frames), and a chunk size that is a multiple of 4096 frames (the CLI's default) gives the very
  file :func:`napari_cdinn.io.write_result` writes of the same results (but for the run's
  fingerprint attribute, below); a single frame (2-D input)
  is written as an in-memory result, unbatched like the ``.npz`` output;
* ``resume=True`` continues from that partial file, skipping the chunks it records as done,
  provided it was made from the same input (path, size, mtime in ns, a hash of its first and
  last chunks), shape, chunk size, options and mask (its fingerprint); every kept chunk is read
  back first, and one that fails is done again (:class:`PartialError` when the file is unusable).
  The finished file keeps the fingerprint (attribute ``cdinn_fingerprint``): resuming a run that
  already finished does nothing (the summary says ``complete``), while a finished output of other
  input or options is computed again;
* one run writes an output at a time: an exclusive lock (``.NAME.lock``, holding the pid) makes
  a second run fail with :class:`OutputLocked`; an output that is the input is refused;
* before each chunk is written the free space (and ``ulimit -f``) is checked, so a full disk
  stops the run cleanly with the finished chunks kept (an HDF5 file whose write failed can be
  neither resumed nor closed: it is removed, and kept referenced in :data:`FAILED_FILES`);
* ``.npz`` outputs are collected in memory (within the budget) and written at the end (no resume);
* :func:`iter_chunks` runs the same loop over an array or a file without writing, and yields
  each chunk's results as it finishes (the docks show them as they come);
* with ``scheduler`` (a dask.distributed address or ``Client``), chunks run on the cluster's
  workers, which read their frames from the file themselves (the input path must be visible to
  the workers, e.g. on a shared file system), each chunk retried on another worker if one dies;
  results come back to this process, which alone writes the output.  A scheduler that cannot be
  reached, has no workers, or stops answering for ``scheduler_timeout`` seconds ends the run
  with one ``OSError``; an interrupt cancels the futures.

Chunk functions must be picklable for the cluster path (a module-level function or a
``functools.partial`` of one); expensive set-up such as loading a network should be cached per
process inside the function, so that each worker does it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from . import io
from .checks import check_mask_layout, whole_number
from .jobs import Cancelled, check_stop, stop_requested

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from .jobs import StopFlag

__all__ = ["STREAM_EXTENSIONS", "OutputLocked", "PartialError", "StreamCancelled", "chunk_bounds", "iter_chunks",
           "process_stack"]

#: Output extensions written incrementally (and resumable).
STREAM_EXTENSIONS = (".h5", ".hdf5", ".cxi")
_DONE = "_chunks_done"
_FINGERPRINT = "cdinn_fingerprint"
_RESUME_NOTE = "stopped; the finished chunks are kept for --resume"

#: Raised when ``should_stop`` asks a run to stop; the partial output is kept for resume.
#: The one :class:`napari_cdinn.jobs.Cancelled` (``done``: frames finished in this run).
StreamCancelled = Cancelled


def chunk_bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n)`` in blocks of ``chunk_size`` frames."""
    chunk_size = max(1, int(chunk_size))
    return [(a, min(a + chunk_size, n)) for a in range(0, n, chunk_size)]


def _partial_path(out):
    folder, name = os.path.split(os.path.abspath(out))
    return os.path.join(folder, f".{name}.partial")


def _finished_with(path, fingerprint):
    """True when ``path`` is a finished streamed output made with ``fingerprint`` (same input and options)."""
    import h5py

    if not os.path.isfile(path):
        return False
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get(_FINGERPRINT) == fingerprint and _DONE not in f
    except Exception:  # noqa: BLE001 - not HDF5, damaged: not a finished output of this run
        return False


def _fingerprint(source, shape, chunk_size, options, mask=None):
    """A stable digest of what determines the output: the input's identity and contents (path, size,
    mtime in ns, a hash of its first and last chunks), shape, chunking, every option, the mask."""
    bounds = chunk_bounds(1 if len(shape) == 2 else shape[0], chunk_size)
    ends = sorted({bounds[0], bounds[-1]})
    src = {"frames": [hashlib.sha256(np.ascontiguousarray(_read_chunk(source, a, b)).tobytes()).hexdigest()
                      for a, b in ends]}
    if isinstance(source, (str, os.PathLike)):
        src.update(io.input_identity(source))
    what = {"source": src, "shape": list(shape), "chunk": int(chunk_size), "options": options}
    if mask is not None:
        what["mask"] = [list(mask.shape), hashlib.sha256(np.packbits(mask).tobytes()).hexdigest()]
    blob = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class PartialError(ValueError):
    """A partial output that ``resume`` cannot continue (``path``: the partial file); start over without resume."""

    def __init__(self, message, path):
        super().__init__(message)
        self.path = path


class OutputLocked(OSError):
    """Another run writes the same output (``pid``: its process id, when known)."""


def _lock(out):
    """An exclusive lock on the output ``out`` for this run (a file ``.NAME.lock`` holding our pid), or
    :class:`OutputLocked` naming the process that holds it.  Returns the lock to :func:`_unlock`."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks
        return None
    folder, name = os.path.split(os.path.abspath(out))
    path = os.path.join(folder, f".{name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputLocked(f"another run (pid {pid}) is writing {os.fspath(out)!r}; wait for it to end "
                               "or stop it, then try again") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file that its last holder removed while we waited for it
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd, path


def _unlock(lock):
    if lock is not None:
        with contextlib.suppress(OSError):
            os.remove(lock[1])
        os.close(lock[0])


def _read_chunk(source, start, stop):
    """Frames ``start:stop`` of a path (read lazily) or of an array, as float32 NumPy (:func:`io.float32_frames`)."""
    if isinstance(source, (str, os.PathLike)):
        return io.read_frames(source, start, stop)
    stack = source[None] if source.ndim == 2 else source
    return io.float32_frames(stack[start:stop])  # an integer array's marker values: unmeasured, as from a file


def _chunk_mask(mask, start, stop):
    """The part of a mask for frames ``start:stop`` as NumPy bool: a 2-D mask whole, a 3-D one sliced."""
    if mask is None:
        return None
    return np.asarray(mask if mask.ndim == 2 else mask[start:stop], dtype=bool)


def _run_chunk(fn, source, start, stop, mask=None, frames=None):
    """Worker task: read one chunk and run the chunk function on it (with its mask, if any).

    ``frames``: the chunk already read (:func:`_execute_local` reads ahead); else it is read here.
    """
    _dask_worker_threads()
    extra = {} if mask is None else {"mask": mask}
    frames = _read_chunk(source, start, stop) if frames is None else frames
    return start, stop, fn(frames, first_frame=start, **extra)


def _dask_worker_threads():
    """On a dask worker process: torch's threads = the free cores shared by the worker's ``nthreads`` task
    slots (``max(1, free_cores() // nthreads)``), so that its tasks never run more threads than free cores.

    Nothing elsewhere: the local process (dask not even imported here) keeps its command's threads,
    and a worker without a nanny may share its process with the client (``LocalCluster(processes=False)``).
    """
    import sys

    dist = sys.modules.get("distributed")
    if dist is None:
        return None
    try:
        worker = dist.get_worker()
    except ValueError:  # not in a task
        return None
    if not getattr(worker, "nanny", None):
        return None
    from .device import apply_threads, free_cores

    nthreads = int(getattr(worker, "state", worker).nthreads or 1)
    return apply_threads(max(1, free_cores() // nthreads))


class _H5Sink:
    """Streams per-frame results into a partial HDF5 file through :class:`napari_cdinn.io.H5ResultWriter`.

    A resumed partial is verified before it is trusted: every chunk it records as done is read back
    (decompressed); one that fails is done again, and a file that cannot be opened or lacks its
    records raises :class:`PartialError`.
    """

    def __init__(self, path, n, fingerprint, resume, attrs, chunk_size):
        import h5py

        self.path, self.n, self.f = path, n, None
        self.written = 0  # chunks written by this run
        if resume and os.path.exists(path):
            try:
                self.f = h5py.File(path, "a")
            except Exception as exc:  # noqa: BLE001 - HDF5 reports a damaged file in many ways
                raise PartialError(f"the partial output {path} cannot be opened ({io._first_line(exc)})", path) from None
            found = self.f.attrs.get(_FINGERPRINT)
            if found != fingerprint:
                self.close()
                why = ("it was left incomplete" if found is None else
                       "it was made from other input or options (data, weights, mask or settings)")
                raise PartialError(f"the partial output {path} cannot be resumed: {why}", path)
        if self.f is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            self.f = h5py.File(path, "w")
            self.f.attrs[_FINGERPRINT] = fingerprint
            io.H5ResultWriter(self.f).set_attrs(attrs)
        self.writer = io.H5ResultWriter(self.f, frames=n, run_chunk=chunk_size)

    def done_chunks(self, bounds):
        if _DONE not in self.f:
            self.f.create_dataset(_DONE, data=np.zeros(len(bounds), dtype=bool))
            self.f.flush()
        try:
            done = np.asarray(self.f[_DONE][...], dtype=bool)
            keys = [k for k in self.f if k != _DONE]
            if done.shape != (len(bounds),) or any(self.f[k].shape[:1] != (self.n,) for k in keys):
                raise ValueError("its records do not match the input")
        except Exception as exc:  # noqa: BLE001
            raise PartialError(f"the partial output {self.path} is damaged ({io._first_line(exc)})", self.path) from None
        for i in np.flatnonzero(done):  # what is kept is read back: a chunk that fails is done again
            a, b = bounds[i]
            try:
                for k in keys:
                    self.f[k][a:b]
            except Exception:  # noqa: BLE001 - HDF5 filter and read errors
                done[i] = False
        return done

    def write(self, index, start, stop, results):
        self.writer.write_frames(start, stop, results)
        self.f.flush()  # the frames are on disk before the chunk is marked done
        self.f[_DONE][index] = True
        self.f.flush()
        self.written += 1

    def finish(self, final_path, partial_path):
        del self.f[_DONE]  # the fingerprint stays: resuming a finished output finds nothing to do
        self.writer.finish(cxi=final_path.lower().endswith(".cxi"))
        self.f.close()
        os.replace(partial_path, final_path)

    def close(self):
        with contextlib.suppress(Exception):
            self.f.close()


class _MemorySink:
    """Collects per-frame results in memory; written with :func:`napari_cdinn.io.write_result`."""

    def __init__(self, n, budget=None):
        self.n, self.budget = n, budget
        self.arrays = {}

    def done_chunks(self, bounds):
        return np.zeros(len(bounds), dtype=bool)

    def write(self, index, start, stop, results):
        if not self.arrays and self.budget is not None:  # the whole result is held until the end
            total = sum(np.asarray(v).nbytes for v in results.values()) * self.n / max(stop - start, 1)
            if total > self.budget:
                raise ValueError(f"the results would hold {io.format_bytes(total)} in memory before an .npz file is "
                                 f"written, more than the memory budget of {io.format_bytes(self.budget)}; write "
                                 ".h5 or .cxi (streamed) instead, or set CDINN_MEMORY")
        for key, value in results.items():
            value = np.asarray(value)
            if key not in self.arrays:
                self.arrays[key] = np.empty((self.n,) + value.shape[1:], dtype=value.dtype)
            self.arrays[key][start:stop] = value

    def close(self):
        pass


def _source_shape(source):
    """``(source, shape)``: a stack file or array as given (a list of frames as an array) and its ``(N, H, W)``
    or ``(H, W)`` shape; ValueError (one sentence) for another shape."""
    if isinstance(source, (str, os.PathLike)):
        return source, io.stack_shape(source)
    if not hasattr(source, "shape"):
        source = np.asarray(source, dtype=np.float32)  # a list of frames
    shape = tuple(source.shape)
    if len(shape) not in (2, 3) or 0 in shape:
        raise ValueError(f"expected a stack of patterns shaped (H, W) or (N, H, W), got {shape}")
    return source, shape


def _chunk_frames(chunk_size):
    """``chunk_size`` as a positive whole number of frames, else ValueError (one sentence)."""
    return whole_number(chunk_size, "chunk_size", 1, what="a positive whole number of frames")


def process_stack(
    source: str | os.PathLike | ArrayLike,
    out: str | os.PathLike | None,
    fn: Callable[..., dict],
    *,
    chunk_size: int = 1024,
    resume: bool = False,
    scheduler: Any = None,
    options: Mapping[str, Any] | None = None,
    attrs: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: StopFlag = None,
    mask: ArrayLike | None = None,
    memory: int | str | None = None,
    scheduler_timeout: float = 60.0,
) -> dict:
    """Run a chunk function over a whole stack and write the results to ``out``.

    Parameters
    ----------
    source : str, os.PathLike or array-like
        A readable stack file (read lazily, chunk by chunk) or an ``(N, H, W)``/``(H, W)`` array.
    out : str or None
        Output file: ``.h5``/``.hdf5``/``.cxi`` (streamed, resumable) or ``.npz``.  None returns
        the results without writing.
    fn : callable
        ``fn(intensity (n, H, W) float32, first_frame=int) -> dict`` of per-frame arrays of
        leading length ``n``.
    chunk_size : int
        Frames per chunk (bounds memory; the unit of resume and of cluster tasks); at most what the
        memory budget allows (:func:`napari_cdinn.io.frames_in_budget`).
    resume : bool
        Continue an interrupted streamed run from its partial file.  The partial is verified first
        (chunks that do not read back are done again); one that cannot be used raises
        :class:`PartialError`.
    scheduler : str or dask.distributed.Client, optional
        Run the chunks on this dask.distributed cluster.
    options : dict, optional
        What else determines the output (model and its weights' hash, algorithm, ...): part of the
        resume fingerprint, with the input's identity and a hash of its first and last chunks.
    attrs : dict, optional
        Metadata stored as attributes of streamed files.
    progress : callable, optional
        ``progress(frames_done, frames_total)`` after every chunk.
    should_stop : callable or threading.Event, optional
        Checked before every chunk; when it asks for a stop the run stops with
        :class:`StreamCancelled` (:class:`napari_cdinn.jobs.Cancelled`), keeping the partial file
        for ``resume``.
    mask : array_like of bool, optional
        True on unmeasured pixels, ``(H, W)`` (every frame) or ``(N, H, W)``.  Each chunk
        function call then gets ``mask=`` its part (see the module notes); the mask is part of
        the resume fingerprint.
    memory : int or str, optional
        Memory budget in bytes or as ``"2G"`` (default :func:`napari_cdinn.io.memory_budget`):
        bounds the chunk size, and the results an ``.npz`` output holds in memory.
    scheduler_timeout : float
        Seconds a cluster may go without workers, or without answering, before the run fails.

    An output is written by one run at a time (an exclusive lock, :class:`OutputLocked` for a second
    run), never replaces its input (``ValueError``), and a full disk raises one ``OSError`` naming
    the file, keeping a partial output only when it holds finished chunks.

    Returns
    -------
    dict
        The results in memory for ``.npz``/None outputs (2-D input gives unbatched results);
        for ``.h5``/``.hdf5``/``.cxi`` outputs a summary ``{"frames": N, "chunks": C, "skipped": K, "seconds": t}``
        (with ``"complete": True`` when ``resume`` found the output already finished by the same run).
    """
    source, shape = _source_shape(source)
    single = len(shape) == 2
    n = 1 if single else shape[0]
    ext = os.path.splitext(str(out))[1].lower() if out is not None else None
    streamed = ext in STREAM_EXTENSIONS and not single  # one frame: an in-memory result, unbatched
    if out is not None and ext not in io.RESULT_EXTENSIONS:
        raise ValueError(f"the output must end in one of {', '.join(io.RESULT_EXTENSIONS)}, got {os.path.basename(out)!r}")
    if resume and ext not in STREAM_EXTENSIONS:
        raise ValueError("--resume needs an .h5 or .cxi output; .npz results are written at the end")
    if out is not None:
        io.check_writable(out)
        if isinstance(source, (str, os.PathLike)):
            io.check_not_input(out, source)
    budget = io.memory_budget(memory)
    chunk_size = min(_chunk_frames(chunk_size), io.frames_in_budget(shape[-2:], budget, what="the input"))
    bounds = chunk_bounds(n, chunk_size)
    if mask is not None:
        mask = io._check_mask(mask, shape, "the mask")
    partial = _partial_path(out) if streamed else None
    fingerprint = _fingerprint(source, shape, chunk_size, options or {}, mask) if streamed else None
    if streamed and resume and not os.path.exists(partial) and _finished_with(out, fingerprint):
        if progress:
            progress(n, n)
        return {"frames": n, "chunks": len(bounds), "skipped": len(bounds), "seconds": 0.0, "chunk_size": chunk_size,
                "complete": True}
    lock = _lock(out) if out is not None else None
    sink = None
    t0 = time.perf_counter()
    try:
        sink = (_H5Sink(partial, n, fingerprint, resume, attrs, chunk_size) if streamed
                else _MemorySink(n, budget if out is not None else None))
        done = sink.done_chunks(bounds)
        sink.done = done.copy()
        todo = [i for i in range(len(bounds)) if not done[i]]
        frames = sum(b - a for i, (a, b) in enumerate(bounds) if done[i])
        if progress:
            progress(frames, n)
        for index, (a, b, res) in _execute(fn, source, bounds, todo, scheduler, should_stop, mask, _RESUME_NOTE,
                                           scheduler_timeout):
            if streamed:
                _check_room(sink, out, bounds, sum(np.asarray(v).nbytes for v in res.values()), b - a)
            failed = None
            with _no_unraisable():  # the failed write's objects are freed in here, quietly
                try:
                    sink.write(index, a, b, res)
                except Exception as exc:
                    if not (streamed and io.disk_full(exc)):
                        raise
                    failed = _write_failed(sink, exc, out, bounds, res, b - a)
            if failed is not None:
                raise failed
            sink.done[index] = True
            frames += b - a
            if progress:
                progress(frames, n)
        seconds = time.perf_counter() - t0
        if streamed:
            if ext == ".cxi" and "amplitude" in sink.f:  # the CXI tree adds the complex image
                _check_room(sink, out, bounds, 2 * sink.f["amplitude"].size * 4, 0)
            failed = None
            with _no_unraisable():
                try:
                    sink.finish(out, partial)
                except Exception as exc:
                    if not io.disk_full(exc):
                        raise
                    failed = _write_failed(sink, exc, out, bounds, {}, 0)
            if failed is not None:
                raise failed
            return {"frames": n, "chunks": len(bounds), "skipped": len(bounds) - len(todo), "seconds": seconds,
                    "chunk_size": chunk_size}
        results = sink.arrays
        if single:
            results = {k: v[0] for k, v in results.items()}
        if out is not None:
            io.write_result(out, results, attrs=attrs)
    except BaseException as exc:
        if sink is not None:
            sink.close()
        # a partial without finished chunks is worth nothing: removed after any error (a stop keeps it)
        empty = sink is None or not np.any(getattr(sink, "done", False))
        if streamed and empty and not isinstance(exc, Cancelled | KeyboardInterrupt | PartialError | OutputLocked):
            with contextlib.suppress(OSError):
                os.remove(partial)
        raise
    finally:
        _unlock(lock)
    if ext in STREAM_EXTENSIONS:
        return {"frames": n, "chunks": len(bounds), "skipped": 0, "seconds": time.perf_counter() - t0,
                "chunk_size": chunk_size}
    return results


#: h5py objects of files whose write failed: never released in this process (HDF5 crashes when it closes
#: them); the command line ends at once after such an error (:func:`napari_cdinn.cli.main`).
FAILED_FILES: list = []
#: Bytes a chunk may add to a partial beyond its results' size (HDF5 records, compression overhead).
_ROOM_MARGIN = 2**16


@contextlib.contextmanager
def _no_unraisable():
    """Silence the errors h5py prints while it frees the objects of a write that failed (the write's own
    error is reported once, by the caller)."""
    import io as text_io
    import sys

    hook, stderr = sys.unraisablehook, sys.stderr
    sys.unraisablehook, sys.stderr = (lambda _: None), text_io.StringIO()  # Cython prints some to stderr itself
    try:
        yield
    finally:
        sys.unraisablehook, sys.stderr = hook, stderr


def _room(path):
    """Bytes that may still be written to the file ``path``: the free space of its disk, within ``ulimit -f``."""
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except (OSError, AttributeError):  # pragma: no cover - no statvfs (Windows)
        return None
    room = st.f_bavail * st.f_frsize
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY:
            room = min(room, soft - (os.path.getsize(path) if os.path.exists(path) else 0))
    except (ImportError, OSError, ValueError):  # pragma: no cover
        pass
    return max(room, 0)


def _check_room(sink, out, bounds, nbytes, count):
    """Stop cleanly, before writing, when ``nbytes`` (a chunk's results, uncompressed) may not fit: an
    HDF5 file whose write failed cannot be resumed, nor even closed.  The partial is kept when it holds
    finished chunks (for --resume once there is room), else removed; one ``OSError`` says how much is needed."""
    need = nbytes * 1.01 + _ROOM_MARGIN
    room = _room(sink.path)
    if room is None or need <= room:
        return
    frames = sum(b - a for (a, b), d in zip(bounds, sink.done) if d)
    rest = io.format_bytes(nbytes / max(count, 1) * (sink.n - frames) if count else need)
    kept = int(np.count_nonzero(sink.done))
    sink.close()
    head = f"not enough space to write {os.fspath(out)!r}: {io.format_bytes(room)} left (free disk space, or ulimit -f)"
    if kept:
        raise OSError(f"{head}, about {rest} more needed; the {kept} finished chunks are kept in {sink.path!r} "
                      "for --resume once there is room")
    with contextlib.suppress(OSError):
        os.remove(sink.path)
    raise OSError(f"{head}, about {rest} needed")


def _write_failed(sink, exc, out, bounds, results, count):
    """The one-sentence ``OSError`` of a write that failed for want of space (a full disk that another
    writer filled, a quota): the partial cannot be used after that, and is removed."""
    reason = io.disk_full(exc)
    FAILED_FILES.append((sink.f, sink.writer))  # closing them would crash HDF5: never released
    sink.f = sink.writer = None
    frames = sum(b - a for (a, b), d in zip(bounds, sink.done) if d)
    per_frame = sum(np.asarray(v).nbytes for v in results.values()) / max(count, 1)
    need = f" (about {io.format_bytes(per_frame * (sink.n - frames))} more needed)" if per_frame else ""
    with contextlib.suppress(OSError):
        os.remove(sink.path)
    return OSError(f"could not write {os.fspath(out)!r}: {reason}{need}; the partial output was removed "
                   "(HDF5 cannot resume a file whose write failed)")


def iter_chunks(
    source: str | os.PathLike | ArrayLike,
    fn: Callable[..., dict],
    *,
    chunk_size: int = 1024,
    mask: ArrayLike | None = None,
    should_stop: StopFlag = None,
) -> Iterator[tuple[int, int, dict]]:
    """Run a chunk function over a stack chunk by chunk, yielding each chunk's results as it finishes.

    The loop of :func:`process_stack` without an output: the docks run their stacks through it.

    Parameters
    ----------
    source : str, os.PathLike or array-like
        A readable stack file, or an ``(N, H, W)``/``(H, W)`` array (NumPy or dask: each chunk is
        read as float32 NumPy when its turn comes).
    fn : callable
        ``fn(intensity (n, H, W) float32, first_frame=int[, mask=...]) -> dict`` of per-frame arrays.
    chunk_size : int
        Frames per chunk.
    mask : array_like of bool, optional
        True on unmeasured pixels, ``(H, W)`` or ``(N, H, W)`` (NumPy or dask, sliced per chunk);
        each call of ``fn`` then gets ``mask=`` its part.
    should_stop : callable or threading.Event, optional
        Checked before every chunk (:func:`napari_cdinn.jobs.stop_requested`).

    Yields
    ------
    (start, stop, results) : the chunk's frames ``start:stop`` of the stack and ``fn``'s results.

    Raises
    ------
    napari_cdinn.jobs.Cancelled
        When ``should_stop`` asks for a stop; ``done`` is the frames finished.
    ValueError
        A mask shaped neither like one frame nor like the stack, or holding floats.
    """
    source, shape = _source_shape(source)
    n = 1 if len(shape) == 2 else shape[0]
    if mask is not None:  # dtype and shape only: a lazy mask is read chunk by chunk
        check_mask_layout(mask, shape)
    bounds = chunk_bounds(n, min(_chunk_frames(chunk_size), io.frames_in_budget(shape[-2:], what="the input")))
    for _, chunk in _execute(fn, source, bounds, range(len(bounds)), None, should_stop, mask, "stopped"):
        yield chunk


def _execute(fn, source, bounds, todo, scheduler, should_stop, mask=None, note=_RESUME_NOTE, timeout=60.0):
    """Yield ``(chunk index, (start, stop, results))`` locally or on a dask.distributed cluster."""
    if scheduler is None:
        yield from _execute_local(fn, source, bounds, todo, should_stop, mask, note)
        return
    yield from _execute_distributed(fn, source, bounds, todo, scheduler, should_stop, mask, note, timeout)


def _execute_local(fn, source, bounds, todo, should_stop, mask=None, note=_RESUME_NOTE):
    """:func:`_execute` in this process, reading ahead: the next chunk is read in a thread while the
    chunk function runs on this one (and while the caller writes its results), so that reading
    overlaps computing (one more chunk in memory; a GPU would otherwise wait on the file)."""
    from concurrent.futures import ThreadPoolExecutor

    done = 0
    with ThreadPoolExecutor(1, thread_name_prefix="cdinn-read") as reader:
        ahead = [reader.submit(_read_chunk, source, *bounds[i]) for i in todo[:1]]
        for k, i in enumerate(todo):
            check_stop(should_stop, done, note)
            frames = ahead.pop().result()
            ahead += [reader.submit(_read_chunk, source, *bounds[j]) for j in todo[k + 1 : k + 2]]
            yield i, _run_chunk(fn, source, *bounds[i], _chunk_mask(mask, *bounds[i]), frames)
            done += bounds[i][1] - bounds[i][0]


def _bounded(call, seconds):
    """``call()`` in a daemon thread: its value, or None when it raised or took more than ``seconds``
    (a cluster that stopped answering never holds this process)."""
    import threading

    box = []

    def run():
        with contextlib.suppress(Exception):
            box.append(call())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return box[0] if box else None


def _probe_scheduler(address, timeout):
    """Ask ``address`` who it is (a dask scheduler answers its identity) within ``timeout`` seconds;
    raises for an unreachable, silent or garbage-answering server."""
    import asyncio

    from distributed.comm import connect

    async def probe():
        comm = await connect(address, timeout=timeout)
        try:
            await comm.write({"op": "identity", "reply": True})
            answer = await comm.read()
        finally:
            comm.abort()
        if not isinstance(answer, dict) or answer.get("type") != "Scheduler":
            raise OSError(f"{address!r} did not answer as a dask scheduler")

    asyncio.run(asyncio.wait_for(probe(), timeout))


def _execute_distributed(fn, source, bounds, todo, scheduler, should_stop, mask=None, note=_RESUME_NOTE,
                         timeout=60.0):
    """The chunks on a dask.distributed cluster, with deadlines: a scheduler that cannot be reached,
    has no workers, or stops answering for ``timeout`` seconds ends the run with one ``OSError``;
    an interrupt (Ctrl-C) or a stop cancels the futures."""
    from concurrent.futures import CancelledError

    from dask.distributed import Client, as_completed

    timeout = float(timeout)
    own = not isinstance(scheduler, Client)
    where = f"the dask scheduler at {scheduler!r}" if own else "the dask cluster"
    if own:
        try:
            _probe_scheduler(scheduler, timeout)  # a Client that fails to start hangs in its __del__
            client = Client(scheduler, timeout=f"{timeout}s", set_as_default=False)
        except Exception as exc:  # noqa: BLE001 - bad addresses, unknown protocols, garbage answers
            why = io._first_line(exc) if str(exc).strip() else f"no answer within {timeout:g} s"
            raise OSError(f"could not reach {where}: {why}") from None
    else:
        client = scheduler
    futures = {}
    try:
        if isinstance(source, (str, os.PathLike)):
            src = os.path.abspath(source)
        else:
            src = client.scatter(np.asarray(source), broadcast=False, timeout=timeout)
        for i in todo:
            # the chunk's mask travels inside its task (not scattered: a task must survive its worker)
            fut = client.submit(_run_chunk, fn, src, *bounds[i], _chunk_mask(mask, *bounds[i]), retries=3,
                                pure=False, key=f"cdinn-chunk-{i}-{id(futures)}")
            futures[fut] = i
        queue, done, alive, asked = as_completed(futures, loop=client.loop), 0, time.monotonic(), time.monotonic()
        poll = max(0.05, min(2.0, timeout / 4))
        while not queue.is_empty():
            if stop_requested(should_stop):
                raise StreamCancelled(note, done=done)
            finished = queue.next_batch(block=False) if queue.has_ready() else []
            if not finished:
                time.sleep(0.02)
            for fut in finished:
                index = futures[fut]
                try:
                    result = fut.result()
                except CancelledError:
                    raise OSError(f"{where} lost the chunks (it stopped or restarted); the finished chunks are "
                                  "kept for --resume") from None
                alive = time.monotonic()
                yield index, result
                done += bounds[index][1] - bounds[index][0]
            if finished or time.monotonic() - asked < poll:
                continue
            asked = time.monotonic()
            info = _bounded(client.scheduler_info, min(timeout, 10.0))
            if info is not None and info.get("workers"):
                alive = time.monotonic()
            elif time.monotonic() - alive > timeout:
                if info is None:
                    raise OSError(f"{where} has not answered for {timeout:g} s (stopped or unreachable); "
                                  "the finished chunks are kept for --resume")
                raise OSError(f"{where} has had no workers for {timeout:g} s; start workers "
                              "(dask worker ADDRESS) or run without --scheduler")
    finally:
        unfinished = [f for f in futures if not f.done()]
        if unfinished:
            _bounded(lambda: client.cancel(unfinished, force=True), 5.0)
        if own:
            _bounded(lambda: client.close(timeout=5), 10.0)
