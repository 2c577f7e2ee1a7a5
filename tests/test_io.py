"""Readers and writers of napari_cdinn.io: every format, the lazy path, bad input, atomicity."""

import os

import dask.array as da
import h5py
import numpy as np
import pytest
import tifffile

from napari_cdinn import io

#: Formats that hold a stack in one file (CBF and EDF hold one frame: tested as series).
STACK_FILES = [ext for ext in io.STACK_EXTENSIONS if ext not in io.FRAME_EXTENSIONS]
RNG = np.random.default_rng(0)
STACK = RNG.poisson(50.0, size=(5, 16, 12)).astype(np.uint16)


def _write_nexus(path, data, pixel_mask=None):
    """A NeXus file whose default plot's signal is ``data``, beside another 3-D data set (a monitor)."""
    with h5py.File(path, "w") as fh:
        fh.attrs["default"] = "entry"
        entry = fh.create_group("entry")
        entry.attrs["default"] = "plot"
        plot = entry.create_group("plot")
        plot.attrs["signal"] = "counts"
        plot["counts"] = data
        plot["monitor"] = np.ones(data.shape)
        if pixel_mask is not None:
            fh["entry/instrument/detector/pixel_mask"] = pixel_mask
    return path


def _write_stack(path, data):
    ext = os.path.splitext(path)[1]
    if ext == ".npy":
        np.save(path, data)
    elif ext == ".npz":
        np.savez(path, intensity=data, amplitude=np.ones(3))
    elif ext in (".tif", ".tiff"):
        tifffile.imwrite(path, data)
    elif ext in (".h5", ".hdf5"):
        with h5py.File(path, "w") as fh:
            fh["meta/energy"] = np.arange(3.0)
            fh.create_dataset("data", data=data, chunks=(1,) + data.shape[1:], compression="gzip")
    elif ext == ".nxs":
        _write_nexus(path, data)
    elif ext == ".cxi":
        with h5py.File(path, "w") as fh:
            fh["entry_1/instrument_1/detector_1/data"] = data
    return path


@pytest.mark.parametrize("ext", STACK_FILES)
@pytest.mark.parametrize("lazy", [False, True])
def test_read_every_format(tmp_path, ext, lazy):
    path = _write_stack(str(tmp_path / f"stack{ext}"), STACK)
    out = io.read_stack(path, lazy=lazy)
    assert out.dtype == np.float32 and out.shape == STACK.shape
    if lazy and ext != ".npz":
        assert isinstance(out, da.Array)
        np.testing.assert_array_equal(np.asarray(out[2]), STACK[2])
    np.testing.assert_array_equal(np.asarray(out), STACK.astype(np.float32))


@pytest.mark.parametrize("ext", STACK_FILES)
def test_read_frames_and_stack_shape_read_only_what_is_asked(tmp_path, ext):
    path = _write_stack(str(tmp_path / f"stack{ext}"), STACK)
    assert io.stack_shape(path) == STACK.shape
    out = io.read_frames(path, 1, 3)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, STACK[1:3])
    one = _write_stack(str(tmp_path / f"one{ext}"), STACK[0])
    assert io.stack_shape(one) == STACK.shape[1:]
    np.testing.assert_array_equal(io.read_frames(one, 0, 1), STACK[:1])


def test_single_frame_and_fallback_names(tmp_path):
    frame = RNG.random((8, 8))  # float64 -> float32
    np.savez(tmp_path / "one.npz", only=frame)
    out = io.read_stack(tmp_path / "one.npz")
    assert out.shape == (8, 8) and out.dtype == np.float32
    np.savez(tmp_path / "d.npz", data=frame, other=frame * 2)
    np.testing.assert_allclose(io.read_stack(tmp_path / "d.npz"), frame.astype(np.float32))
    with h5py.File(tmp_path / "deep.h5", "w") as fh:
        fh["scan/1/frames"] = STACK
        fh["scan/1/energy"] = np.arange(5.0)
    np.testing.assert_array_equal(io.read_stack(tmp_path / "deep.h5"), STACK)
    with h5py.File(tmp_path / "x.cxi", "w") as fh:
        fh["entry_1/data_1/data"] = STACK[:2]
        fh["entry_1/instrument_1/detector_1/data"] = STACK
    assert io.read_stack(tmp_path / "x.cxi").shape == (2, 16, 12)


