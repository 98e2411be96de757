"""Train on deterministic in-memory data with `train.fitting.fit` (the engine) and save each rank's weights.

Run under mpiexec (any strategy; each rank also writes rank{R}.steps: the train steps it
took and its shard's size), or with --reference N in one process: then it replays
exactly the global batches that N allreduce ranks would see together (rank r's batch s,
concatenated in rank order) with the gradient of the mean loss, as a single-process
training with batch N*b on the same sample order.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np

from mpitrain.config import TrainConfig
from mpitrain.data.dataset import Plan, Shard
from mpitrain.parallel.comm import world
from mpitrain.parallel.strategies import make_sync
from mpitrain.runtime import configure_runtime
from mpitrain.shards import batch_slices, epoch_order, shard, steps_per_epoch
from mpitrain.train.fitting import fit
from mpitrain.train.models import build_model

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--strategy", default="allreduce")
p.add_argument("--sync-every", type=int)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--samples", type=int, default=61)
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--reference", type=int, default=0, help="replay N ranks' batches in one process")
a = p.parse_args()

SIZE, SEED = 12, 3
rng = np.random.default_rng(7)
y_all = rng.integers(0, 2, a.samples).astype(np.int32)
x_all = rng.random((a.samples, SIZE, SIZE, 1), dtype=np.float32) * 0.5
x_all[y_all == 1, 3:9, 3:9, 0] += 0.4  # learnable signal
x_all = np.ascontiguousarray(x_all)
val = np.arange(0, a.samples, 5)

cfg = TrainConfig(
    epochs=a.epochs,
    batch_size=a.batch,
    lr=a.lr,
    optimizer="sgd",
    model="tiny",
    image_size=SIZE,
    seed=SEED,
    strategy=a.strategy,
    sync_every=a.sync_every,
    class_weight="none",
    threads=1,
    lr_scaling="none",
    lr_schedule="constant",
)
configure_runtime(SEED, 1, 1)
model = build_model("tiny", SIZE, 2)
plan = Plan("mem", ["a", "b"], [""] * a.samples, y_all, [""] * len(val), y_all[val], "split")

if a.reference:
    import keras

    from mpitrain.engine.steps import make_train_step

    shards = [shard(np.arange(a.samples), r, a.reference, SEED) for r in range(a.reference)]
    opt = keras.optimizers.SGD(learning_rate=a.lr)
    opt.build(model.trainable_variables)
    step = make_train_step(model, opt, None)
    steps = steps_per_epoch(max(len(s) for s in shards), a.batch)
    for epoch in range(a.epochs):
        per_rank = [batch_slices(epoch_order(len(s), SEED, epoch, r), steps, a.batch) for r, s in enumerate(shards)]
        for s in range(steps):
            idx = np.concatenate([shards[r][per_rank[r][s]] for r in range(a.reference)])
            step(x_all[idx], y_all[idx], np.ones(len(idx), np.float32), np.float32(a.lr))
    rank = 0
else:
    import mpitrain.engine.loop as trainer

    real_make, steps_taken = trainer.make_train_step, [0]

    def counting_make(*args, **kwargs):  # count the train steps this rank takes
        step = real_make(*args, **kwargs)

        def counted(*sa):
            steps_taken[0] += 1
            return step(*sa)

        return counted

    trainer.make_train_step = counting_make
    comm = world()
    sync = make_sync(a.strategy, comm, a.sync_every)
    mine = shard(np.arange(a.samples), *sync.train_part, SEED)
    vmine = shard(val, *sync.val_part, SEED)
    data = Shard(x_all[mine], y_all[mine], x_all[vmine], y_all[vmine])
    fit(cfg, comm, plan, data, model, echo=lambda *_: None)
    rank = comm.rank
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"rank{rank}.steps"), "w") as f:
        f.write(f"{steps_taken[0]} {len(mine)}\n")  # steps taken, training samples of the shard

os.makedirs(a.out, exist_ok=True)
np.savez(os.path.join(a.out, f"rank{rank}.npz"), *[w for w in model.get_weights()])
sys.exit(0)
