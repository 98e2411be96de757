"""The run folder's lock: one training writes a run folder at a time.

`acquire(run_dir)` creates `RUNDIR/.lock` and takes an exclusive `flock` on it, held on an
open file descriptor until `release` (or until the process ends: the kernel drops a flock
with its holder, whatever killed it). The file names its holder, one JSON line with the
host, PID and start time, so a second job can say who has the folder. The holder is rank 0
of the job (it writes the folder); `mpitrain train -n N` only checks the folder before it
starts mpiexec (`acquire` + `release`), and rank 0 takes the lock again.

A lock file without a live flock was left by a job that was killed (SIGKILL, a lost node):

* written on this host by a process that is no longer running: taken over, with a note;
* written on another host: refused, naming host and PID and how to remove the file. A flock
  on a network file system may be seen only on the host that took it (NFS mounted with
  `nolock`, Lustre's `localflock`), so from here we cannot tell whether that job still runs.

Where `flock` is not supported at all, the lock is the exclusive creation of the file
(`O_CREAT | O_EXCL`) with the same holder checks, and a killed job's file is judged by them.
Locks are per process and per folder: taking one this process already holds returns it.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from mpitrain.errors import UserError
from mpitrain.runfiles import LOCK

JOB_ENV = "MPITRAIN_JOB"  # set by `mpitrain train -n N` for its ranks: which launch a lock belongs to
_held: dict[Path, RunLock] = {}


class RunLock:
    def __init__(self, run_dir: Path, fd: int, created: list[Path]):
        self.run_dir, self.created = run_dir, created
        self.fd: int | None = fd  # None once released
        self.path = run_dir / LOCK
        self._ino = os.fstat(fd).st_ino

    def release(self, remove_created: bool = True) -> None:
        """Remove the lock file (if it is still ours) and let go; then take away the folders
        `acquire` was told this process created, if they are still empty."""
        if self.fd is None:
            return
        try:
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)  # before unlocking: a waiting job then re-checks the path
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        _held.pop(_key(self.run_dir), None)
        if remove_created:
            from mpitrain.outdir import remove_empty

            remove_empty(self.created)


def _key(run_dir: Path) -> Path:
    return Path(os.path.abspath(run_dir))


def _start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, ticks: int | None) -> bool:
    """Is `pid` running on this host and the same process that wrote the lock (not a reuse)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return False
    try:  # a zombie (killed, not yet reaped by its parent) holds nothing any more
        if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
    except (OSError, IndexError):
        pass
    now = _start_ticks(pid)
    return ticks is None or now is None or now == ticks


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "start_ticks": _start_ticks(os.getpid()),
        "command": "mpitrain train",
        "job": os.environ.get(JOB_ENV),
    }


def _holder(text: str) -> dict | None:
    try:
        doc = json.loads(text)
        return doc if isinstance(doc, dict) and isinstance(doc.get("pid"), int) else None
    except ValueError:
        return None


def _who(holder: dict | None) -> str:
    if holder is None:
        return "a process that did not say which"
    return f"process {holder['pid']} on host {holder.get('host', '?')} (since {holder.get('started', '?')})"


def _busy(run_dir: Path, holder: dict | None) -> UserError:
    return UserError(
        f"run folder {run_dir} is in use by another training: {_who(holder)}; "
        "wait for it to end or choose another --out"
    )


def _judge(run_dir: Path, holder: dict | None, note) -> None:
    """A lock file nobody holds a flock on: take it over (with a note) or refuse."""
    if holder is None:
        return  # empty or torn: its writer died before writing it out
    if holder.get("host") != socket.gethostname():
        raise UserError(
            f"run folder {run_dir} is locked by {_who(holder)}, which cannot be checked from "
            f"this host; if no training runs there any more, remove {run_dir / LOCK}"
        )
    if holder["pid"] == os.getpid():
        return
    if _alive(holder["pid"], holder.get("start_ticks")):
        raise _busy(run_dir, holder)
    note(f"note: taking over the lock of {run_dir} left by {_who(holder)}, which is no longer running")


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace")


