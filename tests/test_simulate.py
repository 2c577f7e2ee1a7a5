"""Properties of the paper-recipe simulator and of `cdinn simulate`."""

import numpy as np
import pytest
from scipy.spatial import ConvexHull, Delaunay

from napari_cdinn import physics
from napari_cdinn.cli import main
from napari_cdinn.simulate import BLOCK, _fill_convex, _hull_vertices, simulate


@pytest.fixture(scope="module")
def data():
    return simulate(300, size=32, seed=5)


def test_shapes_and_dtypes(data):
    assert data["intensity"].shape == (300, 32, 32)
    assert data["amplitude"].shape == data["phase"].shape == (300, 32, 32)
    for k in ("intensity", "amplitude", "phase"):
        assert data[k].dtype == np.float32


def test_amplitude_is_a_blurred_binary_shape(data):
    a = data["amplitude"]
    assert a.min() >= 0 and np.allclose(a.max(axis=(1, 2)), 1.0)
    # the 1-pixel Gaussian edge gives intermediate values, but most pixels are 0 or ~1
    frac_mid = ((a > 0.05) & (a < 0.95)).mean()
    assert 0.01 < frac_mid < 0.3
    # the object stays clear of the frame edge (no wrap-around in the FFT)
    assert a[:, 0, :].max() < 0.1 and a[:, :, -1].max() < 0.1


def test_phase_zero_outside_object(data):
    outside = data["amplitude"] <= physics.SHAPE_THRESHOLD
    assert np.all(data["phase"][outside] == 0)


def test_phase_span_within_and_reaching_two_pi(data):
    sup = data["amplitude"] > physics.SHAPE_THRESHOLD
    spans = np.array([p[m].max() - p[m].min() for p, m in zip(data["phase"], sup)])
    assert np.all(spans <= 2 * np.pi + 1e-5)
    assert np.all(np.abs(data["phase"]) <= np.pi + 1e-6)
    assert spans.max() > 0.98 * 2 * np.pi  # over a set, the full -pi..pi range is reached
    assert spans.min() < 0.3 * 2 * np.pi  # and small spans occur too


def test_intensity_is_centred_fft_of_object(data):
    obj = data["amplitude"] * np.exp(1j * data["phase"])
    expected = np.abs(np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(obj, axes=(1, 2))), axes=(1, 2))) ** 2
    np.testing.assert_allclose(data["intensity"], expected, rtol=1e-3, atol=1e-4 * expected.max())


def test_deterministic_and_prefix_consistent():
    a = simulate(BLOCK + 10, seed=3)
    b = simulate(BLOCK + 10, seed=3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    c = simulate(20, seed=3)
    np.testing.assert_array_equal(c["amplitude"], a["amplitude"][:20])
    np.testing.assert_array_equal(c["phase"], a["phase"][:20])
    d = simulate(20, seed=4)
    assert not np.array_equal(d["amplitude"], c["amplitude"])


def test_oversampled_pattern_decimates_to_plain_one():
    small = simulate(10, seed=8)
    big = simulate(10, seed=8, oversampling=2)
    assert big["intensity"].shape == (10, 64, 64)
    np.testing.assert_array_equal(big["amplitude"], small["amplitude"])
    np.testing.assert_allclose(
        physics.decimate(big["intensity"], 2), small["intensity"], rtol=1e-4, atol=1e-5 * small["intensity"].max()
    )


def test_poisson_noise_and_beamstop():
    d = simulate(50, seed=2, oversampling=2, photons=1e4, beamstop=3)
    i = d["intensity"]
    assert np.all(i == np.round(i)) and i.min() >= 0
    totals = i.sum(axis=(1, 2))
    assert 0.5e4 < np.median(totals) < 1e4 * 1.05  # the beamstop removes the brightest photons
    m = d["mask"]
    assert m.shape == (64, 64) and m[32, 32] and not m[0, 0]
    assert np.all(i[:, m] == 0)
    clean = simulate(50, seed=2, oversampling=2)
    assert np.median(physics.chi2(clean["intensity"], i, mask=m)) < 0.2


def test_hull_fill_matches_scipy():
    rng = np.random.default_rng(0)
    pts = rng.uniform(2, 29, size=(40, 9, 2))
    masks = _fill_convex(_hull_vertices(pts), 32)
    yy, xx = np.mgrid[0:32, 0:32]
    grid = np.stack([xx.ravel(), yy.ravel()], 1)
    for p, m in zip(pts, masks):
        hull = Delaunay(p[ConvexHull(p).vertices])
        inside = (hull.find_simplex(grid, tol=1e-9) >= 0).reshape(32, 32)
        assert (inside != m).sum() <= 1  # at most one pixel exactly on an edge may differ


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        simulate(0)
    with pytest.raises(ValueError):
        simulate(3, photons=-1)


def test_cli_simulate(tmp_path, capsys):
    out = tmp_path / "sim.npz"
    assert main(["simulate", "--count", "7", "--size", "32", "--seed", "1", "--oversampling", "2", "--out", str(out)]) == 0
    with np.load(out) as f:
        assert f["intensity"].shape == (7, 64, 64)
        assert f["amplitude"].shape == f["phase"].shape == (7, 32, 32)
        assert f["intensity"].dtype == np.float32
        ref = simulate(7, seed=1, oversampling=2)
        np.testing.assert_array_equal(f["intensity"], ref["intensity"])


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "--count", "0", "--out", "X.npz"],
        ["simulate", "--count", "five", "--out", "X.npz"],
        ["simulate", "--count", "3", "--photons", "-5", "--out", "X.npz"],
        ["simulate", "--count", "3", "--size", "4", "--out", "X.npz"],
        ["simulate", "--count", "3", "--out", "X.txt"],
        ["simulate", "--count", "3"],
        ["simulate", "--count", "3", "--out", "no/such/folder/X.npz"],
    ],
)
def test_cli_simulate_bad_arguments(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    existing = tmp_path / "X.npz"
    existing.write_bytes(b"keep me")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert existing.read_bytes() == b"keep me"


def test_specialisation_presets_shift_the_realistic_mixture_towards_the_paper_set():
    from dataclasses import replace

    from napari_cdinn.simulate import DETECTORS, MIXTURES, draw_detector, simulate_objects

    assert DETECTORS["realistic-clean"] == replace(DETECTORS["realistic"], clean=0.4)
    clean = np.isinf(draw_detector(DETECTORS["realistic-clean"], 4096, seed=5)["photons"]).mean()
    assert 0.37 < clean < 0.43
    weights = MIXTURES["realistic-paper"]
    assert sum(weights.values()) == pytest.approx(1.0) and weights["paper"] > MIXTURES["realistic"]["paper"]
    amp, _ = simulate_objects(8, 32, 1, families="realistic-paper")
    assert amp.shape == (8, 32, 32)
