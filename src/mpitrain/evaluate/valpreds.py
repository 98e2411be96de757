"""``val_predictions.csv``: the validation predictions a run's threshold was chosen on.

Written by rank 0 at the end of training, beside ``model.keras``, one row per validation
image in the plan's order::

    path, label, p_<class 1>, ..., p_<class k>

or, for a multi-label run, ``path, <label 1>, ..., <label L>, p_<label 1>, ..., p_<label L>``
with 1, 0, or an empty cell for an entry masked out of training and the metrics.

Probabilities are written exactly (shortest round-trip decimal of the float32 value), so a
threshold chosen again from the file equals the one in ``model.json``. An ensemble of runs
validated on the same images (same data, ``--val-split`` and ``--split-seed``) chooses its
one threshold on the average of these rows (`evaluate.ensemble`).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpitrain.errors import UserError
from mpitrain.runfiles import VAL_PREDICTIONS


@dataclass
class ValPredictions:
    paths: list[str]
    labels: np.ndarray  # class index per row; multi-label: [n, L] (NaN: masked)
    probs: np.ndarray  # float32 [n, k]


def write(out: Path, paths: list[str], labels, probs, classes: list[str]) -> Path:
    from mpitrain.atomic import write_atomic
    from mpitrain.evaluate.modelio import exact

    buf = io.StringIO()
    w = csv.writer(buf)
    if np.ndim(labels) == 2:  # multi-label: a column per label (1, 0, empty: masked), then p_<label>
        w.writerow(["path", *classes] + [f"p_{c}" for c in classes])
        for path, y, row in zip(paths, np.asarray(labels, np.float32), np.asarray(probs, np.float32)):
            w.writerow([path] + ["" if np.isnan(v) else str(int(v)) for v in y] + [exact(p) for p in row])
        return write_atomic(Path(out) / VAL_PREDICTIONS, buf.getvalue(), errors="surrogateescape")
    w.writerow(["path", "label"] + [f"p_{c}" for c in classes])
    for path, y, row in zip(paths, np.asarray(labels).tolist(), np.asarray(probs, np.float32)):
        w.writerow([path, classes[int(y)]] + [exact(p) for p in row])
    return write_atomic(Path(out) / VAL_PREDICTIONS, buf.getvalue(), errors="surrogateescape")


def read(run_dir: Path, classes: list[str]) -> ValPredictions | None:
    """The run's validation predictions, or None when the run has none (older runs)."""
    path = Path(run_dir) / VAL_PREDICTIONS
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows = list(csv.reader(f))
        body = rows[1:]
        if rows[0] == ["path", *classes] + [f"p_{c}" for c in classes]:  # a multi-label run's
            return _read_multilabel(body, len(classes))
        if rows[0] != ["path", "label"] + [f"p_{c}" for c in classes]:
            raise ValueError("its columns are not those of the model's classes")
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[r[1]] for r in body], dtype=np.int64)
        probs = np.array([[float(v) for v in r[2:]] for r in body], dtype=np.float32).reshape(len(body), len(classes))
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    return ValPredictions([r[0] for r in body], labels, probs)


def _read_multilabel(body: list[list[str]], k: int) -> ValPredictions:
    """Rows of a multi-label run: labels [n, L] (an empty cell: NaN, masked), probabilities [n, L]."""
    labels = np.array([[float(v) if v != "" else np.nan for v in r[1 : 1 + k]] for r in body], np.float32)
    probs = np.array([[float(v) for v in r[1 + k :]] for r in body], dtype=np.float32)
    return ValPredictions([r[0] for r in body], labels.reshape(len(body), k), probs.reshape(len(body), k))
