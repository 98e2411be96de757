import numpy as np

from mpitrain.shards import batch_slices, epoch_order, shard, steps_per_epoch


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
