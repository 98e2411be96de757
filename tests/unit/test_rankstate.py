"""A rank's state (parallel/rankstate.py): byte packing, gather/scatter over a SingleComm, refusals."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras = pytest.importorskip("keras")

from mpitrain.engine.checkpoint import Checkpoint  # noqa: E402
from mpitrain.errors import AgreedError  # noqa: E402
from mpitrain.parallel.comm import SingleComm  # noqa: E402
from mpitrain.parallel.rankstate import RankState, _pack, _unpack  # noqa: E402
from mpitrain.parallel.strategies import make_sync  # noqa: E402


def test_pack_unpack_round_trip_over_dtypes_and_shapes():
    rng = np.random.default_rng(0)
    arrays = [
        rng.normal(size=(3, 4)).astype(np.float32),
        np.arange(5, dtype=np.int64),
        np.array(2.5),
        np.zeros((0, 3), np.float32),
        rng.integers(0, 255, (2, 2, 2)).astype(np.uint8),
        np.array([True, False, True]),
        rng.normal(size=7).astype(np.float16),
        np.asfortranarray(rng.normal(size=(3, 2))),  # not C-contiguous
        np.array([1, 2], dtype=np.uint32),
    ]
    buf = _pack(arrays)
    assert buf.dtype == np.uint8 and buf.ndim == 1
    assert buf.size == sum(a.nbytes for a in arrays)
    out = _unpack(buf, arrays)
    assert len(out) == len(arrays)
    for a, b in zip(arrays, out):
        assert b.dtype == a.dtype and b.shape == a.shape
        assert np.array_equal(a, b)
    buf[:] = 0  # the unpacked arrays own their memory
    assert np.array_equal(out[0], arrays[0])


def _model_and_optimizer(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    opt = keras.optimizers.Adam(1e-3)
    opt.build(model.trainable_variables)
    rng = np.random.default_rng(seed)
    for v in opt.variables:  # non-trivial optimizer state: moments and the step counter
        v.assign(
            rng.integers(1, 100, v.shape).astype(v.dtype)
            if "int" in str(v.dtype)
            else rng.normal(size=v.shape).astype(v.dtype)
        )
    return model, opt


def _state(seed, strategy="master-worker"):
    model, opt = _model_and_optimizer(seed)
    # Master-worker needs 2 ranks: its counters are what matters here, so the strategy sees a
    # 2-rank world (rank 0, the master); the exchanges below use a real SingleComm.
    world = SingleComm()
    world.size = 2
    sync = make_sync(strategy, world, None)
    return RankState(model, opt, sync), model, opt, sync


def _now(state):
    return [np.array(v.numpy()) for v in state.variables]


def test_arrays_hold_every_variable_the_sums_and_the_strategy_counters():
    state, model, opt, sync = _state(1)
    sync.round_samples, sync.rounds = 7, 3
    arrays = state.arrays(np.array([10.0, 2.5, 6.0]))
    n = len(model.variables) + len(opt.variables)
    assert len(arrays) == n + 2
    assert any("int" in str(a.dtype) for a in arrays[:n])  # the step counter, exact dtype
    assert arrays[-2].dtype == np.float64 and arrays[-2].tolist() == [10.0, 2.5, 6.0]
    assert arrays[-1].tolist() == [7.0, 3.0]


def test_gather_then_scatter_restores_a_rank_exactly():
    a, _, _, sync_a = _state(1)
    sync_a.round_samples, sync_a.rounds = 7, 3
    comm = SingleComm()
    stats = np.array([12.0, 3.25, 9.0])
    states, identical = a.gather(comm, stats)
    assert identical and len(states) == 1
    saved = _now(a)

    b, _, _, sync_b = _state(2)  # another model and optimizer with other values
    assert not all(np.array_equal(x, y) for x, y in zip(saved, _now(b)))
    ckpt = Checkpoint(epoch=1, step=4, ranks=1, strategy="master-worker", states=states)
    sums = b.scatter(comm, ckpt)
    assert sums.tolist() == stats.tolist()
    for x, y in zip(saved, _now(b)):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert (sync_b.round_samples, sync_b.rounds) == (7, 3)


def test_scatter_from_a_shared_checkpoint_of_more_ranks():
    a, *_ = _state(1, "allreduce")
    states, _ = a.gather(SingleComm(), np.zeros(3))
    b, *_ = _state(2, "allreduce")
    ckpt = Checkpoint(epoch=0, step=2, ranks=3, strategy="allreduce", states=states, shared=True)
    b.scatter(SingleComm(), ckpt)  # allreduce may change the rank count
    assert all(np.array_equal(x, y) for x, y in zip(_now(a), _now(b)))


def test_scatter_refuses_another_rank_count_for_per_rank_states():
    a, *_ = _state(1)
    states, _ = a.gather(SingleComm(), np.zeros(3))
    b, *_ = _state(2)
    before = _now(b)
    ckpt = Checkpoint(epoch=0, step=2, ranks=2, strategy="local-sgd", states=states * 2)
    with pytest.raises(AgreedError, match="written by 2 processes .*local-sgd.* -n 2"):
        b.scatter(SingleComm(), ckpt)
    assert all(np.array_equal(x, y) for x, y in zip(before, _now(b)))  # nothing loaded


class _SecondOfTwo(SingleComm):
    """Rank 0 of a 2-rank world whose scatter hands back what rank 1 would receive."""

    size = 2

    def scatter_rows(self, parts, root=0):
        return parts[1]


def test_an_elastic_run_resumed_by_other_ranks_gives_every_rank_rank_0s_state():
    # An --elastic job that lost a host goes on with fewer ranks (launcher/hostloss.py): every
    # rank starts from rank 0's state (for master-worker the master's), as after a lost rank.
    first, *_ = _state(3)
    (state0,), _ = first.gather(SingleComm(), np.zeros(3))
    others = [_state(seed)[0].gather(SingleComm(), np.full(3, seed))[0][0] for seed in (4, 5)]
    b, *_ = _state(2)
    ckpt = Checkpoint(
        epoch=0, step=2, ranks=3, strategy="master-worker", states=[state0, *others], config={"elastic": True}
    )
    b.scatter(_SecondOfTwo(), ckpt)  # what rank 1 of the 2 left receives
    assert all(np.array_equal(x, y) for x, y in zip(_now(first), _now(b)))
    ckpt.config = {"elastic": False}  # a run that was not elastic must keep its rank count
    with pytest.raises(AgreedError, match="written by 3 processes"):
        b.scatter(_SecondOfTwo(), ckpt)


@pytest.mark.parametrize("damage", ["shape", "dtype", "fewer", "more"])
def test_scatter_refuses_a_state_of_another_model(damage):
    a, *_ = _state(1)
    (state,), _ = a.gather(SingleComm(), np.zeros(3))
    state = list(state)
    if damage == "shape":
        state[0] = np.zeros(state[0].shape + (1,), state[0].dtype)
    elif damage == "dtype":
        state[0] = state[0].astype(np.float64)
    elif damage == "fewer":
        state = state[:-3] + state[-2:]  # one optimizer variable less
    else:
        state = state + [np.zeros(2)]  # one array more, after everything that matches
    b, *_ = _state(2)
    ckpt = Checkpoint(epoch=0, step=0, ranks=1, strategy="master-worker", states=[state])
    with pytest.raises(AgreedError, match="does not match this model and optimizer"):
        b.scatter(SingleComm(), ckpt)


def test_broadcast_on_one_rank_keeps_the_state():
    a, *_ = _state(1)
    before = _now(a)
    sums = a.broadcast(SingleComm())
    assert sums.tolist() == [0.0, 0.0, 0.0]
    assert all(np.array_equal(x, y) for x, y in zip(before, _now(a)))
