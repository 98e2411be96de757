"""DICOM input: grey levels against the DICOM standard's formulas, computed here with NumPy
(not with pydicom's own helpers), bad files as counted skips, scan rules and the cache."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dicom_files import write_dicom
from mpitrain.data.decode import decode_native

pydicom = pytest.importorskip("pydicom")

S = 12  # image side: decoded at the source size, so no resize blurs the comparison


def decode1(path, size=S, notes=None):
    arr, max_value, ok, errors = decode_native([str(path)], size, threads=1, notes=notes)
    return arr[0], max_value, bool(ok[0]), errors


def rng_pixels(seed, high, dtype=np.uint16, low=0):
    return np.random.default_rng(seed).integers(low, high + 1, (S, S)).astype(dtype)


def as16(y):
    """[0, 1] floats as the decoder's uint16 levels."""
    return np.rint(np.asarray(y, np.float64) * 65535).astype(np.int64)


def test_16_bit_monochrome2_is_stored_as_is(tmp_path):
    x = rng_pixels(0, 65535)
    x[0, 0], x[0, 1] = 0, 65535
    arr, max_value, ok, _ = decode1(write_dicom(tmp_path / "a.dcm", x))
    assert ok and arr.dtype == np.uint16 and max_value == 65535.0
    np.testing.assert_array_equal(arr, x)


def test_12_bit_uses_the_stored_range_and_ignores_bits_above_bits_stored(tmp_path):
    x = rng_pixels(1, 4095)
    junk_high = x | np.uint16(0xA000)  # overlay / junk in the 4 unused high bits
    arr, _, ok, _ = decode1(write_dicom(tmp_path / "a.dcm", junk_high, bits_stored=12))
    assert ok
    np.testing.assert_array_equal(arr.astype(np.int64), as16(x / 4095.0))


def test_8_bit_both_photometric_interpretations_are_exact_uint8(tmp_path):
    x = rng_pixels(2, 255, np.uint8)
    arr2, max2, ok2, _ = decode1(write_dicom(tmp_path / "m2.dcm", x))
    arr1, max1, ok1, _ = decode1(write_dicom(tmp_path / "m1.dcm", x, photometric="MONOCHROME1"))
    assert ok1 and ok2 and arr2.dtype == np.uint8 and max2 == 255.0
    np.testing.assert_array_equal(arr2, x)
    np.testing.assert_array_equal(arr1, 255 - x.astype(np.int64))


def test_monochrome1_is_inverted_after_scaling(tmp_path):
    x = rng_pixels(3, 4095)
    arr, _, ok, _ = decode1(write_dicom(tmp_path / "m1.dcm", x, bits_stored=12, photometric="MONOCHROME1"))
    assert ok
    np.testing.assert_array_equal(arr.astype(np.int64), as16(1.0 - x / 4095.0))


def test_signed_pixels_map_their_signed_stored_range(tmp_path):
    x = rng_pixels(4, 2047, np.int16, low=-2048)
    arr, _, ok, _ = decode1(write_dicom(tmp_path / "s.dcm", x, bits_stored=12, signed=True))
    assert ok
    np.testing.assert_array_equal(arr.astype(np.int64), as16((x + 2048) / 4095.0))


def test_rescale_then_linear_window(tmp_path):
    # Window in modality units: HU = 2 * stored - 1000, window 300 +- 500.
    x = rng_pixels(5, 4095)
    path = write_dicom(tmp_path / "w.dcm", x, bits_stored=12, slope=2, intercept=-1000, center=300, width=1000)
    arr, _, ok, _ = decode1(path)
    hu = 2.0 * x - 1000
    c, w = 300.0, 1000.0
    expected = np.where(
        hu <= c - 0.5 - (w - 1) / 2, 0.0, np.where(hu > c - 0.5 + (w - 1) / 2, 1.0, (hu - (c - 0.5)) / (w - 1) + 0.5)
    )
    assert ok and 0 < (expected == 0).sum() < x.size and 0 < (expected == 1).sum() < x.size  # both clips hit
    np.testing.assert_array_equal(arr.astype(np.int64), as16(expected))


