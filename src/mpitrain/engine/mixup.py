"""--mixup ALPHA (Zhang et al. 2018): each training batch mixed with a shuffled copy of itself.

After augmentation, every image i of the batch takes a lambda_i ~ Beta(ALPHA, ALPHA) and a
partner perm[i] (one permutation of the batch): the image becomes
lambda_i x_i + (1 - lambda_i) x_perm[i] and its target lambda_i onehot(y_i) +
(1 - lambda_i) onehot(y_perm[i]) (smoothed too with --label-smoothing: the train step's
soft-label loss, `steps.soft_loss`). With class weights its loss counts
lambda_i w[y_i] + (1 - lambda_i) w[y_perm[i]].

The draws are a function of the batch's position (seed, epoch, rank, step) alone, like
augmentation's but from a generator of their own (`_TAG`): a resumed run mixes exactly
what the uninterrupted one mixed, and there is no state to checkpoint. It is work on each
rank's own batch, so every strategy takes it as it is (allreduce, local-sgd, and the
workers of master-worker).

Training accuracy and AUC on a mixed batch are scored against each image's dominant label
(y_i where lambda_i >= 0.5, else y_perm[i]); validation is never mixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpitrain.shards import batch_rng

_TAG = 0x31C5  # apart from augmentation's (0xA06) and the shuffle's draws at the same position


def draws(alpha: float, n: int, seed: int, epoch: int, rank: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(lambda float32 [n] in [0, 1], a permutation of range(n)) of the batch at this position."""
    rng = batch_rng(seed, epoch, rank, step, _TAG)
    lam = rng.beta(alpha, alpha, n).astype(np.float32)
    return lam, rng.permutation(n)


@dataclass(frozen=True)
class Mixed:
    """A mixed batch as the train step takes it."""

    x: np.ndarray  # float32 images
    target: np.ndarray  # float32 [n, classes]: the mixed one-hot labels
    weight: np.ndarray  # float32 [n]: each image's loss weight
    label: np.ndarray  # int32 [n]: the dominant label, for accuracy and AUC


def mix(x: np.ndarray, y: np.ndarray, class_w: np.ndarray, lam: np.ndarray, perm: np.ndarray) -> Mixed:
    """The batch (float32 images `x`, int labels `y`) mixed with the draws `lam`, `perm`;
    `class_w`: float32 [classes] loss weights."""
    lam = lam.astype(np.float32)
    rest = np.float32(1) - lam
    shape = (-1,) + (1,) * (x.ndim - 1)
    mixed = lam.reshape(shape) * x + rest.reshape(shape) * x[perm]
    y2 = y[perm]
    rows = np.arange(len(y))
    target = np.zeros((len(y), len(class_w)), np.float32)
    target[rows, y] += lam
    target[rows, y2] += rest  # an image mixed with its own class keeps a target of (about) 1
    weight = lam * class_w[y] + rest * class_w[y2]
    label = np.where(lam >= 0.5, y, y2).astype(np.int32)
    return Mixed(mixed.astype(np.float32, copy=False), target, weight.astype(np.float32), label)
