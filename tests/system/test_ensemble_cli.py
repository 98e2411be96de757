"""Ensembles from the command line: runs with one --split-seed share their validation images,
evaluate and predict average them, and the threshold is chosen on the averaged validation."""

import csv
import json
import subprocess

import numpy as np
import pytest

from mpirun import cli, train_run
from mpitrain.evaluate import valpreds
from mpitrain.evaluate.threshold import choose_threshold

CLASSES = ["NORMAL", "PNEUMONIA"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synth_data):
    """Two youden runs of other --seed but one --split-seed, the second on 2 ranks."""
    common = ("--split-seed", 5, "--threshold-policy", "youden", "--epochs", 2)
    a = train_run(tmp_path_factory, synth_data, "--seed", 0, *common)
    b = train_run(tmp_path_factory, synth_data, "--seed", 1, *common, "-n", 2)
    return a, b


def _predict(tmp_path, data, name, *models):
    out = tmp_path / f"{name}.csv"
    args = [a for m in models for a in ("--model", m)]
    proc = subprocess.run(cli("predict", *args, "--csv", out, data), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, proc.stdout


def test_a_run_saves_the_validation_predictions_its_threshold_was_chosen_on(runs):
    for run in runs:
        meta = json.loads((run / "model.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        val = valpreds.read(run, CLASSES)
        assert len(val.paths) == metrics["val_samples"] == len(set(val.paths))
        again = choose_threshold(val.labels == 1, val.probs[:, 1].astype(np.float64))
        assert again.threshold == meta["threshold"] and meta["threshold_method"] == "youden"
        assert "split by" in meta["validation"] and meta["train_class_counts"]
    # One --split-seed: the same validation images, in the same order, on 1 and on 2 ranks.
    a, b = (valpreds.read(r, CLASSES) for r in runs)
    assert a.paths == b.paths and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.probs, b.probs)  # other seeds, other models


def test_evaluate_and_predict_average_the_members(runs, synth_data, tmp_path):
    a, b = map(str, runs)
    rows_a, _ = _predict(tmp_path, synth_data, "a", a)
    rows_b, _ = _predict(tmp_path, synth_data, "b", b)
    rows_ab, said = _predict(tmp_path, synth_data, "ab", a, b)
    assert "ensemble of 2" in said
    pa = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows_a], np.float32)
    pb = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows_b], np.float32)
    pab = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows_ab], np.float32)
    assert np.array_equal(pab, ((pa.astype(np.float64) + pb) / 2).astype(np.float32))

    # The ensemble's threshold: Youden's J on the averaged validation predictions.
    va, vb = valpreds.read(runs[0], CLASSES), valpreds.read(runs[1], CLASSES)
    mean = ((va.probs.astype(np.float64) + vb.probs) / 2).astype(np.float32)
    want = choose_threshold(va.labels == 1, mean[:, 1].astype(np.float64)).threshold
    assert {r["decision"] for r in rows_ab} == {f"p_PNEUMONIA >= {want!r}"}

    out = tmp_path / "ens.json"
    proc = subprocess.run(
        cli("evaluate", "-n", 2, "--model", a, "--model", b, "--data", synth_data, "--json", out),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["threshold"] == want and doc["threshold_method"] == "youden"
    assert doc["members"] == [str(runs[0] / "model.keras"), str(runs[1] / "model.keras")]
    assert "validated during training on: " in proc.stdout and "split by" in proc.stdout
    predicted = sum(r["predicted"] == "PNEUMONIA" for r in rows_ab)
    assert predicted == sum(doc["confusion_matrix"][i][1] for i in range(2))


def test_runs_split_differently_need_a_threshold(runs, synth_data, tmp_path_factory):
    c = train_run(tmp_path_factory, synth_data, "--seed", 2, "--threshold-policy", "youden")
    proc = subprocess.run(
        cli("evaluate", "--model", runs[0], "--model", c, "--data", synth_data),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "validated on different images" in proc.stderr
    proc = subprocess.run(
        cli("evaluate", "--model", runs[0], "--model", c, "--data", synth_data, "--threshold", 0.5),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
