"""PNG figures for people: training curves, confusion matrix, ROC curve with the threshold.

Drawn with matplotlib's Agg canvas directly (no pyplot, no display, no global state), so it
works on headless cluster nodes and inside MPI ranks. Only rank 0 calls these.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mpitrain import runfiles
from mpitrain.atomic import atomic_path
from mpitrain.engine.metrics import roc_auc, roc_curve

FIGURES = {
    "training_curves": runfiles.TRAINING_CURVES,
    "confusion_matrix": runfiles.CONFUSION_MATRIX,
    "roc_curve": runfiles.ROC_CURVE,
}
_TRAIN, _VAL = "#1f77b4", "#d62728"


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _column(history: list[dict], key: str) -> np.ndarray:
    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan  # undefined (None / ""), e.g. AUC of a one-class batch

    return np.array([num(row.get(key)) for row in history], dtype=np.float64)


# What the curves are, in one line under them: the two series are measured differently
# (e.g. validation AUC 0.98 beside training AUC 0.55 after one master-worker epoch), and
# their accuracy is at argmax, not at the decision threshold of the metrics table.
CURVES_NOTE = (
    "training: running mean over each epoch while the weights change; validation: measured "
    "at the epoch's end. Accuracy at argmax, not at the decision threshold of the metrics table."
)


def training_curves(history: list[dict], path: Path, loss_note: str | None = None) -> Path:
    """Loss, accuracy and ROC AUC per epoch, training and validation side by side."""
    return _save(curves_figure(history, loss_note), path)


def curves_figure(history: list[dict], loss_note: str | None = None):
    """The figure of `training_curves`, not yet saved."""
    fig = _figure(12, 4.1)
    axes = fig.subplots(1, 3)
    epochs = _column(history, "epoch")
    loss_title = "Loss (cross-entropy)" + (f"\n{loss_note}" if loss_note else "")
    panels = (
        ("loss", loss_title, "loss"),
        ("accuracy", "Accuracy (argmax)", "accuracy (argmax)"),
        ("auc", "ROC AUC", "ROC AUC"),
    )
    for ax, (key, title, ylabel) in zip(axes, panels):
        ax.set_ylabel(ylabel)
        empty = True
        for prefix, label, color in (
            ("", "train (running mean over the epoch)", _TRAIN),
            ("val_", "validation (at the epoch's end)", _VAL),
        ):
            values = _column(history, prefix + key)
            empty &= bool(np.isnan(values).all())
            ax.plot(epochs, values, marker="o", color=color, label=label)
        if empty:
            ax.text(
                0.5,
                0.5,
                "not recorded",
                transform=ax.transAxes,
                ha="center",
                color="grey",
                bbox={"facecolor": "white", "edgecolor": "none"},
            )
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if key != "loss":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if len(epochs):
            ax.set_xticks(epochs if len(epochs) <= 12 else np.linspace(epochs[0], epochs[-1], 6).round())
            ax.set_xlim(epochs[0] - 0.3, epochs[-1] + 0.3)
    axes[0].legend(fontsize=8)
    fig.supxlabel(CURVES_NOTE, fontsize=8, color="dimgrey")
    return fig


def confusion_matrix(cm, class_names: list[str], path: Path, title: str = "Confusion matrix") -> Path:
    """Counts with the share of each true class (row) in every cell."""
    cm = np.asarray(cm, dtype=np.int64)
    k = len(class_names)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    side = max(4.2, 1.1 * k + 2.4)
    fig = _figure(side + 0.8, side)
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{cm[i, j]:,}\n{100 * share[i, j]:.1f}%",
                ha="center",
                va="center",
                color="white" if share[i, j] > 0.55 else "black",
                fontsize=12 if k <= 4 else 8,
            )
    ax.set_xticks(range(k), class_names, rotation=0 if k <= 4 else 45)
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title} (n = {int(cm.sum()):,})")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    return _save(fig, path)


def roc(
    labels,
    probs,
    class_names: list[str],
    path: Path,
    threshold: float | None = None,
    positive: int | None = None,
    title: str = "ROC curve",
) -> Path:
    """ROC curve of the positive class with the decision point marked (one-vs-rest if k > 2)."""
    labels = np.asarray(labels).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    fig = _figure(5.6, 5.4)
    ax = fig.subplots()
    which = [positive] if positive is not None else range(len(class_names))
    drawn = 0
    for i in which:
        y, s = labels == i, probs[:, i]
        if y.all() or not y.any():
            continue  # no curve without both classes
        drawn += 1
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(
            fpr,
            tpr,
            linewidth=2,
            label=f"{class_names[i]} (AUC {roc_auc(y, s):.3f})",
            color=_TRAIN if positive is not None else None,
        )
    if positive is not None and len(labels) and 0 < (labels == positive).sum() < len(labels):
        y, s = labels == positive, probs[:, positive]
        called = probs.argmax(axis=1) == positive if threshold is None else s >= threshold
        sens, fpr_t = called[y].mean(), called[~y].mean()
        name = "argmax" if threshold is None else f"threshold {threshold:.3f}"
        ax.plot(
            [fpr_t],
            [sens],
            marker="o",
            markersize=10,
            color=_VAL,
            linestyle="none",
            label=f"{name}: sens {sens:.3f}, spec {1 - fpr_t:.3f}",
        )
        ax.annotate(name, (fpr_t, sens), xytext=(12, -18), textcoords="offset points", color=_VAL)
    if drawn:
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance", zorder=1)
    else:
        ax.text(
            0.5,
            0.55,
            "no ROC curve:\nthe data lacks a positive or a negative class",
            transform=ax.transAxes,
            ha="center",
            color="grey",
            bbox={"facecolor": "white", "edgecolor": "none"},
        )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    rest = "rest" if len(class_names) != 2 or positive is None else class_names[1 - positive]
    ax.set_title(title if positive is None else f"{title}: {class_names[positive]} vs {rest}")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def roc_grid(labels, probs, metrics: dict, path: Path, title: str = "ROC") -> Path:
    """Multi-label: one small ROC panel per label (its unmasked entries), each with the point
    of its threshold; a label without both values says so in its panel."""
    y_all, p_all = np.asarray(labels, np.float64), np.asarray(probs, np.float64)
    names = metrics["label_names"]
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig = _figure(3.0 * cols, 3.0 * rows + 0.4)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    for i, ax in enumerate(axes):
        if i >= len(names):
            ax.set_axis_off()
            continue
        known = ~np.isnan(y_all[:, i])
        y, s = y_all[known, i] > 0.5, p_all[known, i]
        m = metrics["per_label"][names[i]]
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
        if y.all() or not y.any():
            ax.text(0.5, 0.5, "no curve:\none value only", ha="center", color="grey", transform=ax.transAxes)
        else:
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, linewidth=1.5, color=_TRAIN)
            ax.plot([1 - m["specificity"]], [m["sensitivity"]], marker="o", color=_VAL, linestyle="none")
        auc = "" if m["roc_auc"] is None else f" (AUC {m['roc_auc']:.3f})"
        ax.set_title(f"{names[i]}{auc}", fontsize=9)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: false positive rate (x) against sensitivity (y); dot: the label's threshold", fontsize=9)
    return _save(fig, path)


def write_all(
    folder: Path,
    labels,
    probs,
    metrics: dict,
    history: list[dict] | None = None,
    title: str = "validation",
    loss_note: str | None = None,
) -> dict[str, str]:
    """The figures for one set of predictions (+ curves if a history is given): {kind: file}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if metrics.get("multi_label"):
        out = {}
        if history:
            out["training_curves"] = training_curves(history, folder / FIGURES["training_curves"], loss_note).name
        out["roc_curve"] = roc_grid(labels, probs, metrics, folder / FIGURES["roc_curve"], f"ROC, {title}").name
        return out
    names = metrics["class_names"]
    pos = None if metrics.get("positive_class") is None else names.index(metrics["positive_class"])
    out = {}
    if history:
        out["training_curves"] = training_curves(history, folder / FIGURES["training_curves"], loss_note).name
    out["confusion_matrix"] = confusion_matrix(
        metrics["confusion_matrix"], names, folder / FIGURES["confusion_matrix"], f"Confusion matrix, {title}"
    ).name
    out["roc_curve"] = roc(
        labels, probs, names, folder / FIGURES["roc_curve"], metrics.get("threshold"), pos, f"ROC, {title}"
    ).name
    return out