def test_nan_and_negative_values_are_kept(tmp_path):
    frame = np.array([[np.nan, -1.0], [2.0, 3.0]])
    np.save(tmp_path / "odd.npy", frame)
    out = io.read_stack(tmp_path / "odd.npy")
    assert np.isnan(out[0, 0]) and out[0, 1] == -1.0


def test_lazy_is_automatic_above_the_threshold(tmp_path, monkeypatch):
    path = _write_stack(str(tmp_path / "big.h5"), STACK)
    assert isinstance(io.read_stack(path), np.ndarray)
    monkeypatch.setattr(io, "LAZY_THRESHOLD", 100)
    out = io.read_stack(path)
    assert isinstance(out, da.Array) and out.chunks[1] == (16,)
    import pickle

    np.testing.assert_array_equal(pickle.loads(pickle.dumps(out)).compute(), STACK)


def test_compressed_tiff_is_read_page_by_page(tmp_path):
    path = str(tmp_path / "c.tif")
    tifffile.imwrite(path, STACK, compression="zlib")
    out = io.read_stack(path, lazy=True)
    assert isinstance(out, da.Array)
    np.testing.assert_array_equal(out[1:4, 2:5].compute(), STACK[1:4, 2:5])
    np.testing.assert_array_equal(io.read_stack(path, lazy=False), STACK)  # whole: indexed with `...`


def test_tiff_pages_of_different_sizes_are_refused(tmp_path):
    with tifffile.TiffWriter(tmp_path / "mixed.tif") as tif:
        tif.write(STACK[0])
        tif.write(STACK[0, :8, :8])
    with pytest.raises(ValueError, match="holds images of different sizes .8 x 8, 16 x 12.; expected one stack"):
        io.read_stack(tmp_path / "mixed.tif")


def test_npz_members_open_without_reading_them(tmp_path):
    np.savez(tmp_path / "s.npz", intensity=STACK, mask=np.zeros(STACK.shape[1:], bool))
    np.savez_compressed(tmp_path / "c.npz", intensity=STACK, mask=np.ones(STACK.shape[1:], bool))
    assert isinstance(io._open_source(tmp_path / "s.npz")[1], np.memmap)
    for name in ("s.npz", "c.npz"):
        np.testing.assert_array_equal(io.read_frames(tmp_path / name, 1, 4), STACK[1:4])
        np.testing.assert_array_equal(io.read_stack(tmp_path / name, lazy=True).compute(), STACK)
        assert io.file_mask(tmp_path / name).shape == STACK.shape[1:]
    np.savez(tmp_path / "obj.npz", intensity=np.array([{}, 1], dtype=object))
    with pytest.raises(ValueError, match="holds Python objects"):
        io.read_stack(tmp_path / "obj.npz")


def test_values_beyond_float32_and_empty_data_sets_raise_one_sentence(tmp_path):
    np.save(tmp_path / "big.npy", np.array([[[1.0, -1e300]]]))
    with pytest.raises(ValueError, match="beyond float32's range .such as -1e.300, frame 0."):
        io.read_stack(tmp_path / "big.npy", lazy=False)
    np.save(tmp_path / "inf.npy", np.array([[[1.0, np.inf]]]))  # infinite stays infinite: unmeasured
    assert np.isinf(io.read_frames(tmp_path / "inf.npy", 0, 1)).any()
    with h5py.File(tmp_path / "null.h5", "w") as fh:
        fh.create_dataset("data", data=h5py.Empty("f4"))
    with pytest.raises(ValueError, match="is empty"):
        io.stack_shape(tmp_path / "null.h5")


def test_an_output_that_is_its_input_is_refused(tmp_path):
    src = _write_stack(str(tmp_path / "a.h5"), STACK)
    os.symlink(src, tmp_path / "b.h5")
    for out in (src, tmp_path / "b.h5"):
        with pytest.raises(ValueError, match="is the input file"):
            io.check_not_input(out, src)
    io.check_not_input(tmp_path / "new.h5", src)


def _bad(tmp_path, name, content=None, array=None):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    if array is not None:
        np.save(path, array)
    return path


