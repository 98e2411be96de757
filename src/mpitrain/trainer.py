"""The training loop: the same code on every rank, one strategy object for the distribution.

Every rank runs `fit` with the same number of epochs and steps; the strategy (`sync.py`)
decides what is exchanged and when. Metrics are exact over the whole data set: sums of
samples, losses and hits are reduced across ranks, and predictions are gathered on rank 0
for ROC AUC. Only rank 0 prints.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from mpitrain.config import TrainConfig
from mpitrain.dataset import Plan, Shard, class_weights
from mpitrain.errors import UserError
from mpitrain.progress import Progress
from mpitrain.shards import batch_slices, epoch_order, steps_per_epoch
from mpitrain.steps import make_predict_step, make_train_step, predict_all
from mpitrain.sync import lr_at, make_sync, scaled_lr
from mpitrain.trainstate import RankState
from mpitrain.watchdog import Watchdog


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_runtime(seed: int, threads: int | None, local_ranks: int) -> int:
    """Threads per rank (the node's cores split between its ranks) and seeded determinism.

    Must run before TensorFlow executes its first op.
    """
    from mpitrain.tfquiet import import_tensorflow

    tf = import_tensorflow()
    import keras

    n = threads or max(1, available_cores() // max(1, local_ranks))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(n)
    except RuntimeError:  # already initialised (second run in one process, e.g. tests)
        pass
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    return n


@dataclass
class Result:
    history: list[dict] = field(default_factory=list)
    val_probs: np.ndarray | None = None   # rank 0 only
    val_labels: np.ndarray | None = None  # rank 0 only
    seconds: float = 0.0
    images_per_second: float = 0.0
    comm_seconds: float = 0.0
    checksum: str = ""


def _make_optimizer(cfg: TrainConfig, lr: float):
    import keras

    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=cfg.momentum)
    return keras.optimizers.Adam(learning_rate=lr)


def _epoch_metrics(comm, stats, probs, labels, n_classes):
    """Exact loss/accuracy from summed counts; AUC from predictions gathered on rank 0."""
    from mpitrain.metrics import classification_metrics

    all_probs = comm.gather_rows(probs.astype(np.float32))
    all_labels = comm.gather_rows(labels.astype(np.int32))
    if comm.rank != 0:
        return None, None, None
    n = max(stats[0], 1.0)
    m = classification_metrics(all_labels, all_probs, [str(i) for i in range(n_classes)])
    return {"loss": stats[1] / n, "accuracy": stats[2] / n, "auc": m["roc_auc"]}, all_probs, all_labels


def fit(cfg: TrainConfig, comm, plan: Plan, data: Shard, model, echo=print,
        checkpoints: bool = False, run_dir=None, resume=None, resuming: bool = False) -> Result:
    """Train `model` in place on every rank; returns the history (complete on rank 0).

    `checkpoints` and `resuming` must be the same on every rank. With `checkpoints`, rank 0
    writes them to `run_dir`; with `resuming`, every rank continues from the checkpoint
    `resume` that rank 0 read (the others pass None).
    """
    cfg = cfg.resolved()
    sync = make_sync(cfg.strategy, comm, cfg.sync_every)
    if sync.train_ranks < 1:
        raise UserError("--strategy master-worker needs at least 2 processes (1 master + workers)")
    n_classes = len(plan.classes)
    weights = class_weights(plan.class_counts(), cfg.class_weight)
    target_lr = scaled_lr(cfg.lr, cfg.lr_scaling, sync.train_ranks)
    optimizer = _make_optimizer(cfg, target_lr)
    optimizer.build(model.trainable_variables)
    sync.start(model, optimizer)
    state = RankState(model, optimizer, sync)
    step = make_train_step(model, optimizer, sync.reduce_step if sync.per_step_reduce else None)
    predict = make_predict_step(model)

    # Collective: every rank must agree on the step count before the first step.
    steps = steps_per_epoch(int(comm.allreduce_max(len(data.train_x))), cfg.batch_size)
    warmup = int(round(cfg.warmup_epochs * steps))
    total = cfg.epochs * steps
    tag = f"{sync.name} x{sync.train_ranks}" + (" + master" if sync.name == "master-worker" else "")
    result = Result()
    start_epoch, start_step, resumed_stats = 0, 0, None
    if resuming:
        # Collective, in this order: where to continue (bcast), then each rank's state (scatter).
        start_epoch, start_step, history = comm.bcast_obj(
            (resume.epoch, resume.step, resume.history) if comm.rank == 0 else None)
        resumed_stats = state.scatter(comm, resume)
        result.history = list(history) if comm.rank == 0 else []
        echo(f"resuming at epoch {start_epoch + 1}, step {start_step} of {steps}")

    def checkpoint(epoch: int, done: int, stats: np.ndarray, status: str = "running") -> None:
        if not checkpoints:
            return
        gathered = state.gather(comm, stats)  # collective: every rank's state to rank 0
        if comm.rank == 0:
            from mpitrain import checkpoint as ckpt

            states, shared = gathered
            ckpt.save(run_dir, ckpt.Checkpoint(
                epoch=epoch, step=done, ranks=comm.size, strategy=cfg.strategy, states=states,
                shared=shared, status=status, config=cfg.to_dict(), history=result.history),
                keep=cfg.keep_checkpoints)

    dog = Watchdog(cfg.timeout, lambda: comm.abort(3), comm.rank).start()
    t_start = time.perf_counter()
    seen = 0
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        order = epoch_order(len(data.train_x), cfg.seed, epoch, comm.rank)
        first = start_step if epoch == start_epoch else 0
        # samples, loss sum, hits (after a mid-epoch resume: the sums saved with the state)
        stats = resumed_stats if first and resumed_stats is not None else np.zeros(3, dtype=np.float64)
        probs, labels = [], []
        bar = Progress(steps, f"epoch {epoch + 1}/{cfg.epochs} ", enabled=comm.rank == 0 and sync.trains)
        for s, idx in enumerate(batch_slices(order, steps, cfg.batch_size)):
            if s < first:
                continue  # done before the checkpoint we resumed from
            if sync.trains:
                lr = lr_at(cfg.lr, target_lr, warmup, epoch * steps + s, total, cfg.lr_schedule)
                y = data.train_y[idx]
                st, p = step(data.train_x[idx], y, weights[y], np.float32(lr))
                stats += st.numpy()
                probs.append(p.numpy())
                labels.append(y)
                bar.update(s + 1, loss=stats[1] / max(stats[0], 1), acc=stats[2] / max(stats[0], 1))
            sync.after_step(s + 1, steps, len(idx))
            dog.beat(f"epoch {epoch + 1} step {s + 1}")
            if cfg.checkpoint_every and (s + 1) % cfg.checkpoint_every == 0 and s + 1 < steps:
                checkpoint(epoch, s + 1, stats)
        sync.end_epoch()
        bar.close()
        if not sync.per_step_reduce:
            comm.allreduce_sum_(stats)  # collective: per-rank sums -> global sums
        train_time = time.perf_counter() - t0
        seen += stats[0]
        train_m, _, _ = _epoch_metrics(
            comm, stats,
            np.concatenate(probs) if probs else np.zeros((0, n_classes), np.float32),
            np.concatenate(labels) if labels else np.zeros(0, np.int32), n_classes)

        vp = predict_all(predict, data.val_x, n_classes)
        vstats = np.array([len(vp), _loss_sum(data.val_y, vp), float((vp.argmax(1) == data.val_y).sum())])
        comm.allreduce_sum_(vstats)  # collective: validation sums over the val shards
        val_m, all_vp, all_vy = _epoch_metrics(comm, vstats, vp, data.val_y, n_classes)
        dog.beat(f"validation after epoch {epoch + 1}")
        if comm.rank == 0:
            row = {"epoch": epoch + 1, **train_m, **{f"val_{k}": v for k, v in val_m.items()},
                   "lr": lr_at(cfg.lr, target_lr, warmup, (epoch + 1) * steps - 1, total, cfg.lr_schedule),
                   "seconds": round(train_time, 3),
                   "images_per_second": round(stats[0] / max(train_time, 1e-9), 1)}
            result.history.append(row)
            result.val_probs, result.val_labels = all_vp, all_vy
            echo(_epoch_line(row, cfg.epochs, tag))
        checkpoint(epoch + 1, 0, np.zeros(3), "finished" if epoch + 1 == cfg.epochs else "running")
        dog.beat(f"checkpoint after epoch {epoch + 1}")
    dog.stop()
    result.seconds = time.perf_counter() - t_start
    result.images_per_second = seen / max(result.seconds, 1e-9)
    result.comm_seconds = sync.comm_seconds
    result.checksum = _check_identical(comm, sync)
    return result


def _loss_sum(y: np.ndarray, probs: np.ndarray) -> float:
    if len(y) == 0:
        return 0.0
    p = np.clip(probs[np.arange(len(y)), y].astype(np.float64), 1e-7, 1.0)
    return float(-np.log(p).sum())


def _check_identical(comm, sync) -> str:
    """All ranks must end with bit-identical weights; a mismatch is a bug, never silent."""
    mine = sync.checksum()
    sums = comm.allgather_obj(mine)  # collective
    if len(set(sums)) != 1:
        bad = [r for r, s in enumerate(sums) if s != sums[0]]
        raise RuntimeError(f"final weights differ between ranks: rank(s) {bad} differ from rank 0")
    return mine


def _fmt(v) -> str:
    return "  n/a " if v is None else f"{v:.4f}"


def _epoch_line(row: dict, epochs: int, tag: str) -> str:
    return (f"epoch {row['epoch']}/{epochs} [{tag}] "
            f"loss {_fmt(row['loss'])} acc {_fmt(row['accuracy'])} auc {_fmt(row['auc'])} | "
            f"val_loss {_fmt(row['val_loss'])} val_acc {_fmt(row['val_accuracy'])} "
            f"val_auc {_fmt(row['val_auc'])} | {row['seconds']:.1f}s {row['images_per_second']:.0f} img/s")
