"""Classification metrics in plain numpy (no scikit-learn needed).

Conventions:

* Labels are class indices ``0..n_classes-1``; ``probs`` is ``[n, n_classes]`` (softmax).
* A ratio whose denominator is 0 (e.g. precision when nothing was predicted positive) is
  undefined: ``None`` in :func:`classification_metrics`, ``nan`` in the float functions.
  Nothing warns or raises for it.
* Macro averages (macro precision/recall/F1, balanced accuracy, one-vs-rest AUCs) are taken
  over the classes *present* in ``y_true``, all of them alike, and among those over the
  values that are defined (``None`` if none is). A class absent from the data (e.g. a
  3-class model evaluated on a 2-class folder) is listed in ``absent_classes``; images
  wrongly predicted as it still count as errors in accuracy and the micro averages.
* :func:`classification_metrics` returns only plain Python types, so ``json.dumps`` works
  with ``allow_nan=False``.
"""

from __future__ import annotations

import math

import numpy as np


def _binary_inputs(y_true_binary, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true_binary).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("binary labels must be 0/1 or bool")
    if np.isnan(s).any():
        raise ValueError("scores contain nan")
    return y.astype(bool), s


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)  # rank of the last member of each group of ties
    return (last_rank - (counts - 1) / 2.0)[inverse.reshape(-1)]


def roc_auc(y_true_binary, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count one half); nan if a class is absent."""
    y, s = _binary_inputs(y_true_binary, scores)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = _average_ranks(s)[y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _counts_by_threshold(y: np.ndarray, s: np.ndarray):
    """Distinct thresholds (descending) and the tp/fp counts of ``score >= threshold``."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.array([], int)
    tps = np.cumsum(y)[last_of_group]
    fps = (last_of_group + 1) - tps
    return s[last_of_group], tps.astype(np.float64), fps.astype(np.float64)


