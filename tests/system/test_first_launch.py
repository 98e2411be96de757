"""`-n N` on a small host (issue 20): too many ranks for the memory are refused in one line
before mpiexec starts and before any folder is made (the figures faked, as
tests/unit/test_launch.py fakes the cores), and a SIGINT or SIGTERM sent to the launcher
process alone, as a supervisor or `timeout` sends it, ends the job as Ctrl-C does: a
message, exit 130 or 143, every rank gone, no lock file and no empty run folder left."""

import os
import signal
import subprocess
import time

import pytest

from mpirun import cli
from mpitrain.launcher.supervise import _descendants

pytestmark = pytest.mark.timeout(300)
TINY = ["--model", "tiny", "--image-size", 16, "--batch-size", 8]


@pytest.fixture
def small_host(monkeypatch):
    """This host with 2 cores and 24 GB available (outside Slurm)."""
    for var in ("SLURM_JOB_ID", "SLURM_JOBID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("mpitrain.launcher.capacity.available_cores", lambda: 2)
    monkeypatch.setattr("mpitrain.launcher.hosts.available_cores", lambda: 2)
    monkeypatch.setattr("mpitrain.launcher.capacity.available_memory", lambda: 24 * 10**9)


# evaluate -n N takes the same road as bench (commands.launch), after its model's check.
@pytest.mark.parametrize("command", ["train", "bench"])
def test_n_past_the_hosts_memory_is_refused_in_one_line(tmp_path, synth_data, cli_error, small_host, command):
    out = tmp_path / "new" / "run"
    args = {
        "train": ["train", "-n", 64, "--data", synth_data, *TINY, "--out", out],
        "bench": ["bench", "-n", 64, "--model", "tiny", "--image-size", 16],
    }[command]
    line = cli_error(
        args, "-n 64: 64 rank(s) on this host need about ", "but it has 24.0 GB available", "--force-ranks"
    )
    assert "use -n " in line
    assert not (tmp_path / "new").exists()


def _start(tmp_path, synth_data, ignore_sigint: bool):
    out = tmp_path / "new" / "run"
    cmd = cli("train", "-n", 2, "--data", synth_data, *TINY, "--epochs", 50, "--out", out)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    # A background job of a script starts with SIGINT ignored: a SIGINT sent to it must count all the same.
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=ignore,
    )
    deadline = time.monotonic() + 120
    while len(ranks := _ranks(proc.pid)) < 2 and time.monotonic() < deadline:  # mpiexec has started both
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    assert len(ranks) == 2
    return proc, ranks, out


def _ranks(pid: int) -> list[int]:
    found = []
    for p in _descendants(pid):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                line = f.read()
            if line.endswith(b"-m\0mpitrain\0train\0") and b"--bind-to" not in line:  # a rank, not mpiexec
                found.append(p)
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.mpi
@pytest.mark.parametrize(("sig", "code", "ignored"), [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)])
def test_a_signal_to_the_launcher_alone_ends_the_start_as_ctrl_c(tmp_path, synth_data, sig, code, ignored):
    proc, ranks, out = _start(tmp_path, synth_data, ignored)
    os.kill(proc.pid, sig)  # the launcher's pid only, not its group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    assert "mpitrain: interrupted" in err and "Traceback" not in err, err[-2000:]
    deadline = time.monotonic() + 10
    while any(map(_alive, ranks)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, ranks))
    assert not (tmp_path / "new").exists(), list(out.rglob("*")) if out.exists() else None
