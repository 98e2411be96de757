"""Decode image files into a grayscale (or colour) float32 array, fast and without surprises.

What `decode_images` does with each file:

* The bytes are read with plain Python I/O and decoded by ``cv2.imdecode`` as grayscale at
  the file's own bit depth. 8-bit sources are scaled by 1/255 and 16-bit sources by
  1/65535 to [0, 1]; gray, RGB and RGBA sources all work (colour is converted to luma,
  alpha is ignored). Other depths (e.g. float TIFF) are rejected with a reason.
* With ``channels=3`` (``--channels 3``) the same steps run in colour instead
  (``cv2.IMREAD_COLOR``, the ``IMREAD_REDUCED_COLOR_*`` JPEG reductions): rows are RGB
  ``[s, s, 3]``, grey sources (and DICOM) have their one channel replicated, alpha is
  dropped. The default, one channel, is decoded exactly as it always was.
* The image is resized to ``image_size x image_size``, or to (height, width) for a WxH
  ``--image-size`` (aspect ratio not kept), with ``cv2.INTER_AREA``, in the source's
  integer type, then scaled to float32.
* DICOM (a ``.dcm``/``.dicom`` name or the ``DICM`` marker at byte 128) is read by
  `mpitrain.data.dicom` instead: its grey-level pipeline (rescale, VOI window or LUT,
  MONOCHROME1, Bits Stored) gives uint8 or uint16 rows like a PNG's, which then take the
  same resize. pydicom holds the GIL while it parses, so DICOM files gain less from the
  thread pool than PNGs (docs/benchmarks.md). A multi-frame file gives its first frame
  and a note (`notes`, shown by `warn_notes`).
* Bad files never raise: empty files, unreadable paths (missing, a directory, no
  permission), truncated JPEGs (no end-of-image marker after the first scan), truncated
  PNGs (no IEND chunk) and bytes OpenCV cannot decode get a zero row, ``ok=False`` and a
  one-line reason. Truncation is checked on the bytes because a decoder may return a
  partially decoded image instead of failing. Corrupt data *inside* an otherwise complete
  JPEG may still decode (with artefacts), as it does in every viewer.

Speed: files are decoded by a pool of ``threads`` workers (OpenCV and file reads release
the GIL; OpenCV's own thread pool is set to 1 while we decode, as nesting only thrashes).
For JPEGs we parse the markers up to the first scan for the source size and decode in
the DCT domain at 1/2, 1/4 or 1/8 scale (``cv2.IMREAD_REDUCED_GRAYSCALE_*``): the largest
reduction that still leaves *2x* the target size on both sides, then INTER_AREA to the
target. The 2x margin (rather than 1x) keeps the result close to a full-size INTER_AREA
resize; see `_MARGIN`. If the header cannot be parsed, or the reduced image comes out
smaller than expected, the file is decoded at full size: correctness first.

OpenCV's own warnings are silenced, and libjpeg/libpng chatter written straight to
stderr while decoding is filtered out (other stderr output is passed through).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from mpitrain.data.dicom import has_marker_bytes, is_dicom_name
from mpitrain.errors import UserError
from mpitrain.pixels import as_float, to_float  # noqa: F401 - to_float: callers import it from here
from mpitrain.runtime import available_cores
from mpitrain.targets import strata

_GRAY = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH
_REDUCED = (
    (8, cv2.IMREAD_REDUCED_GRAYSCALE_8),
    (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
    (2, cv2.IMREAD_REDUCED_GRAYSCALE_2),
)
# --channels 3: the same decoder in colour (BGR from OpenCV, stored as RGB); grey sources
# come back with their one channel replicated. A path of its own beside the grey one, so
# that the default (one channel) decodes exactly as before.
_COLOUR = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH
_REDUCED_COLOUR = (
    (8, cv2.IMREAD_REDUCED_COLOR_8),
    (4, cv2.IMREAD_REDUCED_COLOR_4),
    (2, cv2.IMREAD_REDUCED_COLOR_2),
)
CHANNELS = (1, 3)
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_NOISE = (
    b"Corrupt JPEG data",
    b"Premature end of JPEG",
    b"libpng warning",
    b"libpng error",
    b"Invalid SOS",
    b"Unsupported marker",
    b"JPEG datastream",
    b"[ WARN:",
    b"[ INFO:",
    b"TIFF",
)
# DCT-domain reduction only while the decoded image keeps >= 2x the target size: at 1x the
# result drifts visibly from a full-size INTER_AREA resize (mean 1.8, max 90 grey levels on
# the chest X-rays, 224 -> 50), at 2x it stays close (mean 0.5, max 30) and keeps most of
# the speed (115 vs 185 us of CPU per image).
_MARGIN = 2
_STDERR_LOCK = threading.Lock()
_QUIET: dict = {"depth": 0, "saved": None, "tmp": None}

with contextlib.suppress(Exception):  # absent in some builds; warnings are then filtered below
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def _jpeg_layout(data: bytes) -> tuple[int, int, int] | None:
    """(height, width, offset of first scan data) from JPEG markers, or None if unparsable."""
    i, n, h, w = 2, len(data), 0, 0
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        seglen = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xD9 or seglen < 2:
            return None
        if marker in _SOF and seglen >= 7 and i + 9 <= n:
            h = int.from_bytes(data[i + 5 : i + 7], "big")
            w = int.from_bytes(data[i + 7 : i + 9], "big")
        if marker == 0xDA:
            return h, w, i + 2 + seglen
        i += 2 + seglen
    return None


def _decode_one(
    data: bytes, size: tuple[int, int], named_dicom: bool = False, channels: int = 1
) -> tuple[np.ndarray | str, str | None]:
    """Decode and resize one file's bytes to ``size`` (height, width): (a uint8/uint16 array
    [h, w] (one channel) or [h, w, 3] (three, RGB), or a failure reason; note)."""
    if not data:
        return "empty file (0 bytes)", None
    if named_dicom or has_marker_bytes(data):
        from mpitrain.data import dicom

        got = dicom.decode(data, named_dicom)
        if isinstance(got, str):
            return got, None
        img, note = got
        if img.shape != size:
            img = cv2.resize(img, size[::-1], interpolation=cv2.INTER_AREA)  # OpenCV: (width, height)
        return (img if channels == 1 else np.repeat(img[..., np.newaxis], channels, axis=2)), note
    return _decode_opencv(data, size, channels), None


def _decode_opencv(data: bytes, size: tuple[int, int], channels: int = 1) -> np.ndarray | str:
    """Every format but DICOM: a uint8/uint16 array ([h, w] or [h, w, 3]), or a failure reason."""
    full, reductions = (_GRAY, _REDUCED) if channels == 1 else (_COLOUR, _REDUCED_COLOUR)
    flag = full
    if data[:3] == b"\xff\xd8\xff":
        layout = _jpeg_layout(data)
        if layout is not None:
            h, w, scan = layout
            if data.find(b"\xff\xd9", scan) < 0:
                return "truncated JPEG (no end-of-image marker)"
            for factor, reduced in reductions:
                if h // factor >= size[0] * _MARGIN and w // factor >= size[1] * _MARGIN:
                    flag = reduced
                    break
    elif data[:8] == b"\x89PNG\r\n\x1a\n" and data.rfind(b"IEND", 8) < 0:
        return "truncated PNG (no IEND chunk)"
    buf = np.frombuffer(data, np.uint8)
    img = cv2.imdecode(buf, flag)
    if img is not None and flag != full and (img.shape[0] < size[0] or img.shape[1] < size[1]):
        img = cv2.imdecode(buf, full)  # header lied or rotation: decode at full size
    if img is None or img.size == 0:
        kind = "JPEG" if flag != full or data[:3] == b"\xff\xd8\xff" else "PNG" if data[:4] == b"\x89PNG" else None
        return f"corrupt or truncated {kind}" if kind else "not a decodable image (unknown format or corrupt data)"
    if channels == 1 and img.ndim == 3:  # multi-channel source that came back as colour; keep luma
        img = cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2GRAY)
    elif channels == 3:
        img = _rgb(img)
    if img.dtype not in (np.uint8, np.uint16):
        return f"unsupported pixel type {img.dtype} (need 8- or 16-bit)"
    if img.shape[:2] != size:
        img = cv2.resize(img, size[::-1], interpolation=cv2.INTER_AREA)  # OpenCV: (width, height)
    return img


def _rgb(img: np.ndarray) -> np.ndarray:
    """OpenCV's colour decode (BGR, or one channel for some sources) as RGB [h, w, 3]."""
    if img.ndim == 2:
        return np.repeat(img[..., np.newaxis], 3, axis=2)
    if img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img[:, :, 2::-1])  # BGR(A) -> RGB, alpha dropped