@pytest.mark.parametrize(
    "slope, intercept, photometric", [(2, -1000, "MONOCHROME2"), (-1, 4095, "MONOCHROME2"), (-0.5, 10, "MONOCHROME1")]
)
def test_rescale_without_window_maps_the_stored_range_through_it(tmp_path, slope, intercept, photometric):
    x = rng_pixels(21, 4095)
    path = write_dicom(tmp_path / "r.dcm", x, bits_stored=12, slope=slope, intercept=intercept, photometric=photometric)
    arr, _, ok, _ = decode1(path)
    m, ends = slope * x.astype(np.float64) + intercept, np.array([0, 4095]) * slope + intercept
    y = (m - ends.min()) / (ends.max() - ends.min())
    assert ok
    np.testing.assert_array_equal(arr.astype(np.int64), as16(1 - y if photometric == "MONOCHROME1" else y))


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_other_voi_functions(tmp_path, function):
    x = rng_pixels(6, 4095)
    arr, _, ok, _ = decode1(
        write_dicom(tmp_path / "w.dcm", x, bits_stored=12, center=1500, width=800, voi_function=function)
    )
    if function == "SIGMOID":
        expected = 1 / (1 + np.exp(-4 * (x - 1500.0) / 800.0))
    else:
        expected = np.clip((x - 1500.0) / 800.0 + 0.5, 0, 1)
    assert ok
    np.testing.assert_allclose(arr.astype(np.int64), as16(expected), atol=1)


def test_multi_valued_window_takes_the_first_and_monochrome1_inverts_the_window(tmp_path):
    x = rng_pixels(7, 4095)
    arr, _, ok, _ = decode1(
        write_dicom(
            tmp_path / "w.dcm", x, bits_stored=12, center=[2048, 100], width=[4096, 50], photometric="MONOCHROME1"
        )
    )
    expected = 1 - np.clip((x - 2047.5) / 4095 + 0.5, 0, 1)
    assert ok
    np.testing.assert_allclose(arr.astype(np.int64), as16(expected), atol=1)


def test_voi_lut_sequence_wins_over_the_window(tmp_path):
    x = rng_pixels(8, 1023)
    first = 100
    lut = (np.sqrt(np.arange(600) / 599.0) * 65535).astype(np.int64)  # 600 entries from stored value 100
    path = write_dicom(tmp_path / "l.dcm", x, bits_stored=10, center=10, width=2, voi_lut=(first, 16, lut))
    arr, _, ok, _ = decode1(path)
    expected = lut[np.clip(x.astype(np.int64) - first, 0, len(lut) - 1)] / 65535.0
    assert ok and (x < first).any() and (x >= first + len(lut)).any()
    np.testing.assert_array_equal(arr.astype(np.int64), as16(expected))


def test_multi_frame_gives_the_first_frame_and_a_note(tmp_path, capsys):
    frames = np.stack([rng_pixels(9 + i, 4095) for i in range(3)])
    path = write_dicom(tmp_path / "mf.dcm", frames, bits_stored=12, frames=3)
    notes = []
    arr, _, ok, _ = decode1(path, notes=notes)
    assert ok
    np.testing.assert_array_equal(arr.astype(np.int64), as16(frames[0] / 4095.0))
    assert notes == [(str(path), "multi-frame DICOM (3 frames): only the first frame is used")]
    decode1(path)  # without a notes list: shown as one warning line, once per process
    assert "only the first frame is used" in capsys.readouterr().err
    decode1(path)
    assert capsys.readouterr().err == ""


def test_resized_like_a_16_bit_png_of_the_same_pixels(tmp_path):
    x = np.random.default_rng(12).integers(0, 65536, (64, 48)).astype(np.uint16)
    dcm = write_dicom(tmp_path / "a.dcm", x)
    png = tmp_path / "a.png"
    assert cv2.imwrite(str(png), x)
    arr, max_value, ok, errors = decode_native([str(dcm), str(png)], 10, threads=1)
    assert ok.all() and not errors and max_value == 65535.0
    np.testing.assert_array_equal(arr[0], arr[1])
    assert arr[0].std() > 0


def test_undecodable_transfer_syntax_is_a_skip_naming_the_package(tmp_path):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here, so JPEG-LS is not unsupported")
    x = rng_pixels(13, 4095)
    good = write_dicom(tmp_path / "good.dcm", x, bits_stored=12)
    bad = write_dicom(tmp_path / "jls.dcm", x, transfer_syntax=JPEGLSLossless, junk=b"\xff\xd8junk" * 8)
    arr, _, ok, errors = decode_native([str(bad), str(good)], S, threads=1)
    assert ok.tolist() == [False, True] and [p for p, _ in errors] == [str(bad)]
    reason = errors[0][1]
    assert "JPEG-LS" in reason and "1.2.840.10008.1.2.4.80" in reason
    assert "python-gdcm" in reason and "pylibjpeg" in reason
    assert not arr[0].any()


