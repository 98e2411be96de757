"""DICOM files to the grey levels `decode.py` works with (pydicom, imported only when needed).

Which files: a ``.dcm`` / ``.dicom`` name, or any file whose bytes carry the ``DICM``
marker at offset 128 (PACS exports often have no extension, or a UID as their name, so
`scan` also looks inside extension-less files: `is_dicom_name`, `has_marker`).

What `decode` does, in the order of the DICOM display pipeline (PS3.3 C.11, PS3.4 N.2):

1. Pixel data of the first frame (``pydicom.pixels.pixel_array(index=0)``): a multi-frame
   file gives its first frame only, with a note the caller shows as a warning, because a
   classifier of single images cannot use the others and silently picking one would hide it.
2. Bits Stored: bits above it are masked off (unsigned) or replaced by the sign
   (Pixel Representation 1), whatever the decoder left there, so overlay bits or junk in
   the unused high bits never reach the model.
3. Modality LUT: Rescale Slope / Intercept, or a Modality LUT Sequence.
4. VOI: a VOI LUT Sequence (first item), else the first Window Center / Width (VOI LUT
   Function LINEAR, LINEAR_EXACT or SIGMOID, PS3.3 C.11.2.1.2), mapped to [0, 1]. Without
   either, the *stored range* (every value Bits Stored allows, through the modality LUT)
   is mapped to [0, 1]: a fixed scale like a PNG's 255 or 65535, not the image's own
   min-max, so a darker exposure stays darker and one image's scale does not depend on its
   content (a constant image stays defined).
5. MONOCHROME1 (low values are white) is inverted, so bone is bright in every file.
6. Integers for the cache: uint8 (x 255) when Bits Stored <= 8 and no VOI applies (exact),
   else uint16 (x 65535), the contract of `decode.decode_native`.

Colour (RGB, YBR) becomes luma like OpenCV's; PALETTE COLOR and float pixel data are
refused with a reason. Every failure is a one-line reason string, never an exception:
a transfer syntax no installed handler decodes names the packages that would
(`missing_decoder`), so the file is a counted skip and the run goes on.
"""

from __future__ import annotations

import functools
import io
import os

import numpy as np

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
MARKER_OFFSET = 128
MARKER = b"DICM"


def is_dicom_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in DICOM_EXTENSIONS


def may_be_dicom_name(name: str) -> bool:
    """Names whose content must be looked at: no extension, or a numeric one (UID names
    like ``1.2.840.113619.2.55.3.1234``, which `os.path.splitext` sees as ``.1234``)."""
    ext = os.path.splitext(name)[1]
    return ext == "" or ext[1:].isdigit()


def has_marker_bytes(data: bytes) -> bool:
    return data[MARKER_OFFSET : MARKER_OFFSET + 4] == MARKER


def has_marker(path: str) -> bool:
    """True if the file at ``path`` carries the DICOM marker (False if unreadable)."""
    try:
        with open(path, "rb") as f:
            return has_marker_bytes(f.read(MARKER_OFFSET + 4))
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def signature() -> str:
    """pydicom's version and the decoders installed for each compressed transfer syntax.

    Part of the cache key of lists holding DICOM files: a file skipped for want of a
    decoder is decoded anew once one is installed, instead of staying skipped in the cache.
    """
    try:
        import pydicom
        from pydicom.pixels import get_decoder
        from pydicom.uid import AllTransferSyntaxes
    except ImportError:
        return "no-pydicom"
    parts = [pydicom.__version__]
    for uid in sorted(str(u) for u in AllTransferSyntaxes):
        try:
            parts.append(f"{uid}={','.join(sorted(get_decoder(uid).available_plugins))}")
        except (NotImplementedError, ValueError):
            parts.append(f"{uid}=")
    return ";".join(parts)


def _packages(missing: list[str]) -> str:
    """pydicom's "gdcm - requires gdcm>=3.0.10" lines as what to pip install."""
    out = []
    for line in missing:
        name, _, needs = line.partition(" - requires ")
        if name.strip() == "gdcm":
            out.append("python-gdcm")
        elif needs:
            pkgs = [p.strip().split(">")[0].split("=")[0].split("<")[0] for p in needs.split(" and ")]
            out.append(" + ".join(p for p in pkgs if p and p != "numpy"))
    return ", or ".join(out) if out else "a pydicom pixel data plugin"


def missing_decoder(uid) -> str | None:
    """Why pixel data of transfer syntax ``uid`` cannot be decoded here (None: it can)."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"DICOM transfer syntax {getattr(uid, 'name', uid)} ({uid}) has no pixel data decoder in pydicom"
    if decoder.is_available:
        return None
    return (
        f"DICOM transfer syntax {uid.name} ({uid}) cannot be decoded with the installed packages; "
        f"pip install {_packages(decoder.missing_dependencies)}"
    )


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _first(value) -> float:
    """The first of a multi-valued attribute (Window Center may hold several windows)."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _stored_range(ds) -> tuple[int, int]:
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _honour_bits_stored(arr: np.ndarray, ds) -> np.ndarray:
    """Values of the low Bits Stored bits (sign-extended when signed): ``arr`` itself when
    every bit is stored and unsigned, else int64."""
    bits = int(ds.BitsStored)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if arr.dtype.kind == "u" and not signed and bits >= 8 * arr.dtype.itemsize:
        return arr
    a = arr.astype(np.int64)
    if bits < 64:
        a &= (1 << bits) - 1
        if signed:
            a = np.where(a >= (1 << (bits - 1)), a - (1 << bits), a)
    return a


