"""Dock widgets: each opens from the plugin API and, run on a small stack, adds or updates layers."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from napari_cdinn._napari import layers as _layers
from napari_cdinn.nn import TRUST_CHI2
from napari_cdinn.simulate import simulate

pytest.importorskip("pytestqt")

SIM = simulate(6, size=16, seed=3, oversampling=2)


def _viewer_with_stack(make_napari_viewer, truth=True):
    viewer = make_napari_viewer()
    offset = (0.0, 8.0, 8.0)
    tuples = [_layers.intensity_tuple(SIM["intensity"], "patterns")]
    if truth:
        tuples = [_layers.amplitude_tuple(SIM["amplitude"].copy(), "amp", translate=offset),
                  _layers.phase_tuple(SIM["phase"].copy(), "pha", translate=offset)] + tuples
    for data, kwargs, _ in tuples:
        viewer.add_image(data, **kwargs)
    return viewer


def test_quality_view(make_napari_viewer):
    viewer = _viewer_with_stack(make_napari_viewer)
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-cdinn", "Quality view")
    widget.amplitude.value = viewer.layers["amp"]
    widget.phase.value = viewer.layers["pha"]
    widget.measured.value = viewer.layers["patterns"]
    # a worse result in frame 2: its chi^2 must rank last
    viewer.layers["pha"].data[2] = 0.0
    chi2 = widget.update()
    assert chi2.shape == (6,) and np.argmax(chi2) == 2 and np.all(np.delete(chi2, 2) < 1e-4)
    assert widget.plot.axes.patches  # the histogram is drawn
    widget.worst_button.clicked.emit()
    assert viewer.dims.current_step[0] == 2
    widget.best_button.clicked.emit()
    assert viewer.dims.current_step[0] == int(np.argmin(chi2))
    # the twin has the same pattern: flipping leaves chi^2 unchanged; flipping twice restores
    viewer.dims.set_current_step(0, 4)
    before = viewer.layers["amp"].data[4].copy()
    widget.twin_button.clicked.emit()
    assert not np.allclose(viewer.layers["amp"].data[4], before)
    assert viewer.layers["amp"].metadata["cdinn_twin"][4]
    widget.measured.value = viewer.layers["patterns"]
    np.testing.assert_allclose(widget.update(), chi2, atol=1e-4)  # edge pixels wrap in the small frame
    widget.twin_button.clicked.emit()
    np.testing.assert_allclose(viewer.layers["amp"].data[4], before, atol=1e-7)


def test_quality_view_ranks_by_the_misfit_beyond_the_noise_and_leaves_the_mask_out(make_napari_viewer):
    """Counts at 1e6 photons, one frame at 100 (its chi^2 is its noise), a beamstop (zero, masked)."""
    from napari_cdinn import physics

    viewer = _viewer_with_stack(make_napari_viewer)
    photons = np.array([1e6, 1e6, 1e6, 1e6, 1e6, 1e2])
    clean = SIM["intensity"] / SIM["intensity"].sum(axis=(1, 2), keepdims=True) * photons[:, None, None]
    counts = np.random.default_rng(0).poisson(clean).astype(np.float32)
    stop = np.zeros(counts.shape[-2:], bool)
    stop[15:18, 15:18] = True
    counts[:, stop] = 0
    viewer.add_image(counts, name="counts")
    viewer.add_labels(stop.astype(np.uint8), name="beamstop")
    viewer.layers["pha"].data[2] *= -1.5  # a wrong phase: the worst fit
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-cdinn", "Quality view")
    widget.amplitude.value, widget.phase.value = viewer.layers["amp"], viewer.layers["pha"]
    widget.measured.value, widget.mask.value = viewer.layers["counts"], None
    unmasked = widget.update()
    widget.mask.value = viewer.layers["beamstop"]
    chi2 = widget.update()
    noise = physics.noise_chi2(np.where(stop, 0, counts), np.broadcast_to(stop, counts.shape))
    np.testing.assert_allclose(widget.noise, noise, rtol=1e-6)
    assert noise[5] > 100 * noise[0] and chi2[5] > 10 * chi2[0]  # the faint frame's chi^2 is mostly noise
    assert np.all((unmasked > 10 * chi2)[[0, 1, 3, 4]])  # unmasked, the zeroed beamstop counts as misfit
    assert widget.order[-1] == 2 and widget.order[-2] != 5  # ranked beyond the noise: the faint frame is fine
    assert "counting noise" in widget.summary.value and "(noise " in widget._frame_choices()[0][0]
    assert widget.plot.axes.get_xlabel() == "chi² beyond the counting noise"
    assert np.array_equal(viewer.layers["amp"].metadata["chi2_noise"], widget.noise)


def test_quality_view_best_after_update_and_a_new_layer(make_napari_viewer):
    viewer = _viewer_with_stack(make_napari_viewer)
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-cdinn", "Quality view")
    widget.amplitude.value, widget.phase.value = viewer.layers["amp"], viewer.layers["pha"]
    widget.measured.value = viewer.layers["patterns"]
    viewer.layers["pha"].data[1] = 0.0
    widget.update_button.clicked.emit()
    best = int(np.argmin(widget.chi2))
    viewer.dims.set_current_step(0, 1 if best != 1 else 2)
    widget.best_button.clicked.emit()  # the list already shows the best frame: it must jump all the same
    assert viewer.dims.current_step[0] == best
    viewer.add_image(np.zeros((6, 16, 16), np.float32), name="another")  # the frame list survives
    assert len(widget.frames.choices) == 6
    widget.worst_button.clicked.emit()
    assert viewer.dims.current_step[0] == 1
    # the twin toggle acts on the result selected in the layer list, and shows it
    viewer.add_image(SIM["amplitude"].copy(), name="other amplitude", metadata={"cdinn_kind": "amplitude"})
    viewer.add_image(SIM["phase"].copy(), name="other phase", metadata={"cdinn_kind": "phase"})
    viewer.layers["other amplitude"].visible = False
    viewer.layers.selection.active = viewer.layers["other amplitude"]
    assert widget.amplitude.value is viewer.layers["other amplitude"]
    assert widget.phase.value is viewer.layers["other phase"]
    before = viewer.layers["other amplitude"].data[1].copy()
    widget.twin_button.clicked.emit()
    assert not np.allclose(viewer.layers["other amplitude"].data[1], before)
    assert viewer.layers["other amplitude"].visible and "other amplitude" in widget.summary.value


def test_quality_view_error_is_a_notification(make_napari_viewer, monkeypatch):
    viewer = _viewer_with_stack(make_napari_viewer)
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-cdinn", "Quality view")
    errors = []
    monkeypatch.setattr("napari_cdinn._napari.widgets._common.show_error", errors.append)
    widget.amplitude.value = viewer.layers["amp"]
    widget.phase.value = viewer.layers["pha"]
    widget.measured.value = None
    assert widget.update() is None
    assert len(errors) == 1 and "measured pattern layer" in errors[0]


def test_quality_view_leaves_out_colours_and_frames_not_reconstructed(make_napari_viewer):
    viewer = _viewer_with_stack(make_napari_viewer)
    viewer.add_image(np.random.default_rng(0).random((32, 32, 3)), rgb=True, name="colours")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-cdinn", "Quality view")
    offered = {layer.name for choices in (widget.amplitude.choices, widget.phase.choices, widget.measured.choices)
               for layer in choices if layer is not None}
    assert "colours" not in offered and "amp" in offered
    widget.amplitude.value, widget.phase.value, widget.measured.value = viewer.layers["amp"], viewer.layers["pha"], None
    chi2 = np.linspace(0.1, 0.6, 6)
    chi2[[1, 4]] = np.nan  # a stopped retrieval: frames 1 and 4 were not reached
    viewer.layers["amp"].metadata["chi2"] = chi2
    widget.update_button.clicked.emit()
    assert "(2 not reconstructed, left out)" in widget.summary.value and "nan" not in widget.summary.value
    assert list(widget.frames.choices) == [0, 2, 3, 5]


def _dock(viewer, name):
    _dock_widget, widget = viewer.window.add_plugin_dock_widget("napari-cdinn", name)
    return widget


def test_phase_retrieval_adds_layers_live(make_napari_viewer, qtbot):
    viewer = _viewer_with_stack(make_napari_viewer, truth=False)
    widget = _dock(viewer, "Phase retrieval")
    widget.patterns.value = viewer.layers["patterns"]
    widget.algorithm.value = "er"
    widget.iterations.value = 40
    widget.block_frames.value = 4  # two blocks: layers appear after the first
    widget.device.value = "cpu"
    widget.controls.run_button.clicked.emit()
    assert widget.runner.running  # the UI is not blocked while it runs
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60_000)
    amp = viewer.layers["patterns PR amplitude"]
    assert amp.data.shape == (6, 32, 32) and viewer.layers["patterns PR phase"].metadata["cdinn_kind"] == "phase"
    chi2 = amp.metadata["chi2"]
    assert chi2.shape == (6,) and np.all(np.isfinite(chi2)) and np.all(chi2 < 0.5)
    assert widget.plot.axes.lines and "6 pattern(s)" in widget.controls.status.value
    # readable plots: a normalised error on a log axis, chi^2 per frame; the support as Labels
    errors = widget.plot.axes.lines[0].get_ydata()
    assert widget.plot.axes.get_yscale() == "log" and widget.plot.axes.get_xlabel() == "iteration"
    assert 0 < errors[-1] < 1 and errors[-1] < errors[0]
    # chi^2 per frame: blue where it fits the data within the counting noise (the restart rule), else red
    from napari_cdinn.pipelines import fits

    good = fits(chi2, amp.metadata["chi2_noise"])
    dots = {c.get_label(): len(c.get_offsets()) for c in widget.plot.all_axes[1].collections}
    assert dots == {k: v for k, v in (("fits", good.sum()), ("misfits", (~good).sum())) if v}
    misfit = int((~good).sum())
    assert (f"{misfit} misfit the data" if misfit else "all fit the data") in widget.controls.status.value
    support = viewer.layers["patterns PR support"]
    assert support.metadata["cdinn_kind"] == "support" and support.data.shape == (6, 32, 32)
    assert support.data.any() and type(support).__name__ == "Labels"


def test_phase_retrieval_of_one_pattern_gives_2d_results(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    data, kwargs, _ = _layers.intensity_tuple(SIM["intensity"][0], "one")
    viewer.add_image(data, **kwargs)
    widget = _dock(viewer, "Phase retrieval")
    widget.patterns.value = viewer.layers["one"]
    widget.iterations.value, widget.device.value = 20, "cpu"
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60_000)
    for name in ("one PR amplitude", "one PR phase", "one PR support"):
        assert viewer.layers[name].data.shape == (32, 32), name  # no frame slider for one pattern
    assert np.size(viewer.layers["one PR amplitude"].metadata["chi2"]) == 1


def test_phase_retrieval_options_and_a_support_layer(make_napari_viewer, qtbot):
    from napari_cdinn.retrieval import reconstruct

    viewer = _viewer_with_stack(make_napari_viewer, truth=False)
    box = np.zeros((32, 32), np.uint8)
    box[6:26, 6:26] = 1
    viewer.add_labels(box, name="box")
    widget = _dock(viewer, "Phase retrieval")
    widget.patterns.value, widget.support.value = viewer.layers["patterns"], viewer.layers["box"]
    widget.algorithm.value, widget.iterations.value, widget.device.value = "hio", 20, "cpu"
    widget.beta.value, widget.threshold.value = 0.7, 0.2
    widget.sigma_start.value, widget.sigma_end.value = 2.0, 0.5
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60_000)
    meta = viewer.layers["patterns PR amplitude"].metadata
    want = reconstruct(SIM["intensity"], algorithm="hio", iterations=20, average=10, device="cpu", beta=0.7,
                       threshold=0.2, sigma=(2.0, 0.5), support=box.astype(bool))
    np.testing.assert_allclose(meta["chi2"], want["chi2"], rtol=1e-4)
    assert meta["support_layer"] == "box" and meta["beta"] == 0.7


def test_phase_retrieval_stop(make_napari_viewer, qtbot):
    viewer = _viewer_with_stack(make_napari_viewer, truth=False)
    widget = _dock(viewer, "Phase retrieval")
    widget.patterns.value = viewer.layers["patterns"]
    widget.iterations.value = 1_000_000
    widget.device.value = "cpu"
    seen = []
    widget.runner._bridge.progress.connect(seen.append)
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: bool(seen), timeout=60_000)  # it is iterating
    # the running estimates are shown long before the block of frames finishes
    qtbot.waitUntil(lambda: any(i["kind"] == "snapshot" for i in seen), timeout=60_000)
    qtbot.waitUntil(lambda: "patterns PR amplitude" in viewer.layers, timeout=10_000)
    assert viewer.layers["patterns PR amplitude"].data.max() > 0
    widget.controls.stop_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=30_000)
    assert widget.controls.status.value.startswith("stopped")
    assert widget.controls.run_button.enabled and not widget.controls.stop_button.enabled


def test_phase_retrieval_stop_with_the_network_start_keeps_the_blocks_done(make_napari_viewer, qtbot, random_model):
    viewer = _viewer_with_stack(make_napari_viewer, truth=False)
    widget = _dock(viewer, "Phase retrieval")
    widget.patterns.value = viewer.layers["patterns"]
    widget.start.value, widget.models.file.value = "CDI NN", random_model
    widget.refine_iterations.value, widget.block_frames.value, widget.device.value = 1_000_000, 2, "cpu"
    seen = []
    widget.runner._bridge.progress.connect(seen.append)
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: any(i["kind"] == "snapshot" for i in seen), timeout=60_000)  # refining, live
    widget.controls.stop_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=30_000)
    assert widget.controls.status.value == "stopped: 0 pattern(s) kept"  # the running block goes whole
    assert widget.controls.run_button.enabled and not widget.controls.stop_button.enabled


def test_phase_retrieval_bad_mask_is_a_notification(make_napari_viewer, monkeypatch):
    viewer = _viewer_with_stack(make_napari_viewer, truth=False)
    viewer.add_labels(np.zeros((5, 5), int), name="gaps")
    widget = _dock(viewer, "Phase retrieval")
    errors = []
    monkeypatch.setattr("napari_cdinn._napari.widgets._common.show_error", errors.append)
    widget.patterns.value = viewer.layers["patterns"]
    widget.mask.value = viewer.layers["gaps"]
    widget.controls.run_button.clicked.emit()
    assert not widget.runner.running and len(errors) == 1 and "matches neither" in errors[0]
    assert "\n" not in errors[0]


def test_a_mask_chosen_for_other_patterns_is_let_go(make_napari_viewer):
    viewer = _viewer_with_stack(make_napari_viewer, truth=False)
    viewer.add_labels(np.zeros((32, 32), np.uint8), name="gaps")
    viewer.add_image(np.ones((2, 64, 64), np.float32), name="bigger")
    widget = _dock(viewer, "Phase retrieval")
    widget.patterns.value = viewer.layers["patterns"]
    widget.mask.value = viewer.layers["gaps"]
    widget.patterns.value = viewer.layers["bigger"]  # 64 x 64: the 32 x 32 mask would only fail the run
    assert widget.mask.value is None
    widget.patterns.value = viewer.layers["patterns"]
    widget.mask.value = viewer.layers["gaps"]
    viewer.add_image(np.ones((3, 32, 32), np.float32), name="same size")
    widget.patterns.value = viewer.layers["same size"]  # a mask that fits stays
    assert widget.mask.value is viewer.layers["gaps"]


def test_phase_retrieval_prtf_and_post_processing(make_napari_viewer, qtbot):
    from napari_cdinn.postprocess import apply_steps
    from napari_cdinn.retrieval import reconstruct

    viewer = _viewer_with_stack(make_napari_viewer, truth=False)
    widget = _dock(viewer, "Phase retrieval")
    widget.patterns.value = viewer.layers["patterns"]
    widget.iterations.value, widget.device.value = 100, "cpu"
    widget.starts.value, widget.prtf.value = 2, True
    widget.post_centre.value = widget.post_ramp.value = widget.post_unwrap.value = True
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60_000)
    # the core calls: every pattern gets both starts, the PRTF of their runs, the steps on the kept result
    layer = viewer.layers["patterns"]  # the intensities the dock reads (the log display's inverse)
    want = reconstruct(_layers.layer_intensities(layer.data, layer.metadata), iterations=100, average=20, device="cpu",
                       n_starts=2, prtf=True)
    amp, pha, sup = apply_steps(want["amplitude"], want["phase"], ("centre", "ramp", "unwrap"), support=want["support"])
    phase = viewer.layers["patterns PR phase"]
    meta = phase.metadata
    assert meta["post"] == ["centre", "ramp", "unwrap"] and meta["n_starts"] == 2
    np.testing.assert_allclose(meta["chi2"], want["chi2"], rtol=1e-4)
    np.testing.assert_allclose(viewer.layers["patterns PR amplitude"].metadata["resolution"], want["resolution"])
    assert meta["prtf_q"].shape == (16,)
    np.testing.assert_allclose(viewer.layers["patterns PR amplitude"].metadata["prtf"], want["prtf"], atol=1e-5)
    np.testing.assert_allclose(viewer.layers["patterns PR amplitude"].data, amp, atol=1e-5)
    np.testing.assert_allclose(_layers.layer_phase(phase.data), pha, atol=1e-4)
    np.testing.assert_array_equal(viewer.layers["patterns PR support"].data, sup)
    # transparent outside the object; contrast limits that fit the unwrapped phase
    assert np.isnan(phase.data[~sup]).all() and np.isfinite(phase.data[sup]).all()
    lo, hi = phase.contrast_limits
    assert lo <= np.nanmin(phase.data) and hi >= np.nanmax(phase.data)
    # the PRTF panel: the median curve against spatial frequency, the dashed 1/e level, the resolution
    ax = widget.plot.all_axes[2]
    curve, level = ax.lines[0], ax.lines[1]
    np.testing.assert_allclose(curve.get_xdata(), meta["prtf_q"])
    np.testing.assert_allclose(curve.get_ydata(), np.nanmedian(want["prtf"], axis=0), atol=1e-5)
    assert level.get_linestyle() == "--" and level.get_ydata()[0] == pytest.approx(1 / np.e)
    assert "cycles/pixel" in ax.get_xlabel() and "resolution" in level.get_label()
    assert "PRTF resolution" in widget.controls.status.value


def test_phase_retrieval_prtf_needs_two_starts(make_napari_viewer, monkeypatch):
    viewer = _viewer_with_stack(make_napari_viewer, truth=False)
    widget = _dock(viewer, "Phase retrieval")
    errors = []
    monkeypatch.setattr("napari_cdinn._napari.widgets._common.show_error", errors.append)
    widget.patterns.value = viewer.layers["patterns"]
    widget.prtf.value, widget.starts.value = True, 1  # the default, protocol.STARTS, is enough
    widget.controls.run_button.clicked.emit()
    assert not widget.runner.running and len(errors) == 1 and "2 or more" in errors[0]
    # and the new settings persist to the next launch
    widget.starts.value, widget.post_unwrap.value = 5, True
    again = _dock(make_napari_viewer(), "Phase retrieval")
    assert (again.starts.value, again.prtf.value, again.post_unwrap.value, again.post_ramp.value) == (5, True, True, False)


def test_quality_view_and_the_complex_view_read_transparent_phases_as_zero(make_napari_viewer):
    from napari_cdinn import physics
    from napari_cdinn._napari.widgets._common import show_result
    from napari_cdinn.display import complex_to_rgb

    viewer = _viewer_with_stack(make_napari_viewer, truth=False)
    show_result(viewer, "patterns", "PR", SIM["amplitude"], SIM["phase"], translate=(0.0, 8.0, 8.0))
    amp, pha = viewer.layers["patterns PR amplitude"], viewer.layers["patterns PR phase"]
    assert np.isnan(pha.data[~physics.support_from_amplitude(SIM["amplitude"])]).all()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-cdinn", "Quality view")
    widget.amplitude.value, widget.phase.value, widget.measured.value = amp, pha, viewer.layers["patterns"]
    chi2 = widget.update()
    assert np.all(np.isfinite(chi2)) and np.all(chi2 < 1e-4)
    viewer.dims.set_current_step(0, 1)
    widget.twin_button.clicked.emit()  # the complex view follows the flipped frame, NaN read as 0
    want = complex_to_rgb(amp.data, np.nan_to_num(pha.data), alpha=True)
    np.testing.assert_allclose(viewer.layers["patterns PR complex"].data, want)
    assert np.isfinite(viewer.layers["patterns PR complex"].data).all()


def test_result_phase_limits_fit_unwrapped_phases(make_napari_viewer):
    from napari_cdinn._napari.widgets._common import show_result

    viewer = make_napari_viewer()
    amp = np.ones((2, 8, 8), np.float32)
    unwrapped = np.linspace(-7.0, 9.0, 128, dtype=np.float32).reshape(2, 8, 8)
    show_result(viewer, "src", "PR", amp, unwrapped)
    layer = viewer.layers["src PR phase"]
    assert tuple(layer.contrast_limits) == pytest.approx((-7.0, 9.0))
    show_result(viewer, "src", "PR", amp, unwrapped * 2)  # the same layer, updated: the limits widen
    assert tuple(layer.contrast_limits) == pytest.approx((-14.0, 18.0))
    show_result(viewer, "src", "PR", amp, np.clip(unwrapped, -3, 3))  # wrapped phases again
    assert tuple(layer.contrast_limits) == pytest.approx((-np.pi, np.pi))


def _beamstop():
    """A central beamstop of radius 2 on the 32 x 32 patterns of SIM, and SIM with garbage under it."""
    mask = simulate(1, size=16, seed=3, oversampling=2, beamstop=2)["mask"]
    garbage = SIM["intensity"].copy()
    garbage[:, mask] = 1e6  # whatever lies under the beamstop must not matter
    return mask, garbage


def test_phase_retrieval_with_a_mask_layer_and_the_network_start(make_napari_viewer, qtbot, random_model):
    from napari_cdinn import nn
    from napari_cdinn.nn.inference import refine_options
    from napari_cdinn.pipelines import refine_with_fallback

    mask, garbage = _beamstop()
    viewer = make_napari_viewer()
    viewer.add_image(garbage, name="patterns")
    viewer.add_image(np.repeat(mask[None], 6, 0).astype(np.float32), name="beamstop")  # an Image layer, (N, H, W)
    widget = _dock(viewer, "Phase retrieval")
    assert widget.mask.value is None  # no mask unless chosen
    widget.patterns.value = viewer.layers["patterns"]
    widget.mask.value = viewer.layers["beamstop"]
    widget.algorithm.value, widget.iterations.value, widget.device.value = "er", 20, "cpu"
    widget.block_frames.value = 4
    widget.start.value = "CDI NN"
    widget.refine_iterations.value = 3
    widget.models.file.value = random_model
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60_000)
    meta = viewer.layers["patterns PR amplitude"].metadata
    assert meta["mask"] == "beamstop" and meta["nn_trusted"].shape == meta["nn_start"].shape == (6,)
    # what cdinn reconstruct --init nn runs, with the mask, block by block: the masked garbage is ignored
    model = nn.choose_scale(SIM["intensity"], str(random_model), mask=mask, device="cpu")
    want = [refine_with_fallback(SIM["intensity"][lo:hi], model=model, mask=mask, refine=refine_options(0, 3),
                                 first_frame=lo, algorithm="er", iterations=20, average=10, device="cpu", beta=0.9,
                                 threshold=0.12, sigma=(3.0, 1.0), n_starts=3, prtf=False) for lo, hi in ((0, 4), (4, 6))]
    np.testing.assert_allclose(meta["chi2"], np.concatenate([w["chi2"] for w in want]), rtol=1e-4)
    np.testing.assert_array_equal(meta["nn_start"], np.concatenate([w["start"] for w in want]).astype(bool))
    kept = int(meta["nn_start"].sum())
    assert f"its start kept on {kept} frame(s)" in widget.controls.status.value
    # the R-factor plot holds the refinement's 3 iterations, and the protocol's 20 where it ran, on one axis
    assert widget.plot.axes.lines[0].get_xdata()[-1] == (3 if kept == 6 else 20)


def test_phase_retrieval_network_declined_is_a_notification_and_random_starts(make_napari_viewer, qtbot, monkeypatch):
    """Patterns no scale of the network reads (not oversampled): one notification, random starts for every frame."""
    from napari_cdinn.retrieval import reconstruct
    from napari_cdinn.simulate import simulate as _simulate

    flat = _simulate(3, size=64, seed=14, oversampling=1)["intensity"]
    viewer = make_napari_viewer()
    viewer.add_image(flat, name="flat")
    widget = _dock(viewer, "Phase retrieval")
    infos = []
    monkeypatch.setattr("napari_cdinn._napari.widgets._common.show_info", infos.append)
    widget.patterns.value = viewer.layers["flat"]
    widget.algorithm.value, widget.iterations.value, widget.device.value = "er", 20, "cpu"
    widget.start.value = "CDI NN"
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60_000)
    assert any("cannot read these patterns" in m for m in infos) and all("\n" not in m for m in infos)
    assert "declined" in widget.controls.status.value
    want = reconstruct(flat, algorithm="er", iterations=20, average=10, device="cpu")["chi2"]
    np.testing.assert_allclose(viewer.layers["flat PR amplitude"].metadata["chi2"], want, rtol=1e-4)


@pytest.fixture
def random_model(tmp_path):
    """An untrained model file: the widget tests check plumbing, not accuracy."""
    from napari_cdinn.nn.checkpoint import save_model
    from napari_cdinn.nn.networks import build_model

    path = tmp_path / "random.safetensors"
    save_model(build_model("paper"), path)
    return path


def test_inversion_adds_layers_and_flags(make_napari_viewer, qtbot, random_model, monkeypatch):
    said = []
    monkeypatch.setattr("napari_cdinn._napari.widgets.inversion.notify", said.append)
    viewer = _viewer_with_stack(make_napari_viewer, truth=False)
    widget = _dock(viewer, "CDI NN inversion")
    widget.patterns.value = viewer.layers["patterns"]
    widget.models.file.value = random_model
    widget.device.value = "cpu"
    widget.batch_size.value = 4
    widget.views.value = 2
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60_000)
    amp, pha = viewer.layers["patterns NN amplitude"], viewer.layers["patterns NN phase"]
    assert amp.metadata["views"] == 2
    assert amp.data.shape == pha.data.shape == (6, 32, 32)
    # side by side: the 32-pixel frame fills the 32 x 32 pattern, one column (32 + a gap of 4) to the right
    assert tuple(amp.translate) == (0.0, 0.0, 36.0)
    complex_ = viewer.layers["patterns NN complex"]
    assert complex_.rgb and complex_.data.shape == (6, 32, 32, 4) and complex_.visible and not amp.visible
    assert tuple(complex_.translate) == (0.0, 0.0, 36.0) and viewer.dims.axis_labels[0] == "frame"
    assert "CDI NN" in viewer.text_overlay.text and viewer.layers[-1].metadata["cdinn_kind"] == "legend"
    chi2, trusted = amp.metadata["chi2"], amp.metadata["trusted"]
    from napari_cdinn.nn.inference import is_trusted

    assert chi2.shape == (6,) and np.array_equal(trusted, is_trusted(chi2, amp.metadata["chi2_noise"]))
    assert len(widget.plot.axes.collections) == 2
    # an untrained network's frames are flagged, with what to do next
    assert not trusted.all() and f"{int((~trusted).sum())} of 6 frame(s)" in said[0]
    assert "refine them in the Phase retrieval dock (start: CDI NN)" in said[0]


def test_inversion_with_a_beamstop_mask_layer(make_napari_viewer, qtbot, monkeypatch, random_model):
    from napari_cdinn import nn

    mask, garbage = _beamstop()
    viewer = make_napari_viewer()
    viewer.add_image(garbage, name="patterns")
    viewer.add_labels(mask.astype(np.uint8), name="beamstop")
    viewer.add_labels(np.zeros((3, 32, 32), np.uint8), name="wrong")  # 3 frames, not 6
    widget = _dock(viewer, "CDI NN inversion")
    errors = []
    monkeypatch.setattr("napari_cdinn._napari.widgets._common.show_error", errors.append)
    widget.patterns.value = viewer.layers["patterns"]
    widget.models.file.value = random_model
    widget.device.value, widget.batch_size.value = "cpu", 4
    widget.mask.value = viewer.layers["wrong"]
    widget.controls.run_button.clicked.emit()
    assert not widget.runner.running and len(errors) == 1 and "matches neither" in errors[0]
    assert "\n" not in errors[0] and "patterns NN amplitude" not in viewer.layers
    widget.mask.value = viewer.layers["beamstop"]
    widget.trust.value = 0.5
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60_000)
    meta = viewer.layers["patterns NN amplitude"].metadata
    # chi^2 ignores the masked pixels: the garbage under the beamstop changes nothing
    want = nn.predict(SIM["intensity"], model=str(random_model), device="cpu", mask=mask)
    np.testing.assert_allclose(meta["chi2"], want["chi2"], rtol=1e-4)
    np.testing.assert_allclose(meta["chi2_noise"], want["chi2_noise"], rtol=1e-4)
    assert meta["mask"] == "beamstop" and len(errors) == 1
    assert np.array_equal(meta["trusted"], meta["chi2"] - meta["chi2_noise"] <= 0.5)  # the spin box's threshold


def test_inversion_automatic_model_follows_the_pattern_size(make_napari_viewer, qtbot):
    from napari_cdinn._napari.widgets._models import AUTO_LABEL

    viewer = make_napari_viewer()
    viewer.add_image(simulate(2, oversampling=2, seed=4)["intensity"], name="wide")
    widget = _dock(viewer, "CDI NN inversion")
    assert widget.models.choice.value is None and widget.models.choice.native.currentText() == AUTO_LABEL
    assert widget.trust.value == TRUST_CHI2  # the CLI's rule, not rounded by the spin box
    widget.patterns.value = viewer.layers["wide"]
    widget.device.value = "cpu"
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60_000)
    assert viewer.layers["wide NN amplitude"].metadata["model"] == "model2x"
    assert viewer.layers["wide NN amplitude"].metadata["scale"] == 1 and "pixel size" not in widget.controls.status.value
    # 192 x 192 patterns of 48-pixel objects, 4x oversampled: read at 1.5x the pixel size, and said so
    viewer.add_image(simulate(3, size=48, oversampling=4, seed=4)["intensity"], name="cut")
    widget.patterns.value = viewer.layers["cut"]
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60_000)
    layer = viewer.layers["cut NN amplitude"]
    assert layer.metadata["scale"] == 1.5 and layer.data.shape == (3, 48, 48)
    assert widget.controls.status.value.endswith("read at 1.5x the pixel size (the central 128 x 128 pixels)")


def test_inversion_notes_a_stack_cut_off_centre(make_napari_viewer, qtbot, monkeypatch):
    infos = []
    monkeypatch.setattr("napari_cdinn._napari.widgets._common.show_info", infos.append)
    viewer = make_napari_viewer()
    viewer.add_image(np.roll(simulate(32, oversampling=2, seed=4)["intensity"], (2, 0), (-2, -1)), name="moved")
    widget = _dock(viewer, "CDI NN inversion")
    widget.patterns.value, widget.device.value = viewer.layers["moved"], "cpu"
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60_000)
    assert any(m.startswith("The patterns are symmetric about a pixel (+2, +0)") and m.endswith(".") for m in infos)
    assert viewer.layers["moved NN amplitude"].metadata["trusted"].mean() > 0.3  # read re-centred


def test_retrieval_from_the_network_notes_a_stack_cut_off_centre(make_napari_viewer, qtbot, monkeypatch):
    infos = []
    monkeypatch.setattr("napari_cdinn._napari.widgets._common.show_info", infos.append)
    viewer = make_napari_viewer()
    viewer.add_image(np.roll(simulate(32, oversampling=2, seed=4)["intensity"], (0, -2), (-2, -1)), name="moved")
    widget = _dock(viewer, "Phase retrieval")
    widget.patterns.value = viewer.layers["moved"]
    widget.algorithm.value, widget.iterations.value, widget.device.value = "er", 20, "cpu"
    widget.start.value = "CDI NN"
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60_000)
    assert any(m.startswith("The patterns are symmetric about a pixel (+0, -2)") for m in infos)


def test_inversion_bad_shape_and_bad_model_are_notifications(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(np.ones((3, 20, 20), np.float32), name="odd")
    viewer.add_image(np.ones((3, 64, 64), np.float32), name="fine")
    widget = _dock(viewer, "CDI NN inversion")
    errors = []
    monkeypatch.setattr("napari_cdinn._napari.widgets._common.show_error", errors.append)
    widget.patterns.value = viewer.layers["odd"]
    widget.controls.run_button.clicked.emit()
    assert len(errors) == 1 and "32k" in errors[0]
    widget.patterns.value = viewer.layers["fine"]
    widget.models.choice.value = None
    widget.models.file.value = tmp_path  # a folder without a model
    widget.device.value = "cpu"
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60_000)
    assert len(errors) == 2 and "\n" not in errors[1]
    widget.models.file.value = tmp_path / "no_such_model"  # a typed path that does not exist: never the shipped one
    widget.controls.run_button.clicked.emit()
    assert not widget.runner.running and len(errors) == 3 and "no_such_model' does not exist" in errors[2]
    errors.pop()
    # the shipped 2x-input model on 32 x 32 patterns: one sentence, no layers
    viewer.add_image(np.ones((3, 32, 32), np.float32), name="small")
    widget.patterns.value = viewer.layers["small"]
    widget.models.file.line_edit.value = ""  # clear the override
    widget.models.choice.value = "model2x"
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60_000)
    assert len(errors) == 3 and "2x-oversampled" in errors[2] and "\n" not in errors[2]
    assert not [layer for layer in viewer.layers if "NN" in layer.name]


def test_a_job_that_fails_says_so_in_the_status_line(make_napari_viewer, qtbot, monkeypatch):
    errors = []
    monkeypatch.setattr("napari_cdinn._napari.widgets._common.show_error", errors.append)
    viewer = make_napari_viewer()
    viewer.add_image(np.ones((3, 33, 33), np.float32), name="odd")
    dock = _dock(viewer, "Phase retrieval")
    dock.patterns.value = viewer.layers["odd"]
    dock.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not dock.runner.running, timeout=60_000)
    assert len(errors) == 1 and errors[0].endswith(".") and "\n" not in errors[0]
    assert dock.controls.status.value == f"failed: {dock.runner.error}" and dock.runner.error.lower() == errors[0].lower()
    assert dock.controls.run_button.enabled and not dock.controls.stop_button.enabled


def test_inversion_job_stops_between_batches(random_model):
    from napari_cdinn._napari.widgets.inversion import inversion_job

    calls = []
    out = inversion_job(SIM["intensity"], {"model": str(random_model), "device": "cpu", "batch_size": 2},
                        calls.append, lambda: len(calls) >= 1)
    assert out["stopped"] and out["chi2"].shape == (2,) and calls == [{"done": 2, "total": 6}]


def _training_dock(viewer, out, train_size, val_size, epochs, batch_size):
    """The training dock of ``viewer`` set up for a small CPU run into ``out``."""
    widget = _dock(viewer, "Train CDI NN")
    widget.train_size.value, widget.val_size.value = train_size, val_size
    widget.epochs.value, widget.batch_size.value = epochs, batch_size
    widget.device.value = "cpu"
    widget.out.value = out
    return widget


def test_training_dock_builds_a_train_config(make_napari_viewer, tmp_path):
    from napari_cdinn.nn.config import PRESETS, option_help

    widget = _training_dock(make_napari_viewer(), tmp_path / "m", 1024, 64, 3, 32)
    assert widget.config() == PRESETS["paper"].replace(train_size=1024, val_size=64, epochs=3, batch_size=32)
    widget.time_limit.value, widget.average.value, widget.fresh.value = 2.5, 25, True
    widget.arch.value, widget.miss_weight.value = "shared2x", 3.0
    config = widget.config()
    assert config.time_limit_min == 2.5 and config.average_from == 0.75 and config.fresh_data
    assert config.arch == "shared2x" and config.miss_weight == 3.0
    assert widget.choices()["init_from"] is None  # unset: the preset's (random weights)
    assert widget.data_weight.tooltip == option_help("data_weight")
    unset = widget.choices()
    assert (unset["families"], unset["detector"], unset["mask_channel"]) == (None, None, None)  # as the start model
    widget.families.value, widget.detector.value, widget.mask_channel.value = "realistic", "realistic-clean", True
    config = widget.config()
    assert (config.families, config.detector, config.mask_channel) == ("realistic", "realistic-clean", True)


def test_training_dock_trains_the_64_pixel_network_on_realistic_data(make_napari_viewer, qtbot, tmp_path):
    widget = _training_dock(make_napari_viewer(), tmp_path / "deep", 32, 16, 1, 16)
    widget.arch.value, widget.families.value, widget.detector.value = "deep2x", "realistic", "realistic"
    widget.mask_channel.value = True
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=120_000)
    config = json.loads((tmp_path / "deep" / "last.json").read_text())["config"]
    assert (config["arch"], config["families"], config["detector"], config["mask_channel"]) == (
        "deep2x", "realistic", "realistic", True)


def test_training_dock_updates_plot_and_offers_the_model(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    viewer = make_napari_viewer()
    widget = _training_dock(viewer, tmp_path / "tiny", 128, 64, 1, 64)
    inversion = _dock(viewer, "CDI NN inversion")
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=120_000)
    assert widget.history["train"] and widget.history["val"]
    assert widget.plot.axes.lines
    assert (tmp_path / "tiny" / "last.safetensors").is_file()
    assert str(tmp_path / "tiny") in inversion.models.choice.choices  # offered at once...
    assert inversion.models.model is None  # ...but not chosen: the picker keeps the user's choice
    assert widget.init_from.native.currentText() == "random weights"  # labels, not "-----"
    assert widget.arch.native.currentText().startswith("as the start model")
    # continue from the model just trained as the 2x-input variant, with fresh examples and the data term
    assert None in widget.init_from.choices and str(tmp_path / "tiny") in widget.init_from.choices
    widget.init_from.value = str(tmp_path / "tiny")
    widget.fresh.value = True
    widget.data_weight.value = 1.5
    widget.support_weight.value, widget.miss_weight.value = 0.5, 3.0
    widget.arch.value = "shared2x"
    widget.out.value = tmp_path / "continued"
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=120_000)
    config = json.loads((tmp_path / "continued" / "last.json").read_text())["config"]
    assert config["fresh_data"] and config["init_from"].startswith(str(tmp_path / "tiny"))
    assert config["data_weight"] == 1.5 and config["arch"] == "shared2x"
    assert config["support_weight"] == 0.5 and config["miss_weight"] == 3.0
    # a second run into a folder that holds one: said at once, nothing started or overwritten
    errors = []
    monkeypatch.setattr("napari_cdinn._napari.widgets._common.show_error", errors.append)
    before = (tmp_path / "continued" / "last.json").read_bytes()
    widget.controls.run_button.clicked.emit()
    assert not widget.runner.running and len(errors) == 1 and "tick resume to continue it" in errors[0]
    assert (tmp_path / "continued" / "last.json").read_bytes() == before


def test_training_dock_time_limit_and_averaging(make_napari_viewer, qtbot, tmp_path):
    widget = _training_dock(make_napari_viewer(), tmp_path / "timed", 1024, 32, 10_000, 32)
    widget.time_limit.value = 0.05
    widget.average.value = 50  # average the weights over the last half of the schedule
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=120_000)
    state = json.loads((tmp_path / "timed" / "last.json").read_text())
    assert state["config"]["time_limit_min"] == 0.05 and state["step"] > 0 and state["epoch"] < 10_000
    assert state["config"]["average_from"] == 0.5 and (tmp_path / "timed" / "average.safetensors").is_file()
    assert widget.controls.status.value.startswith("done (time limit)")


def test_training_stop_saves_a_checkpoint(make_napari_viewer, qtbot, tmp_path):
    widget = _training_dock(make_napari_viewer(), tmp_path / "stopped", 1_000_000, 64, 5, 64)
    seen = []
    widget.runner._bridge.progress.connect(seen.append)
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: bool(seen), timeout=120_000)  # training started
    widget.controls.stop_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=120_000)
    assert (tmp_path / "stopped" / "last.safetensors").is_file()
    assert widget.controls.status.value.startswith("stopped")


def test_phase_retrieval_from_the_shipped_network(make_napari_viewer, qtbot):
    from napari_cdinn._napari.widgets._models import REGISTRY

    if not any(value == "model" for _label, value in REGISTRY.choices()):
        pytest.skip("no shipped model")
    sim = simulate(2, size=32, seed=5, oversampling=2)
    viewer = make_napari_viewer()
    data, kwargs, _ = _layers.intensity_tuple(sim["intensity"], "big")
    viewer.add_image(data, **kwargs)
    widget = _dock(viewer, "Phase retrieval")
    widget.patterns.value = viewer.layers["big"]
    widget.start.value = "CDI NN"
    widget.models.choice.value = "model"
    widget.algorithm.value, widget.iterations.value, widget.device.value = "er", 20, "cpu"
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60_000)
    assert viewer.layers["big PR amplitude"].data.shape == (2, 64, 64)
    assert np.all(viewer.layers["big PR amplitude"].metadata["chi2"] < 1)


def _close_and_flush(viewer):
    """Close the viewer as a user does and let Qt delete its widgets (deferred deletes)."""
    from qtpy.QtCore import QCoreApplication, QEvent

    viewer.close()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    QCoreApplication.processEvents()


def test_closing_the_viewer_stops_training_with_a_checkpoint(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    widget = _training_dock(viewer, tmp_path / "closed", 1_000_000, 64, 5, 64)
    seen = []
    widget.runner._bridge.progress.connect(seen.append)
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: bool(seen), timeout=120_000)  # training started
    runner = widget.runner
    _close_and_flush(viewer)
    assert runner.closed and (tmp_path / "closed" / "last.safetensors").is_file()
    qtbot.waitUntil(lambda: not runner.running, timeout=30_000)  # its late callbacks touch no deleted widget


def test_closing_the_viewer_during_retrieval(make_napari_viewer, qtbot):
    viewer = _viewer_with_stack(make_napari_viewer, truth=False)
    widget = _dock(viewer, "Phase retrieval")
    widget.patterns.value = viewer.layers["patterns"]
    widget.iterations.value, widget.device.value = 1_000_000, "cpu"
    seen = []
    widget.runner._bridge.progress.connect(seen.append)
    widget.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: len(seen) > 2, timeout=60_000)
    runner = widget.runner
    _close_and_flush(viewer)
    assert runner.closed
    qtbot.waitUntil(lambda: not runner.running, timeout=30_000)
    qtbot.wait(200)  # queued progress events arrive after the close and are dropped


def test_dock_settings_persist_to_the_next_launch(make_napari_viewer):
    first = _dock(make_napari_viewer(), "Phase retrieval")
    first.iterations.value, first.beta.value, first.algorithm.value = 77, 0.75, "raar"
    training = _dock(make_napari_viewer(), "Train CDI NN")
    training.epochs.value = 3
    again = _dock(make_napari_viewer(), "Phase retrieval")
    assert (again.iterations.value, again.beta.value, again.algorithm.value) == (77, 0.75, "raar")
    assert _dock(make_napari_viewer(), "Train CDI NN").epochs.value == 3


def test_dock_settings_keep_only_what_the_user_changed(make_napari_viewer, tmp_path):
    """Every value was saved, so a default changed by a later version (the trust threshold went
    from 0.05 to 0.015) never reached a user who had opened the dock once."""
    settings = Path(os.environ["NAPARI_CDINN_SETTINGS_DIR"])
    dock = _dock(make_napari_viewer(), "CDI NN inversion")
    dock.views.value = 2
    assert json.loads((settings / "inversion.json").read_text()) == {"changed": {"views": 2}}
    dock.views.value = 1  # back to the default: nothing left to keep
    assert json.loads((settings / "inversion.json").read_text()) == {"changed": {}}
    (settings / "inversion.json").write_text(json.dumps({"trust": 0.02, "views": 3}))  # the earlier layout
    again = _dock(make_napari_viewer(), "CDI NN inversion")
    assert (again.trust.value, again.views.value) == (0.02, 3)  # restored whole


def _adapt_panel(viewer, tmp_path, **options):
    """The training dock's adapt section set up on a small stack of 40 patterns (layer ``scan``)."""
    sim = simulate(40, seed=6, oversampling=2, families="holes")
    data, kwargs, _ = _layers.intensity_tuple(sim["intensity"], "scan")
    viewer.add_image(data, **kwargs)
    panel = _dock(viewer, "Train CDI NN").adapt
    panel.adapt_options = dict({"min_frames": 16, "test_count": 8, "recall_count": 8, "batch_size": 8, "holdout": 0.25},
                                **options)
    panel.patterns.value = viewer.layers["scan"]
    panel.device.value = "cpu"
    panel.out.value = tmp_path / "adapted"
    return panel


