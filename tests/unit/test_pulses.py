"""Progress pulses (parallel/pulses.py) and master-worker's rounds, with a fake communicator
whose nonblocking barriers complete when the test says so."""

from __future__ import annotations

import numpy as np
import pytest

from mpitrain.parallel.pulses import Pulses
from mpitrain.parallel.strategies import make_sync


class Barriers:
    """ibarrier hands out numbered requests; `done` of them have completed (in order, as
    barriers of one communicator do)."""

    def __init__(self, rank: int = 0, size: int = 2) -> None:
        self.rank, self.size = rank, size
        self.posted = 0
        self.done = 0
        self.tests = 0

    def ibarrier(self):
        self.posted += 1
        return self.posted

    def test(self, request) -> bool:
        self.tests += 1
        return request <= self.done


def test_a_poll_retires_every_completed_pulse_and_reports_the_newest_once():
    comm, said = Barriers(), []
    pulses = Pulses(comm, said.append)
    for step in (1, 2, 3, 4):
        pulses.post(f"step {step}")
    assert len(pulses) == 4 and said == []  # nothing completed: nothing retired or said
    comm.done = 3
    assert pulses.poll() is True
    assert len(pulses) == 1  # all three completed ones at once, not one per poll
    assert said == ["every rank has finished step 3"]
    assert pulses.poll() is False and said == ["every rank has finished step 3"]
    comm.done = 4
    pulses.wait()
    assert len(pulses) == 0 and said[-1] == "every rank has finished step 4"


def test_a_pulse_behind_an_open_one_is_not_retired_first():
    # Oldest first: a completed request behind a pending one stays (barriers complete in
    # order; retiring out of order would report progress that has not happened).
    comm = Barriers()
    pulses = Pulses(comm, lambda _: None)
    pulses.post("a")
    pulses.post("b")
    comm.test = lambda request: request == 2  # only the newer one says it completed
    assert pulses.poll() is False and len(pulses) == 2


@pytest.mark.parametrize(("sync_every", "rounds"), [(None, [7]), (3, [3, 6, 7]), (7, [7]), (2, [2, 4, 6, 7])])
def test_master_worker_averages_every_k_steps_and_at_the_epochs_end(sync_every, rounds):
    # The round at the epoch's last step comes whether or not K divides the epoch: without
    # it the master would validate and save weights without the workers' last steps.
    comm = Barriers(rank=1, size=3)
    sync = make_sync("master-worker", comm, sync_every)
    step, seen = [0], []
    sync._round = lambda: seen.append(step[0])
    for step[0] in range(1, 8):
        comm.done = comm.posted + 1  # the pulse about to be posted completes at once
        sync.after_step(step[0], 7, samples=16)
    assert seen == rounds
    assert sync.round_samples == 16 * 7  # _round (faked) resets it; the real one is below


def test_a_round_is_the_sample_weighted_mean_of_the_workers():
    class Gathering(Barriers):
        def gather_flat(self, mine, root):
            # rows of the master (0 samples), and two workers with 1 and 3 samples
            return np.stack([np.append(np.full(2, 9.0), 0.0), np.append(np.full(2, 1.0), 1.0), mine])

        def bcast_(self, buf, root):
            return buf

    class Flat:
        def __init__(self):
            self.buffer = np.full(2, 5.0, np.float32)
            self.unpacked = False

        def pack(self):
            pass

        def unpack(self):
            self.unpacked = True

    comm = Gathering(rank=0, size=3)
    sync = make_sync("master-worker", comm, None)
    sync.weights = Flat()
    sync.round_samples = 3
    sync.trains = True  # this fake rank 0 plays the worker with 3 samples in its own row
    sync._round()
    np.testing.assert_allclose(sync.weights.buffer, [(1 * 1.0 + 3 * 5.0) / 4] * 2)
    assert sync.weights.unpacked and sync.round_samples == 0 and sync.rounds == 1
