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

import numpy as np

from mpitrain.dist.flat import FlatVars, float_vars
from mpitrain.errors import UserError

REGISTRY: dict[str, type["Sync"]] = {}


class Sync:
    name: str = ""                     # the --strategy value; set by every strategy
    per_step_reduce = False
    min_ranks = 1                      # processes the strategy needs
    min_ranks_why = ""                 # e.g. "1 master + workers"
    default_sync_every: int | None = None         # what --sync-every "auto" (None) means
    auto_lr: tuple[str, str] = ("sqrt", "cosine")  # (--lr-scaling, --lr-schedule) for "auto"
    compressions: tuple[str, ...] = ("none",)      # --compress values the strategy can apply

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
            raise UserError(f"--compress {compress} compresses the gradients of {' / '.join(users) or 'no strategy'}; "
                            f"--strategy {cls.name} takes --compress {' or '.join(cls.compressions)}")

    @classmethod
    def train_ranks_of(cls, size: int) -> int:
        """How many of `size` ranks train (the learning rate is scaled by this)."""
        return size

    @classmethod
    def describe_roles(cls, size: int) -> str:
        return f"{size} training rank{'s' * (size > 1)}"

    @staticmethod
    def data_parts(rank: int, size: int):
        """(training part, validation part) of `rank`, each as (part, parts)."""
        return (rank, size), (rank, size)

    # ---- one rank's instance ----

    def __init__(self, comm, sync_every: int | None = None, progress=None, compress: str = "none"):
        """`progress(what)` is called while this rank waits for peers that are still
        working (the trainer passes its watchdog's beat)."""
        self.check_ranks(comm.size)
        self.check_compress(compress)
        self.compress = compress
        self.comm = comm
        self.sync_every = sync_every
        self.progress = progress or (lambda what: None)
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

    def settle(self) -> None:
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


def scaled_lr(base: float, scaling: str, ranks: int) -> float:
    """The learning rate of `ranks` training ranks: `base` times ranks, sqrt(ranks) or 1."""
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
