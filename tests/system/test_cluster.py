"""Clusters as a user meets them: Slurm's srun and allocations (faked with its variables:
Slurm is not installed here), and stop requests (SIGTERM/SIGUSR1) that checkpoint the run
with every rank and end it with exit code 0, resumable to the uninterrupted weights."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mpirun import PROGRAMS, cli, mpirun, script

pytestmark = pytest.mark.timeout(300)

SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_JOBID",
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
    "SLURM_NTASKS",
    "SLURM_TASKS_PER_NODE",
    "SLURM_STEP_ID",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_CPUS_PER_TASK",
    "SLURM_JOB_NUM_NODES",
    "SLURM_NNODES",
    "SLURM_JOB_CPUS_PER_NODE",
)


def _env(**slurm):
    env = {k: v for k, v in os.environ.items() if k not in SLURM_VARS}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", **{k: str(v) for k, v in slurm.items()})
    return env


def _srun_task(procid: int, tasks: int, **more) -> dict:
    """The variables srun gives task `procid` of a step of `tasks` on one node (no PMIx)."""
    return _env(
        SLURM_JOB_ID=42,
        SLURM_JOB_NODELIST="node1",
        SLURM_NTASKS=tasks,
        SLURM_STEP_ID=0,
        SLURM_STEP_NUM_TASKS=tasks,
        SLURM_PROCID=procid,
        SLURM_LOCALID=procid,
        **more,
    )


def test_srun_without_pmix_stops_every_task_and_says_so_once(tmp_path, synth_data):
    args = cli("train", "--data", synth_data, "--model", "tiny", "--out", tmp_path / "run")
    tasks = [
        subprocess.Popen(args, env=_srun_task(p, 4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for p in (0, 1)
    ]
    (out0, err0), (out1, err1) = (t.communicate(timeout=120) for t in tasks)
    assert [t.returncode for t in tasks] == [2, 2], err0 + err1
    lines = err0.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpitrain: error: srun started 4 tasks"), err0
    assert "srun --mpi=pmix" in lines[0] and "Traceback" not in err0
    assert out1 == err1 == ""  # task 1 stops quietly: the job's log has the line once
    assert not (tmp_path / "run").exists()  # stopped before anything was made


def test_one_srun_task_trains_with_slurms_cpus_per_task(tmp_path, synth_data):
    from mpitrain.runtime import available_cores

    if available_cores() < 2:
        pytest.skip("needs 2 cores: with one, 1 thread is also what the cores give")
    proc = subprocess.run(
        cli(
            "train",
            "--data",
            synth_data,
            "--model",
            "tiny",
            "--image-size",
            16,
            "--epochs",
            1,
            "--out",
            tmp_path / "run",
        ),
        env=_srun_task(0, 1, SLURM_CPUS_PER_TASK=1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 1 thread(s) per rank |" in proc.stdout, proc.stdout  # not the node's cores
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["runtime"]["threads_per_rank"] == 1


def _allocation(tasks: int, **more) -> dict:
    """A one-node Slurm allocation on this host, as a batch script sees it (no step)."""
    host = socket.gethostname()
    return _env(
        SLURM_JOB_ID=42,
        SLURM_JOBID=42,
        SLURM_JOB_NODELIST=host,
        SLURM_NODELIST=host,
        SLURM_NTASKS=tasks,
        SLURM_TASKS_PER_NODE=tasks,
        SLURM_JOB_NUM_NODES=1,
        SLURM_NNODES=1,
        SLURM_JOB_CPUS_PER_NODE=tasks,
        **more,
    )


@pytest.mark.mpi
def test_open_mpi_takes_its_slots_from_the_allocation_without_oversubscribe(monkeypatch):
    # 3 tasks granted on this (2-core) host: mpiexec runs 3 ranks, with the launcher's own
    # command line, which adds no --oversubscribe inside an allocation.
    env = _allocation(3)
    for key in SLURM_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        if key.startswith("SLURM_"):
            monkeypatch.setenv(key, value)
    from mpitrain.launcher.mpiexec import mpiexec_command

    cmd, _ = mpiexec_command(3, ["true"])
    assert "--oversubscribe" not in cmd
    proc, _ = mpirun(
        3, [sys.executable, "-c", "import os; print(os.environ['OMPI_COMM_WORLD_SIZE'])"], env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["3", "3", "3"]


def test_the_launcher_refuses_more_ranks_than_the_allocation_in_one_line(tmp_path, synth_data):
    proc = subprocess.run(
        cli("train", "-n", 4, "--data", synth_data, "--out", tmp_path / "run"),
        env=_allocation(2),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "mpitrain: error: -n 4 is more than the 2 task(s) of Slurm job 42 "
        f"(hosts {socket.gethostname()}, 2 task(s)): use -n 2 or less, or ask sbatch for --ntasks 4"
    ]


@pytest.mark.mpi
def test_every_strategys_stop_vote_agrees_on_one_step_under_mpiexec():
    # Rank 2 of 3 is asked to stop from its step 5 on (of 30).
    proc, _ = mpirun(3, script("stop_votes.py", 2, 5, 30), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    votes = json.loads(proc.stdout.strip().splitlines()[-1])
    # allreduce: in the same step's gradient sum; local-sgd: at the next average (K=4);
    # master-worker: the vote posted at step 8 is read 8 steps later.
    assert {name: v["stopped"] for name, v in votes.items()} == {
        "allreduce": [5, 5, 5],
        "local-sgd": [8, 8, 8],
        "master-worker": [16, 16, 16],
    }
    assert all(v["vote"] == [True, True, True] for v in votes.values())


@pytest.mark.mpi
def test_open_mpi_forwards_sigusr1_to_every_rank():
    # What the launcher relies on: SIGUSR1 to mpiexec reaches every rank (SIGTERM would
    # make mpiexec kill them).
    program = (
        "import signal, time, os\n"
        "got = []\n"
        "signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))\n"
        "open(os.environ['READY'] + os.environ['OMPI_COMM_WORLD_RANK'], 'w').close()\n"
        "t = time.time()\n"
        "while not got and time.time() - t < 60: time.sleep(0.02)\n"
        "print('rank', os.environ['OMPI_COMM_WORLD_RANK'], 'got', got, flush=True)\n"
    )
    import tempfile

    from mpitrain.launcher.mpiexec import mpiexec_command

    ready = tempfile.mkdtemp() + "/ready-"
    cmd, env = mpiexec_command(2, [sys.executable, "-c", program])
    env["READY"] = ready
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (os.path.exists(ready + "0") and os.path.exists(ready + "1")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert sorted(out.strip().splitlines()) == ["rank 0 got [10]", "rank 1 got [10]"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_the_launcher_passes_a_stop_request_on_as_sigusr1_and_waits(tmp_path, synth_data, sig):
    env = _env(MPITRAIN_MPIEXEC=str(PROGRAMS / "fake_mpiexec.py"))
    proc = subprocess.Popen(
        cli("train", "-n", 2, "--data", synth_data, "--out", tmp_path / "run"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "fake mpiexec started\n"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert "fake mpiexec got SIGUSR1" in out, out + err
    assert proc.returncode == 0, err  # mpiexec's code: the ranks' checkpoint-and-stop


def _weights(run_dir):
    import keras

    return keras.saving.load_model(run_dir / "model.keras", safe_mode=True).get_weights()


TRAIN = ["--model", "seed", "--image-size", 16, "--epochs", 2, "--batch-size", 4, "--threads", 1]


@pytest.mark.mpi
def test_a_signalled_rank_stops_every_rank_at_a_checkpoint_and_resume_matches(tmp_path, synth_data):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    ok, _ = mpirun(2, cli("train", "--data", synth_data, *TRAIN, "--out", whole))
    assert ok.returncode == 0, ok.stderr[-2000:]

    # Rank 1 gets SIGUSR1 in its 4th step (of 9 per epoch): mid-epoch 1, no checkpoint yet.
    proc, _ = mpirun(
        2,
        script("fault_at_step.py", "train", "--data", synth_data, *TRAIN, "--out", stopped),
        env={"FAULT": "usr1", "FAULT_RANK": "1", "FAULT_AT": "4"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (stopped / "model.keras").exists()
    saved = [p.name for p in (stopped / "checkpoints").glob("ckpt-*.npz")]
    assert saved == ["ckpt-e00000-s0000004.npz"]  # every rank stopped after the same step
    assert re.search(
        r"mpitrain: stopped on request \(SIGTERM or SIGUSR1 to a rank\): every rank saved its "
        r"state at epoch 1, step 4 \(of 2 epochs\)",
        proc.stderr,
    ), proc.stderr[-2000:]
    assert f"continue with: mpitrain train -n 2 --resume --out {stopped}" in proc.stderr
    assert proc.stderr.count("mpitrain: stopped") == 1 and "Traceback" not in proc.stderr

    resumed, _ = mpirun(2, cli("train", "--resume", "--out", stopped))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at epoch 1, step 4 of 9" in resumed.stdout
    for a, b in zip(_weights(whole), _weights(stopped)):
        assert np.array_equal(a, b)  # bit-identical to the uninterrupted run


DOC = PROGRAMS.parents[2] / "docs" / "cluster.md"
JOB_SCRIPT = PROGRAMS.parents[2] / "examples" / "xray.sbatch"
# Stand-ins for the script's commands: each call is appended to ./calls. MODE=stop waits
# for SIGUSR1 (a run stopped on request: exit 0, no model), finish writes the model, fail
# exits 1.
FAKE_MPITRAIN = """#!/bin/bash
echo "mpitrain $*" >> calls
case "$MODE" in
  stop) trap 'echo "got USR1" >> calls; exit 0' USR1; touch started; while :; do sleep 0.05; done ;;
  finish) mkdir -p runs/xray && touch runs/xray/model.keras ;;
  fail) exit 1 ;;
