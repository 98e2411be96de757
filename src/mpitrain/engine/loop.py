"""The engine: a Keras model, arrays and options in, the model trained in place on every rank.

It knows nothing of folders, data sources or the chest X-rays: the caller hands it the
rows this rank owns (`Arrays`), the options (`Options`) and callbacks (keep-best, early
stopping, TensorBoard, its own progress bar: `engine/callbacks/`); `mpitrain train` is
one such caller (`train/fitting.py`).

Every rank runs the same epochs and steps; the strategy (`parallel/strategies/`) decides what is
exchanged and when. Metrics come from sums and predictions over the whole data set
(`epochs.py`), with two exceptions: after an elastic recovery the epoch's data was
re-sharded mid-way, and after a mid-epoch resume the training AUC covers only the steps
after the checkpoint (loss and accuracy are exact: their sums are checkpointed). With
--ema, validation, the callbacks at an epoch's end and the model at the end see the
optimizer's average of the weights, training the raw ones (`engine/ema.py`). Only rank 0
prints and writes; every callback runs on every rank with the global epoch row. Rank 0 checkpoints at every epoch end (and every --checkpoint-every
steps), and a run can continue from a checkpoint bit for bit.

Elastic mode (ULFM): when a peer dies, every survivor's next collective raises RankLost
(the communicator is revoked, so nobody waits). The survivors then shrink the
communicator, adopt rank 0's state, re-shard the data among themselves, rebuild the
strategy and the train step for the new rank count, and go on from rank 0's position in
the current epoch (master-worker: the start of the master's round, `Sync.recovery_step`).
Rank 0 writes the run folder; if it is the one lost, the survivors stop
cleanly and the run continues with --resume from its newest checkpoint. A lost *host* ends
the whole job (Open MPI's runtime does not survive it): the launcher starts it again on the
hosts left, from the newest checkpoint (`launcher/hostloss.py`).

Stop requests (SIGTERM/SIGUSR1 to any rank, `parallel/preempt.py`): after every step the ranks
ask their strategy whether they have agreed to stop (a vote carried by the strategy's own
collectives, see `parallel/strategies/base.py`); once they have, they write a checkpoint at
that step and raise StopRequested, which `mpitrain train` turns into exit code 0 and the
command that resumes the run.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mpitrain.engine import mixup as mixing
from mpitrain.engine import multilabel
from mpitrain.engine.callbacks.base import CallbackList
from mpitrain.engine.callbacks.keep_best import KeepBest
from mpitrain.engine.callbacks.progress import ProgressBar
from mpitrain.engine.ema import WeightAverage
from mpitrain.engine.epochs import epoch_metrics, loss_sum
from mpitrain.engine.options import Options
from mpitrain.engine.predict import predict_probs
from mpitrain.engine.steps import (
    RunningSums,
    make_predict_step,
    make_train_step,
    per_sample_loss,
    smoothed_loss,
    soft_loss,
)
from mpitrain.errors import AgreedError, QuietExit, StopRequested, UserError
from mpitrain.parallel import preempt
from mpitrain.parallel.comm import RankLost
from mpitrain.parallel.pulses import Pulses
from mpitrain.parallel.rankstate import RankState
from mpitrain.parallel.strategies import lr_at, make_sync, scaled_lr, strategy_class
from mpitrain.parallel.watchdog import Watchdog
from mpitrain.pixels import as_float
from mpitrain.shards import batch_slices, epoch_order, steps_per_epoch
from mpitrain.targets import is_multi_label

if TYPE_CHECKING:
    from mpitrain.parallel.comm import Comm


class Arrays(Protocol):
    """This rank's rows: images [n, H, W] (integers, with their full-scale value) or
    [n, H, W, C] (integers, or float32 in [0, 1] with max value 1.0), labels int32 [n], or
    multi-label float32 [n, L] of 1, 0 and NaN (masked: `engine/multilabel.py`).
    The images may also be any read-only stand-in for an array (`--store disk`'s memory-
    mapped rows): the engine only takes len, dtype, ndim and ``x[index array]`` / ``x[a:b]``."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    train_max: float
    val_max: float
    val_index: np.ndarray | None  # each validation row's index in the caller's list (None: unknown)


