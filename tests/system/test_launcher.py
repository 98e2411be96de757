"""`mpitrain train -n N` as a user sees it: one line per mistake, a live progress bar on a
terminal, and a Ctrl-C that says where the run stopped and how to continue it."""

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)

TRAIN = ["--model", "seed", "--image-size", 16, "--batch-size", 4, "--threads", 1]


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def _mpitrain(*args) -> list[str]:
    return [sys.executable, "-m", "mpitrain", *map(str, args)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """360 training images of 16x16: 45 steps of 4 per rank on 2 ranks, 90 on one."""
    from mpitrain.data.synth import generate

    return generate(tmp_path_factory.mktemp("launcher") / "data", per_class=200, image_size=16, seed=3)


def _one_line(proc, *words):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "prterun" not in proc.stderr and "----" not in proc.stderr and "MPI_ABORT" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.mpi
def test_a_finished_run_is_refused_in_one_line_under_the_launcher(tiny_run):
    proc = subprocess.run(
        _mpitrain("train", "-n", 2, "--resume", "--out", tiny_run),
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    _one_line(proc, "already finished")


@pytest.mark.mpi
def test_an_unknown_model_is_refused_in_one_line_under_the_launcher(tmp_path, synth_data):
    proc = subprocess.run(
        _mpitrain("train", "-n", 2, "--data", synth_data, "--model", "resnet999", "--out", tmp_path / "run"),
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    _one_line(proc, "resnet999")


@pytest.mark.mpi
def test_debug_shows_open_mpis_report_too(tiny_run):
    proc = subprocess.run(
        _mpitrain("--debug", "train", "-n", 2, "--resume", "--out", tiny_run),
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert proc.returncode == 2 and "already finished" in proc.stderr
    assert "prterun" in proc.stderr


def _read_pty(fd, proc, timeout):
    """Everything written to the terminal, and for each byte offset the time it arrived."""
    out, arrived, deadline = b"", [], time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the other side is closed (EIO on Linux)
                break
            if not chunk:
                break
            out += chunk
            arrived.append((len(out), time.monotonic()))
        elif proc.poll() is not None:
            break
    text = out.decode(errors="replace")
    assert len(text) == len(out)  # ASCII only, so offsets agree

    def when(offset):
        return next(t for end, t in arrived if end > offset)

    return text, when


@pytest.mark.mpi
def test_the_progress_bar_shows_under_the_launcher_on_a_terminal(tmp_path, data):
    main, child = os.openpty()
    proc = subprocess.Popen(
        _mpitrain("train", "-n", 2, "--data", data, *TRAIN, "--epochs", 1, "--out", tmp_path / "run"),
        stdin=child,
        stdout=child,
        stderr=child,
        env=_env(),
        close_fds=True,
    )
    os.close(child)
    try:
        screen, when = _read_pty(main, proc, 300)
    finally:
        os.close(main)
    assert proc.wait(timeout=60) == 0, screen[-3000:]
    summary = screen.index("epoch 1/1 [allreduce x2]")
    bar = re.search(r"\repoch 1/1 \d+/45 \[", screen)
    assert bar and bar.start() < summary, screen[-3000:]
    # Drawn while the epoch ran, not delivered together with its summary line at the end.
    assert when(bar.start()) < when(summary), screen[-3000:]
    assert "mpitrain-progress" not in screen and "\x1b]" not in screen


def _interrupt(cmd, out: Path):
    """Start a training in its own session, Ctrl-C it (the whole process group, as a
    terminal does) after its first checkpoint; returns (CompletedProcess-like, newest)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True
    )
    deadline = time.time() + 240
    while not list((out / "checkpoints").glob("ckpt-*.npz")) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    time.sleep(0.5)  # a few more steps
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    newest = max((out / "checkpoints").glob("ckpt-*.npz"))
    return proc.returncode, stdout, stderr, newest


def _check_report(code, stdout, stderr, newest, resume):
    assert code == 130, (code, stderr[-3000:])
    assert re.search(r"mpitrain: interrupted in epoch \d+/50, step \d+/\d+", stderr), stderr[-3000:]
    assert f"newest checkpoint: {newest}" in stderr, stderr[-3000:]
    assert f"continue with: {resume}" in stderr, stderr[-3000:]
    assert "prterun" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert "\r" not in stdout and "mpitrain-progress" not in stdout  # no bar in a log


@pytest.mark.mpi
def test_ctrl_c_under_the_launcher_says_where_and_how_to_continue(tmp_path, data):
    out = tmp_path / "run"
    code, stdout, stderr, newest = _interrupt(
        _mpitrain("train", "-n", 2, "--data", data, *TRAIN, "--epochs", 50, "--checkpoint-every", 10, "--out", out), out
    )
    _check_report(code, stdout, stderr, newest, f"mpitrain train -n 2 --resume --out {out}")


def test_ctrl_c_in_one_process_says_where_and_how_to_continue(tmp_path, data):
    out = tmp_path / "run"
    code, stdout, stderr, newest = _interrupt(
        _mpitrain("train", "--data", data, *TRAIN, "--epochs", 50, "--checkpoint-every", 10, "--out", out), out
    )
    _check_report(code, stdout, stderr, newest, f"mpitrain train --resume --out {out}")
