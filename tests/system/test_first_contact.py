"""A new user's first mistakes, as the command line shows them: each is one line starting
"mpitrain: error:", exit code 2, reported before any work (no data read, no mpiexec started,
no run folder left behind), and a run folder is written by one training at a time."""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from mpirun import cli, mpirun

pytestmark = pytest.mark.timeout(600)
TINY = ["--model", "tiny", "--image-size", 16, "--batch-size", 8]


def _env(**extra):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)


def run(*args, env=None, timeout=300):
    return subprocess.run(cli(*args), capture_output=True, text=True, timeout=timeout, env=env or _env())


def one_line(proc, *words):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mpitrain: error: "), lines[0]
    assert "Traceback" not in proc.stderr and "----" not in proc.stdout + proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _wait_for_training(proc, out: Path, timeout=240) -> dict:
    """The lock file of a training that has written its first checkpoint."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if list((out / "checkpoints").glob("ckpt-*.npz")):
            return json.loads((out / ".lock").read_text())
        time.sleep(0.1)
    raise AssertionError("no checkpoint appeared")


def _ctrl_c(proc) -> tuple[str, str]:
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    return stdout, stderr


# 1. One training per run folder.


def test_a_second_training_into_the_same_run_folder_is_refused_naming_the_first(tmp_path, synth_data, cli_error):
    out = tmp_path / "runs" / "same"
    first = subprocess.Popen(
        cli("train", "--data", synth_data, *TINY, "--epochs", 100000, "--out", out),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    try:
        holder = _wait_for_training(first, out)
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        who = f"process {first.pid} on host {socket.gethostname()}"
        cli_error(["train", "--data", synth_data, *TINY, "--out", out], "in use", who)
        cli_error(["train", "--data", synth_data, *TINY, "--out", out, "--overwrite"], "in use", who)
        cli_error(["train", "--resume", "--out", out], "in use", who)
        # Under -n the launcher finds it before it starts mpiexec (cli_error checks that).
        cli_error(["train", "-n", 2, "--data", synth_data, *TINY, "--out", out], "in use", who)
        cli_error(["train", "-n", 2, "--resume", "--out", out], "in use", who)
    finally:
        _ctrl_c(first)
    assert not (out / ".lock").exists()  # let go on Ctrl-C
    assert list((out / "checkpoints").glob("ckpt-*.npz"))  # the first run's folder is intact


@pytest.mark.mpi
def test_under_the_launcher_rank_0_holds_the_lock_for_the_whole_run(tmp_path, synth_data, cli_error):
    out = tmp_path / "run"
    job = subprocess.Popen(
        cli("train", "-n", 2, "--data", synth_data, *TINY, "--epochs", 100000, "--out", out),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    try:
        holder = _wait_for_training(job, out)
        environ = Path(f"/proc/{holder['pid']}/environ").read_bytes().split(b"\0")
        assert holder["pid"] != job.pid and b"OMPI_COMM_WORLD_RANK=0" in environ
        cli_error(
            ["train", "-n", 2, "--data", synth_data, *TINY, "--out", out, "--overwrite"],
            "in use",
            f"process {holder['pid']} ",
        )
    finally:
        _ctrl_c(job)
    assert not (out / ".lock").exists()


# 2. -n / --hostfile under an MPI launcher.


@pytest.mark.mpi
@pytest.mark.parametrize(
    "args",
    [
        ["train", "-n", 2, "--out", "{tmp}/run"],
        ["evaluate", "-n", 2, "--model", "{tmp}/m", "--data", "{tmp}/d"],
        ["bench", "--hostfile", "{tmp}/hosts"],
    ],
    ids=["train", "evaluate", "bench"],
)
def test_n_under_mpiexec_is_refused_once(tmp_path, args):
    args = [str(a).format(tmp=tmp_path) for a in args]
    proc, _ = mpirun(2, cli(*args), timeout=120)
    flag = "-n" if "-n" in args else "--hostfile"
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("mpitrain: error:") == 1, proc.stderr
    assert (
        f"mpitrain: error: {flag} starts its own mpiexec, but this command already runs under an MPI "
        f"launcher: drop {flag}" in proc.stderr
    )
    assert "Traceback" not in proc.stderr and "MPI_ABORT" not in proc.stderr
    assert not (tmp_path / "run").exists()


# 3. Checks before work, and no run folder left by a start that failed.


def test_an_unknown_model_under_n_is_refused_before_the_data_and_mpiexec(tmp_path, cli_error):
    out = tmp_path / "runs" / "x"
    missing = tmp_path / "missing"
    cli_error(
        ["train", "-n", 2, "--model", "resnet", "--data", missing, "--out", out], "unknown model 'resnet'", "seed, tiny"
    )
    cli_error(
        ["train", "-n", 2, "--hostfile", tmp_path / "nohosts", "--data", missing, "--out", out], "--hostfile", "nohosts"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.mpi
def test_a_launch_that_fails_on_a_hostfile_host_is_one_line_and_leaves_no_folder(tmp_path, synth_data):
    hosts = tmp_path / "hosts"
    hosts.write_text("nosuchhost.invalid slots=2\n")
    proc = run(
        "train",
        "-n",
        2,
        "--hostfile",
        hosts,
        "--data",
        synth_data,
        *TINY,
        "--out",
        tmp_path / "runs" / "x",
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("mpitrain: error:")]
    assert len(ours) == 1 and "could not start the job on host nosuchhost" in ours[0], proc.stderr
    assert "----" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_training_that_fails_before_it_starts_leaves_no_run_folder(tmp_path, cli_error):
    broken = tmp_path / "broken"
    for cls in ("a", "b"):
        (broken / cls).mkdir(parents=True)
        for i in range(6):
            (broken / cls / f"{i}.png").write_text("not an image")
    cli_error(["train", "--data", broken, *TINY, "--out", tmp_path / "runs" / "x"], "no usable training images")
    assert not (tmp_path / "runs").exists()
    mine = tmp_path / "mine"  # a folder that was there before is never removed
    mine.mkdir()
    cli_error(["train", "--data", broken, *TINY, "--out", mine], "no usable training images")
    assert mine.is_dir() and list(mine.iterdir()) == []


def test_data_and_synth_follow_trains_rules(tmp_path, synth_data, cli_error):
    rule = cli_error(["train", "--image-size", 4], "--image-size")
    assert cli_error(["data", "--data", synth_data, "--image-size", 4]) == rule
    assert cli_error(["synth", "--out", tmp_path / "s", "--image-size", 4]) == rule
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    train_says = cli_error(["train", "--data", synth_data, "--out", full], f"--out {full} is not empty; ")
    synth_says = cli_error(["synth", "--out", full, "--per-class", 2], f"--out {full} is not empty; ")
    assert train_says.split(";")[0] == synth_says.split(";")[0]
    assert [p.name for p in full.iterdir()] == ["keep.txt"]


# 9. --resume of a folder that is not there.


def test_resume_of_a_missing_folder_says_so(tmp_path, cli_error):
    never = tmp_path / "runs" / "never"
    for n in ([], ["-n", 2]):
        cli_error(["train", *n, "--resume", "--out", never], f"run folder {never} does not exist")
        cli_error(["train", *n, "--resume"], "--resume needs --out RUNDIR")
    assert not (tmp_path / "runs").exists()


# 10. predict runs in one process.


def test_predict_with_n_says_it_runs_in_one_process(tmp_path, cli_error):
    cli_error(["predict", "-n", 2, "--model", tmp_path / "m", tmp_path / "x.png"], "one process", "drop -n")


# 11. One error prefix, and --version. (test_cli.py's cases check the prefix too.)


@pytest.mark.parametrize(
    "args",
    [
        ["train", "-n", "2", "--hostfile", "/no/hosts"],  # the launcher
        ["evaluate", "--model", "/no/run", "--data", "/no/data"],
    ],
    ids=lambda a: " ".join(a),
)
def test_every_error_starts_the_same_way(cli_error, args):
    cli_error(args)


@pytest.mark.parametrize(
    "args",
    [
        ["frobnicate"],  # argparse, top level
        ["train", "--epochs", "0"],  # TrainConfig: past argparse, through the cli's handler
    ],
    ids=lambda a: " ".join(a),
)
def test_a_real_process_says_what_the_in_process_call_says(cli_error, args):
    # The in-process error tests stand for `python -m mpitrain`: the same line, the same code.
    assert one_line(run(*args)) == cli_error(args)


def test_version():
    from mpitrain import __version__

    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"mpitrain {__version__}"


# 3. Data that would train on the wrong thing (issue 20, items 1 and 4).


def _split_parent(root: Path) -> Path:
    """``root/{test,train}/{NORMAL,PNEUMONIA}``: a data set's parent folder, 4 images per class."""
    import cv2
    import numpy as np

    for split in ("test", "train"):
        for value, cls in ((40, "NORMAL"), (200, "PNEUMONIA")):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                cv2.imwrite(str(root / split / cls / f"{i}.png"), np.full((16, 16), value + i, np.uint8))
    return root


