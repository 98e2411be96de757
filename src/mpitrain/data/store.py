"""Decoded images on disk, memory-mapped and shared by a host's ranks (`--store disk`).

For data larger than memory: instead of each rank holding its decoded rows in memory, each
host keeps one file per data list, written once, and every rank of the host reads its own
rows from it batch by batch through the page cache, so a rank's private memory stays flat
as the data set grows and the host holds the pixels once (in the page cache, which the
kernel may evict), not once per rank.

Layout: ``<cache dir>/store/<key>.npy``, a .npy file (``np.load(path, mmap_mode="r")``
opens it) of the rows [n, h, w] (or [n, h, w, 3]) in the list's order, uint8, or uint16
as soon as a 16-bit file is among them (8-bit rows times 257: the cache's rule, so the
float32 input is the same bits), followed by a JSON trailer: the format, the size, the
rows that could not be decoded with their reasons, and the decoding notes. A failed row
is zeros in the file and left out of every shard. The key is a SHA-256 of the format and
the list's cache key (`cache.cache_key`: the files in order with their stat data, the
size, the channels, OpenCV's version), so a changed file gives a new store.

Which lists: the plan's sources, the folder's whole scan (`Plan.train_source`), so the
training and validation rows of a --val-split come from one store whatever the split, the
seed or the number of ranks, and an elastic job's survivors re-shard without decoding.

Written once, collectively (`open_stores`, with the `comm` it is handed: this module never
imports MPI): the first rank of each host checks for a finished store; if there is none it
checks the disk's free space (a store that would not fit, or a cache folder it cannot
write, is a one-line UserError on every rank) and creates a hidden temporary file of the
full size; the host's ranks decode a contiguous part of the rows each, in chunks, and write
them at their offsets (``os.pwrite``: nothing of it stays in the rank's memory); when every
rank of the host is done, its first rank appends the trailer, fsyncs and renames the file
into place. The rename is the only commit: a crash or a kill mid-write leaves a temporary
file that no run trusts (removed after a day), and two jobs writing the same store at once
each rename a complete file of the same content. A host whose rows turn out to need uint16
starts over in uint16 (16-bit files are rare; the common case decodes once).

Several hosts each keep their own store (the cache folder is per host by default); with a
shared --cache-dir they write the same file, which is safe for the same reason.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from mpitrain.atomic import TMP_PREFIX
from mpitrain.data.cache import MAX_AGE_DAYS, _size_token, cache_key, default_cache_dir
from mpitrain.data.dataset import Plan, Shard, kept_labels
from mpitrain.data.decode import decode_native, row_shape, warn_notes
from mpitrain.errors import UserError, agree
from mpitrain.shards import shard

if TYPE_CHECKING:
    from mpitrain.parallel.comm import Comm

FORMAT_VERSION = 1
SUBDIR = "store"
CHUNK_BYTES = 64 * 2**20  # decoded per call: a rank's memory for writing stays this small
AUTO_SHARE = 0.5  # --store auto: disk when the host's ranks would hold more than this share of its memory


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk of `folder` (tests replace this one function)."""
    return shutil.disk_usage(folder).free


def decoded_bytes(n: int, image_size, channels: int) -> int:
    """The bytes of `n` decoded 8-bit rows (what memory mode holds, what the store writes)."""
    return n * int(np.prod(row_shape(image_size, channels)))


def disk_wanted(rows_here: int, image_size, channels: int, available: int | None) -> bool:
    """--store auto: whether the rows the host's ranks would hold in memory exceed
    `AUTO_SHARE` of the host's `available` memory (None: unknown, memory)."""
    return available is not None and decoded_bytes(rows_here, image_size, channels) > AUTO_SHARE * available


def store_path(folder: Path, paths: list[str], image_size, channels: int) -> Path:
    import hashlib

    key = hashlib.sha256(f"mpitrain-store\0{FORMAT_VERSION}\0{cache_key(paths, image_size, channels)}".encode())
    return folder / f"{key.hexdigest()}.npy"


