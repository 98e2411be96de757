"""Class priors: the mix a model was trained for, and the mix of the images it is shown.

A model trained with loss weight w_c on the n_c training images of class c estimates
P(c | x) for a world whose classes occur in proportion to w_c n_c (`loss_prior`): equal
shares with ``--class-weight balanced``, the training shares without weights. Shown images
of another mix, its probabilities are those of the wrong world. ``evaluate --adjust-prior``
estimates the evaluated images' mix from the model's own predictions and corrects them,
by the EM procedure of Saerens, Latinne & Decaestecker (2002, Neural Computation 14:21-41):

    p_s(c | x) ∝ p(c | x) · pi_s(c) / pi_train(c),   pi_{s+1}(c) = mean over images of p_s(c | x)

starting from pi_0 = pi_train. With calibrated probabilities pi converges to the true mix
(tested on generated predictions, tests/unit/test_prior.py); the corrected probabilities
then decide as a Bayes rule for that mix (argmax: the most accurate decision on these
images), which is what a new site with more or fewer sick patients needs when nobody has
labelled its images. It uses no labels: only the predictions of the images evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpitrain.errors import UserError


def loss_prior(class_counts, class_weights) -> list[float]:
    """The class shares the training loss saw: counts x weights, normalised (6 digits)."""
    eff = np.asarray(class_counts, np.float64) * np.asarray(class_weights, np.float64)
    total = float(eff.sum())
    if total <= 0:
        return [round(1.0 / len(eff), 6)] * len(eff)
    return [round(float(v / total), 6) for v in eff]


def model_prior(info) -> tuple[np.ndarray, str]:
    """(the prior a model's probabilities assume, where it came from). Runs of mpitrain
    record it (``train_prior`` in model.json); for older two-class runs whose threshold is
    the ``prior`` rule it is the threshold itself; otherwise the training counts."""
    classes = list(info.classes)
    members = info.members or [info]
    recorded = [m.extra.get("train_prior") for m in members]
    if all(recorded):
        prior = np.mean([[r[c] for c in classes] for r in recorded], axis=0)
        return prior / prior.sum(), "recorded with the model" + ("s" if len(members) > 1 else "")
    t = info.threshold
    if len(classes) == 2 and info.threshold_method == "prior" and t is not None and info.positive is not None:
        prior = np.empty(2)
        prior[info.positive], prior[1 - info.positive] = t, 1.0 - t
        return prior, "the model's prior threshold"
    counts = members[0].extra.get("train_class_counts")
    if not counts:
        raise UserError("--adjust-prior: the model records no training class mix (train it again with this version)")
    prior = np.array([float(counts.get(c, 0)) for c in classes])
    return prior / prior.sum(), "the training class counts (no class weights recorded)"


@dataclass
class Adjusted:
    probs: np.ndarray  # float32 [n, k]: the corrected probabilities
    prior: np.ndarray  # the estimated class mix of the images
    iterations: int
    converged: bool


def adjust(probs: np.ndarray, train_prior, max_iter: int = 1000, tol: float = 1e-7) -> Adjusted:
    """Saerens-Latinne-Decaestecker EM: the images' class mix and the corrected probabilities."""
    p = np.asarray(probs, np.float64)
    w = np.asarray(train_prior, np.float64)
    if p.ndim != 2 or p.shape[1] != len(w):
        raise ValueError(f"probabilities {p.shape} do not match a prior of {len(w)} classes")
    w = np.clip(w / w.sum(), 1e-12, None)
    pi = w.copy()
    post = p
    for it in range(1, max_iter + 1):
        post = p * (pi / w)
        post /= np.clip(post.sum(axis=1, keepdims=True), 1e-300, None)
        new = post.mean(axis=0)
        done = float(np.abs(new - pi).max()) < tol
        pi = new
        if done:
            return Adjusted(post.astype(np.float32), pi, it, True)
    return Adjusted(post.astype(np.float32), pi, max_iter, False)
