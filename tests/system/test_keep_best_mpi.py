"""--keep-best / --early-stop under a real mpiexec, and exact resume with augmentation and batch norm."""

import csv
import json
import os
import subprocess

import numpy as np
import pytest

from mpirun import cli, mpirun, script

pytestmark = pytest.mark.timeout(900)

# The batch-norm model with dropout and augmentation on 16x16 images; a high learning rate
# makes the validation loss wander, so the best epoch is rarely the last.
XRAY = ["--model", "xray", "--image-size", 16, "--batch-size", 4, "--threads", 1, "--augment", "xray"]


def _history(run):
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def _run(n, program, env=None):
    if n == 1:
        return subprocess.run(program, capture_output=True, text=True, timeout=600, env=dict(os.environ, **(env or {})))
    return mpirun(n, program, env=env, timeout=600)[0]


def _model_weights(run):
    import keras

    return keras.saving.load_model(run / "model.keras", safe_mode=True).get_weights()


def _checkpoint_weights(run, epoch):
    """The model weights (get_weights order) in the checkpoint written at the end of `epoch`."""
    from mpitrain.engine import checkpoint
    from mpitrain.train.models import build_model

    model = build_model("xray", 16, 2)
    state = checkpoint.read(run / "checkpoints" / f"ckpt-e{epoch:05d}-s0000000.npz").state_of(0)
    ids = {id(w) for w in model.weights}
    return [a for v, a in zip(model.variables, state) if id(v) in ids]


@pytest.mark.mpi
@pytest.mark.parametrize("strategy", ["allreduce", "master-worker"])
def test_keep_best_and_early_stop_on_two_ranks(tmp_path, synth_data, strategy):
    run = tmp_path / "run"
    proc, _ = mpirun(
        2,
        cli(
            "train",
            "--data",
            synth_data,
            *XRAY,
            "--epochs",
            12,
            "--lr",
            0.02,
            "--strategy",
            strategy,
            "--keep-best",
            "val_loss",
            "--early-stop",
            2,
            "--keep-checkpoints",
            20,
            "--out",
            run,
        ),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = _history(run)
    metrics = json.loads((run / "metrics.json").read_text())
    losses = [float(r["val_loss"]) for r in rows]
    best = 1 + int(np.argmin(losses))  # the earliest minimum
    assert metrics["epochs_run"] == len(rows)
    assert metrics["kept_epoch"] == best and metrics["kept_by"] == "val_loss"
    if metrics["stopped_early"]:  # stopped exactly `patience` epochs after the best
        assert len(rows) == best + 2 < 12 and "early stop" in proc.stdout
    else:
        assert len(rows) == 12
    assert best < len(rows), "precondition: the best epoch should not be the last one here"
    # The saved model is the best epoch's, batch-norm statistics included, not the last one's.
    saved = _model_weights(run)
    for a, b in zip(saved, _checkpoint_weights(run, best)):
        assert np.array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(saved, _checkpoint_weights(run, len(rows))))
    # ... and the final metrics and threshold come from its validation predictions.
    assert metrics["roc_auc"] == float(rows[best - 1]["val_auc"])
    config = json.loads((run / "config.json").read_text())["runtime"]
    assert config["kept_epoch"] == best and config["epochs_run"] == len(rows)
    again = _run(1, cli("train", "--resume", "--out", run))
    assert again.returncode == 2 and "already finished" in again.stderr  # an early stop is an end


# 2 ranks only: they resume augmentation and batch norm as one process does, plus the
# per-rank batch-norm statistics; the one-process resume (with dropout) is proved by
# test_resume.py::test_killed_run_resumes_to_the_uninterrupted_weights[1-none-12].
@pytest.mark.mpi
def test_killed_run_with_augmentation_and_batch_norm_resumes_exactly(tmp_path, synth_data):
    n = 2
    train = [*XRAY, "--epochs", 3, "--checkpoint-every", 5, "--keep-best", "val_auc"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    ok = _run(n, cli("train", "--data", synth_data, *train, "--out", whole))
    assert ok.returncode == 0, ok.stderr[-2000:]
    # 9 steps per epoch: rank 1 is killed in epoch 2 after its step-5 checkpoint, where the
    # ranks' batch-norm statistics differ (stored per rank).
    killed = _run(
        n,
        script("fault_at_step.py", "train", "--data", synth_data, *train, "--out", broken),
        env={"FAULT": "kill", "FAULT_RANK": "1", "FAULT_AT": "16"},
    )
    assert killed.returncode != 0
    assert not (broken / "model.keras").exists()
    resumed = _run(n, cli("train", "--resume", "--out", broken))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at epoch" in resumed.stdout and "step 0 of" not in resumed.stdout
    for a, b in zip(_model_weights(whole), _model_weights(broken)):
        assert np.array_equal(a, b)  # bit-identical: augmentation drawn from the position alone
    keep = ("accuracy", "roc_auc", "threshold", "kept_epoch", "epochs_run")
    mw, mb = (json.loads((r / "metrics.json").read_text()) for r in (whole, broken))
    assert {k: mw[k] for k in keep} == {k: mb[k] for k in keep}
    # Training AUC and balanced accuracy of the epoch resumed mid-way come from the predictions
    # of its steps after the checkpoint only (predictions are not checkpointed; the sums are).
    drop = ("seconds", "images_per_second", "auc", "balanced_accuracy")
    assert [{k: v for k, v in r.items() if k not in drop} for r in _history(whole)] == [
        {k: v for k, v in r.items() if k not in drop} for r in _history(broken)
    ]
