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
* Multi-label tables (``--label-columns``, ``--multi-label``, ``--findings-column``; their
  values and policies: `findings.py`) give labels float32 [n, L] (NaN: masked) and
  ``classes`` the L label names: the --label-columns as given, the table's own column order
  for --multi-label, the sorted findings for --findings-column. Rows are ordered by path
  (an image has no one class), a row whose path is empty or whose image is missing is
  skipped as above, and every row with a path must hold valid label values. A validation
  table (``class_names``) must hold the training's label columns (any order; read in the
  training's) or findings among the training's labels (a label it never has is all 0).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpitrain.config import NO_FINDING
from mpitrain.data import findings as table_values
from mpitrain.data.scan import FileIndex, check_classes, scan
from mpitrain.errors import UserError


@dataclass(frozen=True)
class Columns:
    """Which columns of a label file hold the path, the class and (optionally) the patient;
    for a multi-label table the label columns (``labels``, or ``all_labels``: every column
    but path and patient) or the ``findings`` column, and the policies of `findings.py`."""

    path: str = "path"
    label: str = "label"
    patient: str | None = None
    labels: tuple[str, ...] | None = None
    all_labels: bool = False
    findings: str | None = None
    no_finding: str = NO_FINDING
    uncertain: str = "zeros"
    blank: str = "zeros"

    @property
    def multi_label(self) -> bool:
        return self.labels is not None or self.all_labels or self.findings is not None

    @classmethod
    def of(cls, opts) -> Columns:
        """The columns a TrainConfig or a parsed command line names (a missing field: its default)."""
        from mpitrain.config import label_column_names

        def get(name: str, default=None):
            value = getattr(opts, name, default)
            return default if value is None else value

        names = getattr(opts, "label_columns", None)
        return cls(
            get("path_column", "path"),
            get("label_column", "label"),
            getattr(opts, "patient_column", None),
            labels=None if names is None else tuple(label_column_names(names)),
            all_labels=bool(getattr(opts, "multi_label", False)),
            findings=getattr(opts, "findings_column", None),
            no_finding=get("no_finding", NO_FINDING),
            uncertain=get("uncertain", "zeros"),
            blank=get("blank", "zeros"),
        )


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


def _cell(row: list[str], i: int | None) -> str:
    return row[i].strip() if i is not None and i < len(row) else ""


def _patient(header: list[str], columns: Columns, csv_path: str) -> int | None:
    return None if columns.patient is None else _column(header, columns.patient, "--patient-column", csv_path)


def _need_rows(rows: list[list[str]], csv_path: str) -> None:
    if not rows:
        raise UserError(f"labels file {csv_path} has a header but no rows")


def _kept_rows(
    csv_path: str, rows: list[list[str]], ip: int, ipat: int | None, columns: Columns, label_of
) -> tuple[dict[str, tuple], list[tuple[str, str]]]:
    """{full path: (label, patient, row number)} of the usable rows, and the skipped rows
    (path, reason). ``label_of(row, number)``: the row's label, None for an empty label cell."""
    base, name = os.path.dirname(csv_path), os.path.basename(csv_path)
    kept: dict[str, tuple] = {}
    skipped: list[tuple[str, str]] = []
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        given = _cell(row, ip)
        where = f"{name} row {number}"
        if not given:
            skipped.append((where, f"{where}: empty {columns.path!r}"))
            continue
        full = os.path.abspath(os.path.join(base, os.path.expanduser(given)))
        label = label_of(row, number)
        if label is None:
            skipped.append((full, f"{where}: empty {columns.label!r}"))
            continue
        if full in kept:
            raise UserError(f"labels file {csv_path} lists {given} twice (rows {kept[full][2]} and {number})")
        if not os.path.lexists(full):
            skipped.append((full, f"{where}: no such file"))
            continue
        kept[full] = (label, _cell(row, ipat) or None, number)
    return kept, skipped


