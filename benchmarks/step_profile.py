"""Where one training step's time goes: the compiled step alone against the trainer's loop.

Run from the repository root (one process, generated data, nothing written):

    PYTHONPATH=src python benchmarks/step_profile.py                    # seed CNN, batch 32, fp32, 1 thread
    PYTHONPATH=src python benchmarks/step_profile.py --precision bf16 --threads 2
    PYTHONPATH=src python benchmarks/step_profile.py --profile          # + cProfile of one trainer epoch
    PYTHONPATH=src python benchmarks/step_profile.py --pieces           # each piece of host work alone

Three timings of the same model, batch and data, alternated `--repeats` times (the lowest
of each kind is reported, the fairest figure on a shared machine):

* `step alone`: the trainer's compiled train step (`steps.make_train_step`) called in a
  loop with inputs that are already TensorFlow tensors and nothing else: the floor a loop
  can reach;
* `step, numpy in`: the same, fed NumPy batches (prepared beforehand, in the form the step
  takes: uint8 rows, or float32 before the lean step): adds the conversion of the
  arguments at the call;
* `trainer loop`: the real engine (`Engine`) running the steps of one epoch on uint8 images (what
  `mpitrain train` holds): `Engine.run_steps`, without validation or metrics.

Each is timed twice: wall clock and CPU time of the process (`time.process_time`). With
one thread and a machine shared with other work the CPU time is the steadier figure (a
process waiting for a core is not charged), so `host overhead` = (trainer loop - step
alone) / trainer loop is given for both. The load average is printed beside the figures.
`--profile` adds a cProfile of one more trainer epoch (its own overhead inflates small
functions, so it says where the host time goes, not how much there is).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def _load() -> str:
    try:
        return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load ?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="seed")
    p.add_argument("--image-size", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=100, help="steps per timed run (one epoch of the trainer)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--profile", action="store_true", help="also print a cProfile of one trainer epoch")
    p.add_argument(
        "--pieces", action="store_true", help="instead: CPU time of each piece of host work of a step, alone, in a loop"
    )
    a = p.parse_args(argv)
    if a.pieces:
        return pieces(a)

    from mpitrain.runtime import configure_runtime, import_tensorflow

    tf = import_tensorflow()
    configure_runtime(0, a.threads, 1, a.precision)

    from mpitrain.config import TrainConfig
    from mpitrain.data.dataset import Plan, Shard
    from mpitrain.parallel.comm import SingleComm
    from mpitrain.pixels import as_float
    from mpitrain.train.fitting import engine_for
    from mpitrain.train.models import build_model

    b, n = a.batch_size, a.batch_size * a.steps
    rng = np.random.default_rng(0)
    x8 = rng.integers(0, 256, (n, a.image_size, a.image_size), dtype=np.uint8)
    y = rng.integers(0, 2, n).astype(np.int32)
    vx, vy = x8[:b], y[:b]  # one validation batch: the trainer's epoch validates, we do not time it
    plan = Plan("generated", ["a", "b"], [""] * n, y, [""] * b, vy, "split")
    data = Shard(x8, y, vx, vy, train_max=255.0, val_max=255.0)
    cfg = TrainConfig(
        epochs=10_000,
        batch_size=b,
        model=a.model,
        image_size=a.image_size,
        timeout=0,
        class_weight="none",
        precision=a.precision,
        lr_schedule="constant",
    )
    model = build_model(a.model, a.image_size, 2)
    trainer = engine_for(cfg, SingleComm(), plan, data, model, echo=lambda line: None, progress=False)
    step = trainer.step

    # The batches as the trainer's step takes them: uint8 rows since the lean step
    # (scaled in the graph), float32 before it.
    dtype = np.dtype(getattr(step, "input_dtype", np.float32))
    xf = x8[..., np.newaxis] if dtype.kind in "ui" else as_float(x8, 255.0)
    w = np.ones(b, np.float32)
    lr = np.float32(cfg.lr)
    batches_np = [(xf[i : i + b], y[i : i + b], w) for i in range(0, n, b)]
    batches_tf = [tuple(tf.constant(t) for t in bt) for bt in batches_np]
    lr_tf = tf.constant(lr)

    def timed(fn):
        def run():
            t, c = time.perf_counter(), time.process_time()
            fn()
            return time.perf_counter() - t, time.process_time() - c

        return run

    @timed
    def alone():
        for bx, by, bw in batches_tf:
            stats, _ = step(bx, by, bw, lr_tf)
        np.asarray(stats)

    @timed
    def numpy_in():
        for bx, by, bw in batches_np:
            stats, _ = step(bx, by, bw, lr)
        np.asarray(stats)

    epoch = [0]

    @timed
    def loop():
        (trainer.run_steps if hasattr(trainer, "run_steps") else trainer._train_steps)(epoch[0], 0, None)
        epoch[0] += 1

    runs = {"step alone": alone, "step, numpy in": numpy_in, "trainer loop": loop}
    for fn in runs.values():  # warm-up: compile, first-call costs
        fn()
    best = {k: [float("inf"), float("inf")] for k in runs}  # wall, cpu
    print(
        f"{a.model} {a.image_size}px batch {b} {a.precision} {a.threads} thread(s), "
        f"{a.steps} steps x {a.repeats} repeats, TensorFlow {tf.__version__}",
        flush=True,
    )
    for r in range(a.repeats):
        row = []
        for name, fn in runs.items():
            wall, cpu = (v / a.steps for v in fn())
            best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
            row.append(f"{name} {wall * 1e3:.2f}/{cpu * 1e3:.2f}")
        print(f"  run {r + 1} (wall/cpu ms per step): " + ", ".join(row) + f"  ({_load()})", flush=True)
    print("lowest per step:             wall ms    img/s   vs alone |  cpu ms   vs alone")
    for name, (wall, cpu) in best.items():
        print(
            f"  {name:24s} {wall * 1e3:8.3f} {b / wall:8.1f} {100 * (wall / best['step alone'][0] - 1):+8.2f}% |"
            f" {cpu * 1e3:7.3f} {100 * (cpu / best['step alone'][1] - 1):+8.2f}%"
        )
    for k, what in ((0, "wall"), (1, "cpu")):
        base, loop_s = best["step alone"][k], best["trainer loop"][k]
        print(
            f"host overhead ({what}): {100 * (loop_s - base) / loop_s:.2f}% of the trainer's step "
            f"({(loop_s - base) * 1e6:.0f} us per step)"
        )
    print(f"({_load()})")
    if a.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        loop()
        prof.disable()
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    return 0


def pieces(a) -> int:
    """CPU time per call of each piece of per-step host work, timed alone over many calls:
    what the trainer loop did before the lean step, and what replaced it. The call of a
    `tf.function` is timed on a trivial body with the train step's signature, so it is
    the dispatch, not the model."""
    from mpitrain.runtime import configure_runtime, import_tensorflow

    tf = import_tensorflow()
    configure_runtime(0, 1, 1, "fp32")
    from mpitrain.engine.callbacks.progress import Progress
    from mpitrain.parallel.strategies import lr_at
    from mpitrain.parallel.watchdog import Watchdog
    from mpitrain.pixels import as_float

    b, side = a.batch_size, a.image_size
    rng = np.random.default_rng(0)
    x8 = rng.integers(0, 256, (b * 100, side, side), dtype=np.uint8)
    y_all = rng.integers(0, 2, b * 100).astype(np.int32)
    idx = rng.permutation(b * 100)[:b]
    xf, y, w, lr = as_float(x8[idx], 255.0), y_all[idx], np.ones(b, np.float32), np.float32(1e-3)
    sums = tf.Variable(tf.zeros(3, tf.float64))
    divisor = tf.Variable(255.0)

    def body(x, yy, ww, r):
        return tf.stack([r, tf.reduce_sum(ww), 1.0]), tf.zeros((tf.shape(x)[0], 2))

    def body8(x, yy, ww, r):
        x = tf.cast(x, tf.float32) / divisor
        st = tf.stack([r, tf.reduce_sum(ww), tf.reduce_sum(x) * 0.0])
        sums.assign_add(tf.cast(st, tf.float64))
        return st, tf.zeros((tf.shape(x)[0], 2))

    tail = [tf.TensorSpec((None,), tf.int32), tf.TensorSpec((None,), tf.float32), tf.TensorSpec((), tf.float32)]
    poly = tf.function(body, input_signature=[tf.TensorSpec((None, side, side, 1), tf.float32)] + tail)
    conc8 = tf.function(
        body8, input_signature=[tf.TensorSpec((None, side, side, 1), tf.uint8)] + tail
    ).get_concrete_function()
    st, p = poly(xf, y, w, lr)
    stats, probs = np.zeros(3), []
    bar, dog = Progress(100, "e", enabled=False), Watchdog(0, None, 0)
    tensors = [tf.constant(t) for t in (xf, y, w, lr)]
    runs = {
        "before: rows and labels of the batch (fancy index)": lambda: (x8[idx], y_all[idx]),
        "before: as_float (uint8 -> float32 in NumPy)": lambda: as_float(x8[idx], 255.0),
        "before: lr_at + np.float32 per step": lambda: np.float32(lr_at(1e-3, 1.4e-3, 10, 500, 1500, "cosine")),
        "before: tf.function call, float32 NumPy args": lambda: poly(xf, y, w, lr),
        "       (the same, args already tensors)": lambda: poly(*tensors),
        "before: stats += st.numpy()": lambda: stats.__iadd__(st.numpy()),
        "before: probs.append(p.numpy())": lambda: probs.append(p.numpy()),
        "before: bar.update(loss=, acc=) (bar off)": lambda: bar.update(
            5, loss=stats[1] / max(stats[0], 1), acc=stats[2] / max(stats[0], 1)
        ),
        "both:   watchdog beat with its f-string": lambda: dog.beat(f"epoch {1 + 1} step {5 + 1}"),
        "after:  rows[..., None] (a view)": lambda: x8[idx][..., np.newaxis],
        "after:  concrete function call, uint8 args, sums in graph": lambda: conc8(x8[idx][..., np.newaxis], y, w, lr),
        "after:  probs.append(p) (the tensor)": lambda: probs.append(p),
        "after:  bar.update(values=callable) (bar off)": lambda: bar.update(5, values=lambda: {}),
    }
    print(f"CPU time per call, {b} images of {side}x{side}, 1 thread, TensorFlow {tf.__version__}  ({_load()})")
    for name, fn in runs.items():
        for _ in range(50):
            fn()
        n = 2000
        c = time.process_time()
        for _ in range(n):
            fn()
        print(f"  {name:58s} {1e6 * (time.process_time() - c) / n:8.1f} us", flush=True)
        probs.clear()
    print(f"({_load()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
