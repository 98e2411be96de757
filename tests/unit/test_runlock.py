"""The run folder's lock: held by one process, named in the refusal, stale ones judged by host
and PID, and the folders a failed start created taken away again (never anyone else's)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from mpitrain import outdir, runfiles
from mpitrain.errors import UserError
from mpitrain.train import runfolder, runlock


@pytest.fixture(autouse=True)
def _let_go():
    yield
    runlock.release_all()


def _holder_process(run_dir):
    """Another process that holds the lock of `run_dir` until its stdin closes."""
    code = (
        "import sys; from mpitrain.train import runlock; runlock.acquire(sys.argv[1]); "
        "print('locked', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _write_lock(run_dir, **fields):
    doc = {
        "host": socket.gethostname(),
        "pid": 1,
        "started": "2024-01-01 00:00:00",
        "start_ticks": 1,
        "command": "mpitrain train",
        **fields,
    }
    (run_dir / ".lock").write_text(json.dumps(doc) + "\n")


def test_a_folder_locked_by_another_process_is_refused_naming_it(tmp_path):
    holder = _holder_process(tmp_path)
    try:
        with pytest.raises(
            UserError,
            match=rf"in use by another training: process {holder.pid} on host "
            rf"{socket.gethostname()} \(since ",
        ):
            runlock.acquire(tmp_path)
    finally:
        holder.stdin.close()
        holder.wait(30)
    lock = runlock.acquire(tmp_path)  # free once the holder has ended
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert runlock.acquire(tmp_path) is lock  # this process holds it already
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over_with_a_note(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    _write_lock(tmp_path, pid=int(dead))
    notes = []
    runlock.acquire(tmp_path, note=notes.append)
    assert len(notes) == 1 and f"process {dead} on host" in notes[0] and "no longer running" in notes[0]


def test_a_lock_left_on_another_host_is_refused_with_how_to_remove_it(tmp_path):
    _write_lock(tmp_path, host="node17.example", pid=4242)
    with pytest.raises(UserError) as e:
        runlock.acquire(tmp_path)
    msg = str(e.value)
    assert "process 4242 on host node17.example" in msg and f"remove {tmp_path / '.lock'}" in msg


def test_without_flock_the_lock_file_itself_decides(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    # A live process on this host (our parent, with its real start time) holds it: refused.
    parent = os.getppid()
    _write_lock(tmp_path, pid=parent, start_ticks=runlock._start_ticks(parent))
    with pytest.raises(UserError, match=f"in use by another training: process {parent} "):
        runlock.acquire(tmp_path)
    # The same PID with another start time is a reused PID: the writer is gone.
    _write_lock(tmp_path, pid=parent, start_ticks=-5)
    notes = []
    lock = runlock.acquire(tmp_path, note=notes.append)
    assert notes and json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_prepare_removes_only_the_empty_folders_it_created(tmp_path):
    out = tmp_path / "runs" / "a"
    assert runfolder.prepare(str(out), False) == out and (out / ".lock").exists()
    runlock.release_all()
    assert not (tmp_path / "runs").exists()  # nothing was written: nothing is left
    out.mkdir(parents=True)
    runfolder.prepare(str(out), False)
    runlock.release_all()
    assert out.is_dir()  # it was there before
    new = tmp_path / "runs" / "b"
    runfolder.prepare(str(new), False)
    (new / "model.keras").write_text("x")
    runlock.release_all()
    assert (new / "model.keras").exists() and not (new / ".lock").exists()


def test_check_only_leaves_nothing_and_deletes_nothing(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "history.csv").write_text("keep")
    runfolder.prepare(str(old), True, check_only=True)  # --overwrite deletes only when training starts
    assert (old / "history.csv").read_text() == "keep" and not (old / ".lock").exists()
    runfolder.prepare(str(tmp_path / "new" / "run"), False, check_only=True)
    assert not (tmp_path / "new").exists()


def test_make_dirs_and_remove_empty(tmp_path):
    created = outdir.make_dirs(tmp_path / "a" / "b" / "c", "--out")
    assert created == [tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"]
    (tmp_path / "a" / "keep").write_text("x")
    outdir.remove_empty(created)
    assert (tmp_path / "a").is_dir() and not (tmp_path / "a" / "b").exists()


def test_a_lock_left_by_a_killed_but_unreaped_process_is_taken_over(tmp_path):
    # A job killed a moment ago can leave its rank 0 a zombie (exited, not yet reaped): the
    # PID still exists but holds nothing, so the folder is free (seen as a flaky resume).
    import time

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(200):  # not reaped: we do not wait() yet
            if open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.05)
        (tmp_path / runfiles.LOCK).write_text(
            json.dumps({"host": socket.gethostname(), "pid": child.pid, "start_ticks": runlock._start_ticks(child.pid)})
        )
        notes = []
        lock = runlock.acquire(tmp_path, note=notes.append)
        lock.release()
        assert notes and "no longer running" in notes[0]
    finally:
        child.wait()
