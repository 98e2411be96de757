"""The launcher's decisions about hosts and networks, in-process: --iface (checked, passed to
both of Open MPI's TCP layers, kept in the resume hint), the warning about several networks,
mpi_yield_when_idle where a node has more ranks than cores, and the one-line reports of hosts
that cannot reach each other."""

import ipaddress

import pytest

from mpitrain.cli import build_parser
from mpitrain.errors import UserError
from mpitrain.launcher.commands import rank_options
from mpitrain.launcher.elastic import launch_options
from mpitrain.launcher.hosts import (
    check_iface,
    local_networks,
    network_of,
    networks_said,
    ranks_here,
    read_hostfile,
    several_networks_warning,
)
from mpitrain.launcher.mpiexec import mpiexec_command
from mpitrain.launcher.reports import NoStartBox, StderrFilter, no_start_message
from mpitrain.launcher.supervise import start_timeout, supervise
from mpitrain.parallel import comm

NETS = {
    "lo": ipaddress.IPv4Interface("127.0.0.1/8"),
    "eth0": ipaddress.IPv4Interface("192.168.1.5/24"),
    "ib0": ipaddress.IPv4Interface("10.10.0.5/16"),
}
PROGRAM = ["python", "-m", "mpitrain", "train"]


@pytest.fixture
def fake_mpi(monkeypatch):
    """An Open MPI mpiexec on a 4-core host, not root."""
    monkeypatch.delenv("OMPI_MCA_mpi_yield_when_idle", raising=False)
    state = {"cores": 4}
    monkeypatch.setattr("mpitrain.launcher.mpiexec.is_open_mpi", lambda mpiexec: True)
    monkeypatch.setattr("mpitrain.launcher.mpiexec.available_cores", lambda: state["cores"])
    monkeypatch.setattr("mpitrain.launcher.hosts.available_cores", lambda: state["cores"])
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setattr(
        "mpitrain.launcher.hosts.local_names", lambda networks=None: {"head", "localhost", "192.168.1.5"}
    )
    monkeypatch.setattr(
        "mpitrain.launcher.supervise.local_names", lambda networks=None: {"head", "localhost", "192.168.1.5"}
    )
    return state


def _cmd(n, **kw):
    return mpiexec_command(n, PROGRAM, mpiexec="/opt/mpi/bin/mpiexec", **kw)[0]


def _pairs(cmd):
    return [tuple(cmd[i : i + 3]) for i in range(len(cmd) - 2)]


def test_iface_sets_the_tcp_interfaces_of_mpi_and_of_the_runtime(fake_mpi):
    cmd = _cmd(4, iface="ib0")
    assert ("--mca", "btl_tcp_if_include", "ib0") in _pairs(cmd)
    assert ("--prtemca", "oob_tcp_if_include", "ib0") in _pairs(cmd)
    assert cmd.index("--prtemca") < cmd.index("python")  # options of mpiexec, not of the program
    assert "btl_tcp_if_include" not in _cmd(4) and "oob_tcp_if_include" not in _cmd(4)


@pytest.mark.parametrize(
    "value, kept", [("ib0", "ib0"), ("10.10.0.0/16", "10.10.0.0/16"), ("eth0, 10.10.3.0/16", "eth0,10.10.3.0/16")]
)
def test_iface_takes_names_and_networks_of_this_host(value, kept):
    assert check_iface(value, NETS) == kept


@pytest.mark.parametrize(
    "value, words",
    [
        ("eth7", ["eth7", "no such interface", "eth0 (192.168.1.5/24)", "ib0 (10.10.0.5/16)"]),
        ("172.16.0.0/12", ["172.16.0.0/12", "no interface of this host"]),
        ("10.0.0.0/33", ["not a network in CIDR"]),
        ("eth0;rm", ["neither an interface name nor a network"]),
        ("eth0,", ["separated by commas"]),
    ],
)
def test_a_wrong_iface_is_one_line_naming_what_this_host_has(value, words):
    with pytest.raises(UserError) as e:
        check_iface(value, NETS)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert "lo (" not in str(e.value)  # loopback does not connect hosts: never offered