class Rows:
    """Some rows of a store, by index, read when asked for: what the engine does with its
    images (len, shape, dtype, ndim, ``x[i]``, ``x[a:b]``, ``x[idx]``) gives plain arrays
    read from the memory map, so only the batch in hand is in the rank's memory."""

    def __init__(self, rows: np.ndarray, index: np.ndarray):
        # A plain array over the map's buffer: np.memmap's own indexing costs 10x (0.4 ms a batch).
        self.rows, self.index = rows.view(np.ndarray), np.asarray(index, np.int64)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.rows.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.rows.dtype

    @property
    def ndim(self) -> int:
        return self.rows.ndim

    def __getitem__(self, key) -> np.ndarray:
        return np.take(self.rows, self.index[key], axis=0)  # a copy: never a view into the map


@dataclass
class Store:
    """One finished store, opened read-only."""

    path: Path
    rows: np.ndarray  # the memory map [n, ...]
    max_value: float
    ok: np.ndarray  # bool [n]
    errors: dict[str, str]  # path -> why it could not be decoded
    notes: dict[str, str]  # path -> a decoding caveat
    built: bool = False  # written by this job (else found)
    where: dict[str, int] = field(default_factory=dict)  # path -> row

    @property
    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def take(
        self, paths: list[str], labels: np.ndarray, out: Shard
    ) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
        """(rows, labels, full-scale value, readable mask) of `paths`, as `dataset._load`
        gives them, but the rows as `Rows` of the memory map (nothing copied)."""
        pos = np.fromiter((self.where[p] for p in paths), np.int64, len(paths))
        ok = self.ok[pos]
        out.errors.extend((p, self.errors[p]) for p, good in zip(paths, ok) if not good)
        warn_notes([(p, self.notes[p]) for p in paths if p in self.notes])
        out.cache_hits += int(not self.built)
        out.loads += 1
        # The engine takes Rows as it takes an array (see `Rows`): the cast says so to mypy.
        return cast(np.ndarray, Rows(self.rows, pos[ok])), kept_labels(labels, ok), self.max_value, ok


@dataclass
class Stores:
    """The stores of a plan's training and validation lists (the same one for a split)."""

    train: Store
    val: Store
    seconds: float = 0.0  # spent opening (and writing) them
    _first: bool = True

    def shard(self, plan: Plan, seed: int, train_part: tuple[int, int], val_part: tuple[int, int]) -> Shard:
        """This rank's rows, as `dataset.load_shard` gives them (same rows, same order)."""
        t0 = time.perf_counter()
        out = Shard(*(np.zeros(0),) * 4)
        tr = shard(np.arange(len(plan.train_paths)), *train_part, seed)
        va = shard(np.arange(len(plan.val_paths)), *val_part, seed)
        out.train_x, out.train_y, out.train_max, _ = self.train.take(
            [plan.train_paths[i] for i in tr], plan.train_labels[tr], out
        )
        out.val_x, out.val_y, out.val_max, ok = self.val.take([plan.val_paths[i] for i in va], plan.val_labels[va], out)
        out.val_index = np.asarray(va, dtype=np.int64)[ok] if len(va) else np.zeros(0, np.int64)
        out.seconds = time.perf_counter() - t0 + (self.seconds if self._first else 0.0)
        self._first = False
        return out

    def line(self) -> str:
        """The data line's words: how large the store is, where, and whether it was written now."""
        stores = [self.train] if self.val.path == self.train.path else [self.train, self.val]
        said = [f"{_size_text(s.size)} at {s.path} ({'written now' if s.built else 'found'})" for s in stores]
        return "store: disk, " + " + ".join(said)


