"""`mpitrain data`: what a user wants to know about an image folder before training.

`describe_data` scans the folder (or reads the label file, `labels.py`; and an optional
validation folder or label file), decodes every image
once through the cache and prints an aligned report: the classes with counts and shares,
the imbalance, skipped files (listed in ``skipped_files.txt`` in the cache folder, never
beside the data), the image size, how long loading took, hit or miss, and byte-identical
duplicate files (listed in ``duplicate_files.txt`` there).

The cache it fills is the one `train` and `evaluate` read: it decodes each folder whole,
and their shards take their rows from that entry (see `mpitrain.data.cache`).

It also looks for groups that a validation split must keep whole (`groups.py`): the
groups asked for (``--groups``, ``--group-pattern``), or else patient ids in the file names
(the chest X-ray naming) and byte-identical files. When an image-by-image ``--val-split``
would put images of one group on both sides, it says how many validation images would
share a group with training, and what the grouped split gives instead.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mpitrain.atomic import write_atomic
from mpitrain.data.cache import default_cache_dir, load_images_cached
from mpitrain.data.findings import positives
from mpitrain.data.groups import duplicate_sets
from mpitrain.data.labels import Columns, index_of
from mpitrain.data.scan import FileIndex
from mpitrain.runfiles import SKIPPED
from mpitrain.runtime import available_cores
from mpitrain.targets import is_multi_label

DUPLICATES_NAME = "duplicate_files.txt"


def _one_line(text) -> str:
    return str(text).replace("\t", " ").replace("\r", " ").replace("\n", " ")


def write_skip_report(errors: list[tuple[str, str]], dest_dir: Path) -> Path:
    """Write ``path<TAB>reason`` lines to ``dest_dir/skipped_files.txt``; return its path."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    report = dest / SKIPPED
    lines = [f"{_one_line(path)}\t{_one_line(reason)}\n" for path, reason in errors]
    return write_atomic(report, "".join(lines), errors="surrogateescape")


def skip_warning(errors, report_path) -> str:
    """The one warning line about skipped files, pointing at the full list."""
    n = len(errors)
    return f"warning: skipped {n} unreadable file{'s' if n != 1 else ''} (list in {report_path})"


def _rows(index: FileIndex) -> list[tuple[str, str, str]]:
    """Each class, its images and share; multi-label: each label, its positives and the share
    of images that have it."""
    counts = index.counts()
    total = len(index) if is_multi_label(index.labels) else sum(counts.values())
    return [(name, f"{c:,}", f"{100.0 * c / total:5.1f}%") for name, c in counts.items()]