def test_training_dock_adapts_a_model_to_a_stack_and_offers_it(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    errors = []
    monkeypatch.setattr("napari_cdinn._napari.widgets._common.show_error", errors.append)
    recall = iter([0.9, 0.5, 0.9])  # the weights of step 2 forget what the base knew
    monkeypatch.setattr("napari_cdinn.nn.adapt._Adapter.recall_iou", lambda self: {"paper": next(recall)})
    viewer = make_napari_viewer()
    panel = _adapt_panel(viewer, tmp_path, max_steps=4, eval_every=2)
    inversion = _dock(viewer, "CDI NN inversion")
    panel.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not panel.runner.running, timeout=120_000)
    assert (tmp_path / "adapted" / "model.safetensors").is_file()
    assert [step for step, _ in panel.history] == [0, 2, 4] and len(panel.plot.axes.lines) >= 2
    assert panel.forgot == [2] and "forgets (not kept)" in [line.get_label() for line in panel.plot.axes.lines]
    assert panel.controls.status.value.startswith("done: held-out chi²")
    assert panel.controls.progress.value == 100  # ended before the time limit: the bar is full
    assert str(tmp_path / "adapted") in inversion.models.choice.choices  # offered at once...
    assert inversion.models.model is None  # ...but not chosen
    panel.controls.run_button.clicked.emit()  # the folder exists now: one notification, no run
    assert not panel.runner.running and len(errors) == 1 and "exists" in errors[0]


