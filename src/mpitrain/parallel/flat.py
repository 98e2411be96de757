"""Pack a list of Keras variables into one flat float32 numpy buffer and back.

Every weight exchange (broadcast at start, local-SGD averaging, master-worker rounds)
moves one contiguous buffer with one MPI call instead of one call per tensor.
"""

from __future__ import annotations

import zlib

import numpy as np


class FlatVars:
    """A fixed list of variables and a reusable float32 buffer that holds all of them."""

    def __init__(self, variables, extra: int = 0):
        """`extra`: slots after the variables' values in `buffer`, for numbers that travel
        with them (a stop vote); `pack` and `unpack` leave them alone."""
        self.variables = list(variables)
        self.shapes = [tuple(v.shape) for v in self.variables]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)]).tolist()
        self.buffer = np.zeros(self.offsets[-1] + extra, dtype=np.float32)

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def pack(self) -> np.ndarray:
        """Copy the variables' current values into `self.buffer` and return it."""
        for v, a, b in zip(self.variables, self.offsets[:-1], self.offsets[1:]):
            self.buffer[a:b] = np.asarray(v.numpy(), dtype=np.float32).reshape(-1)
        return self.buffer

    def unpack(self, buf: np.ndarray | None = None) -> None:
        """Assign `buf` (default: `self.buffer`) back into the variables."""
        buf = self.buffer if buf is None else buf
        for v, shape, a, b in zip(self.variables, self.shapes, self.offsets[:-1], self.offsets[1:]):
            v.assign(buf[a:b].reshape(shape).astype(v.dtype))

    def checksum(self) -> str:
        """A digest of the exact bytes of every variable (for cross-rank comparison)."""
        return f"{zlib.crc32(self.pack()[: self.size].tobytes()):08x}"


def float_vars(variables):
    """Only float variables take part in averaging (counters such as `iterations` do not)."""
    return [v for v in variables if "float" in str(v.dtype)]


def frozen_weights(model) -> set[int]:
    """The ids of the weights of the layers set not to train (`layer.trainable = False`: a
    frozen backbone, FreezeBackbone's or the caller's). Keras lists them with the
    non-trainable weights, like batch-norm statistics, but no rank changes them, so the
    strategies leave them out of what they average: traffic for nothing, and over three or
    more ranks a mean of equal float32 values can round off the value itself."""
    walk = getattr(model, "_flatten_layers", None)  # Keras' own walk over a model's layers
    if walk is None:
        return set()
    return {id(v) for layer in walk(include_self=True, recursive=True) if not layer.trainable for v in layer.weights}


def moving_averages(optimizer) -> list[tuple]:
    """(variable, its moving average) for every variable a Keras optimizer built with
    `use_ema=True` averages, in the order it was built for ([] without EMA); with loss
    scaling, the inner optimizer's. Keras keeps the averages in
    `_model_variables_moving_average` (None for a variable it never averages)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not getattr(inner, "use_ema", False):
        return []
    pairs = zip(inner._trainable_variables, inner._model_variables_moving_average)
    return [(v, a) for v, a in pairs if a is not None]