def _write(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(_me()) + "\n").encode())
    try:
        os.fsync(fd)
    except OSError:
        pass


def _no_flock(e: OSError) -> bool:
    return e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


GRACE_SECONDS = 3.0  # a job killed a moment ago (its launcher has returned) may still be exiting


def _flock_soon(fd: int) -> None:
    """flock, waiting up to GRACE_SECONDS for a holder that is going away; BlockingIOError if
    it is still held then (a live training: refused, never waited for longer)."""
    import fcntl

    deadline = time.monotonic() + GRACE_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def acquire(run_dir: Path, created: list[Path] | None = None, note=None) -> RunLock:
    """Lock `run_dir` (an existing folder) for this process; UserError if another job has it.

    `created`: the folders this process made for the run (`outdir.make_dirs`), taken away by
    `release` while still empty. `note(text)`: where to say that a stale lock was taken over.
    """

    note = note or (lambda text: print(text, file=sys.stderr))
    run_dir = Path(run_dir)
    if _key(run_dir) in _held:
        return _held[_key(run_dir)]
    path = run_dir / LOCK
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise UserError(f"--out {run_dir}: cannot create {LOCK}: {e.strerror or e}") from None
        try:
            _flock_soon(fd)
        except BlockingIOError:
            holder = _holder(_read(fd))
            os.close(fd)
            raise _busy(run_dir, holder) from None
        except OSError as e:
            os.close(fd)
            if _no_flock(e):
                return _acquire_exclusive(run_dir, created or [], note)
            raise UserError(f"--out {run_dir}: cannot lock {LOCK}: {e.strerror or e}") from None
        try:  # the holder we waited for may have removed the file: lock the one at the path
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        try:
            _judge(run_dir, _holder(_read(fd)), note)
            _write(fd)
        except BaseException:
            os.close(fd)
            raise
        lock = _held[_key(run_dir)] = RunLock(run_dir, fd, list(created or []))
        return lock
    raise _busy(run_dir, None)


def _acquire_exclusive(run_dir: Path, created: list[Path], note) -> RunLock:
    """Without flock: whoever creates the lock file has the folder."""
    path = run_dir / LOCK
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        except FileExistsError:
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                continue
            holder = _holder(text)
            if holder is None:
                raise _busy(run_dir, None) from None  # perhaps being written right now
            _judge(run_dir, holder, note)
            path.unlink(missing_ok=True)
            continue
        except OSError as e:
            raise UserError(f"--out {run_dir}: cannot create {LOCK}: {e.strerror or e}") from None
        _write(fd)
        lock = _held[_key(run_dir)] = RunLock(run_dir, fd, created)
        return lock
    raise _busy(run_dir, None)


def clear_job(run_dir: Path, job: str, wait: float = 0.0) -> None:
    """After a `-n N` job has ended: remove the lock file its rank 0 left if it was killed
    before letting go (Ctrl-C and lost ranks end the ranks with a signal). `wait`: seconds
    to wait for a rank 0 of that job that still holds it (mpiexec may return while its
    daemons are still ending the ranks: on a loaded machine rank 0 outlives it briefly)."""
    import time

    deadline = time.monotonic() + wait
    while _clear_once(run_dir, job) and time.monotonic() < deadline:
        time.sleep(0.1)


def _clear_once(run_dir: Path, job: str) -> bool:
    """One try of `clear_job`; True when the job's rank 0 still holds the lock."""
    import fcntl

    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        holder = _holder(_read(fd))
        if holder is None or holder.get("job") != job:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # held after all
        except OSError:
            pass  # no flock here: the job has ended, so nobody holds it
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)
    return False


def release_all() -> None:
    """Release every lock this process holds (end of `mpitrain train`, whatever the outcome)."""
    for lock in list(_held.values()):
        lock.release()
