"""Per-epoch numbers: exact metrics across ranks, and the one line rank 0 prints.

Loss and accuracy come from sums (samples, loss sum, hits) reduced over all ranks, never
from averages of per-rank averages; ROC AUC and balanced accuracy (mean recall of the
classes at argmax) from the predictions gathered on rank 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mpitrain.parallel.comm import Comm


def epoch_metrics(comm: Comm, stats, probs, labels, n_classes, multi_label: bool = False):
    """Collective (gathers on rank 0). Rank 0: (metrics, all probs, all labels); others Nones.
    Multi-label (labels [n, L] with NaN masked): accuracy is label accuracy, auc (and
    mean_auc) the mean per-label ROC AUC, balanced accuracy the labels' mean of
    (sensitivity + specificity) / 2 at 0.5 (`engine/multilabel.py`)."""
    from mpitrain.engine.metrics import classification_metrics

    all_probs = comm.gather_rows(probs.astype(np.float32))
    all_labels = comm.gather_rows(labels.astype(np.float32 if multi_label else np.int32))
    if comm.rank != 0:
        return None, None, None
    n = max(stats[0], 1.0)
    if multi_label:
        return _multilabel_row(stats, n, all_probs, all_labels), all_probs, all_labels
    m = classification_metrics(all_labels, all_probs, [str(i) for i in range(n_classes)])
    return (
        {
            "loss": stats[1] / n,
            "accuracy": stats[2] / n,
            "auc": m["roc_auc"],
            "balanced_accuracy": m["balanced_accuracy"],
        },
        all_probs,
        all_labels,
    )


def _multilabel_row(stats, n: float, probs, labels) -> dict:
    from mpitrain.engine.metrics import _mean
    from mpitrain.engine.multilabel import multilabel_metrics

    m = multilabel_metrics(labels, probs, [str(i) for i in range(labels.shape[1])])
    balanced = [
        (v["sensitivity"] + v["specificity"]) / 2
        for v in m["per_label"].values()
        if v["sensitivity"] is not None and v["specificity"] is not None
    ]
    return {
        "loss": stats[1] / n,
        "accuracy": stats[2] / n,
        "auc": m["mean_roc_auc"],
        "balanced_accuracy": _mean(balanced),
        "mean_auc": m["mean_roc_auc"],
    }


def best_epoch(history: list[dict], metric: str) -> int | None:
    """The epoch (1-based, as in the rows) with the best `metric`: lowest for a loss,
    highest otherwise; the earliest on ties; rows without a finite value are ignored."""
    lower = metric.endswith("loss")
    best, best_value = None, None
    for row in history:
        v = row.get(metric)
        if v is None or not np.isfinite(v):
            continue
        if best_value is None or (v < best_value if lower else v > best_value):
            best, best_value = int(row["epoch"]), float(v)
    return best


def loss_sum(y: np.ndarray, probs: np.ndarray) -> float:
    """Summed cross-entropy of the true classes (the same clipping as Keras)."""
    if len(y) == 0:
        return 0.0
    p = np.clip(probs[np.arange(len(y)), y].astype(np.float64), 1e-7, 1.0)
    return float(-np.log(p).sum())


def _fmt(v) -> str:
    return "  n/a " if v is None else f"{v:.4f}"


def epoch_line(row: dict, epochs: int, tag: str) -> str:
    # Multi-label rows: accuracy is label accuracy and AUC the mean per-label AUC; the line says so.
    acc, auc = ("label_acc", "mean_auc") if "mean_auc" in row else ("acc", "auc")
    return (
        f"epoch {row['epoch']}/{epochs} [{tag}] "
        f"loss {_fmt(row['loss'])} {acc} {_fmt(row['accuracy'])} {auc} {_fmt(row['auc'])} | "
        f"val_loss {_fmt(row['val_loss'])} val_{acc} {_fmt(row['val_accuracy'])} "
        f"val_{auc} {_fmt(row['val_auc'])} | {row['seconds']:.1f}s {row['images_per_second']:.0f} img/s"
    )
