"""--channels 3 beside the grey path: decoding, the cache key, augmentation, model.json."""

import json

import cv2
import numpy as np
import pytest

from mpitrain.data import augment
from mpitrain.data.cache import cache_key, load_images_native
from mpitrain.data.decode import decode_native
from mpitrain.errors import UserError


@pytest.fixture
def files(tmp_path):
    """A colour PNG (red left half, blue right half), a grey PNG and a colour JPEG."""
    colour = np.zeros((40, 40, 3), np.uint8)
    colour[:, :20, 2] = 200  # BGR: red
    colour[:, 20:, 0] = 150  # blue
    grey = np.tile(np.arange(40, dtype=np.uint8) * 5, (40, 1))
    paths = [tmp_path / "c.png", tmp_path / "g.png", tmp_path / "c.jpg"]
    cv2.imwrite(str(paths[0]), colour)
    cv2.imwrite(str(paths[1]), grey)
    cv2.imwrite(str(paths[2]), colour, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return [str(p) for p in paths]


def test_colour_rows_are_rgb_and_grey_sources_are_replicated(files):
    arr, max_value, ok, errors = decode_native(files, 20, channels=3)
    assert arr.shape == (3, 20, 20, 3) and arr.dtype == np.uint8 and max_value == 255.0 and ok.all() and not errors
    assert (arr[0, :, :9, 0] == 200).all() and (arr[0, :, :9, 1:] == 0).all()  # red is channel 0
    assert (arr[0, :, 11:, 2] == 150).all() and (arr[0, :, 11:, :2] == 0).all()
    assert (arr[1, ..., 0] == arr[1, ..., 1]).all() and (arr[1, ..., 0] == arr[1, ..., 2]).all()
    grey, _, _, _ = decode_native(files, 20)
    assert np.array_equal(arr[1, ..., 0], grey[1])  # the grey source's one channel, as the grey path decodes it
    assert abs(int(arr[2, 5, 5, 0]) - 200) < 8 and int(arr[2, 5, 5, 2]) < 8  # JPEG keeps the hue too


def test_one_channel_is_luma_as_before(files):
    arr, _, _, _ = decode_native(files, 20)
    assert arr.shape == (3, 20, 20)
    want = cv2.resize(cv2.imread(files[0], cv2.IMREAD_GRAYSCALE), (20, 20), interpolation=cv2.INTER_AREA)
    assert np.array_equal(arr[0], want)


@pytest.mark.parametrize("bad", [2, 4, 0, True])
def test_other_channel_counts_are_refused_in_one_line(files, bad):
    with pytest.raises(UserError, match="--channels must be 1"):
        decode_native(files, 20, channels=bad)


def test_the_cache_is_keyed_by_channels_and_grey_keys_do_not_move(files, tmp_path):
    assert cache_key(files, 20) == cache_key(files, 20, 1)
    assert cache_key(files, 20, 3) != cache_key(files, 20)
    grey, _, _, _, hit = load_images_native(files, 20, tmp_path / "c")
    assert not hit and grey.ndim == 3
    colour, _, _, _, hit = load_images_native(files, 20, tmp_path / "c")  # the grey entry answers grey
    assert hit and np.array_equal(colour, grey)
    colour, _, _, _, hit = load_images_native(files, 20, tmp_path / "c", channels=3)
    assert not hit and colour.shape == (3, 20, 20, 3)  # never the grey entry
    again, _, _, _, hit = load_images_native(files, 20, tmp_path / "c", channels=3)
    assert hit and np.array_equal(again, colour)
    part, _, _, _, hit = load_images_native(files[1:], 20, tmp_path / "c", whole=files, channels=3)
    assert hit and np.array_equal(part, colour[1:])  # rows of the whole folder's colour entry
    entries = sorted((tmp_path / "c" / "decoded").glob("*.entry"))
    assert len(entries) == 2


def test_colour_augmentation_keeps_hue_and_draws_like_grey():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (4, 24, 24), dtype=np.uint8)
    rgb = np.zeros((4, 24, 24, 3), np.uint8)
    rgb[..., 0] = grey  # all the signal in red
    out = augment.augment_batch(rgb, 255.0, "xray", seed=1, epoch=2, rank=0, step=3)
    assert out.shape == (4, 24, 24, 3) and out.dtype == np.float32
    # Same warp as the grey rows (same draws); green and blue only take the shared brightness shift.
    geo = augment.augment_batch(rgb, 255.0, augment.Policy(rotate_degrees=10, shift=0.06), 1, 2, 0, 3)
    geo_grey = augment.augment_batch(grey, 255.0, augment.Policy(rotate_degrees=10, shift=0.06), 1, 2, 0, 3)
    assert np.array_equal(geo[..., 0], geo_grey[..., 0]) and not geo[..., 1:].any()
    assert not np.array_equal(out[..., 0], rgb[..., 0] / np.float32(255))
    assert np.array_equal(out[..., 1], out[..., 2])  # the photometric change is the same on every channel
    none = augment.augment_batch(rgb, 255.0, "none", 1, 2, 0, 3)
    assert np.array_equal(none, rgb / np.float32(255))


def test_model_json_without_channels_is_one_channel(tmp_path):
    from mpitrain.evaluate import modelio

    (tmp_path / "model.keras").write_bytes(b"")
    doc = {"format": 1, "classes": ["a", "b"], "image_size": 16, "threshold": None, "threshold_method": "argmax"}
    (tmp_path / "model.json").write_text(json.dumps(doc))
    assert modelio.read_info(str(tmp_path)).channels == 1
    (tmp_path / "model.json").write_text(json.dumps({**doc, "channels": 3}))
    assert modelio.read_info(str(tmp_path)).channels == 3


def test_models_are_built_for_the_channels():
    from mpitrain.train.models import build_model

    for name in ("seed", "tiny", "xray"):
        assert build_model(name, 32, 2).input_shape == (None, 32, 32, 1)
        assert build_model(name, 32, 2, 3).input_shape == (None, 32, 32, 3)


def test_train_refuses_other_channel_counts(capsys):
    from mpitrain.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--channels", "2"])
    assert e.value.code == 2 and "--channels" in capsys.readouterr().err


def test_the_colour_sniff_counts_files_whose_channels_differ_not_three_channel_grey(tmp_path, write_image):
    from mpitrain.data.decode import sniff_colour
    from mpitrain.data.scan import scan
    from mpitrain.train.command import images_line

    root = tmp_path / "data"
    grey3 = np.repeat(np.linspace(0, 255, 64 * 64).reshape(64, 64, 1).astype(np.uint8), 3, axis=2)
    for i in range(3):
        write_image(root / "grey" / f"{i}.jpg", img=grey3)  # grey content in a 3-channel JPEG (the X-rays)
        write_image(root / "one" / f"{i}.png", value=40 * i)
    index = scan(root)
    assert sniff_colour(index.paths, index.labels) == (0, 6)
    assert images_line(64, 1, (0, 6)) == "1 channel"  # nothing is lost: nothing said
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 2] = 200  # BGR: red
    write_image(root / "red" / "0.png", img=red)
    write_image(root / "red" / "1.jpg", img=red)
    index = scan(root)
    assert sniff_colour(index.paths, index.labels) == (2, 8)
    assert sniff_colour(index.paths, index.labels, per_class=1) == (1, 3)
    line = images_line(64, 1, (2, 8))
    assert "2 of 8 sampled images are colour" in line and "--channels 3" in line