def _read(path: str) -> bytes | str:
    try:
        with open(path, "rb") as f:
            return f.read()
    except IsADirectoryError:
        return "is a directory, not a file"
    except OSError as e:
        return f"cannot read: {e.strerror or e}"


@contextlib.contextmanager
def _quiet_stderr():
    """Send fd 2 to a temp file while decoding; replay whatever is not codec noise.

    Reference-counted, so concurrent decodes in one process share one redirection.
    """
    with _STDERR_LOCK:
        if _QUIET["depth"] == 0:
            try:
                sys.stderr.flush()
                tmp = tempfile.TemporaryFile()
                _QUIET["saved"], _QUIET["tmp"] = os.dup(2), tmp
                os.dup2(tmp.fileno(), 2)
            except (OSError, ValueError, AttributeError):
                _QUIET["saved"] = None
        _QUIET["depth"] += 1
    try:
        yield
    finally:
        with _STDERR_LOCK:
            _QUIET["depth"] -= 1
            if _QUIET["depth"] == 0 and _QUIET["saved"] is not None:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                saved, tmp = _QUIET["saved"], _QUIET["tmp"]
                os.dup2(saved, 2)
                os.close(saved)
                tmp.seek(0)
                kept = [
                    ln
                    for ln in tmp.read().splitlines(keepends=True)
                    if ln.strip() and not ln.lstrip().startswith(_NOISE)
                ]
                tmp.close()
                if kept:
                    os.write(2, b"".join(kept))


