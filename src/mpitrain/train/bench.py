"""`mpitrain bench`: training throughput on generated data, per rank and in total.

Each rank trains the chosen model on random images (no decoding, no disk) with the real
train step and strategy, and reports images per second and the share of step time spent
inside MPI calls, at `--precision` (auto: as training resolves it). `--compare-fit` (one process only) also times plain Keras `model.fit`
on the same model, batch and data, which is the reference for the one-rank overhead.

The batch defaults to 64 per rank, not train's 32: the throughput figures in
docs/benchmarks.md were measured at 64, where per-step overheads weigh less; pass
`--batch-size 32` to time what `mpitrain train` runs by default.

With `--json`, standard output is the JSON object alone and the human lines go to stderr.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def _data(n: int, image_size: int, n_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.random((n, image_size, image_size, 1), dtype=np.float32)
    y = rng.integers(0, n_classes, n).astype(np.int32)
    return x, y


def _time_fit(model_name, image_size, batch, steps, warmup, x, y, repeats) -> float:
    """Best seconds per step of plain `model.fit` over `repeats` epochs (after a warm-up)."""
    import keras

    from mpitrain.train.models import build_model

    m = build_model(model_name, image_size, 2)
    m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    m.fit(x[:batch * warmup], y[:batch * warmup], batch_size=batch, epochs=1, verbose=0, shuffle=False)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        m.fit(x[:batch * steps], y[:batch * steps], batch_size=batch, epochs=1, verbose=0, shuffle=False)
        best = min(best, (time.perf_counter() - t) / steps)
    return best


def bench_main(model_name="seed", batch=64, steps=60, warmup=5, image_size=50, strategy="allreduce",
               threads=None, as_json=False, compare_fit=False, repeats=1, precision="auto",
               compress="none") -> int:
    from mpitrain.runtime import import_tensorflow

    import_tensorflow()  # first: a plain `import keras` would print TensorFlow's absl/oneDNN notices

    from mpitrain.dist.comm import world
    from mpitrain.dist.strategies import make_sync, strategy_class

    comm = world()
    strategy_class(strategy).check_ranks(comm.size)  # the same one-line error as `train`
    strategy_class(strategy).check_compress(compress)

    import keras

    from mpitrain.runtime import configure_rank, resolve_precision
    from mpitrain.train.models import build_model
    from mpitrain.train.steps import make_train_step

    # Rank 0 resolves "auto" for all (collective), as training does.
    precision = comm.bcast_obj(resolve_precision(precision)[0] if comm.rank == 0 else None)
    n_threads = configure_rank(comm, 0, threads, precision)
    x, y = _data(batch * max(steps, warmup), image_size, 2, seed=comm.rank)
    fit_step = None
    if compare_fit and comm.size == 1:  # first, on a fresh process, so neither run warms the other
        fit_step = _time_fit(model_name, image_size, batch, steps, warmup, x, y, repeats)
    model = build_model(model_name, image_size, 2)
    opt = keras.optimizers.Adam(1e-3)
    if precision == "fp16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    opt.build(model.trainable_variables)
    sync = make_sync(strategy, comm, None, compress=compress)
    sync.start(model, opt)
    step = make_train_step(model, opt, sync.reduce_step if sync.per_step_reduce else None)
    w = np.ones(batch, np.float32)
    lr = np.float32(1e-3)

    def run(k: int) -> float:
        t = time.perf_counter()
        for s in range(k):
            a = (s % steps) * batch
            if sync.trains:
                stats, _ = step(x[a:a + batch], y[a:a + batch], w, lr)
                stats.numpy()
            sync.after_step(s + 1, k, batch if sync.trains else 0)
        return time.perf_counter() - t

    run(warmup)
    best = None
    for _ in range(repeats):
        sync.comm_seconds = 0.0
        comm.barrier()  # collective: all ranks start timing together
        seconds = comm.allreduce_max(run(steps))  # the slowest rank sets the pace
        comm_frac = np.array([sync.comm_seconds / max(seconds, 1e-9)])
        comm.allreduce_sum_(comm_frac)
        if best is None or seconds < best[0]:
            best = (seconds, float(comm_frac[0]) / comm.size)
    seconds, comm_frac = best
    images = batch * steps * sync.train_ranks
    result = {"model": model_name, "precision": precision, "compress": compress, "batch_size_per_rank": batch, "steps": steps, "strategy": strategy,
              "ranks": comm.size, "training_ranks": sync.train_ranks, "threads_per_rank": n_threads,
              "seconds": round(seconds, 3), "images_per_second": round(images / seconds, 1),
              "images_per_second_per_rank": round(images / seconds / max(sync.train_ranks, 1), 1),
              "comm_fraction": round(comm_frac, 4)}
    if fit_step is not None:
        result["fit_images_per_second"] = round(batch / fit_step, 1)
        result["vs_fit"] = round(result["images_per_second"] / result["fit_images_per_second"], 3)
    if comm.rank == 0:
        say = (lambda line: print(line, file=sys.stderr)) if as_json else print  # --json: stdout is JSON only
        say(f"bench: {result['ranks']} rank(s) x {n_threads} thread(s), {model_name}, {precision}, batch {batch}/rank, "
            f"{steps} steps: {result['images_per_second']:.0f} img/s total, "
            f"{result['images_per_second_per_rank']:.0f} img/s per training rank, "
            f"communication {100 * comm_frac:.1f}% of step time")
        if "fit_images_per_second" in result:
            say(f"bench: plain model.fit: {result['fit_images_per_second']:.0f} img/s "
                f"(mpitrain / fit = {result['vs_fit']:.3f})")
        if as_json:
            print(json.dumps(result))
    return 0