@pytest.mark.parametrize(
    "name, content, array, match",
    [
        ("missing.npy", None, None, "no such file"),
        ("empty.h5", b"", None, "is empty"),
        ("text.npy", b"hello world\n", None, "not a NumPy"),
        ("text.h5", b"hello world\n", None, "not a valid HDF5"),
        ("text.tif", b"hello world\n", None, "not a readable TIFF"),
        ("text.npz", b"hello world\n", None, "not a valid .npz"),
        ("line.npy", None, np.arange(5.0), "1-D"),
        ("four.npy", None, np.zeros((2, 2, 2, 2)), "4-D"),
        ("complex.npy", None, np.zeros((4, 4), complex), "complex"),
        ("flat.npy", None, np.zeros((0, 4)), "empty"),
        ("notes.txt", b"hi", None, "unsupported extension"),
    ],
)
def test_bad_input_raises_one_sentence(tmp_path, name, content, array, match):
    path = _bad(tmp_path, name, content, array)
    with pytest.raises((ValueError, OSError), match=match) as info:
        io.read_stack(path)
    assert "\n" not in str(info.value)


def test_truncated_and_empty_containers(tmp_path):
    np.save(tmp_path / "t.npy", STACK)
    raw = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated"):
        io.read_stack(tmp_path / "t.npy")
    with h5py.File(tmp_path / "none.h5", "w") as fh:
        fh["x"] = np.arange(3)
    with pytest.raises(ValueError, match="no 2-D or 3-D data set"):
        io.read_stack(tmp_path / "none.h5")
    with h5py.File(tmp_path / "none.cxi", "w") as fh:
        fh["entry_1/other"] = STACK
    with pytest.raises(ValueError, match="entry_1/data_1/data"):
        io.read_stack(tmp_path / "none.cxi")
    np.savez(tmp_path / "many.npz", a=STACK, b=STACK)
    with pytest.raises(ValueError, match="several arrays"):
        io.read_stack(tmp_path / "many.npz")


RESULT = {
    "amplitude": RNG.random((3, 8, 8)).astype(np.float32),
    "phase": RNG.uniform(-np.pi, np.pi, (3, 8, 8)).astype(np.float32),
    "chi2": RNG.random(3).astype(np.float32),
    "support": RNG.random((3, 8, 8)) > 0.5,
}
ATTRS = {"model": "paper", "iterations": 620, "scale": 0.5, "twin": False, "sizes": [1, 2], "extra": {"a": 1}}


@pytest.mark.parametrize("ext", io.RESULT_EXTENSIONS)
def test_result_round_trip(tmp_path, ext):
    path = tmp_path / f"res{ext}"
    io.write_result(path, RESULT, ATTRS)
    arrays, attrs = io.read_result(path, with_attrs=True)
    assert set(arrays) == set(RESULT)
    for key, value in RESULT.items():
        np.testing.assert_array_equal(arrays[key], value)
        assert arrays[key].dtype == value.dtype
    assert {k: attrs[k] for k in ("model", "iterations", "scale", "twin", "sizes")} == {
        k: ATTRS[k] for k in ("model", "iterations", "scale", "twin", "sizes")
    }
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp" + ext)]


def test_h5_is_compressed_and_cxi_has_a_cxi_tree(tmp_path):
    io.write_result(tmp_path / "r.h5", RESULT)
    with h5py.File(tmp_path / "r.h5") as fh:
        assert fh["amplitude"].compression == "gzip" and fh["amplitude"].chunks[1:] == (8, 8)
    data = dict(RESULT, intensity=STACK[:3])
    io.write_result(tmp_path / "r.cxi", data)
    with h5py.File(tmp_path / "r.cxi") as fh:
        assert fh["cxi_version"][()] == 150
        np.testing.assert_array_equal(fh["entry_1/result_1/phase"], RESULT["phase"])
        obj = fh["entry_1/image_1/data"][()]
        np.testing.assert_allclose(np.abs(obj), RESULT["amplitude"], rtol=1e-5)
    np.testing.assert_array_equal(io.read_stack(tmp_path / "r.cxi"), STACK[:3])


def test_failed_write_keeps_the_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "keep.cxi"
    io.write_result(path, {"amplitude": np.ones((2, 2))})
    before = path.read_bytes()
    with pytest.raises(ValueError, match="expected numbers"):
        io.write_result(path, {"amplitude": np.ones((2, 2)), "bad": np.array(["x"])})

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(io, "_write_cxi_tree", fail)  # fails after the datasets are written
    with pytest.raises(OSError, match="disk full"):
        io.write_result(path, RESULT)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.cxi"]


