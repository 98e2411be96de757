"""The run folder: what a finished training leaves behind (written by rank 0 only).

    model.keras    the trained model (Keras 3 format)
    config.json    the full config, runtime facts (ranks, threads) and package versions
    history.csv    one row per epoch
    metrics.json   final validation metrics
    classes.json   class names in label order

Every file is written to a temporary name and renamed, so an interrupted save never
leaves a half-written file under a real name.
"""

from __future__ import annotations

import csv
import io
import shutil
import time
from pathlib import Path

from mpitrain.atomic import atomic_path, write_atomic
from mpitrain.errors import UserError

RUN_FILES = ("model.keras", "model.json", "config.json", "history.csv", "metrics.json",
             "classes.json", "skipped_files.txt", "report.md", "training_curves.png",
             "confusion_matrix.png", "roc_curve.png", "events.jsonl")


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def prepare(out: str | None, overwrite: bool, resume: bool = False) -> Path:
    """Check (and create) the run folder before any training starts."""
    path = Path(out) if out else default_run_dir()
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"--out {path} is not empty; pass --overwrite or choose another folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".mpitrain-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out {path} is not writable: {e.strerror or e}") from None
    if overwrite and not resume:
        for name in RUN_FILES:
            (path / name).unlink(missing_ok=True)
        # Old checkpoints would otherwise be taken for this run's by a later --resume.
        shutil.rmtree(path / "checkpoints", ignore_errors=True)
    return path


def write_history(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    if history:
        # Every column of any row (a run resumed from an older version may add columns).
        names = list(dict.fromkeys(k for row in history for k in row))
        writer = csv.DictWriter(buf, fieldnames=names, restval="")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in history)
    write_atomic(path, buf.getvalue())


def save_model(path: Path, model) -> None:
    with atomic_path(path) as tmp:  # keeps the .keras suffix Keras wants
        model.save(tmp)
