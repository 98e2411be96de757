"""Fake hosts on one Linux machine: a cluster for multi-host tests and benchmarks.

Each host is a network namespace with its own address on a private bridge, its own
hostname and its own /dev/shm (without a private /dev/shm Open MPI's shared-memory
transport takes ranks of two "hosts" for neighbours and crashes), and a private mount
namespace in which folders can be hidden from it (a data folder only host 1 can read).
Open MPI reaches the hosts through `PRTE_MCA_plm_ssh_agent`, set to a script that runs
the command in the host's namespace instead of ssh.

    with Cluster(2) as c:                              # needs root and `ip netns`
        c.run(1, ["mpitrain", "train", "-n", "2", "--hostfile", c.hostfile(1)], env=c.env())
        c.limit("1gbit")                               # every host's link, both directions

Network: every host has `eth1` on the cluster's bridge (10.231.N.0/24, the bridge has no
address in the root namespace, so nothing outside the cluster is reachable or touched).
`dead_net=True` adds `eth2` (10.232.N.0/24) on every host, up but wired to nothing: the
hosts cannot reach each other over it (a second network that does not connect the hosts);
a connection over it fails in seconds ("No route to host"), or after `silence()` never
answers at all.
Every name starts with `mpt` and carries a tag unique to the process; `close()` removes
everything (also at exit, and pytest fixtures call it on failure).

The hosts share the machine's cores, so the environment of `env()` tells Open MPI to
yield when idle: busy-polling ranks of several fake hosts would otherwise fight for them.
"""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PREFIX = "mpt"


def unavailable() -> str | None:
    """Why fake hosts cannot be made here (None: they can)."""
    if not sys.platform.startswith("linux"):
        return "fake hosts need Linux network namespaces"
    if os.geteuid() != 0:
        return "fake hosts need root (ip netns, mount)"
    for tool in ("ip", "unshare", "mount", "tc"):
        if shutil.which(tool) is None:
            return f"fake hosts need `{tool}`"
    probe = f"{PREFIX}probe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


def _free_net_index(tag_number: int) -> int:
    """A third octet for 10.231.N.0/24 that no address of the root namespace uses."""
    used = _sh("ip", "-4", "-o", "addr", check=False).stdout
    for k in range(256):
        n = (tag_number + k) % 200 + 20
        if f"10.231.{n}." not in used and f"10.232.{n}." not in used:
            return n
    raise RuntimeError("no free 10.231.N.0/24")


