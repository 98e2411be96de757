"""A user's script written against the public API only: `mpitrain.fit`, or with `--loop` a
GradientTape loop of its own with `mpitrain.allreduce` / `mpitrain.broadcast`, with
`--dataset` `mpitrain.fit` on a tf.data.Dataset. Prints one
JSON line per rank: rank, size, weights checksum, the allreduce check and the history."""

import json
import sys
import zlib

import keras
import numpy as np

import mpitrain

rng = np.random.default_rng(0)
n = 256
y = rng.integers(0, 3, n).astype(np.int32)
x = rng.random((n, 8, 8, 1)).astype(np.float32) * 0.2
for c in range(3):
    x[y == c, 2 * c : 2 * c + 2] += 0.8

keras.utils.set_random_seed(mpitrain.rank())  # different start on every rank: broadcast must fix it
model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
history = []
if "--loop" in sys.argv:
    import tensorflow as tf

    optimizer = keras.optimizers.SGD(0.5)
    mpitrain.broadcast(model)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    mine = slice(mpitrain.rank(), None, mpitrain.size())
    for step in range(12):  # 8 rows a step of the 128 each of 2 ranks holds
        xb, yb = x[mine][step * 8 : step * 8 + 8], y[mine][step * 8 : step * 8 + 8]
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = mpitrain.allreduce(tape.gradient(loss, model.trainable_variables))
        optimizer.apply(grads, model.trainable_variables)
        history.append(float(mpitrain.allreduce(float(loss))))
else:
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    if "--dataset" in sys.argv:  # each rank reads its shard of a tf.data pipeline
        import tensorflow as tf

        train = tf.data.Dataset.from_tensor_slices((x[:192], y[:192])).batch(8)
        val = tf.data.Dataset.from_tensor_slices((x[192:], y[192:])).batch(8)
        result = mpitrain.fit(model, train, validation_data=val, epochs=3, batch_size=16)
    else:
        result = mpitrain.fit(model, x[:192], y[:192], validation_data=(x[192:], y[192:]), epochs=3, batch_size=16)
    history = result.history
weights = np.concatenate([w.reshape(-1) for w in model.get_weights()])
check = mpitrain.allreduce(float(mpitrain.rank()))  # mean of 0..size-1
print(
    "RESULT "
    + json.dumps(
        {
            "rank": mpitrain.rank(),
            "size": mpitrain.size(),
            "checksum": f"{zlib.crc32(weights.tobytes()):08x}",
            "rank_mean": check,
            "history": history,
        },
        default=float,
    ),
    flush=True,
)
