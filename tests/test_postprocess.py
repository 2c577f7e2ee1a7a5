"""Post-processing: phase-ramp removal, unwrapping, centring and the PRTF (pure NumPy)."""

import numpy as np
import pytest

from napari_cdinn import physics
from napari_cdinn.postprocess import (
    apply_steps,
    centre_object,
    prtf,
    prtf_resolution,
    remove_phase_ramp,
    unwrap_phase,
)
from napari_cdinn.simulate import simulate

SIM = simulate(2, size=16, seed=7)
OBJ = physics.pad(SIM["amplitude"] * np.exp(1j * SIM["phase"]), 2)  # (2, 32, 32), centred
YY, XX = np.mgrid[0:32, 0:32] - 16


def test_phase_ramp_is_removed_whatever_ramp_was_added():
    ramped = OBJ * np.exp(1j * (0.4 * XX - 0.25 * YY))
    a, b = remove_phase_ramp(OBJ), remove_phase_ramp(ramped)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert remove_phase_ramp(OBJ[0]).shape == (32, 32)


def test_unwrap_recovers_a_steep_smooth_phase():
    disc = np.hypot(YY, XX) < 12
    true = 0.6 * XX + 0.02 * YY**2  # spans far more than 2 pi
    got = unwrap_phase(np.angle(np.exp(1j * true)), support=disc)
    offset = np.mean((got - true)[disc])
    np.testing.assert_allclose(np.round(offset / (2 * np.pi)) * 2 * np.pi, offset, atol=1e-6)
    np.testing.assert_allclose((got - true)[disc], offset, atol=1e-5)
    assert np.all(got[~disc] == 0)


def test_centring_is_undone_rolls():
    rolled = np.roll(OBJ, (5, -7), axis=(1, 2))
    a, shifts_a = centre_object(OBJ)
    b, shifts_b = centre_object(rolled)
    np.testing.assert_allclose(a, b)
    np.testing.assert_array_equal(shifts_b - shifts_a, [[-5, 7], [-5, 7]])


def test_prtf_is_one_for_equivalent_runs_and_falls_for_noisy_ones():
    truth = OBJ[0]
    runs = np.stack([truth, np.exp(0.7j) * physics.twin(np.roll(truth, (2, 1), axis=(0, 1))), truth])
    q, values = prtf(runs, physics.intensity(truth))
    assert q.shape == values.shape == (16,) and q[0] > 0 and q[-1] < 0.5
    np.testing.assert_allclose(values[np.isfinite(values)], 1.0, atol=1e-6)
    assert np.isnan(prtf_resolution(q, values))
    rng = np.random.default_rng(0)
    noisy = np.stack([truth + 0.3 * (rng.normal(size=truth.shape) + 1j * rng.normal(size=truth.shape))
                      * (np.abs(truth) > 0) for _ in range(6)])
    q, values = prtf(noisy)
    assert values[0] > 0.9 and values[-2] < values[0]
    assert 0 < prtf_resolution(q, values, level=0.99) <= 0.5
    with pytest.raises(ValueError):
        prtf(truth[None])


def test_apply_steps():
    amp, pha = np.abs(OBJ), np.angle(OBJ * np.exp(1j * 0.5 * XX))
    a, p, s = apply_steps(amp, pha, ("centre", "ramp", "unwrap"))
    assert s.dtype == bool and s.shape == a.shape
    assert a.dtype == p.dtype == np.float32 and a.shape == p.shape == (2, 32, 32)
    want = remove_phase_ramp(centre_object(OBJ)[0])
    sup = physics.support_from_amplitude(np.abs(want))
    np.testing.assert_allclose(np.where(sup, np.angle(np.exp(1j * p) * np.conj(want / np.abs(np.where(
        sup, want, 1)))), 0), 0, atol=1e-4)
    with pytest.raises(ValueError, match="unknown post-processing"):
        apply_steps(amp, pha, ("smooth",))
    for got, want in zip(apply_steps(amp, pha, "centre, ramp,unwrap"), (a, p, s), strict=True):  # as --post
        np.testing.assert_array_equal(got, want)


