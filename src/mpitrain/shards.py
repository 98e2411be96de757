"""Which samples each rank owns, and in which order it visits them each epoch.

Pure numpy, no MPI: every rank computes the same global plan from the same seed, then
keeps its own part. Shards differ in length by at most one sample; the trainer takes
ceil(longest shard / batch) steps on every rank so that no collective ever waits on a rank
that has run out of data (a rank with fewer samples takes a smaller last batch).
"""

from __future__ import annotations

import math

import numpy as np


def shard(indices: np.ndarray, part: int, parts: int, seed: int) -> np.ndarray:
    """The `part`-th of `parts` disjoint shards of `indices` (seeded shuffle, then strided).

    Striding a shuffled list gives every shard about the same class mix.
    """
    if parts <= 0 or not 0 <= part < parts:
        return np.empty(0, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x5EED])
    shuffled = np.asarray(indices, dtype=np.int64)[rng.permutation(len(indices))]
    return np.sort(shuffled[part::parts])


def epoch_order(n: int, seed: int, epoch: int, part: int) -> np.ndarray:
    """Positions 0..n-1 of one shard in the order visited in `epoch` (new each epoch)."""
    rng = np.random.default_rng([seed, epoch, part, 0xE90C])
    return rng.permutation(n)


def batch_rng(seed: int, epoch: int, rank: int, step: int, tag: int) -> np.random.Generator:
    """The generator of one batch's draws: a function of its position in the run and of
    `tag` (one per use: augmentation, mixup), nothing else. So a resumed run draws exactly
    what the uninterrupted one drew, and no generator state needs saving."""
    return np.random.default_rng([int(seed), int(epoch), int(rank), int(step), int(tag)])


def steps_per_epoch(longest_shard: int, batch_size: int) -> int:
    return max(1, math.ceil(longest_shard / batch_size))


def batch_slices(order: np.ndarray, steps: int, batch_size: int):
    """`steps` index arrays; past the end of the shard they are short or empty."""
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)]
