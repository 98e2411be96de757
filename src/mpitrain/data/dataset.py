"""From a config to this rank's arrays: scan, split, shard, then decode only our shard.

Scanning and splitting are cheap and deterministic, so every rank does them and arrives at
the same plan without talking to the others. Decoding is the expensive part, and each
rank decodes only the files of its own shards, so loading runs in parallel across ranks.
`load_shard` is local: the caller passes which part of the data this rank owns. The one
exception is `scatter_from_root` (--data-on-root), which runs collectives through the `comm`
object it is handed; this module never imports MPI itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mpitrain.data.findings import counts_2xl
from mpitrain.errors import UserError
from mpitrain.shards import shard
from mpitrain.targets import is_multi_label

if TYPE_CHECKING:
    from mpitrain.parallel.comm import Comm

# A rank's (training part, validation part), each as (part, parts): see `shards.shard`.
PartsOf = Callable[[int], tuple[tuple[int, int], tuple[int, int]]]


@dataclass
class Plan:
    """The global, rank-independent view of the data. Labels are class indices [n], or for a
    multi-label table float32 [n, L] (`findings.py`: 0/1, NaN masked), ``classes`` then
    being the label names."""

    data_dir: str
    classes: list[str]
    train_paths: list[str]
    train_labels: np.ndarray
    val_paths: list[str]
    val_labels: np.ndarray
    val_from: str  # "split" or the --val-data folder
    # The whole scan (file order) of the folder the training / validation paths come from:
    # `mpitrain data` caches exactly these lists, and a shard's rows are found in them.
    train_source: list[str] | None = None
    val_source: list[str] | None = None
    grouping: str = ""  # how the split kept groups whole ("" : image by image)
    # Label-file rows left out (no such file, empty cells): (path, reason), reported with the
    # decoder's skipped files.
    skipped: list = field(default_factory=list)
    val_is_table: bool = False  # val_from is a --val-labels file, not a --val-data folder
    is_table: bool = False  # data_dir is a --labels file, not a folder

    def class_counts(self) -> np.ndarray:
        """Training images per class; multi-label: int64 [2, L], negatives (row 0) and
        positives (row 1) per label, a masked entry in neither."""
        if is_multi_label(self.train_labels):
            return counts_2xl(self.train_labels)
        return np.bincount(self.train_labels, minlength=len(self.classes))

    def protocol(self) -> str:
        """How the validation images relate to the training images, in one sentence part."""
        if self.val_from != "split":
            return f"a separate {'label file' if self.val_is_table else 'folder'} ({self.val_from})"
        n = len(self.train_paths) + len(self.val_paths)
        share = f"{len(self.val_paths) / max(n, 1):.0%} of the training {'label file' if self.is_table else 'folder'}"
        if self.grouping:
            return f"{share}, split by group: {self.grouping}"
        return (
            f"{share}, split image by image (one patient's images may be on both sides, which "
            f"flatters validation; --groups / --group-pattern split by patient)"
        )


@dataclass
class Shard:
    """This rank's decoded images.

    Images are kept as the cache stores them, integers [n, s, s] (uint8, or uint16 when a
    16-bit file is among them) with their full-scale value, 4x smaller than float32; the
    trainer converts one batch at a time with `as_float`. Float arrays [n, s, s, 1] in
    [0, 1] (max value 1.0) work too. With --store disk the images are `store.Rows`, this
    rank's rows of the host's memory-mapped store, read one batch at a time.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    train_max: float = 1.0
    val_max: float = 1.0
    val_index: np.ndarray | None = None  # each val row's index in Plan.val_paths
    errors: list = field(default_factory=list)
    cache_hits: int = 0
    loads: int = 0
    seconds: float = 0.0


def resolve_data_dir(data: str | None, cache_dir: str | None = None) -> str:
    """The user's folder, or the embedded demo data (generated once into the cache)."""
    if data is not None:
        return data
    from mpitrain.data.synth import demo_data_dir

    return str(demo_data_dir(Path(cache_dir) if cache_dir else None))


def plan_for(cfg, cache_dir: str | None = None) -> Plan:
    """The plan of a `TrainConfig` (any object with its data fields): folder or label
    file, validation folder, label file or split, patient groups. Every caller (each rank,
    and the launcher's check before mpiexec starts) goes through here."""
    from mpitrain.data.labels import Columns

    labels = getattr(cfg, "labels", None)
    data_dir = resolve_data_dir(cfg.data, cfg.cache_dir) if labels is None else None
    return make_plan(
        data_dir,
        cfg.val_data,
        cfg.val_split,
        cfg.split_seed_used,
        cfg.groups,
        cfg.group_pattern,
        labels=labels,
        val_labels=getattr(cfg, "val_labels", None),
        columns=Columns.of(cfg),
        nested_ok=getattr(cfg, "allow_nested_classes", False) or cfg.data is None,
    )


