"""The mpiexec command line built by `mpitrain train -n N`, and the lost-rank message."""

from __future__ import annotations

import pytest

from mpitrain.errors import UserError
from mpitrain.launcher.mpiexec import mpiexec_command
from mpitrain.launcher.reports import lost_rank_message

MPIEXEC = "/opt/mpi/bin/mpiexec"  # never run: is_open_mpi is faked
PROGRAM = ["python", "-m", "mpitrain", "train"]
ROOT_VARS = ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM")


@pytest.fixture
def fake_mpi(monkeypatch):
    """An Open MPI mpiexec, 4 cores, not root, none of our variables set beforehand.

    Returns a setter for the core count and the uid."""
    # Outside Slurm (inside an allocation mpiexec takes its slots from Slurm: test_cluster.py).
    for var in ROOT_VARS + (
        "MPITRAIN_CACHE_DIR",
        "MPITRAIN_TTY",
        "TF_CPP_MIN_LOG_LEVEL",
        "SLURM_JOB_ID",
        "SLURM_JOBID",
    ):
        monkeypatch.delenv(var, raising=False)
    state = {"cores": 4, "uid": 1000, "open_mpi": True}
    monkeypatch.setattr("mpitrain.launcher.mpiexec.is_open_mpi", lambda mpiexec: state["open_mpi"])
    # imported by name: patch it where it is looked up
    monkeypatch.setattr("mpitrain.launcher.mpiexec.available_cores", lambda: state["cores"])
    monkeypatch.setattr("mpitrain.launcher.hosts.available_cores", lambda: state["cores"])
    monkeypatch.setattr("os.geteuid", lambda: state["uid"])
    return state


def _cmd(n, **kw):
    return mpiexec_command(n, PROGRAM, mpiexec=MPIEXEC, **kw)


def test_oversubscribe_only_when_more_ranks_than_cores(fake_mpi):
    fake_mpi["cores"] = 4
    for n in (1, 4):
        assert "--oversubscribe" not in _cmd(n)[0], n
    assert "--oversubscribe" in _cmd(5)[0]
    fake_mpi["cores"] = 2
    assert "--oversubscribe" not in _cmd(2)[0]
    assert "--oversubscribe" in _cmd(3)[0]


def test_no_oversubscribe_with_a_hostfile(fake_mpi, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=8\nnode2 slots=8\n")
    fake_mpi["cores"] = 1
    cmd, _ = _cmd(16, hostfile=str(hosts))
    assert "--oversubscribe" not in cmd
    at = cmd.index("--hostfile")
    assert cmd[at + 1] == str(hosts)


def test_command_shape(fake_mpi, monkeypatch):
    monkeypatch.setenv("MPITRAIN_CACHE_DIR", "/somewhere")
    cmd, env = _cmd(3, extra=["--with-ft", "ulfm"])
    assert cmd[:3] == [MPIEXEC, "-n", "3"]
    assert cmd[-len(PROGRAM) :] == PROGRAM
    at = cmd.index("--bind-to")
    assert cmd[at + 1] == "none"
    assert cmd.index("--with-ft") < cmd.index(PROGRAM[0])  # extra options before the program
    # our variables are forwarded by name to ranks on other hosts
    forwarded = {cmd[i + 1] for i, a in enumerate(cmd) if a == "-x"}
    assert forwarded == {"MPITRAIN_TTY", "MPITRAIN_CACHE_DIR", "TF_CPP_MIN_LOG_LEVEL"}
    assert env["MPITRAIN_CACHE_DIR"] == "/somewhere" and env["TF_CPP_MIN_LOG_LEVEL"] == "2"
    assert env["MPITRAIN_TTY"] in ("0", "1")


def test_unset_variables_are_not_forwarded(fake_mpi):
    cmd, env = _cmd(2)
    forwarded = {cmd[i + 1] for i, a in enumerate(cmd) if a == "-x"}
    assert "MPITRAIN_CACHE_DIR" not in forwarded and "MPITRAIN_CACHE_DIR" not in env
    assert {"MPITRAIN_TTY", "TF_CPP_MIN_LOG_LEVEL"} <= forwarded


def test_root_variables_only_as_root(fake_mpi):
    fake_mpi["uid"] = 1000
    _, env = _cmd(2)
    assert not any(v in env for v in ROOT_VARS)
    fake_mpi["uid"] = 0
    _, env = _cmd(2)
    assert all(env[v] == "1" for v in ROOT_VARS)


def test_other_mpi_gets_no_open_mpi_options(fake_mpi, monkeypatch):
    monkeypatch.setenv("MPITRAIN_CACHE_DIR", "/somewhere")
    fake_mpi.update(open_mpi=False, uid=0, cores=1)
    cmd, env = _cmd(4)
    assert cmd == [MPIEXEC, "-n", "4", *PROGRAM]
    assert not any(v in env for v in ROOT_VARS)


def test_missing_hostfile_is_a_user_error(fake_mpi, tmp_path):
    with pytest.raises(UserError, match="--hostfile: no such file"):
        _cmd(2, hostfile=str(tmp_path / "nope"))


# What Open MPI 5.0 (prterun) prints when a rank dies by a signal, verbatim.
OPEN_MPI_LOST = """\
--------------------------------------------------------------------------
prterun noticed that process rank 1 with PID 7273 on node vm exited on
signal 9 (Killed).
--------------------------------------------------------------------------
"""


def test_lost_rank_message_from_open_mpi_text():
    text = "epoch 1/3 ...\nsome other output\n" + OPEN_MPI_LOST
    assert lost_rank_message(text) == ("mpitrain: error: rank 1 on vm was lost (SIGKILL); the whole job was stopped")


def test_lost_rank_message_with_a_resume_hint():
    msg = lost_rank_message(
        OPEN_MPI_LOST.replace("rank 1 ", "rank 12 ")
        .replace("node vm", "node n-7.lan")
        .replace("signal 9 (Killed)", "signal 15 (Terminated)"),
        "mpitrain train --resume --out runs/x -n 4",
    )
    assert msg == (
        "mpitrain: error: rank 12 on n-7.lan was lost (SIGTERM); the whole job was stopped; "
        "continue it with: mpitrain train --resume --out runs/x -n 4"
    )


def test_lost_rank_message_unknown_signal_number():
    msg = lost_rank_message(OPEN_MPI_LOST.replace("signal 9 (Killed)", "signal 99 (?)"))
    assert "rank 1 on vm was lost (signal 99)" in msg


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Traceback (most recent call last):\nValueError: boom\n",
        "prterun detected that one or more processes exited with non-zero status",
    ],
)
def test_lost_rank_message_without_a_match_is_none(text):
    assert lost_rank_message(text) is None
    assert lost_rank_message(text, "mpitrain train --resume") is None
