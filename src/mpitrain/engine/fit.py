"""`fit(model, x, y, ...)`: the engine for arrays that every rank holds whole.

Each rank keeps its shard of the rows (`mpitrain.shards.shard`: a seeded shuffle, then
strided, so the rows a rank trains on depend only on the seed and the rank count) and the
strategy decides which ranks hold training or validation rows (a master-worker master
holds none). Every option of `Options` is a keyword.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mpitrain.engine.loop import Engine, InMemory, Result
from mpitrain.engine.options import Options


def _shard(x, y, part: tuple[int, int], seed: int):
    from mpitrain.shards import shard

    rows = shard(np.arange(len(x)), *part, seed)
    return x[rows], np.asarray(y, np.int32)[rows], rows


def fit(
    model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    validation_data: tuple[np.ndarray, np.ndarray] | None = None,
    comm=None,
    callbacks=(),
    class_weight=None,
    echo=print,
    progress: bool = True,
    **options,
) -> Result:
    """Train `model` in place on every rank on images `x` (float32 in [0, 1], or integers
    scaled by their dtype's full range) with integer labels `y`; returns the result, whose
    `history` (a list of epoch rows, the same on every rank) has Keras' keys: loss,
    accuracy, val_loss, val_accuracy, ..."""
    from mpitrain.parallel.comm import world
    from mpitrain.parallel.strategies import strategy_class

    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(Options)})
    if unknown:
        raise TypeError(f"fit() got unknown option(s): {', '.join(unknown)}")
    opts = Options(**options)
    comm = world() if comm is None else comm
    train_part, val_part = strategy_class(opts.strategy).data_parts(comm.rank, comm.size)
    vx, vy = validation_data if validation_data is not None else (x[:0], np.asarray(y)[:0])
    tx, ty, _ = _shard(x, y, train_part, opts.seed)
    sx, sy, index = _shard(vx, vy, val_part, opts.seed)
    data = InMemory(tx, ty, sx, sy, _full_scale(tx), _full_scale(sx), index)
    engine = Engine(
        model, data, opts, comm, class_weight=class_weight, callbacks=list(callbacks), echo=echo, progress=progress
    )
    return engine.fit()


def _full_scale(x: np.ndarray) -> float:
    """The value that stands for full brightness: 1.0 for floats, the dtype's maximum for integers."""
    return 1.0 if x.dtype.kind == "f" else float(np.iinfo(x.dtype).max)
