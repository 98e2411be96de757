"""Collectives for your own training loop: `allreduce` and `broadcast`, as Horovod's
`hvd.allreduce` and `hvd.broadcast_variables` are.

    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = mpitrain.allreduce(tape.gradient(loss, model.trainable_variables))  # mean over ranks
    optimizer.apply(grads, model.trainable_variables)

Every rank must call them in the same order with values of the same shapes. The values go
to MPI as one fused buffer (one call however many tensors), in float64 if any value is
float64, else float32; in a plain `python script.py` they come back unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mpitrain.parallel.comm import Comm

OPS = ("mean", "sum")


def allreduce(values: Any, op: str = "mean", comm: Comm | None = None) -> Any:
    """The elementwise mean (or sum) over all ranks of a tensor, array or number, or of a
    list or tuple of them: the same kinds and shapes come back (TensorFlow tensors as
    tensors, NumPy arrays as arrays, numbers as floats)."""
    from mpitrain.parallel.comm import world

    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    comm = world() if comm is None else comm
    many = isinstance(values, (list, tuple))
    items = list(values) if many else [values]
    arrays = [np.asarray(v) for v in items]
    dtype = np.float64 if any(a.dtype == np.float64 for a in arrays) else np.float32
    buf = np.concatenate([a.astype(dtype).reshape(-1) for a in arrays]) if arrays else np.zeros(0, dtype)
    comm.allreduce_sum_(buf)  # collective
    if op == "mean":
        buf /= comm.size
    out, at = [], 0
    for item, a in zip(items, arrays):
        part = buf[at : at + a.size].reshape(a.shape).astype(a.dtype if a.dtype.kind == "f" else dtype)
        at += a.size
        out.append(_like(item, part))
    return type(values)(out) if many else out[0]


def _like(item: Any, value: np.ndarray) -> Any:
    if isinstance(item, (int, float, np.number)):
        return float(value)
    if isinstance(item, np.ndarray):
        return value
    import tensorflow as tf

    return tf.convert_to_tensor(value)


def broadcast(model_or_variables: Any, root: int = 0, comm: Comm | None = None) -> None:
    """Give every rank rank `root`'s values, in place: a Keras model (its weights and, once
    built, its optimizer's variables) or a list of variables. Call it once before the first
    step so that all ranks start alike."""
    from mpitrain.parallel.comm import world
    from mpitrain.parallel.flat import FlatVars

    comm = world() if comm is None else comm
    variables = _variables(model_or_variables)
    flat = FlatVars(variables)
    if comm.rank == root:
        flat.pack()
    comm.bcast_(flat.buffer, root)  # collective
    flat.unpack()


def _variables(thing: Any) -> list:
    if isinstance(thing, (list, tuple)):
        return list(thing)
    variables = list(thing.weights)
    optimizer = getattr(thing, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "built", False):
        variables += list(optimizer.variables)
    return variables