def _size_text(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _sources(plan: Plan) -> tuple[list[str], list[str]]:
    return plan.train_source or plan.train_paths, plan.val_source or plan.val_paths


def open_stores(comm: Comm, plan: Plan, image_size, channels: int, cache_dir: str | None = None) -> Stores:
    """Collective: the plan's stores on this host, written first where there are none (see
    the module docstring). Every rank of the job calls it with the same plan."""
    folder = Path(cache_dir if cache_dir else default_cache_dir()) / SUBDIR
    mates = comm.node_allgather_obj(comm.rank)  # this host's ranks, its first rank first
    t0 = time.perf_counter()  # from here: not the wait for ranks still starting
    train_list, val_list = _sources(plan)
    train = _one(comm, mates, folder, train_list, image_size, channels)
    val = train if val_list == train_list else _one(comm, mates, folder, val_list, image_size, channels)
    return Stores(train, val, seconds=time.perf_counter() - t0)


@dataclass
class _Part:
    """What one rank decoded into a temporary store."""

    failed: list[tuple[int, str, str]]  # (row, path, reason)
    notes: list[tuple[str, str]]
    wide: bool  # a 16-bit file came up in a uint8 store


def _one(comm: Comm, mates: list[int], folder: Path, paths: list[str], image_size, channels: int) -> Store:
    """Collective: the store of `paths` (every rank the same list, and the same `mates` on a host)."""
    path = store_path(folder, paths, image_size, channels)
    shape = (len(paths), *row_shape(image_size, channels))
    if not paths:  # nothing to write (an empty file cannot be mapped)
        return Store(path, np.zeros(shape, np.uint8), 255.0, np.zeros(0, bool), {}, {})
    leader, built = comm.rank == mates[0], False
    dtype: np.dtype = np.dtype(np.uint8)
    while True:  # a round per dtype: uint8, and uint16 where a host's files need it
        ready: tuple[str, int] | None = None
        err = None
        if leader:
            try:
                ready = None if _open(path, paths, image_size, channels) else _create(folder, path, shape, dtype)
            except UserError as e:
                err = str(e)
        agree(comm, err)
        tmp = comm.allgather_obj(ready)[mates[0]]  # (temporary file, data offset), or None: found
        part, err = None, None
        if tmp is not None:
            built = True
            try:
                part = _fill(
                    Path(tmp[0]), tmp[1], dtype, paths, image_size, channels, mates.index(comm.rank), len(mates)
                )
            except OSError as e:
                err = f"cannot write the image store {tmp[0]}: {e.strerror or e}"
        _agree_or_drop(comm, err, Path(tmp[0]) if leader and tmp is not None else None)
        parts = comm.allgather_obj(part)
        ours = [parts[r] for r in mates]
        again = tmp is not None and dtype == np.uint8 and any(p is not None and p.wide for p in ours)
        err = None
        if leader and tmp is not None:
            try:
                if again:
                    Path(tmp[0]).unlink(missing_ok=True)
                else:
                    _commit(Path(tmp[0]), tmp[1], shape, dtype, image_size, channels, ours, path)
            except OSError as e:
                err = f"cannot write the image store {path}: {e.strerror or e}"
        _agree_or_drop(comm, err, Path(tmp[0]) if leader and tmp is not None else None)
        if not any(comm.allgather_obj(again)):
            break
        dtype = np.dtype(np.uint16) if again else dtype
    found = _open(path, paths, image_size, channels)
    agree(comm, None if found is not None else f"the image store {path} vanished or is damaged; start again")
    assert found is not None
    found.built = built
    return found


def _agree_or_drop(comm: Comm, err: str | None, tmp: Path | None) -> None:
    """Collective `agree`; when it stops the job, the host's first rank deletes its temporary store."""
    try:
        agree(comm, err)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def _create(folder: Path, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> tuple[str, int]:
    """The first rank of a host: a new temporary store of the full size, its space reserved.
    UserError when the folder cannot be written or the disk has too little room."""
    need = int(np.prod(shape)) * dtype.itemsize
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _prune(folder)
        free = free_bytes(folder)
    except OSError as e:
        raise _unwritable(folder, e) from None
    if need > free:
        raise UserError(
            f"--store disk: the decoded images need {need / 1e9:.2f} GB in {folder} and its disk has "
            f"{free / 1e9:.2f} GB free: free some space, give --cache-dir DIR on a larger disk, or --store memory"
        )
    tmp = folder / f"{TMP_PREFIX}{uuid.uuid4().hex}-{path.name}"
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        offset = int(mm.offset)
        del mm
        if hasattr(os, "posix_fallocate") and need:  # the space is ours: no disk full half-way
            fd = os.open(tmp, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, offset + need)
            finally:
                os.close(fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == 28:  # ENOSPC: taken by someone else since we looked
            raise UserError(f"--store disk: the disk of {folder} is full ({need / 1e9:.2f} GB needed)") from None
        raise _unwritable(folder, e) from None
    return str(tmp), offset


def _unwritable(folder: Path, e: OSError) -> UserError:
    return UserError(
        f"--store disk: cannot write the image store in {folder} ({e.strerror or e}): "
        f"give --cache-dir DIR on a writable disk, or --store memory"
    )


def _fill(tmp: Path, offset: int, dtype, paths, image_size, channels: int, part: int, parts: int) -> _Part:
    """One rank's contiguous share of the rows, decoded in chunks and written at their offsets."""
    n = len(paths)
    a, b = n * part // parts, n * (part + 1) // parts
    row = int(np.prod(row_shape(image_size, channels))) * dtype.itemsize
    step = max(1, CHUNK_BYTES // row)
    failed: list[tuple[int, str, str]] = []
    notes: list[tuple[str, str]] = []
    fd = os.open(tmp, os.O_WRONLY)
    try:
        for s in range(a, b, step):
            chunk = paths[s : min(b, s + step)]
            arr, _, ok, errors = decode_native(chunk, image_size, None, notes, channels)
            if arr.dtype != dtype:
                if dtype == np.uint8:
                    return _Part([], [], wide=True)  # the host starts over in uint16
                arr = arr.astype(np.uint16) * np.uint16(257)  # 8-bit rows in a uint16 store
            why = dict(errors)
            failed += [(s + int(i), chunk[i], why.get(chunk[i], "not decoded")) for i in np.flatnonzero(~ok)]
            _write_all(fd, memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data), offset + s * row)
        os.fsync(fd)
    finally:
        os.close(fd)
    return _Part(failed, notes, wide=False)


def _write_all(fd: int, data: memoryview, at: int) -> None:
    while len(data):
        done = os.pwrite(fd, data, at)
        data, at = data[done:], at + done


def _commit(tmp: Path, offset: int, shape, dtype, image_size, channels: int, parts: list, path: Path) -> None:
    """The first rank of a host, once its ranks are done: the trailer, fsync, then the rename."""
    failed = sorted(f for p in parts for f in p.failed)
    meta = {
        "format": FORMAT_VERSION,
        "n": shape[0],
        "image_size": _size_token(image_size),
        "channels": channels,
        "failed": [[i, p, why] for i, p, why in failed],
        "notes": [list(n) for p in parts for n in p.notes],
    }
    with open(tmp, "r+b") as f:
        f.seek(offset + int(np.prod(shape)) * np.dtype(dtype).itemsize)
        f.write(json.dumps(meta).encode("utf-8"))
        f.truncate()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself survives a crash
        finally:
            os.close(fd)
    except OSError:
        pass


def _open(path: Path, paths: list[str], image_size, channels: int) -> Store | None:
    """The finished store at `path` for `paths`, read-only, or None if absent or not valid."""
    try:
        rows = np.load(path, mmap_mode="r", allow_pickle=False)
        if not isinstance(rows, np.memmap) or rows.dtype not in (np.uint8, np.uint16):
            return None
        if rows.shape != (len(paths), *row_shape(image_size, channels)):
            return None
        with open(path, "rb") as f:
            f.seek(int(rows.offset) + rows.nbytes)
            meta = json.loads(f.read().decode("utf-8"))
        if (meta.get("format"), meta.get("n"), meta.get("image_size"), meta.get("channels")) != (
            FORMAT_VERSION,
            len(paths),
            _size_token(image_size),
            channels,
        ):
            return None
        ok = np.ones(len(paths), bool)
        errors = {}
        for i, p, why in meta["failed"]:
            if paths[i] != p:
                return None
            ok[i], errors[p] = False, str(why)
        notes = {str(p): str(n) for p, n in meta["notes"]}
    except Exception:  # noqa: BLE001 - absent, torn or foreign: not a store to trust
        return None
    try:
        os.utime(path)  # used: kept by the pruning
    except OSError:
        pass
    max_value = 255.0 if rows.dtype == np.uint8 else 65535.0
    return Store(path, rows, max_value, ok, errors, notes, where={p: i for i, p in enumerate(paths)})


def _prune(folder: Path, now: float | None = None) -> None:
    """Stores unused for `cache.MAX_AGE_DAYS` and temporary files a day old (a crashed
    writer's) are deleted. No size cap: a store is as large as its data, by design."""
    now = time.time() if now is None else now
    for p in folder.iterdir():
        try:
            age = now - p.stat().st_mtime
        except OSError:
            continue
        if (p.name.startswith(TMP_PREFIX) and age > 86400) or (p.suffix == ".npy" and age > MAX_AGE_DAYS * 86400):
            p.unlink(missing_ok=True)
