"""--channels 3: classes that differ only in hue train to near-perfect accuracy (grey: chance),
and predict, evaluate and export take the colour model's images as it was trained on them."""

import csv
import json

import cv2
import numpy as np
import pytest

from mpitrain.cli import main
from mpitrain.data.decode import decode_native

SIDE = 16


def hue_folder(root, per_class=60, seed=0):
    """Two classes, red and green, whose images are the same grey levels once converted to
    luma: each pixel's one colour channel is the smallest value whose luma is the level."""
    rng = np.random.default_rng(seed)
    greys = []
    for name, weight, bgr_channel in (("red", 0.299, 2), ("green", 0.587, 1)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            grey = rng.integers(20, 76, (SIDE, SIDE))
            img = np.zeros((SIDE, SIDE, 3), np.uint8)
            img[..., bgr_channel] = np.ceil(grey / weight)
            cv2.imwrite(str(root / name / f"{i:03d}.png"), img)
            greys.append((root / name / f"{i:03d}.png", grey))
    return greys


@pytest.fixture(scope="module")
def hue(tmp_path_factory):
    root = tmp_path_factory.mktemp("hue") / "data"
    greys = hue_folder(root)
    # The premise: as grey, the two classes are the very same kind of image.
    arr, _, ok, _ = decode_native([str(p) for p, _ in greys], SIDE)
    assert ok.all() and all(np.array_equal(a, g) for a, (_, g) in zip(arr, greys))
    return root


def _train(hue, out, channels, capsys):
    code = main(
        ["train", "--data", str(hue), "--out", str(out), "--model", "tiny", "--image-size", str(SIDE)]
        + ["--epochs", "8", "--batch-size", "8", "--val-split", "0.5", "--channels", str(channels)]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    return json.loads((out / "metrics.json").read_text()), text


@pytest.fixture(scope="module")
def colour_run(hue, tmp_path_factory):
    return tmp_path_factory.mktemp("colour") / "run"


def test_hue_only_classes_train_in_colour_and_not_in_grey(hue, tmp_path, colour_run, capsys, monkeypatch):
    monkeypatch.setenv("MPITRAIN_CACHE_DIR", str(tmp_path / "cache"))
    colour, text = _train(hue, colour_run, 3, capsys)
    assert "3 channels (RGB)" in text and "16x16x3" in text
    grey, text = _train(hue, tmp_path / "grey", 1, capsys)
    assert "sampled images are colour, converted to luma: --channels 3 keeps colour" in text
    assert colour["accuracy"] >= 0.95, colour["accuracy"]
    assert grey["accuracy"] <= 0.75, grey["accuracy"]
    info = json.loads((colour_run / "model.json").read_text())
    assert info["channels"] == 3 and info["image_size"] == SIDE


def test_predict_and_evaluate_decode_in_colour(hue, colour_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MPITRAIN_CACHE_DIR", str(tmp_path / "cache"))
    fresh = tmp_path / "fresh"
    hue_folder(fresh, per_class=10, seed=1)
    assert main(["predict", "--model", str(colour_run), str(fresh), "--csv", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 20
    right = [r for r in rows if r["predicted"] == ("red" if "/red/" in r["path"] else "green")]
    assert len(right) >= 19, rows[:3]
    capsys.readouterr()
    assert main(["evaluate", "--model", str(colour_run), "--data", str(fresh)]) == 0
    assert "3 channels (RGB)" in capsys.readouterr().out


def test_export_takes_uint8_rgb_rows(colour_run, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(colour_run), "--format", "savedmodel", "--out", str(out)]) == 0
    assert "[n, 16, 16, 3]" in capsys.readouterr().out
    doc = json.loads((out / "export.json").read_text())
    assert doc["channels"] == 3
    assert doc["input"]["shape"] == [None, SIDE, SIDE, 3] and doc["input"]["dtype"] == "uint8"
    assert "RGB" in doc["input"]["contract"]
    assert "validation images" in doc["check"]["inputs"]  # checked on the run's own colour images

    import tensorflow as tf

    serve = tf.saved_model.load(str(out)).signatures["serving_default"]
    red = np.zeros((1, SIDE, SIDE, 3), np.uint8)
    red[..., 0] = 200  # RGB order: red first
    green = np.zeros((1, SIDE, SIDE, 3), np.uint8)
    green[..., 1] = 100
    classes = doc["classes"]
    for pixels, want in ((red, "red"), (green, "green")):
        p = serve(pixels=tf.constant(pixels))["probabilities"].numpy()[0]
        assert classes[int(p.argmax())] == want, p
    with pytest.raises(Exception):  # noqa: B017 - a grey row is refused by the signature
        serve(pixels=tf.constant(np.zeros((1, SIDE, SIDE, 1), np.uint8)))


def test_two_ranks_train_hue_only_classes_in_colour(hue, tmp_path):
    import os
    import subprocess

    from mpirun import cli

    out = tmp_path / "run"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", MPITRAIN_CACHE_DIR=str(tmp_path / "cache"))
    args = ["train", "-n", "2", "--data", hue, "--out", out, "--model", "tiny", "--image-size", SIDE]
    args += ["--epochs", "8", "--batch-size", "8", "--val-split", "0.5", "--channels", "3"]
    proc = subprocess.run(cli(*args), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["accuracy"] >= 0.95