def make_plan(
    data_dir: str | None,
    val_data: str | None,
    val_split: float,
    seed: int,
    groups: str | None = "none",
    group_pattern: str | None = None,
    *,
    labels: str | None = None,
    val_labels: str | None = None,
    columns=None,
    nested_ok: bool = True,
) -> Plan:
    """`groups` / `group_pattern` (or a label file's patient column): keep patients (and
    identical files) on one side of the split (`data/groups.py`); only with a split, not
    with `val_data` / `val_labels`. `labels` / `val_labels`: label files instead of the
    folders (`data/labels.py`, with `columns`). `nested_ok` False: refuse a folder whose
    classes all hold the same sub-folders (`scan.check_not_nested`: the parent of the
    splits); the embedded demo data (no --data) is never refused."""
    from mpitrain.data.labels import Columns, index_of
    from mpitrain.data.split import grouped_split, stratified_split

    columns = columns or Columns()
    index = index_of(data_dir, labels, columns)
    if not nested_ok and labels is None and data_dir is not None:
        from mpitrain.data.scan import check_not_nested

        check_not_nested(index, data_dir)
    data_dir = labels if labels is not None else data_dir  # as the user wrote it, for messages
    if data_dir is None:
        raise ValueError("make_plan needs a folder or a label file")
    paths = np.array(index.paths, dtype=object)
    val_from = val_labels if val_labels is not None else val_data
    if val_from is not None:
        val = index_of(val_data, val_labels, columns, class_names=index.classes)
        return Plan(
            data_dir,
            index.classes,
            list(index.paths),
            index.labels,
            list(val.paths),
            val.labels,
            val_from,
            train_source=list(index.paths),
            val_source=list(val.paths),
            skipped=index.skipped + val.skipped,
            val_is_table=val_labels is not None,
            is_table=labels is not None,
        )
    from mpitrain.data.groups import group_ids

    found = group_ids(index.paths, str(index.root), groups, group_pattern, index.patients, columns.patient)
    if found is None:
        tr, va = stratified_split(index.labels, val_split, seed)
    else:
        tr, va = grouped_split(index.labels, found.ids, val_split, seed)
    if len(tr) == 0:
        raise UserError(f"--val-split {val_split} leaves no training images in {data_dir}")
    if len(va) == 0:  # every class too small to give one (a class of one image stays in training)
        need = "images" if found is None else f"groups ({found.describe()})"
        if is_multi_label(index.labels):  # split as one class: the whole set is too small
            raise UserError(
                f"--val-split {val_split} leaves no validation images in {data_dir} ({len(index):,} images): "
                f"give --val-labels FILE.csv, or at least 2 {need}"
            )
        per_class = ", ".join(f"{c} {n}" for c, n in index.counts().items())
        raise UserError(
            f"--val-split {val_split} leaves no validation images in {data_dir} ({per_class}): "
            f"give --val-data DIR, or at least 2 {need} per class"
        )
    whole = list(index.paths)
    return Plan(
        data_dir,
        index.classes,
        paths[tr].tolist(),
        index.labels[tr],
        paths[va].tolist(),
        index.labels[va],
        "split",
        train_source=whole,
        val_source=whole,
        grouping="" if found is None else found.describe(),
        skipped=list(index.skipped),
        is_table=labels is not None,
    )


def check_validation(plan: Plan) -> str | None:
    """A --val-data / --val-labels whose files are the training files (the same folder, or
    byte-identical copies: `groups.shared_files`) measures memory, not learning: `UserError`
    when every validation file is one, else a warning line saying how many are (None: none).
    A --val-split's two sides are disjoint by construction: nothing to check."""
    if plan.val_from == "split" or not plan.val_paths:
        return None
    from mpitrain.data.groups import shared_files

    same, n = shared_files(plan.train_paths, plan.val_paths), len(plan.val_paths)
    where = f"--val-{'labels' if plan.val_is_table else 'data'} {plan.val_from}"
    if same == n:
        raise UserError(
            f"{where}: all {n:,} validation images are training images of {plan.data_dir} (the same "
            f"files or identical copies): give a folder of other images, or --val-split F"
        )
    if same:
        return (
            f"warning: {same:,} of {n:,} validation images of {where} are also training images "
            f"(identical files): validation will look better than it is"
        )
    return None


def _load(paths: list[str], labels: np.ndarray, image_size, cache_dir, out: Shard, whole=None, channels=1):
    """(rows, labels, full-scale value, readable mask) of `paths`; unreadable files are left out."""
    from mpitrain.data.cache import load_images_native

    if not paths:
        from mpitrain.data.decode import row_shape

        return (
            np.zeros((0, *row_shape(image_size, channels)), np.uint8),
            _label_rows(labels[:0]),
            255.0,
            np.zeros(0, bool),
        )
    x, max_value, ok, errors, hit = load_images_native(
        paths, image_size, Path(cache_dir) if cache_dir else None, whole=whole, channels=channels
    )
    out.errors.extend(errors)
    out.cache_hits += int(hit)
    out.loads += 1
    return np.ascontiguousarray(x[ok]), kept_labels(labels, ok), float(max_value), ok


