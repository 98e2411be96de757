"""A user's script: `mpitrain.fit` on a class folder with a run folder, or on arrays.

    library_folder.py DATA RUNDIR [--elastic]   the folder DATA, run folder RUNDIR
    library_folder.py --arrays [--elastic]      arrays every rank holds, no run folder

KILL_RANK / KILL_AT (environment): that rank (its rank at start) SIGKILLs itself in its
KILL_AT-th train step, as a lost node looks to the others. Prints one RESULT line per rank
that finishes: rank, size, weights checksum, history.
"""

import json
import os
import signal
import sys
import zlib

import keras
import numpy as np

import mpitrain
import mpitrain.engine.loop as loop
from mpitrain.parallel.comm import world

KILL_RANK, KILL_AT = int(os.environ.get("KILL_RANK", "-1")), int(os.environ.get("KILL_AT", "0"))
real_make = loop.make_train_step


def dying_make(*args, **kwargs):
    step, calls = real_make(*args, **kwargs), [0]

    def wrapped(*a, **k):
        calls[0] += 1
        comm = world()
        if comm.world_ranks[comm.rank] == KILL_RANK and calls[0] == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(*a, **k)

    return wrapped


loop.make_train_step = dying_make
keras.utils.set_random_seed(mpitrain.rank())  # a different start on every rank: fit must broadcast rank 0's
model = keras.Sequential(
    [
        keras.Input((16, 16, 1)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2, activation="softmax"),
    ]
)
common = dict(epochs=3, batch_size=8, elastic="--elastic" in sys.argv, precision="fp32")
if sys.argv[1] == "--arrays":
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 216).astype(np.int32)
    x = rng.random((216, 16, 16, 1), dtype=np.float32) * 0.5
    x[y == 1, :8] += 0.5
    result = mpitrain.fit(model, x[:180], y[:180], validation_data=(x[180:], y[180:]), lr=1e-2, **common)
else:
    result = mpitrain.fit(model, sys.argv[1], out=sys.argv[2], augment="xray", **common)
weights = np.concatenate([w.reshape(-1) for w in model.get_weights()])
row = {
    "rank": mpitrain.rank(),
    "size": mpitrain.size(),
    "checksum": f"{zlib.crc32(weights.tobytes()):08x}",
    "history": [{k: float(v) for k, v in r.items()} for r in result.history],
}
print("RESULT " + json.dumps(row), flush=True)