@dataclass
class InMemory:
    """`Arrays` held in memory (what a library caller passes)."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    train_max: float = 1.0
    val_max: float = 1.0
    val_index: np.ndarray | None = None


@dataclass
class Result:
    history: list[dict] = field(default_factory=list)  # every rank: the epoch rows
    val_probs: np.ndarray | None = None  # rank 0 only
    val_labels: np.ndarray | None = None  # rank 0 only
    val_index: np.ndarray | None = None  # rank 0 only: each row's index in Arrays.val_index terms (-1: unknown)
    seconds: float = 0.0
    images_per_second: float = 0.0
    comm_seconds: float = 0.0
    checksum: str = ""
    events: list[dict] = field(default_factory=list)  # ranks lost (elastic)
    epochs_run: int = 0
    kept_epoch: int | None = None  # KeepBest: the epoch whose weights the model has
    stopped_early: bool = False  # a callback ended the run before the last epoch

    def keep_validation(self, probs, labels, index) -> None:
        """Rank 0: the gathered validation probabilities, labels and indices of the model kept."""
        self.val_probs, self.val_labels, self.val_index = probs, labels, index


def event(kind: str, **fields) -> dict:
    """An events.jsonl line: the time, what happened (`kind`), then `fields` in order."""
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": kind, **fields}


def _make_optimizer(opts: Options, lr: float):
    import keras

    # --ema: Keras' own moving average of the weights (engine/ema.py); not a keyword at all
    # without it, so a default run builds the very optimizer it always did.
    ema = {} if opts.ema is None else {"use_ema": True, "ema_momentum": opts.ema}
    if opts.optimizer == "sgd":
        opt = keras.optimizers.SGD(learning_rate=lr, momentum=opts.momentum, **ema)
    else:
        opt = keras.optimizers.Adam(learning_rate=lr, **ema)
    if opts.precision == "fp16":  # dynamic loss scaling: see engine/steps.py
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


DEFAULT_LR = 1e-3


def check_own_parts(model, ema: float | None, label_smoothing: float, mixup: float) -> None:
    """--ema, --label-smoothing and --mixup change the engine's own optimizer and loss: a
    one-line UserError for a model compiled with an optimizer or a loss of its own."""
    if ema is not None and getattr(model, "optimizer", None) is not None:
        raise UserError(
            "--ema makes mpitrain's optimizer keep the weights' average, and the model was compiled with an "
            "optimizer of its own: compile it without one (or give it use_ema=True yourself) and drop --ema"
        )
    if label_smoothing and getattr(model, "loss", None) is not None:
        raise UserError(
            "--label-smoothing smooths mpitrain's cross-entropy, and the model was compiled with a loss of its "
            "own: compile it without one (or smooth in your loss) and drop --label-smoothing"
        )
    if mixup and getattr(model, "loss", None) is not None:
        raise UserError(
            "--mixup trains mpitrain's cross-entropy against mixed labels, and the model was compiled with a loss "
            "of its own: compile it without one and drop --mixup"
        )


def _check_multilabel(model, data: Arrays, opts: Options) -> None:
    """Multi-label data needs one sigmoid output per label and mpitrain's own masked loss."""
    n_out, n_labels = int(model.output_shape[-1]), int(data.train_y.shape[1])
    if n_out != n_labels:
        raise UserError(f"the model has {n_out} output(s) and the data {n_labels} label(s): one sigmoid unit per label")
    if getattr(model, "loss", None) is not None:
        raise UserError(
            "multi-label training uses mpitrain's masked binary cross-entropy, and the model was compiled with a "
            "loss of its own: compile it without one"
        )
    if opts.mixup or opts.label_smoothing:
        raise UserError("--mixup and --label-smoothing are for one label per image; drop them for multi-label data")


def _optimizer_for(model, opts: Options):
    """(optimizer, whether the engine sets its rate each step): the model's own when it was
    compiled with one (its rate untouched unless `lr` is given), else one made from `opts`."""
    import keras

    own = getattr(model, "optimizer", None)
    if own is None:
        return _make_optimizer(opts, DEFAULT_LR if opts.lr is None else opts.lr), True
    if opts.precision == "fp16" and not isinstance(own, keras.optimizers.LossScaleOptimizer):
        own = keras.optimizers.LossScaleOptimizer(own)
    return own, opts.lr is not None


def _class_weights(given, n_classes: int) -> np.ndarray:
    """Per-class loss weights as float32 [n_classes]: an array, a {class: weight} dict as
    Keras' `fit(class_weight=...)` takes, or None (all 1)."""
    if given is None:
        return np.ones(n_classes, np.float32)
    if isinstance(given, dict):
        return np.array([given.get(c, 1.0) for c in range(n_classes)], np.float32)
    return np.asarray(given, np.float32)


