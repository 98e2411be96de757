"""An --elastic job that lost a host (launcher/hostloss.py): what is left, when it cannot go
on, and the launcher starting mpiexec again on the remaining hosts (a fake mpiexec)."""

import json
import re

import numpy as np
import pytest
from test_launch_network import LOST_DAEMON_BOX

from mpitrain.cli import main
from mpitrain.engine import checkpoint
from mpitrain.launcher import hostloss


def _run(tmp_path, strategy="allreduce", epoch=1, step=0, status="running", ranks=4):
    run = tmp_path / "run"
    checkpoint.save(
        run,
        checkpoint.Checkpoint(
            epoch=epoch,
            step=step,
            ranks=ranks,
            strategy=strategy,
            states=[[np.zeros(4, np.float32)]],
            shared=True,
            status=status,
            config={"elastic": True, "epochs": 5, "strategy": strategy},
        ),
    )
    return run


def _hostfile(tmp_path, text):
    path = tmp_path / "hosts"
    path.write_text(text)
    return str(path)


def test_the_lost_hosts_ranks_and_the_hosts_left(tmp_path):
    run = _run(tmp_path)
    hosts = _hostfile(tmp_path, "node1 slots=2\nnode2 slots=1  # small\nnode3 slots=2\n")
    plan = hostloss.plan(run, 5, hosts, "node2", here={"node1"})
    assert (plan.ranks, plan.lost_ranks, plan.position) == (4, 1, "end of epoch 1")
    assert plan.hostfile == run / "hostfile"
    lines = [line for line in plan.hostfile.read_text().splitlines() if not line.startswith("#")]
    assert lines == ["node1 slots=2", "node3 slots=2"]
    # Open MPI may report the host by its full name, the hostfile by its short one.
    assert hostloss.plan(run, 5, hosts, "node3.cluster.example", here={"node1"}).ranks == 3
    # More ranks than slots: Open MPI fills the slots again from the first host.
    assert hostloss.plan(run, 9, hosts, "node3", here={"node1"}).lost_ranks == 3  # 2 + 1
    assert "end of epoch 1" in hostloss.message("node2", plan)


def test_a_hostfile_of_full_names_matches_the_short_names_open_mpi_reports(tmp_path):
    # The other way round from the test above: the hostfile says node2.cluster.example,
    # Open MPI (and the launcher's own host) say node2. No name resolves (no DNS asked).
    run = _run(tmp_path)
    hosts = _hostfile(tmp_path, "node1.cluster.example slots=1\nnode2.cluster.example slots=2\n")
    plan = hostloss.plan(run, 3, hosts, "node2", here={"node1"})
    assert (plan.ranks, plan.lost_ranks) == (1, 2)
    lines = [line for line in plan.hostfile.read_text().splitlines() if not line.startswith("#")]
    assert lines == ["node1.cluster.example slots=1"]
    with pytest.raises(hostloss.CannotHeal, match="launcher's own host"):
        hostloss.plan(run, 3, hosts, "node1", here={"node1"})
    assert hostloss._matching("node2", ["node20.cluster.example", "node2.other"]) == ["node2.other"]


def test_the_ranks_own_report_of_their_hosts_wins_over_the_slots(tmp_path):
    # Without slots= Open MPI gives a remote host as many slots as it has cores, which the
    # launcher cannot know: the ranks' hosts, reported at contact, say how many were lost.
    run = _run(tmp_path)
    hosts = _hostfile(tmp_path, "node1\nnode2\n")
    placed = ["node1"] * 4 + ["node2.cluster.example"] * 4
    plan = hostloss.plan(run, 8, hosts, "node2", here={"node1"}, cores=4, placed=placed)
    assert (plan.ranks, plan.lost_ranks) == (4, 4)
    assert hostloss.plan(run, 8, hosts, "node2", here={"node1"}, cores=4).lost_ranks == 1  # guess


@pytest.mark.parametrize(
    "case, why",
    [
        ("launcher", "the launcher's own host"),
        ("no hostfile", "only a job started with --hostfile"),
        ("unknown", "does not name it"),
        ("too few", "only 1 rank(s) are left and --strategy master-worker needs at least 2"),
        ("no checkpoint", "no checkpoint yet"),
        ("finished", "had finished"),
    ],
)
def test_when_the_job_cannot_go_on(tmp_path, case, why):
    run = (
        tmp_path / "empty"
        if case == "no checkpoint"
        else _run(tmp_path, "master-worker", status="finished" if case == "finished" else "running")
    )
    hosts = _hostfile(tmp_path, "node1 slots=1\nnode2 slots=2\n")
    lost = {"launcher": "node1", "unknown": "node9.invalid"}.get(case, "node2")
    n = 3 if case == "too few" else 4
    hosts = None if case == "no hostfile" else hosts
    with pytest.raises(hostloss.CannotHeal, match=re.escape(why)):
        hostloss.plan(run, n, hosts, lost, here={"node1"})
    assert not (run / "hostfile").exists()


