"""Choose the decision threshold of a two-class model on validation data.

A two-class softmax model gives P(positive) for every image; the model says "positive"
when ``P(positive) >= threshold``. argmax is the same as threshold 0.5, which is rarely
the best point for a screening test. At the end of training the threshold is chosen on
the training data and saved with the model (``model.json``), by one of three rules:

* ``prior`` (default): the point where the model's odds equal the class odds its loss was
  trained with. With ``--class-weight balanced`` every class weighs the same in the loss,
  so the model's probabilities are those of a world with equal classes and the point is
  0.5; without class weights it is the training share of the positive class. Nothing is
  tuned on validation images. Why it is the default: validation carved from the training
  folder comes from the same hospitals and machines as training; a threshold tuned on it
  follows that distribution's quirks and did not transfer to new patients (chest X-rays,
  docs/accuracy.md: 0.5 beat Youden's threshold on test/ in every run, by 4-8 points of
  accuracy on average).
* ``youden``: maximise Youden's J = sensitivity + specificity - 1 on the validation
  predictions. Among equally good points the lowest threshold (the highest sensitivity)
  wins.
* ``target_sensitivity``: the highest threshold whose sensitivity is still >= the target,
  i.e. the best specificity that keeps (for example) 95 % of the pneumonias. Every
  target is reachable: at the lowest score everything is called positive.

Youden's and the target-sensitivity threshold are always one of the observed scores, so on
the validation data ``score >= threshold`` reproduces the reported sensitivity and
specificity exactly; for ``prior`` they are measured at its threshold.
With one class missing from the validation data no threshold can be chosen (``None``:
evaluate and predict then use argmax).

Which class is positive: the second class in sorted order, unless exactly one of the two
names means "no finding" (normal, negative, healthy, benign, ...), then the other one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpitrain.config import THRESHOLD_POLICIES as POLICIES  # --threshold-policy: one list, in config.py
from mpitrain.engine.metrics import roc_curve

_NO_FINDING = frozenset(
    {
        "normal",
        "negative",
        "neg",
        "healthy",
        "benign",
        "no",
        "none",
        "no_finding",
        "no finding",
        "nofinding",
        "control",
        "0",
        "false",
    }
)


@dataclass(frozen=True)
class Choice:
    """A chosen threshold and how it does on the data it was chosen on."""

    threshold: float | None
    method: str
    sensitivity: float | None = None
    specificity: float | None = None
    target_sensitivity: float | None = None
    reason: str = ""  # why no threshold could be chosen

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "threshold_method": self.method,
            "target_sensitivity": self.target_sensitivity,
            "val_sensitivity": self.sensitivity,
            "val_specificity": self.specificity,
        }


def positive_index(classes: list[str]) -> int | None:
    """Index of the positive class of a two-class problem; None with more classes."""
    if len(classes) != 2:
        return None
    plain = [c.strip().lower() for c in classes]
    normal = [i for i, c in enumerate(plain) if c in _NO_FINDING]
    return 1 - normal[0] if len(normal) == 1 else 1


def choose_threshold(y_positive, scores, target_sensitivity: float | None = None) -> Choice:
    """Threshold on ``scores`` (P(positive)) for labels ``y_positive`` (1 = positive).

    With ``target_sensitivity`` the target-sensitivity rule is used, else Youden's J.
    """
    method = "youden" if target_sensitivity is None else "target_sensitivity"
    if target_sensitivity is not None and not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    y = np.asarray(y_positive).reshape(-1).astype(bool)
    if not y.any() or y.all():
        missing = "positive" if not y.any() else "negative"
        return Choice(
            None, method, target_sensitivity=target_sensitivity, reason=f"no {missing} images in the validation data"
        )
    fpr, tpr, thresholds = roc_curve(y, scores)
    # Point 0 is (0, 0) at +inf: "nothing positive", never a usable threshold.
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    if target_sensitivity is None:
        j = tpr - fpr
        i = int(np.flatnonzero(j == j.max())[-1])  # ties: lowest threshold, most sensitive
    else:
        # tpr is non-decreasing as the threshold falls; take the first point that reaches
        # the target. The small tolerance keeps e.g. 19/20 from missing 0.95 by rounding.
        i = int(np.flatnonzero(tpr >= target_sensitivity - 1e-12)[0])
    return Choice(float(thresholds[i]), method, float(tpr[i]), float(1.0 - fpr[i]), target_sensitivity)


def prior_threshold(class_counts, class_weights, positive: int) -> float:
    """P(positive) at which the odds equal the trained-with odds of the two classes.

    A model trained with loss weight w_c on class c (n_c training images) estimates
    P(c | x) for class priors proportional to w_c n_c. Calling an image positive when
    P(pos) / P(neg) >= (w_pos n_pos) / (w_neg n_neg) is the decision of a world where both
    classes are equally likely: 0.5 for balanced weights, n_pos / n without weights.
    """
    eff = np.asarray(class_counts, dtype=np.float64) * np.asarray(class_weights, dtype=np.float64)
    pos, neg = eff[positive], eff[1 - positive]
    if pos + neg <= 0:
        return 0.5
    return round(float(pos / (pos + neg)), 6)  # float32 weights: 0.5, not 0.50000001


def at_threshold(y_positive, scores, threshold: float) -> tuple[float | None, float | None]:
    """(sensitivity, specificity) of ``scores >= threshold``; None for an absent class."""
    y = np.asarray(y_positive).reshape(-1).astype(bool)
    called = np.asarray(scores, dtype=np.float64).reshape(-1) >= threshold
    sens = float(called[y].mean()) if y.any() else None
    spec = float((~called[~y]).mean()) if (~y).any() else None
    return sens, spec


def choose_for_classes(
    labels,
    probs,
    classes: list[str],
    target_sensitivity: float | None = None,
    policy: str = "youden",
    class_counts=None,
    class_weights=None,
) -> Choice:
    """The threshold for a model's validation predictions ([n, k] probs, class labels).

    `target_sensitivity` wins over `policy`; policy "prior" needs the training
    `class_counts` and the loss's `class_weights` (one per class)."""
    pos = positive_index(classes)
    if pos is None:
        return Choice(
            None, "argmax", target_sensitivity=target_sensitivity, reason="a threshold applies to two classes only"
        )
    if policy not in POLICIES:
        raise ValueError(f"unknown threshold policy {policy!r}")
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(probs, dtype=np.float64)[:, pos]
    if target_sensitivity is None and policy == "prior":
        t = prior_threshold(class_counts, class_weights, pos)
        sens, spec = at_threshold(labels == pos, scores, t)
        return Choice(t, "prior", sens, spec)
    return choose_threshold(labels == pos, scores, target_sensitivity)


