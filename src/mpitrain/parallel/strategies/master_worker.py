"""master-worker, the seed project's design: rank 0 holds the global model, 1.. train."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from mpitrain.parallel.pulses import Pulses
from mpitrain.parallel.strategies.base import Sync

if TYPE_CHECKING:
    from mpitrain.parallel.comm import Comm


class MasterWorkerSync(Sync):
    """Rank 0 holds the global model and does not train; ranks 1.. are workers.

    Every round (K steps, default one epoch) each worker sends its weights and the number
    of samples it trained on since the last round; the master replaces the global weights
    by the sample-weighted mean and sends them back.

    The master has no steps of its own, and a worker that finishes its round early has
    nothing to do until the others finish theirs; inside the round's blocking Gather
    neither could tell a slow worker from a stuck one. So every rank posts one progress
    pulse per step (`parallel/pulses.py`) and waits for them, polling, before the Gather: a
    worker that keeps stepping keeps every rank's watchdog quiet, one that stops does not.
    """

    name = "master-worker"
    min_ranks = 2
    min_ranks_why = "1 master + workers"
    # Measured on the real chest X-rays (docs/benchmarks.md): one-epoch rounds average
    # workers trained apart, progress more slowly per epoch, and do best with the plain
    # single-rank rate held constant.
    auto_lr = ("none", "constant")
    # The master's model is the one validated and saved, and the master takes no optimizer
    # step: its averaged weights have no moving average to swap in.
    ema_why_not = "the master, whose model is validated and saved, takes no optimizer steps to average"

    def __init__(
        self,
        comm: Comm,
        sync_every: int | None = None,
        progress: Callable[[str], None] | None = None,
        stop_requested: Callable[[], bool] | None = None,
        compress: str = "none",
        bucket_bytes: float = 0.0,
    ) -> None:
        super().__init__(comm, sync_every, progress, stop_requested, compress, bucket_bytes)
        self.trains = comm.rank != 0
        self.round_samples = 0
        self.rounds = 0
        self.pulses = Pulses(comm, self.progress)

    @classmethod
    def train_ranks_of(cls, size: int) -> int:
        return size - 1

    @classmethod
    def describe_roles(cls, size: int) -> str:
        return f"rank 0 = master, ranks 1..{size - 1} = workers"

    @property
    def tag(self) -> str:
        return super().tag + " + master"

    @staticmethod
    def data_parts(rank: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
        # Workers share the training data; the master validates the global model on the
        # whole validation set.
        return (rank - 1, size - 1), ((0, 1) if rank == 0 else (0, 0))

    def after_step(self, step: int, steps: int, samples: int) -> None:
        self.round_samples += samples
        # Collective, nonblocking: one pulse per step on every rank, in step order.
        self._timed(self.pulses.post, f"step {step} of {steps}")
        if step == steps or (self.sync_every and step % self.sync_every == 0):
            self.settle()
            self._round()

    def recovery_step(self, done: int) -> int:
        # The master's weights are the global model of the last round: nothing of the steps
        # since then is in them, so the epoch goes on from that round's start. The master's
        # own `done` only says how far it has posted its pulses (it runs ahead of the
        # workers), which would make the restart point a race.
        return (done // self.sync_every) * self.sync_every if self.sync_every else 0

    def settle(self) -> None:
        """Wait (polling, reporting progress) until every rank has done its steps so far."""
        self._timed(self.pulses.wait)

    # Stop votes: the base class's nonblocking vote every `vote_every` steps (a round may
    # last a whole epoch, too long to wait for a stop); while a rank waits for one, the
    # pulses tell it whether the slower workers are still stepping.
    def _waiting(self) -> None:
        self.pulses.poll()

    def extra_state(self) -> np.ndarray:
        return np.array([self.round_samples, self.rounds], dtype=np.float64)

    def load_extra_state(self, a: np.ndarray) -> None:
        self.round_samples, self.rounds = int(a[0]), int(a[1])

    def _round(self) -> None:
        flat = self.weights
        flat.pack()
        # Two collectives in fixed order on every rank: Gather (weights and counts) then Bcast.
        # The master's own row is ignored: it carries zero samples. Every rank has settled
        # its pulses, so nobody waits here for a peer that is still training.
        mine = np.append(flat.buffer, np.float32(self.round_samples if self.trains else 0))
        rows = self._timed(self.comm.gather_flat, mine, 0)
        if self.comm.rank == 0:
            counts = rows[:, -1].astype(np.float64)
            total = counts.sum()
            if total > 0:
                mean = (counts[:, None] * rows[:, :-1].astype(np.float64)).sum(0) / total
                flat.buffer[:] = mean.astype(np.float32)
        self._timed(self.comm.bcast_, flat.buffer, 0)
        flat.unpack()
        self.round_samples = 0
        self.rounds += 1
