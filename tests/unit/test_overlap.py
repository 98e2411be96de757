"""--overlap's parts in one process: the bucket plan, when auto turns it on, the exchange
thread's order and errors, and the one-line refusals (tests/system/test_overlap_mpi.py
checks the sums under MPI)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from mpitrain.config import TrainConfig
from mpitrain.errors import UserError
from mpitrain.parallel.overlap import Exchange, bucket_bytes, plan, wait
from mpitrain.parallel.strategies import resolve


def test_buckets_start_from_the_last_variables_and_close_at_the_size():
    sizes = [10, 250, 10, 250, 10, 500]  # float32: 40, 1000, 40, 1000, 40, 2000 bytes
    assert plan(sizes, 1000) == [[5], [3, 4], [1, 2], [0]]
    assert plan(sizes, 1e9) == [[0, 1, 2, 3, 4, 5]]
    assert plan(sizes, 1) == [[5], [4], [3], [2], [1], [0]]
    assert sorted(i for b in plan(sizes, 1500) for i in b) == list(range(6))  # each variable once


def test_auto_overlaps_only_several_buckets_of_one_backprop_on_several_ranks():
    sizes = [1_000_000] * 8  # 32 MB of float32
    assert bucket_bytes("auto", 25, sizes, ranks=2) == 25e6  # two buckets
    assert bucket_bytes("auto", 64, sizes, ranks=2) == 0  # one bucket: nothing to overlap
    assert bucket_bytes("auto", 25, sizes, ranks=1) == 0  # nothing to sum
    assert bucket_bytes("auto", 25, sizes, ranks=2, accumulate=4) == 0  # sums handed over at the loop's end
    assert bucket_bytes("on", 64, sizes, ranks=2) == 64e6
    assert bucket_bytes("on", 25, sizes, ranks=1) == 0
    assert bucket_bytes("off", 25, sizes, ranks=8) == 0


def test_the_exchange_sums_in_start_order_and_hands_back_every_bucket():
    seen = []

    def reduce(j, buf):
        seen.append(j)
        time.sleep(0.01 * (3 - j))  # the first bucket takes longest: order must still hold
        return buf * 2

    ex = Exchange(reduce)
    for step in range(2):
        for j in range(3):
            ex.start(j, np.full(2, j + step, np.float32))
        outs = ex.finish(3)
        assert [o.tolist() for o in outs] == [[2.0 * (j + step)] * 2 for j in range(3)]
    assert seen == [0, 1, 2, 0, 1, 2]
    assert ex.busy_seconds > 0.1


def test_a_failed_sum_is_raised_by_finish_on_the_steps_thread():
    def reduce(j, buf):
        if j == 1:
            raise RuntimeError("peer lost")
        return buf

    ex = Exchange(reduce)
    for j in range(3):
        ex.start(j, np.zeros(1, np.float32))
    with pytest.raises(RuntimeError, match="peer lost"):
        ex.finish(3)
    assert threading.current_thread() is threading.main_thread()


def test_wait_returns_once_the_request_is_done():
    calls = []
    wait(lambda: calls.append(1) or len(calls) >= 5)
    assert len(calls) == 5


@pytest.mark.parametrize("strategy", ["local-sgd", "master-worker"])
def test_overlap_on_is_refused_for_a_strategy_without_a_per_step_sum(strategy):
    with pytest.raises(UserError, match="--overlap on overlaps the per-step gradient sum of --strategy allreduce") as e:
        resolve(TrainConfig(strategy=strategy, overlap="on"))
    assert "\n" not in str(e.value)
    resolve(TrainConfig(strategy=strategy))  # auto: off for them, no error


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("overlap", "yes", "--overlap must be one of auto, on, off"),
        ("bucket_mb", 0.0, "--bucket-mb must be a number > 0"),
        ("bucket_mb", float("nan"), "--bucket-mb must be a number > 0"),
    ],
)
def test_bad_values_are_refused_by_the_config_and_the_engine(option, value, says):
    from mpitrain.engine import Options

    for make in (TrainConfig, Options):
        with pytest.raises(UserError, match=says):
            make(**{option: value})


def test_the_threads_allow_overlap_only_where_it_may_run():
    from mpitrain.train.models import may_overlap

    assert may_overlap("auto", "resnet50", "allreduce", 2)  # a big model: it may
    assert not may_overlap("auto", "seed", "allreduce", 2)  # the registry's fill one bucket
    assert may_overlap("on", "seed", "allreduce", 2)
    assert not may_overlap("on", "resnet50", "allreduce", 1)
    assert not may_overlap("auto", "resnet50", "local-sgd", 4)
    assert not may_overlap("off", "resnet50", "allreduce", 4)
