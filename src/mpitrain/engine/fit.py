"""`fit(model, x, y, ...)`: the engine for arrays every rank holds whole, or for a
`keras.utils.PyDataset` or `tf.data.Dataset` every rank can read.

Arrays: each rank keeps its shard of the rows (`mpitrain.shards.shard`: a seeded shuffle,
then strided, so the rows a rank trains on depend only on the seed and the rank count).
A PyDataset: each rank reads its own batches (batch i on the rank with i % ranks), once.
A tf.data.Dataset: `dataset.shard(ranks, rank)` unless `presharded=True` says the caller
sharded it already; batched or not, of known length or not, read once. Either way a
rank's rows are then held in memory (a dataset's per-epoch randomness is read once), and
every rank takes the same number of steps however unequal the shares (the engine agrees on
the longest). The strategy decides which ranks hold training or validation rows (a
master-worker master holds none). Every option of `Options` is a keyword.

`elastic=True` (under Open MPI's ULFM, `mpiexec --with-ft ulfm`): a lost rank's rows are
shared out again among the survivors, read from the arrays or the dataset as at the start
(`mpitrain/api.py` is the public `mpitrain.fit`: folders and run folders go through
`mpitrain train`'s pipeline instead).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from mpitrain.engine.loop import Engine, InMemory, Result
from mpitrain.engine.options import Options

if TYPE_CHECKING:
    from mpitrain.parallel.comm import Comm


def _shard(x, y, part: tuple[int, int], seed: int):
    from mpitrain.shards import shard

    rows = shard(np.arange(len(x)), *part, seed)
    return x[rows], as_labels(y)[rows], rows


def as_labels(y) -> np.ndarray:
    """Class indices as int32 [n] (a column [n, 1] too), or multi-label targets [n, L] with
    L > 1 as float32 (1, 0, NaN for a masked entry: `engine/multilabel.py`)."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        return y.astype(np.float32)
    return y.astype(np.int32).reshape(-1)


def _is_dataset(source) -> bool:
    """A keras.utils.PyDataset or tf.data.Dataset (without importing either for arrays)."""
    import sys

    keras, tf = sys.modules.get("keras"), sys.modules.get("tensorflow")
    return (keras is not None and isinstance(source, keras.utils.PyDataset)) or (
        tf is not None and isinstance(source, tf.data.Dataset)
    )


def _read(source, part: tuple[int, int], presharded: bool, input_shape) -> tuple[np.ndarray, np.ndarray]:
    """This rank's (x, y) of a PyDataset or tf.data.Dataset, as arrays."""
    mine, parts = part
    empty = np.zeros((0, *input_shape), np.float32), np.zeros(0, np.int32)
    if parts <= 0 or not 0 <= mine < parts:
        return empty
    import keras

    if isinstance(source, keras.utils.PyDataset):
        batches = [source[i] for i in range(len(source)) if presharded or i % parts == mine]
    else:
        ds = source if presharded else source.shard(parts, mine)
        batches = list(ds.as_numpy_iterator())
    if not batches:
        return empty
    xs, ys = zip(*[(np.asarray(b[0]), np.asarray(b[1])) for b in batches])
    batched = xs[0].ndim == len(input_shape) + 1
    x, y = (np.concatenate(xs), np.concatenate(ys)) if batched else (np.stack(xs), np.stack(ys))
    return x, as_labels(y)


def _rows(source, y, part, seed, presharded, input_shape):
    """(x, y, index) of this rank from arrays (sharded here) or a dataset (read here)."""
    if _is_dataset(source):
        x, labels = _read(source, part, presharded, input_shape)
        return x, labels, None
    return _shard(np.asarray(source), y, part, seed)


def fit(
    model,
    x,
    y: np.ndarray | None = None,
    *,
    validation_data=None,
    presharded: bool = False,
    comm: Comm | None = None,
    callbacks=(),
    class_weight=None,
    augment=None,
    elastic: bool = False,
    echo=print,
    progress: bool = True,
    **options,
) -> Result:
    """Train `model` in place on every rank on images `x` (float32 in [0, 1], or integers
    scaled by their dtype's full range) with integer labels `y`, or on a PyDataset /
    tf.data.Dataset of (images, labels) as `x` (and as `validation_data`); returns the
    result, whose `history` (a list of epoch rows, the same on every rank) has Keras' keys:
    loss, accuracy, val_loss, val_accuracy, ...

    `augment(rows, max_value, epoch, rank, step)`: a training batch's augmentation (the
    Engine's). `elastic`: survive a lost rank, re-sharding the rows over the ranks left."""
    from mpitrain.errors import UserError
    from mpitrain.parallel.comm import world
    from mpitrain.parallel.strategies import strategy_class

    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(Options)})
    if unknown:
        raise TypeError(f"fit() got unknown option(s): {', '.join(unknown)}")
    opts = Options(**options)
    comm = world() if comm is None else comm
    train_part, val_part = strategy_class(opts.strategy).data_parts(comm.rank, comm.size)
    shape = tuple(model.input_shape[1:])
    if not _is_dataset(x) and y is None:
        raise TypeError("fit() needs labels y with array images x (or a dataset of (images, labels) as x)")
    if validation_data is None:
        vx, vy = np.zeros((0, *shape), np.float32), np.zeros(0, np.int32)
    elif _is_dataset(validation_data):
        vx, vy = validation_data, None
    else:
        vx, vy = validation_data
    if elastic and presharded:
        raise UserError("elastic=True shares a lost rank's rows out again: the data cannot be presharded=True")

    def load(train_part: tuple[int, int], val_part: tuple[int, int]) -> InMemory:  # this rank's rows in a layout
        tx, ty, _ = _rows(x, y, train_part, opts.seed, presharded, shape)
        sx, sy, index = _rows(vx, vy, val_part, opts.seed, presharded, shape)
        return InMemory(tx, ty, sx, sy, _full_scale(tx), _full_scale(sx), index)

    data = load(train_part, val_part)
    if elastic:
        comm.make_elastic()  # collective: from here on a dead peer raises RankLost
    engine = Engine(
        model,
        data,
        opts,
        comm,
        class_weight=class_weight,
        augment=augment,
        callbacks=list(callbacks),
        echo=echo,
        progress=progress,
        reshard=load if elastic else None,
    )
    return engine.fit()


def _full_scale(x: np.ndarray) -> float:
    """The value that stands for full brightness: 1.0 for floats, the dtype's maximum for integers."""
    return 1.0 if x.dtype.kind == "f" else float(np.iinfo(x.dtype).max)