_SHOWN: set = set()  # (path, note) already shown by this process


def warn_notes(notes: list[tuple[str, str]]) -> None:
    """One warning line on stderr about files decoded with a caveat (multi-frame DICOM),
    each file once per process: a command that loads a list twice (`mpitrain data` times
    the cached reload) or reads it from the cache says it once."""
    with _STDERR_LOCK:
        notes = [n for n in notes if tuple(n) not in _SHOWN]
        _SHOWN.update(tuple(n) for n in notes)
    if notes:
        shown = "; ".join(f"{p}: {n}" for p, n in notes[:2]) + (
            f"; and {len(notes) - 2} more" if len(notes) > 2 else ""
        )
        print(f"warning: {len(notes)} file(s) decoded with a caveat: {shown}", file=sys.stderr)


def row_shape(image_size, channels: int = 1) -> tuple[int, ...]:
    """One decoded image's shape: (height, width), and the channel axis for colour (the
    rows of `decode_native`, the cache's entries, a shard and the disk store alike)."""
    from mpitrain.config import image_shape

    return (*image_shape(image_size), *(() if channels == 1 else (channels,)))


def _size(image_size) -> tuple[int, int]:
    """(height, width) of ``image_size``, both positive."""
    from mpitrain.config import image_shape

    try:
        size = image_shape(image_size)
    except UserError:
        size = (0, 0)
    if min(size) < 1:
        raise UserError(f"image size must be a positive integer or (height, width), got {image_size!r}")
    return size


def check_channels(channels: int) -> None:
    if isinstance(channels, bool) or channels not in CHANNELS:
        raise UserError(f"--channels must be 1 (grey) or 3 (colour), got {channels!r}")


