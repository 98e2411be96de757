"""Writing files so that a reader never sees half of one: the one atomic writer.

Everything mpitrain leaves on disk (cache entries, checkpoints, the run folder, figures,
prediction CSVs, reports) is written through `atomic_path`: the content goes to a hidden
temporary file in the same folder, is flushed and fsynced, then renamed over the final
name, and the folder is fsynced so the rename itself survives a crash. A kill at any
instant leaves either the old file or the new one, never a torn one; a failed write leaves
no temporary file behind.

`atomic_dir` does the same for a folder written as a whole (`mpitrain export`): it is
filled under a hidden temporary name beside its final one and renamed into place only
when the caller is done with it, so a reader sees a complete folder or none.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

TMP_PREFIX = ".tmp-"  # every temporary file starts so: cleaners can recognise strays


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename is still atomic
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yield a temporary path beside `path`; on success it replaces `path` atomically.

    The temporary name keeps `path`'s suffix (Keras and matplotlib choose the format by it)
    unless `suffix` is given.
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    if suffix is not None:
        tmp = tmp.with_suffix(suffix)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync(path.parent, directory=True)


def write_atomic(path, data: bytes | str, encoding: str = "utf-8", errors: str = "strict") -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode(encoding, errors) if isinstance(data, str) else data)
    return path


def write_json(path, doc) -> Path:
    return write_atomic(path, json.dumps(doc, indent=2, sort_keys=False, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path, replace: bool = False):
    """Yield a new empty hidden folder beside `path`; on success it becomes `path`.

    `path` must not exist, or be an empty folder, or (`replace`) be a folder to replace
    whole: the caller decides whether that is allowed (see `outdir`). The old folder is
    moved aside before the new one is renamed in and deleted only afterwards; if the
    rename fails it is put back. Any exception inside the block removes the temporary
    folder and leaves `path` as it was. The parent folder must exist.
    """
    path = Path(os.path.abspath(path))  # "." and "x/.." have no name to put beside
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process that had our PID
    os.mkdir(tmp)  # not mkdtemp: its mode 0700 would become the final folder's
    try:
        yield tmp
        for folder, _, files in os.walk(tmp):
            for name in files:
                _fsync(Path(folder) / name)
            _fsync(Path(folder), directory=True)
        old = None
        if replace and path.is_dir() and any(path.iterdir()):
            old = path.with_name(f"{tmp.name}-old")
            os.rename(path, old)
        try:
            os.replace(tmp, path)  # over an empty folder too (POSIX rename of directories)
        except BaseException:
            if old is not None:
                os.rename(old, path)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(path.parent, directory=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