class Cluster:
    def __init__(self, hosts: int = 2, dead_net: bool = False):
        self.n = hosts
        self.tag = f"{os.getpid() % 4096:03x}{int(time.time() * 1000) % 4096:03x}"  # 6 hex: names <= 15 chars
        self.net = _free_net_index(int(self.tag, 16))
        self.dead_net = dead_net
        self.names = [f"{PREFIX}{self.tag}h{k}" for k in range(1, hosts + 1)]
        self.bridge = f"{PREFIX}{self.tag}br"
        self.dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{self.tag}-"))
        self.hidden: dict[int, list[str]] = {}
        self._made: list[tuple[str, str]] = []  # ("netns"|"link", name), in creation order
        self._closed = False
        atexit.register(self.close)
        try:
            self._up()
        except BaseException:
            self.close()
            raise

    # ---- addresses and files ----

    def addr(self, host: int, dev: str = "eth1") -> str:
        return f"10.{231 if dev == 'eth1' else 232}.{self.net}.{host + 1}"

    def subnet(self, dev: str = "eth1") -> str:
        return f"10.{231 if dev == 'eth1' else 232}.{self.net}.0/24"

    def name(self, host: int) -> str:
        return self.names[host - 1]

    def hostfile(self, slots: int | list[int] = 1, hosts: list[int] | None = None) -> Path:
        hosts = hosts or list(range(1, self.n + 1))
        slots = slots if isinstance(slots, list) else [slots] * len(hosts)
        path = self.dir / f"hostfile-{'-'.join(map(str, slots))}-{'-'.join(map(str, hosts))}"
        path.write_text("".join(f"{self.name(h)} slots={s}\n" for h, s in zip(hosts, slots)))
        return path

    def hide(self, host: int, *paths) -> None:
        """Host `host` sees these folders empty (a tmpfs over them) from its next command on."""
        if any(len(str(p).split()) != 1 for p in paths):
            raise ValueError(f"hide: paths without white space only: {paths}")
        self.hidden.setdefault(host, []).extend(str(p) for p in paths)
        self._write_scripts()

    def reset(self) -> None:
        """Every host sees every folder again, every link is unlimited, eth2 answers again."""
        self.hidden.clear()
        self._write_scripts()
        self.limit(None)
        if self.dead_net:
            for k in range(1, self.n + 1):
                _sh("ip", "-n", self.name(k), "neigh", "flush", "dev", "eth2", check=False)

    def silence(self) -> None:
        """Make eth2 drop packets without an answer: with the other hosts' link-layer
        addresses fixed, nobody asks for them (an unanswered ARP request is what makes the
        kernel say "No route to host"), so a connection attempt waits for a reply that never
        comes, as behind a firewall that drops."""
        for k in range(1, self.n + 1):
            for j in range(1, self.n + 1):
                if j != k:
                    _sh(
                        "ip",
                        "-n",
                        self.name(k),
                        "neigh",
                        "replace",
                        self.addr(j, "eth2"),
                        "lladdr",
                        f"02:00:00:00:{self.net:02x}:{j:02x}",
                        "dev",
                        "eth2",
                        "nud",
                        "permanent",
                    )

    def env(self, **extra) -> dict:
        """The environment for running mpiexec on a fake host."""
        env = dict(os.environ)
        env.update(
            PRTE_MCA_plm_ssh_agent=str(self.dir / "agent"),
            OMPI_ALLOW_RUN_AS_ROOT="1",
            OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
            OMPI_MCA_mpi_yield_when_idle="1",
            TF_CPP_MIN_LOG_LEVEL="2",
        )
        env.update({k: str(v) for k, v in extra.items()})
        return env

    # ---- running ----

    def command(self, host: int, argv: list[str]) -> list[str]:
        """`argv` as a command that runs on fake host `host`."""
        return [str(self.dir / "onhost"), self.name(host), *map(str, argv)]

    def run(
        self, host: int, argv: list[str], env: dict | None = None, timeout: float = 240, **kwargs
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command(host, argv), env=env or self.env(), capture_output=True, text=True, timeout=timeout, **kwargs
        )

    # ---- links ----

    def limit(self, rate: str | None, latency: str = "50ms") -> None:
        """Limit every host's link to `rate` (e.g. "1gbit", "10gbit") in both directions (a
        token bucket, `tc tbf`: `netem` is not in every kernel); None: unlimited. The bucket
        holds 2 ms of traffic, so that timer granularity does not cap the rate."""
        burst = ""  # the bucket's size, when there is a rate
        if rate:
            units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
            number, unit = next((rate[: -len(u)], f) for u, f in units.items() if rate.endswith(u))
            burst = f"{max(32_000, int(float(number) * unit / 8 * 0.002))}b"
        for k in range(1, self.n + 1):
            for ns, dev in ((None, f"{PREFIX}{self.tag}v{k}"), (self.name(k), "eth1")):
                pre = ["ip", "netns", "exec", ns] if ns else []
                _sh(*pre, "tc", "qdisc", "del", "dev", dev, "root", check=False)
                if rate:
                    _sh(
                        *pre,
                        "tc",
                        "qdisc",
                        "add",
                        "dev",
                        dev,
                        "root",
                        "tbf",
                        "rate",
                        rate,
                        "burst",
                        burst,
                        "latency",
                        latency,
                    )

    def crash(self, host: int) -> None:
        """Host `host` dies: every process in its namespace is killed (SIGKILL)."""
        for pid in _sh("ip", "netns", "pids", self.name(host), check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass

    def cut(self, host: int) -> None:
        """Host `host`'s cable out of the bridge: the others cannot reach it."""
        _sh("ip", "link", "set", f"{PREFIX}{self.tag}v{host}", "down")

    # ---- set-up and tear-down ----

    def _up(self) -> None:
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        _sh("ip", "link", "set", self.bridge, "up")
        for k, ns in enumerate(self.names, 1):
            _sh("ip", "netns", "add", ns)
            self._made.append(("netns", ns))
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            nets = [("eth1", f"{PREFIX}{self.tag}v{k}")] + (
                [("eth2", f"{PREFIX}{self.tag}d{k}")] if self.dead_net else []
            )
            for dev, outside in nets:
                _sh("ip", "link", "add", outside, "type", "veth", "peer", "name", dev, "netns", ns)
                self._made.append(("link", outside))
                if dev == "eth1":
                    _sh("ip", "link", "set", outside, "master", self.bridge)
                _sh("ip", "link", "set", outside, "up")
                _sh("ip", "-n", ns, "addr", "add", f"{self.addr(k, dev)}/24", "dev", dev)
                _sh("ip", "-n", ns, "link", "set", dev, "up")
        (self.dir / "hosts").write_text(
            "127.0.0.1 localhost\n" + "".join(f"{self.addr(k)} {name}\n" for k, name in enumerate(self.names, 1))
        )
        self._write_scripts()

    def _write_scripts(self) -> None:
        # onhost HOST CMD...: CMD in HOST's network namespace, with a private mount namespace
        # (its own /dev/shm, the cluster's /etc/hosts, hidden folders) and its own hostname.
        cases = "".join(
            f"  {self.name(h)}) hide={shlex.quote(' '.join(map(shlex.quote, paths)))} ;;\n"
            for h, paths in self.hidden.items()
        )
        inner = (
            'mount -t tmpfs tmpfs /dev/shm && mount --bind "$HOSTS" /etc/hosts && '
            'for d in $HIDE; do mount -t tmpfs tmpfs "$d"; done && hostname "$HOST" && exec "$@"'
        )
        onhost = f"""#!/bin/sh
# Generated by tests/cluster.py: run a command on fake host $1.
HOST=$1; shift
hide=
case "$HOST" in
{cases}esac
export HOST HOSTS={shlex.quote(str(self.dir / "hosts"))} HIDE="$hide"
exec ip netns exec "$HOST" unshare --mount --uts sh -c {shlex.quote(inner)} sh "$@"
"""
        # PRRTE calls `agent HOST 'command line'` where it would call ssh.
        agent = f"""#!/bin/sh
HOST=$1; shift
exec {shlex.quote(str(self.dir / "onhost"))} "$HOST" sh -c "$*"
"""
        for name, text in (("onhost", onhost), ("agent", agent)):
            path = self.dir / name
            path.write_text(text)
            path.chmod(0o755)

    def close(self) -> None:
        """Remove everything this cluster made (processes in its namespaces are killed first)."""
        if self._closed:
            return
        self._closed = True
        for kind, name in reversed(self._made):
            if kind == "netns":
                pids = _sh("ip", "netns", "pids", name, check=False).stdout.split()
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
                _sh("ip", "netns", "del", name, check=False)
            else:
                _sh("ip", "link", "del", name, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def leftovers(tag: str) -> list[str]:
    """Names of cluster `tag`'s namespaces and links that exist now (for tests of the clean-up)."""
    ns = [line.split()[0] for line in _sh("ip", "netns", "list", check=False).stdout.splitlines() if line.strip()]
    links = [
        line.split(":")[1].strip().split("@")[0] for line in _sh("ip", "-o", "link", check=False).stdout.splitlines()
    ]
    return [n for n in ns + links if n.startswith(PREFIX + tag)]
