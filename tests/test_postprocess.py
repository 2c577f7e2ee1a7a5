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