def decode_native(
    paths: list[str], image_size, threads: int | None = None, notes: list | None = None, channels: int = 1
) -> tuple[np.ndarray, float, np.ndarray, list[tuple[str, str]]]:
    """Decode to integers: (uint8 or uint16 array [n, h, w], or [n, h, w, 3] with
    ``channels=3``, max value, ok, errors). ``image_size``: an int (a square, s x s) or
    (height, width) (`config.image_shape`).

    ``notes``: a list to receive ``(path, note)`` for files decoded with a caveat (the
    first frame of a multi-frame DICOM), in path order; without it they are shown at once
    with `warn_notes`.

    The array is uint8 (max 255) when every decoded file is 8-bit; as soon as a 16-bit
    file appears it is uint16 (max 65535) and 8-bit rows are stored times 257, so
    ``x / max`` gives exactly the same float32 values either way. Used by the cache,
    which stores these compact integers instead of float32.
    """
    size = _size(image_size)
    check_channels(channels)
    n = len(paths)
    threads = available_cores() if threads is None else max(1, int(threads))
    shape = (n, *row_shape(size, channels))
    state = {"arr": np.zeros(shape, np.uint8)}
    ok = np.zeros(n, bool)
    reasons: list[str | None] = [None] * n
    caveats: list[str | None] = [None] * n
    lock = threading.Lock()

    def store(i: int, img: np.ndarray) -> None:
        with lock:  # a row written during the uint8 -> uint16 switch must not be lost
            if img.dtype == np.uint16 and state["arr"].dtype == np.uint8:
                state["arr"] = state["arr"].astype(np.uint16) * np.uint16(257)
            if state["arr"].dtype == np.uint16 and img.dtype == np.uint8:
                img = img.astype(np.uint16) * np.uint16(257)
            state["arr"][i] = img
            ok[i] = True

    def work(start: int, step: int) -> None:
        for i in range(start, n, step):
            data = _read(paths[i])
            out, caveats[i] = (
                (data, None) if isinstance(data, str) else _decode_one(data, size, is_dicom_name(paths[i]), channels)
            )
            if isinstance(out, str):
                reasons[i] = out
            else:
                store(i, out)

    workers = min(threads, n)
    cv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # our pool already uses every core; nested OpenCV threads only thrash
    try:
        with _quiet_stderr():
            if workers <= 1:
                work(0, 1)
            else:
                with ThreadPoolExecutor(workers, thread_name_prefix="mpitrain-decode") as pool:
                    list(pool.map(work, range(workers), [workers] * workers))
    finally:
        cv2.setNumThreads(cv_threads)
    arr = state["arr"]
    errors = [(paths[i], r) for i, r in enumerate(reasons) if r is not None]
    found = [(paths[i], c) for i, c in enumerate(caveats) if c is not None]
    if notes is None:
        warn_notes(found)
    else:
        notes.extend(found)
    return arr, (255.0 if arr.dtype == np.uint8 else 65535.0), ok, errors


def decode_images(
    paths: list[str], image_size, threads: int | None = None, channels: int = 1
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Decode ``paths`` to (x float32 [n, h, w, channels] in [0, 1], ok bool [n], errors).

    ``errors`` lists ``(path, reason)`` for every file that failed; its row in ``x`` is
    zeros and ``ok`` is False. ``threads`` defaults to the CPUs this process may use.
    """
    arr, max_value, ok, errors = decode_native(paths, image_size, threads, channels=channels)
    return as_float(arr, max_value), ok, errors


# A source is colour when its channels really differ: more than _COLOUR_SHARE of its pixels
# spread over more than _COLOUR_SPREAD grey levels (of 255) between R, G and B. Grey content
# saved as a 3-channel file (the chest X-ray JPEGs) has a spread of 0: no colour to lose.
_COLOUR_SPREAD = 8
_COLOUR_SHARE = 0.01
SNIFF_PER_CLASS = 32


def is_colour(data: bytes) -> bool:
    """Whether one file's bytes hold colour (channels that differ), decoded small and cheap
    (a JPEG at 1/8 scale in the DCT domain: about 0.2-0.3 ms for a chest X-ray); DICOM,
    one-channel and undecodable files are not colour."""
    if not data or has_marker_bytes(data):
        return False
    buf = np.frombuffer(data, np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_REDUCED_COLOR_8 if data[:3] == b"\xff\xd8\xff" else cv2.IMREAD_COLOR)
    if img is None or img.ndim != 3 or img.shape[2] < 3:
        return False
    img = img[:, :, :3]
    if img.dtype == np.uint16:
        img = (img // 256).astype(np.uint8)
    spread = img.max(axis=2).astype(np.int16) - img.min(axis=2)
    return bool((spread > _COLOUR_SPREAD).mean() > _COLOUR_SHARE)


def sniff_colour(paths: list[str], labels, per_class: int = SNIFF_PER_CLASS) -> tuple[int, int]:
    """(colour files, files looked at) among up to ``per_class`` files of each class, evenly
    spaced in path order (the same files every run): what --channels 1 would turn grey.
    Reads only; the data and its order are untouched. Multi-label rows ([n, L]) have no one
    class: they are sampled as one."""
    labels = strata(labels)
    picked: list[str] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        step = max(1, len(members) // per_class)
        picked.extend(paths[i] for i in members[::step][:per_class])
    colour = 0
    with _quiet_stderr():
        for p in picked:
            data = _read(p)
            colour += isinstance(data, bytes) and not is_dicom_name(p) and is_colour(data)
    return colour, len(picked)
