"""A tiny softmax model and linearly separable images for the engine's in-process tests."""

from __future__ import annotations

import numpy as np


def tiny_model(n_classes=3, side=8, seed=0, compiled=None):
    """Flatten + one softmax layer on [side, side, 1] images, seeded; compiled when asked
    (a user's model that brings its own optimizer or loss)."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((side, side, 1)), keras.layers.Flatten(), keras.layers.Dense(n_classes, activation="softmax")]
    )
    if compiled:
        model.compile(**compiled)
    return model


def blobs(n=96, n_classes=3, side=8, seed=0):
    """Class c lights up band c of the rows: linearly separable, learnt in a few epochs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n).astype(np.int32)
    x = rng.random((n, side, side, 1)).astype(np.float32) * 0.2
    band = side // n_classes
    for c in range(n_classes):
        x[y == c, c * band : (c + 1) * band] += 0.8
    return x, y