def test_iface_is_for_the_launcher_and_stays_in_the_resume_hint(tmp_path):
    argv = ["train", "-n", "4", "--hostfile", "hosts", "--epochs", "1", "--iface=eth0"]  # (given twice: refused)
    options = rank_options(build_parser().parse_args(argv))
    assert (options["iface"], options["hostfile"], options["np"], options["epochs"]) == (None, None, None, 1)
    hosts = tmp_path / "hosts"
    hosts.write_text("a\nb\n")
    args = build_parser().parse_args(
        ["train", "-n", "4", "--hostfile", str(hosts), "--iface", "ib0", "--out", str(tmp_path / "r")]
    )
    _, hint, _ = launch_options(args, tmp_path / "r", elastic=False)
    assert hint == f"mpitrain train -n 4 --hostfile {hosts} --iface ib0 --resume --out {tmp_path / 'r'}"


def test_iface_without_n_is_refused_in_one_line(capsys):
    from mpitrain.cli import main

    assert main(["train", "--iface", "eth0", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mpitrain: error: --iface needs -n N")
    assert main(["predict", "--model", "x", "--iface", "eth0", "y.png"]) == 2
    assert "predict runs in one process: drop --iface" in capsys.readouterr().err


def test_several_networks_are_warned_about_only_when_the_job_spans_hosts():
    here = {"head", "localhost", "192.168.1.5"}
    two_nets = {k: NETS[k] for k in ("lo", "eth0", "ib0")}
    one_net = {k: NETS[k] for k in ("lo", "eth0")}
    spans = [("head", 2), ("node2", 2)]
    w = several_networks_warning(spans, here, two_nets)
    assert w.startswith("mpitrain: warning: the job spans hosts (node2 and this one)")
    assert "eth0 (192.168.1.5/24), ib0 (10.10.0.5/16)" in w and "--iface" in w and "lo" not in w
    assert several_networks_warning(spans, here, one_net) is None  # one network: no choice
    assert several_networks_warning([("head", 4)], here, two_nets) is None  # one host: no network used
    assert several_networks_warning(None, here, two_nets) is None  # no hostfile: this host


def test_ranks_on_this_host_follow_open_mpis_mapping_by_slot():
    here = {"head"}
    assert ranks_here(6, None, here, cores=2) == 6  # no hostfile: all here
    assert ranks_here(6, [("head", 2), ("n2", 4)], here, cores=2) == 2
    assert ranks_here(6, [("n2", 4), ("head", 4)], here, cores=2) == 2  # filled in hostfile order
    assert ranks_here(4, [("n2", 4), ("head", 4)], here, cores=2) == 0
    assert ranks_here(9, [("head", 2), ("n2", 2)], here, cores=2) == 5  # more than the slots: again
    assert ranks_here(3, [("head", None), ("n2", None)], here, cores=2) == 2  # no slots=: our cores


def test_the_launcher_yields_when_its_host_has_more_ranks_than_cores(fake_mpi, tmp_path):
    yield_flag = ("--mca", "mpi_yield_when_idle", "1")
    fake_mpi["cores"] = 2
    assert yield_flag not in _pairs(_cmd(2))
    assert yield_flag in _pairs(_cmd(3))
    hosts = tmp_path / "hosts"
    hosts.write_text("# two nodes\nhead slots=4\nnode2 slots=4  # the other\n")
    assert read_hostfile(str(hosts)) == [("head", 4), ("node2", 4)]
    assert yield_flag in _pairs(_cmd(8, hostfile=str(hosts)))  # 4 ranks here on 2 cores
    hosts.write_text("head slots=2\nnode2 slots=6\n")
    assert yield_flag not in _pairs(_cmd(8, hostfile=str(hosts)))  # 2 here; node2 decides for itself
    fake_mpi["cores"] = 8
    assert yield_flag not in _pairs(_cmd(8))


def test_a_rank_yields_when_its_node_has_more_ranks_than_cores(monkeypatch):
    import mpitrain.runtime as runtime

    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    for local, want in (("2", None), ("3", "1"), (None, None)):
        env = {} if local is None else {"OMPI_COMM_WORLD_LOCAL_SIZE": local}
        comm._yield_if_oversubscribed(env)
        assert env.get("OMPI_MCA_mpi_yield_when_idle") == want, local
    env = {"OMPI_COMM_WORLD_LOCAL_SIZE": "5", "OMPI_MCA_mpi_yield_when_idle": "0"}
    comm._yield_if_oversubscribed(env)
    assert env["OMPI_MCA_mpi_yield_when_idle"] == "0"  # the user's choice is kept


NO_CONNECT_BOX = [
    "-" * 74 + "\n",
    "WARNING: Open MPI failed to TCP connect to a peer MPI process.  This\n",
    "should not happen.\n",
    "\n",
    "Your Open MPI job may now hang or fail.\n",
    "\n",
    "  Local host: node1\n",
    "  PID:        22127\n",
    "  Message:    connect() to 10.10.0.7:1025 failed\n",
    "  Error:      No route to host (113)\n",
    "-" * 74 + "\n",
]
AFTER = [
    "[node1:29398] plm:ssh: Warning: setpgid(29402,29402) failed in parent with errno=Permission denied(13)\n",
    " [node1:00000] *** An error occurred in Socket closed\n",
    "\x00[node1:00000] *** reported by process [2728329217,1]\n".replace("\x00", ""),
    "-" * 74 + "\n",
    'prterun has exited due to process rank 1 calling "abort".\n',
    "-" * 74 + "\n",
    " \n",
]


def test_hosts_that_cannot_reach_each_other_are_one_line_naming_host_and_interface(monkeypatch):
    import io

    monkeypatch.setattr("mpitrain.launcher.hosts.local_networks", lambda: NETS)
    monkeypatch.setattr("mpitrain.launcher.supervise.local_networks", lambda: NETS)
    out = io.StringIO()
    f = StderrFilter(out)
    for line in AFTER[:1] + NO_CONNECT_BOX + AFTER[1:]:  # the setpgid race may come before the box
        f.feed(line)
    f.close()
    assert out.getvalue().count("\n") == 1, out.getvalue()
    assert out.getvalue() == f.no_connect
    assert out.getvalue().startswith(
        "mpitrain: error: host node1 could not connect to a rank at 10.10.0.7 over "
        "interface ib0 (10.10.0.0/16) (No route to host)"
    )
    assert "--iface" in out.getvalue()
    debug = io.StringIO()
    f = StderrFilter(debug, debug=True)
    for line in NO_CONNECT_BOX:
        f.feed(line)
    assert debug.getvalue() == "".join(NO_CONNECT_BOX)  # --debug: Open MPI's own report


def test_a_host_that_did_not_connect_back_is_named_with_the_network():
    msg = no_start_message("node7", "interface ib0 (--iface)")
    assert msg.startswith("mpitrain: error: mpiexec could not start the job on host node7: check the --hostfile")
    assert "reaches this host over interface ib0 (--iface)" in msg
    assert networks_said(NETS) == "one of its interfaces eth0 (192.168.1.5/24), ib0 (10.10.0.5/16)"
    assert network_of("192.168.1.77", NETS) == "interface eth0 (192.168.1.0/24)"
    assert network_of("8.8.8.8", NETS) == "the network of 8.8.8.8"


def test_this_hosts_networks_are_read(monkeypatch):
    nets = local_networks()
    assert nets.get("lo") == ipaddress.IPv4Interface("127.0.0.1/8")


def _fake_mpiexec(tmp_path, states, then="sleep 30", code=0):
    """An mpiexec that prints rank 0's start markers `states`, then runs `then`."""
    script = tmp_path / "mpiexec"
    lines = "".join(f"printf '\\033]mpitrain-state;{s}\\007\\n'\n" for s in states)
    script.write_text(f'#!/bin/sh\n[ "$1" = "--version" ] && exit 0\n{lines}{then}\nexit {code}\n')
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize(
    "states, words",
    [
        ([], ["the job did not start within 1 s", "node2 did not connect back", "interface ib0 (--iface)"]),
        (
            ["started"],
            [
                "the ranks on head, node2 did not reach each other within 1 s over interface ib0 (--iface)",
                "choose the one that connects them with --iface",
            ],
        ),
    ],
)
def test_a_job_that_does_not_start_or_connect_is_stopped_in_one_line(tmp_path, monkeypatch, capsys, states, words):
    monkeypatch.setenv("MPITRAIN_MPIEXEC", _fake_mpiexec(tmp_path, states, then="exec sleep 30"))
    monkeypatch.setenv("MPITRAIN_START_TIMEOUT", "1")
    monkeypatch.setattr("mpitrain.launcher.hosts.local_networks", lambda: NETS)
    monkeypatch.setattr("mpitrain.launcher.supervise.local_networks", lambda: NETS)
    monkeypatch.setattr("mpitrain.launcher.hosts.local_names", lambda networks=None: {"head", "localhost"})
    monkeypatch.setattr("mpitrain.launcher.supervise.local_names", lambda networks=None: {"head", "localhost"})
    hosts = tmp_path / "hosts"
    hosts.write_text("head slots=1\nnode2 slots=1\n")
    code = supervise(2, ["train"], hostfile=str(hosts), iface="ib0", contact=True)
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, out.err
    for w in words:
        assert w in lines[0], lines[0]
    assert "mpitrain-state" not in out.out  # the markers are never shown


def test_a_job_whose_ranks_met_is_not_stopped_by_the_deadline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MPITRAIN_MPIEXEC", _fake_mpiexec(tmp_path, ["started", "contact"], then="sleep 2; echo done"))
    monkeypatch.setenv("MPITRAIN_START_TIMEOUT", "1")
    assert supervise(2, ["train"], contact=True) == 0
    out = capsys.readouterr()
    assert out.out == "done\n" and out.err == ""
    monkeypatch.setenv("MPITRAIN_START_TIMEOUT", "soon")
    with pytest.raises(UserError):
        start_timeout()


LOST_DAEMON_BOX = [
    "-" * 74 + "\n",
    "PRTE has lost communication with a remote daemon.\n",
    "\n",
    "  HNP daemon   : [prterun-node1-12783@0,0] on node node1\n",
    "  Remote daemon: [prterun-node1-12783@0,1] on node node2\n",
    "\n",
    "This is usually due to either a failure of the TCP network\n",
    "therefore will terminate the job.\n",
    "-" * 74 + "\n",
]


# After the start, a daemon whose ssh (or agent) ended is reported like one that never
# started: which box comes depends on what died first.
NO_DAEMON_BOX = [
    "-" * 60 + "\n",
    "A daemon failed to report back after being spawned. This could\n",
    "  Local host:    node1\n",
    "  Remote host:   node2\n",
    "  Daemon exit status: 255\n",
    "-" * 60 + "\n",
]


@pytest.mark.parametrize("lost_box", [LOST_DAEMON_BOX, NO_DAEMON_BOX], ids=["lost-daemon", "daemon-ended"])
def test_a_lost_host_is_named_and_never_a_success(tmp_path, monkeypatch, capsys, lost_box):
    # Measured on fake hosts: a lost host ends the whole job, and mpiexec exits with 0.
    # Without --elastic the launcher names the host, says how to go on and fails.
    script = tmp_path / "mpiexec"
    box = "".join(lost_box).replace("\n", "\\n")
    script.write_text(
        '#!/bin/sh\n[ "$1" = "--version" ] && exit 0\n'
        "printf '\\033]mpitrain-state;started\\007\\n\\033]mpitrain-state;contact\\007\\n'\n"
        f"printf 'epoch 1/40\\n'; printf '%b' '{box}' >&2; exit 0\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("MPITRAIN_MPIEXEC", str(script))
    code = supervise(3, ["train"], resume_hint="mpitrain train -n 3 --resume --out r")
    out = capsys.readouterr()
    assert code == 1 and out.out == "epoch 1/40\n"
    assert out.err == (
        "mpitrain: error: host node2 was lost (Open MPI's daemon there stopped answering) and "
        "Open MPI stopped the whole job (with --elastic and a --hostfile it goes on without the host); "
        "continue it with: mpitrain train -n 3 --resume --out r\n"
    )
    shown = []
    f = NoStartBox(shown.append, shown.append, started=lambda: True)  # the same box on stdout
    for line in lost_box:
        f.feed(line)
    assert f.lost == "node2" and shown == []
