"""`mpitrain bench`: training throughput on generated data, and how close it is to the machine.

Each rank trains the chosen model on random uint8 images held in memory (no decoding, no
disk; uint8 because that is how `mpitrain train` holds images) with the real trainer loop
(`Engine.run_steps`: the same train step, strategy, shuffling, learning rates and running
sums as training, without the progress bar), at `--precision` (auto: as training resolves it).

What it reports, from the slowest rank's time of the best of `--repeats` runs:

* images per second, in total and per training rank;
* the model's FLOPs per training image, counted from its layers (`train/flops.py`:
  forward x3 for forward + backward, the usual approximation) and the GFLOP/s achieved;
* the matmul rate of this machine in the same precision and threads (a large
  `tf.matmul`, every rank at once), as the practical ceiling the step is compared with;
* where a rank's step time goes, as shares of the wall time (mean over ranks): compute
  (inside the compiled step, minus MPI), communication (inside MPI calls, waiting for the
  other ranks included) and host (everything else the loop does in Python).

`--overlap`, `--bucket-mb`, `--compress` and `--accumulate` are train's; `--no-sync` times the
same ranks stepping with no exchange at all (local-sgd that never averages within the
epoch, its one epoch-end average left out of the time): the ceiling the strategies are
measured against. With `--repeats R` the images/s of every timed run are also reported as
mean and spread (as Horovod's synthetic benchmark reports its rounds), the best run's
shares as above.

`--compare-fit` (one process only) also times plain Keras `model.fit` on the same model,
batch and data in the same precision, in the same fresh process before our loop: the
reference for the one-rank overhead.

The batch defaults to 64 per rank, not train's 32: the throughput figures in
docs/benchmarks.md were measured at 64, where per-step overheads weigh less; pass
`--batch-size 32` to time what `mpitrain train` runs by default.

With `--json`, standard output is the JSON object alone and the human lines go to stderr.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mpitrain.parallel.comm import Comm

MATMUL_N = 1024  # side of the square matmul that measures the machine's rate


def _figures(x: float, digits: int = 4) -> float:
    """x to `digits` significant figures: a tiny model's rates are small numbers, and
    rounding them to fixed decimals would lose their ratios (0.00336 read as 0.0034)."""
    return float(f"{x:.{digits}g}")


def _data(n: int, image_size, n_classes: int, seed: int, channels: int = 1):
    from mpitrain.config import image_shape

    rng = np.random.default_rng(seed)
    shape = (n, *image_shape(image_size)) + ((channels,) if channels > 1 else ())
    rows = rng.integers(0, 256, shape, dtype=np.uint8)
    y = rng.integers(0, n_classes, n).astype(np.int32)
    return rows, y


def _time_fit(model_name, image_size, batch, steps, warmup, x, y, repeats, channels=1):
    """(best seconds per step, dtype policy) of plain `model.fit` over `repeats` epochs
    after a warm-up, on float32 images (what a plain Keras user feeds), in the global
    dtype policy (Keras wraps the optimizer for loss scaling itself under fp16)."""
    import keras

    from mpitrain.train.models import build_model

    m = build_model(model_name, image_size, 2, channels)
    m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    m.fit(x[: batch * warmup], y[: batch * warmup], batch_size=batch, epochs=1, verbose=0, shuffle=False)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        m.fit(x[: batch * steps], y[: batch * steps], batch_size=batch, epochs=1, verbose=0, shuffle=False)
        best = min(best, (time.perf_counter() - t) / steps)
    return best, m.dtype_policy.name


def matmul_gflops(comm: Comm, precision: str, n: int = MATMUL_N, repeats: int = 5) -> float:
    """Collective. GFLOP/s of an n x n x n matmul in the compute dtype of `precision`, on
    this rank's threads while every rank runs its own (they share the machine as in
    training); the best of `repeats`, summed over ranks."""
    import tensorflow as tf

    dtype = {"fp32": tf.float32, "bf16": tf.bfloat16, "fp16": tf.float16}[precision]
    a = tf.random.stateless_uniform((n, n), (1, comm.rank), dtype=tf.float32)
    a = tf.cast(a, dtype)
    mm = tf.function(lambda m: tf.matmul(m, m))
    mm(a).numpy()  # warm-up
    comm.barrier()  # collective: every rank computes at the same time
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a).numpy()
        best = min(best, time.perf_counter() - t)
    rate = np.array([2.0 * n**3 / best / 1e9])
    comm.allreduce_sum_(rate)  # collective: the machine's rate is every rank's together
    return float(rate[0])


class _TimedStep:
    """The trainer's step with a clock: time inside the compiled step, and how much of it
    was MPI (the per-step gradient allreduce runs inside it)."""

    def __init__(self, step, sync_of):
        self.step, self.sync_of = step, sync_of  # sync_of(): the strategy, once the engine has one
        self.seconds = self.comm_seconds = 0.0

    def __getattr__(self, name):
        return getattr(self.step, name)

    def __call__(self, *args):
        sync = self.sync_of()
        c, t = sync.comm_seconds, time.perf_counter()
        out = self.step(*args)
        self.seconds += time.perf_counter() - t
        self.comm_seconds += sync.comm_seconds - c
        return out


def bench_main(
    model_name="seed",
    batch=64,
    steps=60,
    warmup=5,
    image_size=50,
    strategy="allreduce",
    threads=None,
    as_json=False,
    compare_fit=False,
    repeats=1,
    precision="auto",
    compress="none",
    channels=None,
    accumulate=1,
    no_sync=False,
    overlap="auto",
    bucket_mb=8.0,
) -> int:
    from mpitrain.runtime import import_tensorflow

    import_tensorflow()  # first: a plain `import keras` would print TensorFlow's absl/oneDNN notices

    from mpitrain.parallel.comm import world
    from mpitrain.parallel.strategies import strategy_class

    comm = world()
    if no_sync:  # the ceiling: independent steps (local-sgd that never averages within the epoch)
        strategy, compress = "local-sgd", "none"
    strategy_class(strategy).check_ranks(comm.size)  # the same one-line error as `train`
    strategy_class(strategy).check_compress(compress)

    from mpitrain.config import image_size_value
    from mpitrain.engine.loop import Engine, InMemory
    from mpitrain.engine.options import Options
    from mpitrain.pixels import as_float
    from mpitrain.runtime import configure_rank, resolve_precision
    from mpitrain.train.flops import count_flops
    from mpitrain.train.models import build_model

    # Rank 0 resolves "auto" for all (collective), as training does.
    precision = comm.bcast_obj(resolve_precision(precision)[0] if comm.rank == 0 else None)
    from mpitrain.train.models import may_overlap, needs_channels

    overlapping = not no_sync and may_overlap(overlap, model_name, strategy, comm.size)
    n_threads = configure_rank(comm, 0, threads, precision, overlapping)

    channels = channels or needs_channels(model_name) or 1  # train's default (train/command.py)
    rows, y = _data(batch * accumulate * steps, image_size, 2, seed=comm.rank, channels=channels)
    fit = None
    if compare_fit and comm.size == 1:  # first, on a fresh process, so neither run warms the other
        fit = _time_fit(
            model_name,
            image_size,
            batch,
            steps,
            warmup,
            np.concatenate([as_float(rows, 255.0)] * (1 + warmup // steps)),
            np.concatenate([y] * (1 + warmup // steps)),
            repeats,
            channels,
        )
    model = build_model(model_name, image_size, 2, channels)
    flops = count_flops(model)
    options = Options(
        batch_size=batch,
        strategy=strategy,
        precision=precision,
        epochs=1,
        timeout=0,
        lr=1e-3,
        lr_scaling="none",
        lr_schedule="constant",
        compress=compress,
        accumulate=accumulate,
        sync_every=0 if no_sync else None,
        overlap="off" if no_sync else overlap,
        bucket_mb=bucket_mb,
    )
    data = InMemory(rows, y, rows[:0], y[:0], train_max=255.0, val_max=255.0)
    steps_made: list[_TimedStep] = []

    def wrap(step):  # the engine's hook: every train step it makes is timed
        steps_made.append(_TimedStep(step, lambda: trainer.sync))
        return steps_made[-1]

    # Collective: rank 0's weights. No bar, no epoch lines.
    trainer = Engine(model, data, options, comm, progress=False, wrap_step=wrap)
    sync, timed = trainer.sync, steps_made[-1]
    epoch, left = 0, warmup
    while left > 0:  # warm-up: the last `warmup` steps of an epoch (more epochs if needed)
        k = min(left, trainer.steps)
        trainer.run_steps(epoch, trainer.steps - k)
        epoch, left = epoch + 1, left - k
    best, rounds = None, []
    for _ in range(repeats):
        sync.comm_seconds = timed.seconds = timed.comm_seconds = 0.0
        comm.barrier()  # collective: all ranks start timing together
        t, hidden0 = time.perf_counter(), sync.hidden_seconds
        trainer.run_steps(epoch, 0)
        mine = time.perf_counter() - t
        hidden = sync.hidden_seconds - hidden0
        if no_sync:  # the steps alone: the epoch end's one weight average is not a step's
            mine -= sync.comm_seconds
            sync.comm_seconds = 0.0
        epoch += 1
        seconds = comm.allreduce_max(mine)  # collective: the slowest rank sets the pace
        rounds.append(seconds)
        compute = timed.seconds - timed.comm_seconds
        shares = np.array([compute / mine, sync.comm_seconds / mine, 1.0 - (compute + sync.comm_seconds) / mine])
        comm.allreduce_sum_(shares)  # collective: mean over ranks (below)
        if best is None or seconds < best[0]:
            best = (seconds, shares / comm.size, hidden / mine)
    assert best is not None  # repeats >= 1
    seconds, (compute_frac, comm_frac, host_frac), summing = best
    peak = matmul_gflops(comm, precision)
    images = batch * accumulate * trainer.steps * sync.train_ranks
    ips = images / seconds
    per_round = images / np.array(rounds)  # images/s of each timed run, as Horovod's benchmark prints them
    gflops = flops.train * ips / 1e9
    result = {
        "model": model_name,
        "image_size": image_size_value(image_size),  # a square's side, or "WxH"
        "channels": channels,
        "precision": precision,
        "compress": compress,
        "batch_size_per_rank": batch,
        "accumulate": accumulate,
        "steps": trainer.steps,
        "strategy": "none (no exchange: the ceiling)" if no_sync else strategy,
        "ranks": comm.size,
        "training_ranks": sync.train_ranks,
        "threads_per_rank": n_threads,
        "seconds": round(seconds, 3),
        "images_per_second": _figures(ips, 6),
        "images_per_second_per_rank": _figures(ips / max(sync.train_ranks, 1), 6),
        "images_per_second_mean": _figures(float(per_round.mean()), 6),
        "images_per_second_spread": _figures(float(per_round.std()), 3),  # over the timed runs
        "rounds": len(rounds),
        "flops_per_image_forward": flops.forward,
        "flops_per_image_train": flops.train,
        "flops_method": "counted from the layers; a training step = 3 x forward (approximation)",
        "uncounted_layers": flops.uncounted,
        "gflops_per_second": _figures(gflops),
        "matmul_gflops_per_second": _figures(peak),
        "fraction_of_matmul": _figures(gflops / peak) if peak > 0 else None,
        "overlap": sync.exchange is not None,
        "bucket_mb": bucket_mb if sync.exchange is not None else None,
        # --overlap: the exchange thread's time summing, as a share of the wall time (rank 0);
        # communication_fraction is then only the part the step waited for.
        "summing_fraction": round(float(summing), 4),
        "compute_fraction": round(float(compute_frac), 4),
        "comm_fraction": round(float(comm_frac), 4),
        "host_fraction": round(float(host_frac), 4),
    }
    if fit is not None:
        fit_step, fit_policy = fit
        result["fit_images_per_second"] = round(batch / fit_step, 1)
        result["fit_dtype_policy"] = fit_policy
        result["vs_fit"] = round(result["images_per_second"] / result["fit_images_per_second"], 3)
    if comm.rank == 0:
        say = (lambda line: print(line, file=sys.stderr)) if as_json else print  # --json: stdout is JSON only
        micro = f" x {accumulate} micro-batches" if accumulate > 1 else ""
        how = (
            "no exchange (the ceiling)" if no_sync else f"{strategy}" + (f", {compress}" if compress != "none" else "")
        )
        if sync.exchange is not None:
            how += f", overlap in {bucket_mb:g} MB buckets"
        say(
            f"bench: {result['ranks']} rank(s) x {n_threads} thread(s), {model_name}, {precision}, {how}, "
            f"batch {batch}{micro}/rank, {trainer.steps} steps: {result['images_per_second']:.0f} img/s total, "
            f"{result['images_per_second_per_rank']:.0f} img/s per training rank, "
            f"communication {100 * comm_frac:.1f}% of step time"
        )
        if len(rounds) > 1:  # Horovod's synthetic benchmark reports its rounds so
            say(
                f"bench: over {len(rounds)} timed runs: {per_round.mean():.1f} +- {per_round.std():.1f} img/s total "
                f"(best {per_round.max():.1f})"
            )
        gaps = f" (not counted: {', '.join(flops.uncounted)})" if flops.uncounted else ""
        say(
            f"bench: {flops.train / 1e6:.3g} MFLOP per training image (forward {flops.forward / 1e6:.3g} x3){gaps}: "
            f"{gflops:.1f} GFLOP/s achieved, {100 * gflops / peak:.0f}% of this machine's {precision} matmul "
            f"rate ({peak:.0f} GFLOP/s over {comm.size} rank(s) x {n_threads} thread(s))"
        )
        say(
            f"bench: step time: compute {100 * compute_frac:.1f}%, communication {100 * comm_frac:.1f}%, "
            f"host {100 * host_frac:.1f}% (mean over ranks)"
            + (f"; the exchange thread summed for {100 * summing:.1f}% of it" if sync.exchange is not None else "")
        )
        if fit is not None:
            say(
                f"bench: plain model.fit ({result['fit_dtype_policy']}): {result['fit_images_per_second']:.0f} img/s "
                f"(mpitrain / fit = {result['vs_fit']:.3f})"
            )
        if as_json:
            print(json.dumps(result))
    return 0