def test_adapt_stop_still_writes_the_best_model(make_napari_viewer, qtbot, tmp_path):
    panel = _adapt_panel(make_napari_viewer(), tmp_path, eval_every=1000)
    seen = []
    panel.runner._bridge.progress.connect(seen.append)
    panel.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: any(e["event"] == "evaluation" for e in seen), timeout=120_000)  # the base is scored
    panel.controls.stop_button.clicked.emit()
    qtbot.waitUntil(lambda: not panel.runner.running, timeout=120_000)
    assert (tmp_path / "adapted" / "model.safetensors").is_file()
    assert panel.controls.status.value.startswith("stopped: held-out chi²")
    assert panel.controls.progress.value < 100


def test_prepare_dock_finds_the_centre_and_cuts_patterns_the_other_docks_read(make_napari_viewer, qtbot, monkeypatch):
    from test_prepare import _detector

    from napari_cdinn.prepare import prepare_frames

    errors = []
    monkeypatch.setattr("napari_cdinn._napari.widgets._common.show_error", errors.append)
    det, mask, truth = _detector(count=12)
    viewer = make_napari_viewer()
    viewer.add_image(det, name="raw")
    viewer.add_labels(mask.astype(np.uint8), name="raw mask")
    dock = _dock(viewer, "Prepare detector frames")
    dock.frames.value, dock.mask.value = viewer.layers["raw"], viewer.layers["raw mask"]
    dock.find_button.clicked.emit()
    qtbot.waitUntil(lambda: not dock.runner.running, timeout=60_000)
    assert dock.centre() == (141, 77) and dock.auto.value
    assert viewer.layers["raw centre"].data.tolist() == [[141, 77]]
    dock.bin.value = 2
    dock.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not dock.runner.running, timeout=60_000)
    assert dock.controls.status.value.endswith("12 pattern(s) of 64 x 64, binned 2 x 2") and not errors
    prepared, own = viewer.layers["raw prepared"], viewer.layers["raw prepared mask"]
    assert prepared.data.shape == own.data.shape == (12, 64, 64) and prepared.metadata["centre"] == [141, 77]
    expected, bad = prepare_frames(det, (141, 77), 64, 2, mask)
    assert np.array_equal(own.data != 0, bad)
    assert np.array_equal(_layers.layer_intensities(prepared.data, prepared.metadata), expected)  # counts, exactly
    inversion = _dock(viewer, "CDI NN inversion")
    inversion.patterns.value = prepared
    assert inversion.mask.value is own  # the prepared mask goes with its patterns
    # dragging the cross types the centre and stops finding it
    viewer.layers["raw centre"].data = np.array([[140.0, 78.0]])
    assert dock.centre() == (140, 78) and not dock.auto.value
    dock.size.value = 63
    dock.controls.run_button.clicked.emit()
    assert not dock.runner.running and len(errors) == 1 and "even" in errors[0]
    dock.size.value = 4  # patterns the other docks cannot read: one sentence, no run
    dock.controls.run_button.clicked.emit()
    assert not dock.runner.running and len(errors) == 2 and "smaller than the 8 x 8" in errors[1]
    dock.size.value = 0  # the default size around a centre in the corner is as small: said by the job
    dock.centre_y.value, dock.centre_x.value = 2, 2
    dock.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not dock.runner.running, timeout=60_000)
    assert len(errors) == 3 and "largest square around the centre (2, 2)" in errors[2]
    dock.centre_y.value = 400  # off the 300-row chip: the sentence the command says, no run
    dock.controls.run_button.clicked.emit()
    assert not dock.runner.running and len(errors) == 4
    assert "centre (400, 2) lies outside the 300 x 200 detector frame" in errors[3]


