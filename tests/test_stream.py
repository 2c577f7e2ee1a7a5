"""Chunked stack processing: streaming equals in-memory, resume, cancellation, LocalCluster."""

import functools
import os

import h5py
import numpy as np
import pytest

from napari_cdinn import io, physics
from napari_cdinn.stream import StreamCancelled, chunk_bounds, process_stack


def _toy(intensity, first_frame=0, gain=1.0):
    """A chunk function with per-frame results of several shapes."""
    amp = physics.amplitude_from_intensity(intensity) * gain
    return {"amplitude": amp, "chi2": amp.mean(axis=(1, 2)).astype(np.float32), "support": amp > amp.mean()}


@pytest.fixture
def stack_file(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.poisson(5.0, size=(53, 16, 16)).astype(np.uint16)
    path = tmp_path / "stack.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=data, chunks=(8, 16, 16))
    return str(path), data.astype(np.float32)


def test_chunk_bounds():
    assert chunk_bounds(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert chunk_bounds(3, 10) == [(0, 3)]


@pytest.mark.parametrize("ext", [".h5", ".cxi", ".npz"])
def test_streaming_equals_in_memory(stack_file, tmp_path, ext):
    path, data = stack_file
    expected = _toy(data)
    out = str(tmp_path / f"res{ext}")
    seen = []
    process_stack(path, out, _toy, chunk_size=10, progress=lambda d, n: seen.append((d, n)))
    got = io.read_result(out)
    for k, v in expected.items():
        np.testing.assert_array_equal(got[k], v)
    assert seen[-1] == (53, 53) and len(seen) == 7
    assert not os.path.exists(tmp_path / f".res{ext}.partial")
    if ext == ".cxi":
        with h5py.File(out) as f:
            assert f["entry_1/result_1/amplitude"].shape == (53, 16, 16)


def test_single_frame_and_array_source(tmp_path):
    frame = np.random.default_rng(1).random((16, 16)).astype(np.float32)
    res = process_stack(frame, None, _toy)
    assert res["amplitude"].shape == (16, 16) and res["chi2"].shape == ()


def test_resume_skips_finished_chunks(stack_file, tmp_path):
    path, data = stack_file
    out = str(tmp_path / "res.h5")
    calls = []

    def counting(x, first_frame):
        calls.append(len(x))
        return _toy(x)

    with pytest.raises(StreamCancelled):
        process_stack(path, out, counting, chunk_size=10, should_stop=lambda: len(calls) >= 3)
    assert not os.path.exists(out) and os.path.exists(tmp_path / ".res.h5.partial")
    calls.clear()
    summary = process_stack(path, out, counting, chunk_size=10, resume=True)
    assert summary["skipped"] == 3 and len(calls) == 3
    np.testing.assert_array_equal(io.read_result(out)["amplitude"], _toy(data)["amplitude"])


def test_resuming_a_finished_output_does_nothing_unless_input_or_options_changed(stack_file, tmp_path):
    """A batch script run again with --resume after it finished recomputed the whole stack."""
    path, data = stack_file
    out = str(tmp_path / "res.h5")
    calls, seen = [], []

    def counting(x, first_frame, gain=1.0):
        calls.append(len(x))
        return _toy(x * gain)

    process_stack(path, out, counting, chunk_size=10, options={"gain": 1})
    before, mtime = len(calls), os.stat(out).st_mtime_ns
    summary = process_stack(path, out, counting, chunk_size=10, options={"gain": 1}, resume=True,
                            progress=lambda d, n: seen.append((d, n)))
    assert summary["complete"] and summary["skipped"] == summary["chunks"] == 6 and len(calls) == before
    assert os.stat(out).st_mtime_ns == mtime and seen == [(53, 53)]
    changed = functools.partial(counting, gain=2.0)
    summary = process_stack(path, out, changed, chunk_size=10, options={"gain": 2}, resume=True)
    assert not summary.get("complete") and summary["skipped"] == 0 and len(calls) == 2 * before
    np.testing.assert_array_equal(io.read_result(out)["amplitude"], _toy(data * 2.0)["amplitude"])


def test_resume_refuses_other_options(stack_file, tmp_path):
    path, _ = stack_file
    out = str(tmp_path / "res.h5")
    with pytest.raises(StreamCancelled):
        process_stack(path, out, _toy, chunk_size=10, options={"a": 1}, should_stop=lambda: True)
    with pytest.raises(ValueError, match="other input or options"):
        process_stack(path, out, _toy, chunk_size=10, options={"a": 2}, resume=True)


def test_failed_run_keeps_existing_output(stack_file, tmp_path):
    path, _ = stack_file
    out = tmp_path / "res.h5"
    out.write_bytes(b"precious")

    def broken(x, first_frame):
        raise ValueError("boom")

    with pytest.raises(ValueError):
        process_stack(path, str(out), broken, chunk_size=10)
    assert out.read_bytes() == b"precious"


def test_local_cluster_equals_local(stack_file, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    path, data = stack_file
    out = str(tmp_path / "res.h5")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        process_stack(path, out, functools.partial(_toy, gain=2.0), chunk_size=10, scheduler=client)
    np.testing.assert_array_equal(io.read_result(out)["amplitude"], _toy(data, gain=2.0)["amplitude"])


def _dies_once(intensity, marker, first_frame=0):
    """Kill the worker process the first time any worker runs a chunk."""
    if not os.path.exists(marker):
        with open(marker, "w"):
            pass
        os._exit(1)
    return _toy(intensity)


def test_killed_worker_loses_nothing(stack_file, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    path, data = stack_file
    out = str(tmp_path / "res.h5")
    marker = str(tmp_path / "killed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        process_stack(path, out, functools.partial(_dies_once, marker=marker), chunk_size=10, scheduler=client)
    assert os.path.exists(marker)  # a worker did die
    np.testing.assert_array_equal(io.read_result(out)["amplitude"], _toy(data)["amplitude"])


def test_random_starts_do_not_depend_on_chunking(tmp_path):
    from napari_cdinn.retrieval import reconstruct_chunk
    from napari_cdinn.simulate import simulate

    data = simulate(5, seed=9, oversampling=2)["intensity"]
    fn = functools.partial(reconstruct_chunk, algorithm="hio", iterations=8, average=1, n_starts=1)
    whole = process_stack(data, None, fn, chunk_size=5)
    pieces = process_stack(data, None, fn, chunk_size=2)
    np.testing.assert_allclose(pieces["amplitude"], whole["amplitude"], atol=1e-5)


def _masked(intensity, first_frame=0, mask=None):
    """A chunk function reporting the mask it was given, frame by frame."""
    mask = np.broadcast_to(mask, intensity.shape)
    return {"unmeasured": mask.sum(axis=(1, 2)).astype(np.int32), "frame": first_frame + np.arange(len(intensity))}


@pytest.mark.parametrize("ndim", [2, 3])
def test_the_mask_travels_with_its_chunk(stack_file, tmp_path, ndim):
    path, data = stack_file
    rng = np.random.default_rng(3)
    mask = rng.random(data.shape if ndim == 3 else data.shape[1:]) < 0.3
    expected = np.broadcast_to(mask, data.shape).sum(axis=(1, 2))
    res = process_stack(path, None, _masked, chunk_size=10, mask=mask)
    np.testing.assert_array_equal(res["unmeasured"], expected)
    np.testing.assert_array_equal(process_stack(path, None, _toy)["amplitude"], _toy(data)["amplitude"])  # no mask: no keyword
    with pytest.raises(ValueError, match="the mask must be shaped"):
        process_stack(path, None, _masked, mask=mask[..., :5])


def test_resume_refuses_another_mask(stack_file, tmp_path):
    path, data = stack_file
    out = str(tmp_path / "res.h5")
    mask = np.zeros(data.shape[1:], bool)
    with pytest.raises(StreamCancelled):
        process_stack(path, out, _masked, chunk_size=10, mask=mask, should_stop=lambda: True)
    mask[0, 0] = True
    with pytest.raises(ValueError, match="other input or options"):
        process_stack(path, out, _masked, chunk_size=10, mask=mask, resume=True)


def test_local_cluster_gets_the_masks(stack_file, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    path, data = stack_file
    mask = np.random.default_rng(4).random(data.shape) < 0.3
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        res = process_stack(path, None, _masked, chunk_size=10, scheduler=client, mask=mask)
    np.testing.assert_array_equal(res["unmeasured"], mask.sum(axis=(1, 2)))


def _with_phase(intensity, first_frame=0, gain=1.0):
    """:func:`_toy` with a phase, so that a CXI file gets its complex image."""
    res = _toy(intensity, first_frame, gain)
    return dict(res, phase=np.arctan(intensity - intensity.mean()).astype(np.float32))


def _h5_layout(path):
    """Everything a result file holds: per dataset its bytes, dtype, shape and storage; the attributes."""
    out = {}
    with h5py.File(path) as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj[()].tobytes(), obj.dtype.str, obj.shape, obj.chunks, obj.compression,
                             obj.compression_opts, obj.shuffle, dict(obj.attrs))
        f.visititems(visit)
        attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()}
    return out, attrs


@pytest.mark.parametrize("ext", [".h5", ".cxi"])
@pytest.mark.parametrize("frames, chunk_size, rows", [(53, 16, 8), (53, 100, None), (4100, 4096, None)])
def test_streamed_and_in_memory_results_are_the_same_file(tmp_path, monkeypatch, ext, frames, chunk_size, rows):
    if rows is not None:  # small storage chunks, so that a small stack is written in several run chunks
        monkeypatch.setattr(io, "H5_CHUNK_FRAMES", rows)
    data = np.random.default_rng(5).poisson(3.0, size=(frames, 8, 8)).astype(np.float32)
    attrs = {"model": "m", "views": 2, "trust_chi2": 0.05, "sizes": [1, 2], "refine": {"a": 1}, "none": None}
    fn = functools.partial(_with_phase, gain=1.5)
    streamed, memory = tmp_path / f"s{ext}", tmp_path / f"m{ext}"
    process_stack(data, str(streamed), fn, chunk_size=chunk_size, attrs=attrs)
    io.write_result(memory, process_stack(data, None, fn, chunk_size=chunk_size), attrs=attrs)
    got, want = _h5_layout(streamed), _h5_layout(memory)
    assert len(got[1].pop("cdinn_fingerprint")) == 64  # a streamed file records what made it (for --resume)
    assert got == want
    assert got[0]["amplitude"][4] == "gzip" and got[0]["amplitude"][3][0] <= chunk_size
    if ext == ".cxi":
        assert "entry_1/image_1/data" in got[0]


def test_storage_chunks_never_straddle_two_run_chunks():
    assert io.h5_chunk_frames(10_000, 4096, run_chunk=1000) == 250  # 1,000-frame runs: 250-frame chunks
    assert io.h5_chunk_frames(10_000, 4096, run_chunk=4096) == 256  # the default: the in-memory chunks
    assert io.h5_chunk_frames(10_000, 4096) == 256
    assert io.h5_chunk_frames(10_000, 4096, run_chunk=4099) is None  # a prime: contiguous, uncompressed
    assert io.h5_dataset_options((10_000, 32, 32), np.float32, run_chunk=4099) == {}
    for run in (3, 10, 1000, 1024, 4096, 5000):
        rows = io.h5_chunk_frames(20_000, 4, run_chunk=run)
        assert rows is None or run % rows == 0


def test_a_single_frame_gives_the_same_unbatched_result_in_every_format(tmp_path):
    frame = np.random.default_rng(2).random((16, 16)).astype(np.float32)
    summary = process_stack(frame, str(tmp_path / "one.h5"), _toy)
    process_stack(frame, str(tmp_path / "one.npz"), _toy)
    assert summary["frames"] == 1
    a, b = io.read_result(tmp_path / "one.h5"), io.read_result(tmp_path / "one.npz")
    assert a["amplitude"].shape == b["amplitude"].shape == (16, 16)


def test_resume_redoes_a_chunk_that_does_not_read_back(stack_file, tmp_path):
    """A kept chunk is verified before it is trusted: one whose compressed bytes were damaged (a write
    cut short by a kill) is done again, and the result equals an uninterrupted run."""
    path, data = stack_file
    out = str(tmp_path / "res.h5")
    calls = []

    def counting(x, first_frame):
        calls.append(first_frame)
        return _toy(x)

    with pytest.raises(StreamCancelled):
        process_stack(path, out, counting, chunk_size=8, should_stop=lambda: len(calls) >= 3)
    partial = tmp_path / ".res.h5.partial"
    with h5py.File(partial, "r") as f:
        info = f["amplitude"].id.get_chunk_info(1)  # the storage chunk of frames 8..15
        assert f["amplitude"].chunks[0] == 8 and info.chunk_offset == (8, 0, 0)
    with open(partial, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * min(info.size, 64))
    calls.clear()
    summary = process_stack(path, out, counting, chunk_size=8, resume=True)
    assert summary["skipped"] == 2 and 8 in calls and 0 not in calls
    np.testing.assert_array_equal(io.read_result(out)["amplitude"], _toy(data)["amplitude"])


def test_resume_reports_a_partial_it_cannot_open(stack_file, tmp_path):
    path, _ = stack_file
    (tmp_path / ".res.h5.partial").write_bytes(b"not HDF5 at all")
    with pytest.raises(ValueError, match=r"partial output .*\.res\.h5\.partial cannot be opened"):
        process_stack(path, str(tmp_path / "res.h5"), _toy, chunk_size=8, resume=True)
    assert (tmp_path / ".res.h5.partial").exists()


def test_chunks_are_read_ahead_in_a_thread_and_a_read_error_reaches_the_caller(stack_file, tmp_path, monkeypatch):
    import threading

    import napari_cdinn.stream as stream

    path, data = stack_file
    reads, real = [], stream._read_chunk

    def read(source, start, stop):
        reads.append((start, threading.current_thread().name))
        if start == 40 and fail:
            raise OSError("the disk went away")
        return real(source, start, stop)

    monkeypatch.setattr(stream, "_read_chunk", read)
    fail = False
    out = str(tmp_path / "res.h5")
    process_stack(path, out, _toy, chunk_size=10)
    np.testing.assert_array_equal(io.read_result(out)["amplitude"], _toy(data)["amplitude"])
    chunk_reads = [r for r in reads if r[1].startswith("cdinn-read")]
    assert [start for start, _ in chunk_reads] == [0, 10, 20, 30, 40, 50]  # each once, in order, in the reader
    fail = True
    with pytest.raises(OSError, match="the disk went away"):
        process_stack(path, str(tmp_path / "other.h5"), _toy, chunk_size=10)
    assert not os.path.exists(tmp_path / "other.h5")


def test_iter_chunks_checks_its_stack_and_chunk_size():
    from napari_cdinn.stream import iter_chunks

    stack = np.ones((5, 16, 16), np.float32)

    def count(x, first_frame=0):
        return {"n": np.zeros(len(x))}

    for bad in (stack[None], np.ones(5)):  # a 4-D block was one chunk; a 1-D one reached the function
        with pytest.raises(ValueError, match="shaped .H, W. or .N, H, W., got"):
            list(iter_chunks(bad, count, chunk_size=2))
    for size in (0, -1, 2.5):  # 0 and -1 silently became 1
        with pytest.raises(ValueError, match="chunk_size must be a positive whole number of frames"):
            list(iter_chunks(stack, count, chunk_size=size))
    assert [c[:2] for c in iter_chunks(stack.tolist(), count, chunk_size=2)] == [(0, 2), (2, 4), (4, 5)]
