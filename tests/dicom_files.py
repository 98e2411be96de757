"""Write small DICOM files with pydicom for the tests (no real patient data anywhere).

`write_dicom` stores exactly the integers it is given (uncompressed, explicit VR little
endian, or the junk bytes of a compressed transfer syntax); the tests compute what the
decoder should make of them from the DICOM standard's formulas, not with pydicom.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_dicom(
    path,
    pixels: np.ndarray,
    *,
    bits_stored: int | None = None,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    center=None,
    width=None,
    voi_function: str | None = None,
    voi_lut: tuple | None = None,
    frames: int = 1,
    transfer_syntax: str | None = None,
    junk: bytes | None = None,
    preamble: bool = True,
    uid: str = "1.2.826.0.1.3680043.9.7133.1",
) -> Path:
    """``pixels``: [rows, cols] (or [frames, rows, cols]) integers stored as they are.

    ``voi_lut``: (first mapped value, bits per entry, LUT data). ``junk``: the one
    fragment of encapsulated pixel data for a compressed ``transfer_syntax``.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.asarray(pixels)
    allocated = 8 * pixels.dtype.itemsize
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = UID(uid)
    meta.TransferSyntaxUID = UID(transfer_syntax) if transfer_syntax else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, UID(uid)
    ds.Modality = "DX"
    ds.PatientID = "SYNTHETIC"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored or allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept or 0
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
        if voi_function:
            ds.VOILUTFunction = voi_function
    if voi_lut is not None:
        first, bits, data = voi_lut
        item = Dataset()
        item.LUTDescriptor = [len(data), first, bits]
        item.LUTData = list(int(v) for v in data)
        item["LUTData"].VR = "US"
        ds.VOILUTSequence = [item]
    if junk is not None:
        ds.PixelData = encapsulate([junk])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = np.ascontiguousarray(pixels.astype(pixels.dtype.newbyteorder("<"))).tobytes()
        ds["PixelData"].VR = "OW" if allocated > 8 else "OB"
    ds.save_as(path, enforce_file_format=preamble)
    return path


def xray(rng: np.random.Generator, size: int, sick: bool, bits: int = 12) -> np.ndarray:
    """A chest-X-ray-like picture in ``bits`` (uint16): two lungs, with a blotch if ``sick``."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.55 + 0.1 * rng.standard_normal((size, size))
    for cx in (0.3, 0.7):
        img -= 0.35 * np.exp(-(((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    if sick:
        cx, cy = rng.uniform(0.25, 0.75), rng.uniform(0.35, 0.65)
        img += 0.45 * np.exp(-(((xx - cx) / 0.08) ** 2 + ((yy - cy) / 0.08) ** 2))
    top = (1 << bits) - 1
    return np.clip(np.rint(img * top), 0, top).astype(np.uint16)
