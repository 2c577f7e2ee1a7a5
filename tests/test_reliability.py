"""Reliability under probing (issue 22): no silent corruption, no lost input, bounded memory, no hangs.

Each test names the item of the issue it holds: a killed and resumed run equals an uninterrupted one;
an output never replaces its input; one run writes an output at a time; a resume checks what it
continues; a full disk gives one line; memory is bounded by bytes; a cluster never hangs the run;
the napari reader never raises; scores do not depend on the scale; every bad input is one line.
"""

import os
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest
import tifffile

from napari_cdinn import io, physics, stream
from napari_cdinn.cli import main
from napari_cdinn.simulate import simulate

RECONSTRUCT = ["--iterations", "150", "--algorithm", "er", "--device", "cpu"]


def _one_error(code, err, rc=2):
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("\r")]
    assert code == rc, err
    assert "Traceback" not in err, err
    assert [ln for ln in lines if ln.startswith("error: ")] == [lines[-1]], err
    return lines[-1]


@pytest.fixture(scope="module")
def stack64(tmp_path_factory):
    """64 oversampled 32 x 32 patterns in an HDF5 file."""
    path = tmp_path_factory.mktemp("in") / "in.h5"
    with h5py.File(path, "w") as f:
        f["data"] = simulate(64, size=16, seed=3, oversampling=2)["intensity"]
    return path


