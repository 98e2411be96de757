"""--recipe through the launcher: every rank builds the same config from the same argv, and
options given explicitly beat the preset there too."""

import json
import subprocess

from mpirun import cli, train_run
from mpitrain.config import RECIPES


def test_recipe_under_the_launcher_keeps_explicit_options_and_records_itself(tmp_path_factory, synth_data):
    # train_run adds --model tiny --image-size 16 --epochs 1 explicitly: those must win, and so
    # must --groups (the synthetic file names carry no patient ids).
    out = train_run(tmp_path_factory, synth_data, "--recipe", "xray", "--groups", "duplicates", "-n", 2)
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["recipe"] == "xray"
    assert (cfg["model"], cfg["image_size"], cfg["epochs"]) == ("tiny", 16, 1)
    assert cfg["augment"] == RECIPES["xray"]["augment"] and cfg["groups"] == "duplicates"
    meta = json.loads((out / "model.json").read_text())
    assert meta["threshold_method"] == "prior" and meta["threshold"] == 0.5  # balanced weights
    assert "split by group" in meta["validation"]


def test_recipe_on_file_names_without_patient_ids_says_what_to_do(tmp_path, synth_data):
    proc = subprocess.run(
        cli("train", "-n", 2, "--recipe", "xray", "--data", synth_data, "--out", tmp_path / "r"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--groups filename-patient found no patient ids" in proc.stderr and "--group-pattern" in proc.stderr
    assert not (tmp_path / "r").exists()  # refused before anything was written
