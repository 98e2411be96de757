"""Compiled train and predict steps (one `tf.function` each).

The trainer hands the predict step to `evaluate.modelio.predict_probs`, the package's one
prediction loop (fixed batch shape), which evaluate and predict use with the model.

The train step is the seam where gradients are synchronised: when `reduce` is given, the
gradients of the summed loss and three statistics (samples, loss sum, correct predictions)
are packed into one flat float32 tensor, handed to `reduce` (an in-place MPI allreduce)
through `tf.numpy_function`, and divided by the global sample count. The result is exactly
the gradient of the mean loss over the global batch, however unevenly the samples were
spread across ranks.

A rank whose shard has run out still takes its step (it must join the allreduce, and
keep its optimizer in step): its empty batch is run as one zero image of weight 0, which
adds nothing to the gradient and is not counted. An empty batch cannot run as it is: with
oneDNN (TensorFlow's default on x86) the pooling gradient kernel aborts the process on
0 rows (TF 2.21), and the convolutions raise. A model with batch norm skips the forward pass on an
empty batch instead (a zero row would enter its batch statistics).

Precision: under a mixed policy (bf16, fp16) the model computes in 16 bits, but the
probabilities, the loss, the statistics and every gradient are cast to float32 before they
are packed, so the buffer MPI sums is float32 whatever the policy. With fp16 the optimizer
is a `keras.optimizers.LossScaleOptimizer`: the loss is multiplied by its dynamic scale
before the gradient, and the buffer carries scaled gradients (a power of two: exact in
float32). `optimizer.apply` then checks the *reduced* gradients for inf/NaN: a rank whose
fp16 gradient overflowed makes the sum non-finite on every rank, so all ranks skip the step
and halve the scale together; otherwise it unscales and applies. Without a reduce (local
SGD, master-worker) each rank decides for itself, as its steps are its own.
"""

from __future__ import annotations

import numpy as np


def make_train_step(model, optimizer, reduce=None):
    import keras
    import tensorflow as tf

    variables = model.trainable_variables
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
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
    # A padding row would enter batch-norm statistics, so models with float non-trainable
    # state (batch norm) skip the forward pass on an empty batch instead, with zero gradients.
    guard = any("float" in str(v.dtype) for v in model.non_trainable_weights)

    def forward(x, y, w):
        with tf.GradientTape() as tape:
            probs = tf.cast(model(x, training=True), tf.float32)
            loss_sum = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, probs) * w)
            target = optimizer.scale_loss(loss_sum) if scaled else loss_sum
        return [tf.cast(g, tf.float32) for g in tape.gradient(target, variables)], loss_sum, probs

    def empty():
        return [tf.zeros(v.shape, tf.float32) for v in variables], tf.constant(0.0), tf.zeros((0, n_out))

    @tf.function(input_signature=spec)
    def compiled(x, y, w, lr):
        optimizer.learning_rate.assign(lr)
        if guard:
            grads, loss_sum, probs = tf.cond(tf.shape(x)[0] > 0, lambda: forward(x, y, w), empty)
        else:
            grads, loss_sum, probs = forward(x, y, w)
        hits = tf.equal(tf.argmax(probs, axis=-1, output_type=tf.int32), y)
        counted = tf.cast(w > 0, tf.float32)  # a row of weight 0 is padding (see above)
        stats = tf.stack([tf.reduce_sum(counted), loss_sum,
                          tf.reduce_sum(tf.cast(hits, tf.float32) * counted)])
        if reduce is not None:
            flat = tf.concat([tf.reshape(g, [-1]) for g in grads] + [stats], axis=0)
            flat = tf.numpy_function(reduce, [flat], tf.float32, stateful=True)
            flat = tf.ensure_shape(flat, (total,))
            stats = flat[-3:]
            grads = [tf.reshape(g, s) for g, s in zip(tf.split(flat[:-3], sizes), shapes)]
        scale = 1.0 / tf.maximum(stats[0], 1.0)
        optimizer.apply([g * scale for g in grads], variables)
        return stats, probs

    def step(x, y, w, lr):
        if len(x) == 0 and not guard:
            stats, probs = compiled(np.zeros((1, *x.shape[1:]), np.float32), np.zeros(1, np.int32),
                                    np.zeros(1, np.float32), lr)
            return stats, probs[:0]
        return compiled(x, y, w, lr)

    return step


def make_predict_step(model):
    import tensorflow as tf

    spec = [tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32)]

    @tf.function(input_signature=spec)
    def predict(x):
        return model(x, training=False)

    return predict
