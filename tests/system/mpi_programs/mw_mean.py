"""Under mpiexec with master-worker: each worker holds known weights and a known sample
count; after one round every rank must hold the sample-weighted mean of the workers'."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras
import numpy as np

from mpitrain.parallel.comm import world
from mpitrain.parallel.strategies import make_sync
from mpitrain.runtime import configure_runtime
from mpitrain.train.models import build_model

comm = world()
configure_runtime(0, 1, 1)
model = build_model("tiny", 12, 2)
opt = keras.optimizers.SGD(0.1)
opt.build(model.trainable_variables)
sync = make_sync("master-worker", comm, None)
sync.start(model, opt)
base = [w.copy() for w in model.get_weights()]


def worker_weights(r):
    rng = np.random.default_rng(100 + r)
    return [rng.normal(size=w.shape).astype(np.float32) for w in base]


def worker_samples(r):
    return 10 * r + 3


if comm.rank > 0:
    model.set_weights(worker_weights(comm.rank))
    sync.after_step(1, 1, worker_samples(comm.rank))  # last step of the epoch: one round
else:
    sync.after_step(1, 1, 0)
counts = np.array([worker_samples(r) for r in range(1, comm.size)], dtype=np.float64)
expected = [
    sum(c * worker_weights(r)[i].astype(np.float64) for r, c in zip(range(1, comm.size), counts)) / counts.sum()
    for i in range(len(base))
]
got = model.get_weights()
err = max(float(np.abs(g - e).max()) for g, e in zip(got, expected))
print(f"rank {comm.rank} max error {err:.3g}", flush=True)
sys.exit(0 if err < 1e-5 else 1)
