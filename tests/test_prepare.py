"""Raw detector frames to centred patterns: the centre, the crop, the bin, the mask and `cdinn prepare`."""

import h5py
import numpy as np
import pytest
import tifffile

from napari_cdinn import io, prepare
from napari_cdinn.cli import main
from napari_cdinn.simulate import simulate


def _detector(count=24, centre=(141, 77), shape=(300, 200), seed=3, photons=1e5, families="realistic"):
    """Simulated centred 128 x 128 patterns placed on a larger detector with the beam at ``centre``,
    a beamstop over the beam, a column gap and a row gap (zeros there, and in the mask)."""
    sim = simulate(count, seed=seed, oversampling=4, photons=photons, families=families)
    cy, cx = centre
    det = np.zeros((count, *shape), np.float32)
    det[:, cy - 64:cy + 64, cx - 64:cx + 64] = sim["intensity"]
    mask = np.zeros(shape, bool)
    mask[cy - 3:cy + 4, cx - 3:cx + 4] = True
    mask[:, cx + 13:cx + 16] = True
    mask[cy + 59:cy + 63, :] = True
    det[:, mask] = 0
    return det, mask, sim["intensity"]


@pytest.mark.parametrize("centre", [(141, 77), (64, 135), (235, 64)])
@pytest.mark.parametrize("families,photons", [("paper", None), ("realistic", 1e3)])
def test_the_centre_of_a_stack_is_found_behind_a_beamstop_and_gaps(centre, families, photons):
    det, mask, _ = _detector(centre=centre, families=families, photons=photons)
    assert prepare.stack_centre(det, mask, chunk_size=7) == centre


def test_per_frame_masks_and_fluxes_leave_the_stack_centre_exact():
    """The realistic detector's frames (1e3-1e6 photons; per-frame beamstops, gaps, saturated peaks):
    each frame counts by its share and each pixel over the frames that measure it, so the bright,
    saturated frames neither outweigh the rest nor blank the middle for all of them."""
    sim = simulate(32, seed=0, oversampling=4, families="realistic", detector="realistic")
    assert sim["mask"][:, 60:68, 60:68].any(axis=(1, 2)).sum() >= 4  # frames that miss part of the middle
    det = np.zeros((32, 300, 200), np.float32)
    mask = np.ones(det.shape, bool)  # off the pattern: unmeasured
    det[:, 77:205, 13:141], mask[:, 77:205, 13:141] = sim["intensity"], sim["mask"]
    assert prepare.stack_centre(det, mask, chunk_size=5) == (141, 77)
    shares, seen = prepare.signal_shares(det, mask)
    assert seen.max() == 32 and np.isclose(shares.sum(), 32)  # every frame's shares add up to one
    assert (seen[77:205, 13:141] > 0).mean() > 0.99 and mask[:, 77:205, 13:141].any(axis=0).mean() > 0.05


def test_a_long_stack_is_sampled_in_runs_spread_over_it(monkeypatch):
    det, mask, _ = _detector(count=24)
    reads = []

    class Counted:  # a lazy stack that records what is read
        shape, dtype = det.shape, det.dtype

        def __getitem__(self, key):
            reads.append(key)
            return det[key]

    assert prepare.sample_runs(24, 1024, 16) == [(0, 24)]
    assert prepare.sample_runs(100_000, 1024, 16)[-1] == (100_000 - 64, 100_000)
    monkeypatch.setattr(prepare, "CENTRE_FRAMES", 8)
    monkeypatch.setattr(prepare, "CENTRE_BLOCKS", 4)
    runs = prepare.sample_runs(24, 8, 4)
    assert runs == [(0, 2), (7, 9), (15, 17), (22, 24)]
    calls = []
    found = prepare.stack_centre(Counted(), mask, progress=lambda d, t: calls.append((d, t)))
    assert sorted((k.start, k.stop) for k in reads) == runs and calls[-1] == (8, 8)  # those frames alone
    assert found == prepare.stack_centre(np.concatenate([det[a:b] for a, b in runs]), mask)
    assert max(abs(found[0] - 141), abs(found[1] - 77)) <= 1  # 8 frames: within a pixel


