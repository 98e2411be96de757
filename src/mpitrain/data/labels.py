"""Label files: a CSV that lists images and their classes, instead of one folder per class.

Medical data sets often come as one folder of images (DICOM from a PACS export) and a
table from the hospital system: file, finding, patient. `read_labels` turns such a table
into the same `FileIndex` that `scan` makes from class folders, so the split, the shards,
the cache and everything after them work unchanged. Rules:

* The first row names the columns; ``--path-column`` (default ``path``) holds the image
  path, relative to the CSV's own folder or absolute, ``--label-column`` (default
  ``label``) the class, and the optional ``--patient-column`` a patient id: images of one
  patient stay on one side of ``--val-split`` (the grouped split of `groups.py` /
  `split.py`; byte-identical files are merged into one group as well). Comma, semicolon
  and tab separated files are recognised; a UTF-8 byte-order mark (Excel) is ignored.
* Classes are the distinct labels, sorted; images are ordered by class, then path: the
  order of the rows does not matter, and a table listing the files of a class-folder
  layout gives exactly that layout's plan (same files, labels and split for a seed).
* A row whose image does not exist, or whose path or label is empty, is skipped and listed
  with its reason (row number included) like an unreadable image; an image that exists
  but cannot be decoded is the decoder's skip, as for folders.
* One-line `UserError`s: no such file, an unknown column (the columns are named), no rows,
  fewer than 2 classes, a path listed twice.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpitrain.data.scan import FileIndex, check_classes, scan
from mpitrain.errors import UserError


@dataclass(frozen=True)
class Columns:
    """Which columns of a label file hold the path, the class and (optionally) the patient."""

    path: str = "path"
    label: str = "label"
    patient: str | None = None


def _open_table(csv_path: str) -> tuple[list[str], list[list[str]]]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"labels file {csv_path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"labels file {csv_path} is a folder, not a CSV file") from None
    except UnicodeDecodeError:
        raise UserError(f"labels file {csv_path} is not UTF-8 text (a CSV file is needed)") from None
    except OSError as e:
        raise UserError(f"cannot read labels file {csv_path}: {e.strerror or e}") from None
    try:
        dialect = csv.Sniffer().sniff(text[:8192], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    rows = [r for r in csv.reader(text.splitlines(), dialect) if any(c.strip() for c in r)]
    if not rows:
        raise UserError(f"labels file {csv_path} is empty (need a header row and one row per image)")
    return [c.strip() for c in rows[0]], rows[1:]


def _column(header: list[str], name: str, option: str, csv_path: str) -> int:
    if name not in header:
        raise UserError(
            f"labels file {csv_path} has no column {name!r} (columns: {', '.join(header)}); choose one with {option}"
        )
    return header.index(name)


def read_labels(csv_path, columns: Columns = Columns(), class_names: list[str] | None = None) -> FileIndex:
    """The images listed in ``csv_path``; see the module docstring for the rules.

    ``class_names`` (the training classes, for a validation table) must equal the classes
    found, as for `scan`.
    """
    csv_path = os.path.abspath(os.path.expanduser(os.fspath(csv_path)))
    header, rows = _open_table(csv_path)
    ip = _column(header, columns.path, "--path-column", csv_path)
    il = _column(header, columns.label, "--label-column", csv_path)
    ipat = None if columns.patient is None else _column(header, columns.patient, "--patient-column", csv_path)
    if not rows:
        raise UserError(f"labels file {csv_path} has a header but no rows")
    base = os.path.dirname(csv_path)
    name = os.path.basename(csv_path)
    kept: dict[str, tuple[str, str | None, int]] = {}  # full path -> (label, patient, row number)
    skipped: list[tuple[str, str]] = []

    def cell(row: list[str], i: int | None) -> str:
        return row[i].strip() if i is not None and i < len(row) else ""

    for number, row in enumerate(rows, start=2):  # row 1 is the header
        given, label = cell(row, ip), cell(row, il)
        where = f"{name} row {number}"
        if not given:
            skipped.append((where, f"{where}: empty {columns.path!r}"))
            continue
        full = os.path.abspath(os.path.join(base, os.path.expanduser(given)))
        if not label:
            skipped.append((full, f"{where}: empty {columns.label!r}"))
            continue
        if full in kept:
            raise UserError(f"labels file {csv_path} lists {given} twice (rows {kept[full][2]} and {number})")
        if not os.path.lexists(full):
            skipped.append((full, f"{where}: no such file"))
            continue
        kept[full] = (label, cell(row, ipat) or None, number)
    classes = sorted({label for label, _, _ in kept.values()})
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        usable = f" ({len(skipped):,} row(s) skipped, e.g. {skipped[0][1]})" if skipped else ""
        raise UserError(f"labels file {csv_path} has {found} as usable class{usable}; need at least 2 classes")
    check_classes(csv_path, classes, class_names)
    label_of = {c: i for i, c in enumerate(classes)}
    order = sorted(kept, key=lambda p: (label_of[kept[p][0]], p))
    patients = [kept[p][1] for p in order] if columns.patient is not None else None
    return FileIndex(
        Path(base),
        classes,
        order,
        np.array([label_of[kept[p][0]] for p in order], np.int64),
        patients=patients,
        skipped=skipped,
        source=csv_path,
    )


def index_of(data, labels=None, columns: Columns = Columns(), class_names: list[str] | None = None) -> FileIndex:
    """The images of a class-folder layout (``data``) or of a label file (``labels``)."""
    if labels is not None:
        return read_labels(labels, columns, class_names)
    return scan(data, class_names)
