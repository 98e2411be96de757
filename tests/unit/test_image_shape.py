"""--image-size WxH beside the square PX: parsing, decoding, the cache, augmentation, models,
model.json, ensembles and the command lines that take it."""

import importlib
import json

import cv2
import numpy as np
import pytest

from mpitrain.cli import main
from mpitrain.config import TrainConfig, check_image_size, image_shape, image_size_value, parse_image_size
from mpitrain.data import augment
from mpitrain.data.cache import cache_key, load_images_native
from mpitrain.data.decode import decode_native
from mpitrain.errors import UserError


@pytest.mark.parametrize(
    "text, value, shape",
    [("64", 64, (64, 64)), ("96x64", "96x64", (64, 96)), (" 24 X 16 ", "24x16", (16, 24)), ("32x32", 32, (32, 32))],
)
def test_sizes_parse_to_a_square_int_or_width_by_height(text, value, shape):
    assert parse_image_size(text) == value
    assert image_shape(text) == shape and image_shape(value) == shape
    assert image_size_value(shape) == value  # (height, width) back to the config's value


@pytest.mark.parametrize("text", ["96x", "abc", "x64", "64x64x3", "-5", "6.5", ""])
def test_malformed_sizes_are_one_line_errors(text):
    with pytest.raises(UserError, match="PX .* or WxH") as e:
        parse_image_size(text)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("size, got", [("0x5", "0x5"), ("2000x64", "2000x64"), ("64x4", "64x4"), (4, "4")])
def test_each_side_must_be_in_range(size, got):
    with pytest.raises(UserError, match=f"from 8 to 1024 pixels.*got {got}$"):
        check_image_size(size)