# --------------------------------------------------------------------------- 1. kill and resume
def _run_and_kill(argv, rng, window):
    """Run ``cdinn argv`` in a subprocess and SIGKILL it ``0..window`` s after its progress bar starts;
    True if it was killed, False if it finished first."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "napari_cdinn.cli", *argv], env=env, stderr=subprocess.PIPE)
    started = threading.Event()

    def watch():
        for byte in iter(lambda: proc.stderr.read(1), b""):
            if byte == b"[":
                started.set()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    while not started.is_set() and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(rng.uniform(0, window))
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    thread.join(5)
    return killed


def test_killed_and_resumed_runs_equal_an_uninterrupted_one(stack64, tmp_path, capsys):
    """Kill -9 at random moments, --resume until done, at a chunk size (7) that is no power of two."""
    base = ["reconstruct", str(stack64), "--chunk-size", "7", *RECONSTRUCT]
    assert main([*base, "-o", str(tmp_path / "ref.h5")]) == 0
    capsys.readouterr()
    ref = io.read_result(tmp_path / "ref.h5")
    rng = random.Random(22)
    out = tmp_path / "out.h5"
    for _ in range(3):
        out.unlink(missing_ok=True)
        for attempt in range(30):
            killed = _run_and_kill([*base, "-o", str(out), *(["--resume"] if attempt else [])], rng, 1.5)
            if out.exists():
                break
            assert killed  # a run that ended by itself wrote its output
        got = io.read_result(out)
        for key, value in ref.items():
            np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert not (tmp_path / ".out.h5.partial").exists()


def test_an_unusable_partial_is_named_with_the_command_that_starts_over(stack64, tmp_path, capsys):
    out = tmp_path / "out.h5"
    partial = tmp_path / ".out.h5.partial"
    partial.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # an HDF5 signature, then nothing usable
    argv = ["reconstruct", str(stack64), "-o", str(out), "--chunk-size", "7", *RECONSTRUCT, "--resume"]
    line = _one_error(main(argv), capsys.readouterr().err)
    assert str(partial) in line and "to start over: cdinn reconstruct" in line and "--resume" not in line.split(":")[-1]
    assert partial.exists() and not out.exists()  # kept for the user to look at


# --------------------------------------------------------------------------- 2. inputs are never outputs
@pytest.mark.parametrize("ext", [".npz", ".h5"])
def test_the_output_is_never_the_input(tmp_path, capsys, ext):
    src = tmp_path / f"a{ext}"
    data = simulate(2, seed=1, oversampling=2)["intensity"]
    np.savez(src, intensity=data) if ext == ".npz" else h5py.File(src, "w").create_dataset("data", data=data).file.close()
    before = src.read_bytes()
    (tmp_path / f"link{ext}").symlink_to(src)
    for out in (src, tmp_path / f"link{ext}", tmp_path / "." / f"a{ext}"):
        line = _one_error(main(["predict", str(src), "-o", str(out)]), capsys.readouterr().err)
        assert "is the input" in line
    assert src.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == sorted([f"a{ext}", f"link{ext}"])


# --------------------------------------------------------------------------- 3. one writer per output
def test_a_second_run_on_the_same_output_is_refused(stack64, tmp_path, capsys):
    out = tmp_path / "c.h5"
    lock = stream._lock(out)  # another run holds it
    try:
        line = _one_error(main(["predict", str(stack64), "-o", str(out)]), capsys.readouterr().err)
        assert f"another run (pid {os.getpid()}) is writing" in line
        assert not out.exists()
    finally:
        stream._unlock(lock)
    assert main(["predict", str(stack64), "-o", str(out)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["c.h5"]


# --------------------------------------------------------------------------- 4. a fingerprint of contents
def _toy(x, first_frame=0):
    return {"amplitude": np.sqrt(np.maximum(x, 0)), "chi2": x.mean(axis=(1, 2))}


def test_resume_refuses_a_replaced_input_of_the_same_size_and_mtime(tmp_path):
    src, out = tmp_path / "in.npy", tmp_path / "out.h5"
    data = np.random.default_rng(0).random((20, 8, 8)).astype(np.float32)
    np.save(src, data)
    with pytest.raises(stream.StreamCancelled):
        stream.process_stack(str(src), str(out), _toy, chunk_size=5, should_stop=lambda: True)
    stamp = os.stat(src).st_mtime_ns
    np.save(src, data[::-1].copy())  # other frames, same size, same mtime to the nanosecond
    os.utime(src, ns=(stamp, stamp))
    with pytest.raises(stream.PartialError, match="other input or options"):
        stream.process_stack(str(src), str(out), _toy, chunk_size=5, resume=True)


def test_resume_refuses_other_weights_at_the_same_path(stack64, tmp_path, capsys, monkeypatch):
    model = _weights(tmp_path, "m")
    argv = ["predict", str(stack64), "-o", str(tmp_path / "out.h5"), "--model", str(model), "--chunk-size", "16"]

    def stop_after_one_chunk(flag, done, note):
        if done:
            raise stream.Cancelled(note, done=done)

    monkeypatch.setattr(stream, "check_stop", stop_after_one_chunk)
    assert main(argv) == 2  # stopped, as if killed: the partial holds one chunk
    monkeypatch.undo()
    capsys.readouterr()
    model.write_bytes(model.read_bytes()[:-4] + b"\0\0\0\0")  # other weights, same path and size
    line = _one_error(main([*argv, "--resume"]), capsys.readouterr().err)
    assert "other input or options" in line and "to start over: cdinn predict" in line


# --------------------------------------------------------------------------- 5. full disk
@pytest.fixture
def file_size_limit():
    """Lower this process's file size limit (``ulimit -f``) for one test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit(nbytes):  # None: back to what it was
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft if nbytes is None else nbytes, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_full_disk_stops_cleanly_and_the_partial_resumes(stack64, tmp_path, capsys, file_size_limit):
    out = tmp_path / "out.h5"
    argv = ["reconstruct", str(stack64), "-o", str(out), "--chunk-size", "8", *RECONSTRUCT]
    per_chunk = 8 * 32 * 32 * 9  # amplitude, phase (float32) and support (bool) of a chunk, uncompressed
    file_size_limit(int(per_chunk * 1.01) + stream._ROOM_MARGIN + 40_000)  # room for the first chunks only
    line = _one_error(main(argv), capsys.readouterr().err)
    file_size_limit(None)
    assert "not enough space to write" in line and "ulimit -f" in line and "kept in" in line
    assert (tmp_path / ".out.h5.partial").exists() and not out.exists()
    assert main([*argv, "--resume"]) == 0
    assert "chunks resumed" in capsys.readouterr().err
    assert main(["reconstruct", str(stack64), "-o", str(tmp_path / "ref.h5"), "--chunk-size", "8", *RECONSTRUCT]) == 0
    ref, got = io.read_result(tmp_path / "ref.h5"), io.read_result(out)
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key])


