"""An on-disk cache of decoded images, keyed by the exact files and their stat data.

Layout: ``<cache dir>/decoded/<key>.entry``, one file per entry, never beside the data.
An entry is, back to back, ``np.save`` of the decoded integer array ([n, h, w] uint8 or
uint16, see `mpitrain.data.decode.decode_native`), ``np.save`` of the ok mask, and a small UTF-8
JSON document (format version, size, count and the per-file errors). Arrays are loaded
with ``allow_pickle=False``. Storing integers keeps entries 4x smaller than float32 and
gives bit-identical float32 values on a hit.

The key is a SHA-256 of: the format version, the OpenCV version, the size (a square's
side ``s`` as it always was, ``HxW`` for a WxH ``--image-size``) and, for
every path in order, the path string and its (followed) stat: size, mtime_ns, inode and
mode; with ``channels`` other than 1 (``--channels 3``: rows [n, s, s, 3], RGB) also the
channel count, so grey entries keep the keys (and bytes) they always had and a colour
entry never answers a grey load or the other way round. Any changed, added, removed or reordered file gives a different key, and so does a
chmod (a file that could not be read is retried once it can). A list with a name that may
be DICOM (not one of OpenCV's extensions) adds pydicom's version and installed decoders
(`dicom.signature`), so a file skipped for want of a decoder is retried once one is
installed; lists of PNGs and JPEGs keep their keys and never import pydicom.

The JSON document also keeps the decoding notes (the first frame of a multi-frame DICOM);
they are shown again (`decode.warn_notes`) whenever the entry is used.

Shared between commands: `mpitrain data` decodes each folder whole (its scan list), while
`train` and `evaluate` decode only their rank's shard (after the validation split), whose
list, and so key, differ. A load may therefore name a ``whole`` list that contains its
paths: on a miss of its own key it takes its rows from the entry of ``whole`` if there is
one (read through a memory map, only those rows), which counts as a hit and writes
nothing new. So `mpitrain data` warms the cache of every later run on the same folder and
image size, whatever the split, the number of ranks or the strategy.

Concurrency: an entry is written to a temporary file in the same folder, flushed,
fsync'ed and moved into place with ``os.replace``, so several processes (e.g. MPI ranks on
one machine) can load the same or different lists at the same time and never see half an
entry. An entry that cannot be parsed is a miss and is rewritten. If the cache folder is
not writable the images are still returned, with one warning on stderr.

Housekeeping: a hit refreshes the entry's mtime; after each write, entries unused for
`MAX_AGE_DAYS` are deleted, then the oldest ones until the total is under `MAX_BYTES`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from mpitrain.atomic import TMP_PREFIX, atomic_path
from mpitrain.config import image_shape
from mpitrain.data.decode import decode_native, row_shape, warn_notes
from mpitrain.data.scan import OPENCV_EXTENSIONS
from mpitrain.pixels import as_float

FORMAT_VERSION = 1
MAX_AGE_DAYS = 30
MAX_BYTES = 20 * 2**30
_SUBDIR = "decoded"
_warned = False


def default_cache_dir() -> Path:
    """$MPITRAIN_CACHE_DIR, else $XDG_CACHE_HOME/mpitrain, else ~/.cache/mpitrain."""
    if os.environ.get("MPITRAIN_CACHE_DIR"):
        return Path(os.environ["MPITRAIN_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "mpitrain"
    return Path.home() / ".cache" / "mpitrain"


def _size_token(image_size) -> str:
    """The size in keys and entries: "s" for a square (the keys it always had), "HxW" otherwise."""
    h, w = image_shape(image_size)
    return str(h) if h == w else f"{h}x{w}"


def cache_key(paths: list[str], image_size, channels: int = 1) -> str:
    """Hex key for decoding ``paths`` at ``image_size`` (and ``channels``) given their current stat data."""
    size = _size_token(image_size)
    h = hashlib.sha256(f"mpitrain-decoded\0{FORMAT_VERSION}\0{cv2.__version__}\0{size}\0{len(paths)}\0".encode())
    if channels != 1:  # grey keys stay what they were
        h.update(f"channels\0{channels}\0".encode())
    if any(os.path.splitext(p)[1].lower() not in OPENCV_EXTENSIONS for p in paths):
        from mpitrain.data.dicom import signature

        h.update(f"dicom\0{signature()}\0".encode())
    parts = []
    for p in paths:
        try:
            st = os.stat(p)
            parts.append(f"{len(p)}:{p}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_mode}\0")
        except OSError as e:
            parts.append(f"{len(p)}:{p}\0missing:{e.errno}\0")
    h.update("".join(parts).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _warn(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        print(f"warning: {message}; continuing without the image cache", file=sys.stderr)


# (images, full-scale value, readable mask, errors, notes): errors and notes are (path, reason).
Entry = tuple[np.ndarray, float, np.ndarray, list[tuple[str, str]], list[tuple[str, str]]]


def _read_entry(path: Path, n: int, image_size, rows: np.ndarray | None = None, channels: int = 1) -> Entry | None:
    """(array, max value, ok, errors, notes) from an entry file, or None if absent or invalid.

    With ``rows``, only those rows (positions in the entry's list) are read, through a
    memory map, and returned in that order.
    """
    try:
        with open(path, "rb") as f:
            if rows is None:
                arr = np.load(f, allow_pickle=False)
                shape, dtype = arr.shape, arr.dtype
            else:  # the header only; the rows are mapped below
                version = np.lib.format.read_magic(f)
                read_header = {
                    (1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0,
                }[version]
                shape, fortran, dtype = read_header(f)
                offset = f.tell()
                if fortran:
                    return None
                f.seek(offset + int(np.prod(shape)) * dtype.itemsize)
            ok = np.load(f, allow_pickle=False)
            meta = json.loads(f.read().decode("utf-8"))
        max_value = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}[dtype]
        valid = (
            meta.get("version") == FORMAT_VERSION
            and meta.get("n") == n
            and str(meta.get("image_size")) == _size_token(image_size)
            and meta.get("channels", 1) == channels
            and tuple(shape) == (n, *row_shape(image_size, channels))
            and ok.shape == (n,)
            and ok.dtype == np.bool_
            and meta.get("n_failed") == n - int(ok.sum())
        )
        errors = [(str(p), str(r)) for p, r in meta["errors"]]
        notes = [(str(p), str(r)) for p, r in meta.get("notes", [])]
        if not valid or len(errors) != n - int(ok.sum()):
            return None
        if rows is not None:
            whole = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))
            arr = np.array(whole[rows])  # reads only these rows; a plain in-memory array
            del whole
            ok = ok[rows]
    except Exception:  # noqa: BLE001 - any damage at all just means "decode again"
        return None
    return arr, max_value, ok, errors, notes


def _write_entry(path: Path, arr: np.ndarray, ok: np.ndarray, errors, notes=()) -> None:
    """Atomically create ``path`` (temp file + fsync + os.replace in the same folder)."""
    meta = {
        "version": FORMAT_VERSION,
        "n": len(ok),
        # A square's side (as ever), else "HxW".
        "image_size": int(arr.shape[1]) if arr.shape[1] == arr.shape[2] else _size_token(arr.shape[1:3]),
        "n_failed": int(len(ok) - ok.sum()),
        "errors": [list(e) for e in errors],
        "notes": [list(e) for e in notes],
    }
    if arr.ndim == 4:  # colour; grey entries keep the bytes they always had
        meta["channels"] = int(arr.shape[3])
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        np.save(f, ok, allow_pickle=False)
        f.write(json.dumps(meta).encode("utf-8"))


def prune(folder: Path, keep: Path | None = None, now: float | None = None) -> None:
    """Delete entries unused for MAX_AGE_DAYS, stale temp files, then oldest over MAX_BYTES."""
    now = time.time() if now is None else now
    entries = []
    for p in folder.iterdir():
        try:
            st = p.stat()
        except OSError:
            continue
        if p.name.startswith(TMP_PREFIX):
            if now - st.st_mtime > 86400:  # left behind by a crashed writer
                p.unlink(missing_ok=True)
        elif p.suffix == ".entry" and p != keep:
            if now - st.st_mtime > MAX_AGE_DAYS * 86400:
                p.unlink(missing_ok=True)
            else:
                entries.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in entries)
    total += keep.stat().st_size if keep is not None and keep.exists() else 0
    for _, size, p in sorted(entries):
        if total <= MAX_BYTES:
            break
        p.unlink(missing_ok=True)
        total -= size


def _from_whole(folder: Path, paths: list[str], whole: list[str], image_size, channels: int = 1):
    """``paths``' rows from the entry of the list ``whole`` (see the module docstring), or None."""
    where = {p: i for i, p in enumerate(whole)}
    if len(where) != len(whole) or any(p not in where for p in paths):
        return None
    entry = folder / f"{cache_key(whole, image_size, channels)}.entry"
    found = _read_entry(entry, len(whole), image_size, np.array([where[p] for p in paths], np.int64), channels)
    if found is None:
        return None
    arr, max_value, ok, errors, notes = found
    why, caveat = dict(errors), dict(notes)
    try:
        os.utime(entry)
    except OSError:
        pass
    warn_notes([(p, caveat[p]) for p in paths if p in caveat])
    return arr, max_value, ok, [(p, why[p]) for p in paths if p in why]


def load_images_native(
    paths: list[str],
    image_size,
    cache_dir: Path | None = None,
    threads: int | None = None,
    whole: list[str] | None = None,
    channels: int = 1,
) -> tuple[np.ndarray, float, np.ndarray, list[tuple[str, str]], bool]:
    """Through the cache, as compact integers: (arr [n, h, w] or [n, h, w, 3], max value, ok, errors, hit).

    `decode.to_float(arr, max_value)` gives exactly `decode_images`' floats. Training keeps
    the integers (4x less memory than float32) and converts one batch at a time. ``whole``:
    a list that contains ``paths`` (their folder's scan), whose entry may hold their rows.
    """
    paths = [os.fspath(p) for p in paths]
    folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / _SUBDIR
    entry = folder / f"{cache_key(paths, image_size, channels)}.entry"
    found = _read_entry(entry, len(paths), image_size, channels=channels)
    if found is not None:
        arr, max_value, ok, errors, notes = found
        try:
            os.utime(entry)  # mark as recently used for pruning
        except OSError:
            pass
        warn_notes(notes)
        return arr, max_value, ok, errors, True
    whole = None if whole is None else [os.fspath(p) for p in whole]
    if whole is not None and whole != paths:
        found = _from_whole(folder, paths, whole, image_size, channels)
        if found is not None:
            return (*found, True)

    notes = []
    arr, max_value, ok, errors = decode_native(paths, image_size, threads, notes, channels)
    warn_notes(notes)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_entry(entry, arr, ok, errors, notes)
    except OSError as e:
        _warn(f"cannot write the image cache in {folder} ({e.strerror or e})")
    else:
        try:
            prune(folder, keep=entry)
        except OSError:
            pass  # housekeeping only; another process may be pruning too
    return arr, max_value, ok, errors, False


def load_images_cached(
    paths: list[str],
    image_size,
    cache_dir: Path | None = None,
    threads: int | None = None,
    whole: list[str] | None = None,
    channels: int = 1,
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]], bool]:
    """Like `mpitrain.data.decode.decode_images`, through the cache: (x, ok, errors, hit)."""
    arr, max_value, ok, errors, hit = load_images_native(paths, image_size, cache_dir, threads, whole, channels)
    return as_float(arr, max_value), ok, errors, hit