def _fake_mpiexec(tmp_path, lost_times=1):
    """Logs its arguments (and the options the ranks would run with, in `calls.options`); its first `lost_times` jobs lose host node2 (Open MPI's box on
    stderr, exit code 0, as measured), the next one finishes."""
    log = tmp_path / "calls"
    box = "".join(LOST_DAEMON_BOX).replace("\n", "\\n")
    script = tmp_path / "mpiexec"
    script.write_text(f"""#!/bin/sh
[ "$1" = "--version" ] && {{ echo "mpiexec (Open MPI) 5.0.11"; exit 0; }}
printf '%s\\n' "$*" >> {log}
printf '%s\\n' "$MPITRAIN_OPTIONS" >> {log}.options
printf '\\033]mpitrain-state;started\\007\\n\\033]mpitrain-state;hosts=node1,node2,node2\\007\\n\\033]mpitrain-state;contact\\007\\n'
if [ $(wc -l < {log}) -le {lost_times} ]; then printf 'epoch 2/5\\n'; printf '%b' '{box}' >&2; exit 0; fi
echo finished
""")
    script.chmod(0o755)
    return script, log


def test_the_launcher_goes_on_without_the_lost_host(tmp_path, monkeypatch, capsys):
    run = _run(tmp_path, ranks=3)
    hosts = _hostfile(tmp_path, "node1 slots=1\nnode2 slots=2\n")
    script, log = _fake_mpiexec(tmp_path)
    monkeypatch.setenv("MPITRAIN_MPIEXEC", str(script))
    monkeypatch.setenv("MPITRAIN_START_TIMEOUT", "20")
    code = main(["train", "-n", "3", "--hostfile", hosts, "--resume", "--out", str(run)])
    out = capsys.readouterr()
    assert code == 0 and out.out == "epoch 2/5\nfinished\n"
    assert out.err == (
        f"mpitrain: host node2 was lost with 2 rank(s) (--elastic): going on with 1 rank(s) on "
        f"the hosts left ({run / 'hostfile'}) from the newest checkpoint (end of epoch 1)\n"
    )
    first, second = log.read_text().splitlines()
    assert "-n 3" in first and f"--hostfile {hosts}" in first and "--with-ft ulfm" in first
    assert "-n 1" in second and f"--hostfile {run / 'hostfile'}" in second and "--with-ft ulfm" in second
    assert second.endswith("-m mpitrain train") and "-x MPITRAIN_OPTIONS" in second
    # The ranks of both jobs resume the run in `run`, with the options the launcher parsed.
    before, after = [json.loads(line) for line in log.with_suffix(".options").read_text().splitlines()]
    assert before["options"]["resume"] is True and before["options"]["config"]["out"] == str(run)
    assert after == before and after["command"] == "train"
    (event,) = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert event["event"] == "host_lost" and event["host"] == "node2"
    assert (event["ranks_before"], event["ranks_after"], event["lost_ranks"]) == (3, 1, 2)


def test_a_second_loss_that_leaves_nothing_ends_in_one_line(tmp_path, monkeypatch, capsys):
    run = _run(tmp_path, ranks=3)
    hosts = _hostfile(tmp_path, "node1 slots=1\nnode2 slots=2\n")
    script, log = _fake_mpiexec(tmp_path, lost_times=2)  # node2 again: not in the new hostfile
    monkeypatch.setenv("MPITRAIN_MPIEXEC", str(script))
    code = main(["train", "-n", "3", "--hostfile", hosts, "--resume", "--out", str(run)])
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and len(err) == 2 and len(log.read_text().splitlines()) == 2
    assert err[1] == (
        f"mpitrain: error: host node2 was lost and the job cannot go on without it: the hostfile "
        f"{run / 'hostfile'} does not name it; continue it with: mpitrain train -n 1 --hostfile "
        f"{run / 'hostfile'} --resume --out {run} --elastic"
    )