def test_a_write_that_fails_is_one_line_and_no_crash(stack64, tmp_path):
    """The write itself fails (the room check cannot see a quota, or a disk another program fills):
    one line, exit 2 (HDF5 would crash closing the file), and no partial left."""
    code = (
        "import resource, sys\n"
        "import napari_cdinn.stream as s\n"
        "s._room = lambda path: None\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (30000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "from napari_cdinn.cli import main\n"
        f"sys.exit(main(['reconstruct', {str(stack64)!r}, '-o', 'out.h5', '--chunk-size', '8', "
        "'--iterations', '2', '--algorithm', 'er']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    line = _one_error(proc.returncode, proc.stderr)
    assert "could not write 'out.h5'" in line and "file size limit" in line
    assert os.listdir(tmp_path) == []


def test_a_full_disk_under_an_npz_output_is_one_line(tmp_path, file_size_limit):
    file_size_limit(50_000)
    with pytest.raises(OSError, match=r"could not write .*big.npz.*file size limit"):
        io.write_npz(tmp_path / "big.npz", {"a": np.zeros(100_000)})
    file_size_limit(None)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- 6. memory bounded by bytes
def test_chunks_follow_the_memory_budget(tmp_path):
    data = np.ones((40, 64, 64), np.float32)
    src = tmp_path / "in.npy"
    np.save(src, data)
    summary = stream.process_stack(str(src), str(tmp_path / "o.h5"), _toy, chunk_size=4096, memory="1M")
    assert summary["chunk_size"] == 2**20 // (64 * 64 * 4 * io.WORK_FACTOR) == 4
    with pytest.raises(ValueError, match="more than the memory budget of 1.0 MiB"):
        stream.process_stack(np.ones((2, 512, 512), np.float32), None, _toy, memory="1M")
    with pytest.raises(ValueError, match="expected a size of at least 1M"):
        io.parse_size("lots")
    assert io.parse_size("1.5G") == 3 * 2**29 and io.parse_size(2**21) == 2**21


def test_npz_members_are_read_lazily(tmp_path, monkeypatch):
    data = np.random.default_rng(1).random((30, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "stored.npz", intensity=data)
    np.savez_compressed(tmp_path / "packed.npz", intensity=data)
    assert isinstance(io._open_source(tmp_path / "stored.npz")[1], np.memmap)  # never read whole
    assert isinstance(io._open_source(tmp_path / "packed.npz")[1], io._NpzStream)
    for name in ("stored.npz", "packed.npz"):
        np.testing.assert_array_equal(io.read_frames(tmp_path / name, 7, 19), data[7:19])
    monkeypatch.setenv("CDINN_MEMORY", "1M")  # a zip bomb: 4 MB of zeros in a few kB
    np.savez_compressed(tmp_path / "bomb.npz", intensity=np.zeros((1000, 32, 32), np.float32))
    with pytest.raises(ValueError, match="decompresses to 3.9 MiB, more than the memory budget"):
        io.read_frames(tmp_path / "bomb.npz", 0, 1)


def test_huge_lazily_allocated_data_sets_are_refused_without_reading(tmp_path, capsys):
    src = tmp_path / "huge.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("data", shape=(1, 100_000, 100_000), dtype="f4")  # 40 GB that were never written
    line = _one_error(main(["reconstruct", str(src), "-o", str(tmp_path / "r.h5")]), capsys.readouterr().err)
    assert "one frame of 'huge.h5' (100000 x 100000)" in line and "memory budget" in line
    assert io.stack_shape(src) == (1, 100_000, 100_000)


@pytest.mark.parametrize("argv, message", [
    (["simulate", "--count", "1000000000", "-o", "{tmp}/s.npz"], "--count 1000000000 patterns of 32 x 32 need"),
    (["reconstruct", "{src}", "-o", "{tmp}/r.h5", "--iterations", "1000000000000"], "--iterations 1000000000000 is more"),
])
def test_counts_beyond_memory_are_one_line(argv, message, tmp_path, capsys, stack64):
    argv = [a.format(tmp=tmp_path, src=stack64) for a in argv]
    line = _one_error(main(argv), capsys.readouterr().err)
    assert message in line
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- 7. dask with deadlines
@pytest.fixture
def no_worker_cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, protocol="tcp://", dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def test_a_cluster_without_workers_fails_within_the_timeout(stack64, tmp_path, no_worker_cluster):
    t0 = time.monotonic()
    with pytest.raises(OSError, match="has had no workers for 2 s"):
        stream.process_stack(str(stack64), str(tmp_path / "o.h5"), _toy, chunk_size=16,
                             scheduler=no_worker_cluster, scheduler_timeout=2)
    assert time.monotonic() - t0 < 15
    assert os.listdir(tmp_path) == []  # nothing finished: no partial, no lock


def test_a_silent_server_fails_within_the_timeout(stack64, tmp_path, capsys):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    held = []
    threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()
    address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
    t0 = time.monotonic()
    argv = ["predict", str(stack64), "-o", str(tmp_path / "o.h5"), "--scheduler", address, "--scheduler-timeout", "2"]
    line = _one_error(main(argv), capsys.readouterr().err)
    assert time.monotonic() - t0 < 15
    assert "could not reach the dask scheduler" in line
    assert os.listdir(tmp_path) == []
    server.close()


def test_an_interrupt_cancels_the_cluster_futures(stack64, tmp_path):
    from distributed import Client, LocalCluster

    def slow(x, first_frame=0):
        time.sleep(0.3)
        return _toy(x)

    calls = []

    def interrupt():  # Ctrl-C arrives while the chunks run
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False) as client:
        with pytest.raises(KeyboardInterrupt):
            stream.process_stack(str(stack64), str(tmp_path / "o.h5"), slow, chunk_size=2, scheduler=client,
                                 should_stop=interrupt)
        deadline = time.monotonic() + 10
        while client.processing() and any(client.processing().values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(client.processing().values())  # nothing left running for us
    assert (tmp_path / ".o.h5.partial").exists()  # kept for --resume


# --------------------------------------------------------------------------- 8. the napari reader never raises
def _patch_zip_member(path, method=None, flags=None):
    """Rewrite the compression method or the flag bits of every member of a zip file, in place."""
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    at = int.from_bytes(data[end + 16:end + 20], "little")  # the central directory
    for _ in range(int.from_bytes(data[end + 10:end + 12], "little")):
        local = int.from_bytes(data[at + 42:at + 46], "little")
        for base, off in ((at, 8), (local, 6)):  # flags, then method, in each header
            if flags is not None:
                data[base + off:base + off + 2] = flags.to_bytes(2, "little")
            if method is not None:
                data[base + off + 2:base + off + 4] = method.to_bytes(2, "little")
        at += 46 + sum(int.from_bytes(data[at + o:at + o + 2], "little") for o in (28, 30, 32))
    path.write_bytes(bytes(data))


def _reader_cases(tmp_path):
    stack = np.random.default_rng(2).random((3, 16, 16)).astype(np.float32)
    tifffile.imwrite(tmp_path / "zlib.tif", stack, compression="zlib", photometric="minisblack")
    with tifffile.TiffWriter(tmp_path / "mixed.tif") as tif:
        tif.write(stack[0])
        tif.write(stack[0, :8, :8])
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_dataset("data", data=h5py.Empty("f4"))
    with h5py.File(tmp_path / "huge.h5", "w") as f:
        f.create_dataset("data", shape=(1, 100_000, 100_000), dtype="f4")
    with h5py.File(tmp_path / "huge_result.h5", "w") as f:
        f.create_dataset("amplitude", shape=(100_000, 1000, 1000), dtype="f4")
    for name, kw in (("method.npz", {"method": 99}), ("encrypted.npz", {"flags": 1})):
        np.savez(tmp_path / name, intensity=stack)
        _patch_zip_member(tmp_path / name, **kw)
    # the shape of the first layer, or None: not for this reader
    return {"zlib.tif": (3, 16, 16), "mixed.tif": None, "empty.h5": None, "huge.h5": None,
            "huge_result.h5": (100_000, 1000, 1000), "method.npz": None, "encrypted.npz": None}


def test_the_reader_returns_layers_or_none_never_raises(tmp_path):
    from napari_cdinn._napari.reader import get_reader

    for name, shape in _reader_cases(tmp_path).items():
        reader = get_reader(str(tmp_path / name))  # the 400 GB 'amplitude' opens lazily, never read whole
        assert (reader is None) == (shape is None), name
        if shape is not None:
            assert reader(str(tmp_path / name))[0][0].shape == shape
    assert get_reader([]) is None and get_reader(str(tmp_path / "missing.npy")) is None


def test_odd_npz_members_are_one_sentence(tmp_path):
    _reader_cases(tmp_path)
    with pytest.raises(ValueError, match="unsupported zip compression"):
        io.read_stack(tmp_path / "method.npz")
    with pytest.raises(ValueError, match="encrypted"):
        io.read_stack(tmp_path / "encrypted.npz")
    with pytest.raises(ValueError, match="empty"):
        io.read_stack(tmp_path / "empty.h5")


# --------------------------------------------------------------------------- 10. scores do not depend on the scale
@pytest.mark.parametrize("scale", [1e-22, 1e-30, 1e25, 1e35])
def test_chi2_does_not_depend_on_the_scale(scale):
    import torch

    rng = np.random.default_rng(5)
    measured = rng.poisson(50, size=(3, 32, 32)).astype(np.float64)
    predicted = measured * (1 + 0.1 * rng.standard_normal(measured.shape))
    ref = physics.chi2(measured, predicted)
    np.testing.assert_allclose(physics.chi2(measured * scale, predicted), ref, rtol=1e-9)
    got = physics.chi2(torch.tensor(measured * scale, dtype=torch.float32), torch.tensor(predicted, dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4)
    noise = physics.noise_chi2(torch.tensor(measured * scale, dtype=torch.float32))
    assert torch.isfinite(noise).all()
    np.testing.assert_allclose(physics.noise_chi2(measured), measured.sum((1, 2)) / (measured**2).sum((1, 2)))


def test_chi2_is_never_nan():
    import torch

    measured = np.ones((2, 8, 8))
    predicted = np.full((2, 8, 8), np.nan)
    assert np.all(physics.chi2(measured, predicted) == 1.0)
    assert torch.all(physics.chi2(torch.ones(2, 8, 8), torch.full((2, 8, 8), float("nan"))) == 1.0)


@pytest.mark.parametrize("command", ["predict", "reconstruct"])
def test_scaled_intensities_get_the_same_scores(command, tmp_path, capsys):
    data = simulate(3, seed=6, oversampling=2)["intensity"].astype(np.float64)
    extra = ["--iterations", "20", "--algorithm", "er"] if command == "reconstruct" else []
    chi = {}
    for scale in (1.0, 1e-22, 1e25):
        np.save(tmp_path / f"s{scale:g}.npy", data * scale)
        assert main([command, str(tmp_path / f"s{scale:g}.npy"), "-o", str(tmp_path / f"r{scale:g}.npz"), *extra]) == 0
        chi[scale] = io.read_result(tmp_path / f"r{scale:g}.npz")["chi2"]
    capsys.readouterr()
    for scale in (1e-22, 1e25):
        assert np.all(np.isfinite(chi[scale]))
        np.testing.assert_allclose(chi[scale], chi[1.0], rtol=1e-3, atol=1e-6)


# --------------------------------------------------------------------------- 11. tracebacks become one line
def _weights(tmp_path, name, *, cut=None, card=None):
    """A copy of the shipped 32 x 32 model (cut short, or with another card) named ``name``."""
    from napari_cdinn.nn import WEIGHTS_DIR

    blob = (WEIGHTS_DIR / "model.safetensors").read_bytes()
    (tmp_path / f"{name}.safetensors").write_bytes(blob if cut is None else blob[:cut])
    (tmp_path / f"{name}.json").write_text(card if card is not None else (WEIGHTS_DIR / "model.json").read_text())
    return tmp_path / f"{name}.safetensors"


def _nan_weights(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from napari_cdinn.nn import WEIGHTS_DIR

    src = str(WEIGHTS_DIR / "model.safetensors")
    state = {k: v * float("nan") if v.is_floating_point() else v for k, v in load_file(src).items()}
    with safe_open(src, "pt") as f:
        meta = f.metadata()
    save_file(state, str(tmp_path / "nan.safetensors"), metadata=meta)
    return tmp_path / "nan.safetensors"


@pytest.mark.parametrize("case, message", [
    ("truncated", "not a valid safetensors file"),
    ("empty", "not a valid safetensors file"),
    ("list card", "holds a JSON list, not an object"),
    ("broken card", "list.json' is not valid JSON"),
    ("nan", "holds NaN or infinite weights"),
])
def test_bad_weights_are_one_line_and_leave_nothing(case, message, stack64, tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    model = {
        "truncated": lambda: _weights(models, "t", cut=5000),
        "empty": lambda: _weights(models, "e", cut=0),
        "list card": lambda: _weights(models, "list", card="[1, 2]"),
        "broken card": lambda: _weights(models, "list", card="{oops"),
        "nan": lambda: _nan_weights(models),
    }[case]()
    out = tmp_path / "o.h5"
    line = _one_error(main(["predict", str(stack64), "-o", str(out), "--model", str(model)]), capsys.readouterr().err)
    assert message in line
    assert sorted(os.listdir(tmp_path)) == ["models"]  # no partial, no lock left behind


@pytest.mark.parametrize("argv, message", [
    (["predict", "{src}", "-o", "{tmp}/o.npz", "--device", "cpu:x"], "unknown device 'cpu:x'"),
    (["predict", "{src}", "-o", "{tmp}/o.h5", "--scheduler", "ucx://127.0.0.1:1"], "could not reach the dask scheduler"),
    (["predict", "{src}", "-o", "{tmp}/o.h5", "--memory", "lots"], "--memory: expected a size"),
    (["simulate", "--count", "2", "--seed", "-1", "-o", "{tmp}/s.npz"], "argument --seed: expected an integer >= 0"),
    (["reconstruct", "{tiny}", "-o", "{tmp}/o.npz"], "at least 8 x 8"),
    (["train", "--resume", "-o", "{tmp}/missing"], "'{tmp}/missing' does not exist"),
])
def test_bad_arguments_are_one_line(argv, message, stack64, tmp_path, capsys):
    tiny = tmp_path / "tiny.npy"
    np.save(tiny, np.ones((2, 2, 2), np.float32))
    argv = [a.format(src=stack64, tmp=tmp_path, tiny=tiny) for a in argv]
    line = _one_error(main(argv), capsys.readouterr().err)
    assert message.format(tmp=tmp_path) in line
    assert sorted(os.listdir(tmp_path)) == ["tiny.npy"]


def test_a_pickled_optimizer_state_is_one_line(tmp_path, capsys):
    import torch

    out = tmp_path / "m"
    argv = ["train", "-o", str(out), "--preset", "tiny", "--train-size", "64", "--val-size", "16", "--epochs", "1",
            "--batch-size", "32", "--device", "cpu"]
    assert main(argv) == 0
    torch.save({"state": os.system}, out / "optimizer.pt")  # a pickle that would run code
    line = _one_error(main(["train", "-o", str(out), "--resume", "--epochs", "2", "--device", "cpu"]),
                      capsys.readouterr().err)
    assert "optimizer.pt" in line and "delete it" in line


# --------------------------------------------------------------------------- 12. the smaller items
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_results_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        io.write_result(tmp_path / "r.npz", {"amplitude": np.ones((2, 4, 4))})
        stream.process_stack(np.ones((3, 8, 8), np.float32), str(tmp_path / "r.h5"), _toy)
    finally:
        os.umask(old)
    for name in ("r.npz", "r.h5"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_values_beyond_float32_are_an_error_not_masked(tmp_path, capsys):
    data = simulate(2, seed=1, oversampling=2)["intensity"].astype(np.float64)
    data[1, 3, 3] = 1e39
    np.save(tmp_path / "big.npy", data)
    line = _one_error(main(["predict", str(tmp_path / "big.npy"), "-o", str(tmp_path / "o.h5")]),
                      capsys.readouterr().err)
    assert "beyond float32's range (such as 1e+39, frame 1)" in line
    assert sorted(os.listdir(tmp_path)) == ["big.npy"]


def test_mixed_size_tiff_pages_are_refused(tmp_path, capsys):
    with tifffile.TiffWriter(tmp_path / "mixed.tif") as tif:
        tif.write(np.ones((64, 64), np.float32))
        tif.write(np.ones((32, 32), np.float32))
    line = _one_error(main(["predict", str(tmp_path / "mixed.tif"), "-o", str(tmp_path / "o.npz")]),
                      capsys.readouterr().err)
    assert "holds images of different sizes (32 x 32, 64 x 64)" in line
