"""A short fault campaign (benchmarks/faults.py): four random faults, a fixed seed, 2 ranks.

Seed 140 draws: Ctrl-C to the launcher (allreduce), SIGUSR1 to a worker in its first step
(master-worker), a rank paused 10 s in a step (allreduce: under the watchdog's 20 s, so the
run must go on), the master killed inside its first checkpoint write (master-worker).
Each must end, without a traceback, say what happened, resume and end with the
uninterrupted run's exact weights. docs/reliability.md has the long campaign."""

import subprocess
import sys
from pathlib import Path

import pytest

CAMPAIGN = Path(__file__).parents[2] / "benchmarks" / "faults.py"


@pytest.mark.mpi
@pytest.mark.timeout(900)
def test_a_short_fault_campaign_finds_nothing(tmp_path):
    argv = [
        sys.executable,
        str(CAMPAIGN),
        "--trials",
        "4",
        "--seed",
        "140",
        "--most-ranks",
        "2",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    trials = [line for line in proc.stdout.splitlines() if line.startswith("trial ")]
    assert len(trials) == 4 and not any("FAILED" in line for line in trials), proc.stdout
    assert "| all | | 4 |" in proc.stdout