esac
"""
FAKE_SCONTROL = '#!/bin/bash\necho "scontrol $*" >> calls\n'


def test_the_job_script_on_the_cluster_page_is_examples_xray_sbatch():
    shown = re.search(r"```bash\n(#!/bin/bash\n.*?)```", DOC.read_text(), re.S)[1]
    assert shown == JOB_SCRIPT.read_text()


def _sbatch_script(tmp_path, mode, checkpoints=False):
    """examples/xray.sbatch (docs/cluster.md's sbatch script), started with bash in `tmp_path` as Slurm would (job
    42, 8 tasks), with stand-ins for mpitrain and scontrol; returns the process."""
    (tmp_path / "job.sh").write_text(JOB_SCRIPT.read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("mpitrain", FAKE_MPITRAIN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    if checkpoints:
        (tmp_path / "runs" / "xray" / "checkpoints").mkdir(parents=True)
    env = _env(SLURM_JOB_ID=42, SLURM_NTASKS=8, MODE=mode, PATH=f"{bin_dir}:{os.environ['PATH']}")
    return subprocess.Popen(
        ["bash", "job.sh"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _calls(tmp_path):
    return (tmp_path / "calls").read_text().splitlines()


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_the_sbatch_script_passes_slurms_signal_on_and_requeues_a_stopped_run(tmp_path, sig):
    job = _sbatch_script(tmp_path, "stop")
    deadline = time.time() + 30
    while not (tmp_path / "started").exists() and time.time() < deadline:
        time.sleep(0.02)
    job.send_signal(sig)  # Slurm's --signal=B:USR1@120, or its SIGTERM
    out, err = job.communicate(timeout=30)
    assert job.returncode == 0, err
    assert _calls(tmp_path) == [
        "mpitrain train -n 8 --data /shared/data/chest_xray/train --recipe xray --out runs/xray",
        "got USR1",
        "scontrol requeue 42",
    ]
    assert "requeueing job 42" in out


@pytest.mark.parametrize("mode, code", [("finish", 0), ("fail", 1)])
def test_the_requeued_sbatch_script_resumes_and_requeues_no_finished_or_failed_run(tmp_path, mode, code):
    job = _sbatch_script(tmp_path, mode, checkpoints=True)
    job.communicate(timeout=30)
    assert job.returncode == code
    assert _calls(tmp_path) == ["mpitrain train -n 8 --resume --out runs/xray"]
