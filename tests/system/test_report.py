"""The run folder after training: threshold, report.md with its figures, TensorBoard logs."""

import csv
import json
import re
import shutil

import numpy as np
import pytest

from mpirun import train_run
from mpitrain.engine.metrics import classification_metrics
from mpitrain.evaluate import modelio
from mpitrain.evaluate.report import text_table, write_report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory, synth_data):
    return train_run(tmp_path_factory, synth_data, "--epochs", 2, "--target-sensitivity", 0.9, "--tensorboard")


def test_report_md_shows_existing_figures_metrics_timings_and_config(run):
    text = (run / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(images) == ["confusion_matrix.png", "roc_curve.png", "training_curves.png"]
    for name in images:
        assert (run / name).read_bytes().startswith(PNG), name
    metrics = json.loads((run / "metrics.json").read_text())
    for needle in (
        f"| accuracy | {metrics['accuracy']:.4f} |",
        f"| ROC AUC | {metrics['roc_auc']:.4f} |",
        "| ranks | 1 |",
        "| strategy | allreduce |",
        "training images per second",
        "training wall time",
        "| target_sensitivity | `0.9` |",
        "| model | `tiny` |",
        "| NORMAL |",
        "target_sensitivity",
    ):
        assert needle in text, needle
    # Which accuracy is which, and how the curves' two series are measured.
    assert f"Accuracy in this table is at the decision threshold, P(PNEUMONIA) >= {metrics['threshold']:.4f}" in text
    assert "epoch lines printed during training show accuracy at argmax" in text
    assert "Training numbers are running means over each epoch" in text
    assert "measured with the weights at the end of the epoch" in text
    assert "| rank 0 in collectives (communication, and waiting for slower ranks) |" in text


def test_the_threshold_is_chosen_for_the_target_sensitivity_and_saved(run):
    info = json.loads((run / "model.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert info["format"] == modelio.FORMAT and info["classes"] == ["NORMAL", "PNEUMONIA"]
    assert info["image_size"] == 16 and info["positive_class"] == "PNEUMONIA"
    assert info["threshold_method"] == "target_sensitivity" and info["target_sensitivity"] == 0.9
    assert 0.0 <= info["threshold"] <= 1.0 and info["val_sensitivity"] >= 0.9
    # metrics.json is computed at the saved threshold, on the same validation images.
    assert metrics["threshold"] == info["threshold"]
    assert metrics["sensitivity"] == info["val_sensitivity"]
    assert metrics["specificity"] == info["val_specificity"]
    loaded = modelio.read_info(run)
    assert loaded.threshold == info["threshold"] and loaded.positive == 1


def test_tensorboard_scalars_match_the_history(run):
    from mpitrain.runtime import import_tensorflow

    tf = import_tensorflow()
    from tensorflow.core.util import event_pb2

    files = list((run / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1
    seen = {}
    for record in tf.data.TFRecordDataset(str(files[0])):
        event = event_pb2.Event.FromString(record.numpy())
        for v in event.summary.value:
            assert v.metadata.plugin_data.plugin_name == "scalars"
            seen[(v.tag, event.step)] = float(tf.make_ndarray(v.tensor))
    with open(run / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert len(history) == 2
    for row in history:
        step = int(row["epoch"])
        assert seen[("loss/train", step)] == pytest.approx(float(row["loss"]), rel=1e-6)
        assert seen[("accuracy/validation", step)] == pytest.approx(float(row["val_accuracy"]), rel=1e-6)
        assert seen[("lr", step)] == pytest.approx(float(row["lr"]), rel=1e-6)


def test_a_run_folder_from_before_model_json_uses_argmax(run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / "model.json").unlink()
    info = modelio.read_info(old / "model.keras")
    assert info.classes == ["NORMAL", "PNEUMONIA"] and info.image_size == 16
    assert info.threshold is None and modelio.resolve_threshold(info, None) == (None, "argmax")
    (old / "classes.json").unlink()
    with pytest.raises(modelio.UserError, match="no model.json"):
        modelio.read_info(old)


def test_report_and_table_for_more_classes(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 30)
    m = classification_metrics(y, rng.dirichlet(np.ones(3), 30), ["a", "b|c", "d"])
    table = text_table(m)
    assert "macro precision" in table and "micro recall" in table and "sensitivity" not in table
    path = write_report(
        tmp_path,
        {"model": "seed", "image_size": 50, "epochs": 1, "strategy": "allreduce"},
        m,
        {"confusion_matrix": "confusion_matrix.png"},
        {"ranks": 2, "seconds": 75.5},
        "`data`",
    )
    text = path.read_text()
    assert "Accuracy here, in the training curves and in the epoch lines is at argmax." in text
    assert "b\\|c" in text  # a pipe in a class name does not break the table
    assert "1 min 15.5 s" in text and "![Confusion matrix (validation)](confusion_matrix.png)" in text


def test_master_worker_report_says_rank_0_mostly_waits_for_the_workers(tmp_path):
    m = classification_metrics([0, 1, 1], [[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], ["a", "b"], threshold=0.5)
    text = write_report(
        tmp_path, {"strategy": "master-worker"}, m, {}, {"ranks": 5, "seconds": 8.9, "comm_seconds": 7.6}, "`data`"
    ).read_text()
    assert "| rank 0 (master) waiting in collectives, mostly for the workers' training | 7.6 s |" in text
    assert "time in communication" not in text


def test_live_epoch_logs_are_replaced_by_the_complete_history(tmp_path):
    from mpitrain.engine.callbacks import tensorboard as tb
    from mpitrain.runtime import import_tensorflow

    tf = import_tensorflow()
    from tensorflow.core.util import event_pb2

    rows = [{"epoch": e, "loss": 1.0 / e, "val_loss": 1.5 / e, "val_auc": None, "lr": 0.1} for e in (1, 2, 3)]
    for row in rows[:2]:
        tb.log_epoch(tmp_path / "tb", row)  # live, as from the training loop
    tb.write_history(tmp_path / "tb", rows)  # the final rewrite after training
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1
    points = []
    for record in tf.data.TFRecordDataset(str(files[0])):
        event = event_pb2.Event.FromString(record.numpy())
        points += [(v.tag, event.step) for v in event.summary.value]
    assert sorted(points) == sorted([(t, e) for e in (1, 2, 3) for t in ("loss/train", "loss/validation", "lr")])