def describe(choice: Choice, positive: str | None) -> str:
    """One line for people: what was chosen, how, and what it does on validation."""
    if choice.threshold is None:
        return f"decision: argmax ({choice.reason})" if choice.reason else "decision: argmax"
    on_val = ", ".join(
        f"{k} {v:.3f}"
        for k, v in (("sensitivity", choice.sensitivity), ("specificity", choice.specificity))
        if v is not None
    )
    if choice.method == "prior":
        return (
            f"threshold {choice.threshold:.4f} on P({positive}): the class odds the loss was "
            f"trained with (--threshold-policy prior, not tuned on validation); on the validation "
            f"data: {on_val or 'n/a'}"
        )
    how = "Youden's J" if choice.method == "youden" else f"sensitivity >= {choice.target_sensitivity:g}"
    return f"threshold {choice.threshold:.4f} on P({positive}) chosen by {how} on the validation data: {on_val}"


def choose_per_label(
    labels,
    probs,
    target_sensitivity: float | None = None,
    policy: str = "prior",
    counts=None,
    weights=None,
) -> list[Choice]:
    """Multi-label: one threshold per label (labels [n, L] with NaN masked, probs [n, L]),
    each chosen as a two-class threshold on that label's unmasked entries, by the same
    policies; `counts` and `weights` are [2, L] (negatives, positives). A label whose
    validation entries lack a value gets the prior threshold (0.5 without `counts`)."""
    y = np.asarray(labels, np.float64)
    p = np.asarray(probs, np.float64)
    out = []
    for i in range(y.shape[1]):
        known = ~np.isnan(y[:, i])
        t, s = y[known, i] > 0.5, p[known, i]
        prior = 0.5 if counts is None else prior_threshold(np.asarray(counts)[:, i], np.asarray(weights)[:, i], 1)
        if target_sensitivity is None and policy == "prior":
            out.append(Choice(prior, "prior", *at_threshold(t, s, prior)))
            continue
        choice = choose_threshold(t, s, target_sensitivity)
        if choice.threshold is None:  # one value missing on validation: the prior, said so
            choice = Choice(prior, "prior", *at_threshold(t, s, prior), target_sensitivity, choice.reason)
        out.append(choice)
    return out


def describe_per_label(thresholds: dict[str, float]) -> str:
    """One line: the labels' thresholds, their range."""
    ts = list(thresholds.values())
    span = f"{min(ts):.4f}" if min(ts) == max(ts) else f"{min(ts):.4f}-{max(ts):.4f}"
    return f"decision: one threshold per label ({len(ts)} labels): {span} (model.json, report.md)"