def read_labels(csv_path, columns: Columns = Columns(), class_names: list[str] | None = None) -> FileIndex:
    """The images listed in ``csv_path``; see the module docstring for the rules.

    ``class_names`` (the training classes, for a validation table) must equal the classes
    found, as for `scan`.
    """
    csv_path = os.path.abspath(os.path.expanduser(os.fspath(csv_path)))
    header, rows = _open_table(csv_path)
    ip = _column(header, columns.path, "--path-column", csv_path)
    if columns.multi_label:
        return _read_multi_label(csv_path, header, rows, ip, columns, class_names)
    il = _column(header, columns.label, "--label-column", csv_path)
    ipat = _patient(header, columns, csv_path)
    _need_rows(rows, csv_path)
    kept, skipped = _kept_rows(csv_path, rows, ip, ipat, columns, lambda row, number: _cell(row, il) or None)
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
        Path(os.path.dirname(csv_path)),
        classes,
        order,
        np.array([label_of[kept[p][0]] for p in order], np.int64),
        patients=patients,
        skipped=skipped,
        source=csv_path,
    )


def _label_names(header: list[str], columns: Columns, csv_path: str, class_names: list[str] | None) -> list[str]:
    """The label columns of a --label-columns / --multi-label table, in label order."""
    if columns.labels is not None:
        return list(columns.labels)
    others = [c for c in header if c not in (columns.path, columns.patient)]
    if not others:
        raise UserError(
            f"labels file {csv_path} has no column besides --path-column {columns.path!r}"
            + (f" and --patient-column {columns.patient!r}" if columns.patient else "")
            + ": --multi-label needs label columns"
        )
    if class_names is None:
        return others
    if set(others) != set(class_names):  # a validation table: the training's labels, any order
        check_classes(csv_path, others, class_names, "label columns")
    return list(class_names)


def _read_multi_label(
    csv_path: str, header: list[str], rows: list[list[str]], ip: int, columns: Columns, class_names
) -> FileIndex:
    """`read_labels` of a multi-label table (labels float32 [n, L], rows by path)."""
    where = f"labels file {csv_path}"
    if columns.findings is not None:
        ifind = _column(header, columns.findings, "--findings-column", csv_path)
        ipat = _patient(header, columns, csv_path)
        _need_rows(rows, csv_path)

        def findings(row, number):
            cell = _cell(row, ifind)
            return table_values.findings_of(cell, columns.no_finding, f"{where} row {number}", columns.findings)

        kept, skipped = _kept_rows(csv_path, rows, ip, ipat, columns, findings)
        order = sorted(kept)
        found = [kept[p][0] for p in order]
        seen = set().union(*found)
        if class_names is not None and seen - set(class_names):
            raise UserError(
                f"{where} has findings that are no training label: {', '.join(sorted(seen - set(class_names)))} "
                f"(training labels: {', '.join(class_names)})"
            )
        names = list(class_names) if class_names is not None else sorted(seen)
        if order and not names:
            raise UserError(f"{where} has no finding besides {columns.no_finding!r} in {len(order):,} usable rows")
        labels = table_values.findings_matrix(found, names)
    else:
        names = _label_names(header, columns, csv_path, class_names)
        option = "--label-columns" if columns.labels is not None else "--multi-label"
        at = [_column(header, n, option, csv_path) for n in names]
        ipat = _patient(header, columns, csv_path)
        _need_rows(rows, csv_path)
        hint = (
            ""
            if columns.labels is not None
            else " (--multi-label reads every column but --path-column and --patient-column: "
            "name the label columns with --label-columns)"
        )

        def values(row, number):
            return [
                table_values.raw_value(_cell(row, i), f"{where} row {number}, column {n!r}", hint)
                for i, n in zip(at, names)
            ]

        kept, skipped = _kept_rows(csv_path, rows, ip, ipat, columns, values)
        order = sorted(kept)
        raw = np.array([kept[p][0] for p in order], np.int8).reshape(len(order), len(names))
        labels = table_values.apply_policies(raw, columns.uncertain, columns.blank)
        table_values.check_columns_used(raw, labels, names, where)
    if not order:
        usable = f" ({len(skipped):,} row(s) skipped, e.g. {skipped[0][1]})" if skipped else ""
        raise UserError(f"{where} has no usable rows{usable}")
    return FileIndex(
        Path(os.path.dirname(csv_path)),
        names,
        order,
        labels,
        patients=[kept[p][1] for p in order] if columns.patient is not None else None,
        skipped=skipped,
        source=csv_path,
    )


def index_of(data, labels=None, columns: Columns = Columns(), class_names: list[str] | None = None) -> FileIndex:
    """The images of a class-folder layout (``data``) or of a label file (``labels``)."""
    if labels is not None:
        return read_labels(labels, columns, class_names)
    return scan(data, class_names)