def window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """PS3.3 C.11.2.1.2: values x through a window, as float64 in [0, 1]."""
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    # LINEAR: width 1 is a threshold at center - 0.5
    if width <= 1:
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _modality(a: np.ndarray, ds) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(a, ds).astype(np.float64)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return a * slope + intercept


def _voi(m: np.ndarray, ds) -> np.ndarray | None:
    """The VOI transform to [0, 1], or None when the file has none (or an unusable one)."""
    if ds.get("VOILUTSequence"):
        from pydicom.pixels import apply_voi

        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        out = apply_voi(np.rint(m).astype(np.int64), ds, index=0)
        return out.astype(np.float64) / float((1 << bits) - 1)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
        if width > 0 and np.isfinite(center) and np.isfinite(width):
            return window(m, center, width, function)
    return None


def decode(data: bytes, named_dicom: bool = False) -> tuple[np.ndarray, str | None] | str:
    """(2-D uint8/uint16 grey levels, note or None) of a DICOM file's bytes, or a reason.

    ``named_dicom``: the file is called ``*.dcm``/``*.dicom``, so it is read even without
    the marker (old files without the 128-byte preamble).
    """
    try:
        import pydicom
        from pydicom.pixels import pixel_array
    except ImportError:
        return "DICOM file, but pydicom is not installed (pip install pydicom)"
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=named_dicom and not has_marker_bytes(data))
    except Exception as e:  # noqa: BLE001 - any parse failure is this file's reason
        return f"corrupt DICOM ({_one_line(e)})"
    if "PixelData" not in ds:
        kind = "float pixel data" if ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds) else "no pixel data"
        return f"DICOM with {kind} (need integer Pixel Data)"
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is not None and tsyntax.is_compressed:
        why = missing_decoder(tsyntax)
        if why:
            return why
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        return "DICOM PALETTE COLOR images are not supported (need MONOCHROME1/2 or RGB)"
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    try:
        arr = pixel_array(ds, index=0 if frames > 1 else None)
    except Exception as e:  # noqa: BLE001 - junk compressed data, a short file, ...
        return f"cannot decode the DICOM pixel data ({_one_line(e)})"
    note = f"multi-frame DICOM ({frames} frames): only the first frame is used" if frames > 1 else None
    if arr.dtype.kind not in "ui":
        return f"unsupported DICOM pixel type {arr.dtype} (need integers)"
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour: luma, as OpenCV does for RGB files
        import cv2

        if arr.dtype not in (np.uint8, np.uint16):
            arr = arr.astype(np.uint16)
        return np.ascontiguousarray(cv2.cvtColor(np.ascontiguousarray(arr[..., :3]), cv2.COLOR_RGB2GRAY)), note
    if arr.ndim != 2 or arr.size == 0:
        return f"unexpected DICOM pixel array shape {arr.shape}"
    try:
        stored = _honour_bits_stored(arr, ds)
        if (
            "ModalityLUTSequence" not in ds
            and not ds.get("VOILUTSequence")
            and not ("WindowCenter" in ds and "WindowWidth" in ds)
        ):
            return _stored_range_levels(stored, ds, photometric == "MONOCHROME1"), note
        m = _modality(stored, ds)
        y = _voi(m, ds)
        windowed = y is not None
        if y is None:
            lo, hi = _stored_range(ds)
            ends = _modality(np.arange(lo, hi + 1, dtype=np.int64), ds)
            low, high = float(ends.min()), float(ends.max())
            y = (m - low) / (high - low) if high > low else np.zeros_like(m)
            y = np.clip(y, 0.0, 1.0)
    except Exception as e:  # noqa: BLE001 - a malformed LUT or attribute
        return f"cannot apply the DICOM grey-level transforms ({_one_line(e)})"
    if photometric == "MONOCHROME1":
        y = 1.0 - y
    if int(ds.BitsStored) <= 8 and not windowed:
        return np.rint(y * 255.0).astype(np.uint8), note
    return np.rint(y * 65535.0).astype(np.uint16), note


def _stored_range_levels(stored: np.ndarray, ds, monochrome1: bool) -> np.ndarray:
    """The common case, fast: no VOI and at most a linear rescale, which cancels out when
    the stored range is mapped to [0, 1] (a negative slope flips it). The same levels as the
    general path (2^bits - 1 is odd, so no value falls on a rounding tie), in one or two
    NumPy passes instead of six (docs/benchmarks.md)."""
    lo, hi = _stored_range(ds)
    flip = monochrome1 != (float(ds.get("RescaleSlope", 1) or 1) < 0)
    top = 255 if int(ds.BitsStored) <= 8 else 65535
    dtype = np.uint8 if top == 255 else np.uint16
    if lo == 0 and hi == top and stored.dtype == dtype:
        out = stored.copy()  # every bit stored: the values are the levels
    else:
        out = np.rint((stored - lo) * (top / (hi - lo))).astype(dtype)
    if flip:
        np.subtract(dtype(top), out, out=out)
    return out