def test_prtf_leaves_unmeasured_pixels_out():
    truth = OBJ[0]
    rng = np.random.default_rng(1)
    runs = np.stack([truth + 0.2 * rng.normal(size=truth.shape) * (np.abs(truth) > 0) for _ in range(3)])
    measured = physics.intensity(truth)
    mask = np.zeros(measured.shape, bool)
    mask[12:20, 12:20] = True  # a beamstop
    garbage = np.where(mask, 1e6, measured)
    q, clean = prtf(runs, measured, mask=mask)
    _, dirty = prtf(runs, garbage, mask=mask)
    np.testing.assert_allclose(dirty, clean)  # whatever lies under the mask does not matter
    _, nan = prtf(runs, np.where(mask, np.nan, measured))  # NaN pixels are unmeasured too
    np.testing.assert_allclose(nan, clean)
    assert np.isnan(clean[0])  # the shells under the beamstop are empty
    assert not np.allclose(prtf(runs, garbage)[1], clean, equal_nan=True)


def test_prtf_is_at_most_one_and_low_for_random_runs():
    rng = np.random.default_rng(2)
    support = np.zeros((32, 32), bool)
    support[8:24, 8:24] = True
    measured = physics.intensity(OBJ[0])
    for k in (4, 8):
        runs = (rng.normal(size=(k, 32, 32)) + 1j * rng.normal(size=(k, 32, 32))) * support
        q, values = prtf(runs, measured)  # runs that disagree, with far more high-q power than measured
        assert np.nanmax(values) <= 1 + 1e-9
        np.testing.assert_allclose(np.nanmean(values[4:]), 1 / np.sqrt(k), rtol=0.2)
    assert prtf_resolution(q, values) < 0.1  # 8 random runs: below 1/e almost at once


def test_prtf_sums_equal_prtf_frame_by_frame():
    from napari_cdinn.postprocess import PrtfSums, prtf_frequencies

    rng = np.random.default_rng(3)
    runs = OBJ[None] * np.exp(0.3j * rng.normal(size=(3,) + OBJ.shape))  # 3 runs of 2 frames
    measured = physics.intensity(OBJ) * 1e3
    sums = PrtfSums(2, (32, 32))
    for k in range(3):
        sums.add(runs[k] if k < 2 else runs[k][:1], frames=None if k < 2 else [0])
    q, values = sums.values(measured)
    np.testing.assert_array_equal(q, prtf_frequencies(32))
    np.testing.assert_allclose(values[0], prtf(runs[:, 0], measured[0])[1], rtol=1e-5)
    np.testing.assert_allclose(values[1], prtf(runs[:2, 1], measured[1])[1], rtol=1e-5)
    np.testing.assert_array_equal(sums.values(measured[1:], frames=[1])[1][0], values[1])
    one = PrtfSums(1, (32, 32))
    one.add(runs[0][:1])
    assert np.isnan(one.values(measured[:1])[1]).all()  # one run: no PRTF


def test_resolution_per_frame_and_its_median():
    from napari_cdinn.postprocess import describe_resolution, median_resolution

    q = np.array([0.1, 0.2, 0.3, 0.4])
    values = np.array([[1.0, 0.9, 0.3, 0.2], [1.0, np.nan, 0.2, 0.1], [1.0, 0.9, 0.8, 0.7], [np.nan] * 4])
    res = prtf_resolution(q, values)
    np.testing.assert_array_equal(res, [0.3, 0.3, np.nan, np.nan])
    assert prtf_resolution(q, values[0]) == 0.3
    assert median_resolution(values, res) == 0.3  # the frame without a PRTF is left out
    assert median_resolution(values[2:3], res[2:3]) == np.inf
    assert median_resolution(values[1:3], res[1:3]) == 0.3  # of two frames, the lower: never an average with inf
    assert np.isnan(median_resolution(values[3:], res[3:]))
    assert describe_resolution(0.25) == "0.25 cycles/pixel (half-period 2 pixels)"
    assert "beyond 0.5" in describe_resolution(np.inf) and "no PRTF" in describe_resolution(np.nan)