def test_junk_jpeg2000_data_is_a_skip_not_a_crash(tmp_path):
    from pydicom.uid import JPEG2000Lossless

    bad = write_dicom(
        tmp_path / "j2k.dcm",
        rng_pixels(14, 4095),
        transfer_syntax=JPEG2000Lossless,
        junk=b"\x00\x00\x00\x0cjP  junk" * 5,
    )
    _, _, ok, errors = decode1(bad)
    assert not ok and errors and "DICOM" in errors[0][1]  # no decoder installed, or the data is junk


def test_damaged_files_are_skips(tmp_path):
    good = write_dicom(tmp_path / "a.dcm", rng_pixels(15, 4095), bits_stored=12).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(good[: len(good) // 2])
    (tmp_path / "marker-only").write_bytes(b"\0" * 128 + b"DICM" + b"\x07" * 40)
    (tmp_path / "empty.dcm").write_bytes(b"")
    paths = [str(tmp_path / n) for n in ("cut.dcm", "marker-only", "empty.dcm")]
    _, _, ok, errors = decode_native(paths, S, threads=1)
    assert not ok.any() and [p for p, _ in errors] == paths
    assert all(r and "\n" not in r for _, r in errors)


def test_scan_finds_dicom_by_extension_and_by_marker(tmp_path):
    from mpitrain.data.scan import scan

    x = rng_pixels(16, 4095)
    write_dicom(tmp_path / "d" / "A" / "x.DCM", x)
    write_dicom(tmp_path / "d" / "A" / "IM000001", x)  # no extension
    write_dicom(tmp_path / "d" / "B" / "1.2.840.113619.2.55", x)  # a UID as its name
    write_dicom(tmp_path / "d" / "B" / "y.dicom", x)
    (tmp_path / "d" / "B" / "README").write_text("not an image, no marker\n" * 10)
    (tmp_path / "d" / "B" / "notes.txt").write_bytes(b"\0" * 128 + b"DICM")  # a text name is never read
    index = scan(tmp_path / "d")
    names = [p.rsplit("/", 1)[1] for p in index.paths]
    assert names == ["IM000001", "x.DCM", "1.2.840.113619.2.55", "y.dicom"]
    assert index.labels.tolist() == [0, 0, 1, 1]


def test_cache_key_of_dicom_lists_follows_the_installed_decoders(tmp_path, monkeypatch):
    from mpitrain.data import cache, dicom

    dcm = write_dicom(tmp_path / "a.dcm", rng_pixels(17, 4095))
    png = tmp_path / "a.png"
    cv2.imwrite(str(png), rng_pixels(17, 255, np.uint8))
    before = cache.cache_key([str(dcm)], S), cache.cache_key([str(png)], S)
    monkeypatch.setattr(dicom, "signature", lambda: "pylibjpeg installed since")
    after = cache.cache_key([str(dcm)], S), cache.cache_key([str(png)], S)
    assert before[0] != after[0] and before[1] == after[1]


def test_the_signature_lists_the_decoders_pydicom_has():
    # pydicom's own RLE decoder is always there; a wrong import name made the signature
    # "no-pydicom" on every machine, so an installed decoder never refreshed the cache.
    from pydicom.uid import RLELossless

    from mpitrain.data import dicom

    decoders = dict(p.split("=", 1) for p in dicom.signature().split(";")[1:])
    assert "pydicom" in decoders[str(RLELossless)].split(",")


def test_cached_dicom_equals_decoded_and_keeps_the_note(tmp_path, capsys):
    from mpitrain.data import decode
    from mpitrain.data.cache import load_images_native

    frames = np.stack([rng_pixels(18, 4095), rng_pixels(19, 4095)])
    paths = [
        str(write_dicom(tmp_path / "mf.dcm", frames, bits_stored=12, frames=2)),
        str(write_dicom(tmp_path / "b.dcm", rng_pixels(20, 255, np.uint8))),
    ]
    first = load_images_native(paths, S, tmp_path / "cache")
    assert "mf.dcm: multi-frame" in capsys.readouterr().err
    decode._SHOWN.clear()  # as a new process would start
    again = load_images_native(paths, S, tmp_path / "cache")
    assert not first[4] and again[4]  # a miss, then a hit
    assert "mf.dcm: multi-frame" in capsys.readouterr().err  # the note was kept in the entry
    np.testing.assert_array_equal(first[0], again[0])
    arr, max_value, _, _ = decode_native(paths, S, notes=[])
    np.testing.assert_array_equal(again[0], arr)
    assert again[1] == max_value == 65535.0
    # The 8-bit row was promoted x257 next to the 12-bit one, as for PNGs.
    np.testing.assert_array_equal(again[0][1], rng_pixels(20, 255, np.uint8).astype(np.int64) * 257)
