"""The watchdog under a real mpiexec: a stuck rank becomes an error, a slow one does not."""

import csv

import pytest

from mpirun import mpirun, script

pytestmark = pytest.mark.mpi
TINY = ["--model", "tiny", "--image-size", 16, "--batch-size", 4]


def _caught_as_stuck(proc, seconds: float, within: float) -> None:
    """The watchdog (--timeout 5) ended the job: non-zero, its one line, in bounded time."""
    assert proc.returncode != 0
    assert "no progress for" in proc.stderr and "--timeout 5" in proc.stderr, proc.stderr[-2000:]
    assert seconds < within


@pytest.mark.timeout(180)
def test_a_stuck_rank_is_turned_into_an_error(tmp_path, synth_data):
    proc, seconds = mpirun(
        3,
        script(
            "fault_at_step.py",
            "train",
            "--data",
            synth_data,
            *TINY,
            "--epochs",
            2,
            "--timeout",
            5,
            "--out",
            tmp_path / "run",
        ),
        timeout=120,
        env={"FAULT": "stall", "FAULT_RANK": "1", "FAULT_AT": "3"},
    )
    _caught_as_stuck(proc, seconds, 60)


@pytest.mark.timeout(300)
def test_master_worker_waiting_for_a_slow_worker_is_progress(tmp_path, synth_data):
    # 72 training images, 2 workers, batch 4: 9 steps per epoch. Worker 1 takes 2.5 s per
    # step from step 2 on, so the round at the epoch end comes ~20 s after the start, twice
    # --timeout, while worker 1 keeps stepping. The master (no training of its own) and
    # worker 2 (done early) wait for it; that wait must not be taken for a hang.
    out = tmp_path / "run"
    proc, _ = mpirun(
        3,
        script(
            "fault_at_step.py",
            "train",
            "--data",
            synth_data,
            *TINY,
            "--epochs",
            1,
            "--strategy",
            "master-worker",
            "--timeout",
            10,
            "--out",
            out,
        ),
        timeout=240,
        env={"FAULT": "slow", "FAULT_RANK": "1", "FAULT_AT": "2", "FAULT_SECONDS": "2.5"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no progress" not in proc.stderr
    with open(out / "history.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["seconds"]) >= 8 * 2.5  # the epoch row counts the slow worker's time


@pytest.mark.timeout(240)
def test_master_worker_with_a_stopped_worker_is_still_caught(tmp_path, synth_data):
    # SIGSTOP freezes worker 1 with its own watchdog; the master and worker 2 must notice
    # that nobody progresses any more and end the job.
    proc, seconds = mpirun(
        3,
        script(
            "fault_at_step.py",
            "train",
            "--data",
            synth_data,
            *TINY,
            "--epochs",
            2,
            "--strategy",
            "master-worker",
            "--timeout",
            5,
            "--out",
            tmp_path / "run",
        ),
        timeout=180,
        env={"FAULT": "stop", "FAULT_RANK": "1", "FAULT_AT": "3"},
    )
    _caught_as_stuck(proc, seconds, 120)


@pytest.mark.timeout(300)
def test_workers_waiting_for_the_master_to_validate_is_progress(tmp_path, synth_data):
    # The master validates all 8 validation images alone, 2 s per image, in batches of
    # --batch-size 2: 16 s while the workers, done with the epoch, wait for the result.
    proc, _ = mpirun(
        3,
        script(
            "fault_at_step.py",
            "train",
            "--data",
            synth_data,
            "--model",
            "tiny",
            "--image-size",
            16,
            "--batch-size",
            2,
            "--epochs",
            1,
            "--strategy",
            "master-worker",
            "--timeout",
            10,
            "--out",
            tmp_path / "run",
        ),
        timeout=240,
        env={"FAULT": "slow_validation", "FAULT_RANK": "0", "FAULT_SECONDS": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no progress" not in proc.stderr
