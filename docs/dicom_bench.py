"""DICOM against PNG: decoding speed and cache-hit speed (docs/benchmarks.md, "DICOM input").

    PYTHONPATH=src:tests python docs/dicom_bench.py /tmp/dcmbench [N_PER_CLASS] [SIDE]

Writes N_PER_CLASS (default 200) chest-X-ray-like images per class of SIDE (512) px once,
as 16-bit DICOM (half MONOCHROME1, stored inverted), RLE Lossless DICOM, 16-bit PNG and
8-bit PNG, then times, per form: `decode_native` at 64 px with 1 and 2 threads (best of
3, files in the page cache) and a cache hit of the whole list (median of 15).
"""

import sys
import time
from pathlib import Path

import cv2
import numpy as np
from dicom_files import write_dicom, xray

from mpitrain.data.cache import load_images_native
from mpitrain.data.decode import decode_native
from mpitrain.data.scan import scan


def make(root: Path, per_class: int, side: int) -> None:
    from pydicom import dcmread
    from pydicom.uid import RLELossless

    if (root / "png8").exists():
        return
    rng = np.random.default_rng(0)
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        for i in range(per_class):
            img = xray(rng, side, sick=bool(label), bits=16)
            mono1 = i % 2 == 1
            dcm = write_dicom(root / "dcm" / cls / f"{i:04d}.dcm", (65535 - img) if mono1 else img,
                              photometric="MONOCHROME1" if mono1 else "MONOCHROME2", uid=f"1.2.3.{label}.{i}")
            ds = dcmread(dcm)
            ds.compress(RLELossless)
            (root / "rle" / cls).mkdir(parents=True, exist_ok=True)
            ds.save_as(root / "rle" / cls / f"{i:04d}.dcm")
            for form, arr in (("png16", img), ("png8", (img >> 8).astype(np.uint8))):
                (root / form / cls).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(root / form / cls / f"{i:04d}.png"), arr)


def main() -> None:
    root = Path(sys.argv[1])
    per_class = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    side = int(sys.argv[3]) if len(sys.argv) > 3 else 512
    make(root, per_class, side)
    print("| form | MB | decode, 1 thread | decode, 2 threads | cache hit (median of 15) |")
    print("|---|---:|---:|---:|---:|")
    for form in ("dcm", "rle", "png16", "png8"):
        paths = scan(root / form).paths
        mb = sum(Path(p).stat().st_size for p in paths) / 1e6
        rates = []
        for threads in (1, 2):
            best = min(_timed(lambda: decode_native(paths, 64, threads, notes=[])) for _ in range(3))
            rates.append(len(paths) / best)
        cache = root / f"cache-{form}"
        load_images_native(paths, 64, cache)  # fill
        hit = sorted(_timed(lambda: load_images_native(paths, 64, cache)) for _ in range(15))[7]
        print(f"| {form} | {mb:.0f} | {rates[0]:,.0f} images/s | {rates[1]:,.0f} images/s | "
              f"{hit * 1e3:.1f} ms = {len(paths) / hit:,.0f} images/s |")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
