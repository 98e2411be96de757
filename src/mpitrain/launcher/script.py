"""`mpitrain run -n N [--hostfile F] [--iface ...] script.py ARGS...`: any Python script as N
ranks, as `horovodrun` and `torchrun` start theirs.

The supervisor (launcher/supervise.py) gives it what `mpitrain train -n N` has: a crashed or
killed rank ends the job naming the rank, Ctrl-C ends every rank with exit 130, a Slurm
allocation is respected, more ranks than cores are allowed, the variables that let Open MPI
run as root are set, and Open MPI's boxed reports are held back after an error line. Each
rank runs `python -m mpitrain.parallel.runscript script.py ARGS` (any uncaught error on a
rank aborts the job; only rank 0's standard output unless --all-output, which tags every
rank's lines). `--timeout S` reaches the script's `mpitrain.fit` (MPITRAIN_TIMEOUT): a job
whose training makes no progress for S seconds is aborted, naming the rank that stalled.
`--elastic` starts the job under Open MPI's ULFM, so a script's `mpitrain.fit(...,
elastic=True)` can go on without a lost rank.

The same script runs unchanged under a plain `mpiexec -n N python script.py` or `srun`.
"""

from __future__ import annotations

import os
import sys

from mpitrain.errors import UserError
from mpitrain.launcher.capacity import check_capacity
from mpitrain.launcher.mpiexec import elastic_flags
from mpitrain.launcher.supervise import supervise
from mpitrain.parallel.wire import ALL_OUTPUT_ENV, TIMEOUT_ENV


def program(script: str, args: list[str]) -> list[str]:
    """What each rank runs: the script under mpitrain's rank-side runner."""
    return [sys.executable, "-m", "mpitrain.parallel.runscript", script, *args]


def check_script(script: str) -> None:
    if not os.path.isfile(script):
        raise UserError(
            f"no such script: {script}" + ("" if script.endswith(".py") else " (give the path of a .py file)")
        )


def run_script(
    n: int,
    script: str,
    args: list[str],
    *,
    hostfile: str | None = None,
    iface: str | None = None,
    all_output: bool = False,
    timeout: float | None = None,
    elastic: bool = False,
    debug: bool = False,
) -> int:
    """Run `script ARGS` as `n` ranks; returns the job's exit code. `elastic`: under ULFM, so
    that a lost rank does not end the job (the script's `mpitrain.fit(..., elastic=True)`
    goes on without it)."""
    check_script(script)
    check_capacity(n, hostfile, per_rank=None)  # a script's memory is unknown: the cores warning only
    variables = {ALL_OUTPUT_ENV: "1"} if all_output else {}
    if timeout is not None:
        variables[TIMEOUT_ENV] = repr(float(timeout))
    return supervise(
        n,
        program(script, args),
        hostfile=hostfile,
        iface=iface,
        variables=variables,
        extra=elastic_flags() if elastic else None,
        debug=debug,
        training=False,
    )
