"""Groups of images that must stay on one side of the validation split (a patient, a copy).

Several X-rays of one patient, or two copies of one file, on both sides of a train /
validation split let validation reward memorising a patient instead of recognising the
disease: validation numbers come out too good and settings chosen on them generalise worse.
`group_ids` gives every image a group number; `split.grouped_split` keeps groups whole.

Sources of groups:

* ``--group-pattern REGEX``: searched in each file's path relative to the data folder
  (``PNEUMONIA/person12_virus_3.jpeg``); the first capture group (or the whole match when
  the pattern has none) names the group. A file without a match is a group of its own.
* ``--groups filename-patient``: the chest X-ray naming, ``personNNN_...`` (PNEUMONIA),
  ``IM-NNNN-...`` and ``NORMAL2-IM-NNNN-...`` (NORMAL). ``IM-0383`` and
  ``NORMAL2-IM-0383`` are two numbering series, not one patient: their images are no
  more alike than random pairs of NORMAL images (measured, docs/benchmarks.md), so they
  are kept apart.
* A label file's ``--patient-column`` (`labels.py`): rows with the same non-empty value
  are one group; a row without a value is a group of its own.
* Byte-identical files always join one group when grouping is on (``--groups duplicates``
  does only that). Only files whose size occurs more than once are hashed (SHA-256).

Everything depends only on the file list and contents, so every rank computes the same
groups without communicating.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from mpitrain.config import GROUPINGS  # the --groups choices: one list, in config.py
from mpitrain.errors import UserError

FILENAME_PATIENT = r"(?:^|/)(person\d+)_|(?:^|/)((?:NORMAL2-)?IM-\d+)-"


@dataclass
class Groups:
    ids: np.ndarray  # int64 [n]: group number of each image, numbered by first image
    n_groups: int
    matched: int  # images whose name matched the pattern (0 without a pattern)
    duplicate_sets: int  # sets of >= 2 byte-identical files
    duplicate_files: int  # files in those sets
    source: str  # what was used, for messages

    def describe(self) -> str:
        parts = [f"{self.n_groups:,} groups ({self.source})"]
        if self.source.startswith("--patient-column"):
            parts.append(f"{self.matched:,} of {len(self.ids):,} rows name a patient")
        elif self.source not in ("duplicates",):
            parts.append(f"{self.matched:,} of {len(self.ids):,} file names matched")
        parts.append(f"{self.duplicate_sets} set(s) of identical files")
        return ", ".join(parts)


def compile_pattern(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UserError(f"--group-pattern {pattern!r} is not a valid regular expression: {e}") from None


def pattern_of(groups: str | None, group_pattern: str | None) -> str | None:
    """The regular expression that names patients (None: no names, maybe duplicates only)."""
    if group_pattern:
        return group_pattern
    if groups == "filename-patient":
        return FILENAME_PATIENT
    return None


def relative(path: str, root: str) -> str:
    rel = os.path.relpath(path, root) if root else path
    return rel.replace(os.sep, "/")


def name_keys(paths: list[str], root: str, pattern: str) -> list[str | None]:
    """The group name of each file (None where the pattern does not match)."""
    rx = compile_pattern(pattern)
    out: list[str | None] = []
    for p in paths:
        m = rx.search(relative(p, root))
        if m is None:
            out.append(None)
        elif m.re.groups:
            out.append(next((g for g in m.groups() if g is not None), m.group(0)))
        else:
            out.append(m.group(0))
    return out


def duplicate_sets(paths: list[str]) -> list[list[int]]:
    """Index lists of byte-identical files (only sets of 2 or more), in index order."""
    by_size = defaultdict(list)
    for i, p in enumerate(paths):
        try:
            by_size[os.stat(p).st_size].append(i)
        except OSError:
            continue  # unreadable: the decoder reports it
    by_hash = defaultdict(list)
    for same in by_size.values():
        if len(same) < 2:
            continue
        for i in same:
            try:
                with open(paths[i], "rb") as f:
                    digest = (
                        hashlib.file_digest(f, "sha256").digest()
                        if hasattr(hashlib, "file_digest")
                        else hashlib.sha256(f.read()).digest()
                    )
            except OSError:
                continue
            by_hash[digest].append(i)
    return sorted((sorted(v) for v in by_hash.values() if len(v) > 1), key=lambda v: v[0])


def _digest(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            if hasattr(hashlib, "file_digest"):
                return hashlib.file_digest(f, "sha256").digest()
            return hashlib.sha256(f.read()).digest()
    except OSError:
        return None


def shared_files(train: list[str], val: list[str]) -> int:
    """How many of the `val` files are also training files: the same file (one inode, e.g.
    --val-data naming the training folder: not read) or a byte-identical copy. Only files
    whose size occurs on both sides are hashed, so two unrelated folders cost one stat each."""

    def stats(paths):
        out = []
        for p in paths:
            try:
                st = os.stat(p)
                out.append((st.st_dev, st.st_ino, st.st_size))
            except OSError:
                out.append(None)  # unreadable: the decoder reports it
        return out

    tr_stat, va_stat = stats(train), stats(val)
    inodes = {(s[0], s[1]) for s in tr_stat if s}
    sizes = defaultdict(list)
    for p, s in zip(train, tr_stat):
        if s:
            sizes[s[2]].append(p)
    hashes: dict[int, set] = {}
    same = 0
    for p, s in zip(val, va_stat):
        if s is None:
            continue
        if (s[0], s[1]) in inodes:
            same += 1
        elif s[2] in sizes:
            if s[2] not in hashes:
                hashes[s[2]] = {_digest(q) for q in sizes[s[2]]} - {None}
            same += _digest(p) in hashes[s[2]]
    return same


def _union_find_ids(n: int, links: list[list[int]]) -> np.ndarray:
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for members in links:
        root = find(members[0])
        for m in members[1:]:
            r = find(m)
            if r != root:
                parent[max(r, root)] = min(r, root)
                root = min(r, root)
    roots = [find(i) for i in range(n)]
    # Number groups by their first image, so the numbering depends on the file order only.
    first: dict[int, int] = {}
    return np.array([first.setdefault(r, len(first)) for r in roots], dtype=np.int64)


def group_ids(
    paths: list[str],
    root: str,
    groups: str | None = "none",
    group_pattern: str | None = None,
    patients: list[str | None] | None = None,
    patient_column: str | None = None,
    dups: list[list[int]] | None = None,
) -> Groups | None:
    """Groups of `paths` (None when grouping is off). ``patients``: each path's patient id
    from the label file's ``patient_column`` (None or empty: unknown). ``dups``:
    `duplicate_sets(paths)` when the caller has it already (hashing is the slow part)."""
    pattern = pattern_of(groups, group_pattern)
    if patients is not None:
        if len(patients) != len(paths):
            raise ValueError(f"{len(patients)} patient ids for {len(paths)} paths")
        by_patient = defaultdict(list)
        for i, key in enumerate(patients):
            if key:
                by_patient[key].append(i)
        same_patient = [v for v in by_patient.values() if len(v) > 1]
        dups = duplicate_sets(paths) if dups is None else dups
        ids = _union_find_ids(len(paths), same_patient + dups)
        return Groups(
            ids=ids,
            n_groups=int(ids.max()) + 1 if len(paths) else 0,
            matched=sum(len(v) for v in by_patient.values()),
            duplicate_sets=len(dups),
            duplicate_files=sum(len(d) for d in dups),
            source=f"--patient-column {patient_column}",
        )
    if pattern is None and groups in (None, "none"):
        return None
    if groups not in GROUPINGS:
        raise UserError(f"--groups must be one of {', '.join(GROUPINGS)}, got {groups!r}")
    n = len(paths)
    links: list[list[int]] = []
    matched = 0
    if pattern is not None:
        by_name = defaultdict(list)
        for i, key in enumerate(name_keys(paths, root, pattern)):
            if key is not None:
                by_name[key].append(i)
                matched += 1
        if n and matched == 0:
            example = relative(paths[0], root)
            if not group_pattern:  # the built-in naming (also what --recipe xray sets)
                raise UserError(
                    f"--groups filename-patient found no patient ids (personNNN_, IM-NNNN-, "
                    f"NORMAL2-IM-NNNN-) in the {n:,} file names, e.g. {example!r}: give "
                    f"--group-pattern REGEX for your naming, or --groups duplicates or none"
                )
            raise UserError(
                f"--group-pattern {pattern!r} matches none of the {n:,} file names "
                f"(searched in paths relative to the data folder, e.g. {example!r})"
            )
        links.extend(v for v in by_name.values() if len(v) > 1)
    dups = duplicate_sets(paths) if dups is None else dups
    links.extend(dups)
    ids = _union_find_ids(n, links)
    source = group_pattern and f"--group-pattern '{group_pattern}'" or (groups if groups != "none" else "")
    return Groups(
        ids=ids,
        n_groups=int(ids.max()) + 1 if n else 0,
        matched=matched,
        duplicate_sets=len(dups),
        duplicate_files=sum(len(d) for d in dups),
        source=source,
    )


def shared_groups(ids: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray) -> tuple[int, int]:
    """(validation images whose group also has training images, such groups)."""
    ids = np.asarray(ids)
    both = np.intersect1d(ids[train_idx], ids[val_idx])
    return int(np.isin(ids[val_idx], both).sum()), len(both)