def test_a_single_symmetric_frame_gives_its_centre_and_empty_data_are_one_sentence():
    det, mask, _ = _detector(count=1, families="paper", photons=None)
    # plus its point reflection about (141, 77): reversed, pixel y holds 299 - y; rolled, 2 * 141 - y
    sym = det[0] + np.roll(det[0][::-1, ::-1], (-(299 - 2 * 141), -(199 - 2 * 77)), axis=(0, 1))
    assert prepare.friedel_centre(sym, mask) == (141, 77)
    with pytest.raises(ValueError, match="no measured signal"):
        prepare.friedel_centre(np.zeros((40, 50)))
    with pytest.raises(ValueError, match="2-D"):
        prepare.friedel_centre(np.ones((2, 40, 50)))


def test_the_crop_gives_back_the_centred_patterns_and_masks_what_was_not_measured():
    det, mask, truth = _detector(count=5)
    out, bad = prepare.prepare_frames(det, (141, 77), 128, mask=mask)
    assert out.shape == bad.shape == (5, 128, 128) and out.dtype == np.float32
    assert np.array_equal(out[~bad], truth[~bad])
    assert bad[:, 64, 64].all() and not bad[:, 0, 0].any()  # the beamstop; a measured corner
    # a square wider than the detector's room: off the chip is unmeasured, with zeros
    out, bad = prepare.prepare_frames(det, (141, 77), 256, mask=mask)
    assert out.shape == (5, 256, 256) and bad[:, :, :51].all() and (out[bad] == 0).all()
    assert np.array_equal(out[:, 64:192, 64:192][~bad[:, 64:192, 64:192]], truth[~bad[:, 64:192, 64:192]])


