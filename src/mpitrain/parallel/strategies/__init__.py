"""How ranks stay in step: one strategy per module, found by name.

    base.py           the `Sync` base class (hooks, rules, defaults) and the lr rules
    allreduce.py      gradients summed every step (the default)
    local_sgd.py      weights averaged every K steps
    master_worker.py  rank 0 averages the workers' weights every round

Adding a strategy is one new module here with a `Sync` subclass that sets `name` (and
overrides the hooks and rules it needs): every module of this package is imported below,
and defining the subclass registers it, so the CLI's choices, the config's validation and
"auto" defaults, the trainer and `bench` all know it.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING

from mpitrain.errors import UserError
from mpitrain.parallel.strategies.base import REGISTRY, Sync, lr_at, scaled_lr

if TYPE_CHECKING:
    from mpitrain.parallel.comm import Comm

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def names() -> tuple[str, ...]:
    """Every strategy's --strategy value, sorted."""
    return tuple(sorted(REGISTRY))


def strategy_class(name: str) -> type[Sync]:
    """The class of strategy `name` (KeyError if there is none; the config checks names)."""
    return REGISTRY[name]


def compressions() -> tuple[str, ...]:
    """Every --compress value some strategy applies ("none" first)."""
    found = {c for cls in REGISTRY.values() for c in cls.compressions}
    return ("none",) + tuple(sorted(found - {"none"}))


def resolve(cfg):
    """A copy of the TrainConfig `cfg` with its strategy's rules applied: every "auto"/None
    default replaced by the value it stands for. A one-line UserError for an unknown
    --strategy, or a --compress or --ema the strategy cannot apply. (The config does not import the
    strategies: its module sits below every layer.)"""
    if cfg.strategy not in REGISTRY:
        raise UserError(f"--strategy must be one of {', '.join(names())}")
    rules = REGISTRY[cfg.strategy]
    rules.check_compress(cfg.compress)
    rules.check_ema(cfg.ema)
    rules.check_overlap(cfg.overlap)
    scaling, schedule = rules.auto_lr
    return dataclasses.replace(
        cfg,
        lr_scaling=scaling if cfg.lr_scaling == "auto" else cfg.lr_scaling,
        lr_schedule=schedule if cfg.lr_schedule == "auto" else cfg.lr_schedule,
        sync_every=cfg.sync_every if cfg.sync_every is not None else rules.default_sync_every,
    )


def make_sync(
    name: str,
    comm: Comm,
    sync_every: int | None = None,
    progress: Callable[[str], None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
    compress: str = "none",
    bucket_bytes: float = 0.0,
) -> Sync:
    """This rank's instance of strategy `name` (UserError if comm has too few ranks, or the
    strategy cannot apply `compress`). `bucket_bytes`: --overlap's buckets (0: off; a
    strategy that does not `overlap` keeps 0)."""
    return REGISTRY[name](
        comm, sync_every, progress, stop_requested=stop_requested, compress=compress, bucket_bytes=bucket_bytes
    )


__all__ = ["Sync", "compressions", "lr_at", "make_sync", "names", "resolve", "scaled_lr", "strategy_class"]