@pytest.mark.parametrize(
    "path, arrays, match",
    [
        ("r.tif", {"a": np.ones(2)}, "unsupported extension"),
        ("r.npz", {}, "no result arrays"),
        ("r.npz", {"a/b": np.ones(2)}, "not a valid result name"),
        ("missing/r.npz", {"a": np.ones(2)}, "does not exist"),
    ],
)
def test_write_result_bad_input(tmp_path, path, arrays, match):
    with pytest.raises((ValueError, OSError), match=match):
        io.write_result(tmp_path / path, arrays)


def test_a_folder_that_refuses_new_files_names_the_output(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io.tempfile, "mkstemp", refuse)
    with pytest.raises(OSError, match=r"could not write '.*r\.npz': Permission denied"):
        io.write_result(tmp_path / "r.npz", {"a": np.ones(2)})
    assert not list(tmp_path.iterdir())


def test_read_result_selected_keys(tmp_path):
    for ext in (".npz", ".h5"):
        io.write_result(tmp_path / f"r{ext}", RESULT)
        assert set(io.read_result(tmp_path / f"r{ext}", keys=["phase", "nope"])) == {"phase"}


# --------------------------------------------------------------------------- masks
MASK3 = RNG.random(STACK.shape) < 0.2
MASK2 = MASK3[0]


def _write_mask(path, mask):
    ext = os.path.splitext(path)[1]
    if ext == ".npy":
        np.save(path, mask)
    elif ext == ".npz":
        np.savez(path, mask=mask, other=np.ones(3))
    elif ext in (".tif", ".tiff"):
        tifffile.imwrite(path, mask.astype(np.uint8))
    elif ext in (".h5", ".hdf5"):
        with h5py.File(path, "w") as fh:
            fh["meta/energy"] = np.arange(3.0)
            fh["somewhere/pixels"] = mask.astype(np.int32) * 7  # the only 2-D/3-D data set; nonzero = unmeasured
    elif ext == ".nxs":
        with h5py.File(path, "w") as fh:  # NeXus: nonzero = bad, beside other data sets
            fh["entry/instrument/detector/pixel_mask"] = mask.astype(np.uint32) * 8
            fh["entry/data/data"] = np.ones(mask.shape)
    elif ext == ".cxi":
        with h5py.File(path, "w") as fh:
            fh["entry_1/instrument_1/detector_1/mask"] = mask.astype(np.uint32) * 4  # CXI: nonzero = bad
    return path


@pytest.mark.parametrize("ext", STACK_FILES)
@pytest.mark.parametrize("mask", [MASK2, MASK3], ids=["2d", "3d"])
def test_read_mask_every_format(tmp_path, ext, mask):
    path = _write_mask(str(tmp_path / f"mask{ext}"), mask)
    out = io.read_mask(path, STACK.shape)
    assert out.dtype == bool
    np.testing.assert_array_equal(out, mask)


@pytest.mark.parametrize("mask, match", [
    (MASK2.astype(np.float32), r"must hold booleans or integers \(True/1 = unmeasured\), got float32"),
    (MASK2[:, :5], r"must be shaped \(16, 12\) or \(5, 16, 12\) like the patterns, got \(16, 5\)"),
    (MASK3[:3], r"like the patterns, got \(3, 16, 12\)"),
    (np.zeros(12, bool), "shaped"),
])
def test_bad_masks_raise_one_sentence(tmp_path, mask, match):
    path = tmp_path / "m.npy"
    np.save(path, mask)
    with pytest.raises(ValueError, match=match) as info:
        io.read_mask(path, STACK.shape)
    assert "\n" not in str(info.value)


def test_file_mask_beside_the_data(tmp_path):
    npz = tmp_path / "s.npz"
    np.savez(npz, intensity=STACK, mask=MASK2)
    np.testing.assert_array_equal(io.file_mask(npz), MASK2)
    h5 = tmp_path / "s.h5"
    with h5py.File(h5, "w") as fh:
        fh["scan/frames"] = STACK  # the only image data set besides the mask
        fh["scan/mask"] = MASK3.astype(np.uint8)
    np.testing.assert_array_equal(io.read_stack(h5), STACK)
    np.testing.assert_array_equal(io.file_mask(h5), MASK3)
    for where in io.CXI_MASK_PATHS:
        cxi = tmp_path / f"s{len(where)}.cxi"
        with h5py.File(cxi, "w") as fh:
            fh["entry_1/data_1/data"] = STACK
            fh[where] = MASK2.astype(np.uint32) * 8
        np.testing.assert_array_equal(io.file_mask(cxi), MASK2)
    plain = _write_stack(str(tmp_path / "plain.h5"), STACK)
    assert io.file_mask(plain) is None
    assert io.file_mask(_write_stack(str(tmp_path / "plain.npy"), STACK)) is None
    bad = tmp_path / "bad.npz"
    np.savez(bad, intensity=STACK, mask=MASK2.astype(np.float64))
    with pytest.raises(ValueError, match="the mask in 'bad.npz' must hold booleans or integers"):
        io.file_mask(bad)


