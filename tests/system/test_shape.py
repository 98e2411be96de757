"""--image-size WxH end to end: two ranks train a colour 24x16 (width x height) model, and
evaluate, predict and export take its images as it was trained on them."""

import csv
import json
import os
import subprocess

import cv2
import numpy as np
import pytest

from mpitrain.cli import main

W, H = 24, 16


def hue_folder(root, per_class=40, seed=0):
    """Red and green classes of random blobs, 36 wide x 24 high (resized to 24x16 when
    decoded), whose luma is alike: only colour tells them apart."""
    rng = np.random.default_rng(seed)
    for name, weight, bgr_channel in (("red", 0.299, 2), ("green", 0.587, 1)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            grey = rng.integers(20, 76, (24, 36))
            img = np.zeros((24, 36, 3), np.uint8)
            img[..., bgr_channel] = np.ceil(grey / weight)
            cv2.imwrite(str(root / name / f"{i:03d}.png"), img)
    return root


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    from mpirun import cli

    base = tmp_path_factory.mktemp("shape")
    data, out = hue_folder(base / "data"), base / "run"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", MPITRAIN_CACHE_DIR=str(base / "cache"))
    args = ["train", "-n", "2", "--data", data, "--out", out, "--model", "tiny", "--image-size", f"{W}x{H}"]
    args += ["--channels", "3", "--epochs", "8", "--batch-size", "8", "--val-split", "0.5"]
    proc = subprocess.run(cli(*args), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc.stdout, base


def test_two_ranks_train_a_wxh_colour_model_and_say_its_shape(wide_run):
    out, text, _ = wide_run
    assert "colour 24x16 (width x height), 3 channels (RGB)" in text and "model tiny 24x16x3" in text, text
    assert json.loads((out / "config.json").read_text())["config"]["image_size"] == "24x16"
    info = json.loads((out / "model.json").read_text())
    assert info["image_size"] == "24x16" and info["channels"] == 3
    assert "(24 wide x 16 high, colour)" in (out / "report.md").read_text()
    assert json.loads((out / "metrics.json").read_text())["accuracy"] >= 0.9  # colour was learnt


def test_evaluate_and_predict_decode_at_the_models_shape(wide_run, tmp_path, capsys):
    out, _, base = wide_run
    fresh = hue_folder(tmp_path / "fresh", per_class=10, seed=1)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--data", str(fresh), "--image-size", "24x16"]) == 0
    text = capsys.readouterr().out
    assert "24x16 (width x height) | 3 channels (RGB)" in text
    assert main(["predict", "--model", str(out), str(fresh), "--csv", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    right = [r for r in rows if r["predicted"] == ("red" if "/red/" in r["path"] else "green")]
    assert len(rows) == 20 and len(right) >= 18, rows[:3]


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_another_shape_is_refused_in_one_line(wide_run, command, capsys):
    out, _, base = wide_run
    where = ["--data", str(base / "data")] if command == "evaluate" else [str(base / "data")]
    capsys.readouterr()
    assert main([command, "--model", str(out), *where, "--image-size", "16x24"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "trained on 24x16 images (width x height); --image-size 16x24 does not match" in err[0]


@pytest.mark.parametrize("fmt", ["savedmodel", "tflite"])
def test_export_takes_uint8_rows_of_height_by_width(wide_run, fmt, tmp_path, capsys):
    out, _, _ = wide_run
    target = tmp_path / fmt
    assert main(["export", str(out), "--format", fmt, "--out", str(target)]) == 0
    assert f"[n, {H}, {W}, 3]" in capsys.readouterr().out
    doc = json.loads((target / "export.json").read_text())
    assert doc["image_size"] == "24x16" and doc["input"]["shape"] == [None, H, W, 3]
    assert f"cv2.resize(img, ({W}, {H})" in doc["input"]["contract"]
    assert "validation images" in doc["check"]["inputs"]  # checked against model.keras on the run's own images
    assert doc["check"]["max_abs_diff"] <= doc["check"]["tolerance"]