@pytest.mark.mpi
def test_training_on_the_parent_of_train_and_test_is_refused_before_ranks_start(tmp_path):
    parent = _split_parent(tmp_path / "chest")
    out = tmp_path / "runs" / "x"
    proc = run("train", "-n", 2, "--data", parent, *TINY, "--epochs", 1, "--out", out, timeout=120)
    line = one_line(proc, "NORMAL, PNEUMONIA", f"--data {parent / 'train'}", "--allow-nested-classes")
    assert "rank" not in line  # the launcher's check, not an agreed error of the ranks
    assert not (tmp_path / "runs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest"]  # nothing left beside the data either


def test_nested_classes_are_trained_when_asked_and_validation_of_training_files_is_refused(tmp_path, cli_error):
    parent = _split_parent(tmp_path / "chest")
    out = tmp_path / "runs" / "x"
    cli_error(["train", "--data", parent, *TINY, "--out", out], "holds the same sub-folders", "--data")
    cli_error(
        ["train", "-n", 2, "--data", parent / "train", "--val-data", parent / "train", *TINY, "--out", out],
        "all 8 validation images are training images",
    )
    single = tmp_path / "single"
    for cls in ("a", "b"):
        (single / cls).mkdir(parents=True)
        (single / cls / "0.png").write_bytes((parent / "train" / "NORMAL" / "0.png").read_bytes())
    for n in ([], ["-n", 2]):
        cli_error(["train", *n, "--data", single, *TINY, "--out", out], "no validation images", "--val-data")
    assert not (tmp_path / "runs").exists()
    proc = run("train", "--data", parent, "--allow-nested-classes", *TINY, "--epochs", 1, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "classes: test, train" in proc.stdout