def test_a_mask_beside_unnamed_data_is_not_the_data(tmp_path):
    npz = tmp_path / "s.npz"
    np.savez(npz, frames=STACK, mask=MASK2)
    np.testing.assert_array_equal(io.read_stack(npz), STACK)
    np.testing.assert_array_equal(io.read_mask(npz, STACK.shape), MASK2)


def _eiger(tmp_path, frames=(4, 3), shape=(20, 24), compression=True):
    """A Dectris-style master file: frames in data files beside it (external links, bitshuffle/LZ4 when
    ``compression``), the pixel mask under detectorSpecific (1 = gap, 8 = hot)."""
    import h5py
    import hdf5plugin

    rng = np.random.default_rng(1)
    stack = rng.poisson(5.0, size=(sum(frames), *shape)).astype(np.uint32)
    options = hdf5plugin.Bitshuffle(cname="lz4") if compression else {}
    master = tmp_path / "scan_master.h5"
    with h5py.File(master, "w") as fh:
        start = 0
        for i, n in enumerate(frames, start=1):
            name = f"scan_data_{i:06d}.h5"
            with h5py.File(tmp_path / name, "w") as part:
                part.create_dataset("entry/data/data", data=stack[start:start + n], chunks=(1, *shape), **options)
            fh[f"entry/data/data_{i:06d}"] = h5py.ExternalLink(name, "entry/data/data")
            start += n
        pixel_mask = np.zeros(shape, np.uint32)
        pixel_mask[:, 10] = 1
        pixel_mask[3, 4] = 8
        fh["entry/instrument/detector/detectorSpecific/pixel_mask"] = pixel_mask
    return master, stack, pixel_mask != 0


def test_eiger_master_files_read_their_frames_across_data_files_with_their_pixel_mask(tmp_path, monkeypatch):
    master, stack, pixel_mask = _eiger(tmp_path)
    monkeypatch.chdir(tmp_path.parent)  # the data files are found beside the master file, not in the cwd
    assert io.stack_shape(master) == (7, 20, 24)
    assert np.array_equal(io.read_stack(master), stack.astype(np.float32))
    assert np.array_equal(io.read_stack(master, lazy=True)[2:6].compute(), stack[2:6].astype(np.float32))
    assert np.array_equal(io.read_frames(master, 3, 7), stack[3:7].astype(np.float32))  # across two files
    assert np.array_equal(io.open_stack(master)[[0, 5, 6]], stack[[0, 5, 6]])
    assert np.array_equal(io.file_mask(master), pixel_mask)


def test_an_eiger_master_file_with_one_data_file(tmp_path):
    master, stack, _ = _eiger(tmp_path, frames=(4,))  # one external link: a search of the file does not see it
    assert np.array_equal(io.read_stack(master), stack.astype(np.float32))


def test_an_eiger_master_file_without_its_data_files_is_one_sentence(tmp_path):
    master, _, _ = _eiger(tmp_path, compression=False)
    (tmp_path / "scan_data_000002.h5").unlink()
    with pytest.raises(ValueError, match="keep the master file with its data files"):
        io.read_stack(master)


def test_a_data_set_linked_to_a_missing_file_is_one_sentence(tmp_path):
    with h5py.File(tmp_path / "linked.h5", "w") as fh:
        fh["data"] = h5py.ExternalLink("elsewhere.h5", "/data")
    with pytest.raises(ValueError, match="'linked.h5': its data set 'data' is in 'elsewhere.h5', which cannot be opened"):
        io.read_stack(tmp_path / "linked.h5")


def test_nexus_files_give_their_default_signal(tmp_path):
    frames = np.arange(2 * 16 * 16, dtype=np.float32).reshape(2, 16, 16)
    path = _write_nexus(tmp_path / "scan.nxs", frames, pixel_mask=np.eye(16, dtype=np.uint8))
    assert np.array_equal(io.read_stack(path), frames)  # the signal, not the monitor
    assert np.array_equal(io.file_mask(path), np.eye(16, dtype=bool))


