"""The command line: exit codes and one-line errors (in this process, `cli_error` in
conftest.py), and a short real training run (a real process)."""

import csv
import json
import os
import subprocess
import sys

import pytest


def run_cli(*args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-m", "mpitrain", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize(
    "args, words",
    [
        (["train", "--data", "/no/such/dir"], ["/no/such/dir", "does not exist"]),
        (["train", "--epochs", "0"], ["--epochs"]),
        (["train", "--epochs", "two"], ["--epochs"]),
        (["train", "--batch-size", "-3"], ["--batch-size"]),
        (["train", "--strategy", "gossip"], ["--strategy"]),
        (["train", "--image-size", "2"], ["--image-size"]),
        (["train", "-n", "0"], ["-n"]),
        (["data"], ["--data"]),
        (["data", "--data", "/no/such/dir"], ["/no/such/dir"]),
        (["bench", "--model", "resnet999"], ["resnet999"]),
        (["frobnicate"], ["frobnicate"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli_error, args, words):
    cli_error(args, *words)


def test_one_class_folder_is_refused(cli_error, tmp_path, write_image):
    write_image(tmp_path / "d" / "only" / "a.png")
    cli_error(["train", "--data", tmp_path / "d", "--out", tmp_path / "r"], "2")


def test_unwritable_and_occupied_run_folders_are_refused(cli_error, tmp_path, synth_data):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    cli_error(["train", "--data", synth_data, "--out", occupied], "--overwrite")
    assert (occupied / "keep.txt").read_text() == "mine"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cli_error(["train", "--data", synth_data, "--out", blocker / "sub"], "--out")


def test_master_worker_needs_two_processes(cli_error, synth_data, tmp_path):
    cli_error(["train", "--data", synth_data, "--strategy", "master-worker", "--out", tmp_path / "r"], "master-worker")


@pytest.mark.parametrize("launch", [[], ["-n", "1"]])
def test_bench_refuses_master_worker_on_one_process_like_train(cli_error, synth_data, tmp_path, launch):
    small = ["--strategy", "master-worker", "--model", "tiny", "--image-size", 16]
    train = cli_error(["train", *launch, "--data", synth_data, *small, "--out", tmp_path / "r"], "master-worker", "2")
    bench = cli_error(["bench", *launch, *small, "--steps", 2, "--warmup", 1], "master-worker", "2")
    assert bench == train


def test_short_training_writes_a_complete_run_folder(tmp_path, synth_data):
    out = tmp_path / "run"
    proc = run_cli(
        "train",
        "--data",
        synth_data,
        "--model",
        "tiny",
        "--image-size",
        16,
        "--epochs",
        2,
        "--batch-size",
        8,
        "--out",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    assert "epoch 2/2" in proc.stdout and "val_acc" in proc.stdout and str(out) in proc.stdout
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc"} <= set(rows[0])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert sum(map(sum, metrics["confusion_matrix"])) == metrics["val_samples"] == 8
    assert json.loads((out / "classes.json").read_text()) == ["NORMAL", "PNEUMONIA"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["epochs"] == 2 and cfg["runtime"]["ranks"] == 1 and "tensorflow" in str(cfg["versions"])
    import keras

    model = keras.saving.load_model(out / "model.keras", safe_mode=True)
    assert model.output_shape == (None, 2)

    # Same seed, same data: the same result.
    again = run_cli(
        "train",
        "--data",
        synth_data,
        "--model",
        "tiny",
        "--image-size",
        16,
        "--epochs",
        2,
        "--batch-size",
        8,
        "--out",
        out,
        "--overwrite",
    )
    assert again.returncode == 0, again.stderr
    with open(out / "history.csv") as f:
        rerun = list(csv.DictReader(f))

    def untimed(table):
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in table]

    assert untimed(rerun) == untimed(rows)


def test_mpitrain_data_warms_the_cache_the_next_training_reads_and_reports_duplicates(tmp_path, synth_data):
    import shutil

    data = tmp_path / "data"  # a folder of its own: no earlier test has cached it
    shutil.copytree(synth_data, data)
    first = sorted((data / "NORMAL").iterdir())[0]
    shutil.copy(first, data / "PNEUMONIA" / "copied.png")  # a byte-identical duplicate
    cache = tmp_path / "cache"
    described = run_cli("data", "--data", data, "--image-size", 16, "--cache-dir", cache)
    assert described.returncode == 0, described.stderr
    assert "shared: `train` and `evaluate`" in described.stdout
    assert "1 group(s) of byte-identical files: 2 files, 1 redundant copies" in described.stdout
    assert f"data/NORMAL/{first.name} = data/PNEUMONIA/copied.png" in described.stdout
    trained = run_cli(
        "train",
        "--data",
        data,
        "--model",
        "tiny",
        "--image-size",
        16,
        "--epochs",
        1,
        "--batch-size",
        8,
        "--cache-dir",
        cache,
        "--out",
        tmp_path / "run",
    )
    assert trained.returncode == 0, trained.stderr
    assert "(cache: 2/2 hits)" in trained.stdout  # the split's train and val shards, from data's entry
    assert "acc and val_acc in the epoch lines are at argmax" in trained.stdout