Augment = Callable[[np.ndarray, float, int, int, int], np.ndarray]  # (rows, max, epoch, rank, step) -> float32


class Engine:
    def __init__(
        self,
        model,
        data: Arrays,
        options: Options,
        comm: Comm | None = None,
        *,
        class_weight=None,
        augment: Augment | None = None,
        callbacks: list[Any] = (),  # type: ignore[assignment]
        echo: Callable[[str], Any] = print,
        progress: bool = True,
        checkpoints: bool = False,
        checkpoint_dir=None,
        checkpoint_config: dict | None = None,
        reshard: Callable[[tuple, tuple], Arrays] | None = None,
        wrap_step: Callable[[Any], Any] | None = None,
    ):
        """`comm`: the ranks (default: the MPI world, or one process). `checkpoints` must be the
        same on every rank; rank 0 writes them under `checkpoint_dir` with `checkpoint_config`
        (what a resumed run is rebuilt from). `reshard(train_part, val_part)` loads a rank's
        rows for a new layout (elastic). `wrap_step(step)` wraps every train step made
        (`mpitrain bench` times it). `progress`: rank 0's bar and epoch lines through `echo`."""
        from mpitrain.parallel.comm import world

        self.options = opts = options.resolved()
        self.comm = comm = world() if comm is None else comm
        # Rank 0 speaks for the job: callbacks and the engine's own messages use `self.echo`.
        self.data, self.model = data, model
        self.echo = echo if comm.rank == 0 else _silent
        self.checkpoints, self.checkpoint_dir, self.reshard = checkpoints, checkpoint_dir, reshard
        self.checkpoint_config = checkpoint_config if checkpoint_config is not None else _as_dict(opts)
        self.augment, self.wrap_step = augment, wrap_step
        check_own_parts(model, opts.ema, opts.label_smoothing, opts.mixup)
        self.n_classes = int(model.output_shape[-1])
        # Labels [n, L]: sigmoid outputs. Collective: a rank without rows may hold labels [0].
        self.multi = bool(comm.allreduce_max(float(is_multi_label(data.train_y))))
        if self.multi:
            multilabel.widen_empty(data, self.n_classes)
            _check_multilabel(model, data, opts)
            self.class_w = multilabel.check_weights(class_weight, self.n_classes)
        else:
            self.class_w = _class_weights(class_weight, self.n_classes)
        self.optimizer, self.set_lr = _optimizer_for(model, opts)
        self.optimizer.build(model.trainable_variables)
        self.ema = WeightAverage(self.optimizer)  # --ema's averages (none without it)
        self.loss_fn = per_sample_loss(model)
        self.own_loss = getattr(model, "loss", None) is not None
        # --label-smoothing: the train step's loss alone; validation keeps the plain `loss_fn`.
        # --mixup: against the mixed (and smoothed) one-hot targets the step is given.
        eps = opts.label_smoothing
        if opts.mixup:
            self.train_loss = soft_loss(eps)
        else:
            self.train_loss = smoothed_loss(self.n_classes, eps) if eps else self.loss_fn
        self.predict = make_predict_step(model)
        self.sums = RunningSums()  # the epoch's samples, loss sum and hits, added up by the step
        self.result = Result()
        self.history = self.result.history
        self.done = 0  # steps of the current epoch done on this rank
        self.dog = Watchdog(0, None, comm.rank)  # beaten but not running until fit()
        self.stop_training = False  # set by a callback (EarlyStopping) at an epoch's end
        self.lr_factor = 1.0  # times the scheduled rate (FreezeBackbone lowers it after its epochs)
        self.rebuild_seconds = 0.0  # spent making the train step again (rebuild_step)
        self.callbacks = CallbackList(([ProgressBar(self.echo)] if progress else []) + list(callbacks), self)
        self._layout(first_time=True)

    def _layout(self, first_time: bool) -> None:
        """Everything that depends on the number of ranks (again after a rank is lost)."""
        opts, comm = self.options, self.comm
        # The strategy refuses too few ranks itself; while it waits for peers that are still
        # working it reports their progress to the watchdog.
        self.sync = make_sync(
            opts.strategy,
            comm,
            opts.sync_every,
            progress=self._beat,
            stop_requested=lambda: preempt.requested() is not None,
            compress=opts.compress,
            bucket_bytes=self._bucket_bytes(),
        )
        if first_time:
            self.sync.start(self.model, self.optimizer)  # collective: rank 0's initial state
        else:
            self.sync.attach(self.model, self.optimizer)
            assert self.reshard is not None, "an elastic re-layout needs reshard()"
            self.data = self.reshard(self.sync.train_part, self.sync.val_part)
        self.state = RankState(self.model, self.optimizer, self.sync)
        self._make_step()
        if first_time and self.sync.exchange is not None:
            from mpitrain.parallel.overlap import plan

            sizes = [int(np.prod(v.shape)) for v in self.model.trainable_variables]
            self.echo(
                f"overlap: the gradient sum in {len(plan(sizes, self.sync.bucket_bytes))} buckets of about "
                f"{opts.bucket_mb:g} MB, each started while backprop goes on"
            )
        # Collective: every rank must agree on the step count before the first step.
        self.steps = steps_per_epoch(int(comm.allreduce_max(len(self.data.train_x))), self.step_rows)
        self.warmup = int(round(opts.warmup_epochs * self.steps))
        self.total = opts.epochs * self.steps
        self.base_lr = DEFAULT_LR if opts.lr is None else opts.lr
        # The rate scales with the effective batch: --accumulate's micro-batches count as ranks.
        self.target_lr = scaled_lr(self.base_lr, opts.lr_scaling, self.sync.train_ranks * opts.accumulate)
        self.tag = self.sync.tag

    def _bucket_bytes(self) -> float:
        """--overlap's bucket size in bytes for this layout (0: off; `parallel.overlap.bucket_bytes`)."""
        from mpitrain.parallel.overlap import bucket_bytes

        o = self.options
        sizes = [int(np.prod(v.shape)) for v in self.model.trainable_variables]
        return bucket_bytes(o.overlap, o.bucket_mb, sizes, self.comm.size, o.accumulate)

    @property
    def step_rows(self) -> int:
        """Rows of one rank's optimizer step: --accumulate micro-batches of --batch-size."""
        return self.options.batch_size * self.options.accumulate

    def _make_step(self) -> None:
        # Integer images enter the step as they are held and are scaled in the graph (the
        # same bits as `as_float`); augmented and mixed batches are float32 from the host.
        rows = self.data.train_x
        self.integer_input = self.augment is None and not self.options.mixup and rows.dtype.kind in "ui"
        self.step = make_train_step(
            self.model,
            self.optimizer,
            self.sync.reduce_step if self.sync.per_step_reduce else None,
            overlap=self.sync if self.sync.exchange is not None else None,
            input_dtype=rows.dtype if self.integer_input else np.float32,
            max_value=self.data.train_max if self.integer_input else 1.0,
            sums=self.sums,
            loss_fn=self.train_loss,
            set_lr=self.set_lr,
            soft_targets=bool(self.options.mixup),
            multi_label=self.multi,
            micro_batch=self.options.batch_size if self.options.accumulate > 1 else 0,
        )
        if self.wrap_step is not None:
            self.step = self.wrap_step(self.step)

    def rebuild_step(self) -> None:
        """Make the train step again for the model's trainable variables as they are now.
        A callback that changed `layer.trainable` calls it, on every rank at the same point
        (FreezeBackbone, at an epoch's begin): the step's gradients and their fused buffer
        are laid out from those variables, and the strategy learns anew which weights it
        averages. The optimizer was built for every variable, so it needs no change."""
        t = time.perf_counter()
        self.sync.attach(self.model, self.optimizer)
        self._make_step()
        self.rebuild_seconds += time.perf_counter() - t  # tracing, not training: kept out of the epoch's time

    def _beat(self, what: str) -> None:
        self.dog.beat(what)

    def _lr(self, global_step: int) -> float:
        o = self.options
        if not self.set_lr:  # the caller's optimizer: its own rate, as it stands now
            return float(np.asarray(self.optimizer.learning_rate))
        return self.lr_factor * lr_at(self.base_lr, self.target_lr, self.warmup, global_step, self.total, o.lr_schedule)

    def running(self) -> dict:
        """This rank's loss and accuracy so far in the epoch (reads the device: call rarely)."""
        n, loss, hits = self.sums.read()
        return {"loss": loss / max(n, 1), "acc": hits / max(n, 1)}

    def fit(self, resume=None, resuming: bool = False) -> Result:
        """Train. `resuming` must be the same on every rank; rank 0 passes the checkpoint `resume`."""
        try:
            return self._fit(resume, resuming)
        except BaseException:
            self.callbacks.on_interrupt()
            raise

    def _fit(self, resume, resuming: bool) -> Result:
        comm, opts = self.comm, self.options
        epoch, first, stats, trained = 0, 0, None, False
        if resuming:
            epoch, first, stats, trained = self._resume(resume)
        self.dog = Watchdog(opts.timeout, lambda: comm.abort(3), comm.rank).start()
        t_start = time.perf_counter()
        seen = 0.0
        try:
            self.callbacks.on_train_begin()
            if trained:
                epoch = opts.epochs  # every epoch was done; the model was not saved yet
            while epoch < opts.epochs:
                try:
                    seen += self._epoch(epoch, first, stats)
                    epoch, first, stats = epoch + 1, 0, None
                    if self.stop_training:
                        break
                except Exception as e:  # noqa: BLE001 - only a lost peer is handled here
                    if not (comm.elastic and (comm.failed or isinstance(e, RankLost))):
                        raise
                    first, stats = self._recover(epoch), None
            self.ema.adopt()  # --ema: the model ends with the averaged weights (KeepBest may pick an earlier epoch's)
            if trained:
                # Resumed from the final checkpoint (the model was not saved yet): the threshold
                # and the saved metrics need the validation predictions of the final weights.
                epoch = comm.bcast_obj(len(self.history) if comm.rank == 0 else None)  # epochs run
                self.revalidate(epoch - 1)
            self.result.epochs_run, self.result.stopped_early = epoch, self.stop_training
            self.callbacks.on_train_end()  # KeepBest restores its weights here
        finally:
            # Also when fit raises: a library caller that handles the error must not be
            # left with a thread that aborts the process --timeout seconds later.
            self.dog.stop()
        r = self.result
        r.seconds = time.perf_counter() - t_start
        r.images_per_second = seen / max(r.seconds, 1e-9)
        r.comm_seconds = self.sync.comm_seconds
        r.checksum = _check_identical(comm, self.sync)
        return r

    def _resume(self, resume) -> tuple[int, int, Any, bool]:
        """Collective, in this order: where to continue (bcast), then each rank's state
        (scatter). Returns (epoch, first step, the epoch's saved sums, trained)."""
        comm = self.comm
        epoch, first, history, trained, ranks, steps = comm.bcast_obj(
            (
                resume.epoch,
                resume.step,
                resume.history,
                resume.status != "running",
                resume.ranks,
                resume.steps or self.steps,
            )
            if comm.rank == 0
            else None
        )
        saved = self.state.scatter(comm, resume)
        keep = self.callbacks.find(KeepBest)
        if comm.rank == 0 and keep is not None:
            keep.best, keep.best_epoch = resume.best, resume.best_epoch
        stats = saved if first else None  # a mid-epoch checkpoint carries the epoch's sums
        if first and (ranks != comm.size or steps != self.steps):
            # Written by another number of ranks (an elastic job that lost a host, or -n
            # changed): the epoch's steps are laid out anew; go on at the same fraction of
            # the epoch, and its training metrics cover the steps from here (as after a lost rank).
            first, stats = same_fraction(first, steps, self.steps), None
        self.history[:] = list(history)
        self.echo(
            "resuming after the last epoch: validating and saving the model"
            if trained
            else f"resuming at epoch {epoch + 1}, step {first} of {self.steps}"
        )
        return epoch, first, stats, trained

    def _epoch(self, epoch: int, first: int, stats) -> float:
        """One epoch from step `first` on; returns the samples trained (all ranks)."""
        opts, comm, sync = self.options, self.comm, self.sync
        t0, rebuilt = time.perf_counter(), self.rebuild_seconds
        stats, probs, labels = self.run_steps(epoch, first, stats)
        train_time = time.perf_counter() - t0 - (self.rebuild_seconds - rebuilt)
        if not sync.per_step_reduce:
            comm.allreduce_sum_(stats)  # collective: per-rank sums -> global sums
        # Collective: the epoch lasted as long as its slowest rank. Rank 0's own clock is not
        # enough: a master-worker master does not train, and it starts an epoch late (after
        # validating and writing the checkpoint) while the workers are already at work.
        train_time = comm.allreduce_max(train_time)
        train_m, _, _ = epoch_metrics(comm, stats, probs, labels, self.n_classes, self.multi)
        # --ema: validation and the callbacks (KeepBest's copy) see the averaged weights; the
        # checkpoint below holds the raw ones again, which training goes on from.
        with self.ema.swapped():
            row = self._epoch_row(epoch, train_m, train_time, stats[0])
            self.history.append(row)
            self.callbacks.on_epoch_end(epoch, row)
        last = epoch + 1 == opts.epochs or self.stop_training
        # The last one is "trained", not "finished": the run is finished only once the caller
        # has saved the model (train/command.py marks it then), so a kill in between can resume.
        self._checkpoint(epoch + 1, 0, np.zeros(3), "trained" if last else "running")
        self.dog.beat(f"checkpoint after epoch {epoch + 1}")
        # A stop asked for during validation: collective, once per epoch. After the last
        # epoch the run finishes instead (validated; saving the model takes seconds).
        if self.checkpoints and not last and sync.stop_vote():
            raise StopRequested(epoch + 1, 0)
        return float(stats[0])

    def _epoch_row(self, epoch: int, train_m: dict, train_time: float, samples: float) -> dict:
        """Collective: validate, and the epoch's row of the history, the same on every rank."""
        comm = self.comm
        val_m, *validated = self._validate(epoch)
        self.dog.beat(f"validation after epoch {epoch + 1}")
        row = None
        if comm.rank == 0:
            row = {
                "epoch": epoch + 1,
                **train_m,
                **{f"val_{k}": v for k, v in val_m.items()},
                "lr": self._lr((epoch + 1) * self.steps - 1),
                "seconds": round(train_time, 3),
                "images_per_second": round(samples / max(train_time, 1e-9), 1),
            }
            self.result.keep_validation(*validated)
        return comm.bcast_obj(row)  # collective: every rank's callbacks see the global row

    def run_steps(self, epoch: int, first: int = 0, stats=None):
        """The steps of `epoch` from `first` on, then the strategy's epoch end: (this rank's
        running sums, its probabilities, its labels) as arrays. Collective, as the strategy is.
        `mpitrain bench` times this loop, and `benchmarks/step_profile.py` times it against
        the compiled step alone."""
        opts, comm, data, sync = self.options, self.comm, self.data, self.sync
        order = epoch_order(len(data.train_x), opts.seed, epoch, comm.rank)
        sums, callbacks = self.sums, self.callbacks
        # The running sums (samples, loss sum, hits) are added up by the step, on the device, and
        # read only when needed; after a mid-epoch resume they start at the sums saved with the state.
        sums.reset(stats)
        probs, labels = [], []  # probabilities as the step's tensors: no per-step fetch
        self.done = first
        callbacks.on_epoch_begin(epoch)
        step = self.step  # after the epoch's begin: a callback may have made it again (rebuild_step)
        lrs = self._lrs(epoch)
        for s, idx in enumerate(batch_slices(order, self.steps, self.step_rows)):
            if s < first:
                continue  # done before the checkpoint we resumed from
            if sync.trains:
                x, y, w, *soft = self._train_batch(idx, epoch, s)
                _, p = step(x, y, w, lrs[s], *soft)
                probs.append(p)
                labels.append(self.data.train_y[idx] if self.multi else y)  # multi-label: NaN kept
                callbacks.on_train_batch_end(s)
            sync.after_step(s + 1, self.steps, len(idx))
            self.done = s + 1
            self.dog.beat(f"epoch {epoch + 1} step {s + 1}")
            # Every rank asks at every step (the vote is collective); all get the same answer.
            if sync.stop_agreed(s + 1, self.steps) and self.checkpoints and s + 1 < self.steps:
                self._checkpoint(epoch, s + 1, sums.read())
                raise StopRequested(epoch, s + 1)
            if opts.checkpoint_every and (s + 1) % opts.checkpoint_every == 0 and s + 1 < self.steps:
                self._checkpoint(epoch, s + 1, sums.read())
        sync.end_epoch()
        return (
            sums.read(),
            np.concatenate([p.numpy() for p in probs]) if probs else np.zeros((0, self.n_classes), np.float32),
            np.concatenate(labels) if labels else self._no_labels(),
        )

    def _no_labels(self) -> np.ndarray:
        return np.zeros((0, self.n_classes), np.float32) if self.multi else np.zeros(0, np.int32)

    def _lrs(self, epoch: int) -> np.ndarray:
        """The learning rate of every step of `epoch` (float32), worked out once per epoch."""
        if not self.set_lr:  # the caller's optimizer keeps its own rate: the steps ignore these
            return np.full(self.steps, self._lr(epoch * self.steps), np.float32)
        return np.array([self._lr(epoch * self.steps + s) for s in range(self.steps)], np.float32)

    def _validate(self, epoch: int):
        """Collective. Validation metrics and (rank 0) the gathered probabilities, labels and
        each row's index in the caller's validation list.

        Shares can be unequal (a master-worker master validates everything alone), so the
        ranks done early wait on progress pulses, one per batch of the largest share,
        rather than inside the next collective, where a slow peer looks like a stuck one.
        A batch is --batch-size images, forward only: shorter than a training step, so a
        --timeout that fits a step fits a validation batch (the last one is padded to the
        same shape, so the bits do not depend on how the rows were shared out).
        """
        data, comm, size = self.data, self.comm, self.options.batch_size
        mine = -(-len(data.val_x) // size)
        batches = int(comm.allreduce_max(mine))  # collective: the largest share, in batches
        pulses = Pulses(comm, self._beat)

        def pulse(i: int) -> None:  # collective, nonblocking: the same count on every rank
            pulses.post(f"validation batch {i} of {batches} after epoch {epoch + 1}")

        vp = predict_probs(
            self.predict, data.val_x, self.n_classes, lambda x: as_float(x, data.val_max), batch=size, on_batch=pulse
        )
        for i in range(mine + 1, batches + 1):
            pulse(i)
        pulses.wait()
        if self.multi:
            vstats = multilabel.sums(data.val_y, vp)
        else:
            vstats = np.array([len(vp), self._loss_sum(data.val_y, vp), float((vp.argmax(1) == data.val_y).sum())])
        comm.allreduce_sum_(vstats)  # collective: validation sums over the val shards
        m, all_vp, all_vy = epoch_metrics(comm, vstats, vp, data.val_y, self.n_classes, self.multi)
        index = data.val_index if data.val_index is not None else np.full(len(vp), -1, np.int64)
        all_vi = comm.gather_rows(index.astype(np.int64))  # collective: same order as the probabilities
        return m, all_vp, all_vy, all_vi

    def _loss_sum(self, y: np.ndarray, probs: np.ndarray) -> float:
        """Summed validation loss: the model's own loss, or cross-entropy (in NumPy, as Keras clips)."""
        if not self.own_loss:
            return loss_sum(y, probs)
        return float(np.sum(np.asarray(self.loss_fn(y, probs), np.float64))) if len(y) else 0.0

    def revalidate(self, epoch: int) -> None:
        """Collective: predict validation again with the current weights (rank 0 keeps the
        predictions for the caller: the threshold and metrics saved belong to them)."""
        _, *validated = self._validate(epoch)
        if self.comm.rank == 0:
            self.result.keep_validation(*validated)

    def _train_batch(self, idx: np.ndarray, epoch: int, step: int) -> tuple:
        """(input, labels, loss weights) of one training batch, as the step takes them; with
        --mixup, mixed (`engine/mixup.py`): the labels are the dominant ones, and the mixed
        targets come last."""
        x = self._train_input(self.data.train_x[idx], epoch, step)
        y = self.data.train_y[idx]
        if self.multi:
            return (x, *multilabel.targets(y, self.class_w))
        alpha = self.options.mixup
        if not alpha:
            return x, y, self.class_w[y]
        lam, perm = mixing.draws(alpha, len(y), self.options.seed, epoch, self.comm.rank, step)
        m = mixing.mix(x, y, self.class_w, lam, perm)
        return m.x, m.label, m.weight, m.target

    def _train_input(self, rows: np.ndarray, epoch: int, step: int) -> np.ndarray:
        """A training batch as the step takes it, augmented (`augment`) from its position alone."""
        if self.integer_input:
            return rows if rows.ndim == len(self.model.input_shape) else rows[..., np.newaxis]  # a view
        if self.augment is None:
            return as_float(rows, self.data.train_max)
        return self.augment(rows, self.data.train_max, epoch, self.comm.rank, step)

    def _checkpoint(self, epoch: int, done: int, stats: np.ndarray, status: str = "running") -> None:
        if not self.checkpoints:
            return
        self.sync.settle()  # until every rank has done its steps so far (a polled wait)
        gathered = self.state.gather(self.comm, stats)  # collective: every rank's state to rank 0
        if gathered is not None:  # rank 0
            from mpitrain.engine import checkpoint as ckpt

            keep = self.callbacks.find(KeepBest)
            states, shared = gathered
            ckpt.save(
                self.checkpoint_dir,
                ckpt.Checkpoint(
                    epoch=epoch,
                    step=done,
                    ranks=self.comm.size,
                    strategy=self.options.strategy,
                    states=states,
                    shared=shared,
                    status=status,
                    config=self.checkpoint_config,
                    history=self.history,
                    best=None if keep is None else keep.best,
                    best_epoch=None if keep is None else keep.best_epoch,
                    steps=self.steps,
                ),
                keep=self.options.keep_checkpoints,
            )

    def _recover(self, epoch: int) -> int:
        """Survivors only: shrink, agree on rank 0's state and position, re-shard. Returns
        the step of `epoch` to go on from (in the new layout)."""
        comm = self.comm
        before = comm.size
        self.callbacks.on_interrupt()
        # Shrinking is an agreement among the survivors; if it cannot finish, stopping beats
        # waiting: the newest checkpoint is on disk for --resume.
        deadline = threading.Timer(RECOVERY_SECONDS, _recovery_failed, args=(comm.rank,))
        deadline.daemon = True
        deadline.start()
        lost = comm.shrink()  # collective among the survivors
        self.dog.beat("recovering from a lost rank")
        too_few = strategy_class(self.options.strategy).too_few_ranks(comm.size)
        if 0 in lost or too_few:
            deadline.cancel()
            why = (
                "rank 0, which writes the run folder, was lost"
                if 0 in lost
                else f"only {comm.size} rank(s) are left and {too_few}"
            )
            if comm.rank == 0:
                raise AgreedError(
                    f"{why}; the survivors stopped. Continue the run from its newest checkpoint with --resume"
                )
            raise QuietExit(4)
        done = comm.bcast_obj(self.done if comm.rank == 0 else None)  # rank 0's position
        # Where the adopted state stands: for master-worker the start of the master's round,
        # not how far the master (which does not train) has posted its pulses.
        resume_at = self.sync.recovery_step(done)
        self.state.broadcast(comm)  # collective: everyone adopts rank 0's weights and optimizer
        deadline.cancel()
        old_steps = self.steps
        self._layout(first_time=False)
        first = same_fraction(resume_at, old_steps, self.steps)
        lost_event = event(
            "rank_lost",
            lost_ranks=lost,
            ranks_before=before,
            ranks_after=comm.size,
            epoch=epoch + 1,
            step=done,
            of_steps=old_steps,
            continue_at_step=first,
            of_new_steps=self.steps,
        )
        self.result.events.append(lost_event)
        if comm.rank == 0:
            self.echo(
                f"lost rank(s) {lost}: continuing on {comm.size} ranks from epoch {epoch + 1}, "
                f"step {first} of {self.steps} (lr {self.target_lr:.3g})"
            )
        self.callbacks.on_event(lost_event)
        return first


RECOVERY_SECONDS = 60.0


def _silent(*args, **kwargs) -> None:
    """The echo of ranks other than 0."""


def same_fraction(step: int, of_steps: int, steps: int) -> int:
    """Step `step` of an epoch of `of_steps` steps, in a layout of `steps` steps per epoch
    (another number of ranks): the same fraction of the epoch, rounded down."""
    return min(steps, step * steps // of_steps)


def _recovery_failed(rank: int) -> None:
    print(
        f"mpitrain: error on rank {rank}: after losing a rank, the survivors could not form a "
        f"new communicator within {RECOVERY_SECONDS:.0f} s; stopping. Continue the run from its "
        f"newest checkpoint with --resume",
        file=sys.stderr,
        flush=True,
    )
    os._exit(5)


def _as_dict(opts: Options) -> dict:
    import dataclasses

    return dataclasses.asdict(opts)


def _check_identical(comm: Comm, sync) -> str:
    """All ranks must end with bit-identical weights; a mismatch is a bug, never silent."""
    mine = sync.checksum()
    sums = comm.allgather_obj(mine)  # collective
    if len(set(sums)) != 1:
        bad = [r for r, s in enumerate(sums) if s != sums[0]]
        raise RuntimeError(f"final weights differ between ranks: rank(s) {bad} differ from rank 0")
    return mine