def roc_curve(y_true_binary, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points (fpr, tpr, thresholds), starting at (0, 0) with threshold +inf.

    Point i is the classifier ``score >= thresholds[i]``. With no positives tpr is nan, with no
    negatives fpr is nan.
    """
    y, s = _binary_inputs(y_true_binary, scores)
    thresholds, tps, fps = _counts_by_threshold(y, s)
    n_pos, n_neg = tps[-1] if tps.size else 0.0, fps[-1] if fps.size else 0.0
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tps / n_pos if n_pos else np.full(tps.shape, np.nan)
        fpr = fps / n_neg if n_neg else np.full(fps.shape, np.nan)
    return fpr, tpr, np.r_[np.inf, thresholds]


def pr_auc(y_true_binary, scores) -> float:
    """Average precision: sum of (recall step) * precision over distinct thresholds.

    nan if there are no positives; 1.0 if there are no negatives.
    """
    y, s = _binary_inputs(y_true_binary, scores)
    _, tps, fps = _counts_by_threshold(y, s)
    if not tps.size or tps[-1] == 0:
        return math.nan
    precision = tps / (tps + fps)
    recall_steps = np.diff(np.r_[0.0, tps]) / tps[-1]
    return float(np.sum(recall_steps * precision))


def confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """Counts [n_classes, n_classes] as int64: row = true class, column = predicted class."""
    t = np.asarray(y_true).reshape(-1).astype(np.int64)
    p = np.asarray(y_pred).reshape(-1).astype(np.int64)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.size and (a.min() < 0 or a.max() >= n_classes):
            raise ValueError(f"{name} has labels outside 0..{n_classes - 1}")
    return (
        np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes).astype(np.int64)
    )


def _ratio(num, den) -> float | None:
    return float(num) / float(den) if den else None


def _clean(value) -> float | None:
    """nan (undefined) becomes None; numpy floats become Python floats."""
    return None if value is None or math.isnan(value) else float(value)


def _mean(values) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _f1(tp, fp, fn) -> float | None:
    return _ratio(2 * tp, 2 * tp + fp + fn)


def classification_metrics(y_true, probs, class_names, threshold: float | None = None, positive: int = 1) -> dict:
    """Everything a report needs about predictions ``probs`` for labels ``y_true``.

    ``y_true`` holds class indices (a one-hot ``[n, n_classes]`` array is accepted too).
    With two classes, class ``positive`` is the positive one: it is predicted when
    ``probs[:, positive] >= threshold`` if a threshold is given, else by argmax; the result
    has accuracy, balanced_accuracy, precision, recall, sensitivity (= recall), specificity,
    f1, roc_auc, pr_auc, confusion_matrix, class_names, n_samples, per_class_counts,
    threshold, positive_class, per_class ({name: {precision, recall, f1, support}}) and
    macro_/micro_ precision, recall and f1. With more classes, prediction is argmax (a
    threshold is refused), roc_auc and pr_auc are one-vs-rest macro averages, and the
    binary-only keys (precision, recall, sensitivity, specificity, f1) are absent;
    threshold and positive_class are None. ``absent_classes`` names the classes without any
    image in ``y_true``; every macro average is over the other (present) classes.
    """
    p = np.asarray(probs, dtype=np.float64)
    names = [str(c) for c in class_names]
    k = len(names)
    if p.ndim != 2 or p.shape[1] != k:
        raise ValueError(f"probs must have shape [n, {k}], got {p.shape}")
    if k < 2:
        raise ValueError("need at least two classes")
    y = np.asarray(y_true)
    if y.ndim == 2 and y.shape == p.shape:
        y = y.argmax(axis=1)
    y = y.reshape(-1).astype(np.int64)
    if y.size != p.shape[0]:
        raise ValueError(f"{y.size} labels for {p.shape[0]} predictions")
    if not 0 <= positive < k:
        raise ValueError(f"positive must be a class index 0..{k - 1}")
    if threshold is not None and k != 2:
        raise ValueError("a threshold only makes sense with two classes")

    if threshold is None:
        pred = p.argmax(axis=1) if p.shape[0] else np.zeros(0, np.int64)
    else:
        pred = np.where(p[:, positive] >= threshold, positive, 1 - positive)
    cm = confusion_matrix(y, pred, k)
    n = int(cm.sum())
    tp = np.diag(cm)
    fp, fn, support = cm.sum(axis=0) - tp, cm.sum(axis=1) - tp, cm.sum(axis=1)

    per_class = {
        name: {
            "precision": _ratio(tp[i], tp[i] + fp[i]),
            "recall": _ratio(tp[i], support[i]),
            "f1": _f1(tp[i], fp[i], fn[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    }
    present = [i for i in range(k) if support[i] > 0]
    present_names = [names[i] for i in present]
    aucs, aps = [], []
    for i in present:  # an absent class has no one-vs-rest curve
        if k == 2 and i != positive:
            continue
        scores = p[:, i]
        aucs.append(_clean(roc_auc(y == i, scores)))
        aps.append(_clean(pr_auc(y == i, scores)))
    result = {
        "accuracy": _ratio(tp.sum(), n),
        "balanced_accuracy": _mean([per_class[c]["recall"] for c in present_names]),
        "roc_auc": _mean(aucs),
        "pr_auc": _mean(aps),
        "confusion_matrix": cm.tolist(),
        "class_names": names,
        "n_samples": n,
        "per_class_counts": {name: int(support[i]) for i, name in enumerate(names)},
        "threshold": None if threshold is None else float(threshold),
        "positive_class": names[positive] if k == 2 else None,
        "per_class": per_class,
        "absent_classes": [c for c in names if c not in present_names],
    }
    for metric in ("precision", "recall", "f1"):
        result[f"macro_{metric}"] = _mean([per_class[c][metric] for c in present_names])
    # Single-label: every error is one false positive and one false negative, so
    # micro precision = micro recall = micro f1 = accuracy.
    result["micro_precision"] = _ratio(tp.sum(), tp.sum() + fp.sum())
    result["micro_recall"] = _ratio(tp.sum(), tp.sum() + fn.sum())
    result["micro_f1"] = _f1(tp.sum(), fp.sum(), fn.sum())
    if k == 2:
        pos = per_class[names[positive]]
        neg = 1 - positive
        result.update(
            precision=pos["precision"],
            recall=pos["recall"],
            sensitivity=pos["recall"],
            f1=pos["f1"],
            specificity=_ratio(tp[neg], support[neg]),
        )
    return result
