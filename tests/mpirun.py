"""Run mpitrain for the tests: under a real mpiexec (with the launcher's own settings) or as a CLI."""

import os
import subprocess
import sys
import time
from pathlib import Path

PROGRAMS = Path(__file__).parent / "system" / "mpi_programs"


def mpirun(n: int, program: list[str], timeout: float = 240, env: dict | None = None, extra: list[str] | None = None):
    """Returns (CompletedProcess, seconds). A hang fails the test via TimeoutExpired."""
    from mpitrain.launcher.mpiexec import mpiexec_command

    cmd, full_env = mpiexec_command(n, program, extra=extra)
    full_env.update(env or {})
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - t


def script(name: str, *args) -> list[str]:
    return [sys.executable, str(PROGRAMS / name), *map(str, args)]


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "mpitrain", *map(str, args)]


def train_run(tmp_path_factory, data, *extra) -> Path:
    """A finished run folder of the tiny model (one CLI training, cache in the test folder)."""
    out = tmp_path_factory.mktemp("run") / "run"
    env = dict(
        os.environ, TF_CPP_MIN_LOG_LEVEL="2", MPITRAIN_CACHE_DIR=str(tmp_path_factory.getbasetemp() / "mpitrain-cache")
    )
    defaults = {"--data": data, "--model": "tiny", "--image-size": 16, "--epochs": 1, "--batch-size": 8, "--out": out}
    given = {str(e) for e in extra}  # an option given twice is refused: `extra` replaces a default
    proc = subprocess.run(
        cli("train", *(x for k, v in defaults.items() if k not in given for x in (k, v)), *extra),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out
