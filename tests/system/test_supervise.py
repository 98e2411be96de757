"""The job supervisor (launcher/supervise.py) runs any program under a real mpiexec, not only
`python -m mpitrain`: its output relayed, its exit code passed through, a crashed rank named
in one line, Ctrl-C passed on once and answered with 130. These programs never import
mpitrain, so each job takes about a second."""

import os
import signal
import subprocess
import sys
import time

import pytest

from mpitrain.launcher.supervise import supervise

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(120)]

RANK = "import os, sys, time, signal; r = int(os.environ['OMPI_COMM_WORLD_RANK']); "


def _program(code: str) -> list[str]:
    return [sys.executable, "-c", RANK + code]


def test_any_program_runs_as_n_ranks_and_its_output_is_relayed(capfd):
    code = supervise(2, _program("print(f'rank {r} of', os.environ['OMPI_COMM_WORLD_SIZE'], flush=True)"))
    out = capfd.readouterr()
    assert code == 0, out.err
    assert sorted(out.out.splitlines()) == ["rank 0 of 2", "rank 1 of 2"]


@pytest.mark.parametrize("status", [3, 7])
def test_a_ranks_exit_code_is_the_jobs(capfd, status):
    code = supervise(2, _program(f"sys.exit({status} if r == 1 else 0)"))
    assert code == status, capfd.readouterr().err


def test_a_crashed_rank_ends_the_job_naming_the_rank(capfd):
    # Rank 0 would wait a minute: the job ends as soon as rank 1 dies.
    start = time.monotonic()
    code = supervise(
        2, _program("time.sleep(0.5); r == 1 and os.kill(os.getpid(), signal.SIGKILL); time.sleep(60)"), resume_hint="X"
    )
    err = capfd.readouterr().err
    assert code != 0 and time.monotonic() - start < 30
    last = err.strip().splitlines()[-1]
    assert last.startswith("mpitrain: error: rank 1 on ") and "(SIGKILL)" in last, err
    assert last.endswith("the whole job was stopped; continue it with: X")


def test_ctrl_c_ends_every_rank_with_130(tmp_path):
    # The supervisor in a process of its own, as `mpitrain run` would be; its ranks note that
    # they started, then wait. One SIGINT to the supervisor (mpiexec has its own process
    # group, so a terminal's Ctrl-C reaches only it) must end them all.
    marks = tmp_path / "ranks"
    marks.mkdir()
    ranks = _program(f"open(os.path.join({str(marks)!r}, str(r)), 'w').close(); time.sleep(120)")
    script = f"import sys; from mpitrain.launcher.supervise import supervise; sys.exit(supervise(2, {ranks!r}))"
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(os.listdir(marks)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(os.listdir(marks)) == 2
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "mpitrain: interrupted"