def _table(rows: list[tuple[str, str, str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return [f"{indent}{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]


def _load(label: str, index: FileIndex, image_size, cache_dir: Path, line, channels: int = 1) -> list:
    t0 = time.perf_counter()
    _, ok, errors, hit = load_images_cached(index.paths, image_size, cache_dir, channels=channels)
    seconds = time.perf_counter() - t0
    rate = len(index.paths) / seconds if seconds > 0 else float("inf")
    line(
        f"{label}load",
        f"{seconds:.2f} s, {rate:,.0f} images/s "
        f"(cache {'hit' if hit else 'miss'}, {len(ok):,} files, "
        f"{available_cores()} threads)",
    )
    if not hit:  # show what the next run will pay, too: the cached load
        t0 = time.perf_counter()
        load_images_cached(index.paths, image_size, cache_dir, channels=channels)
        seconds = time.perf_counter() - t0
        rate = len(index.paths) / seconds if seconds > 0 else float("inf")
        line(f"{label}reload", f"{seconds:.2f} s, {rate:,.0f} images/s (from the cache)")
    return errors


def image_line(image_size, channels: int, colour: tuple[int, int] = (0, 0)) -> str:
    """How images are decoded at this size and channel count (said once, not per file);
    `colour`: (colour files, files sniffed) for grey, the conversion said only if any."""
    from mpitrain.config import image_shape

    h, w = image_shape(image_size)
    size = f"{w} x {h}" + ("" if h == w else " (width x height)")
    if channels == 1 and colour[0]:
        return (
            f"{size}, grayscale ({colour[0]} of {colour[1]} sampled images are colour, "
            f"converted to luma: --channels 3 keeps colour)"
        )
    if channels == 1:
        return f"{size}, grayscale"
    return f"{size}, colour: 3 channels (RGB; grey images replicated)"


def find_duplicates(paths: list[str]) -> list[list[str]]:
    """Groups (2 or more, in ``paths`` order) of byte-identical files (`groups.duplicate_sets`:
    only files that share their size with another are read and hashed)."""
    return [[paths[i] for i in s] for s in duplicate_sets(paths)]


def _duplicate_lines(
    groups: list[list[str]], roots: list[Path], seconds: float, dest: Path, line, out, val_paths: set[str]
) -> None:
    """The few report lines about byte-identical files; the whole list goes to ``dest``."""
    if not groups:
        line("duplicates", f"none (byte-identical files; checked in {seconds:.2f} s)")
        return

    def short(p: str) -> str:  # from the data folder's own name on: train/NORMAL/a.jpeg
        for root in roots:
            if p.startswith(str(root) + os.sep):
                return os.path.relpath(p, root.parent)
        return p

    try:
        listed = write_atomic(
            dest / DUPLICATES_NAME, "".join("\t".join(g) + "\n" for g in groups), errors="surrogateescape"
        )
    except OSError:
        listed = write_atomic(
            Path(tempfile.gettempdir()) / "mpitrain" / DUPLICATES_NAME,
            "".join("\t".join(g) + "\n" for g in groups),
            errors="surrogateescape",
        )
    files = sum(len(g) for g in groups)
    line(
        "duplicates",
        f"{len(groups):,} group(s) of byte-identical files: {files:,} files, "
        f"{files - len(groups):,} redundant copies (checked in {seconds:.2f} s); list in {listed}",
    )
    for g in groups[:3]:
        print("  " + " = ".join(short(p) for p in g), file=out)
    if len(groups) > 3:
        print(f"  ... and {len(groups) - 3:,} more", file=out)
    across = sum(1 for g in groups if val_paths and 0 < sum(p in val_paths for p in g) < len(g))
    if val_paths:
        print(f"  {across:,} group(s) span the training and the validation folder", file=out)
    else:
        print("  a random --val-split can put copies of one image on both sides", file=out)


def _groups_report(
    index: FileIndex, groups: str, group_pattern, val_split: float, seed: int, line, out, columns: Columns, dups
) -> None:
    from mpitrain.data.groups import (
        FILENAME_PATIENT,
        group_ids,
        name_keys,
        shared_groups,
    )
    from mpitrain.data.split import grouped_split, stratified_split

    asked = groups != "none" or bool(group_pattern) or index.patients is not None
    if asked:
        found = group_ids(
            index.paths, str(index.root), groups, group_pattern, index.patients, columns.patient, dups=dups
        )
    else:  # look: patient ids in the names (most of them), else identical files only
        keys = name_keys(index.paths, str(index.root), FILENAME_PATIENT)
        named = sum(k is not None for k in keys) >= max(1, len(keys) // 2)
        found = group_ids(index.paths, str(index.root), "filename-patient" if named else "duplicates", dups=dups)
    if found is None:  # grouping off (never so here: it was asked for or looked for)
        return
    line("groups", found.describe())
    if not 0 < val_split < 1:
        return
    tr, va = stratified_split(index.labels, val_split, seed)
    shared, n_shared = shared_groups(found.ids, tr, va)
    split = f"--val-split {val_split} (seed {seed})"
    if shared:
        hint = "" if asked else f"; use --groups {found.source}"
        print(
            f"warning: an image-by-image {split} puts {shared:,} of {len(va):,} validation images in "
            f"{n_shared:,} groups that also have training images{hint}",
            file=out,
        )
    else:
        line("split", f"an image-by-image {split} shares no group between training and validation")
    gtr, gva = grouped_split(index.labels, found.ids, val_split, seed)
    in_val = (
        positives(index.labels[gva])
        if is_multi_label(index.labels)
        else np.bincount(index.labels[gva], minlength=len(index.classes))
    )
    per_class = ("positives: " if is_multi_label(index.labels) else "") + ", ".join(
        f"{c} {n:,}" for c, n in zip(index.classes, in_val)
    )
    line(
        "grouped split",
        f"{len(gva):,} validation images ({per_class}), "
        f"{shared_groups(found.ids, gtr, gva)[0]} sharing a group with training",
    )


def describe_data(
    data_dir,
    image_size: int | str = 50,
    val_data=None,
    cache_dir=None,
    out=None,
    groups: str = "none",
    group_pattern: str | None = None,
    val_split: float = 0.1,
    seed: int = 0,
    labels=None,
    val_labels=None,
    columns: Columns = Columns(),  # noqa: B008 - frozen, never changed
    channels: int = 1,
) -> int:
    """Print the report for ``data_dir`` or ``labels`` (and ``val_data`` or ``val_labels``)
    to ``out``; return 0.

    ``out`` defaults to the ``sys.stdout`` of the moment of the call.

    Raises `mpitrain.errors.UserError` for an unusable folder (see `data.scan.scan`).
    """
    out = sys.stdout if out is None else out
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    index = index_of(data_dir, labels, columns)
    val = None
    if val_data is not None or val_labels is not None:
        val = index_of(val_data, val_labels, columns, class_names=index.classes)

    def line(key: str, value: str) -> None:
        print(f"{key + ':':<16}{value}", file=out)

    counts = list(index.counts().values())
    line("data", index.where)
    if is_multi_label(index.labels):
        line("labels", f"{len(index.classes)} (multi-label: images with each finding)")
        for row in _table(_rows(index)):
            print(row, file=out)
        masked = int(np.isnan(index.labels).sum())
        if masked:
            line("masked", f"{masked:,} label entries (left out of the loss and the metrics of their label)")
    else:
        line("classes", f"{len(index.classes)}")
        for row in _table(_rows(index)):
            print(row, file=out)
        line("imbalance", f"{max(counts) / min(counts):.2f} : 1 (largest / smallest class)")
    line("images", f"{len(index):,}")
    if val is not None:
        line("validation", f"{val.where} ({len(val):,} images)")
        for row in _table(_rows(val)):
            print(row, file=out)
    # The byte-identical files, hashed once: the groups below and the duplicates report share them.
    t0 = time.perf_counter()
    everything = list(index.paths) + (list(val.paths) if val is not None else [])
    dups = duplicate_sets(everything)
    hashed = time.perf_counter() - t0
    if val is None:
        _groups_report(index, groups, group_pattern, val_split, seed, line, out, columns, dups)
    colour = (0, 0)
    if channels == 1:  # what grey would lose: said only when colour is there
        from mpitrain.data.decode import sniff_colour

        colour = sniff_colour(index.paths, index.labels)
    line("image size", image_line(image_size, channels, colour))
    line("cache", f"{cache} (shared: `train` and `evaluate` on these folders at this size reuse it)")
    errors = index.skipped + _load("", index, image_size, cache, line, channels)
    if val is not None:
        errors += val.skipped + _load("val ", val, image_size, cache, line, channels)

    if errors:
        try:
            report = write_skip_report(errors, cache)
        except OSError:  # cache not writable: fall back to the temp folder
            report = write_skip_report(errors, Path(tempfile.gettempdir()) / "mpitrain")
        listed = len(index) + len(index.skipped) + (len(val) + len(val.skipped) if val is not None else 0)
        usable = listed - len(errors)
        line("skipped", f"{len(errors):,} file(s), {usable:,} usable; list in {report}")
        for path, reason in errors[:3]:
            print(f"  {path}: {reason}", file=out)
        if len(errors) > 3:
            print(f"  ... and {len(errors) - 3:,} more", file=out)
    else:
        line("skipped", "0 files")
    _duplicate_lines(
        [[everything[i] for i in s] for s in dups],
        [index.root] + ([val.root] if val is not None else []),
        hashed,
        cache,
        line,
        out,
        set(val.paths) if val is not None else set(),
    )
    return 0
