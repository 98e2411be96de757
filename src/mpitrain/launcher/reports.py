"""Open MPI's reports of a failed job, read by the supervisor and said in one line each:
a rank lost to a signal, a host lost mid-job, a host the job could not start on, hosts
that cannot reach each other, a job that did not start in time; and the filter that holds
back Open MPI's boxes once a rank has explained the failure itself."""

from __future__ import annotations

import re
import signal
import time

from mpitrain.launcher.hosts import network_of
from mpitrain.parallel.wire import START_TIMEOUT_ENV

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


def stalled_message(stage: str, seconds: float, hosts: list[str], via: str | None) -> str:
    """The one line for a job that did not start (`stage` "start": no rank ran) or whose
    ranks did not reach each other ("contact") within `seconds`."""
    others = ", ".join(hosts) if hosts else "the other hosts"
    over = f" over {via}" if via else ""
    if stage == "start":
        return (
            f"mpitrain: error: the job did not start within {seconds:g} s: {others} did not connect back to "
            f"this host{over}; check the --hostfile, ssh, and that the hosts reach each other on that network "
            f"({START_TIMEOUT_ENV}={seconds:g})\n"
        )
    return (
        f"mpitrain: error: the ranks on {others} did not reach each other within {seconds:g} s{over}: "
        f"the hosts do not reach each other on that network; choose the one that connects them with "
        f"--iface NAME|CIDR ({START_TIMEOUT_ENV}={seconds:g})\n"
    )


_DASHES = re.compile(r"^-{20,}\s*$")
# Open MPI's box when the job could not start on a host (a wrong --hostfile, no ssh there).
_NO_DAEMON = re.compile(r"daemon failed to report back.*?Remote host:\s*(\S+)", re.S)


# Open MPI's box when the daemon of a host stopped answering mid-job (the host was lost):
# PRRTE then ends the whole job, --with-ft ulfm or not, and mpiexec may still exit with 0.
_LOST_DAEMON = re.compile(r"lost communication with a remote daemon.*?Remote daemon:.*? on node (\S+)", re.S)


def lost_host(box: str) -> str | None:
    m = _LOST_DAEMON.search(box)
    return m.group(1) if m else None


def lost_host_message(host: str, resume_hint: str | None = None, why: str | None = None, training: bool = True) -> str:
    """`why`: the reason an --elastic job could not go on without the host (launcher/hostloss.py);
    None for a job that was not elastic. `training`: the job is `mpitrain train`'s (which
    --elastic can heal), not a script's."""
    if why is None:
        msg = (
            f"mpitrain: error: host {host} was lost (Open MPI's daemon there stopped answering) and Open MPI "
            "stopped the whole job"
            + (" (with --elastic and a --hostfile it goes on without the host)" if training else "")
        )
    else:
        msg = f"mpitrain: error: host {host} was lost and the job cannot go on without it: {why}"
    return msg + (f"; continue it with: {resume_hint}" if resume_hint else "")


def no_start_host(box: str) -> str | None:
    m = _NO_DAEMON.search(box)
    return m.group(1) if m else None


def no_start_message(host: str, via: str | None = None) -> str:
    """`via`: the network the host had to connect back over (e.g. "interface eth2 (--iface)")."""
    reach = f", and that it reaches this host over {via}" if via else ""
    return (
        f"mpitrain: error: mpiexec could not start the job on host {host}: check the --hostfile, "
        f"that ssh to it works without a password{reach} (--debug shows Open MPI's report)\n"
    )


# Open MPI's box when a rank could not open a TCP connection to a rank on another host.
_NO_CONNECT = re.compile(
    r"failed to TCP connect to a peer.*?Local host:\s*(\S+).*?connect\(\) to "
    r"([0-9a-fA-F.:]+?):\d+ failed.*?Error:\s*([^\n]*)",
    re.S,
)


def no_connect_message(box: str, networks: dict | None = None) -> str | None:
    """One line from Open MPI's report of ranks whose hosts cannot reach each other."""
    m = _NO_CONNECT.search(box)
    if not m:
        return None
    host, address, error = m.group(1), m.group(2), m.group(3).strip()
    error = re.sub(r"\s*\(\d+\)$", "", error)
    return (
        f"mpitrain: error: host {host} could not connect to a rank at {address} over "
        f"{network_of(address, networks)} ({error}): the hosts do not reach each other on that network; "
        "choose the one that connects them with --iface NAME|CIDR (--debug shows Open MPI's report)\n"
    )


