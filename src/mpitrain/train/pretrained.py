"""--weights imagenet: the ImageNet weights of a keras.applications model, fetched once.

Keras names the weights file itself, per family and often per size (MobileNet's depend on
the input side), and fetches it with `keras.utils.get_file` into KERAS_HOME/models
(`~/.keras/models`). mpitrain does not keep a copy of those rules: it builds the backbone
with `weights="imagenet"` while Keras' `get_file` is replaced by a stand-in (`_keras_asks`),
so the constructor says which file it wants. Then:

* the file is in that folder: it is used as it is, no network needed (an offline cluster:
  copy it there); a file that cannot be read is one line saying to delete it;
* it is not: the one process that fetches (rank 0, before any data is read) downloads it
  with Keras' `get_file` (which checks Keras' hash) under a temporary name beside it, renamed
  when complete, so no reader ever sees half a file and no partial download is left to be
  mistaken for the real one;
* the download fails (offline): one line naming the URL, why, and the folder to put the
  file in.

No other rank downloads: once rank 0 has the file, a rank that does not see it (another
host without a shared home) receives its bytes from rank 0 (`share`). Every rank then
builds the model from its own copy: the architecture can depend on `weights="imagenet"`
(EfficientNet adds a rescaling layer), and the engine's start broadcast makes the weights
rank 0's anyway.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from mpitrain.errors import UserError

if TYPE_CHECKING:
    from mpitrain.parallel.comm import Comm


def models_dir() -> Path:
    """Where Keras keeps downloaded weights: $KERAS_HOME/models, else ~/.keras/models (or
    /tmp/.keras/models where the home is not writable), read now as Keras reads it at import."""
    home = os.environ.get("KERAS_HOME")
    if home is None:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    return Path(os.path.expanduser(home)) / "models"


class _Asked(Exception):
    """Raised by the stand-in for get_file to stop a constructor once it has named its file."""

    def __init__(self, fname: str, origin: str, file_hash: str | None):
        super().__init__(fname)
        self.fname, self.origin, self.file_hash = fname, origin, file_hash


@contextlib.contextmanager
def _keras_asks(answer: Callable[[str, str, str | None], str]) -> Iterator[None]:
    """While inside, keras.applications' `file_utils.get_file(fname, origin, ...)` calls
    `answer(fname, origin, file_hash)` instead (every family fetches its weights through it)."""
    from keras.src.utils import file_utils

    def stand_in(fname=None, origin=None, *args, file_hash=None, **kwargs):
        return answer(str(fname), str(origin), file_hash)

    real = file_utils.get_file
    file_utils.get_file = stand_in
    try:
        yield
    finally:
        file_utils.get_file = real


def _asked(fname: str, origin: str, file_hash: str | None) -> str:
    raise _Asked(fname, origin, file_hash)


def weights_file(ctor, shape: tuple[int, int, int]) -> tuple[_Asked, str | None]:
    """(the file the constructor asks for, Keras' warning about it or None): the backbone
    is built with weights="imagenet" and stopped at its download. A shape the family's
    weights cannot take is Keras' ValueError, for the caller to turn into one line."""
    with warnings.catch_warnings(record=True) as said, _keras_asks(_asked):
        warnings.simplefilter("always")
        try:
            ctor(include_top=False, weights="imagenet", input_shape=shape, pooling="avg")
        except _Asked as asked:
            notes = [str(w.message) for w in said if "weights" in str(w.message).lower()]
            return asked, (" ".join(notes[0].split()) if notes else None)
    raise UserError(f"{getattr(ctor, '__name__', ctor)} did not ask Keras for an ImageNet weights file")


def fetch(name: str, ctor, shape: tuple[int, int, int]) -> tuple[str, list[str]]:
    """The one process that fetches: the file `name`'s constructor wants is in `models_dir()`
    afterwards (downloaded if it was not). Returns (its file name, lines to show)."""
    asked, note = weights_file(ctor, shape)
    path = models_dir() / asked.fname
    lines = [] if note is None else [f"note: {name} --weights imagenet at {shape[0]}x{shape[1]}: Keras says: {note}"]
    if path.is_file():
        return asked.fname, [f"weights: ImageNet, {path}", *lines]
    _download(asked, path)
    return asked.fname, [f"weights: ImageNet, downloaded to {path}", *lines]


def _download(asked: _Asked, path: Path) -> None:
    """Keras' get_file (progress bar, hash check) into a temporary name, then renamed."""
    from mpitrain.atomic import atomic_path

    where = f"put {asked.fname} in {path.parent}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--weights imagenet: cannot create {path.parent} ({e.strerror}); {where}") from None
    try:
        with atomic_path(path) as tmp:
            _get_file(tmp.name, asked.origin, str(path.parent), asked.file_hash)
    except Exception as e:  # noqa: BLE001 - Keras raises a bare Exception for a failed fetch
        raise UserError(
            f"--weights imagenet: cannot download {asked.origin} ({_why(e, asked.origin)}); {where}"
        ) from None


def _why(e: Exception, origin: str) -> str:
    """Keras' reason for a failed fetch, less what the line says anyway ("URL fetch failure
    on ORIGIN: None -- [Errno -2] Name or service not known" -> "[Errno -2] Name or ...")."""
    why = " ".join(str(e).split()).replace(f"URL fetch failure on {origin}: ", "")
    return why.removeprefix("None -- ") or type(e).__name__


def _get_file(fname: str, origin: str, folder: str, file_hash: str | None) -> str:
    """keras.utils.get_file into `folder` (an absolute cache_subdir is used as it is)."""
    import keras

    return keras.utils.get_file(fname, origin, cache_subdir=folder, file_hash=file_hash)


@contextlib.contextmanager
def from_disk() -> Iterator[list[Path]]:
    """While inside, a keras.applications constructor given weights="imagenet" reads the
    file from `models_dir()`, whatever its hash, and never downloads (`fetch` did). Yields
    a list that holds the file's path once the constructor has asked for it: an error after
    that is one reading the file."""
    used: list[Path] = []

    def answer(fname: str, origin: str, file_hash: str | None) -> str:
        path = models_dir() / fname
        if not path.is_file():
            raise UserError(f"--weights imagenet: {fname} is not in {path.parent}; put it there (it is {origin})")
        used.append(path)
        return str(path)

    with _keras_asks(answer):
        yield used


def share(comm: Comm, fname: str) -> None:
    """Collective, after rank 0 fetched `fname`: a rank that does not see it in its own
    `models_dir()` gets rank 0's bytes and writes them there (atomically: ranks of one host
    may write it together). Nothing travels when every rank sees the file. A rank that cannot
    write it raises the one-line UserError (after the collectives: the caller agrees on it)."""
    import numpy as np

    from mpitrain.atomic import write_atomic

    path = models_dir() / fname
    missing = comm.allgather_obj(not path.is_file())
    if not any(missing):
        return
    data = path.read_bytes() if comm.rank == 0 else b""
    size = comm.bcast_obj(len(data))
    buf = np.frombuffer(data, np.uint8).copy() if comm.rank == 0 else np.empty(size, np.uint8)
    comm.bcast_(buf, 0)
    if missing[comm.rank]:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, buf.tobytes())
        except OSError as e:
            raise UserError(f"--weights imagenet: cannot write {path} ({e.strerror}); put {fname} there") from None
