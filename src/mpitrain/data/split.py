"""A stratified, seeded train/validation split, optionally keeping groups (patients) whole.

For every class with ``n_c`` images, ``round(n_c * val_fraction)`` of them (rounding
halves up) go to validation, chosen by a seeded permutation. When ``val_fraction > 0``
a class with at least 2 images always gives at least 1 image to validation and always
keeps at least 1 for training; a class with a single image stays in training. The result
depends only on the labels, the fraction and the seed (NumPy's PCG64 generator), so
every MPI rank computes the same split without communicating.

Multi-label rows (labels [n, L], `findings.py`) have no one class to stratify by: the
whole set is split as one class, by a seeded permutation of its rows (or of its groups),
with the same `val_count` rule.
"""

from __future__ import annotations

import math

import numpy as np

from mpitrain.errors import UserError
from mpitrain.targets import strata


def val_count(n_c: int, val_fraction: float) -> int:
    """How many of a class's ``n_c`` images go to validation."""
    if val_fraction <= 0 or n_c < 2:
        return 0
    k = math.floor(n_c * val_fraction + 0.5)
    return min(max(k, 1), n_c - 1)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices of ``labels`` into sorted int64 (train_idx, val_idx).

    ``val_fraction`` must be in [0, 1); 0 gives an empty validation set.
    """
    try:
        fraction = float(val_fraction)
    except (TypeError, ValueError):
        raise UserError(f"validation fraction must be a number, got {val_fraction!r}") from None
    if not 0.0 <= fraction < 1.0:  # also rejects NaN
        raise UserError(f"validation fraction must be at least 0 and below 1, got {val_fraction}")
    labels = strata(labels)
    n = len(labels)
    if n == 0 or fraction == 0.0:
        return np.arange(n, dtype=np.int64), np.empty(0, dtype=np.int64)

    rng = np.random.default_rng(int(seed))
    in_val = np.zeros(n, dtype=bool)
    for cls in np.unique(labels):  # sorted, so the draws happen in a fixed order
        members = np.flatnonzero(labels == cls)
        k = val_count(len(members), fraction)
        if k:
            in_val[rng.permutation(members)[:k]] = True
    return (np.flatnonzero(~in_val).astype(np.int64), np.flatnonzero(in_val).astype(np.int64))


def grouped_split(
    labels: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Like `stratified_split`, but every group (a patient) lies wholly on one side.

    Each group belongs to the class most of its images have (ties: the lower label). Per
    class, in label order, the class's groups are put in a seeded random order and taken
    into validation while they fit into that class's target count (`val_count` of its
    images); a group that would overshoot is passed over for a smaller one later in the
    order. If the target is not reached, the passed-over group that brings the count
    closest to it is added when that is closer than stopping. A class always keeps at
    least one group for training. With every group a single image this is exactly
    `stratified_split` (same seed, same indices).
    """
    labels = strata(labels)
    groups = np.asarray(groups, dtype=np.int64)
    if groups.shape != labels.shape:
        raise ValueError(f"groups {groups.shape} and labels {labels.shape} differ in shape")
    tr, va = stratified_split(labels, val_fraction, seed)  # validates; the empty cases
    if len(va) == 0:
        return tr, va
    fraction = float(val_fraction)
    n_groups = int(groups.max()) + 1
    n_labels = int(labels.max()) + 1
    counts = np.zeros((n_groups, n_labels), dtype=np.int64)
    np.add.at(counts, (groups, labels), 1)
    size = counts.sum(axis=1)
    group_label = counts.argmax(axis=1)  # ties: the lower label
    present = size > 0
    rng = np.random.default_rng(int(seed))
    take = np.zeros(n_groups, dtype=bool)
    for cls in np.unique(labels):
        members = np.flatnonzero(present & (group_label == cls))  # by first image: file order
        k = val_count(int(size[members].sum()), fraction)
        if k == 0 or len(members) < 2:
            continue
        order = rng.permutation(members)
        got, skipped, left = 0, [], len(order)
        for g in order:
            if got == k:
                break
            if got + size[g] <= k and left > 1:
                take[g], got, left = True, got + int(size[g]), left - 1
            else:
                skipped.append(g)
        if got < k and skipped and left > 1:
            best = min(skipped, key=lambda g: abs(got + int(size[g]) - k))
            if abs(got + int(size[best]) - k) < k - got:
                take[best] = True
    in_val = take[groups]
    return (np.flatnonzero(~in_val).astype(np.int64), np.flatnonzero(in_val).astype(np.int64))
