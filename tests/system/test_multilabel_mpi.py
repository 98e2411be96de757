"""Multi-label training and evaluation on two ranks under mpiexec: a generated table of
independent findings trains with -n 2 (the allreduce step on [n, L] targets), and
`evaluate -n 2` gives the per-label figures of one process, to the last bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from mpitrain.data.synth import FINDINGS, LABELS_FILE, generate_multilabel


def _mpitrain(*args, env):
    proc = subprocess.run(
        [sys.executable, "-m", "mpitrain", *map(str, args)], capture_output=True, text=True, timeout=400, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_two_ranks_train_and_evaluate_a_multi_label_table(tmp_path):
    data = generate_multilabel(tmp_path / "ml", images=160, image_size=16, seed=1, prevalence=0.4)
    table = data / LABELS_FILE
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", MPITRAIN_CACHE_DIR=str(tmp_path / "cache"))
    run = tmp_path / "run"
    common = ["--labels", table, "--multi-label", "--patient-column", "patient"]
    proc = _mpitrain(
        "train",
        "-n",
        "2",
        *common,
        "--image-size",
        "24",
        "--epochs",
        "6",
        "--batch-size",
        "16",
        "--keep-best",
        "val_mean_auc",
        "--threads",
        "1",
        "--out",
        run,
        env=env,
    )
    assert "val_mean_auc" in proc.stdout and "val_label_acc" in proc.stdout  # the epoch lines
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["kept_by"] == "val_mean_auc"
    assert metrics["label_names"] == list(FINDINGS) and metrics["mean_roc_auc"] > 0.6
    assert json.loads((run / "config.json").read_text())["runtime"]["ranks"] == 2
    _mpitrain("evaluate", "-n", "2", "--model", run, "--labels", table, "--json", tmp_path / "two.json", env=env)
    from mpitrain.cli import main  # one process: in this one

    assert main(["evaluate", "--model", str(run), "--labels", str(table), "--json", str(tmp_path / "one.json")]) == 0
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["per_label"] == two["per_label"] and one["mean_roc_auc"] == two["mean_roc_auc"]
    assert one["n_samples"] == 160 and (one["ranks"], two["ranks"]) == (1, 2)
