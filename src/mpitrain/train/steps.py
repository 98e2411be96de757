"""Compiled train and predict steps (one `tf.function` each).

The train step is the seam where gradients are synchronised: when `reduce` is given, the
gradients of the summed loss and three statistics (samples, loss sum, correct predictions)
are packed into one flat float32 tensor, handed to `reduce` (an in-place MPI allreduce)
through `tf.numpy_function`, and divided by the global sample count. The result is exactly
the gradient of the mean loss over the global batch, however unevenly the samples were
spread across ranks.
"""

from __future__ import annotations

import numpy as np


def make_train_step(model, optimizer, reduce=None):
    import keras
    import tensorflow as tf

    variables = model.trainable_variables
    sizes = [int(np.prod(v.shape)) for v in variables]
    shapes = [tuple(v.shape) for v in variables]
    total = sum(sizes) + 3
    spec = [
        tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32),
        tf.TensorSpec((None,), tf.int32),
        tf.TensorSpec((None,), tf.float32),
        tf.TensorSpec((), tf.float32),
    ]

    n_out = int(model.output_shape[-1])
    # Batch norm cannot run on an empty batch (a rank's shard may run out one step early):
    # models with non-trainable state skip the forward pass then, with zero gradients.
    guard = any("float" in str(v.dtype) for v in model.non_trainable_weights)

    def forward(x, y, w):
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            loss_sum = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, probs) * w)
        return tape.gradient(loss_sum, variables), loss_sum, probs

    def empty():
        return [tf.zeros_like(v) for v in variables], tf.constant(0.0), tf.zeros((0, n_out))

    @tf.function(input_signature=spec)
    def step(x, y, w, lr):
        optimizer.learning_rate.assign(lr)
        if guard:
            grads, loss_sum, probs = tf.cond(tf.shape(x)[0] > 0, lambda: forward(x, y, w), empty)
        else:
            grads, loss_sum, probs = forward(x, y, w)
        hits = tf.equal(tf.argmax(probs, axis=-1, output_type=tf.int32), y)
        stats = tf.stack([tf.cast(tf.shape(x)[0], tf.float32), loss_sum,
                          tf.reduce_sum(tf.cast(hits, tf.float32))])
        if reduce is not None:
            flat = tf.concat([tf.reshape(g, [-1]) for g in grads] + [stats], axis=0)
            flat = tf.numpy_function(reduce, [flat], tf.float32, stateful=True)
            flat = tf.ensure_shape(flat, (total,))
            stats = flat[-3:]
            grads = [tf.reshape(g, s) for g, s in zip(tf.split(flat[:-3], sizes), shapes)]
        scale = 1.0 / tf.maximum(stats[0], 1.0)
        optimizer.apply([g * scale for g in grads], variables)
        return stats, probs

    return step


def make_predict_step(model):
    import tensorflow as tf

    spec = [tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32)]

    @tf.function(input_signature=spec)
    def predict(x):
        return model(x, training=False)

    return predict


def predict_all(predict, x: np.ndarray, n_classes: int, convert=None, batch_size: int = 256) -> np.ndarray:
    """Class probabilities for all rows of `x` (float32, [n, n_classes]); `convert` turns a
    chunk of stored rows into model input."""
    parts = [np.zeros((0, n_classes), dtype=np.float32)]
    for a in range(0, len(x), batch_size):
        chunk = x[a:a + batch_size]
        parts.append(predict(chunk if convert is None else convert(chunk)).numpy())
    return np.concatenate(parts).astype(np.float32)
