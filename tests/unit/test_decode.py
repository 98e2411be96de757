"""Decoding: bit depths, channel layouts, resizing, bad files and stderr noise."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from mpitrain.data.decode import decode_images, decode_native
from mpitrain.errors import UserError


def _one(path, size=8, **kw):
    x, ok, errors = decode_images([str(path)], size, **kw)
    assert x.shape == (1, size, size, 1) and x.dtype == np.float32
    return x[0, :, :, 0], bool(ok[0]), errors


def test_gray_8bit_png_values(tmp_path, write_image):
    img = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    img[0, 0], img[0, 1] = 0, 255
    x, ok, errors = _one(write_image(tmp_path / "g.png", img), size=16)
    assert ok and errors == []
    np.testing.assert_array_equal(x, img.astype(np.float32) / np.float32(255))
    assert x.min() == 0.0 and x.max() == 1.0


@pytest.mark.parametrize("channels", [3, 4])
def test_rgb_and_rgba_png_become_gray(tmp_path, write_image, channels):
    img = np.zeros((12, 12, channels), np.uint8)
    img[..., :3] = (30, 120, 210)  # B, G, R
    if channels == 4:
        img[..., 3] = 0  # fully transparent: alpha is ignored
    x, ok, _ = _one(write_image(tmp_path / "c.png", img), size=12)
    expected = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2GRAY)[0, 0] / 255.0
    assert ok
    assert np.allclose(x, expected, atol=1 / 255)


def test_16bit_png_scaled_by_65535(tmp_path, write_image):
    img = np.full((10, 10), 65535, np.uint16)
    img[:5] = 32768
    p16 = write_image(tmp_path / "d16.png", img)
    p8 = write_image(tmp_path / "d8.png", value=51, size=10)
    x, ok, errors = decode_images([str(p16), str(p8)], 10)
    assert ok.all() and errors == []
    assert x[0].max() == 1.0 and abs(x[0, 0, 0, 0] - 32768 / 65535) < 1e-6
    assert x[1, 0, 0, 0] == np.float32(51) / np.float32(255)  # same value as 8-bit alone
    arr, max_value, _, _ = decode_native([str(p16), str(p8)], 10)
    assert arr.dtype == np.uint16 and max_value == 65535.0


@pytest.mark.parametrize("ext", [".bmp", ".tif", ".jpg"])
def test_other_formats(tmp_path, write_image, ext):
    x, ok, _ = _one(write_image(tmp_path / f"a{ext}", value=100, size=20), size=10)
    assert ok and np.allclose(x, 100 / 255, atol=2 / 255)


def test_resize_uses_inter_area(tmp_path, write_image):
    img = np.random.default_rng(0).integers(0, 256, (40, 60), dtype=np.uint8)
    x, ok, _ = _one(write_image(tmp_path / "r.png", img), size=10)
    expected = cv2.resize(img, (10, 10), interpolation=cv2.INTER_AREA) / np.float32(255)
    assert ok and np.array_equal(x, expected.astype(np.float32))


def test_large_jpeg_reduced_decode_is_close_to_full(tmp_path, write_image):
    yy, xx = np.mgrid[0:640, 0:480]
    img = ((xx + yy) * 255 // (640 + 480)).astype(np.uint8)  # smooth: sizes must agree
    path = write_image(tmp_path / "big.jpg", img)
    x, ok, _ = _one(path, size=50)
    full = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_GRAYSCALE)
    ref = cv2.resize(full, (50, 50), interpolation=cv2.INTER_AREA) / 255.0
    assert ok and np.abs(x - ref).max() <= 3 / 255


def _bad_files(tmp_path, write_image):
    noise = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    good_jpg = write_image(tmp_path / "src.jpg", noise).read_bytes()
    good_png = write_image(tmp_path / "src.png", np.full((64, 64), 90, np.uint8)).read_bytes()
    files = {
        "empty": (tmp_path / "empty.png", b""),
        "truncated jpeg": (tmp_path / "trunc.jpg", good_jpg[: len(good_jpg) * 2 // 3]),
        "truncated png": (tmp_path / "trunc.png", good_png[: len(good_png) - 20]),
        "random bytes": (tmp_path / "noise.jpg", os.urandom(3000)),
        "random bytes png": (tmp_path / "noise.png", os.urandom(100)),
    }
    for path, data in files.values():
        path.write_bytes(data)
    (tmp_path / "x.png").mkdir()
    paths = {k: str(p) for k, (p, _) in files.items()}
    paths["directory"] = str(tmp_path / "x.png")
    paths["missing"] = str(tmp_path / "missing.png")
    return paths


def test_bad_files_are_skipped_with_a_reason(tmp_path, write_image, capfd):
    bad = _bad_files(tmp_path, write_image)
    good = str(write_image(tmp_path / "ok.png", value=255))
    paths = [good, *bad.values(), good]
    x, ok, errors = decode_images(paths, 8, threads=2)
    assert ok.tolist() == [True] + [False] * len(bad) + [True]
    assert (x[1:-1] == 0).all() and (x[0] == 1).all() and (x[-1] == 1).all()
    reasons = dict(errors)
    assert list(reasons) == list(bad.values())
    assert "empty" in reasons[bad["empty"]]
    assert "truncated JPEG" in reasons[bad["truncated jpeg"]]
    assert "truncated PNG" in reasons[bad["truncated png"]]
    assert "not a decodable image" in reasons[bad["random bytes"]]
    assert "directory" in reasons[bad["directory"]]
    assert "cannot read" in reasons[bad["missing"]]
    assert all(r and "\n" not in r for r in reasons.values())
    assert capfd.readouterr().err == ""  # no OpenCV / libjpeg / libpng spam


def test_jpeg_cut_inside_its_header(tmp_path, write_image):
    data = write_image(tmp_path / "a.jpg", value=5).read_bytes()
    (tmp_path / "a.jpg").write_bytes(data[:100])
    _, ok, errors = _one(tmp_path / "a.jpg")
    assert not ok and "JPEG" in errors[0][1]


def test_corrupt_jpeg_body_is_quiet(tmp_path, write_image, capfd):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    data = bytearray(write_image(tmp_path / "a.jpg", noise).read_bytes())
    mid = len(data) // 2
    data[mid : mid + 40] = b"\x00" * 40
    (tmp_path / "a.jpg").write_bytes(bytes(data))
    decode_images([str(tmp_path / "a.jpg")], 8)  # may decode with artefacts; must not raise
    assert "Corrupt JPEG" not in capfd.readouterr().err


def test_threads_give_identical_results(image_tree):
    from mpitrain.data.scan import scan

    paths = scan(image_tree).paths * 7
    x1, ok1, e1 = decode_images(paths, 8, threads=1)
    x3, ok3, e3 = decode_images(paths, 8, threads=3)
    assert np.array_equal(x1, x3) and np.array_equal(ok1, ok3) and e1 == e3 == []


def test_empty_list_and_bad_size():
    x, ok, errors = decode_images([], 8)
    assert x.shape == (0, 8, 8, 1) and ok.shape == (0,) and errors == []
    with pytest.raises(UserError, match="image size"):
        decode_images([], 0)


@pytest.mark.parametrize("kind", ["jpg", "png"])
def test_truncated_file_is_skipped_even_if_the_decoder_returns_an_image(tmp_path, write_image, monkeypatch, kind):
    # Some OpenCV builds (libjpeg-turbo, libpng) return a partially decoded image for a
    # truncated file instead of failing; this one refuses them, so we fake the lenient one:
    # the truncation must be caught on the bytes, before decoding.
    noise = np.random.default_rng(2).integers(0, 256, (64, 64), dtype=np.uint8)
    data = write_image(tmp_path / f"src.{kind}", noise).read_bytes()
    cut = data[: len(data) * 2 // 3] if kind == "jpg" else data[: len(data) - 20]
    path = tmp_path / f"cut.{kind}"
    path.write_bytes(cut)
    calls = []

    def partial_decode(buf, flags):
        calls.append(len(buf))
        img = np.full((64, 64), 77, np.uint8)
        img[32:] = 0  # the missing lower half, as a lenient decoder fills it
        return img

    monkeypatch.setattr(cv2, "imdecode", partial_decode)
    good = write_image(tmp_path / "good.png", value=200)
    x, ok, errors = decode_images([str(good), str(path)], 8, threads=1)
    assert calls  # the fake is in use: the good file went through it
    assert ok.tolist() == [True, False]
    assert (x[1] == 0).all()
    assert errors == [
        (
            str(path),
            f"truncated {kind.upper().replace('JPG', 'JPEG')} "
            + ("(no end-of-image marker)" if kind == "jpg" else "(no IEND chunk)"),
        )
    ]