@pytest.mark.parametrize("dtype,marker", [(np.int32, -1), (np.int32, -2), (np.uint16, 65535), (np.uint32, 2**32 - 1)])
def test_integer_detectors_marker_values_read_as_nan(tmp_path, monkeypatch, dtype, marker):
    data = STACK.astype(dtype)
    data[:, 3, :] = marker  # a gap row, as the detector writes it
    data[2, 5, 7] = marker  # a bad pixel in one frame
    path = _write_stack(str(tmp_path / "raw.h5"), data)
    want = STACK.astype(np.float32)
    want[:, 3, :] = np.nan
    want[2, 5, 7] = np.nan
    np.testing.assert_array_equal(io.read_stack(path), want)
    np.testing.assert_array_equal(io.read_frames(path, 1, 4), want[1:4])
    np.testing.assert_array_equal(io.open_stack(path, float32=True)[[0, 2]], want[[0, 2]])
    assert io.open_stack(path)[0].dtype == dtype  # as stored when not asked for float32
    monkeypatch.setattr(io, "LAZY_THRESHOLD", 0)
    np.testing.assert_array_equal(io.read_stack(path).compute(), want)


def test_float_data_keep_negative_values_and_integer_counts_keep_their_top():
    assert io.detector_markers(np.array([-1.0, 5.0]), np.float32) is None
    assert io.detector_markers(np.array([0, 7, 255], np.uint8), np.uint8).tolist() == [False, False, True]
    assert io.detector_markers(np.array([-1, 0, 127], np.int8), np.int8).tolist() == [True, False, False]


def _cbf_series(folder, frames, names=None):
    """One PILATUS CBF file per frame (int32, as the detector writes them)."""
    import fabio.cbfimage

    folder.mkdir(exist_ok=True)
    names = names or [f"scan_{i + 1:05d}.cbf" for i in range(len(frames))]
    for name, frame in zip(names, frames, strict=True):
        fabio.cbfimage.CbfImage(data=np.ascontiguousarray(frame, dtype=np.int32)).write(str(folder / name))
    return folder


def test_a_folder_or_pattern_of_one_frame_files_reads_as_one_stack(tmp_path, monkeypatch):
    frames = STACK.astype(np.int32)
    frames[:, 3, :] = -1  # PILATUS gap row
    # natural order: frame_2 before frame_10
    folder = _cbf_series(tmp_path / "scan", frames, [f"frame_{i}.cbf" for i in (1, 2, 3, 10, 11)])
    want = frames.astype(np.float32)
    want[want < 0] = np.nan
    for spec in (folder, str(folder / "frame_*.cbf")):
        assert io.stack_shape(spec) == (5, 16, 12) and io.series_files(spec)[3].endswith("frame_10.cbf")
        np.testing.assert_array_equal(io.read_stack(spec), want)
        np.testing.assert_array_equal(io.read_frames(spec, 2, 4), want[2:4])
        assert io.file_mask(spec) is None and io.input_exists(spec)
    monkeypatch.setattr(io, "LAZY_THRESHOLD", 0)
    np.testing.assert_array_equal(io.read_stack(folder).compute(), want)
    np.testing.assert_array_equal(io.read_stack(folder / "frame_3.cbf"), want[2])  # one CBF file: one frame


def test_frame_series_problems_are_one_sentence(tmp_path):
    folder = _cbf_series(tmp_path / "scan", STACK[:2].astype(np.int32))
    tifffile.imwrite(folder / "extra.tif", STACK[0])
    with pytest.raises(ValueError, match="several formats"):
        io.read_stack(folder)
    with pytest.raises(ValueError, match="no frame files"):
        io.read_stack(tmp_path / "scan" / "*.edf")
    assert not io.input_exists(tmp_path / "scan" / "*.edf")
    (folder / "extra.tif").unlink()
    _cbf_series(folder, [np.zeros((8, 8), np.int32)], ["scan_00003.cbf"])
    with pytest.raises(ValueError, match="scan_00003.cbf.*8 x 8 pixels, the series' first frame 16 x 12"):
        io.read_stack(folder)


