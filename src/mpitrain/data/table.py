"""`mpitrain labels`: a label table (CSV) from a class-folder layout, classes read from names.

Some data sets say more in their file names than in their folders: the chest X-rays of
Kermany et al. keep bacterial and viral pneumonia in one ``PNEUMONIA`` folder, but name
them ``person1_bacteria_1.jpeg`` and ``person1_virus_6.jpeg``. ``--class-pattern REGEX``
is searched in each file's path relative to the data folder; where it matches, the first
capture group (or the whole match) is the file's class, elsewhere the class folder is::

    mpitrain labels --data chest_xray/train --class-pattern '_(bacteria|virus)_' \\
        --groups filename-patient --out train3.csv        # NORMAL, bacteria, virus

The table has the columns ``path`` (relative to the table's folder), ``label`` and, with
``--groups filename-patient`` or ``--group-pattern REGEX`` (`groups.py`), ``patient``: give
it to ``train``/``evaluate`` with ``--labels FILE --patient-column patient``. Rows come in the
scan's order (class folder, then path), so the same folder always gives the same file.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections import Counter
from pathlib import Path

from mpitrain.errors import UserError


def class_of(rel: str, folder_class: str, rx: re.Pattern | None) -> str:
    m = rx.search(rel) if rx is not None else None
    if m is None:
        return folder_class
    return next((g for g in m.groups() if g), m.group(0)) if m.re.groups else m.group(0)


def make_table(
    data: str, out: str, class_pattern: str | None, groups: str | None = None, group_pattern: str | None = None
) -> dict:
    """Write the table; returns what the command reports (counts per class, patients)."""
    from mpitrain.data.groups import name_keys, pattern_of, relative
    from mpitrain.data.scan import scan

    try:
        rx = re.compile(class_pattern) if class_pattern else None
    except re.error as e:
        raise UserError(f"--class-pattern {class_pattern!r} is not a valid regular expression: {e}") from None
    target = Path(out)
    if target.is_dir() or not target.resolve().parent.is_dir():
        raise UserError(f"--out {out}: need a file in an existing folder")
    index = scan(data)
    root = str(index.root)
    rels = [relative(p, root) for p in index.paths]
    labels = [class_of(r, index.classes[int(y)], rx) for r, y in zip(rels, index.labels)]
    matched = sum(lab != index.classes[int(y)] for lab, y in zip(labels, index.labels))
    if rx is not None and matched == 0:
        raise UserError(
            f"--class-pattern {class_pattern!r} matches none of the {len(rels):,} file names "
            f"(searched in paths relative to the data folder, e.g. {rels[0]!r})"
        )
    pattern = pattern_of(groups, group_pattern)
    patients = name_keys(index.paths, root, pattern) if pattern else None
    base = target.resolve().parent
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label"] + (["patient"] if patients is not None else []))
    for i, (path, label) in enumerate(zip(index.paths, labels)):
        rel = os.path.relpath(path, base).replace(os.sep, "/")
        w.writerow([rel, label] + ([patients[i] or ""] if patients is not None else []))
    from mpitrain.atomic import write_atomic

    write_atomic(target, buf.getvalue(), errors="surrogateescape")
    counts = Counter(labels)
    return {
        "images": len(labels),
        "classes": {c: counts[c] for c in sorted(counts)},
        "from_pattern": matched,
        "patients": len({p for p in patients if p}) if patients is not None else None,
        "unnamed": sum(1 for p in patients if not p) if patients is not None else None,
    }


def summary(out: str, facts: dict) -> str:
    classes = ", ".join(f"{c} {n:,}" for c, n in facts["classes"].items())
    line = f"wrote {out}: {facts['images']:,} images, {len(facts['classes'])} classes ({classes})"
    if facts["from_pattern"]:
        line += f"; {facts['from_pattern']:,} classes from --class-pattern, the rest from the folders"
    if facts["patients"] is not None:
        line += f"; patient column: {facts['patients']:,} patients"
        line += f", {facts['unnamed']:,} images without one" if facts["unnamed"] else ""
    return line
