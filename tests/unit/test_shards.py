import numpy as np

from mpitrain.data.shards import batch_slices, epoch_order, shard, steps_per_epoch
from mpitrain.dist.strategies import lr_at, scaled_lr


def test_shards_are_disjoint_cover_everything_and_balanced():
    idx = np.arange(103)
    for parts in (1, 2, 3, 5):
        shards = [shard(idx, r, parts, seed=4) for r in range(parts)]
        joined = np.concatenate(shards)
        assert sorted(joined.tolist()) == idx.tolist()
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1


def test_shard_of_an_invalid_part_is_empty():
    assert len(shard(np.arange(10), -1, 4, 0)) == 0
    assert len(shard(np.arange(10), 0, 0, 0)) == 0


def test_epoch_order_is_seeded_and_changes_every_epoch():
    a = epoch_order(50, seed=1, epoch=0, part=0)
    assert np.array_equal(a, epoch_order(50, seed=1, epoch=0, part=0))
    assert not np.array_equal(a, epoch_order(50, seed=1, epoch=1, part=0))
    assert not np.array_equal(a, epoch_order(50, seed=2, epoch=0, part=0))
    assert sorted(a.tolist()) == list(range(50))


def test_every_rank_takes_the_same_number_of_steps():
    # shards of 34 and 33 with batch 8: both take 5 steps, the shorter one a smaller last batch
    steps = steps_per_epoch(34, 8)
    assert steps == 5
    for n in (34, 33):
        batches = batch_slices(np.arange(n), steps, 8)
        assert len(batches) == steps
        assert sum(len(b) for b in batches) == n
    assert steps_per_epoch(0, 8) == 1


def test_lr_scaling_and_warmup():
    assert scaled_lr(0.1, "linear", 4) == 0.4
    assert abs(scaled_lr(0.1, "sqrt", 4) - 0.2) < 1e-12
    assert scaled_lr(0.1, "none", 4) == 0.1
    rates = [lr_at(0.1, 0.4, 10, s) for s in range(12)]
    assert rates[0] > 0.1 and rates[9] == 0.4 and rates[11] == 0.4
    assert all(a < b for a, b in zip(rates[:9], rates[1:10]))
    assert lr_at(0.1, 0.4, 0, 0) == 0.4