def kept_labels(labels: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """The labels of the readable rows, as `_label_rows` keeps them (memory and disk stores alike)."""
    return _label_rows(labels[ok])


def _label_rows(labels: np.ndarray) -> np.ndarray:
    """A shard's labels: int32 class indices, or multi-label float32 [n, L] (NaN kept)."""
    return labels.astype(np.float32 if is_multi_label(labels) else np.int32)


def load_shard(
    plan: Plan,
    image_size: int | str,
    seed: int,
    train_part: tuple[int, int],
    val_part: tuple[int, int],
    cache_dir: str | None = None,
    channels: int = 1,
) -> Shard:
    """Decode the training and validation images that belong to this rank (rows [n, h, w],
    or [n, h, w, 3] with ``channels=3``; ``image_size`` as `config.image_shape` reads it)."""
    t0 = time.perf_counter()
    out = Shard(*(np.zeros(0),) * 4)
    tr = shard(np.arange(len(plan.train_paths)), *train_part, seed)
    va = shard(np.arange(len(plan.val_paths)), *val_part, seed)
    out.train_x, out.train_y, out.train_max, _ = _load(
        [plan.train_paths[i] for i in tr],
        plan.train_labels[tr],
        image_size,
        cache_dir,
        out,
        plan.train_source,
        channels,
    )
    out.val_x, out.val_y, out.val_max, ok = _load(
        [plan.val_paths[i] for i in va], plan.val_labels[va], image_size, cache_dir, out, plan.val_source, channels
    )
    out.val_index = np.asarray(va, dtype=np.int64)[ok] if len(va) else np.zeros(0, np.int64)
    out.seconds = time.perf_counter() - t0
    return out


def _parts_of_ranks(
    full: Shard, split: str, size: int, parts_of: PartsOf, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray] | None]:
    """Rank 0: each rank's rows of `split` (images, labels, val_index) from the whole set."""
    x, y = getattr(full, f"{split}_x"), getattr(full, f"{split}_y")
    which = [parts_of(r)[split == "val"] for r in range(size)]
    idx = [shard(np.arange(len(x)), p, n, seed) for p, n in which]
    # val_index belongs to the validation rows only (the training rows have none).
    rows = full.val_index if split == "val" else None
    return [x[i] for i in idx], [y[i] for i in idx], None if rows is None else [rows[i] for i in idx]


def class_weights(counts: np.ndarray, mode: str) -> np.ndarray:
    """Per-class loss weights; "balanced" is n / (k * n_c), as in scikit-learn. Multi-label
    counts [2, L] (`Plan.class_counts`) give float32 [2, L], the weights of a negative (row
    0) and a positive (row 1) of each label: balanced n_l / (2 * n_cl), n_l the label's
    unmasked entries, scikit-learn's rule for each label as a two-class problem."""
    counts = np.asarray(counts, dtype=np.float64)
    if mode == "none":
        return np.ones(counts.shape if counts.ndim == 2 else len(counts), dtype=np.float32)
    if counts.ndim == 2:
        return (counts.sum(axis=0) / (2 * np.maximum(counts, 1.0))).astype(np.float32)
    w = counts.sum() / (len(counts) * np.maximum(counts, 1.0))
    return w.astype(np.float32)


def scatter_from_root(
    comm: Comm,
    plan: Plan | None,
    image_size: int | str,
    seed: int,
    parts_of: PartsOf,
    cache_dir: str | None = None,
    channels: int = 1,
) -> tuple[Plan, Shard]:
    """--data-on-root: rank 0 decodes everything and sends each rank its shards.

    For clusters without a shared file system. `parts_of(rank)` gives a rank's
    (train part, val part). Only metadata travels as Python objects; each split goes as
    two Scatterv calls, the images in their stored dtype (uint8 or uint16, converted to
    float per batch later) and the labels.
    """
    full = None
    if comm.rank == 0:
        if plan is None:
            raise ValueError("scatter_from_root: rank 0 holds the plan")
        full = load_shard(plan, image_size, seed, (0, 1), (0, 1), cache_dir, channels)
    # Collective order: plan metadata, then the training rows, then the validation rows.
    meta = comm.bcast_obj(
        None if plan is None else (plan.data_dir, plan.classes, plan.train_labels, plan.val_labels, plan.val_from)
    )
    if plan is None:
        data_dir, classes, train_labels, val_labels, val_from = meta
        plan = Plan(data_dir, classes, [], train_labels, [], val_labels, val_from)
    out = Shard(*(np.zeros(0),) * 4)
    for split in ("train", "val"):
        parts = None if full is None else _parts_of_ranks(full, split, comm.size, parts_of, seed)
        setattr(out, f"{split}_x", comm.scatter_rows(None if parts is None else parts[0]))
        setattr(out, f"{split}_y", comm.scatter_rows(None if parts is None else parts[1]))
        if split == "val":  # where each row is in the plan: for the saved validation predictions
            out.val_index = comm.scatter_rows(None if parts is None else parts[2])
    out.train_max, out.val_max = comm.bcast_obj(None if full is None else (full.train_max, full.val_max))
    if full is not None:
        out.errors, out.cache_hits, out.loads, out.seconds = full.errors, full.cache_hits, full.loads, full.seconds
    return plan, out
