"""What the launcher can know about the machines of a job: the hostfile, where Open MPI
places the ranks, this host's networks and the --iface choice among them."""

from __future__ import annotations

import re
from pathlib import Path

from mpitrain.errors import UserError
from mpitrain.runtime import available_cores


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

    out: dict = {}  # interface name -> ipaddress.IPv4Interface
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


def check_hostfile(hostfile: str) -> None:
    if not Path(hostfile).is_file():
        raise UserError(f"--hostfile: no such file: {hostfile}")
