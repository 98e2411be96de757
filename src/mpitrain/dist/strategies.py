"""How ranks stay in step: the three strategies, each a small class over a `Comm`.

The trainer calls the same hooks on every rank in the same order, so each collective below
is entered by all ranks exactly once per call site (the rule that keeps MPI from
deadlocking):

    start(model, optimizer)      once, before the first step
    reduce_step(buffer)          inside every train step   (allreduce only)
    after_step(step, steps, n)   after every step           (local-sgd, master-worker)
    end_epoch()                  after the last step of every epoch

A strategy also says which ranks train (`trains`), how many do (`train_ranks`), and which
part of the training and validation data this rank owns.
"""

from __future__ import annotations

import math
import time

import numpy as np

from mpitrain.dist.flat import FlatVars, float_vars


class Sync:
    name = "none"
    per_step_reduce = False

    def __init__(self, comm, sync_every: int | None = None):
        self.comm = comm
        self.sync_every = sync_every
        self.comm_seconds = 0.0  # time spent inside collectives, for `bench`
        self.trains = True
        self.train_ranks = comm.size
        self.train_part, self.val_part = self.data_parts(comm.rank, comm.size)

    @staticmethod
    def data_parts(rank: int, size: int):
        """(training part, validation part) of `rank`, each as (part, parts)."""
        return (rank, size), (rank, size)

    def attach(self, model, optimizer) -> None:
        """Know the variables to exchange (no communication)."""
        self.model = model
        self.weights = FlatVars(float_vars(model.weights))
        self.state = FlatVars(float_vars(optimizer.variables))

    def start(self, model, optimizer) -> None:
        """Same initial weights and optimizer state everywhere: broadcast from rank 0.

        Every rank builds the model from the same seed, but kernels and library versions
        may differ between nodes; the broadcast makes identical starts a fact, not a hope.
        """
        self.attach(model, optimizer)
        for flat in (self.weights, self.state):
            if self.comm.size > 1 and flat.size:
                flat.pack()
                self._timed(self.comm.bcast_, flat.buffer, 0)
                flat.unpack()

    def reduce_step(self, buf: np.ndarray) -> np.ndarray:
        return buf

    def after_step(self, step: int, steps: int, samples: int) -> None:
        pass

    def end_epoch(self) -> None:
        pass

    def checksum(self) -> str:
        return self.weights.checksum()

    def extra_state(self) -> np.ndarray:
        """The strategy's own counters, saved in checkpoints."""
        return np.zeros(2, dtype=np.float64)

    def load_extra_state(self, a: np.ndarray) -> None:
        pass

    def _timed(self, fn, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.comm_seconds += time.perf_counter() - t

    def _average_weights(self, variables) -> None:
        """Replace `variables` by their mean over all ranks (one fused allreduce)."""
        if self.comm.size == 1 or not variables:
            return
        flat = FlatVars(variables)
        flat.pack()
        self._timed(self.comm.allreduce_sum_, flat.buffer)
        flat.buffer /= self.comm.size
        flat.unpack()


class AllreduceSync(Sync):
    """Gradients (with the step's sample count, loss sum and hits) summed every step."""

    name = "allreduce"

    def __init__(self, comm, sync_every=None):
        super().__init__(comm, sync_every)
        self.per_step_reduce = comm.size > 1

    def reduce_step(self, buf: np.ndarray) -> np.ndarray:
        # Called from tf.numpy_function inside the compiled step; every rank calls it once
        # per step, in step order, so the allreduces pair up. The input may alias TF
        # memory, so reduce a private copy.
        out = np.array(buf, dtype=np.float32, copy=True)
        self._timed(self.comm.allreduce_sum_, out)
        return out

    def end_epoch(self) -> None:
        # Trainable weights are identical by construction (same summed gradients, same
        # optimizer). Non-trainable float state (e.g. batch-norm statistics) is computed
        # from local batches and drifts, so it is averaged once per epoch.
        self._average_weights(float_vars(self.model.non_trainable_weights))


class LocalSGDSync(Sync):
    """Independent steps; weights averaged every K steps and at every epoch end.

    Optimizer state (Adam moments, momentum) stays local: averaging it would triple the
    traffic of each sync, and after a sync every rank's state still describes the same
    recent gradient statistics of its own data, which is what it is used for.
    """

    name = "local-sgd"

    def after_step(self, step: int, steps: int, samples: int) -> None:
        if self.sync_every and step % self.sync_every == 0 and step != steps:
            self._average_weights(self.weights.variables)

    def end_epoch(self) -> None:
        self._average_weights(self.weights.variables)


class MasterWorkerSync(Sync):
    """Rank 0 holds the global model and does not train; ranks 1.. are workers.

    Every round (K steps, default one epoch) each worker sends its weights and the number
    of samples it trained on since the last round; the master replaces the global weights
    by the sample-weighted mean and sends them back.
    """

    name = "master-worker"

    def __init__(self, comm, sync_every=None):
        super().__init__(comm, sync_every)
        self.trains = comm.rank != 0
        self.train_ranks = comm.size - 1
        self.round_samples = 0
        self.rounds = 0

    @staticmethod
    def data_parts(rank: int, size: int):
        # Workers share the training data; the master validates the global model on the
        # whole validation set.
        return (rank - 1, size - 1), ((0, 1) if rank == 0 else (0, 0))

    def after_step(self, step: int, steps: int, samples: int) -> None:
        self.round_samples += samples
        if step == steps or (self.sync_every and step % self.sync_every == 0):
            self._round()

    def extra_state(self) -> np.ndarray:
        return np.array([self.round_samples, self.rounds], dtype=np.float64)

    def load_extra_state(self, a: np.ndarray) -> None:
        self.round_samples, self.rounds = int(a[0]), int(a[1])

    def _round(self) -> None:
        flat = self.weights
        flat.pack()
        # Two collectives in fixed order on every rank: Gather (weights and counts) then Bcast.
        # The master's own row is ignored: it carries zero samples.
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


STRATEGY_CLASSES = {c.name: c for c in (AllreduceSync, LocalSGDSync, MasterWorkerSync)}


def make_sync(strategy: str, comm, sync_every: int | None) -> Sync:
    return STRATEGY_CLASSES[strategy](comm, sync_every)


def scaled_lr(base: float, scaling: str, ranks: int) -> float:
    return {"linear": base * ranks, "sqrt": base * math.sqrt(ranks), "none": base}[scaling]


def lr_at(base: float, target: float, warmup_steps: int, global_step: int,
          total_steps: int = 0, schedule: str = "constant") -> float:
    """The learning rate of one step.

    Linear warm-up from the single-rank rate `base` to the scaled rate `target` (Goyal et
    al. 2017), then `target` ("constant") or a cosine decay from `target` towards zero at
    `total_steps` ("cosine"), which leaves a settled final model instead of one caught
    mid-oscillation.
    """
    if warmup_steps > 0 and global_step < warmup_steps:
        return base + (target - base) * (global_step + 1) / warmup_steps
    if schedule == "cosine" and total_steps > warmup_steps:
        progress = (global_step - warmup_steps) / (total_steps - warmup_steps)
        return target * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return target
