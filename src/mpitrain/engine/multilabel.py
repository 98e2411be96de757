"""Several findings per image: labels float32 [n, L] of 1, 0 and NaN (masked), sigmoid outputs.

The engine is multi-label when its labels are two-dimensional (`mpitrain.targets`); the model
then ends in L sigmoid units, one per label, and is trained with binary cross-entropy:

* A masked entry (NaN: an uncertain finding under `--uncertain ignore`) has loss weight 0,
  so it adds nothing to the loss or its gradient, and it is left out of every metric of
  its label. Its target is fed as 0 (a number the step can take; the weight removes it).
* Weights are per label and per value: `weights` [2, L] (row 0 for a negative, row 1 for a
  positive entry; `--class-weight balanced` gives n_l / (2 n_{c,l}) per label). A row's
  loss is the weighted sum over its labels divided by L, so a row with no label masked
  weighs as a single-label row does and the step's mean-over-the-global-batch rule is
  unchanged.
* Accuracy in the epoch lines is label accuracy: per row, the share of its unmasked labels
  decided right at 0.5; a row with every label masked is not counted. AUC is the mean of
  the per-label ROC AUCs over the labels that have both values among their unmasked
  entries (`mean_roc_auc`); the epoch rows carry it as `auc` and `mean_auc`.
"""

from __future__ import annotations

import numpy as np

from mpitrain.engine.metrics import _clean, _mean, _ratio, pr_auc, roc_auc
from mpitrain.targets import is_multi_label

EPSILON = 1e-7  # Keras' clipping of probabilities in its cross-entropies


def widen_empty(data, n_labels: int) -> None:
    """Give `data` (train_y, val_y) of a rank that holds no rows the [0, L] labels of the others."""
    for name in ("train_y", "val_y"):
        y = getattr(data, name)
        if not is_multi_label(y) and len(y) == 0:
            setattr(data, name, np.zeros((0, n_labels), np.float32))


def default_weights(n_labels: int) -> np.ndarray:
    return np.ones((2, n_labels), np.float32)


def check_weights(given, n_labels: int) -> np.ndarray:
    """Loss weights [2, L] (negatives, positives) as float32; None: all 1."""
    if given is None:
        return default_weights(n_labels)
    w = np.asarray(given, np.float32)
    if w.shape != (2, n_labels):
        raise ValueError(f"multi-label class weights must have shape (2, {n_labels}), got {w.shape}")
    return w


def targets(labels: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(targets, loss weights) of a batch's labels [n, L]: masked entries become target 0 of
    weight 0; the others take their value's weight of their label."""
    y = np.asarray(labels, np.float32)
    known = ~np.isnan(y)
    t = np.where(known, y, 0.0).astype(np.float32)
    w = np.where(t > 0.5, weights[1], weights[0]) * known
    return t, w.astype(np.float32)


def step_loss(t, probs, w):
    """In the graph: the batch's summed loss, each row's weighted binary cross-entropy over its
    labels divided by L."""
    import keras
    import tensorflow as tf

    per = keras.ops.binary_crossentropy(t, probs)  # elementwise, clipped as Keras clips
    return tf.reduce_sum(tf.cast(per, tf.float32) * w) / tf.cast(tf.shape(t)[-1], tf.float32)


def step_counts(t, probs, w):
    """In the graph: (rows counted: any weight above 0, their label accuracy summed)."""
    import tensorflow as tf

    known = tf.cast(w > 0, tf.float32)
    right = tf.cast(tf.equal(probs >= 0.5, t > 0.5), tf.float32) * known
    rows = tf.reduce_sum(known, axis=-1)
    counted = tf.reduce_sum(tf.cast(rows > 0, tf.float32))
    return counted, tf.reduce_sum(tf.math.divide_no_nan(tf.reduce_sum(right, axis=-1), rows))


def sums(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """[rows counted, loss sum, label accuracy sum] of predictions in NumPy, unweighted (as
    validation loss is for one label): the same rules as `step_loss`."""
    y = np.asarray(labels, np.float64)
    if not len(y):
        return np.zeros(3)
    p = np.clip(np.asarray(probs, np.float64), EPSILON, 1.0 - EPSILON)
    known = ~np.isnan(y)
    t = np.where(known, y, 0.0)
    per = -(t * np.log(p) + (1.0 - t) * np.log(1.0 - p)) * known
    rows = known.sum(axis=1)
    right = ((p >= 0.5) == (t > 0.5)) & known
    acc = right.sum(axis=1) / np.maximum(rows, 1)  # a row with every label masked: 0, not counted
    return np.array([float((rows > 0).sum()), float(per.sum() / y.shape[1]), float(acc.sum())])


def _label_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    known = ~np.isnan(y)
    t, s = y[known] > 0.5, p[known]
    pred = s >= threshold
    pos, neg = int(t.sum()), int((~t).sum())
    return {
        "roc_auc": _clean(roc_auc(t, s)),
        "pr_auc": _clean(pr_auc(t, s)),
        "sensitivity": _ratio((pred & t).sum(), pos),
        "specificity": _ratio((~pred & ~t).sum(), neg),
        "prevalence": _ratio(pos, pos + neg),
        "positives": pos,
        "negatives": neg,
        "masked": int((~known).sum()),
        "threshold": float(threshold),
    }


def multilabel_metrics(labels, probs, label_names, thresholds=None) -> dict:
    """Per-label ROC AUC, PR AUC, sensitivity and specificity (at each label's threshold, 0.5
    unless given), prevalence and counts, and their means over the labels where defined
    (`mean_roc_auc` ...); label accuracy and exact-match accuracy over the rows. Plain
    Python types only (``json.dumps(..., allow_nan=False)`` works)."""
    y = np.asarray(labels, np.float64)
    p = np.asarray(probs, np.float64)
    names = [str(n) for n in label_names]
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(names):
        raise ValueError(f"labels {y.shape} and probs {p.shape} must both be [n, {len(names)}]")
    th = np.full(len(names), 0.5) if thresholds is None else np.asarray(thresholds, np.float64)
    per = {name: _label_metrics(y[:, i], p[:, i], float(th[i])) for i, name in enumerate(names)}
    known = ~np.isnan(y)
    right = ((p >= th) == (y > 0.5)) & known
    rows = known.sum(axis=1) > 0
    result: dict = {
        "multi_label": True,
        "label_names": names,
        "n_samples": int(len(y)),
        "per_label": per,
        "label_accuracy": _ratio(right.sum(), known.sum()),
        "exact_match": _ratio((right | ~known).all(axis=1)[rows].sum(), rows.sum()),
    }
    for key in ("roc_auc", "pr_auc", "sensitivity", "specificity"):
        result[f"mean_{key}"] = _mean([m[key] for m in per.values()])
    result["roc_auc"] = result["mean_roc_auc"]  # the key every report and --keep-best reads
    return result