class NoStartBox:
    """mpiexec's stdout, before the relay: Open MPI prints its report of a job it could not
    start on a host (a wrong --hostfile, no ssh there) as a box on stdout. That box becomes
    one line (`say`); every other line goes on to `passon` unchanged, in order."""

    def __init__(self, passon, say, debug: bool = False, via: str | None = None, started=None):
        """`started()`: whether the job had started (then a host whose daemon's ssh ended
        was lost, not unreachable)."""
        self.passon, self.say, self.debug, self.via = passon, say, debug, via
        self.started = started or (lambda: False)
        self.host: str | None = None
        self.lost: str | None = None  # a host whose daemon was lost mid-job
        self._held: list[str] | None = None

    def feed(self, line: str) -> None:
        if self._held is None:
            if _DASHES.match(line):
                self._held = [line]  # a box may start: look at its first line
            else:
                self.passon(line)
            return
        self._held.append(line)
        if len(self._held) == 2 and not line.startswith(
            ("A daemon failed to report back", "PRTE has lost communication with a remote daemon")
        ):
            self._flush()
        elif len(self._held) > 2 and _DASHES.match(line):
            box, self._held = "".join(self._held), None
            host, gone = no_start_host(box), lost_host(box)
            if host and self.started():
                host, gone = None, host
            if host and not self.debug:
                self.host = host
                self.say(no_start_message(host, self.via))
            elif gone and not self.debug:
                self.lost = gone  # said at the end, with the resume command
            else:
                self.passon(box)

    def close(self) -> None:
        if self._held:
            self._flush()

    def _flush(self) -> None:
        held, self._held = self._held, None
        for line in held or ():
            self.passon(line)


_SETPGID = re.compile(r"plm:ssh: Warning: setpgid\(\d+,\d+\) failed in parent")
_OMPI_TAGGED = re.compile(r"^\s*\[[^\]\s]+:\d+\] ")  # "[vm:10527] PMIX ERROR: ...", also indented


class StderrFilter:
    """mpiexec's stderr, line by line. Open MPI's reports come as boxes between lines of
    dashes; once a rank has explained the failure in an `mpitrain: error` line (or the user
    pressed Ctrl-C), they only repeat it, so they are held back, as are Open MPI's tagged
    `[host:pid]` diagnostics. With --debug everything is shown."""

    def __init__(self, out, debug: bool = False, write=None, via: str | None = None, started=None):
        self.debug, self.via = debug, via
        self.started = started or (lambda: False)  # as for NoStartBox
        self.explained = False
        self.no_start: str | None = None  # the host Open MPI could not start the job on
        self.no_connect: str | None = None  # our line about hosts that cannot reach each other
        self.lost: str | None = None  # a host whose daemon was lost mid-job
        self._box: list[str] | None = None
        self._write = write or (lambda text: (out.write(text), out.flush()))

    def _had_started(self, wait: float = 0.5) -> bool:
        """Whether the job had started. The "started" state comes on mpiexec's stdout, read
        by another thread than this stderr, so it may lag behind a box printed after it:
        give it a moment before calling a host unreachable rather than lost."""
        deadline = time.monotonic() + wait
        while not self.started():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def feed(self, line: str) -> None:
        if self._box is not None:
            self._box.append(line)
            if _DASHES.match(line):
                box, self._box = "".join(self._box), None
                host = no_start_host(box)
                if host and self._had_started() and not self.debug:
                    self.lost, self.explained = host, True  # it had started: the host was lost
                    return
                if host and not self.explained and not self.debug:
                    self.no_start, self.explained = host, True
                    self._write(no_start_message(host, self.via))
                    return
                gone = lost_host(box)
                if gone and not self.debug:
                    self.lost, self.explained = gone, True  # said at the end, with the resume command
                    return
                said = no_connect_message(box)
                if said and not self.explained and not self.debug:
                    self.no_connect, self.explained = said, True
                    self._write(said)
                    return
                self._emit(box, noise=True)
            return
        if _DASHES.match(line):
            self._box = [line]
            return
        if line.startswith(("mpitrain: error", "mpitrain: interrupted")):
            self.explained = True
        if _SETPGID.search(line) and not self.debug:
            return  # Open MPI's harmless race between starting a remote agent and grouping it
        self._emit(line, noise=bool(_OMPI_TAGGED.match(line)) or not line.strip())

    def close(self) -> None:
        if self._box:
            box, self._box = self._box, None
            self._emit("".join(box), noise=True)

    def _emit(self, text: str, noise: bool) -> None:
        if noise and self.explained and not self.debug:
            return
        self._write(text)
