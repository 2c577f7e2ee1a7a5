"""Tests of the batched phase retrieval engine (CPU only, small, correctness only)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_cdinn import physics
from napari_cdinn.cli import main
from napari_cdinn.protocol import ITERATIONS
from napari_cdinn.retrieval import (
    Cancelled,
    default_schedule,
    make_schedule,
    parse_schedule,
    reconstruct,
    steps,
    support,
)
from napari_cdinn.simulate import simulate

SIZE = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: small batches gain nothing from two, and a busy machine hurts them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    """Four paper-recipe patterns, 2x oversampled (64 x 64)."""
    return simulate(4, size=SIZE, seed=11, oversampling=2)


@pytest.fixture(scope="module")
def solved(data):
    """The default protocol with two starts on the four patterns."""
    return reconstruct(data["intensity"], device="cpu", n_starts=2, retry_chi2=None, seed=0)


def _scores(result, data):
    return physics.compare(physics.crop(result["object"], (SIZE, SIZE)), data["amplitude"], data["phase"])


# --------------------------------------------------------------------------- schedules
def test_schedule_one_liner():
    pairs = parse_schedule("(hio:80, er:20) x6, er:20")
    assert sum(n for _, n in pairs) == 620
    assert pairs[0] == ("hio", 80) and pairs[-1] == ("er", 40)
    assert parse_schedule("raar:5 er") == [("raar", 5), ("er", 1)]
    assert parse_schedule("((er:1)x2 hio:3)x2") == [("er", 2), ("hio", 3), ("er", 2), ("hio", 3)]
    assert default_schedule("hio-er", 620, 20) == pairs


@pytest.mark.parametrize("bad", ["(hio:80", "hio:80)", "foo:3", "hio:-1", "er;2"])
def test_schedule_errors(bad):
    with pytest.raises(ValueError):
        parse_schedule(bad)


def test_unknown_algorithm_is_one_sentence():
    with pytest.raises(ValueError, match="unknown algorithm 'magic'"):
        make_schedule("magic")


# --------------------------------------------------------------------------- steps
def test_modulus_projection_sets_modulus_and_keeps_phase_and_free_pixels():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(2, 8, 8, dtype=torch.complex64, generator=gen)
    amp = torch.rand(2, 8, 8, generator=gen)
    free = torch.zeros(2, 8, 8)
    free[:, :2] = 1
    amp = amp * (1 - free)
    before = f.clone()
    out, _ = steps.modulus_projection(f, amp, free)
    meas = free == 0
    assert torch.allclose(out.abs()[meas], amp[meas], rtol=1e-5, atol=1e-6)
    assert torch.allclose(torch.angle(out)[meas], torch.angle(before)[meas], atol=1e-4)
    assert torch.equal(out[~meas], before[~meas])


def test_updates_inside_and_outside():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 6, 6, dtype=torch.complex64, generator=gen)
    y = torch.randn(1, 6, 6, dtype=torch.complex64, generator=gen)
    s = (torch.rand(1, 6, 6, generator=gen) > 0.5).float()
    inside = s > 0
    beta = 0.7
    hio = steps.hio_update(x.clone(), y, 1 - s, beta)
    assert torch.allclose(hio[inside], y[inside]) and torch.allclose(hio[~inside], (x - beta * y)[~inside])
    raar = steps.raar_update(x.clone(), y, 1 - s, beta)
    assert torch.allclose(raar[~inside], (beta * x + (1 - 2 * beta) * y)[~inside], atol=1e-6)
    er = steps.er_update(x.clone(), y, s)
    assert torch.allclose(er, y * s)


def test_autocorrelation_support_contains_the_object(data):
    inten = torch.from_numpy(np.fft.ifftshift(data["intensity"], axes=(-2, -1)))
    sup = np.fft.fftshift(support.autocorrelation_support(inten, 0.1).numpy(), axes=(-2, -1)) > 0
    obj = physics.pad(physics.support_from_amplitude(data["amplitude"]), 2)
    # the autocorrelation support is centro-symmetric and larger than the object
    assert (sup.sum(axis=(1, 2)) > obj.sum(axis=(1, 2))).all()


# --------------------------------------------------------------------------- convergence
def test_converges_to_the_object(solved, data):
    assert solved["object"].shape == (4, 64, 64) and solved["object"].dtype == np.complex64
    assert (solved["chi2"] < 1e-3).all()
    s = _scores(solved, data)
    assert np.median(s["phase_rms"]) < 0.3
    assert np.median(s["iou"]) > 0.85
    assert solved["start_chi2"].shape == (4, 2)
    np.testing.assert_allclose(solved["chi2"], np.nanmin(solved["start_chi2"], axis=1), rtol=1e-6)


def test_restarts_only_where_chi2_is_high(data):
    r = reconstruct(data["intensity"], device="cpu", iterations=100, n_starts=3, retry_chi2=1e-3, seed=2)
    first, second = r["start_chi2"][:, 0], r["start_chi2"][:, 1]
    np.testing.assert_array_equal(np.isnan(second), first <= 1e-3)
    full = reconstruct(data["intensity"], device="cpu", iterations=100, n_starts=3, retry_chi2=None, seed=2)
    assert not np.isnan(full["start_chi2"]).any()
    np.testing.assert_array_equal(full["start_chi2"][:, 0], first)
    np.testing.assert_allclose(r["chi2"], np.nanmin(r["start_chi2"], axis=1))


def test_restart_rule_counts_the_misfit_beyond_the_noise():
    from napari_cdinn.protocol import RESTART_CHI2, RESTART_NOISE, needs_restart

    # noise-free: the misfit itself; counts: the misfit beyond the noise, against a share of it
    chi2 = np.array([RESTART_CHI2 / 2, 2 * RESTART_CHI2, 0.0105, 0.0105 + 0.02, np.nan])
    noise = np.array([0.0, 0.0, 0.01, 0.01, 0.0])
    np.testing.assert_array_equal(needs_restart(chi2, noise), [False, True, False, True, True])
    assert not needs_restart([0.01 + 0.9 * RESTART_NOISE * 0.01], [0.01])[0]
    assert needs_restart([0.01 + 1.1 * RESTART_NOISE * 0.01], [0.01])[0]
    # a rule on chi^2 alone restarts every noisy frame, whose chi^2 never falls below its noise
    assert needs_restart(chi2[2:4], 0.0).all()


def test_the_verdict_of_each_path_and_its_sentence():
    from napari_cdinn.nn import TRUST_CHI2
    from napari_cdinn.pipelines import LOW_DOSE_CHI2, fit_summary, fits

    chi2 = np.array([1e-4, 1e-3, 0.05 + 0.005, 0.05 + 0.02, np.nan])
    noise = np.array([0.0, 0.0, 0.05, 0.05, 0.0])
    np.testing.assert_array_equal(fits(chi2, noise), [True, False, True, False, False])  # the restart rule
    np.testing.assert_array_equal(fits(chi2, noise, "predict"), [True, True, True, chi2[3] - 0.05 <= TRUST_CHI2,
                                                                 False])
    text = fit_summary(chi2, noise)
    assert text.startswith("2 of 5 frames fit the data within the counting noise")
    assert f"1 of them too faint (chi2_noise > {LOW_DOSE_CHI2:g})" in text  # frame 2: fits, but faint
    assert fit_summary(chi2[:1], 0.0, "predict") == f"1 of 1 frame trusted (chi2 - chi2_noise <= {TRUST_CHI2:g})"


@pytest.fixture(scope="module")
def mixed():
    """Two noise-free patterns and four at 1e4 photons (their chi^2 stays near the noise's, ~5e-3)."""
    clean = simulate(2, size=SIZE, seed=12, oversampling=2)["intensity"]
    noisy = simulate(4, size=SIZE, seed=13, oversampling=2, photons=1e4)["intensity"]
    return np.concatenate([clean, noisy])


def test_default_restarts_only_frames_that_misfit_beyond_the_noise(mixed):
    from napari_cdinn.protocol import needs_restart

    r = reconstruct(mixed, device="cpu", iterations=60, average=10, n_starts=3, seed=3)
    np.testing.assert_allclose(r["chi2_noise"], physics.noise_chi2(mixed), rtol=1e-5)
    assert (r["chi2_noise"][:2] == 0).all() and (r["chi2_noise"][2:] > 1e-3).all()
    first, second, third = r["start_chi2"].T
    restarted = ~np.isnan(second)
    np.testing.assert_array_equal(restarted, needs_restart(first, r["chi2_noise"]))
    np.testing.assert_array_equal(~np.isnan(third), needs_restart(np.fmin(first, second), r["chi2_noise"]))
    # frames that fit are not restarted, frames that do not are; noisy frames are not all restarted
    # although every one of them is far above the absolute threshold
    assert restarted.any() and not restarted.all()
    assert not restarted[2:].all()
    np.testing.assert_allclose(r["chi2"], np.nanmin(r["start_chi2"], axis=1))


def test_restarts_are_deterministic_per_seed(mixed):
    opts = {"device": "cpu", "iterations": 60, "average": 10, "n_starts": 3}
    a = reconstruct(mixed, seed=3, **opts)
    b = reconstruct(mixed, seed=3, batch_size=2, **opts)  # the batches do not decide a frame's starts
    np.testing.assert_array_equal(np.isnan(a["start_chi2"]), np.isnan(b["start_chi2"]))
    np.testing.assert_allclose(a["start_chi2"], b["start_chi2"], rtol=1e-4)
    np.testing.assert_allclose(a["object"], b["object"], atol=1e-4 * np.abs(a["object"]).max())
    c = reconstruct(mixed, seed=4, **opts)
    assert not np.allclose(np.nan_to_num(a["start_chi2"]), np.nan_to_num(c["start_chi2"]))


def test_defaults_are_the_shared_protocol():
    import inspect

    from napari_cdinn import protocol
    from napari_cdinn.cli import build_parser

    params = inspect.signature(reconstruct).parameters
    assert params["iterations"].default == protocol.ITERATIONS and params["n_starts"].default == protocol.STARTS
    assert params["retry_chi2"].default == protocol.RESTART_CHI2
    assert params["retry_noise"].default == protocol.RESTART_NOISE
    args = build_parser().parse_args(["reconstruct", "in.npy", "-o", "out.npz"])
    assert args.starts == protocol.STARTS and args.iterations is None  # None: protocol.ITERATIONS


def test_restart_rule_bad_values_raise(data):
    with pytest.raises(ValueError, match="retry_noise"):
        reconstruct(data["intensity"][:1], device="cpu", iterations=2, average=0, retry_noise=-1)


def test_output_conventions(solved):
    amp, sup = solved["amplitude"], solved["support"]
    np.testing.assert_allclose(amp.max(axis=(1, 2)), 1.0, rtol=1e-6)
    assert solved["phase"].dtype == np.float32 and (solved["phase"][~sup] == 0).all()
    # centred: support centre of mass within a pixel of the frame centre
    yy, xx = np.mgrid[0:64, 0:64]
    for s in sup:
        assert abs((yy * s).sum() / s.sum() - 32) <= 1 and abs((xx * s).sum() / s.sum() - 32) <= 1
    # mean phase (circular) inside the support is 0
    unit = np.where(sup, solved["object"] / np.maximum(np.abs(solved["object"]), 1e-30), 0).sum(axis=(1, 2))
    np.testing.assert_allclose(np.angle(unit), 0, atol=1e-4)
    assert solved["errors"].shape == (4, len(solved["error_iterations"]))
    assert solved["error_iterations"][-1] == ITERATIONS
    assert solved["stopped"] is False
    # a normalised Fourier R-factor: from ~1 at the start to ~1e-4 at convergence (noise-free)
    assert np.all(solved["errors"][:, -1] < 1e-2) and np.all(solved["errors"][:, 0] < 2)


def test_scale_invariance(data):
    # ER is contractive, so rounding differences between scales stay small
    a = reconstruct(data["intensity"][:2], device="cpu", algorithm="er", iterations=60)
    b = reconstruct(data["intensity"][:2] * 1e4, device="cpu", algorithm="er", iterations=60)
    np.testing.assert_allclose(a["amplitude"], b["amplitude"], atol=1e-3)
    np.testing.assert_allclose(a["chi2"], b["chi2"], rtol=1e-2, atol=1e-6)


def test_single_frame_gives_2d_results(data):
    r = reconstruct(data["intensity"][0], device="cpu", iterations=40)
    assert r["object"].shape == (64, 64) and r["chi2"].shape == () and r["errors"].ndim == 1


def test_starting_from_the_truth_with_a_fixed_support_stays_there(data):
    truth = physics.pad(data["amplitude"] * np.exp(1j * data["phase"]), 2).astype(np.complex64)
    sup = physics.pad(data["amplitude"] > 0, 2)
    r = reconstruct(data["intensity"], device="cpu", iterations=20, init=truth, support=sup, fixed_support=True)
    assert (r["chi2"] < 1e-6).all()
    s = _scores(r, data)
    assert (s["phase_rms"] < 1e-2).all() and (s["iou"] > 0.99).all()


# --------------------------------------------------------------------------- mask
def test_masked_pixels_do_not_pull_the_solution():
    d = simulate(3, size=SIZE, seed=4, oversampling=2, beamstop=2.5)
    mask = d["mask"]
    clean = reconstruct(d["intensity"], device="cpu", mask=mask, iterations=200, seed=3)
    garbage = d["intensity"].copy()
    rng = np.random.default_rng(0)
    garbage[:, mask] = rng.uniform(0, 10, size=(3, mask.sum())) * d["intensity"].max()
    dirty = reconstruct(garbage, device="cpu", mask=mask, iterations=200, seed=3)
    np.testing.assert_array_equal(clean["object"], dirty["object"])
    np.testing.assert_array_equal(clean["chi2"], dirty["chi2"])
    # without the mask the garbage does pull the solution
    unmasked = reconstruct(garbage, device="cpu", iterations=200, seed=3)
    assert not np.allclose(unmasked["object"], clean["object"], atol=1e-3)
    # and on the measured pixels the masked run fits the data
    assert np.median(clean["chi2"]) < 1e-2


# --------------------------------------------------------------------------- batches
def test_batches_equal_one_at_a_time(data):
    whole = reconstruct(data["intensity"], device="cpu", iterations=100, batch_size=4, seed=7)
    small = reconstruct(data["intensity"], device="cpu", iterations=100, batch_size=3, seed=7)
    ones = [reconstruct(data["intensity"][i], device="cpu", iterations=100, seed=7, first_frame=i) for i in range(4)]
    for i in range(4):
        np.testing.assert_allclose(whole["object"][i], ones[i]["object"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(whole["object"][i], small["object"][i], rtol=1e-5, atol=1e-6)


def test_worker_threads_give_the_same_results(data):
    one = reconstruct(data["intensity"], device="cpu", iterations=80, batch_size=1, seed=5)
    two = reconstruct(data["intensity"], device="cpu", iterations=80, batch_size=1, seed=5, threads=2)
    np.testing.assert_allclose(one["object"], two["object"], rtol=1e-5, atol=1e-6)
    assert torch.get_num_threads() == 1  # restored (the module fixture set 1)


def test_worker_threads_stop_and_keep_a_prefix(data):
    r = reconstruct(data["intensity"], device="cpu", iterations=620, block=10, batch_size=1, threads=2,
                    should_stop=lambda: True, on_stop="return")
    assert r["stopped"] is True and 1 <= len(r["chi2"]) <= 2


# --------------------------------------------------------------------------- progress and stop
def test_progress_is_called_every_block(data):
    calls = []
    reconstruct(data["intensity"][:2], device="cpu", iterations=60, block=20, batch_size=1, n_starts=1,
                progress=lambda done, total: calls.append((done, total)))
    assert calls == [(20, 120), (40, 120), (60, 120), (80, 120), (100, 120), (120, 120)]


def test_cancellation_raises_within_one_block(data):
    stop = threading.Event()
    seen = []

    def progress(done, total):
        seen.append(done)
        stop.set()

    with pytest.raises(Cancelled) as info:
        reconstruct(data["intensity"], device="cpu", iterations=620, block=10, progress=progress, should_stop=stop)
    assert info.value.iterations == 10 and seen == [10]


def test_cancellation_can_return_partial_results(data):
    r = reconstruct(data["intensity"], device="cpu", iterations=620, block=10, batch_size=2,
                    should_stop=lambda: True, on_stop="return")
    assert r["stopped"] is True
    assert r["object"].shape == (2, 64, 64) and r["chi2"].shape == (2,)


def test_cuda_request_without_cuda(data):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA was requested but no CUDA device is available"):
        reconstruct(data["intensity"], device="cuda")


@pytest.mark.parametrize("shape", [(3, 63, 63), (2, 64, 32)])
def test_bad_pattern_shapes(shape):
    with pytest.raises(ValueError, match="square with an even size"):
        reconstruct(np.ones(shape, np.float32), device="cpu")


# --------------------------------------------------------------------------- CLI
def test_cli_reconstruct_writes_results(tmp_path, data):
    src = tmp_path / "in.npz"
    np.savez(src, intensity=data["intensity"][:2])
    out = tmp_path / "out.npz"
    assert main([
        "reconstruct", str(src), "-o", str(out), "--iterations", "60", "--device", "cpu", "--seed", "1",
    ]) == 0
    with np.load(out) as f:
        assert {"amplitude", "phase", "chi2", "support"} <= set(f.files)
        assert f["amplitude"].shape == (2, 64, 64) and f["amplitude"].dtype == np.float32
        assert f["phase"].dtype == np.float32 and f["chi2"].shape == (2,)
        np.testing.assert_allclose(f["amplitude"].max(axis=(1, 2)), 1.0, rtol=1e-6)


def test_cli_reconstruct_shrinkwrap_options(tmp_path, data, capsys):
    src = tmp_path / "in.npz"
    np.savez(src, intensity=data["intensity"][:1])
    out = tmp_path / "out.npz"
    argv = ["reconstruct", str(src), "-o", str(out), "--iterations", "40", "--device", "cpu"]
    assert main([*argv, "--beta", "0.7", "--threshold", "0.2", "--sigma", "2,0.5"]) == 0
    want = reconstruct(data["intensity"][:1], iterations=40, device="cpu", beta=0.7, threshold=0.2, sigma=(2, 0.5))
    with np.load(out) as f:
        np.testing.assert_allclose(f["chi2"], want["chi2"], rtol=1e-4)
    # post-processing: the same result, centred, without its phase ramp, unwrapped
    assert main([*argv, "--beta", "0.7", "--threshold", "0.2", "--sigma", "2,0.5", "--post", "centre,ramp,unwrap",
                 "-o", str(tmp_path / "post.npz")]) == 0
    from napari_cdinn.postprocess import apply_steps

    amp, pha, sup = apply_steps(want["amplitude"], want["phase"], ("centre", "ramp", "unwrap"), support=want["support"])
    with np.load(tmp_path / "post.npz") as f:
        np.testing.assert_allclose(f["phase"], pha, atol=1e-3)
        np.testing.assert_array_equal(f["support"], sup)
    capsys.readouterr()
    for bad in (["--beta", "2.5"], ["--threshold", "0"], ["--sigma", "x"], ["--post", "smooth"]):
        assert main([*argv, *bad]) == 2
        assert capsys.readouterr().err.startswith("error: ")


def test_cli_reconstruct_bad_input(tmp_path, capsys):
    src = tmp_path / "odd.npy"
    np.save(src, np.ones((2, 63, 63), np.float32))
    out = tmp_path / "out.npz"
    out.write_bytes(b"keep me")
    assert main(["reconstruct", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert out.read_bytes() == b"keep me"
    assert main(["reconstruct", str(tmp_path / "missing.npz"), "-o", str(out)]) == 2


def test_nan_pixels_are_unmeasured_and_empty_frames_score_one(data):
    inten = data["intensity"][:3].copy()
    mask = np.zeros((64, 64), bool)
    mask[30:34, 30:34] = True
    with_mask = reconstruct(inten, device="cpu", iterations=60, mask=mask)
    inten[:, mask] = np.nan
    inten[2] = 0.0
    r = reconstruct(inten, device="cpu", iterations=60)
    np.testing.assert_array_equal(r["object"][:2], with_mask["object"][:2])
    assert np.isfinite(r["amplitude"]).all() and np.isfinite(r["chi2"]).all()
    assert (r["amplitude"][2] == 0).all() and r["chi2"][2] == 1.0


def test_snapshot_shows_the_running_estimates():
    from napari_cdinn.simulate import simulate

    data = simulate(3, seed=31, oversampling=2)["intensity"]
    seen = []
    res = reconstruct(data, algorithm="hio", iterations=40, average=1, block=10, n_starts=1,
                      snapshot=lambda frames, amp, pha: seen.append((frames.copy(), amp, pha)))
    assert len(seen) == 4  # one per block of 10 iterations
    frames, amp, pha = seen[-1]
    np.testing.assert_array_equal(frames, [0, 1, 2])
    assert amp.shape == pha.shape == (3, 64, 64) and amp.dtype == np.float32
    np.testing.assert_allclose(amp.max(axis=(1, 2)), 1.0, rtol=1e-5)
    assert np.all(np.abs(pha) <= np.pi + 1e-6)
    assert res["amplitude"].shape == (3, 64, 64)


def test_batches_are_balanced_over_the_worker_threads():
    from napari_cdinn.retrieval.api import _batch_count, _split

    assert [len(p) for p in _split(np.arange(10), 32, 2)] == [5, 5]  # a small round uses both workers
    assert [len(p) for p in _split(np.arange(100), 32, 2)] == [25, 25, 25, 25]
    assert [len(p) for p in _split(np.arange(1), 32, 2)] == [1]
    parts = _split(np.arange(77), 16, 3)
    assert len(parts) == _batch_count(77, 16, 3) and np.array_equal(np.concatenate(parts), np.arange(77))
    assert _batch_count(0, 32, 2) == 0


# --------------------------------------------------------------------------- NN-seeded refinement with a fallback
def test_fallback_rule_is_the_protocols_restart_rule():
    from napari_cdinn.pipelines import fallback_frames
    from napari_cdinn.protocol import RESTART_CHI2, RESTART_NOISE

    chi2 = np.array([RESTART_CHI2 / 2, RESTART_CHI2 * 2, 1e-8, np.nan])
    np.testing.assert_array_equal(fallback_frames(chi2), [False, True, False, True])
    # on counts the threshold is taken beyond the noise floor, and grows with it
    noise = np.array([0.0, 0.01, 0.0, 0.0])
    np.testing.assert_array_equal(fallback_frames(chi2 + noise, chi2_noise=noise), [False, False, False, True])
    np.testing.assert_array_equal(fallback_frames(np.array([0.0101]), chi2_noise=np.array([0.01])), [False])
    beyond = 0.01 + 1.01 * RESTART_NOISE * 0.01
    np.testing.assert_array_equal(fallback_frames(np.array([beyond]), chi2_noise=np.array([0.01])), [True])
    assert fallback_frames(chi2, "always").all() and not fallback_frames(chi2, "never").any()
    # a faint frame (chi2_noise above LOW_DOSE_CHI2) with a refined fit keeps it: no protocol to run
    dim = np.array([0.05, 0.05])
    np.testing.assert_array_equal(fallback_frames(np.array([0.2, np.nan]), chi2_noise=dim), [False, True])
    with pytest.raises(ValueError, match="fallback must be one of auto, always, never"):
        fallback_frames(chi2, "sometimes")


def test_refinement_with_fallback_reports_curves_on_one_grid_and_live_frames_of_the_stack():
    """What the retrieval dock shows of ``reconstruct --init nn``: each frame's error curve of the run it kept,
    on the iterations of both runs; live estimates numbered in the stack; a given support over the network's."""
    from napari_cdinn.nn.inference import refine_options
    from napari_cdinn.pipelines import refine_with_fallback
    from napari_cdinn.simulate import simulate

    data = simulate(4, seed=33, oversampling=2)["intensity"]
    seen = []
    res = refine_with_fallback(data, model="model2x", fallback="always", refine=refine_options(0, 30),
                               iterations=40, n_starts=1, block=10, device="cpu",
                               snapshot=lambda frames, amp, pha: seen.append(frames.copy()))
    np.testing.assert_array_equal(res["error_iterations"], np.arange(10, 41, 10))
    assert res["errors"].shape == (4, 4) and res["nn_trusted"].shape == (4,) and res["nn_trusted"].dtype == bool
    kept = res["start"].astype(bool)
    assert np.isnan(res["errors"][kept, 3]).all() and np.isfinite(res["errors"][kept, :3]).all()
    assert np.isfinite(res["errors"][~kept]).all()
    assert all(set(f) <= {0, 1, 2, 3} for f in seen) and {0, 1, 2, 3} <= set(np.concatenate(seen))
    # the refinement only: its own grid
    only = refine_with_fallback(data[:1], model="model2x", fallback="never", refine=refine_options(0, 20))
    np.testing.assert_array_equal(only["error_iterations"], [10, 20])
    # a support given starts both runs: a box far too small fits nothing
    box = np.zeros((64, 64), bool)
    box[30:34, 30:34] = True
    boxed = refine_with_fallback(data[:2], model="model2x", fallback="never",
                                 refine=dict(refine_options(0, 20), fixed_support=True), support=box)
    assert (boxed["support"].sum(axis=(1, 2)) == box.sum()).all() and (boxed["chi2"] > res["chi2"][:2]).all()


def test_keep_lower_chi2_per_frame():
    from napari_cdinn.pipelines import keep_lower_chi2

    refined = {"chi2": np.array([0.1, 0.2, 0.3, np.nan], np.float32), "phase": np.zeros((4, 2, 2), np.float32)}
    protocol = {"chi2": np.array([0.3, 0.1, 0.5], np.float32), "phase": np.ones((3, 2, 2), np.float32)}
    out = keep_lower_chi2(refined, protocol, [1, 2, 3])
    np.testing.assert_array_equal(out["chi2"], np.float32([0.1, 0.2, 0.1, 0.5]))
    np.testing.assert_array_equal(out["start"], [1, 1, 0, 0])
    assert out["start"].dtype == np.uint8
    np.testing.assert_array_equal(out["phase"][:, 0, 0], [0, 0, 1, 1])
    assert np.isnan(refined["chi2"][3])  # inputs untouched
    np.testing.assert_array_equal(keep_lower_chi2(refined, None, [])["start"], 1)
    # on faint frames a lower misfit is no evidence: the protocol replaces only a refinement without chi^2
    noise = np.float32([0.0, 0.05, 0.05, 0.05])
    out = keep_lower_chi2(refined, protocol, [1, 2, 3], chi2_noise=noise)
    np.testing.assert_array_equal(out["start"], [1, 1, 1, 0])


def test_frame_ids_give_the_starts_of_the_whole_stack(data):
    whole = reconstruct(data["intensity"], device="cpu", algorithm="hio", iterations=10, average=1, first_frame=5)
    picked = reconstruct(data["intensity"][[3, 1]], device="cpu", algorithm="hio", iterations=10, average=1,
                         frame_ids=[8, 6])
    np.testing.assert_allclose(picked["object"], whole["object"][[3, 1]], atol=1e-5)


def test_reconstruct_chunk_passes_the_mask_and_records_random_starts(data):
    from napari_cdinn.retrieval import reconstruct_chunk

    inten = data["intensity"][:2].copy()
    mask = np.zeros((64, 64), bool)
    mask[28:36, 28:36] = True
    opts = {"device": "cpu", "algorithm": "hio", "iterations": 20, "average": 1}
    clean = reconstruct_chunk(inten, mask=mask, **opts)
    inten[:, mask] = 1e6  # garbage on unmeasured pixels changes nothing
    np.testing.assert_array_equal(reconstruct_chunk(inten, mask=mask, **opts)["amplitude"], clean["amplitude"])
    assert clean["start"].dtype == np.uint8 and (clean["start"] == 0).all()


# --------------------------------------------------------------------------- PRTF
def test_prtf_of_converged_starts_is_near_one_and_the_kept_result_is_unchanged(data):
    r = reconstruct(data["intensity"][:2], device="cpu", n_starts=3, prtf=True, seed=1)
    assert r["prtf"].shape == (2, 32) and r["prtf"].dtype == np.float32
    assert r["resolution"].shape == (2,) and r["resolution"].dtype == np.float32
    np.testing.assert_allclose(r["prtf_q"], (np.arange(32) + 0.5) / 64)
    assert not np.isnan(r["start_chi2"]).any() and (r["chi2"] < 1e-3).all()  # every start ran, all converged
    # noise-free patterns, converged starts: every start agrees on the low frequencies
    assert (r["prtf"][:, :8] > 0.95).all() and np.nanmax(r["prtf"]) <= 1 + 1e-5
    assert not (r["resolution"] < 0.25).any()
    # the result is the best start, as without the PRTF when every pattern gets every start
    plain = reconstruct(data["intensity"][:2], device="cpu", n_starts=3, retry_chi2=None, seed=1)
    np.testing.assert_array_equal(r["chi2"], plain["chi2"])
    np.testing.assert_array_equal(r["object"], plain["object"])
    assert "prtf" not in plain


def test_prtf_of_random_starts_is_low(data):
    # one ER iteration from random phases: the starts disagree on everything but the lowest frequencies
    r = reconstruct(data["intensity"][:2], device="cpu", algorithm="er", iterations=1, average=0, n_starts=4,
                    prtf=True)
    assert (np.nanmean(r["prtf"][:, 8:], axis=1) < 0.65).all() and (r["prtf"][:, 0] > 0.7).all()


def test_prtf_leaves_unmeasured_pixels_out_and_needs_two_starts(data):
    inten = data["intensity"][:2].copy()
    mask = np.zeros((64, 64), bool)
    mask[30:34, 30:34] = True
    opts = {"device": "cpu", "algorithm": "er", "iterations": 20, "average": 5, "n_starts": 2, "prtf": True}
    masked = reconstruct(inten, mask=mask, **opts)
    inten[:, mask] = np.nan  # NaN pixels are unmeasured: the same runs and the same PRTF
    nan = reconstruct(inten, **opts)
    np.testing.assert_array_equal(nan["prtf"], masked["prtf"])
    assert np.isnan(masked["prtf"][:, 0]).all() and np.isfinite(masked["prtf"][:, 4:]).all()
    one = reconstruct(inten[0], **opts)
    assert one["prtf"].shape == (32,) and one["resolution"].shape == () and one["prtf_q"].shape == (32,)
    with pytest.raises(ValueError, match="n_starts >= 2"):
        reconstruct(inten, **dict(opts, n_starts=1))


def test_reconstruct_chunk_passes_the_prtf_through(data):
    from napari_cdinn.pipelines import reconstruct_chunk as pipeline_chunk
    from napari_cdinn.retrieval import reconstruct_chunk

    opts = {"device": "cpu", "algorithm": "er", "iterations": 10, "average": 1, "n_starts": 2, "prtf": True}
    res = reconstruct_chunk(data["intensity"][:2], first_frame=3, **opts)
    assert res["prtf"].shape == (2, 32) and res["resolution"].shape == (2,) and "prtf_q" not in res
    want = reconstruct(data["intensity"][:2], first_frame=3, **opts)
    np.testing.assert_array_equal(res["prtf"], want["prtf"])
    np.testing.assert_array_equal(pipeline_chunk(data["intensity"][:2], first_frame=3, **opts)["prtf"], want["prtf"])
    assert "prtf" not in reconstruct_chunk(data["intensity"][:2], **dict(opts, prtf=False, n_starts=1))


def test_all_zero_frames_of_init_and_support_start_from_random_phases():
    """A frame without a starting object (all zero) gets random phases and the autocorrelation's support."""
    from napari_cdinn.simulate import simulate as _simulate

    data = _simulate(2, seed=31, oversampling=2)
    init = np.zeros((2, 64, 64), np.complex64)
    support = np.zeros((2, 64, 64), bool)
    with_zero = reconstruct(data["intensity"], init=init, support=support, iterations=100, average=10, device="cpu")
    plain = reconstruct(data["intensity"], iterations=100, average=10, device="cpu")
    np.testing.assert_allclose(with_zero["chi2"], plain["chi2"], rtol=1e-4)
    assert (with_zero["chi2"] < 1e-2).all()
