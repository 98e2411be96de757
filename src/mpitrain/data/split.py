"""A stratified, seeded train/validation split.

For every class with ``n_c`` images, ``round(n_c * val_fraction)`` of them (rounding
halves up) go to validation, chosen by a seeded permutation. When ``val_fraction > 0``
a class with at least 2 images always gives at least 1 image to validation and always
keeps at least 1 for training; a class with a single image stays in training. The result
depends only on the labels, the fraction and the seed (NumPy's PCG64 generator), so
every MPI rank computes the same split without communicating.
"""

from __future__ import annotations

import math

import numpy as np

from mpitrain.errors import UserError


def val_count(n_c: int, val_fraction: float) -> int:
    """How many of a class's ``n_c`` images go to validation."""
    if val_fraction <= 0 or n_c < 2:
        return 0
    k = math.floor(n_c * val_fraction + 0.5)
    return min(max(k, 1), n_c - 1)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Split indices of ``labels`` into sorted int64 (train_idx, val_idx).

    ``val_fraction`` must be in [0, 1); 0 gives an empty validation set.
    """
    try:
        fraction = float(val_fraction)
    except (TypeError, ValueError):
        raise UserError(f"validation fraction must be a number, got {val_fraction!r}") from None
    if not 0.0 <= fraction < 1.0:  # also rejects NaN
        raise UserError(f"validation fraction must be at least 0 and below 1, got {val_fraction}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
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
    return (np.flatnonzero(~in_val).astype(np.int64),
            np.flatnonzero(in_val).astype(np.int64))
