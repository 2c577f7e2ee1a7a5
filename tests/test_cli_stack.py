"""`cdinn predict` / `cdinn reconstruct` over stacks: streamed output, resume, cluster, progress."""

import h5py
import numpy as np
import pytest

from napari_cdinn import io
from napari_cdinn.cli import main
from napari_cdinn.simulate import simulate

FAST = {"predict": [], "reconstruct": ["--iterations", "10", "--algorithm", "hio"]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    path = tmp_path_factory.mktemp("stack") / "stack.cxi"
    data = simulate(11, seed=21, oversampling=2)["intensity"]
    with h5py.File(path, "w") as f:
        f["entry_1/data_1/data"] = data
    return path


@pytest.mark.parametrize("command", sorted(FAST))
def test_streamed_h5_equals_in_memory_npz(command, stack, tmp_path, capsys):
    assert main([command, str(stack), "-o", str(tmp_path / "a.npz"), *FAST[command]]) == 0
    assert main([command, str(stack), "-o", str(tmp_path / "b.h5"), "--chunk-size", "4", *FAST[command]]) == 0
    err = capsys.readouterr().err
    assert "11/11 frames" in err  # the progress bar reached the end
    a, b = io.read_result(tmp_path / "a.npz"), io.read_result(tmp_path / "b.h5")
    for key in ("amplitude", "phase", "chi2"):
        np.testing.assert_allclose(b[key], a[key], atol=1e-5, err_msg=key)
    with h5py.File(tmp_path / "b.h5") as f:
        assert f["amplitude"].compression == "gzip" and f["amplitude"].chunks is not None


def test_resume_needs_a_streamed_output(stack, tmp_path, capsys):
    assert main(["predict", str(stack), "-o", str(tmp_path / "a.npz"), "--resume"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --resume needs")


def test_resume_of_a_finished_run_recomputes_nothing_wrong(stack, tmp_path, capsys):
    out = tmp_path / "r.h5"
    assert main(["predict", str(stack), "-o", str(out), "--chunk-size", "4", "--resume"]) == 0
    first = io.read_result(out)
    assert main(["predict", str(stack), "-o", str(out), "--chunk-size", "4", "--resume"]) == 0
    np.testing.assert_array_equal(io.read_result(out)["amplitude"], first["amplitude"])


def test_scheduler_address_equals_local(stack, tmp_path, capsys):
    distributed = pytest.importorskip("dask.distributed")
    assert main(["predict", str(stack), "-o", str(tmp_path / "local.h5")]) == 0
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cl:
        code = main(["predict", str(stack), "-o", str(tmp_path / "cluster.h5"), "--chunk-size", "3",
                     "--scheduler", cl.scheduler_address])
    assert code == 0, capsys.readouterr().err
    a, b = io.read_result(tmp_path / "local.h5"), io.read_result(tmp_path / "cluster.h5")
    for key in ("amplitude", "phase", "chi2"):
        np.testing.assert_array_equal(b[key], a[key])


def test_unreachable_scheduler_is_one_error_line(stack, tmp_path, capsys):
    code = main(["predict", str(stack), "-o", str(tmp_path / "x.h5"), "--scheduler", "tcp://127.0.0.1:9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "Traceback" not in "".join(err)
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("argv, message", [
    (["bench", "--only", "nosuch"], "unknown benchmark"),
    (["bench", "--json", "no/such/folder/b.json"], "does not exist"),
])
def test_bench_bad_arguments_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
