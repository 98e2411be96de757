"""Multi-label tables: several findings per image (ChestX-ray14, CheXpert), a 0/1 each.

Labels of multi-label data are float32 ``[n, L]``: 1.0 present, 0.0 absent, NaN masked
out (left out of the loss and the metrics of that label). Single-label data keeps its
integer ``[n]`` class indices, so ``labels.ndim == 2`` (`mpitrain.targets.is_multi_label`) tells the two
apart everywhere. `labels.read_labels` reads a table in one of two forms:

* label columns (``--label-columns A,B,C``, or ``--multi-label``: every column but the
  path and patient ones), each cell 1, 0, -1 (uncertain) or blank, also as pandas writes
  them (1.0, 0.0, -1.0). ``--uncertain`` says what -1 becomes (zeros, ones, ignore),
  ``--blank`` what a blank becomes (zeros, ignore). Irvin et al. 2019 (CheXpert) compare
  these uncertainty policies and find none best for every finding; the default, zeros, is
  the one that treats -1 as a blank is treated (CheXpert's blank: not mentioned), so every
  label counts only what the report asserts as present, and nothing is masked unless asked.
* a findings column (``--findings-column "Finding Labels"``): findings separated by ``|``,
  the ``--no-finding`` value ("No Finding") for none; the labels are the distinct findings,
  sorted.

Any other value, an empty findings cell, or a label column blank (or masked) in every row
is a one-line `UserError` naming the file, the row and the column.
"""

from __future__ import annotations

import numpy as np

from mpitrain.errors import UserError

BLANK = 2  # raw code of a blank cell beside 1, 0 and -1
_RAW = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": -1, "-1.0": -1, "": BLANK}


def raw_value(cell: str, where: str, hint: str = "") -> int:
    """A label cell (stripped) -> 1, 0, -1 or `BLANK`; anything else is a `UserError`."""
    value = _RAW.get(cell)
    if value is not None:
        return value
    try:
        number = float(cell)
    except ValueError:
        number = float("nan")
    if number in (1.0, 0.0, -1.0):  # 1.00, +1, -0
        return int(number)
    raise UserError(f"{where}: {cell!r} is not a label value (1, 0, -1 for uncertain, or blank){hint}")


def apply_policies(raw: np.ndarray, uncertain: str, blank: str) -> np.ndarray:
    """Raw codes [n, L] -> float32 labels: 1 and 0 as they are, -1 and blanks by their policy."""
    out = raw.astype(np.float32)
    mask = {"zeros": 0.0, "ones": 1.0, "ignore": np.nan}
    out[raw == -1] = mask[uncertain]
    out[raw == BLANK] = mask[blank]
    return out


def check_columns_used(raw: np.ndarray, labels: np.ndarray, names: list[str], where: str) -> None:
    """`UserError` for a label column blank, or masked, in every row: it holds no label."""
    for j, name in enumerate(names):
        if len(raw) and (raw[:, j] == BLANK).all():
            raise UserError(
                f"{where}: label column {name!r} is blank in all {len(raw):,} usable rows (not a label column? "
                "name the labels with --label-columns)"
            )
        if len(raw) and np.isnan(labels[:, j]).all():
            raise UserError(
                f"{where}: label column {name!r} has no usable value in {len(raw):,} rows: every one is masked "
                "(uncertain with --uncertain ignore, or blank with --blank ignore)"
            )


def findings_of(cell: str, no_finding: str, where: str, column: str) -> set[str]:
    """A findings cell ("Edema|Effusion", or the no-finding value) -> its set of findings."""
    found = {part.strip() for part in cell.split("|")} - {""}
    if not found:
        raise UserError(f"{where}: empty {column!r} (write {no_finding!r} for an image without findings)")
    if no_finding in found and len(found) > 1:
        raise UserError(f"{where}: {column!r} has {no_finding!r} together with findings ({cell!r})")
    return found - {no_finding}


def findings_matrix(found: list[set[str]], names: list[str]) -> np.ndarray:
    """Float32 [n, L] of 0/1: which of ``names`` each row's findings hold."""
    out = np.zeros((len(found), len(names)), np.float32)
    column = {name: j for j, name in enumerate(names)}
    for i, row in enumerate(found):
        out[i, [column[f] for f in row]] = 1.0
    return out


def positives(labels: np.ndarray) -> np.ndarray:
    """Positives per label (masked entries are none)."""
    return (np.asarray(labels) == 1.0).sum(axis=0).astype(np.int64)


def counts_2xl(labels: np.ndarray) -> np.ndarray:
    """int64 [2, L]: negatives (row 0) and positives (row 1) per label; masked in neither."""
    labels = np.asarray(labels)
    return np.stack([(labels == 0.0).sum(axis=0), (labels == 1.0).sum(axis=0)]).astype(np.int64)