def test_nan_and_per_frame_masks_are_unmeasured():
    det, mask, _ = _detector(count=3)
    det[1, 141, 100] = np.nan
    per_frame = np.zeros(det.shape, bool)
    per_frame[2, 150, 80] = True
    out, bad = prepare.prepare_frames(det, (141, 77), 64, mask=per_frame)
    assert bad[1, 32, 32 + 23] and out[1, 32, 32 + 23] == 0 and np.isfinite(out).all()
    assert bad[2, 32 + 9, 32 + 3] and not bad[0, 32 + 9, 32 + 3]
    with pytest.raises(ValueError, match=r"must be shaped .* like the patterns, got \(5, 300, 200\)"):
        prepare.prepare_frames(det, (141, 77), 64, mask=np.zeros((5, 300, 200), bool))
    with pytest.raises(ValueError, match="must hold booleans or integers"):  # 0.5 read as True everywhere
        prepare.prepare_frames(det, (141, 77), 64, mask=np.full(det.shape[-2:], 0.5))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_binning_sums_counts_keeps_the_beam_at_the_centre_and_masks_partly_missed_blocks(k):
    rng = np.random.default_rng(0)
    det = rng.poisson(3.0, size=(2, 90, 110)).astype(np.float32)
    det[:, 40, 51] = 1000  # the beam
    mask = np.zeros((90, 110), bool)
    mask[35, 45] = True
    out, bad = prepare.prepare_frames(det, (40, 51), 20, k, mask)
    assert out.shape == (2, 20, 20)
    assert np.unravel_index(np.argmax(out[0]), out[0].shape) == (10, 10)
    assert np.array_equal(out, np.round(out))  # whole counts stay whole
    y0, x0 = prepare.crop_origin((40, 51), 20, k)
    block = det[0, y0 + 19 * k:y0 + 20 * k, x0 + 19 * k:x0 + 20 * k]
    assert out[0, -1, -1] == block.sum()
    assert bad[:, (35 - y0) // k, (45 - x0) // k].all() and not bad[:, 10, 10].any()
    off = y0 < 0  # the widest square runs off the chip's top: those rows are unmeasured
    assert bad[:, 0, :].all() == off and bad.sum() == 2 * (1 + off * 20)


def test_default_size_prefers_what_the_networks_read_and_stays_on_the_detector():
    assert prepare.default_size((300, 200), (141, 77)) == 128  # 154 pixels of room: the multiple of 32 below
    assert prepare.default_size((300, 200), (141, 77), 2) == 64
    assert prepare.default_size((514, 1030), (257, 515)) == 512  # an Eiger 500K
    assert prepare.default_size((30, 30), (15, 16)) == 28  # under 32: the largest even side
    assert prepare.default_size((40, 40), (0, 0)) == 2  # the beam at a corner: still a valid size
    for k in (1, 2, 3):
        size = prepare.default_size((300, 200), (141, 77), k)
        y0, x0 = prepare.crop_origin((141, 77), size, k)
        assert y0 >= 0 and x0 >= 0 and y0 + size * k <= 300 and x0 + size * k <= 200


def test_parse_centre():
    assert prepare.parse_centre("auto") == prepare.parse_centre(None) == "auto"
    assert prepare.parse_centre(" File") == "file" and prepare.parse_centre("symmetry") == "symmetry"
    assert prepare.parse_centre("257, 515.5") == (257.0, 515.5)
    for bad in ("1", "a,b", "1,2,3", "nan,1"):
        with pytest.raises(ValueError):
            prepare.parse_centre(bad)


def test_cli_prepare_then_predict(tmp_path, capsys):
    det, mask, truth = _detector(count=12)
    raw = tmp_path / "raw.h5"
    with h5py.File(raw, "w") as f:
        f["data"] = det
        f["mask"] = mask
    out = tmp_path / "prep.h5"
    assert main(["prepare", str(raw), "-o", str(out), "--chunk-size", "5"]) == 0
    err = capsys.readouterr().err
    assert "centre (y, x) = (141, 77) found by Friedel symmetry" in err and "128 x 128 patterns" in err
    with h5py.File(out) as f:
        assert f.attrs["centre"].tolist() == [141, 77] and f.attrs["size"] == 128 and f.attrs["bin"] == 1
    data, own = io.read_stack(out), io.file_mask(out)
    assert data.shape == own.shape == (12, 128, 128)
    assert np.array_equal(data[~own], truth[~own])
    binned = tmp_path / "binned.npz"
    assert main(["prepare", str(raw), "-o", str(binned), "--centre", "141,77", "--bin", "2"]) == 0
    assert "given" in capsys.readouterr().err and io.read_stack(binned).shape == (12, 64, 64)
    cxi = tmp_path / "binned.cxi"  # CXI: the mask sits beside the data, where readers look
    assert main(["prepare", str(raw), "-o", str(cxi), "--centre", "141,77", "--bin", "2"]) == 0
    assert np.array_equal(io.file_mask(cxi), io.file_mask(binned)) and io.file_mask(cxi).any()
    assert main(["predict", str(binned), "-o", str(tmp_path / "nn.npz")]) == 0
    res = np.load(tmp_path / "nn.npz")
    assert res["amplitude"].shape[0] == 12 and np.isfinite(res["chi2"]).all()


@pytest.mark.parametrize("args,message", [
    (["--size", "63"], "--size must be even"),
    (["--centre", "400,2"], "outside the 300 x 200"),
    (["--centre", "x"], "--centre"),
    (["--bin", "0"], "--bin"),
])
def test_cli_prepare_bad_arguments_are_one_line_and_keep_the_output(tmp_path, capsys, args, message):
    det, mask, _ = _detector(count=2)
    raw = tmp_path / "raw.npz"
    np.savez(raw, intensity=det, mask=mask)
    out = tmp_path / "prep.npz"
    out.write_bytes(b"keep")
    assert main(["prepare", str(raw), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert out.read_bytes() == b"keep"


def test_cli_prepare_frames_without_signal_and_non_square_patterns_say_what_to_do(tmp_path, capsys):
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((3, 50, 60), np.float32))
    assert main(["prepare", str(empty), "-o", str(tmp_path / "p.npz")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: the frames hold no measured signal to find the centre from"
    rect = tmp_path / "rect.npy"
    np.save(rect, np.ones((3, 64, 80), np.float32))
    for command in ("predict", "reconstruct"):
        assert main([command, str(rect), "-o", str(tmp_path / "r.npz")]) == 2
        assert "cdinn prepare" in capsys.readouterr().err


def _ccd(count=10, gain=7.5, level=100.0, read_noise=0.15, seed=4):
    """The detector frames of :func:`_detector` as an integrating detector reads them: ``gain`` units per
    photon on a dark level that varies over the chip, with read noise (``read_noise`` photons rms);
    and 20 dark frames."""
    det, mask, truth = _detector(count=count)
    rng = np.random.default_rng(seed)
    dark_level = level + 20 * rng.random(det.shape[1:])
    noise = lambda shape: rng.normal(0.0, read_noise * gain, shape)  # noqa: E731
    frames = det * gain + dark_level + noise(det.shape)
    darks = dark_level + noise((20, *det.shape[1:]))
    return frames.astype(np.float32), darks.astype(np.float32), mask, det


def test_integrating_detector_frames_become_photon_counts():
    frames, darks, mask, counts = _ccd()
    dark = prepare.mean_dark(darks)
    assert prepare.mean_dark(darks[0]) is not None and dark.shape == (300, 200)
    photons = prepare.to_photons(frames, dark, 7.5)
    assert np.array_equal(photons, np.round(photons)) and (photons >= 0).all()
    assert np.mean(photons == counts) > 0.999  # read noise of 0.15 photon: rounding recovers the counts
    out, bad = prepare.prepare_frames(frames, (141, 77), 64, 2, mask, dark, 7.5)
    expected, same = prepare.prepare_frames(counts, (141, 77), 64, 2, mask)
    assert np.array_equal(bad, same) and np.mean(out == expected) > 0.99
    assert prepare.stack_centre(frames, mask, dark=dark) == (141, 77)
    nan_dark = dark.copy()
    nan_dark[150, 80] = np.nan  # a pixel without a dark reading is unmeasured
    _, bad = prepare.prepare_frames(frames, (141, 77), 64, 1, mask, nan_dark, 7.5)
    assert bad[:, 150 - 141 + 32, 80 - 77 + 32].all()
    with pytest.raises(ValueError, match="positive"):
        prepare.to_photons(frames, dark, 0.0)
    with pytest.raises(ValueError, match="dark frame"):
        prepare.prepare_frames(frames, (141, 77), 64, 1, mask, dark[:10], 7.5)


def test_cli_prepare_with_a_dark_file_and_a_gain(tmp_path, capsys):
    frames, darks, mask, counts = _ccd(count=6)
    raw, dark = tmp_path / "ccd.npz", tmp_path / "dark.tif"
    np.savez(raw, data=frames, mask=mask)
    tifffile.imwrite(dark, darks)
    out = tmp_path / "photons.h5"
    assert main(["prepare", str(raw), "-o", str(out), "--dark", str(dark), "--adu-per-photon", "7.5",
                 "--centre", "141,77"]) == 0  # six frames may put the symmetry centre a pixel off
    data, bad = io.read_stack(out), io.file_mask(out)
    expected, same = prepare.prepare_frames(counts, (141, 77), 128, 1, mask)
    assert np.mean(data == expected) > 0.999 and np.array_equal(bad, same)
    with h5py.File(out) as f:
        assert f.attrs["dark"] == "dark.tif" and f.attrs["adu_per_photon"] == 7.5
    assert main(["prepare", str(raw), "-o", str(tmp_path / "x.npz"), "--dark", str(tmp_path / "none.tif")]) == 2
    assert "dark file" in capsys.readouterr().err
    np.save(tmp_path / "small.npy", darks[:, :10, :10])
    assert main(["prepare", str(raw), "-o", str(tmp_path / "x.npz"), "--dark", str(tmp_path / "small.npy")]) == 2
    assert "the dark frames are 10 x 10 pixels" in capsys.readouterr().err
    assert main(["prepare", str(raw), "-o", str(dark), "--dark", str(dark)]) == 2  # never over the dark file


def _with_beam_centre(path, det, mask, y, x, units="pixel", pixel_size=None):
    """An Eiger-like master file with one data set and the NXdetector beam centre (``units``)."""
    with h5py.File(path, "w") as f:
        f["entry/data/data"] = det
        detector = f.create_group("entry/instrument/detector")
        detector["detectorSpecific/pixel_mask"] = mask.astype(np.uint32)
        for axis, value in (("y", y), ("x", x)):
            detector[f"beam_center_{axis}"] = value
            detector[f"beam_center_{axis}"].attrs["units"] = units
            if pixel_size is not None:
                detector[f"{axis}_pixel_size"] = pixel_size
                detector[f"{axis}_pixel_size"].attrs["units"] = "m"
    return path


def test_the_beam_centre_a_file_records_is_read_in_pixels_or_lengths(tmp_path):
    det, mask, _ = _detector(count=2)
    assert io.file_beam_centre(_with_beam_centre(tmp_path / "a.h5", det, mask, 141.3, 77.0)) == (141.3, 77.0)
    mm = _with_beam_centre(tmp_path / "b.nxs", det, mask, 141 * 0.075, 77 * 0.075, "mm", 75e-6)
    assert np.allclose(io.file_beam_centre(mm), (141, 77))
    assert io.file_beam_centre(_with_beam_centre(tmp_path / "c.h5", det, mask, np.nan, 77.0)) is None
    np.save(tmp_path / "d.npy", det)
    assert io.file_beam_centre(tmp_path / "d.npy") is None


def test_cli_prepare_takes_the_files_beam_centre_and_says_when_the_frames_disagree(tmp_path, capsys):
    det, mask, truth = _detector(count=32)
    good = _with_beam_centre(tmp_path / "good.h5", det, mask, 141.2, 76.8)
    assert main(["prepare", str(good), "-o", str(tmp_path / "p.npz")]) == 0
    err = capsys.readouterr().err
    assert "(141.2, 76.8) from the file's beam centre" in err and "note:" not in err
    data, bad = io.read_stack(tmp_path / "p.npz"), io.file_mask(tmp_path / "p.npz")
    assert np.array_equal(data[~bad], truth[~bad])  # rounded to the pixel (141, 77)
    stale = _with_beam_centre(tmp_path / "stale.h5", det, mask, 150, 77)
    assert main(["prepare", str(stale), "-o", str(tmp_path / "q.npz")]) == 0
    assert "note: the file's beam centre (150, 77) lies 9 px from the frames' symmetry centre (141, 77)" in \
        capsys.readouterr().err
    assert main(["prepare", str(stale), "-o", str(tmp_path / "r.npz"), "--centre", "symmetry"]) == 0
    assert "(141, 77) found by Friedel symmetry" in capsys.readouterr().err
    plain = tmp_path / "plain.npz"
    np.savez(plain, intensity=det, mask=mask)
    assert main(["prepare", str(plain), "-o", str(tmp_path / "s.npz"), "--centre", "file"]) == 2
    assert "records no beam centre" in capsys.readouterr().err


@pytest.mark.parametrize("dtype,marker", [(np.int32, -1), (np.int32, -2), (np.uint32, 2**32 - 1), (np.uint16, 65535)])
def test_integer_detectors_marker_values_are_unmeasured(tmp_path, dtype, marker):
    det, mask, truth = _detector(count=32)
    raw = det.astype(dtype)
    raw[:, mask] = marker  # what the detector writes in its gaps and beamstop shadow, with no mask file
    assert prepare.stack_centre(raw) == (141, 77)
    out, bad = prepare.prepare_frames(raw, (141, 77), 128)
    assert np.array_equal(bad, np.broadcast_to(mask[77:205, 13:141], bad.shape)) and (out[bad] == 0).all()
    path = tmp_path / "raw.tif"
    tifffile.imwrite(path, raw)
    assert main(["prepare", str(path), "-o", str(tmp_path / "p.npz")]) == 0
    data, own = io.read_stack(tmp_path / "p.npz"), io.file_mask(tmp_path / "p.npz")
    assert np.array_equal(own, bad) and np.array_equal(data[~own], truth[~own])
    floats = det.astype(np.float32)
    floats[:, 100, 60] = -1.0  # a float reading (less its dark) may be negative: not a marker
    assert not prepare.prepare_frames(floats, (141, 77), 128)[1][:, 100 - 77, 60 - 13].any()


def test_predict_leaves_an_integer_detectors_gaps_out_as_a_mask_would(tmp_path):
    sim = simulate(8, seed=9, oversampling=2, photons=1e5)
    counts = sim["intensity"].astype(np.int32)
    gaps = np.zeros((64, 64), bool)
    gaps[:, 40:43] = True
    raw = counts.copy()
    raw[:, gaps] = -1  # a PILATUS gap
    tifffile.imwrite(tmp_path / "raw.tif", raw)
    np.savez(tmp_path / "masked.npz", intensity=counts.astype(np.float32), mask=gaps)
    assert main(["predict", str(tmp_path / "raw.tif"), "-o", str(tmp_path / "a.npz")]) == 0
    assert main(["predict", str(tmp_path / "masked.npz"), "-o", str(tmp_path / "b.npz")]) == 0
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    np.testing.assert_allclose(a["chi2"], b["chi2"], rtol=1e-4)
    np.testing.assert_allclose(a["chi2_noise"], b["chi2_noise"], rtol=1e-6)


def test_cli_prepare_reads_a_folder_of_pilatus_cbf_frames(tmp_path, capsys):
    import fabio.cbfimage

    det, mask, truth = _detector(count=32)
    raw = det.astype(np.int32)
    raw[:, mask] = -1  # the detector's marks, no mask file
    folder = tmp_path / "scan"
    folder.mkdir()
    for i, frame in enumerate(raw, start=1):
        fabio.cbfimage.CbfImage(data=frame).write(str(folder / f"scan_{i:05d}.cbf"))
    out = tmp_path / "prepared.h5"
    assert main(["prepare", str(folder / "scan_*.cbf"), "-o", str(out), "--chunk-size", "10"]) == 0
    assert "(141, 77) found by Friedel symmetry" in capsys.readouterr().err
    data, bad = io.read_stack(out), io.file_mask(out)
    expected, same = prepare.prepare_frames(det, (141, 77), 128, 1, mask)
    assert np.array_equal(bad, same) and np.array_equal(data, expected)


def test_a_large_detector_is_searched_coarse_to_fine(monkeypatch):
    det, mask, _ = _detector(count=32)
    big = np.zeros((32, 700, 500), np.float32)  # the pattern in a corner of a wide chip
    big[:, 300:600, 250:450] = det
    big_mask = np.zeros((700, 500), bool)
    big_mask[300:600, 250:450] = mask
    monkeypatch.setattr(prepare, "MAX_SIDE", 256)  # a 700-pixel chip is "large" here: binned by 3 first
    assert prepare.stack_centre(big, big_mask) == (300 + 141, 250 + 77)