def test_prepare_dock_turns_ccd_readings_into_photons(make_napari_viewer, qtbot, monkeypatch):
    from test_prepare import _ccd

    from napari_cdinn.prepare import prepare_frames

    errors = []
    monkeypatch.setattr("napari_cdinn._napari.widgets._common.show_error", errors.append)
    frames, darks, mask, counts = _ccd(count=4)
    viewer = make_napari_viewer()
    viewer.add_image(frames, name="ccd")
    viewer.add_image(darks, name="dark frames")
    dock = _dock(viewer, "Prepare detector frames")
    dock.frames.value, dock.dark.value = viewer.layers["ccd"], viewer.layers["dark frames"]
    dock.mask.value = viewer.add_labels(mask.astype(np.uint8), name="gaps")
    dock.auto.value = False
    dock.centre_y.value, dock.centre_x.value = 141, 77
    dock.size.value, dock.adu.value = 64, 7.5
    dock.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not dock.runner.running, timeout=60_000)
    prepared = viewer.layers["ccd prepared"]
    photons = _layers.layer_intensities(prepared.data, prepared.metadata)
    expected, _ = prepare_frames(counts, (141, 77), 64, 1, mask)
    assert np.mean(photons == expected) > 0.999 and not errors
    assert prepared.metadata["dark"] == "dark frames" and prepared.metadata["adu_per_photon"] == 7.5
    dock.dark.value = viewer.layers["ccd"]  # the frames as their own dark: one sentence, no run
    dock.controls.run_button.clicked.emit()
    assert not dock.runner.running and len(errors) == 1 and "without beam" in errors[0]


def test_prepare_dock_takes_the_beam_centre_of_the_file_it_opened(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    from test_prepare import _detector, _with_beam_centre

    notes = []
    monkeypatch.setattr("napari_cdinn._napari.widgets.prepare.notify", notes.append)
    det, mask, _ = _detector(count=32)
    path = _with_beam_centre(tmp_path / "stale_master.h5", det, mask, 150, 77)
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-cdinn")
    dock = _dock(viewer, "Prepare detector frames")
    dock.find_button.clicked.emit()
    qtbot.waitUntil(lambda: not dock.runner.running, timeout=60_000)
    assert dock.centre() == (150, 77) and "from the file's beam centre" in dock.controls.status.value
    assert len(notes) == 1 and "9 px from the frames' symmetry centre (141, 77)" in notes[0]
