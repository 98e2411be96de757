"""What every strategy is: the `Sync` base class, its hooks and rules, and the lr rules.

The trainer calls the same hooks on every rank in the same order, so each collective in a
strategy is entered by all ranks exactly once per call site (the rule that keeps MPI from
deadlocking):

    start(model, optimizer)      once, before the first step
    reduce_step(buffer)          inside every train step   (allreduce only)
    after_step(step, steps, n)   after every step           (local-sgd, master-worker)
    end_epoch()                  after the last step of every epoch
    settle()                     before a collective that needs every rank's steps so far
                                 (a checkpoint): returns once they are done
    stop_agreed(step, steps)     after every step: have the ranks agreed to stop here?
    stop_vote()                  after every epoch's checkpoint: the same, blocking

Stopping on request (SIGTERM/SIGUSR1 to any rank, `parallel/preempt.py`) is decided by a vote:
every rank contributes whether it was asked (`stop_requested()`), and all of them learn the
sum after the same step, so they checkpoint together and stop. The vote rides on a
collective the strategy has anyway where it has one at a step (allreduce: the gradient
sum; local-sgd: the weight average every K steps); otherwise (master-worker, whose steps
have no collective) it is a nonblocking one-number sum posted every `vote_every` steps
and read `vote_every` steps later, so no rank waits for it unless it is that far ahead of
the slowest. Never a blocking collective per step.

A strategy also says which ranks train (`trains`), how many do (`train_ranks`), and which
part of the training and validation data this rank owns. Everything else that is
particular to one strategy is a class attribute or class method here, overridden in the
strategy's own module: how many processes it needs (`min_ranks`), what "auto" means for
it (`default_sync_every`, `auto_lr`), how it describes the ranks' roles and tags the
epoch lines. Defining a subclass with a `name` registers it (see `__init__.py`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from mpitrain.errors import UserError
from mpitrain.parallel.flat import FlatVars, float_vars, frozen_weights, moving_averages

if TYPE_CHECKING:
    from mpitrain.parallel.comm import Comm, Request

REGISTRY: dict[str, type[Sync]] = {}


class Sync:
    name: str = ""  # the --strategy value; set by every strategy
    per_step_reduce = False
    min_ranks = 1  # processes the strategy needs
    min_ranks_why = ""  # e.g. "1 master + workers"
    default_sync_every: int | None = None  # what --sync-every "auto" (None) means
    auto_lr: tuple[str, str] = ("sqrt", "cosine")  # (--lr-scaling, --lr-schedule) for "auto"
    compressions: tuple[str, ...] = ("none",)  # --compress values the strategy can apply
    overlaps = False  # whether it can sum a step's gradients in buckets during backprop (--overlap)
    exchange: Any = None  # --overlap's `parallel.overlap.Exchange` of this rank, when on
    vote_every = 8  # steps between nonblocking stop votes (strategies without a per-step collective)
    # Whether --ema's moving average stays the same on every rank (allreduce: the same steps
    # everywhere; local-sgd: averaged with the weights); why not, where it does not.
    ema_why_not = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name:
            if name in REGISTRY and REGISTRY[name] is not cls:
                raise TypeError(f"two strategies are named {name!r}: {REGISTRY[name]} and {cls}")
            REGISTRY[name] = cls

    # ---- rules of the strategy (class level: usable before any process starts) ----

    @classmethod
    def too_few_ranks(cls, size: int) -> str | None:
        """Why `size` processes cannot run this strategy, or None if they can."""
        if size >= cls.min_ranks:
            return None
        why = f" ({cls.min_ranks_why})" if cls.min_ranks_why else ""
        return f"--strategy {cls.name} needs at least {cls.min_ranks} processes{why}"

    @classmethod
    def check_ranks(cls, size: int) -> None:
        """Raise the one-line UserError when `size` processes are too few (the same line
        wherever it is found: the launcher, `train` on each rank, `bench`)."""
        problem = cls.too_few_ranks(size)
        if problem:
            raise UserError(f"{problem}: use -n {cls.min_ranks} or more")

    @classmethod
    def check_compress(cls, compress: str) -> None:
        """One-line UserError when this strategy cannot apply `--compress compress`."""
        if compress not in cls.compressions:
            users = sorted(name for name, c in REGISTRY.items() if compress in c.compressions)
            raise UserError(
                f"--compress {compress} compresses the gradients of {' / '.join(users) or 'no strategy'}; "
                f"--strategy {cls.name} takes --compress {' or '.join(cls.compressions)}"
            )

    @classmethod
    def check_overlap(cls, overlap: str) -> None:
        """One-line UserError for `--overlap on` with a strategy that has no per-step sum."""
        if overlap == "on" and not cls.overlaps:
            users = sorted(name for name, c in REGISTRY.items() if c.overlaps)
            raise UserError(
                f"--overlap on overlaps the per-step gradient sum of --strategy {' / '.join(users)}; "
                f"--strategy {cls.name} has none: drop --overlap (or give --overlap off)"
            )

    @classmethod
    def check_ema(cls, ema: float | None) -> None:
        """One-line UserError when this strategy cannot keep `--ema ema` (None: off)."""
        if ema is not None and cls.ema_why_not:
            users = sorted(name for name, c in REGISTRY.items() if not c.ema_why_not)
            raise UserError(f"--ema with --strategy {cls.name}: {cls.ema_why_not}; use --strategy {' or '.join(users)}")

    @classmethod
    def train_ranks_of(cls, size: int) -> int:
        """How many of `size` ranks train (the learning rate is scaled by this)."""
        return size

    @classmethod
    def describe_roles(cls, size: int) -> str:
        return f"{size} training rank{'s' * (size > 1)}"

    @staticmethod
    def data_parts(rank: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(training part, validation part) of `rank`, each as (part, parts)."""
        return (rank, size), (rank, size)

    # ---- one rank's instance ----

    def __init__(
        self,
        comm: Comm,
        sync_every: int | None = None,
        progress: Callable[[str], None] | None = None,
        stop_requested: Callable[[], bool] | None = None,
        compress: str = "none",
        bucket_bytes: float = 0.0,
    ) -> None:
        """`progress(what)` is called while this rank waits for peers that are still
        working (the trainer passes its watchdog's beat); `stop_requested()` says whether
        this rank was asked to stop (the trainer passes `preempt.requested`).
        `bucket_bytes`: --overlap's bucket size (0: no overlap)."""
        self.check_ranks(comm.size)
        self.check_compress(compress)
        self.compress = compress
        self.bucket_bytes = bucket_bytes if self.overlaps else 0.0
        self.comm = comm
        self.sync_every = sync_every
        self.progress = progress or (lambda what: None)
        self.stop_requested = stop_requested or (lambda: False)
        self._vote: tuple[np.ndarray, Request] | None = None  # the pending nonblocking stop vote
        self.comm_seconds = 0.0  # time spent inside collectives, for `bench`
        self.trains = True
        self.train_ranks = self.train_ranks_of(comm.size)
        self.train_part, self.val_part = self.data_parts(comm.rank, comm.size)

    @property
    def tag(self) -> str:
        """How the epoch lines name the run, e.g. "allreduce x4"."""
        return f"{self.name} x{self.train_ranks}"

    def attach(self, model, optimizer) -> None:
        """Know the variables to exchange (no communication)."""
        self.model = model
        self.weights = FlatVars(float_vars(model.weights))
        self.state = FlatVars(float_vars(optimizer.variables))
        # What training moves, for the strategies that average it: the weights of the layers
        # that train, and their non-trainable state (batch-norm statistics). The engine attaches
        # again when a callback changes what trains (Engine.rebuild_step).
        frozen = frozen_weights(model)
        self.trained = [v for v in self.weights.variables if id(v) not in frozen]
        # --ema: the optimizer's moving averages of the weights that train (none without it).
        trained = {id(v) for v in self.trained}
        self.averages = [a for v, a in moving_averages(optimizer) if id(v) in trained]
        self.statistics = [v for v in float_vars(model.non_trainable_weights) if id(v) not in frozen]

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

    @property
    def hidden_seconds(self) -> float:
        """--overlap: seconds its exchange thread spent summing (0 for a strategy without)."""
        return 0.0

    def after_step(self, step: int, steps: int, samples: int) -> None:
        pass

    def end_epoch(self) -> None:
        pass

    def settle(self) -> None:
        pass

    def recovery_step(self, done: int) -> int:
        """After a lost rank every survivor adopts rank 0's state, which rank 0 holds after
        `done` steps of the epoch: the step the epoch goes on from (in the old layout)."""
        return done

    # ---- stopping on request: every rank learns the same answer after the same step ----

    def _asked(self) -> float:
        return 1.0 if self.stop_requested() else 0.0

    def stop_agreed(self, step: int, steps: int) -> bool:
        """After step `step` (1-based) of `steps`, on every rank: True on all ranks alike
        once a rank was asked to stop. This default is the nonblocking vote: one posted every
        `vote_every` steps, read (waited for, polling) `vote_every` steps later, none left
        pending across an epoch's end (`stop_vote` decides there)."""
        if self.comm.size == 1:
            return bool(self._asked())
        if step % self.vote_every and step != steps:
            return False
        agreed = False
        if self._vote is not None:
            buf, request = self._vote
            self._vote = None
            self._timed(self._wait, request)
            agreed = bool(buf[0] > 0)
        if step != steps and not agreed:  # (stopping: no request left pending at MPI_Finalize)
            buf = np.array([self._asked()], dtype=np.float64)
            # Collective, nonblocking: every rank posts this vote at the same step.
            self._vote = (buf, self._timed(self.comm.iallreduce_sum_, buf))
        return agreed

    def stop_vote(self) -> bool:
        """Collective, blocking; once per epoch, after its checkpoint, when every rank is
        there anyway: whether any rank was asked to stop (a signal during validation)."""
        return self._timed(self.comm.allreduce_max, self._asked()) > 0

    def _wait(self, request) -> None:
        """Until `request` completes, polling, reporting peers' progress (`_waiting`)."""
        pause = 0.0002
        while not self.comm.test(request):
            self._waiting()
            time.sleep(pause)  # sleep, not spin: ranks often share a node's cores
            pause = min(2 * pause, 0.01)

    def _waiting(self) -> None:
        """Called while this rank waits for a vote: a strategy that can tell how its peers
        progress reports it here (master-worker polls its pulses)."""

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

    def _average_weights(self, variables, vote: bool = False) -> bool:
        """Replace `variables` by their mean over all ranks (one fused allreduce). `vote`:
        a stop vote travels in one more slot of the same buffer; returns whether any rank
        was asked to stop (False without a vote)."""
        if self.comm.size == 1 or not variables:
            return vote and bool(self._asked())
        flat = FlatVars(variables, extra=1 if vote else 0)
        flat.pack()
        if vote:
            flat.buffer[-1] = self._asked()
        self._timed(self.comm.allreduce_sum_, flat.buffer)
        agreed = vote and bool(flat.buffer[-1] > 0)
        flat.buffer /= self.comm.size
        flat.unpack()
        return agreed


def scaled_lr(base: float, scaling: str, ranks: int) -> float:
    """The learning rate of `ranks` training ranks: `base` times ranks, sqrt(ranks) or 1."""
    return {"linear": base * ranks, "sqrt": base * math.sqrt(ranks), "none": base}[scaling]


def lr_at(
    base: float, target: float, warmup_steps: int, global_step: int, total_steps: int = 0, schedule: str = "constant"
) -> float:
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
