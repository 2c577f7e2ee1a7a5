"""The napari face: manifest, sample data, reader and writer (pytest-qt, run under xvfb-run)."""

import h5py
import numpy as np
import pytest
import tifffile

from napari_cdinn import io
from napari_cdinn._napari import layers as _layers
from napari_cdinn._napari.reader import get_reader
from napari_cdinn.simulate import simulate

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

SIM = simulate(4, size=16, seed=1, oversampling=2)


def test_manifest_contributions():
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("napari-cdinn")
    contrib = manifest.contributions
    assert [s.display_name for s in contrib.sample_data] == ["Paper-recipe diffraction stack",
                                                              "Raw detector frames (to prepare)"]
    assert set(contrib.readers[0].filename_patterns) >= {"*.npy", "*.npz", "*.tif", "*.h5", "*.cxi"}
    assert set(contrib.writers[0].filename_extensions) == {".npz", ".h5", ".hdf5", ".cxi"}


def test_sample_data_opens(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-cdinn", "paper_stack")
    names = [layer.name for layer in viewer.layers]
    assert names == ["true amplitude", "true phase", "paper-recipe intensity"]
    inten = viewer.layers["paper-recipe intensity"]
    assert inten.data.shape == (16, 64, 64) and inten.colormap.name == "magma"
    assert inten.metadata["cdinn_kind"] == "intensity"
    truth = simulate(16, size=32, seed=0, oversampling=2)["intensity"]
    np.testing.assert_allclose(_layers.layer_intensities(inten.data, inten.metadata), truth, rtol=1e-4, atol=1e-2)
    phase = viewer.layers["true phase"]
    assert phase.colormap.name == "twilight" and tuple(phase.contrast_limits) == pytest.approx((-np.pi, np.pi))


def _files(tmp_path):
    inten = SIM["intensity"]
    paths = {}
    paths["npy"] = tmp_path / "s.npy"
    np.save(paths["npy"], inten)
    paths["npz"] = tmp_path / "s.npz"
    io.write_npz(paths["npz"], SIM)
    paths["tif"] = tmp_path / "s.tif"
    tifffile.imwrite(paths["tif"], inten)
    paths["h5"] = tmp_path / "s.h5"
    with h5py.File(paths["h5"], "w") as fh:
        fh["data"] = inten
    paths["cxi"] = tmp_path / "s.cxi"
    with h5py.File(paths["cxi"], "w") as fh:
        fh["entry_1/data_1/data"] = inten
    return paths


def test_reader_every_format(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    for fmt, path in _files(tmp_path).items():
        layers = viewer.open(str(path), plugin="napari-cdinn")
        inten = [layer for layer in layers if layer.metadata.get("cdinn_kind") == "intensity"]
        assert len(inten) == 1, fmt
        got = _layers.layer_intensities(inten[0].data, inten[0].metadata)
        np.testing.assert_allclose(np.asarray(got), SIM["intensity"], rtol=1e-4, atol=1e-3)
        if fmt == "npz":  # a simulated set also opens its truth
            kinds = sorted(layer.metadata["cdinn_kind"] for layer in layers)
            assert kinds == ["amplitude", "intensity", "phase"]


def test_dropped_cxi_opens_with_this_plugin(make_napari_viewer, tmp_path, monkeypatch):
    """Drag and drop is ``viewer.open`` without a plugin: no other reader claims .cxi, so no choice is asked.

    (.h5, .npy and .tif are claimed by napari's built-in reader too: the README says how to prefer this one.)
    """
    from napari.settings import get_settings

    viewer = make_napari_viewer()
    paths = _files(tmp_path)
    layers = viewer.open(str(paths["cxi"]), plugin=None)  # plugin=None: what a drop does
    assert [layer.metadata.get("cdinn_kind") for layer in layers] == ["intensity"]
    # the README's recipe for the extensions napari's own reader claims too
    readers = get_settings().plugins.extension2reader
    monkeypatch.setattr(get_settings().plugins, "extension2reader", {**readers, "*.h5": "napari-cdinn"})
    layers = viewer.open(str(paths["h5"]), plugin=None)
    assert [layer.metadata.get("cdinn_kind") for layer in layers] == ["intensity"]


def test_reader_opens_the_files_own_mask(make_napari_viewer, tmp_path):
    from napari_cdinn.cli import main

    path = tmp_path / "stopped.npz"
    assert main(["simulate", "--count", "2", "--size", "16", "--oversampling", "2", "--beamstop", "2",
                 "--out", str(path)]) == 0
    want = io.file_mask(path)
    tuples = get_reader(str(path))(str(path))
    labels = [t for t in tuples if t[2] == "labels"]
    assert len(labels) == 1 and labels[0][1]["name"] == "stopped mask"
    assert labels[0][1]["metadata"]["cdinn_kind"] == "mask"
    assert labels[0][0].dtype == np.uint8 and np.array_equal(labels[0][0] == 1, want) and want.any()
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-cdinn")
    mask = viewer.layers["stopped mask"]
    assert type(mask).__name__ == "Labels"
    assert tuple(mask.translate[-2:]) == tuple(viewer.layers["stopped intensity"].translate[-2:])
    # the docks pick the file's own mask for its patterns
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-cdinn", "CDI NN inversion")
    widget.patterns.value = viewer.layers["stopped intensity"]
    assert widget.mask.value is mask
    # a file without a mask opens none
    plain = tmp_path / "plain.npy"
    np.save(plain, SIM["intensity"])
    assert not [t for t in get_reader(str(plain))(str(plain)) if t[2] == "labels"]


def test_reader_is_lazy_for_big_stacks(tmp_path, monkeypatch):
    path = _files(tmp_path)["h5"]
    monkeypatch.setattr(io, "LAZY_THRESHOLD", 10)
    (data, kwargs, kind), = get_reader(str(path))(str(path))
    assert type(data).__module__.startswith("dask") and kind == "image"
    assert kwargs["metadata"]["cdinn_display"] == _layers.LOG_DISPLAY


@pytest.mark.parametrize(
    "name, content",
    [("notes.txt", b"hello"), ("text.npy", b"hello"), ("text.h5", b"hello"), ("empty.tif", b""),
     ("missing.npz", None)],
)
def test_reader_returns_none_for_foreign_files(tmp_path, name, content):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    assert get_reader(str(path)) is None


def test_a_stack_of_unmeasured_pixels_opens_without_a_warning(tmp_path):
    import warnings

    with h5py.File(tmp_path / "marks.h5", "w") as fh:
        fh["data"] = np.full((2, 16, 16), 65535, np.uint16)  # every pixel the detector's mark
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layers = get_reader(str(tmp_path / "marks.h5"))(str(tmp_path / "marks.h5"))
    assert layers[0][1]["contrast_limits"] == (0.0, 1.0)


def test_reader_none_for_foreign_hdf5_and_rgb_tiff(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as fh:
        fh["x"] = np.arange(3)
    assert get_reader(str(tmp_path / "other.h5")) is None
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    assert get_reader(str(tmp_path / "rgb.tif")) is None


@pytest.mark.parametrize("ext", [".npz", ".h5", ".cxi"])
def test_writer_round_trip(make_napari_viewer, tmp_path, ext):
    viewer = make_napari_viewer()
    for layer_data in [_layers.amplitude_tuple(SIM["amplitude"], "amp", chi2=np.arange(4.0)),
                       _layers.phase_tuple(SIM["phase"], "pha")]:
        data, kwargs, _ = layer_data
        viewer.add_image(data, **kwargs)
    path = str(tmp_path / f"result{ext}")
    written = viewer.layers.save(path, plugin="napari-cdinn")
    assert written == [path]
    res = io.read_result(path)
    np.testing.assert_array_equal(res["amplitude"], SIM["amplitude"])
    np.testing.assert_array_equal(res["phase"], SIM["phase"])
    np.testing.assert_array_equal(res["chi2"], np.arange(4.0, dtype=np.float32))
    layers = viewer.open(path, plugin="napari-cdinn")  # and the reader opens it back
    assert sorted(layer.metadata["cdinn_kind"] for layer in layers) == ["amplitude", "phase"]


def test_writer_complex_and_log_intensity(tmp_path):
    from napari_cdinn._napari.writer import write_layers

    obj = SIM["amplitude"] * np.exp(1j * SIM["phase"])
    inten = _layers.intensity_tuple(SIM["intensity"], "I")
    # the retrieval dock's frames that kept the network's start are saved as cdinn reconstruct --init nn writes them
    started = _layers.amplitude_tuple(SIM["amplitude"], "pr", nn_start=np.array([True, False, True, True]))
    write_layers(str(tmp_path / "s.npz"), [(started[0], started[1], "image")])
    np.testing.assert_array_equal(io.read_result(tmp_path / "s.npz")["start"], np.uint8([1, 0, 1, 1]))
    layer_data = [(obj, {"name": "object"}, "image"), (inten[0], inten[1], "image")]
    write_layers(str(tmp_path / "c.h5"), layer_data)
    res = io.read_result(tmp_path / "c.h5")
    np.testing.assert_allclose(res["amplitude"], SIM["amplitude"], atol=1e-6)
    np.testing.assert_allclose(res["intensity"], SIM["intensity"], rtol=1e-4, atol=1e-2)


def test_writer_saves_a_result_not_its_colours(make_napari_viewer, tmp_path):
    """The docks show a result as RGBA colours, its amplitude and phase hidden beneath: saving the colours
    alone wrote a file without the result, which the reader then refused."""
    viewer = make_napari_viewer()
    shown, amp, pha = (viewer.add_image(data, **kwargs) for data, kwargs, _ in (
        _layers.complex_tuple(SIM["amplitude"], SIM["phase"], "r complex"),
        _layers.amplitude_tuple(SIM["amplitude"], "r amplitude", chi2=np.arange(4.0)),
        _layers.phase_tuple(SIM["phase"], "r phase")))
    support = viewer.add_labels(SIM["amplitude"] > 0.1, name="r support", metadata={"cdinn_kind": "support"})
    viewer.layers.selection = {shown}
    with pytest.raises(RuntimeError, match="'r complex' shows the result as colours.*select its amplitude and phase"):
        viewer.layers.save(str(tmp_path / "colours.npz"), selected=True, plugin="napari-cdinn")
    assert not (tmp_path / "colours.npz").exists()
    viewer.layers.selection = {shown, amp, pha, support}
    path = str(tmp_path / "all.npz")
    assert viewer.layers.save(path, selected=True, plugin="napari-cdinn") == [path]
    res = io.read_result(path)
    assert sorted(k for k in res if not k.startswith("_")) == ["amplitude", "chi2", "phase", "support"]
    np.testing.assert_array_equal(res["support"], SIM["amplitude"] > 0.1)
    assert get_reader(path) is not None


def test_phase_layer_is_transparent_outside_the_object(make_napari_viewer):
    phase = np.zeros((64, 64), np.float32)  # a phase of 0 inside and outside the object
    support = np.zeros((64, 64), bool)
    support[:, :32] = True
    data, kwargs, _ = _layers.phase_tuple(phase, "pha", support=support)
    assert np.isnan(data[~support]).all() and (data[support] == 0).all()
    np.testing.assert_array_equal(_layers.layer_phase(data), phase)  # consumers read 0 back
    viewer = make_napari_viewer(show=True)  # drawn: napari renders NaN transparent
    viewer.add_image(np.full((64, 64), 100, np.uint8), name="background", colormap="gray", contrast_limits=(0, 255))
    viewer.add_image(data, **kwargs)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    h, w = shot.shape[:2]
    inside, outside = shot[h // 2, w // 2 - min(h, w) // 8, :3], shot[h // 2, w // 2 + min(h, w) // 8, :3]
    np.testing.assert_array_equal(outside, [100, 100, 100])  # the background shows through
    assert not np.array_equal(inside, outside)  # a zero phase inside the object is drawn


def test_unwrapped_phases_get_contrast_limits_that_fit():
    assert _layers.phase_limits(np.array([-np.pi, 0.5, np.pi], np.float32)) == (-np.pi, np.pi)
    lo, hi = _layers.phase_limits(np.array([np.nan, -1.0, 9.5], np.float32))
    assert lo == -np.pi and hi == pytest.approx(9.5)


def test_a_results_phase_opens_transparent_and_writes_back_unchanged(make_napari_viewer, tmp_path):
    from napari_cdinn import physics

    support = physics.support_from_amplitude(SIM["amplitude"])
    scores = {"chi2": np.array([0.01, 0.2, 0.003, 0.05], np.float32), "chi2_noise": np.full(4, 0.002, np.float32),
              "trusted": np.array([True, False, True, False])}
    io.write_result(tmp_path / "r.h5", {"amplitude": SIM["amplitude"], "phase": SIM["phase"], "support": support,
                                        **scores})
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "r.h5"), plugin="napari-cdinn")
    phase = viewer.layers["r phase"]
    for key, value in scores.items():  # the per-frame scores come with the layers, and go back with them
        np.testing.assert_array_equal(phase.metadata[key], value)
    assert np.isnan(phase.data[~support]).all() and np.isfinite(phase.data[support]).all()
    viewer.layers.selection = {viewer.layers["r amplitude"], phase}
    viewer.layers.save(str(tmp_path / "back.npz"), selected=True, plugin="napari-cdinn")
    back = io.read_result(tmp_path / "back.npz")
    np.testing.assert_array_equal(back["phase"], SIM["phase"])
    for key, value in scores.items():
        np.testing.assert_array_equal(back[key], value)
        assert back[key].dtype == value.dtype


@pytest.mark.parametrize("lazy", [False, True])
def test_counts_come_back_from_the_log_display_as_whole_numbers(tmp_path, monkeypatch, lazy):
    if lazy:
        monkeypatch.setattr(io, "LAZY_THRESHOLD", 0)  # read lazily, as a big stack is
    sim = simulate(6, seed=2, oversampling=2, photons=1e6)
    path = tmp_path / "counts.h5"
    with h5py.File(path, "w") as fh:
        fh["data"] = sim["intensity"].astype(np.uint32)
    (data, kwargs, _), = [t for t in get_reader(str(path))(str(path)) if t[2] == "image"]
    back = np.asarray(_layers.layer_intensities(data, kwargs["metadata"]))
    assert kwargs["metadata"][_layers.COUNTS] and np.array_equal(back, sim["intensity"])
    assert (io.read_stack(path) > 0).any() and _layers.whole_numbers(sim["intensity"])
    scaled = sim["intensity"] * np.float32(0.37)  # not counts: no rounding
    (data, kwargs, _) = _layers.intensity_tuple(scaled, "scaled")
    assert not kwargs["metadata"][_layers.COUNTS]
    assert np.allclose(_layers.layer_intensities(data, kwargs["metadata"]), scaled, rtol=1e-5)


def test_a_folder_of_frames_opens_as_one_stack(tmp_path):
    from test_io import _cbf_series

    frames = np.random.default_rng(0).poisson(4.0, size=(3, 16, 16))
    folder = _cbf_series(tmp_path / "run7", frames)
    (data, kwargs, kind), = get_reader(str(folder))(str(folder))
    assert kind == "image" and kwargs["name"] == "run7 intensity" and data.shape == (3, 16, 16)
    assert np.array_equal(_layers.layer_intensities(data, kwargs["metadata"]), frames)
    assert get_reader(str(tmp_path)) is None  # a folder without frame files is not ours


def test_raw_frames_sample_opens_and_prepares(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-cdinn", "raw_frames")
    raw = viewer.layers["raw detector frames"]
    values = _layers.layer_intensities(raw.data, raw.metadata)
    assert raw.data.shape == (32, 300, 260) and np.isnan(values[:, 141, 97]).all()  # the beamstop: unmeasured
    _dock, dock = viewer.window.add_plugin_dock_widget("napari-cdinn", "Prepare detector frames")
    dock.frames.value = raw
    dock.controls.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not dock.runner.running, timeout=60_000)
    assert dock.centre() == (141, 97) and viewer.layers["raw detector frames prepared"].data.shape == (32, 192, 192)
