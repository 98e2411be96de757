"""The host check of `-n N` (launcher/capacity.py): a warning when the ranks far exceed the
cores, a one-line refusal when they would not fit into the available memory; the figures
faked, as test_launch.py fakes the cores."""

import pytest

from mpitrain.errors import UserError
from mpitrain.launcher import capacity
from mpitrain.launcher.capacity import RANK_MEMORY, check_capacity
from mpitrain.runtime import available_memory

GB = 10**9


@pytest.fixture
def host(monkeypatch):
    """2 cores and 24 GB available, outside Slurm; returns the figures to change."""
    for var in ("SLURM_JOB_ID", "SLURM_JOBID"):
        monkeypatch.delenv(var, raising=False)
    state = {"cores": 2, "memory": 24 * GB}
    monkeypatch.setattr(capacity, "available_cores", lambda: state["cores"])
    monkeypatch.setattr("mpitrain.launcher.hosts.available_cores", lambda: state["cores"])
    monkeypatch.setattr(capacity, "available_memory", lambda: state["memory"])
    return state


def test_more_ranks_than_memory_holds_are_refused_with_the_figures(host):
    with pytest.raises(UserError) as e:
        check_capacity(64, None, per_rank=RANK_MEMORY)
    line = str(e.value)
    assert "\n" not in line and line.startswith("-n 64: 64 rank(s) on this host need about ")
    assert "but it has 24.0 GB available" in line and "--force-ranks" in line
    fits = int(line.split("use -n ")[1].split()[0])
    check_capacity(fits, None, per_rank=RANK_MEMORY)  # the count it proposes does fit
    with pytest.raises(UserError):
        check_capacity(fits + 1, None, per_rank=RANK_MEMORY)


def test_force_ranks_or_no_memory_figure_starts_them_anyway(host, capsys):
    check_capacity(64, None, per_rank=RANK_MEMORY, force=True)
    check_capacity(64, None, per_rank=None)  # mpitrain run: a script's memory is unknown
    host["memory"] = None  # not known on this system: nothing to refuse on
    check_capacity(64, None, per_rank=RANK_MEMORY)
    assert capsys.readouterr().err.count("warning: 64 ranks on the 2 core(s)") == 3


def test_the_cores_warning_only_when_the_ranks_far_exceed_them(host, capsys):
    check_capacity(8, None, per_rank=RANK_MEMORY)
    assert capsys.readouterr().err == ""
    check_capacity(9, None, per_rank=RANK_MEMORY)
    err = capsys.readouterr().err
    assert err.startswith("mpitrain: warning: 9 ranks on the 2 core(s) of this host") and err.count("\n") == 1


def test_only_the_ranks_of_this_host_count_and_slurm_decides_in_an_allocation(host, tmp_path, monkeypatch, capsys):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\nnode2 slots=62\n")
    check_capacity(64, str(hosts), per_rank=RANK_MEMORY)  # 2 here: the other host's figures are unknown
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    check_capacity(640, None, per_rank=RANK_MEMORY)  # what Slurm granted is not refused
    assert capsys.readouterr().err == ""


def test_available_memory_is_meminfos_or_the_cgroups_if_less(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\n")
    group = tmp_path / "cgroup"
    group.mkdir()
    (group / "memory.max").write_text("max\n")
    assert available_memory(str(meminfo), str(group)) == 20000000 * 1024
    (group / "memory.max").write_text(f"{8 * GB}\n")
    (group / "memory.current").write_text(f"{3 * GB}\n")
    assert available_memory(str(meminfo), str(group)) == 5 * GB
    assert available_memory(str(tmp_path / "none"), str(tmp_path / "none")) is None
