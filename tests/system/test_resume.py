"""Checkpoints and --resume: a killed run, resumed, ends with the weights of an uninterrupted one."""

import csv
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from mpirun import cli, mpirun, script

pytestmark = pytest.mark.timeout(600)

# The seed CNN (with dropout, so the dropout RNG state must survive too) on 16x16 images.
TRAIN = [
    "--model",
    "seed",
    "--image-size",
    16,
    "--epochs",
    3,
    "--batch-size",
    4,
    "--checkpoint-every",
    5,
    "--threads",
    1,
]


def _weights(run_dir):
    import keras

    model = keras.saving.load_model(run_dir / "model.keras", safe_mode=True)
    return model.get_weights()


# Columns that measure time, not training: they differ between any two runs.
TIME_COLUMNS = {"seconds", "images_per_second"}


def _history(run_dir, resumed_epoch=None):
    """history.csv as {epoch: {column: text}} without the time columns (text: floats are
    written exactly, so equal text is equal values).

    The training ROC AUC of an epoch resumed mid-way is left out: the checkpoint keeps the
    epoch's running sums (samples, loss sum, hits), from which loss and accuracy continue
    exactly, but not the probabilities of the steps before it, so that epoch's train AUC
    covers only the steps after the resume (a known gap)."""
    with open(run_dir / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for row in rows:
        # The resumed epoch's training AUC and balanced accuracy come from that epoch's
        # predictions, which are not checkpointed: they cover only the steps after the resume.
        drop = TIME_COLUMNS | ({"auc", "balanced_accuracy"} if int(row["epoch"]) == resumed_epoch else set())
        out[int(row["epoch"])] = {k: v for k, v in row.items() if k not in drop}
    return out


def _run(n, program, env=None):
    if n == 1:
        full = dict(os.environ, **(env or {}))
        proc = subprocess.run(program, capture_output=True, text=True, timeout=300, env=full)
        return proc
    return mpirun(n, program, env=env, timeout=300)[0]


# One process, and 3 ranks with --compress bf16: the gradients are rounded to bfloat16 on
# every step, with no state of its own, so a resumed run is still bit-identical; the 3-rank
# case also proves the resume of a rank other than 0 among several (one run for both: each
# start of 3 TensorFlow processes costs CI several seconds).
@pytest.mark.parametrize(
    "n, compress, kill_at",
    [
        (1, "none", 12),
        pytest.param(3, "bf16", 12, marks=pytest.mark.mpi),
    ],
)
def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, synth_data, n, compress, kill_at):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    train = [*TRAIN, "--compress", compress]
    ok = _run(n, cli("train", "--data", synth_data, *train, "--out", whole))
    assert ok.returncode == 0, ok.stderr[-2000:]

    # Rank 1 (or the only rank) dies by SIGKILL in step kill_at, after a --checkpoint-every
    # checkpoint of its epoch (n=1: 18 steps per epoch, step 12 is epoch 1's 12th; n=3: 6
    # steps per epoch, step 12 is epoch 2's 6th, after its step-5 checkpoint). It reads its
    # images from --store disk (the resumed run too: its saved config), the uninterrupted
    # one from memory: the same weights, so the store proves itself here at no extra start.
    killed = _run(
        n,
        script("fault_at_step.py", "train", "--data", synth_data, *train, "--store", "disk", "--out", broken),
        env={"FAULT": "kill", "FAULT_RANK": str(min(1, n - 1)), "FAULT_AT": str(kill_at)},
    )
    assert killed.returncode != 0
    assert not (broken / "model.keras").exists()
    assert list((broken / "checkpoints").glob("ckpt-*.npz"))

    resumed = _run(n, cli("train", "--resume", "--out", broken))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert re.search(r"^store: disk, .* \(found\)$", resumed.stdout, re.M), resumed.stdout[-2000:]
    at = re.search(r"resuming at epoch (\d+), step (\d+) of", resumed.stdout)
    assert at, resumed.stdout[-2000:]
    epoch, step = int(at[1]), int(at[2])
    assert step > 0  # resumed mid-epoch, from a --checkpoint-every checkpoint
    for a, b in zip(_weights(whole), _weights(broken)):
        assert np.array_equal(a, b)  # bit-identical: deterministic kernels, one thread
    # The history too: the resumed epoch's loss and accuracy continue from the saved sums.
    want, got = _history(whole, epoch), _history(broken, epoch)
    assert list(got) == [1, 2, 3]
    for e in want:
        assert got[e] == want[e], f"epoch {e}"


def test_resume_refuses_an_empty_folder(tmp_path):
    # A finished run is refused in test_a_kill_between_the_last_checkpoint_and_the_model_can_still_resume
    # (a resumed run) and in test_keep_best_mpi.py (a run that ended by itself, on 2 ranks).
    (tmp_path / "empty").mkdir()
    none = _run(1, cli("train", "--resume", "--out", tmp_path / "empty"))
    assert none.returncode == 2 and "no usable checkpoint" in none.stderr


def _pid_of_rank(rank, marker):
    """PID of the mpitrain process with OMPI_COMM_WORLD_RANK=rank whose command line or
    environment has `marker` (ranks started by `-n N` take their options from the environment)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        mine = marker in cmd or any(marker.encode() in v for v in env)
        if mine and "-m mpitrain" in cmd and f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            return int(pid)
    return None


@pytest.mark.mpi
def test_a_rank_killed_from_outside_stops_the_job_fast_and_is_named(tmp_path, synth_data):
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen(
        cli(
            "train",
            "-n",
            3,
            "--data",
            synth_data,
            "--model",
            "seed",
            "--image-size",
            16,
            "--epochs",
            50,
            "--batch-size",
            4,
            "--out",
            out,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("ckpt-*.npz")) and time.time() < deadline:
        time.sleep(0.2)  # wait until training is under way (the first epoch's checkpoint)
    pid = _pid_of_rank(1, str(out))
    assert pid, "rank 1 not found"
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - killed_at < 30
    assert proc.returncode != 0
    assert "rank 1" in err and "was lost (SIGKILL)" in err and "--resume" in err, err[-2000:]


KILL_BEFORE_MODEL = """
import os, sys
from mpitrain.train import runfolder
runfolder.save_model = lambda *a, **k: os._exit(9)  # killed after the last checkpoint, before the model
from mpitrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_between_the_last_checkpoint_and_the_model_can_still_resume(tmp_path, synth_data):
    run = tmp_path / "run"
    args = [
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
        run,
    ]
    killed = _run(1, [sys.executable, "-c", KILL_BEFORE_MODEL, *map(str, args)])
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert not (run / "model.keras").exists()
    resumed = _run(1, cli("train", "--resume", "--out", run))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run / "model.keras").exists() and (run / "model.json").exists()
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 2  # header + both epochs, none trained again
    again = _run(1, cli("train", "--resume", "--out", run))
    assert again.returncode == 2 and "already finished" in again.stderr
