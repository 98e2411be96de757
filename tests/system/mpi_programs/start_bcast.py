"""Under mpiexec: ranks start with different weights and optimizer state (another seed and
other Adam moments per rank); after the strategy's `start`, every rank must hold rank 0's.

Saves rank{R}.npz in --out/STRATEGY with the packed float weights and optimizer variables
before (w_pre, s_pre) and after (w_post, s_post) `start`, for each --strategy given (one
start of the processes for several strategies, each with a model and optimizer of its own).
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras
import numpy as np

from mpitrain.parallel.comm import world
from mpitrain.parallel.flat import FlatVars, float_vars
from mpitrain.parallel.strategies import make_sync
from mpitrain.runtime import configure_runtime
from mpitrain.train.models import build_model

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--strategy", nargs="+", default=["allreduce"])
a = p.parse_args()
comm = world()


def start_and_save(strategy: str) -> None:
    configure_runtime(100 + comm.rank, 1, 1)  # a different seed on every rank: different weights
    model = build_model("tiny", 12, 2)
    opt = keras.optimizers.Adam(1e-3)
    opt.build(model.trainable_variables)
    rng = np.random.default_rng(comm.rank)
    for v in float_vars(opt.variables):  # moments (and learning rate) different on every rank
        v.assign(rng.normal(size=v.shape).astype(v.dtype))
    weights, state = FlatVars(float_vars(model.weights)), FlatVars(float_vars(opt.variables))
    w_pre, s_pre = weights.pack().copy(), state.pack().copy()

    sync = make_sync(strategy, comm, None)
    sync.start(model, opt)

    out = os.path.join(a.out, strategy)
    os.makedirs(out, exist_ok=True)
    np.savez(
        os.path.join(out, f"rank{comm.rank}.npz"),
        w_pre=w_pre,
        s_pre=s_pre,
        w_post=weights.pack().copy(),
        s_post=state.pack().copy(),
    )


for strategy in a.strategy:
    start_and_save(strategy)
sys.exit(0)
