"""The run folder's names: every file and folder mpitrain writes into a run folder (``--out``).

Each name has one constant here, and every writer and reader takes it from here (a test
finds any other string literal of these names in ``src/``); "path made in" is the module
that joins the name to the folder for writing. ``mpitrain train --overwrite``
removes exactly these (`remove_all`) and nothing else: a user's own file in the folder stays.
A top-level module, so that every layer can use it (``data/`` writes the skip report,
``evaluate/`` the model's metadata, the figures and the report, ``train/`` the rest).

    name                  when                                      path made in
    model.keras           always: the trained model (Keras 3)       train/command.py
    model.json            always: classes, threshold, image size    evaluate/modelio.py
    config.json           always: the config and runtime facts      train/command.py
    history.csv           always: one row per epoch                 train/command.py
    metrics.json          always: final validation metrics          train/command.py
    classes.json          always: class names in label order        train/command.py
    val_predictions.csv   always: the validation predictions        evaluate/valpreds.py
    report.md             always: the run's report                  evaluate/report.py
    training_curves.png   always: figure of report.md               evaluate/plots.py
    confusion_matrix.png  always: figure of report.md               evaluate/plots.py
    roc_curve.png         always: figure of report.md               evaluate/plots.py
    checkpoints/          always: resumable state                   engine/checkpoint.py
    skipped_files.txt     some images could not be read             data/describe.py
    tb/                   --tensorboard: TensorBoard scalars        train/command.py
    events.jsonl          --elastic: a rank or host was lost        train/runfolder.py
    hostfile              --elastic: the hosts left after a loss    launcher/hostloss.py
    export-savedmodel/    mpitrain export --format savedmodel       evaluate/export.py
    export-tflite/        mpitrain export --format tflite           evaluate/export.py
    .lock                 while a job writes the folder             train/runlock.py
    .mpitrain-write-test  for an instant: is the folder writable    train/runfolder.py

Every file is written under a temporary name (``.tmp-<pid>-<name>``, `mpitrain.atomic`)
and renamed, so an interrupted save never leaves a half-written file under a real name; a
process killed mid-write can leave such a temporary, and `remove_all` takes those too.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from mpitrain.atomic import TMP_PREFIX
from mpitrain.errors import UserError

MODEL = "model.keras"
MODEL_INFO = "model.json"
CONFIG = "config.json"
HISTORY = "history.csv"
METRICS = "metrics.json"
CLASSES = "classes.json"
VAL_PREDICTIONS = "val_predictions.csv"
REPORT = "report.md"
TRAINING_CURVES = "training_curves.png"
CONFUSION_MATRIX = "confusion_matrix.png"
ROC_CURVE = "roc_curve.png"
CHECKPOINTS = "checkpoints"
SKIPPED = "skipped_files.txt"
TENSORBOARD = "tb"
EVENTS = "events.jsonl"
HOSTFILE = "hostfile"
EXPORTS = {"savedmodel": "export-savedmodel", "tflite": "export-tflite"}  # `mpitrain export`'s formats, in order
LOCK = ".lock"
WRITE_PROBE = ".mpitrain-write-test"


@dataclass(frozen=True)
class Entry:
    name: str
    folder: bool = False
    always: bool = False  # every finished training writes it


ENTRIES = (
    Entry(MODEL, always=True),
    Entry(MODEL_INFO, always=True),
    Entry(CONFIG, always=True),
    Entry(HISTORY, always=True),
    Entry(METRICS, always=True),
    Entry(CLASSES, always=True),
    Entry(VAL_PREDICTIONS, always=True),
    Entry(REPORT, always=True),
    Entry(TRAINING_CURVES, always=True),
    Entry(CONFUSION_MATRIX, always=True),
    Entry(ROC_CURVE, always=True),
    Entry(CHECKPOINTS, folder=True, always=True),
    Entry(SKIPPED),
    Entry(TENSORBOARD, folder=True),
    Entry(EVENTS),
    Entry(HOSTFILE),
    *(Entry(name, folder=True) for name in EXPORTS.values()),
    Entry(LOCK),
    Entry(WRITE_PROBE),
)
NAMES = tuple(e.name for e in ENTRIES)
ALWAYS = tuple(e.name for e in ENTRIES if e.always)

# A temporary of `atomic_path`/`atomic_dir` for one of the names (and the "-old" folder an
# export replaced with --overwrite is moved to for a moment).
_STRAY = re.compile(rf"{re.escape(TMP_PREFIX)}\d+-({'|'.join(map(re.escape, NAMES))})(-old)?")


def is_ours(name: str) -> bool:
    """Whether `name` (an entry of a run folder) is one mpitrain writes there."""
    return name in NAMES or _STRAY.fullmatch(name) is not None


def remove_all(run_dir: Path, keep: tuple[str, ...] = (LOCK,)) -> list[str]:
    """Remove every name of the list present in `run_dir` (files and folders, and strays of
    interrupted writes), except `keep` (the lock the caller holds); return what was removed.
    Nothing else in the folder is touched."""
    removed = []
    for entry in sorted(Path(run_dir).iterdir()):
        if entry.name in keep or not is_ours(entry.name):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as e:
            raise UserError(f"--overwrite: cannot remove {entry}: {e.strerror or e}") from None
        removed.append(entry.name)
    return removed


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, hex (export.json names the model.keras it was made from by it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def export_name(fmt: str) -> str:
    """The folder `mpitrain export RUN --format FMT` writes by default, inside RUN."""
    return EXPORTS[fmt]
