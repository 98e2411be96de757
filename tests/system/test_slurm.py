"""mpitrain under a real Slurm (tests/slurm.py: munged, slurmctld and a slurmd started for
these tests): srun's PMIx, an sbatch job running examples/xray.sbatch as it is, Slurm's
signals, `scontrol requeue`, and a task killed under srun.

A step of these runs is slowed (SLOW_STEP, tests/inject) where a test must
signal or kill a job while it is still training; the weights are those of an unslowed run.
"""

import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import slurm
from mpirun import PROGRAMS

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(420)]

WHY = slurm.unavailable()
SCRIPT = PROGRAMS.parents[2] / "examples" / "xray.sbatch"
SLOW = {"PYTHONPATH": str(PROGRAMS.parents[1] / "inject"), "SLOW_STEP": "0.15"}
# Small, but the xray recipe's options: what the job script trains, on the suite's data.
TRAIN = ["--model", "seed", "--image-size", "16", "--epochs", "3", "--batch-size", "4", "--groups", "none"]
NOISE = ("help file", "Sorry!", "Traceback", "PMIX ERROR")


@pytest.fixture(scope="module")
def cluster():
    if WHY:
        pytest.skip(WHY)
    with slurm.Slurm(cpus=4) as s:
        yield s


@pytest.fixture(scope="module")
def reference(cluster, synth_data, tmp_path_factory):
    """The uninterrupted run: `srun --mpi=pmix -n 2`, and its output."""
    out = tmp_path_factory.mktemp("slurm") / "whole"
    argv = ["srun", "--mpi=pmix", "-n", "2", "--cpus-per-task=1", "mpitrain", "train"]
    proc = cluster.run([*argv, "--data", str(synth_data), "--recipe", "xray", *TRAIN, "--out", str(out)])
    return out, proc


def _weights(run_dir):
    import keras

    return keras.saving.load_model(Path(run_dir) / "model.keras", safe_mode=True).get_weights()


def _clean(text):
    return [line for line in text.splitlines() if any(n in line for n in NOISE)]


def _until(ready, seconds, why):
    deadline = time.monotonic() + seconds
    while not ready():
        assert time.monotonic() < deadline, why
        time.sleep(0.05)


def test_srun_with_pmix_makes_one_job_of_its_tasks(reference):
    out, proc = reference
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 training ranks | 1 thread(s) per rank" in proc.stdout
    assert proc.stdout.count("epoch 3/3") == 1  # rank 0 speaks: one job, not two of one rank
    assert (out / "model.keras").exists()
    assert _clean(proc.stdout + proc.stderr) == []  # no PMIx help-file complaint, no traceback


def test_the_job_script_stops_on_slurms_signal_requeues_itself_and_resumes_to_the_same_weights(
    cluster, reference, synth_data, tmp_path
):
    # examples/xray.sbatch as it is; sbatch's options on its command line win over its
    # #SBATCH lines (one node, 2 tasks, a 10-minute limit), the rest goes to a new run.
    run = tmp_path / "run"
    env = cluster.env(dict(SLOW, DATA=str(synth_data), OUT=str(run)))
    options = [
        "--nodes=1",
        "--ntasks=2",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--time=10",
        f"--chdir={tmp_path}",
    ]
    job = cluster.command(["sbatch", "--parsable", *options, str(SCRIPT), *TRAIN], env=env).stdout.strip()
    log = tmp_path / f"xray-{job}.log"
    _until(lambda: log.exists() and "\nloaded " in log.read_text(), 240, f"job {job} did not start training")
    # What --signal=B:USR1@120 does 120 s before the limit: SIGUSR1 to the batch script.
    cluster.command(["scancel", "--signal=USR1", "--batch", job])
    fields = cluster.wait(job, "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", timeout=300)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", (fields, text[-3000:])
    assert re.search(r"mpitrain: stopped on request .* every rank saved its state at epoch 1, step \d+", text), text
    assert f"requeueing job {job} to resume from the checkpoint" in text
    assert re.search(r"resuming at epoch 1, step \d+ of 9", text), text
    assert text.count("epoch 3/3") == 1 and _clean(text) == []
    whole, _ = reference
    for a, b in zip(_weights(whole), _weights(run), strict=True):
        assert np.array_equal(a, b)  # bit-identical to the uninterrupted srun run


