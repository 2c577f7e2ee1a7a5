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
  stays bounded by a few chunks whatever the stack's length;
* ``.h5``/``.hdf5``/``.cxi`` outputs are written as the job streams, into datasets named by the
  result keys, in a *partial* file beside the target (``.NAME.partial``) that is renamed to the
  target only when every chunk is done.  They are written by the writer of in-memory results,
  :class:`napari_cdinn.io.H5ResultWriter`: gzip-compressed in whole-frame storage chunks that
  divide the run's chunk size (:func:`napari_cdinn.io.h5_chunk_frames`), so a run chunk never
  rewrites part of a compressed chunk another run chunk wrote (resuming after a kill cannot mix
  frames), and a chunk size that is a multiple of 4096 frames (the CLI's default) gives the very
  file :func:`napari_cdinn.io.write_result` writes of the same results; a single frame (2-D input)
  is written as an in-memory result, unbatched like the ``.npz`` output;
* ``resume=True`` continues from that partial file, skipping the chunks it records as done,
  provided it was made from the same input, shape, chunk size and options (its fingerprint);
* ``.npz`` outputs are collected in memory and written at the end (no resume);
* :func:`iter_chunks` runs the same loop over an array or a file without writing, and yields
  each chunk's results as it finishes (the docks show them as they come);
* with ``scheduler`` (a dask.distributed address or ``Client``), chunks run on the cluster's
  workers, which read their frames from the file themselves (the input path must be visible to
  the workers, e.g. on a shared file system), each chunk retried on another worker if one dies;
  results come back to this process, which alone writes the output.

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

import numpy as np

from . import io
from .jobs import Cancelled, check_stop, stop_requested

__all__ = ["STREAM_EXTENSIONS", "StreamCancelled", "chunk_bounds", "iter_chunks", "process_stack"]

#: Output extensions written incrementally (and resumable).
STREAM_EXTENSIONS = (".h5", ".hdf5", ".cxi")
_DONE = "_chunks_done"
_FINGERPRINT = "cdinn_fingerprint"
_RESUME_NOTE = "stopped; the finished chunks are kept for --resume"

#: Raised when ``should_stop`` asks a run to stop; the partial output is kept for resume.
#: The one :class:`napari_cdinn.jobs.Cancelled` (``done``: frames finished in this run).
StreamCancelled = Cancelled


def chunk_bounds(n, chunk_size):
    """``[(start, stop), ...]`` covering ``range(n)`` in blocks of ``chunk_size`` frames."""
    chunk_size = max(1, int(chunk_size))
    return [(a, min(a + chunk_size, n)) for a in range(0, n, chunk_size)]


def _partial_path(out):
    folder, name = os.path.split(os.path.abspath(out))
    return os.path.join(folder, f".{name}.partial")


def _fingerprint(source, shape, chunk_size, options, mask=None):
    """A stable digest of what determines the output: input file, shape, chunking, options, mask."""
    if isinstance(source, (str, os.PathLike)):
        st = os.stat(source)
        src = {"path": os.path.abspath(source), "size": st.st_size, "mtime": int(st.st_mtime)}
    else:
        src = {"array": True}
    what = {"source": src, "shape": list(shape), "chunk": int(chunk_size), "options": options}
    if mask is not None:
        what["mask"] = [list(mask.shape), hashlib.sha256(np.packbits(mask).tobytes()).hexdigest()]
    blob = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_chunk(source, start, stop):
    """Frames ``start:stop`` of a path (read lazily) or of an array, as a float32 NumPy array."""
    if isinstance(source, (str, os.PathLike)):
        return io.read_frames(source, start, stop)
    stack = source[None] if source.ndim == 2 else source
    return np.asarray(stack[start:stop], dtype=np.float32)


def _chunk_mask(mask, start, stop):
    """The part of a mask for frames ``start:stop`` as NumPy bool: a 2-D mask whole, a 3-D one sliced."""
    if mask is None:
        return None
    return np.asarray(mask if mask.ndim == 2 else mask[start:stop], dtype=bool)


def _run_chunk(fn, source, start, stop, mask=None):
    """Worker task: read one chunk and run the chunk function on it (with its mask, if any)."""
    extra = {} if mask is None else {"mask": mask}
    return start, stop, fn(_read_chunk(source, start, stop), first_frame=start, **extra)


class _H5Sink:
    """Streams per-frame results into a partial HDF5 file through :class:`napari_cdinn.io.H5ResultWriter`."""

    def __init__(self, path, n, fingerprint, resume, attrs, chunk_size):
        import h5py

        self.f = None
        if resume and os.path.exists(path):
            with contextlib.suppress(OSError):
                self.f = h5py.File(path, "a")
            if self.f is not None and self.f.attrs.get(_FINGERPRINT) != fingerprint:
                self.f.close()
                raise ValueError(
                    "the partial output was made from other input or options; run without --resume to start over"
                )
        if self.f is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            self.f = h5py.File(path, "w")
            self.f.attrs[_FINGERPRINT] = fingerprint
            io.H5ResultWriter(self.f).set_attrs(attrs)
        self.writer = io.H5ResultWriter(self.f, frames=n, run_chunk=chunk_size)

    def done_chunks(self, n_chunks):
        if _DONE not in self.f:
            self.f.create_dataset(_DONE, data=np.zeros(n_chunks, dtype=bool))
        return np.asarray(self.f[_DONE][...], dtype=bool)

    def write(self, index, start, stop, results):
        self.writer.write_frames(start, stop, results)
        self.f.flush()  # the frames are on disk before the chunk is marked done
        self.f[_DONE][index] = True
        self.f.flush()

    def finish(self, final_path, partial_path):
        del self.f[_DONE]
        del self.f.attrs[_FINGERPRINT]  # the finished file is the result alone, as an in-memory one
        self.writer.finish(cxi=final_path.lower().endswith(".cxi"))
        self.f.close()
        os.replace(partial_path, final_path)

    def close(self):
        with contextlib.suppress(Exception):
            self.f.close()


class _MemorySink:
    """Collects per-frame results in memory; written with :func:`napari_cdinn.io.write_result`."""

    def __init__(self, n):
        self.n = n
        self.arrays = {}

    def done_chunks(self, n_chunks):
        return np.zeros(n_chunks, dtype=bool)

    def write(self, index, start, stop, results):
        for key, value in results.items():
            value = np.asarray(value)
            if key not in self.arrays:
                self.arrays[key] = np.empty((self.n,) + value.shape[1:], dtype=value.dtype)
            self.arrays[key][start:stop] = value

    def close(self):
        pass


def _source_shape(source):
    return io.stack_shape(source) if isinstance(source, (str, os.PathLike)) else tuple(source.shape)


def process_stack(
    source,
    out,
    fn,
    *,
    chunk_size=1024,
    resume=False,
    scheduler=None,
    options=None,
    attrs=None,
    progress=None,
    should_stop=None,
    mask=None,
):
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
        Frames per chunk (bounds memory; the unit of resume and of cluster tasks).
    resume : bool
        Continue an interrupted streamed run from its partial file.
    scheduler : str or dask.distributed.Client, optional
        Run the chunks on this dask.distributed cluster.
    options : dict, optional
        What else determines the output (model, algorithm, ...): part of the resume fingerprint.
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

    Returns
    -------
    dict
        The results in memory for ``.npz``/None outputs (2-D input gives unbatched results);
        for ``.h5``/``.hdf5``/``.cxi`` outputs a summary ``{"frames": N, "chunks": C, "skipped": K, "seconds": t}``.
    """
    shape = _source_shape(source)
    single = len(shape) == 2
    n = 1 if single else shape[0]
    bounds = chunk_bounds(n, chunk_size)
    ext = os.path.splitext(str(out))[1].lower() if out is not None else None
    streamed = ext in STREAM_EXTENSIONS and not single  # one frame: an in-memory result, unbatched
    if out is not None and ext not in io.RESULT_EXTENSIONS:
        raise ValueError(f"the output must end in one of {', '.join(io.RESULT_EXTENSIONS)}, got {os.path.basename(out)!r}")
    if resume and ext not in STREAM_EXTENSIONS:
        raise ValueError("--resume needs an .h5 or .cxi output; .npz results are written at the end")
    if out is not None:
        io.check_writable(out)
    if mask is not None:
        mask = io._check_mask(mask, shape, "the mask")

    partial = _partial_path(out) if streamed else None
    fingerprint = _fingerprint(source, shape, chunk_size, options or {}, mask)
    sink = _H5Sink(partial, n, fingerprint, resume, attrs, chunk_size) if streamed else _MemorySink(n)
    t0 = time.perf_counter()
    try:
        done = sink.done_chunks(len(bounds))
        todo = [i for i in range(len(bounds)) if not done[i]]
        frames = sum(b - a for i, (a, b) in enumerate(bounds) if done[i])
        if progress:
            progress(frames, n)
        for index, (a, b, res) in _execute(fn, source, bounds, todo, scheduler, should_stop, mask, _RESUME_NOTE):
            sink.write(index, a, b, res)
            frames += b - a
            if progress:
                progress(frames, n)
        seconds = time.perf_counter() - t0
        if streamed:
            sink.finish(out, partial)
            return {"frames": n, "chunks": len(bounds), "skipped": len(bounds) - len(todo), "seconds": seconds}
    except BaseException:
        sink.close()
        raise
    results = sink.arrays
    if single:
        results = {k: v[0] for k, v in results.items()}
    if out is not None:
        io.write_result(out, results, attrs=attrs)
    if ext in STREAM_EXTENSIONS:
        return {"frames": n, "chunks": len(bounds), "skipped": 0, "seconds": time.perf_counter() - t0}
    return results


def iter_chunks(source, fn, *, chunk_size=1024, mask=None, should_stop=None):
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
        A mask shaped neither like one frame nor like the stack.
    """
    shape = _source_shape(source)
    n = 1 if len(shape) == 2 else shape[0]
    if mask is not None:
        frame, stack = tuple(shape[-2:]), (n,) + tuple(shape[-2:])
        if tuple(np.shape(mask)) not in (frame, stack):
            raise ValueError(f"the mask is shaped {tuple(np.shape(mask))} but the data are {tuple(shape)}; "
                             f"expected {frame} or {stack}")
    bounds = chunk_bounds(n, chunk_size)
    for _, chunk in _execute(fn, source, bounds, range(len(bounds)), None, should_stop, mask, "stopped"):
        yield chunk


def _execute(fn, source, bounds, todo, scheduler, should_stop, mask=None, note=_RESUME_NOTE):
    """Yield ``(chunk index, (start, stop, results))`` locally or on a dask.distributed cluster."""
    if scheduler is None:
        done = 0
        for i in todo:
            check_stop(should_stop, done, note)
            yield i, _run_chunk(fn, source, *bounds[i], _chunk_mask(mask, *bounds[i]))
            done += bounds[i][1] - bounds[i][0]
        return
    yield from _execute_distributed(fn, source, bounds, todo, scheduler, should_stop, mask, note)


def _execute_distributed(fn, source, bounds, todo, scheduler, should_stop, mask=None, note=_RESUME_NOTE):
    from dask.distributed import Client, as_completed

    own = not isinstance(scheduler, Client)
    try:
        client = Client(scheduler, timeout="10s") if own else scheduler
    except (OSError, TimeoutError) as exc:
        raise OSError(f"could not reach the dask scheduler at {scheduler!r}: {io._first_line(exc)}") from None
    try:
        if isinstance(source, (str, os.PathLike)):
            src = os.path.abspath(source)
        else:
            src = client.scatter(np.asarray(source), broadcast=False)
        futures = {}
        for i in todo:
            # the chunk's mask travels inside its task (not scattered: a task must survive its worker)
            fut = client.submit(_run_chunk, fn, src, *bounds[i], _chunk_mask(mask, *bounds[i]), retries=3,
                                pure=False, key=f"cdinn-chunk-{i}-{id(futures)}")
            futures[fut] = i
        done = 0
        for fut in as_completed(futures):
            if stop_requested(should_stop):
                for f in futures:
                    f.cancel()
                raise StreamCancelled(note, done=done)
            index = futures[fut]
            yield index, fut.result()
            done += bounds[index][1] - bounds[index][0]
    finally:
        if own:
            client.close()
