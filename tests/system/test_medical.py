"""Medical inputs end to end: a folder of DICOM X-rays trains on 2 ranks, evaluates and is
described; a label file trains bit-identically to the class folders it lists."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dicom_files import write_dicom, xray

pytestmark = pytest.mark.timeout(600)
pytest.importorskip("pydicom")

PER_CLASS = 16


def _main(*argv) -> tuple[int, str, str]:
    from mpitrain.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def dicom_xrays(tmp_path_factory) -> Path:
    """16-bit DICOM X-rays, NORMAL / PNEUMONIA: half MONOCHROME1 (stored inverted), some
    without an extension, 12 and 16 bits stored; plus a JPEG-LS file with junk data and a
    multi-frame file."""
    from pydicom.uid import JPEGLSLossless

    root = tmp_path_factory.mktemp("dicom") / "xrays"
    rng = np.random.default_rng(0)
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        for i in range(PER_CLASS):
            bits = 16 if i % 3 else 12
            img = xray(rng, 40, sick=bool(label), bits=bits)
            mono1 = i % 2 == 1
            stored = ((1 << bits) - 1 - img) if mono1 else img
            name = f"{cls[0]}{i:03d}" + ("" if i % 4 == 3 else ".dcm")
            write_dicom(
                root / cls / name,
                stored.astype(np.uint16),
                bits_stored=bits,
                photometric="MONOCHROME1" if mono1 else "MONOCHROME2",
                uid=f"1.2.3.{label}.{i}",
            )
    write_dicom(
        root / "NORMAL" / "zz-multiframe.dcm",
        np.stack([xray(rng, 40, False)] * 2),
        bits_stored=12,
        frames=2,
        uid="1.2.3.9.1",
    )
    write_dicom(
        root / "PNEUMONIA" / "zz-jpegls.dcm",
        xray(rng, 40, True),
        transfer_syntax=JPEGLSLossless,
        junk=b"\xff\xd8not jpeg-ls" * 4,
        uid="1.2.3.9.2",
    )
    return root


def test_dicom_xrays_train_on_two_ranks_then_evaluate_and_describe(dicom_xrays, tmp_path):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    jpegls_skipped = not get_decoder(JPEGLSLossless).is_available
    usable = 2 * PER_CLASS + 1 + (0 if jpegls_skipped else 1)
    cache = tmp_path / "cache"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", MPITRAIN_CACHE_DIR=str(cache))
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mpitrain",
            "train",
            "-n",
            "2",
            "--data",
            str(dicom_xrays),
            "--model",
            "tiny",
            "--image-size",
            "16",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--val-split",
            "0.25",
            "--threads",
            "1",
            "--out",
            str(run),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = json.loads((run / "config.json").read_text())["runtime"]
    assert config["ranks"] == 2 and config["classes"] == ["NORMAL", "PNEUMONIA"]
    loaded = re.search(r"loaded (\d+) train \+ (\d+) val images", proc.stdout)
    assert loaded and int(loaded[1]) + int(loaded[2]) == usable, proc.stdout
    assert json.loads((run / "metrics.json").read_text())["n_samples"] == int(loaded[2])
    assert "only the first frame is used" in proc.stderr
    if jpegls_skipped:
        skipped = (run / "skipped_files.txt").read_text().splitlines()
        assert len(skipped) == 1 and skipped[0].startswith(str(dicom_xrays / "PNEUMONIA" / "zz-jpegls.dcm"))
        assert "JPEG-LS" in skipped[0] and "python-gdcm" in skipped[0]

    # evaluate the run on a label file of the same images (its own cache miss: other lists)
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "finding"])
        for cls in ("PNEUMONIA", "NORMAL"):
            for p in sorted((dicom_xrays / cls).iterdir()):
                w.writerow([os.path.relpath(p, tmp_path), cls])
        w.writerow(["xrays-gone/x.dcm", "NORMAL"])
    code, out, err = _main(
        "evaluate",
        "--model",
        run,
        "--labels",
        table,
        "--path-column",
        "file",
        "--label-column",
        "finding",
        "--json",
        tmp_path / "eval.json",
        "--cache-dir",
        cache,
    )
    assert code == 0, err
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["n_samples"] == usable and result["data"] == str(table)
    reasons = [r for _, r in result["skipped_files"]]
    assert reasons[0] == f"labels.csv row {2 * PER_CLASS + 4}: no such file"
    assert len(reasons) == 1 + jpegls_skipped

    # `mpitrain data`: counts, the skipped files with their reasons, load speed
    code, out, err = _main("data", "--data", dicom_xrays, "--image-size", 16, "--cache-dir", tmp_path / "c2")
    assert code == 0, err
    assert f"NORMAL     {PER_CLASS + 1}" in out and f"images:         {2 * PER_CLASS + 2}" in out
    assert "load:" in out and "images/s (cache miss" in out and "reload:" in out
    if jpegls_skipped:
        assert f"skipped:        1 file(s), {usable} usable" in out
        assert "zz-jpegls.dcm: DICOM transfer syntax JPEG-LS" in out


def _copy_as_table(src: Path, dst: Path) -> Path:
    """The class-folder images copied flat into dst/img (one name per image) plus a label
    file listing them, rows in reverse order."""
    rows = []
    for cls in sorted(p.name for p in src.iterdir() if p.is_dir()):
        for p in sorted((src / cls).iterdir()):
            (dst / "img").mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst / "img" / f"{cls}--{p.name}")
            rows.append([f"img/{cls}--{p.name}", cls])
    with open(dst / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "path"])
        w.writerows([[c, p] for p, c in reversed(rows)])
    return dst / "labels.csv"


def _columns(path: Path, drop=("seconds", "images_per_second", "images/s", "time")) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in row.items() if not any(d in k for d in drop)} for row in csv.DictReader(f)]


def test_a_label_file_trains_bit_identically_to_its_class_folders(synth_data, tmp_path):
    table = _copy_as_table(synth_data, tmp_path / "tabled")
    common = [
        "--model",
        "tiny",
        "--image-size",
        16,
        "--epochs",
        2,
        "--batch-size",
        8,
        "--seed",
        4,
        "--threads",
        1,
        "--groups",
        "duplicates",
    ]
    code, _, err = _main("train", "--data", synth_data, *common, "--out", tmp_path / "folder")
    assert code == 0, err
    code, _, err = _main("train", "--labels", table, *common, "--out", tmp_path / "table")
    assert code == 0, err
    a, b = (json.loads((tmp_path / r / "config.json").read_text())["runtime"] for r in ("folder", "table"))
    assert a["checksum"] and a["checksum"] == b["checksum"]
    assert b["data_dir"] == str(table) and a["grouping"] == b["grouping"]
    history = [_columns(tmp_path / r / "history.csv") for r in ("folder", "table")]
    assert len(history[0]) == 2 and history[0] == history[1]
    preds = [
        [
            {k: v for k, v in row.items() if k.startswith("p_") or k == "label"}
            for row in _columns(tmp_path / r / "val_predictions.csv")
        ]
        for r in ("folder", "table")
    ]
    assert preds[0] == preds[1]