def test_the_config_keeps_an_int_for_squares_and_wxh_text_otherwise():
    assert TrainConfig(image_size=64).image_size == 64
    assert TrainConfig(image_size="64x64").image_size == 64  # a square is a square
    cfg = TrainConfig(image_size="96x64")
    assert cfg.image_size == "96x64"
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = TrainConfig(image_size=50).to_dict()  # config.json as every earlier version wrote it
    assert TrainConfig.from_dict(old).image_size == 50 and isinstance(old["image_size"], int)
    with pytest.raises(UserError, match="--image-size"):
        TrainConfig(image_size="96x4")


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--epochs", "1"],
        ["data", "--data", "nowhere"],
        ["bench"],
        ["synth", "--out", "nowhere"],
        ["evaluate", "--model", "nowhere", "--data", "nowhere"],
        ["predict", "--model", "nowhere", "nowhere"],
    ],
)
@pytest.mark.parametrize("bad", ["96x", "abc"])
def test_every_command_refuses_a_malformed_size_in_one_line(command, bad, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--image-size", bad])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--image-size" in err and repr(bad) in err, err


@pytest.mark.parametrize("command", [["train", "--epochs", "1"], ["bench"], ["synth", "--out", "nowhere"]])
def test_a_side_out_of_range_is_one_line_before_anything_runs(command, capsys, tmp_path):
    assert main([*command, "--image-size", "0x5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "on each side, got 0x5" in err, err


@pytest.fixture
def top_white(tmp_path):
    """120 wide x 80 high: the top half white, the bottom half black; as PNG, a small
    colour PNG and a JPEG large enough for the DCT-domain reduction."""
    img = np.zeros((80, 120), np.uint8)
    img[:40] = 255
    paths = [tmp_path / "g.png", tmp_path / "c.png", tmp_path / "big.jpg"]
    cv2.imwrite(str(paths[0]), img)
    cv2.imwrite(str(paths[1]), cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
    big = cv2.resize(img, (960, 640), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(paths[2]), big, [cv2.IMWRITE_JPEG_QUALITY, 98])
    return [str(p) for p in paths]


@pytest.mark.parametrize("channels", [1, 3])
def test_a_wxh_size_decodes_to_height_rows_of_width_pixels(top_white, channels):
    arr, _, ok, _ = decode_native(top_white, image_shape("24x16"), channels=channels)
    assert ok.all() and arr.shape == (3, 16, 24) + ((3,) if channels == 3 else ())
    rows = arr if channels == 1 else arr[..., 0]
    # Width and height not swapped: the white half is the top 8 of 16 rows, across all 24 columns.
    assert (rows[:, :7] >= 250).all() and (rows[:, 9:] <= 5).all()
    want = cv2.resize(cv2.imread(top_white[0], cv2.IMREAD_GRAYSCALE), (24, 16), interpolation=cv2.INTER_AREA)
    assert np.array_equal(rows[0], want)
    assert np.array_equal(decode_native(top_white, "24x16", channels=channels)[0], arr)  # "WxH" text alike


def test_a_square_size_decodes_as_an_int_or_a_pair(top_white):
    assert np.array_equal(decode_native(top_white, 16)[0], decode_native(top_white, (16, 16))[0])


def test_the_cache_key_holds_both_sides_and_squares_keep_theirs(top_white, tmp_path):
    assert cache_key(top_white, 16) == cache_key(top_white, (16, 16)) == cache_key(top_white, "16x16")
    keys = {cache_key(top_white, s) for s in (16, 24, "24x16", "16x24")}
    assert len(keys) == 4
    assert cache_key(top_white, "24x16", 3) != cache_key(top_white, "24x16")
    first, _, _, _, hit = load_images_native(top_white, "24x16", tmp_path / "c")
    again, _, _, _, hit2 = load_images_native(top_white, (16, 24), tmp_path / "c")
    other, _, _, _, hit3 = load_images_native(top_white, "16x24", tmp_path / "c")
    assert (hit, hit2, hit3) == (False, True, False)
    assert np.array_equal(first, again) and first.shape == (3, 16, 24) and other.shape == (3, 24, 16)


def test_augmentation_keeps_a_non_square_shape_and_centre():
    rows = np.zeros((4, 16, 24), np.uint8)
    rows[:, 6:10, 10:14] = 255  # a block at the centre
    for policy in ("xray", "xray-strong"):
        out = augment.augment_batch(rows, 255.0, policy, 0, 0, 0, 0)
        assert out.shape == (4, 16, 24, 1)
        colour = augment.augment_batch(np.repeat(rows[..., None], 3, axis=3), 255.0, policy, 0, 0, 0, 0)
        assert colour.shape == (4, 16, 24, 3)
    # A pure rotation turns about the centre of the W x H image: its centre pixel stays put.
    turn = augment.Policy(rotate_degrees=30.0)
    m = augment.affine_matrices(augment.batch_rng(0, 0, 0, 0), 3, (16, 24), turn)
    centre = np.array([(24 - 1) / 2, (16 - 1) / 2, 1.0])
    assert np.allclose(m @ centre, centre[:2])
    # Shifts are fractions of the width (x) and of the height (y).
    shift = augment.Policy(shift=0.5)
    rng = augment.batch_rng(1, 0, 0, 0)
    m = augment.affine_matrices(rng, 2000, (16, 24), shift)
    moved = m @ centre - centre[:2]
    assert 11.0 < np.abs(moved[:, 0]).max() <= 12.0 and 7.0 < np.abs(moved[:, 1]).max() <= 8.0


@pytest.mark.parametrize("name", ["tiny", "seed", "xray"])
@pytest.mark.parametrize("channels", [1, 3])
def test_registry_models_take_height_by_width_input(name, channels):
    from mpitrain.train.models import build_model

    model = build_model(name, "48x32", 2, channels)
    assert model.input_shape == (None, 32, 48, channels) and model.output_shape == (None, 2)
    out = model(np.zeros((2, 32, 48, channels), np.float32))
    assert out.shape == (2, 2)


def test_other_model_kinds_get_height_width_channels(tmp_path, monkeypatch):
    from mpitrain.train import models

    (tmp_path / "user_shape_models.py").write_text(
        "from mpitrain.train.models import build_model\n"
        "SHAPES = []\n"
        "def build(input_shape, num_classes):\n"
        "    SHAPES.append(input_shape)\n"
        "    return build_model('tiny', input_shape[:2], num_classes, input_shape[2])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    models.build_model("user_shape_models:build", "40x24", 2, 3)
    assert importlib.import_module("user_shape_models").SHAPES == [(24, 40, 3)]  # (height, width, channels)
    saved = tmp_path / "m.keras"
    models.build_model("tiny", "40x24", 2).save(saved)
    assert models.build_model(str(saved), "40x24", 2).input_shape == (None, 24, 40, 1)
    with pytest.raises(UserError, match=r"expected input shape \(40, 24, 1\)"):
        models.build_model(str(saved), "24x40", 2)
    with pytest.raises(
        UserError, match=r"--image-size 96x8 is too small for model 'xray' \(needs >= 16 on each side\)"
    ):
        models.check_model("xray", "96x8")
    with pytest.raises(UserError, match=r"needs >= 75 on each side"):
        models.check_model("inception_v3", "96x64")


def test_a_keras_application_takes_a_non_square_input():
    from mpitrain.train.models import build_model

    model = build_model("mobilenet_v2", "48x32", 2, 3)
    assert model.input_shape == (None, 32, 48, 3)


def _run(folder, size, channels=1):
    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(b"")
    doc = {"format": 1, "classes": ["a", "b"], "image_size": size, "threshold": None, "threshold_method": "argmax"}
    (folder / "model.json").write_text(json.dumps({**doc, "channels": channels}))
    return str(folder)


def test_model_json_sizes_and_the_refusals_of_another_shape(tmp_path):
    from mpitrain.evaluate import ensemble, modelio

    wide = modelio.read_info(_run(tmp_path / "wide", "24x16"))
    assert wide.shape == (16, 24) and wide.size_text == "24x16"
    assert modelio.read_info(_run(tmp_path / "old", 16)).shape == (16, 16)  # every model.json so far
    modelio.check_image_size(wide, "24x16")
    modelio.check_image_size(wide, None)
    with pytest.raises(UserError, match=r"trained on 24x16 images \(width x height\); --image-size 16x24 does not"):
        modelio.check_image_size(wide, "16x24")
    with pytest.raises(UserError, match="--image-size 24 does not match"):
        modelio.check_image_size(wide, 24)
    with pytest.raises(UserError, match=r"different image sizes \(24x16 vs 16x24\)"):
        ensemble.read_info([_run(tmp_path / "a", "24x16"), _run(tmp_path / "b", "16x24")])
    assert ensemble.read_info([_run(tmp_path / "c", "24x16"), _run(tmp_path / "d", "24x16")]).shape == (16, 24)
    with pytest.raises(UserError, match="incomplete or damaged"):
        modelio.read_info(_run(tmp_path / "bad", "24x"))


def test_the_export_input_is_height_by_width(tmp_path):
    from mpitrain.evaluate import export, modelio

    info = modelio.read_info(_run(tmp_path / "wide", "96x64", channels=3))
    assert export.input_shape(info) == [None, 64, 96, 3]
    words = export.contract(info)
    assert words.startswith("uint8 [n, 64, 96, 3]") and "cv2.resize(img, (96, 64)" in words
    assert "decode_native(paths, (64, 96), channels=3)" in words


def test_data_decodes_as_training_would_and_says_so(image_tree, tmp_path, capsys):
    args = ["data", "--data", str(image_tree), "--cache-dir", str(tmp_path / "c")]
    assert main([*args, "--image-size", "12x8", "--channels", "3"]) == 0
    out = capsys.readouterr().out
    line = next(t for t in out.splitlines() if t.startswith("image size:"))
    assert line.endswith("12 x 8 (width x height), colour: 3 channels (RGB; grey images replicated)"), line
    assert out.count("replicated") == 1
    # It warmed the very entry training reads: the same files at 12x8 in colour are a hit.
    from mpitrain.data.scan import scan

    _, _, _, _, hit = load_images_native(scan(image_tree).paths, (8, 12), tmp_path / "c", channels=3)
    assert hit
    assert main([*args, "--image-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "8 x 8, grayscale\n" in out and "luma" not in out  # grey sources: no conversion to say


def test_synth_writes_width_by_height_images_and_squares_as_before(tmp_path, capsys):
    from mpitrain.data.synth import generate

    assert main(["synth", "--out", str(tmp_path / "wide"), "--per-class", "2", "--image-size", "24x16"]) == 0
    img = cv2.imread(str(tmp_path / "wide" / "NORMAL" / "NORMAL-00000.png"), cv2.IMREAD_UNCHANGED)
    assert img.shape == (16, 24)
    assert json.loads((tmp_path / "wide" / ".mpitrain-synth.json").read_text())["image_size"] == "24x16"
    square = generate(tmp_path / "sq", per_class=2, image_size=16)
    pair = generate(tmp_path / "pair", per_class=2, image_size=(16, 16))
    one = (square / "PNEUMONIA" / "PNEUMONIA-00001.png").read_bytes()
    assert one == (pair / "PNEUMONIA" / "PNEUMONIA-00001.png").read_bytes()
    assert json.loads((pair / ".mpitrain-synth.json").read_text())["image_size"] == 16


def test_the_training_data_line_says_shape_and_colour_unless_grey_and_square():
    from mpitrain.train.command import images_line

    assert images_line(64, 1) == "1 channel"  # no colour source found: nothing converted
    assert images_line("96x64", 1).startswith("grey 96x64 (width x height), 1 channel")
    assert images_line(64, 3) == "colour 64x64, 3 channels (RGB), grey images replicated"
    assert images_line("96x64", 3).startswith("colour 96x64 (width x height), 3 channels (RGB)")
