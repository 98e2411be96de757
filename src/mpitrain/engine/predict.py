"""The package's one prediction loop: fixed-shape batches, so a row's probabilities do not
depend on which other rows share its batch (evaluate, predict, validation during training)."""

from __future__ import annotations

import numpy as np

BATCH = 32  # fixed batch shape of every prediction call


def predict_probs(
    predict, x: np.ndarray, n_classes: int, convert=None, batch: int = BATCH, on_batch=None
) -> np.ndarray:
    """Class probabilities, float32 [n, n_classes], for the rows of `x`: the package's one
    prediction loop (evaluate, predict, and validation during training).

    `predict` maps a float32 batch to probabilities: the Keras model, or the trainer's
    compiled predict step. `convert` turns a chunk of stored rows into model input (training
    keeps images as uint8/uint16). Chunks of `batch` rows, the last one padded with zeros to
    `batch`: every call has the same shape, so the same kernels and the same bits, and a
    row's probabilities do not depend on which or how many other rows are predicted with it
    (nor, under MPI, on how the rows were shared out among the ranks). `on_batch(i)` is
    called after batch i (1-based): the trainer's heartbeat.
    """
    out = [np.zeros((0, n_classes), np.float32)]
    for a in range(0, len(x), batch):
        chunk = x[a : a + batch] if convert is None else convert(x[a : a + batch])
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(predict(chunk), dtype=np.float32)[:n])
        if on_batch is not None:
            on_batch(len(out) - 1)
    return np.concatenate(out)
