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

Lean by design (docs/benchmarks.md, "The lean step"): on a CPU a step of the seed CNN at
batch 32 takes 10-40 ms, and everything Python does around it counts against that. So:

* the step is called as one concrete function (traced when it is made), which skips
  `tf.function`'s per-call signature matching and cache lookup (~0.1-0.3 ms a call);
* integer images (the uint8/uint16 rows the trainer holds) go in as they are and are
  converted in the graph, with the same correctly rounded float32 division as
  `data.dataset.as_float`: 4x fewer bytes to hand over and no NumPy pass per batch;
* the epoch's running sums (samples, loss sum, hits) are added up in a float64 variable
  in the graph, in the order the host added them before, so they are bit-identical; the
  trainer reads them when it needs them (progress bar redraw, checkpoint, epoch end), not
  after every step, so a step never waits for the host (on a GPU a read is a sync).
"""

from __future__ import annotations

import functools

import numpy as np


def to_float_input(x, divisor):
    """In the graph: integer images -> float32 in [0, 1], bit for bit what
    `mpitrain.pixels.to_float` computes in NumPy (exact cast, then one IEEE division).

    `divisor` must be a variable holding the full-scale value, not a constant: TensorFlow's
    graph optimiser turns a division by a constant into a multiplication by its reciprocal,
    which is off by one bit for 126 of the 256 uint8 values (measured, TF 2.21)."""
    import tensorflow as tf

    return tf.cast(x, tf.float32) / divisor


class RunningSums:
    """An epoch's running sums [samples, loss sum, hits] as a float64 variable that train
    steps add into in the graph. The trainer owns one and hands it to every step it makes
    (again after an elastic re-layout), so a step wrapped by a caller still feeds it."""

    def __init__(self):
        import tensorflow as tf

        # Not a model or optimizer variable: checkpoints carry the sums as the epoch's
        # running sums (RankState), not as model state.
        self.var = tf.Variable(tf.zeros(3, tf.float64), trainable=False, name="epoch_sums")

    def reset(self, values=None) -> None:
        """Start at `values` (a resumed epoch's saved sums) or zeros."""
        self.var.assign(np.zeros(3) if values is None else np.asarray(values, np.float64))

    def read(self) -> np.ndarray:
        """The sums as a new float64 array (a read waits for the steps before it)."""
        return np.array(self.var.numpy(), dtype=np.float64)


class TrainStep:
    """One compiled train step: `step(x, y, w, lr) -> (stats, probs)` as tensors.

    `stats` is this step's [samples, loss sum, hits] (global under a per-step reduce), also
    added into `sums` (a RunningSums). `x` is float32 model input, or integer rows
    [n, s, s, 1] of the `input_dtype` the step was made for (scaled in the graph).
    """

    def __init__(self, concrete, sums, input_dtype, input_shape, guard, soft_classes=0, labels=0):
        self._fn, self.sums, self.input_dtype = concrete, sums, input_dtype
        self._shape, self._guard, self._soft, self._labels = input_shape, guard, soft_classes, labels

    def __call__(self, x, y, w, lr, *target):
        if len(x) == 0 and not self._guard:
            pad = (np.zeros((1, self._soft), np.float32),) if self._soft else ()
            # One zero row of weight 0: labels [1] (a class), or [1, L] targets when multi-label.
            shape = (1, self._labels) if self._labels else (1,)
            y0 = np.zeros(shape, np.float32 if self._labels else np.int32)
            stats, probs = self._fn(
                np.zeros((1, *self._shape), self.input_dtype), y0, np.zeros(shape, np.float32), lr, *pad
            )
            return stats, probs[:0]
        return self._fn(x, y, w, lr, *target)


def per_sample_loss(model):
    """The loss the model was compiled with, as a function (y, probs) -> one value per row;
    sparse categorical cross-entropy for a model compiled without one (or not compiled).
    The engine sums it with the class weights itself, so the step's gradient is that of the
    mean over the global batch whatever the rank count."""
    import keras

    loss = getattr(model, "loss", None)
    if loss is None:
        return keras.losses.sparse_categorical_crossentropy
    if isinstance(loss, (dict, list, tuple)):
        raise ValueError("mpitrain trains models with one output and one loss; got several losses")
    if isinstance(loss, str):
        return keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss.call  # unreduced: one value per row
    return loss  # a function of (y_true, y_pred)


def soft_loss(smoothing: float = 0.0):
    """Per-row cross-entropy (target, probs) against target distributions (--mixup's mixed
    one-hot labels), smoothed to (1 - smoothing) x target + smoothing / classes (Keras' own
    `label_smoothing`, the same clipping as the plain loss)."""
    import keras

    def loss(target, probs):
        return keras.losses.categorical_crossentropy(target, probs, label_smoothing=smoothing)

    return loss


def smoothed_loss(n_classes: int, smoothing: float):
    """--label-smoothing: per-row cross-entropy (y, probs) against the one-hot labels of `y`,
    smoothed (`soft_loss`)."""
    import keras

    soft = soft_loss(smoothing)

    def loss(y, probs):
        return soft(keras.ops.one_hot(y, n_classes, dtype=probs.dtype), probs)

    return loss


def make_train_step(
    model,
    optimizer,
    reduce=None,
    input_dtype=np.float32,
    max_value: float = 1.0,
    sums: RunningSums | None = None,
    loss_fn=None,
    set_lr: bool = True,
    soft_targets: bool = False,
    multi_label: bool = False,
    micro_batch: int = 0,
    overlap=None,
) -> TrainStep:
    """`loss_fn(y, probs)`: per-row losses (default: the model's, `per_sample_loss`).
    `set_lr`: the step sets the optimizer's learning rate to its `lr` argument (off for an
    optimizer of the caller's whose rate is its own schedule). `soft_targets` (--mixup): the
    step takes a fifth argument, float32 [n, classes] targets, and the loss is
    `loss_fn(targets, probs)`; `y` then only scores the hits. `multi_label`: `y` is float32
    [n, L] targets and `w` their weights [n, L], the loss masked binary cross-entropy
    (`engine/multilabel.py`; `loss_fn` is not used). `micro_batch` (--accumulate): the
    step's rows are differentiated `micro_batch` at a time, one micro-batch after another,
    and their gradients summed before the one exchange and update (0: all rows at once).
    `overlap` (--overlap): the strategy whose `plan`, `start_bucket` and `finish_buckets`
    sum the gradients in buckets while backprop goes on (`parallel/overlap.py`), instead
    of `reduce` on one fused buffer."""
    import keras
    import tensorflow as tf

    from mpitrain.engine import multilabel

    variables = model.trainable_variables
    loss_fn = per_sample_loss(model) if loss_fn is None else loss_fn
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    sizes = [int(np.prod(v.shape)) for v in variables]
    shapes = [tuple(v.shape) for v in variables]
    total = sum(sizes) + 3
    input_dtype = np.dtype(input_dtype)
    integer = input_dtype.kind in "ui"
    n_out = int(model.output_shape[-1])
    per_row = (None, n_out) if multi_label else (None,)  # labels and weights
    spec = [
        tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.as_dtype(input_dtype)),
        tf.TensorSpec(per_row, tf.float32 if multi_label else tf.int32),
        tf.TensorSpec(per_row, tf.float32),
        tf.TensorSpec((), tf.float32),
    ]
    if soft_targets:
        spec.append(tf.TensorSpec((None, n_out), tf.float32))
    # A padding row would enter batch-norm statistics, so models with float non-trainable
    # state (batch norm) skip the forward pass on an empty batch instead, with zero gradients.
    guard = any("float" in str(v.dtype) for v in model.non_trainable_weights)

    def forward(x, y, w):  # y: the labels, or the soft targets (soft_targets)
        with tf.GradientTape() as tape:
            probs = tf.cast(model(x, training=True), tf.float32)
            if multi_label:
                loss_sum = multilabel.step_loss(y, probs, w)
            else:
                loss_sum = tf.reduce_sum(tf.cast(loss_fn(y, probs), tf.float32) * w)
            target = optimizer.scale_loss(loss_sum) if scaled else loss_sum
        return [tf.cast(g, tf.float32) for g in tape.gradient(target, variables)], loss_sum, probs

    def accumulated(x, y, w):
        # --accumulate: micro-batches in sequence (parallel_iterations=1: one micro-batch's
        # activations alive at a time, and batch-norm statistics updated in order), their
        # gradients and loss sums added up. The sum is that of the whole batch: the step
        # divides by the global sample count as without accumulation.
        n = tf.shape(x)[0]
        count = (n + micro_batch - 1) // micro_batch
        out = tf.TensorArray(tf.float32, size=count, infer_shape=False, element_shape=tf.TensorShape([None, n_out]))

        def body(i, grads, loss_sum, out):
            a = i * micro_batch
            b = tf.minimum(a + micro_batch, n)
            g, part, p = forward(x[a:b], y[a:b], w[a:b])
            return i + 1, [s + d for s, d in zip(grads, g)], loss_sum + part, out.write(i, p)

        zeros = [tf.zeros(v.shape, tf.float32) for v in variables]
        start = (tf.constant(0), zeros, tf.constant(0.0), out)
        _, grads, loss_sum, out = tf.while_loop(lambda i, *_: i < count, body, start, parallel_iterations=1)
        return grads, loss_sum, out.concat()

    differentiate = accumulated if micro_batch else forward

    def empty():
        return [tf.zeros(v.shape, tf.float32) for v in variables], tf.constant(0.0), tf.zeros((0, n_out))

    buckets = overlap.plan(sizes) if overlap is not None else []

    def bucketed(grads, stats):
        # --overlap: each bucket's start op runs as soon as its gradients exist (and the one
        # before it has started: the same order on every rank); bucket 0 carries the stats.
        token = tf.constant(0, tf.int32)
        for j, bucket in enumerate(buckets):
            flat = tf.concat([tf.reshape(grads[i], [-1]) for i in bucket] + ([stats] if j == 0 else []), axis=0)
            start = functools.partial(overlap.start_bucket, j)
            token = tf.ensure_shape(tf.numpy_function(start, [flat, token], tf.int32, stateful=True), ())
        finish = functools.partial(overlap.finish_buckets, len(buckets))
        summed = tf.numpy_function(finish, [token], [tf.float32] * len(buckets), stateful=True)
        grads = list(grads)
        for j, (bucket, flat) in enumerate(zip(buckets, summed)):
            lengths = [sizes[i] for i in bucket]
            flat = tf.ensure_shape(flat, (sum(lengths) + (3 if j == 0 else 0),))
            if j == 0:
                flat, stats = flat[:-3], flat[-3:]
            for i, g in zip(bucket, tf.split(flat, lengths)):
                grads[i] = tf.reshape(g, shapes[i])
        return grads, stats

    sums = RunningSums() if sums is None else sums
    divisor = tf.Variable(max_value, dtype=tf.float32, trainable=False, name="input_scale")  # see to_float_input

    @tf.function(input_signature=spec)
    def compiled(x, y, w, lr, *target):
        if integer:
            x = to_float_input(x, divisor)
        if set_lr:
            optimizer.learning_rate.assign(lr)
        truth = target[0] if soft_targets else y  # what the loss is taken against
        if guard:
            grads, loss_sum, probs = tf.cond(tf.shape(x)[0] > 0, lambda: differentiate(x, truth, w), empty)
        else:
            grads, loss_sum, probs = differentiate(x, truth, w)
        if multi_label:
            n_rows, n_hits = multilabel.step_counts(y, probs, w)
        else:
            hits = tf.equal(tf.argmax(probs, axis=-1, output_type=tf.int32), y)
            counted = tf.cast(w > 0, tf.float32)  # a row of weight 0 is padding (see above)
            n_rows, n_hits = tf.reduce_sum(counted), tf.reduce_sum(tf.cast(hits, tf.float32) * counted)
        stats = tf.stack([n_rows, loss_sum, n_hits])
        if overlap is not None:
            grads, stats = bucketed(grads, stats)
        elif reduce is not None:
            flat = tf.concat([tf.reshape(g, [-1]) for g in grads] + [stats], axis=0)
            flat = tf.numpy_function(reduce, [flat], tf.float32, stateful=True)
            flat = tf.ensure_shape(flat, (total,))
            stats = flat[-3:]
            grads = [tf.reshape(g, s) for g, s in zip(tf.split(flat[:-3], sizes), shapes)]
        scale = 1.0 / tf.maximum(stats[0], 1.0)
        optimizer.apply([g * scale for g in grads], variables)
        sums.var.assign_add(tf.cast(stats, tf.float64))  # as `sums += stats` in NumPy: same bits
        return stats, probs

    shape = tuple(model.input_shape[1:])
    return TrainStep(
        compiled.get_concrete_function(),
        sums,
        input_dtype,
        shape,
        guard,
        n_out if soft_targets else 0,
        n_out if multi_label else 0,
    )


def make_predict_step(model):
    import tensorflow as tf

    spec = [tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32)]

    @tf.function(input_signature=spec)
    def predict(x):
        return model(x, training=False)

    return predict
