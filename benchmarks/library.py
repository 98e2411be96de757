"""mpitrain.fit against plain Keras model.fit: the same model, data and epochs (issue 19).

Data: the UCI handwritten digits as scikit-learn ships them (1,797 8x8 grey images, 10
classes, pixels 0-16), kept here as benchmarks/data/digits.npz so that neither this script
nor the tests need scikit-learn (with it installed, `import keras` imports it: 1.7 s more for
every process the test suite starts); a fixed 80/20 split. Model: a small convnet compiled with Adam. Run it three ways:

    python benchmarks/library.py keras            # plain model.fit, one process
    python benchmarks/library.py mpitrain         # mpitrain.fit, one process
    mpiexec -n 2 python benchmarks/library.py mpitrain   # mpitrain.fit, two ranks

or `python benchmarks/library.py all` for the three in a row (the third through mpiexec).
Each prints one JSON line: how, ranks, final validation accuracy, training images/s
(training only, from the epochs' own timings, first epoch excluded: tracing), the weights'
checksum; under mpiexec one line per rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zlib

import numpy as np

EPOCHS, BATCH, SEED = 15, 32, 0


def digits():
    with np.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "digits.npz")) as d:
        x = (d["images"] / 16.0).astype(np.float32)[..., np.newaxis]
        y = d["target"].astype(np.int32)
    order = np.random.default_rng(SEED).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def model():
    import keras

    keras.utils.set_random_seed(SEED)
    m = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return m


def checksum(m) -> str:
    return f"{zlib.crc32(np.concatenate([w.reshape(-1) for w in m.get_weights()]).tobytes()):08x}"


def run_keras() -> dict:
    import keras

    (x, y), (vx, vy) = digits()
    m = model()

    class Timer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_test_begin(self, logs=None):  # the epoch's training ends where validation starts
            self.seconds.append(time.perf_counter() - self.t)

    timer = Timer()
    h = m.fit(x, y, batch_size=BATCH, epochs=EPOCHS, validation_data=(vx, vy), verbose=0, callbacks=[timer])
    ips = len(x) / np.median(timer.seconds[1:])
    return {"how": "keras model.fit", "ranks": 1, "val_accuracy": h.history["val_accuracy"][-1],
            "images_per_second": round(float(ips), 1), "checksum": checksum(m)}  # fmt: skip


def run_mpitrain() -> dict:
    import mpitrain

    (x, y), (vx, vy) = digits()
    m = model()
    r = mpitrain.fit(m, x, y, validation_data=(vx, vy), epochs=EPOCHS, batch_size=BATCH, seed=SEED, progress=False)
    ips = float(np.median([row["images_per_second"] for row in r.history[1:]]))
    return {"how": "mpitrain.fit", "ranks": mpitrain.size(), "val_accuracy": r.history[-1]["val_accuracy"],
            "images_per_second": round(ips, 1), "checksum": checksum(m), "rank": mpitrain.rank()}  # fmt: skip


def main() -> None:
    how = sys.argv[1] if len(sys.argv) > 1 else "all"
    if how == "all":
        me = [sys.executable, __file__]
        subprocess.run([*me, "keras"], check=True)
        subprocess.run([*me, "mpitrain"], check=True)
        mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        subprocess.run([mpiexec, *root, "--oversubscribe", "-n", "2", *me, "mpitrain"], check=True)
        return
    out = run_keras() if how == "keras" else run_mpitrain()
    out["load"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out), flush=True)  # one line per rank (tests/system/test_library.py compares them)


if __name__ == "__main__":
    main()
