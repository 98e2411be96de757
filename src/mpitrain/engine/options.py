"""The engine's options: how to train, not what on (no folders, no data sources).

Each field has the meaning of the `mpitrain train` option of the same name (config.py's
TrainConfig holds those and more; `Options.of(cfg)` takes the ones the engine needs).
"auto" values are the strategy's own rules (`parallel/strategies/`), resolved here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Options:
    epochs: int = 1
    batch_size: int = 32  # per rank: one micro-batch
    # Micro-batches per optimizer step (`engine/steps.py`): a step takes accumulate x
    # batch_size rows per rank, sums their gradients, exchanges and applies them once.
    accumulate: int = 1
    # Of one rank, scaled by lr_scaling, then warm-up and schedule. None: 1e-3 for the
    # engine's own optimizer; a model compiled with an optimizer keeps that one's rate
    # (its schedule too), untouched.
    lr: float | None = None
    optimizer: str = "adam"  # adam or sgd, when the model brings no optimizer of its own
    momentum: float = 0.0
    # The weights' moving average the optimizer keeps (None: off); validation, KeepBest and
    # the model at the end use it (`engine/ema.py`). Only for the engine's own optimizer.
    ema: float | None = None
    label_smoothing: float = 0.0  # of the training loss only (val_loss stays the plain loss)
    mixup: float = 0.0  # Beta(mixup, mixup) mixing of training batches (`engine/mixup.py`); 0: off
    strategy: str = "allreduce"
    sync_every: int | None = None
    lr_scaling: str = "auto"
    warmup_epochs: float = 0.0
    lr_schedule: str = "auto"
    compress: str = "none"
    # --overlap (`parallel/overlap.py`): auto, on or off; the buckets' size in MB.
    overlap: str = "auto"
    bucket_mb: float = 8.0  # measured: docs/benchmarks.md, ResNet-50 across fake hosts
    precision: str = "fp32"  # the engine's part of it: fp16 trains with dynamic loss scaling
    seed: int = 0
    # Seconds without progress before the job is aborted; 0: never. None: $MPITRAIN_TIMEOUT
    # (what `mpitrain run --timeout` sets for its script), else never.
    timeout: float | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        from mpitrain.config import check_accumulate, check_ema, check_label_smoothing, check_mixup, check_overlap

        check_accumulate(self.accumulate)
        check_overlap(self.overlap, self.bucket_mb)
        check_ema(self.ema)
        check_label_smoothing(self.label_smoothing)
        check_mixup(self.mixup)

    @classmethod
    def of(cls, config) -> Options:
        """The engine's options from any object with these attributes (a TrainConfig)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    def resolved(self) -> Options:
        """A copy with every "auto"/None default replaced by the value it stands for: the
        strategy's own rules (`parallel.strategies.resolve`, as for a TrainConfig) and the
        timeout `mpitrain run` set."""
        from mpitrain.parallel.strategies import resolve

        return dataclasses.replace(resolve(self), timeout=_default_timeout() if self.timeout is None else self.timeout)


def _default_timeout() -> float:
    import os

    from mpitrain.parallel.wire import TIMEOUT_ENV

    try:
        return max(0.0, float(os.environ.get(TIMEOUT_ENV, "0") or 0))
    except ValueError:
        return 0.0
