"""The job supervisor: start mpiexec with N copies of any program and stand between it and
the user until the job ends (`supervise`). Nothing here knows what the program is: `mpitrain
train -n N` passes `python -m mpitrain train`, a script launcher would pass the script.

* stdout is relayed line by line; rank 0's progress arrives as marker lines and is redrawn
  as a one-line bar when our stdout is a terminal (dropped in a log; launcher/relay.py);
* stderr is relayed line by line; after a rank's own `mpitrain: error` line, Open MPI's
  boxed reports (which only repeat that a process failed) are held back, unless --debug
  (launcher/reports.py);
* a job that has not started, or whose ranks have not reached each other, within
  $MPITRAIN_START_TIMEOUT seconds is stopped with one line (for programs that report
  their start over parallel/wire.py, as mpitrain's ranks do);
* mpiexec runs in its own process group, so Ctrl-C reaches only us: we pass it on once,
  wait for the job to end and let the caller report where the run stopped (exit 130). A
  SIGINT sent to us alone counts the same, even when we were started with SIGINT ignored
  (a background job of a script, some supervisors). Ranks that are still alive
  `STOP_GRACE` seconds later (a machine so loaded that they hardly run) are killed, so
  that none of them writes into the run folder after we tidied it up;
* SIGTERM or SIGUSR1 (a batch system's stop request) reaches the ranks as SIGUSR1 when they
  can stop on it (`stoppable`) and have begun to train, and we wait for them; before rank 0
  reported its first step there is nothing to save, so it ends the job as Ctrl-C does
  (exit 143 for SIGTERM);
* at the end a rank lost to a signal, or a lost host, is named in one line.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading

from mpitrain.errors import UserError
from mpitrain.launcher.hosts import (
    check_iface,
    local_names,
    local_networks,
    networks_said,
    read_hostfile,
    several_networks_warning,
)
from mpitrain.launcher.mpiexec import in_allocation, mpiexec_command
from mpitrain.launcher.relay import StdoutRelay, want_bar
from mpitrain.launcher.reports import NoStartBox, StderrFilter, lost_host_message, lost_rank_message, stalled_message
from mpitrain.parallel.wire import START_TIMEOUT, START_TIMEOUT_ENV

# Seconds the ranks get to end after our Ctrl-C is passed on, before they are killed.
STOP_GRACE = 15.0


class HostLost(Exception):
    """The job ended because a host was lost (raised by `supervise` only when asked to:
    `heal`). `placed`: the host of every rank as the ranks said at contact (None if they had not)."""

    def __init__(self, host: str, placed: list[str] | None = None):
        super().__init__(host)
        self.host, self.placed = host, placed


def start_timeout() -> float:
    """The deadline for "contact" ($MPITRAIN_START_TIMEOUT seconds, 0: none)."""
    text = os.environ.get(START_TIMEOUT_ENV, "")
    try:
        return max(0.0, float(text)) if text else START_TIMEOUT
    except ValueError:
        raise UserError(f"{START_TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None


def supervise(
    n: int,
    program: list[str],
    *,
    hostfile: str | None = None,
    extra: list[str] | None = None,
    variables: dict | None = None,
    resume_hint: str | None = None,
    debug: bool = False,
    on_interrupt=None,
    stoppable: bool = False,
    iface: str | None = None,
    heal: bool = False,
    contact: bool = False,
    training: bool = True,
) -> int:
    """Run `program` as N ranks under mpiexec and return the job's exit code (130 after
    Ctrl-C, 143 after a SIGTERM before rank 0's first step, 2 after a usage error said in one line: the hostfile, the network).

    `extra`: more mpiexec flags; `variables`: more environment for the ranks (forwarded to
    other hosts). `resume_hint`: the command that continues the job, said with a lost rank
    or host. `on_interrupt(where)` reports a Ctrl-C once the job has ended (`where`: the
    last position rank 0 reported, or None). `stoppable`: the ranks stop cleanly on SIGUSR1,
    so our SIGTERM reaches them as that. `heal`: a lost host raises HostLost instead of
    being said (the caller goes on without it: launcher/elastic.py). `contact`: the
    program's rank 0 reports the job's start and the ranks' first contact over
    parallel/wire.py (mpitrain's own ranks do, in comm.world): then a job that has not got
    that far within $MPITRAIN_START_TIMEOUT seconds is stopped (any other program may take
    its time). `training`: the program is `mpitrain train` (messages may name its options)."""
    if n < 1:
        raise UserError(f"-n must be >= 1, got {n}")
    deadline = start_timeout() if n > 1 and contact else 0.0
    where = in_allocation(n, hostfile)
    networks = local_networks()
    iface, via = _network(iface, hostfile, networks)
    cmd, env = mpiexec_command(n, program, hostfile, extra, launcher=True, variables=variables, iface=iface)
    if where:
        print(where, file=sys.stderr, flush=True)
    job = _Job(cmd, env, debug, via)
    job.watch_start(deadline, [h for h, _ in read_hostfile(hostfile)] if hostfile else [], local_names(networks))
    code = job.wait(stoppable)
    return _outcome(job, code, on_interrupt, resume_hint, heal, training)


def _network(iface: str | None, hostfile: str | None, networks: dict) -> tuple[str | None, str | None]:
    """(--iface checked, the network the hosts talk over, for messages); without --iface a
    warning when Open MPI has several to choose from."""
    if iface is not None:
        iface = check_iface(iface, networks)
        return iface, f"{'network' if '/' in iface else 'interface'} {iface} (--iface)"
    hosts = read_hostfile(hostfile) if hostfile is not None else None
    warning = several_networks_warning(hosts, local_names(networks), networks)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return None, networks_said(networks)


def _outcome(job: _Job, code: int, on_interrupt, resume_hint: str | None, heal: bool, training: bool) -> int:
    """The exit code to return, after saying in one line what ended the job."""
    if job.interrupted and (code != 0 or job.interrupted != signal.SIGINT):
        if on_interrupt is not None:
            on_interrupt(job.relay.where)
        else:
            print("mpitrain: interrupted", file=sys.stderr)
        return 128 + job.interrupted
    if code != 0 and (job.errors.no_start or job.stdout.host or job.errors.no_connect or job.stalled):
        return 2  # a usage error (the hostfile, the network), said in one line
    gone = job.errors.lost or job.stdout.lost
    if gone and heal:
        raise HostLost(gone, job.relay.hosts)
    if gone:
        print(lost_host_message(gone, resume_hint, training=training), file=sys.stderr)
        return code or 1  # mpiexec may say 0 although it stopped the job
    if code != 0:
        lost = lost_rank_message("".join(job.seen), resume_hint)
        if lost:
            print(lost, file=sys.stderr)
    return code


class _Job:
    """mpiexec running, its two output streams pumped by threads through the relay."""

    def __init__(self, cmd: list[str], env: dict, debug: bool, via: str | None):
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **group
        )
        self.via = via
        self.relay = StdoutRelay(sys.stdout, want_bar())
        started = lambda: "started" in self.relay.states  # noqa: E731
        self.errors = StderrFilter(sys.stderr, debug, write=self.say, via=via, started=started)
        self.stdout = NoStartBox(self.relay.feed, self._no_start, debug, via=via, started=started)
        self.seen: collections.deque[str] = collections.deque(maxlen=200)  # stderr's end, for lost_rank_message
        self.done = threading.Event()
        self.interrupted = 0  # the signal that ended the job as Ctrl-C does (SIGINT, SIGTERM)
        self.stalled: list[str] = []
        self.pumps = [
            threading.Thread(target=self._pump, args=(self.proc.stderr, self._feed_stderr, self.errors), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout.feed, self.stdout), daemon=True),
        ]
        for pump in self.pumps:
            pump.start()

    def say(self, text: str) -> None:
        self.relay.write_other(sys.stderr, text)

    def _no_start(self, text: str) -> None:
        self.errors.explained = True  # Open MPI's boxes on stderr only repeat it
        self.say(text)

    def _feed_stderr(self, line: str) -> None:
        self.seen.append(line)
        self.errors.feed(line)

    @staticmethod
    def _pump(stream, feed, sink) -> None:
        for raw in stream:
            feed(raw.decode(errors="replace").replace("\x00", ""))  # Open MPI pads some reports with NULs
        sink.close()

    def watch_start(self, deadline: float, hosts: list[str], here: set[str]) -> None:
        """Stop a job that has not started, or whose ranks have not reached each other, by
        `deadline` seconds, with one line (a network that drops packets silently would
        otherwise keep it waiting forever: nothing fails, nothing is printed)."""
        if deadline <= 0:
            return

        def watch():
            if self.done.wait(deadline) or "contact" in self.relay.states:
                return
            stage = "contact" if "started" in self.relay.states else "start"
            self.stalled.append(stage)
            self.errors.explained = True  # Open MPI's reports of the stop say nothing new
            named = [h for h in hosts if h not in here] if stage == "start" else hosts
            self.say(stalled_message(stage, deadline, named[:8], self.via))
            self._stop()

        threading.Thread(target=watch, daemon=True, name="mpitrain-start-deadline").start()

    def _stop(self) -> None:
        children = _descendants(self.proc.pid)  # its ssh (or agent) processes have groups of their own
        self.proc.send_signal(signal.SIGTERM)
        if not self.done.wait(5):
            for pid in [self.proc.pid, *children]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def wait(self, stoppable: bool) -> int:
        """mpiexec's exit code, passing on our signals meanwhile; then the rest of its output."""
        forwarded = self._forward_signals(stoppable)
        try:
            code = self._wait_interruptible()
        finally:
            self.done.set()
            for sig, old in forwarded.items():
                signal.signal(sig, old)
        # A stopped job's remote agents may still hold the pipes open: we wait a little, not for them.
        for pump in self.pumps:
            pump.join(timeout=10)
        self.relay.clear()
        return code

    def _wait_interruptible(self) -> int:
        while True:
            try:
                return self.proc.wait()
            except KeyboardInterrupt:
                self.interrupt(signal.SIGINT)

    def interrupt(self, sig: int) -> None:
        """End the job as Ctrl-C does: pass SIGINT on to mpiexec once (its ranks stop), kill
        the job if it has not ended `STOP_GRACE` seconds later, or at once on a second signal."""
        if self.interrupted:
            self._kill()  # a second Ctrl-C: no more waiting
            return
        self.interrupted = sig
        self.errors.explained = True  # Open MPI's report of the stop says nothing new
        self.proc.send_signal(signal.SIGINT)

        def deadline():
            if not self.done.wait(STOP_GRACE):
                self._kill()

        threading.Thread(target=deadline, daemon=True, name="mpitrain-stop-grace").start()

    def _kill(self) -> None:
        """SIGKILL mpiexec and everything it started (the ranks: killing mpiexec alone would
        leave them running, and rank 0 writing its lock file after we removed it)."""
        for pid in [*_descendants(self.proc.pid), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def _forward_signals(self, stoppable: bool) -> dict:
        """A stop request for us (SIGTERM or SIGUSR1: Slurm's time limit, a preemption, its
        --signal) is one for the ranks. With `stoppable` it reaches them as SIGUSR1, which
        Open MPI's mpiexec forwards to every rank (training ranks checkpoint at their next
        step boundary and exit with 0); a SIGTERM to mpiexec would make it kill them. A
        closed terminal (SIGHUP) still ends the job. Returns the handlers to put back."""

        def stop_request(sig, _frame):
            if self.interrupted or (sig == signal.SIGTERM and self.relay.where is None):
                self.interrupt(sig)  # nothing trained yet, nothing to save: as Ctrl-C
            else:
                self.proc.send_signal(signal.SIGUSR1 if stoppable else sig)

        def ctrl_c(_sig, _frame):  # also when we were started with SIGINT ignored
            raise KeyboardInterrupt

        return {
            signal.SIGINT: signal.signal(signal.SIGINT, ctrl_c),
            signal.SIGTERM: signal.signal(signal.SIGTERM, stop_request),
            signal.SIGUSR1: signal.signal(signal.SIGUSR1, stop_request),
            signal.SIGHUP: signal.signal(signal.SIGHUP, lambda s, _f: self.proc.send_signal(s)),
        }


def _descendants(pid: int) -> list[int]:
    """The processes started by `pid`, and theirs (Linux /proc; [] elsewhere)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except (OSError, ValueError):
            kids = []
        found += kids
        todo += kids
    return found
