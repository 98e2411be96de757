"""--overlap and --accumulate under MPI: rank 0 prints one JSON line of the runs' results.

The same model (seeded) and rows are trained with `mpitrain.fit` several ways on the same
ranks, each from the same start:

    off / on         --overlap off, then on with buckets of a few hundred kB (several
                     buckets), in float32 and with --compress bf16: the weights' checksums
                     (bit for bit) and which runs summed in buckets;
    accumulate       --accumulate 2 at batch 8 against batch 16: the largest difference
                     between their final weights.

The row count leaves the last step of one rank short, and a rank's last batch empty, so the
padding path of an empty step goes through the buckets too.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np

import mpitrain
from mpitrain.parallel.comm import world


def model():
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((12, 12, 1)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )


rng = np.random.default_rng(7)
n = 67
y = rng.integers(0, 2, n).astype(np.int32)
x = rng.random((n, 12, 12, 1), dtype=np.float32) * 0.5
x[y == 1, 3:9, 3:9, 0] += 0.4
common = dict(validation_data=(x[:16], y[:16]), epochs=2, lr=0.05, optimizer="sgd", progress=False, timeout=120)


def run(**kw):
    m = model()
    r = mpitrain.fit(m, x, y, **{"batch_size": 8, **common, **kw})
    return r, [w.copy() for w in m.get_weights()]


def threads() -> int:
    """Live exchange threads (`parallel/overlap.py`: one per strategy that overlaps)."""
    import threading

    return sum(t.name == "mpitrain-overlap" for t in threading.enumerate())


comm = world()
out: dict = {"ranks": comm.size}
for compress in ("none", "bf16"):
    for overlap in ("off", "on"):
        r, _ = run(overlap=overlap, bucket_mb=0.2, compress=compress)
        out[f"{overlap}-{compress}"] = r.checksum
out["threads-after-on"] = threads()
# --overlap auto on a model whose gradients fill one bucket: the fused sum, no exchange thread
r, _ = run(overlap="auto")
out["auto-one-bucket"] = r.checksum
out["threads-after-auto"] = threads()
_, acc = run(accumulate=2, lr_scaling="none")
_, big = run(batch_size=16, lr_scaling="none")
out["accumulate-max-diff"] = max(float(np.abs(a - b).max()) for a, b in zip(acc, big))
out["moved"] = max(float(np.abs(a - b).max()) for a, b in zip(big, model().get_weights()))
if comm.rank == 0:
    print(json.dumps(out), flush=True)
