"""The thread policy (never more threads than free cores), ``--threads`` on every command, and cold start."""

import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from napari_cdinn import device
from napari_cdinn.cli import main
from napari_cdinn.device import CpuSample, apply_threads, busy_cores, free_cores, threads_applied
from napari_cdinn.simulate import simulate


@pytest.fixture
def cores(monkeypatch):
    """A machine of ``n`` usable cores (affinity 0..n-1, no quota) whose other processes keep ``busy`` cores busy."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device, "_cgroup_quota", lambda: None)

    def machine(n, busy=0.0):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
        monkeypatch.setattr(device, "_measured_busy", lambda since: busy)

    return machine


@pytest.fixture
def stack(tmp_path):
    path = tmp_path / "one.npz"
    np.savez(path, intensity=simulate(2, seed=3, oversampling=2)["intensity"])
    return path


@pytest.mark.parametrize(("n", "busy", "leave", "expected"), [
    (4, 0.0, 0, 4),
    (4, 0.4, 0, 4),   # less than half a core: not busy
    (4, 0.6, 0, 3),
    (4, 1.0, 0, 3),
    (4, 1.0, 1, 2),   # a dock leaves a core to the viewer
    (2, 1.0, 0, 1),   # the 2-core CPU beside a training run
    (2, 5.0, 1, 1),   # never below 1
    (1, 0.0, 1, 1),
])
def test_free_cores(cores, n, busy, leave, expected):
    cores(n, busy)
    assert free_cores(leave) == expected


def test_free_cores_bounded_by_a_cpu_quota(cores, monkeypatch):
    cores(8, busy=1.0)
    monkeypatch.setattr(device, "_cgroup_quota", lambda: 2)
    assert device.usable_cores() == 2
    assert free_cores() == 2  # other tenants' use of the host does not take the quota
    assert free_cores(busy=7.0) == 1


@pytest.mark.parametrize("leave", [-1, 0.5, True])
def test_free_cores_rejects_bad_leave(leave):
    with pytest.raises(ValueError, match="leave"):
        free_cores(leave, busy=0.0)


def test_busy_cores_takes_out_this_process():
    before = CpuSample(0.0, {0: 100, 1: 100}, {0: 1000, 1: 1000}, own=1.0)
    # 1 s: CPU 0 fully busy, CPU 1 half busy, half a core of it this process's own work
    after = CpuSample(1.0, {0: 200, 1: 150}, {0: 1100, 1: 1100}, own=1.5)
    assert busy_cores(before, after, ticks_per_second=100) == pytest.approx(1.0)
    assert busy_cores(before, before, ticks_per_second=100) == 0.0  # no time passed


def test_busy_cores_without_proc_stat_uses_the_load_average(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    before, after = CpuSample(0.0, None, None, 0.0), CpuSample(1.0, None, None, 6.0)
    assert busy_cores(before, after) == pytest.approx(1.4)  # this process's 6 CPU seconds of the last minute out


def test_this_machine():
    sample = device.cpu_sample()
    assert busy_cores(sample, device.cpu_sample()) >= 0.0
    assert 1 <= free_cores() <= device.usable_cores() <= (os.cpu_count() or 1)
    device.refresh_window(0.0)  # a new window: the next count waits for none longer than SAMPLE_SECONDS
    assert 1 <= free_cores(leave=1) <= device.usable_cores()


def test_measured_window_and_its_reuse(monkeypatch):
    samples = iter([CpuSample(10.0, {0: 0}, {0: 0}, 0.0), CpuSample(10.0 + 0.2, {0: 20}, {0: 20}, 0.0)])
    monkeypatch.setattr(device, "cpu_sample", lambda: next(samples))
    monkeypatch.setattr(device, "_LAST", {})
    monkeypatch.setattr(device.time, "sleep", lambda s: None)
    monkeypatch.setattr(device.time, "monotonic", lambda: 10.2)
    assert device._measured_busy(None) == pytest.approx(1.0)
    assert device._measured_busy(None) == pytest.approx(1.0)  # a moment later: not measured again


def test_apply_threads_explicit_policy_and_environment(cores, monkeypatch):
    cores(4, busy=1.0)
    with threads_applied() as n:
        assert n == 3 == torch.get_num_threads() == device.default_threads()
    assert torch.get_num_threads() == 1  # restored (the test session's single thread)
    with threads_applied(2) as n:
        assert n == 2 == torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    with threads_applied() as n:
        assert n == 4  # an explicit environment, bounded by the usable cores
    for bad in (0, -2, 2.5, 5):
        with pytest.raises(ValueError, match="threads"):
            apply_threads(bad)
    assert torch.get_num_threads() == 1


def test_retrieval_workers_follow_the_policy(cores):
    from napari_cdinn.retrieval.api import _workers

    cpu = torch.device("cpu")
    cores(4, busy=1.0)
    assert _workers(None, cpu) == 1  # torch's single test thread bounds them
    with threads_applied(2):
        assert _workers(None, cpu) == 2
    assert _workers(3, cpu) == 3 and _workers(0, cpu) == 1


def test_dask_worker_tasks_share_the_free_cores(cores, monkeypatch):
    from napari_cdinn import stream

    cores(4)
    assert stream._dask_worker_threads() is None  # not in a dask task
    worker = types.SimpleNamespace(nanny="tcp://nanny", state=types.SimpleNamespace(nthreads=2))
    monkeypatch.setitem(sys.modules, "distributed", types.SimpleNamespace(get_worker=lambda: worker))
    try:
        assert stream._dask_worker_threads() == 2 == torch.get_num_threads()  # 4 free cores, 2 task slots
        worker.nanny = None  # maybe the client's own process: left alone
        assert stream._dask_worker_threads() is None
    finally:
        torch.set_num_threads(1)


def _recorder(monkeypatch, module, name, what):
    """Wrap ``module.name`` so that each call appends ``what()`` to the returned list."""
    seen, original = [], getattr(module, name)

    def wrapped(*args, **kwargs):
        seen.append(what())
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return seen


@pytest.mark.parametrize(("given", "expected"), [([], 3), (["--threads", "2"], 2)])
def test_predict_applies_threads(cores, monkeypatch, stack, tmp_path, capsys, given, expected):
    from napari_cdinn.nn import inference

    cores(4, busy=1.0)
    seen = _recorder(monkeypatch, inference, "_run_batch", torch.get_num_threads)
    assert main(["predict", str(stack), "-o", str(tmp_path / "p.npz"), *given]) == 0
    assert seen and set(seen) == {expected}
    assert torch.get_num_threads() == 1  # restored for in-process callers


def test_reconstruct_workers_follow_threads(cores, monkeypatch, stack, tmp_path, capsys):
    from napari_cdinn.retrieval import api

    cores(4)
    seen = []
    original = api._workers
    monkeypatch.setattr(api, "_workers", lambda t, d: seen.append(original(t, d)) or seen[-1])
    assert main(["reconstruct", str(stack), "-o", str(tmp_path / "r.npz"), "--iterations", "6", "--algorithm", "er",
                 "--threads", "3"]) == 0
    assert seen == [3]


def test_simulate_fft_workers_follow_threads(cores, monkeypatch, tmp_path, capsys):
    from napari_cdinn import simulate as sim

    cores(4, busy=2.0)
    seen = _recorder(monkeypatch, sim, "patterns_from_objects", lambda: sim.FFT_WORKERS)
    assert main(["simulate", "--count", "2", "-o", str(tmp_path / "s.npz")]) == 0
    assert main(["simulate", "--count", "2", "-o", str(tmp_path / "t.npz"), "--threads", "1"]) == 0
    assert seen == [2, 1] and sim.FFT_WORKERS == -1


@pytest.mark.parametrize("command", ["predict", "reconstruct", "simulate", "train", "adapt", "report", "bench"])
@pytest.mark.parametrize("value", ["0", "-1", "two", "100000"])
def test_bad_threads_exit_2(command, value, stack, tmp_path, capsys):
    argv = {"predict": ["predict", str(stack), "-o", str(tmp_path / "p.npz")],
            "reconstruct": ["reconstruct", str(stack), "-o", str(tmp_path / "r.npz")],
            "simulate": ["simulate", "--count", "1", "-o", str(tmp_path / "s.npz")],
            "train": ["train", "-o", str(tmp_path / "m")],
            "adapt": ["adapt", str(stack), "-o", str(tmp_path / "a")],
            "report": ["report", "-o", str(tmp_path / "rep")],
            "bench": ["bench", "--only", "nn"]}[command]
    assert main([*argv, "--threads", value]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "threads" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npz"]  # nothing written


def test_dock_jobs_leave_a_core_to_the_viewer(cores, qtbot):
    from napari_cdinn._napari.widgets._common import JobRunner

    cores(3)
    results = []
    runner = JobRunner(lambda info: None, results.append)
    runner.start(lambda emit, should_stop: torch.get_num_threads())
    qtbot.waitUntil(lambda: not runner.running, timeout=30_000)
    assert results == [2] and torch.get_num_threads() == 1


def test_models_stay_loaded_between_calls(monkeypatch):
    from napari_cdinn.nn import inference, predict

    loads = _recorder(monkeypatch, inference, "load_model", lambda: 1)
    monkeypatch.setattr(inference, "_CACHE", {})
    patterns = simulate(2, seed=4, oversampling=2)["intensity"]
    small = simulate(1, seed=4)["intensity"]
    for _ in range(2):
        predict(patterns, device="cpu")
        predict(small, device="cpu")  # another model: both stay loaded
    assert len(loads) == 2


def test_cold_predict_imports_only_what_it_needs(stack, tmp_path):
    code = ("import sys; from napari_cdinn.cli import main; "
            f"code = main(['predict', {str(stack)!r}, '-o', {str(tmp_path / 'p.h5')!r}]); "
            "heavy = [m for m in ('dask', 'distributed', 'scipy.ndimage', 'napari', 'qtpy') if m in sys.modules]; "
            "print(code, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0 []", out
