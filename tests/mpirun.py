"""Run a program under a real mpiexec for the tests (with the launcher's own settings)."""

import os
import subprocess
import sys
import time
from pathlib import Path

PROGRAMS = Path(__file__).parent / "mpi_programs"


def mpirun(n: int, program: list[str], timeout: float = 240, env: dict | None = None,
           extra: list[str] | None = None):
    """Returns (CompletedProcess, seconds). A hang fails the test via TimeoutExpired."""
    from mpitrain.launch import mpiexec_command

    cmd, full_env = mpiexec_command(n, program, extra=extra)
    full_env.update(env or {})
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - t


def script(name: str, *args) -> list[str]:
    return [sys.executable, str(PROGRAMS / name), *map(str, args)]


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "mpitrain", *map(str, args)]