def test_frames_cut_off_while_written_are_one_sentence_never_a_hang(tmp_path):
    """A CBF cut inside its header made fabio wait for its binary section forever; a cut EDF read its
    missing pixels as zero counts."""
    import fabio.edfimage

    folder = _cbf_series(tmp_path / "scan", STACK[:3].astype(np.int32))
    whole = (folder / "scan_00003.cbf").read_bytes()
    for cut, why in ((200, "no binary section"), (len(whole) - 40, "binary section is incomplete")):
        (folder / "scan_00003.cbf").write_bytes(whole[:cut])
        with pytest.raises(ValueError, match=f"'scan_00003.cbf' is truncated.*{why}"):
            io.read_stack(folder)
    fabio.edfimage.EdfImage(data=STACK[0].astype(np.float32)).write(str(tmp_path / "one.edf"))
    edf = (tmp_path / "one.edf").read_bytes()
    (tmp_path / "cut.edf").write_bytes(edf[: len(edf) // 2])
    with pytest.raises(ValueError, match="'cut.edf' is truncated"):
        io.read_stack(tmp_path / "cut.edf")
    np.testing.assert_array_equal(io.read_stack(tmp_path / "one.edf"), STACK[0].astype(np.float32))


def test_frames_of_another_type_are_refused_not_cast(tmp_path):
    """Casting a later frame to the first frame's type wrapped 70000 counts to 4464 in uint16."""
    folder = tmp_path / "scan"
    folder.mkdir()
    np.save(folder / "f0.npy", STACK[0])
    np.save(folder / "f1.npy", STACK[1].astype(np.float32) * 2000)
    np.save(folder / ".f2.npy", STACK[2])  # hidden files (macOS ._ files) are not frames
    assert io.stack_shape(folder) == (2, 16, 12)
    with pytest.raises(ValueError, match="'f1.npy' stores float32 values, the series' first frame uint16"):
        io.read_stack(folder)


def test_eiger_data_files_of_different_types_are_refused(tmp_path):
    master, stack, _ = _eiger(tmp_path, compression=False)
    with h5py.File(tmp_path / "scan_data_000002.h5", "w") as part:
        part["entry/data/data"] = stack[4:].astype(np.uint16)
    with pytest.raises(ValueError, match="differ in type .uint16, uint32."):
        io.read_stack(master)


def test_tiff_frames_written_one_by_one_read_as_one_stack(tmp_path):
    """tifffile stores frames written one call each as series of their own: never read the first alone."""
    with tifffile.TiffWriter(tmp_path / "each.tif") as tif:
        for frame in STACK:
            tif.write(frame, photometric="minisblack")
    with tifffile.TiffWriter(tmp_path / "parts.tif") as tif:
        tif.write(STACK[:3], photometric="minisblack")
        tif.write(STACK[3:], photometric="minisblack")
    for name in ("each.tif", "parts.tif"):
        assert io.stack_shape(tmp_path / name) == STACK.shape
        np.testing.assert_array_equal(io.read_stack(tmp_path / name), STACK.astype(np.float32))
        np.testing.assert_array_equal(io.read_frames(tmp_path / name, 1, 4), STACK[1:4].astype(np.float32))
    with tifffile.TiffWriter(tmp_path / "types.tif") as tif:
        tif.write(STACK[0])
        tif.write(STACK[1].astype(np.float32))
    with pytest.raises(ValueError, match="holds images of different types .float32, uint16."):
        io.read_stack(tmp_path / "types.tif")


def test_a_truncated_tiff_names_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "s.tif", STACK)
    (tmp_path / "cut.tif").write_bytes((tmp_path / "s.tif").read_bytes()[:500])
    with pytest.raises(ValueError, match="'cut.tif' is not a readable TIFF"):
        io.read_stack(tmp_path / "cut.tif")


def test_a_cbf_mask_file_reads(tmp_path):
    folder = _cbf_series(tmp_path / "masks", [MASK2.astype(np.int32) * 3])
    np.testing.assert_array_equal(io.read_mask(folder / "scan_00001.cbf", STACK.shape), MASK2)


def test_in_memory_integer_stacks_read_their_marks_as_unmeasured_like_files():
    from napari_cdinn.stream import iter_chunks

    data = STACK.astype(np.int32)
    data[:, 3, :] = -1
    chunks = [res["frames"] for _a, _b, res in iter_chunks(data, lambda x, first_frame=0: {"frames": x}, chunk_size=2)]
    got = np.concatenate(chunks)
    assert got.dtype == np.float32 and np.isnan(got[:, 3, :]).all()
    np.testing.assert_array_equal(np.delete(got, 3, axis=1), np.delete(STACK, 3, axis=1).astype(np.float32))
