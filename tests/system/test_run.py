"""`mpitrain run -n N script.py ARGS`: any Python script as N ranks, with the launcher's guarantees."""

import subprocess
import sys
import time

import pytest

HELLO = """
import sys
import mpitrain
print("hello", mpitrain.rank(), mpitrain.size(), sys.argv[1:], flush=True)
print("to stderr", mpitrain.rank(), file=sys.stderr, flush=True)
"""

CRASH = """
import mpitrain
if mpitrain.rank() == 1:
    raise RuntimeError("rank one fails")
mpitrain.allreduce(1.0)  # rank 0 waits here for a peer that never comes
"""

EXIT = """
import sys
import mpitrain
mpitrain.allreduce(1.0)
sys.exit(3 if mpitrain.rank() == 0 else 0)
"""


def _run(tmp_path, body, *args, timeout=180):
    script = tmp_path / "job.py"
    script.write_text(body)
    cmd = [sys.executable, "-m", "mpitrain", "run", *args[:-1], str(script), *args[-1]] if args else None
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    return proc, time.perf_counter() - t


def test_a_script_runs_as_n_ranks_showing_rank_0s_output_with_its_arguments(tmp_path):
    proc, _ = _run(tmp_path, HELLO, "-n", "2", ["--epochs", "3", "x"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["hello 0 2 ['--epochs', '3', 'x']"]  # rank 1's stdout is not shown
    assert "to stderr 1" in proc.stderr  # errors and warnings are never hidden


def test_all_output_tags_every_ranks_lines(tmp_path):
    proc, _ = _run(tmp_path, HELLO, "-n", "2", "--all-output", [])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(proc.stdout.splitlines()) == ["[rank 0] hello 0 2 []", "[rank 1] hello 1 2 []"]
    assert "[rank 1] to stderr 1" in proc.stderr


def test_an_uncaught_error_on_one_rank_ends_the_job_at_once_naming_it(tmp_path):
    proc, seconds = _run(tmp_path, CRASH, "-n", "2", [])
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mpitrain: error")]
    assert lines == ["mpitrain: error on rank 1: RuntimeError: rank one fails"], proc.stderr[-3000:]
    assert "MPI_ABORT was invoked" not in proc.stderr  # Open MPI's box is held back after our line
    assert seconds < 60  # rank 0 did not wait for its allreduce


def test_the_scripts_exit_code_is_the_jobs(tmp_path):
    proc, _ = _run(tmp_path, EXIT, "-n", "2", [])
    assert proc.returncode == 3, proc.stderr[-3000:]


@pytest.mark.parametrize(
    "args, words",
    [
        (["run", "-n", "2", "no-such-script.py"], ["no such script: no-such-script.py"]),
        (["run", "job.py"], ["-n"]),
        (["run", "-n", "2", "--timeout", "-1", "{script}"], ["--timeout must be >= 0"]),
    ],
)
def test_mistakes_are_one_line(cli_error, tmp_path, args, words):
    (tmp_path / "job.py").write_text("print('never')\n")
    cli_error([a.replace("{script}", str(tmp_path / "job.py")) for a in args], *words)