def test_sbatch_signal_at_a_time_before_the_limit_stops_an_srun_task_at_a_checkpoint(cluster, synth_data, tmp_path):
    # --signal=USR1@T (no B:): Slurm signals the tasks themselves T s before the limit. The
    # limit is 1 minute and T 50 s; slurmctld checks limits every few seconds, so the signal
    # comes 10-40 s in. The run would need far longer, so only the signal can end it early.
    # The task is not bound to its 1 CPU (--cpu-bind=none): its threads come from
    # --cpus-per-task alone, where the CPUs it may run on would give more.
    run, log = tmp_path / "run", tmp_path / "job.log"
    train = f"srun --mpi=pmix --cpu-bind=none mpitrain train --data {synth_data} {' '.join(TRAIN[:4])} --epochs 200"
    options = ["--ntasks=1", "--cpus-per-task=1", "--time=1", "--signal=USR1@50", f"--output={log}"]
    job = cluster.command(["sbatch", "--parsable", *options, "--wrap", f"{train} --out {run}"], env=cluster.env(SLOW))
    job = job.stdout.strip()
    fields = cluster.wait(job, "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", timeout=240)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED", (fields, text[-3000:])
    if len(os.sched_getaffinity(0)) > 1:
        assert "1 training rank | 1 thread(s) per rank" in text  # SLURM_CPUS_PER_TASK
    assert "mpitrain: stopped on request (SIGTERM or SIGUSR1 to a rank)" in text, text[-3000:]
    assert text.count("mpitrain: stopped") == 1 and _clean(text) == []
    assert list((run / "checkpoints").glob("ckpt-*.npz")) and not (run / "model.keras").exists()


def _task_pid(cluster, procid):
    """The pid of `mpitrain train` task `procid` of this cluster's srun (from /proc)."""
    for pid in os.listdir("/proc"):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"mpitrain" in cmd and f"SLURM_CONF={cluster.conf}".encode() in env:
            if f"SLURM_PROCID={procid}".encode() in env and b"SLURM_STEP_ID=0" in env:
                return int(pid)
    return None


def test_a_task_killed_under_srun_ends_the_step_at_once_and_the_run_resumes(cluster, synth_data, tmp_path):
    # Slurm's PMIx plugin cancels the step when a task dies: every other task gets SIGKILL
    # at once (no signal a rank could handle, so srun's lines are all the user sees:
    # docs/cluster.md). What mpitrain must hold: nothing hangs, nothing is half-written.
    from mpitrain.engine import checkpoint

    run = tmp_path / "run"
    argv = [
        "srun",
        "--mpi=pmix",
        "-n",
        "2",
        "mpitrain",
        "train",
        "--data",
        str(synth_data),
        *TRAIN[:4],
        "--epochs",
        "20",
    ]
    proc = cluster.popen([*argv, "--out", str(run)], env=cluster.env(SLOW))
    _until(lambda: checkpoint.list_checkpoints(run) or proc.poll() is not None, 240, "no checkpoint was written")
    assert proc.poll() is None, proc.communicate()
    pid = _task_pid(cluster, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and time.monotonic() - started < 30
    assert "task 1: Killed" in err and "Traceback" not in out + err
    assert checkpoint.load_latest(run) is not None and not (run / "model.keras").exists()


def test_a_bad_command_line_under_srun_is_said_once(cluster):
    proc = cluster.run(
        ["srun", "--mpi=pmix", "-n", "2", "mpitrain", "train", "--epochs", "1", "--epochs", "2"], timeout=60
    )
    said = [line for line in proc.stderr.splitlines() if line.startswith("mpitrain:")]
    assert proc.returncode == 2 and len(said) == 1 and "--epochs: given twice" in said[0], proc.stderr
