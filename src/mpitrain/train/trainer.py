"""The training loop: the same code on every rank, one strategy object for the distribution.

Every rank runs the same epochs and steps; the strategy (`parallel/strategies/`) decides what is
exchanged and when. Metrics come from sums and predictions over the whole data set
(`epochlog.py`), with two exceptions: after an elastic recovery the epoch's data was
re-sharded mid-way, and after a mid-epoch resume the training AUC covers only the steps
after the checkpoint (loss and accuracy are exact: their sums are checkpointed). Only rank 0
prints and writes. Rank 0 checkpoints at every epoch end (and every --checkpoint-every
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
from dataclasses import dataclass, field

import numpy as np

from mpitrain.config import TrainConfig
from mpitrain.data.dataset import Plan, Shard, as_float, class_weights
from mpitrain.data.shards import batch_slices, epoch_order, steps_per_epoch
from mpitrain.errors import AgreedError, QuietExit, StopRequested
from mpitrain.evaluate.modelio import predict_probs
from mpitrain.parallel import preempt
from mpitrain.parallel.comm import RankLost
from mpitrain.parallel.pulses import Pulses
from mpitrain.parallel.rankstate import RankState
from mpitrain.parallel.strategies import lr_at, make_sync, resolve, scaled_lr, strategy_class
from mpitrain.parallel.watchdog import Watchdog
from mpitrain.train import runfolder
from mpitrain.train.epochlog import best_epoch, epoch_line, epoch_metrics, loss_sum
from mpitrain.train.progress import Progress
from mpitrain.train.steps import RunningSums, make_predict_step, make_train_step


@dataclass
class Result:
    history: list[dict] = field(default_factory=list)
    val_probs: np.ndarray | None = None  # rank 0 only
    val_labels: np.ndarray | None = None  # rank 0 only
    val_index: np.ndarray | None = None  # rank 0 only: each row's index in Plan.val_paths (-1: unknown)
    seconds: float = 0.0
    images_per_second: float = 0.0
    comm_seconds: float = 0.0
    checksum: str = ""
    events: list[dict] = field(default_factory=list)  # ranks lost (elastic)
    epochs_run: int = 0
    kept_epoch: int | None = None  # --keep-best: the epoch whose weights the model has
    stopped_early: bool = False  # --early-stop ended the run before --epochs

    def keep_validation(self, probs, labels, index) -> None:
        """Rank 0: the gathered validation probabilities, labels and plan indices of the model kept."""
        self.val_probs, self.val_labels, self.val_index = probs, labels, index


def _make_optimizer(cfg: TrainConfig, lr: float):
    import keras

    if cfg.optimizer == "sgd":
        opt = keras.optimizers.SGD(learning_rate=lr, momentum=cfg.momentum)
    else:
        opt = keras.optimizers.Adam(learning_rate=lr)
    if cfg.precision == "fp16":  # dynamic loss scaling: see train/steps.py
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        comm,
        plan: Plan,
        data: Shard,
        model,
        echo=print,
        checkpoints: bool = False,
        run_dir=None,
        reshard=None,
    ):
        """`checkpoints` must be the same on every rank; rank 0 writes them to `run_dir`.
        `reshard(train_part, val_part)` loads a rank's data for a new layout (elastic)."""
        self.cfg = resolve(cfg)
        self.comm, self.plan, self.data, self.model, self.echo = comm, plan, data, model, echo
        self.checkpoints, self.run_dir, self.reshard = checkpoints, run_dir, reshard
        self.n_classes = len(plan.classes)
        self.class_w = class_weights(plan.class_counts(), self.cfg.class_weight)
        self.optimizer = _make_optimizer(self.cfg, self.cfg.lr)
        self.optimizer.build(model.trainable_variables)
        self.predict = make_predict_step(model)
        self.sums = RunningSums()  # the epoch's samples, loss sum and hits, added up by the step
        self.show_progress = True  # bench turns the bar off
        self.result = Result()
        self.done = 0  # steps of the current epoch done on this rank
        self.bar = Progress(0, enabled=False)
        self.dog = Watchdog(0, None, comm.rank)  # beaten but not running until fit()
        self.best, self.best_epoch = None, None  # --keep-best: rank 0's copy of the best weights
        self.stopping = False
        self._layout(first_time=True)

    def _layout(self, first_time: bool) -> None:
        """Everything that depends on the number of ranks (again after a rank is lost)."""
        cfg, comm = self.cfg, self.comm
        # The strategy refuses too few ranks itself; while it waits for peers that are still
        # working it reports their progress to the watchdog.
        self.sync = make_sync(
            cfg.strategy,
            comm,
            cfg.sync_every,
            progress=self._beat,
            stop_requested=lambda: preempt.requested() is not None,
            compress=cfg.compress,
        )
        if first_time:
            self.sync.start(self.model, self.optimizer)  # collective: rank 0's initial state
        else:
            self.sync.attach(self.model, self.optimizer)
            self.data = self.reshard(self.sync.train_part, self.sync.val_part)
        self.state = RankState(self.model, self.optimizer, self.sync)
        # Integer images enter the step as they are held and are scaled in the graph (the
        # same bits as `as_float`); augmented batches come out of OpenCV as float32.
        rows = self.data.train_x
        self.integer_input = cfg.augment == "none" and rows.dtype.kind in "ui"
        self.step = make_train_step(
            self.model,
            self.optimizer,
            self.sync.reduce_step if self.sync.per_step_reduce else None,
            input_dtype=rows.dtype if self.integer_input else np.float32,
            max_value=self.data.train_max if self.integer_input else 1.0,
            sums=self.sums,
        )
        # Collective: every rank must agree on the step count before the first step.
        self.steps = steps_per_epoch(int(comm.allreduce_max(len(self.data.train_x))), cfg.batch_size)
        self.warmup = int(round(cfg.warmup_epochs * self.steps))
        self.total = cfg.epochs * self.steps
        self.target_lr = scaled_lr(cfg.lr, cfg.lr_scaling, self.sync.train_ranks)
        self.tag = self.sync.tag

    def _beat(self, what: str) -> None:
        self.dog.beat(what)

    def _lr(self, global_step: int) -> float:
        return lr_at(self.cfg.lr, self.target_lr, self.warmup, global_step, self.total, self.cfg.lr_schedule)

    def fit(self, resume=None, resuming: bool = False) -> Result:
        """`resuming` must be the same on every rank; rank 0 passes the checkpoint `resume`."""
        comm, cfg = self.comm, self.cfg
        epoch, first, stats, trained = 0, 0, None, False
        if resuming:
            # Collective, in this order: where to continue (bcast), then each rank's state (scatter).
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
            if comm.rank == 0:
                self.best, self.best_epoch = resume.best, resume.best_epoch
            stats = saved if first else None  # a mid-epoch checkpoint carries the epoch's sums
            if first and (ranks != comm.size or steps != self.steps):
                # Written by another number of ranks (an elastic job that lost a host, or -n
                # changed): the epoch's steps are laid out anew; go on at the same fraction of
                # the epoch, and its training metrics cover the steps from here (as after a lost rank).
                first, stats = _same_fraction(first, steps, self.steps), None
            self.result.history = list(history) if comm.rank == 0 else []
            self.echo(
                "resuming after the last epoch: validating and saving the model"
                if trained
                else f"resuming at epoch {epoch + 1}, step {first} of {self.steps}"
            )
        self.dog = Watchdog(cfg.timeout, lambda: comm.abort(3), comm.rank).start()
        t_start = time.perf_counter()
        seen = 0.0
        try:
            if trained:
                epoch = cfg.epochs  # every epoch was done; the model was not saved yet
            while epoch < cfg.epochs:
                try:
                    seen += self._epoch(epoch, first, stats)
                    epoch, first, stats = epoch + 1, 0, None
                    if self.stopping:
                        break
                except Exception as e:  # noqa: BLE001 - only a lost peer is handled here
                    if not (comm.elastic and (comm.failed or isinstance(e, RankLost))):
                        raise
                    first, stats = self._recover(epoch), None
            if trained:
                # Resumed from the final checkpoint (the model was not saved yet): the threshold
                # and the saved metrics need the validation predictions of the final weights.
                epoch = len(self.result.history) if comm.rank == 0 else epoch
                epoch = comm.bcast_obj(epoch)  # collective: the epochs run (fewer if stopped early)
                self.result.keep_validation(*self._validate(epoch - 1)[1:])
            self.result.epochs_run, self.result.stopped_early = epoch, self.stopping
            self._restore_best()
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

    def _epoch(self, epoch: int, first: int, stats) -> float:
        """One epoch from step `first` on; returns the samples trained (all ranks)."""
        cfg, comm, sync = self.cfg, self.comm, self.sync
        t0 = time.perf_counter()
        stats, probs, labels = self.run_steps(epoch, first, stats)
        train_time = time.perf_counter() - t0
        self.bar.close()
        if not sync.per_step_reduce:
            comm.allreduce_sum_(stats)  # collective: per-rank sums -> global sums
        # Collective: the epoch lasted as long as its slowest rank. Rank 0's own clock is not
        # enough: a master-worker master does not train, and it starts an epoch late (after
        # validating and writing the checkpoint) while the workers are already at work.
        train_time = comm.allreduce_max(train_time)
        train_m, _, _ = epoch_metrics(comm, stats, probs, labels, self.n_classes)
        val_m, *validated = self._validate(epoch)
        self.dog.beat(f"validation after epoch {epoch + 1}")
        if comm.rank == 0:
            row = {
                "epoch": epoch + 1,
                **train_m,
                **{f"val_{k}": v for k, v in val_m.items()},
                "lr": self._lr((epoch + 1) * self.steps - 1),
                "seconds": round(train_time, 3),
                "images_per_second": round(stats[0] / max(train_time, 1e-9), 1),
            }
            self.result.history.append(row)
            if cfg.tensorboard and self.run_dir is not None:
                from mpitrain.train import tensorboard as tb

                tb.log_epoch(self.run_dir / "tb", row)  # rank 0: live TensorBoard scalars
            self.result.keep_validation(*validated)
            self.echo(epoch_line(row, cfg.epochs, self.tag))
        self.stopping = self._watch(epoch)
        # The last one is "trained", not "finished": the run is finished only once rank 0 has
        # saved the model (train/command.py marks it then), so a kill in between can resume.
        self._checkpoint(
            epoch + 1, 0, np.zeros(3), "trained" if epoch + 1 == cfg.epochs or self.stopping else "running"
        )
        self.dog.beat(f"checkpoint after epoch {epoch + 1}")
        # A stop asked for during validation: collective, once per epoch. After the last
        # epoch the run finishes instead (validated; saving the model takes seconds).
        if self.checkpoints and epoch + 1 < cfg.epochs and not self.stopping and sync.stop_vote():
            raise StopRequested(epoch + 1, 0)
        return float(stats[0])

    def run_steps(self, epoch: int, first: int = 0, stats=None):
        """The steps of `epoch` from `first` on, then the strategy's epoch end: (this rank's
        running sums, its probabilities, its labels) as arrays. Collective, as the strategy is.
        `mpitrain bench` times this loop, and `benchmarks/step_profile.py` times it against
        the compiled step alone."""
        cfg, comm, data, sync = self.cfg, self.comm, self.data, self.sync
        order = epoch_order(len(data.train_x), cfg.seed, epoch, comm.rank)
        step, sums = self.step, self.sums
        # The running sums (samples, loss sum, hits) are added up by the step, on the device, and
        # read only when needed; after a mid-epoch resume they start at the sums saved with the state.
        sums.reset(stats)
        probs, labels = [], []  # probabilities as the step's tensors: no per-step fetch
        self.done = first
        self.bar = bar = Progress(
            self.steps,
            f"epoch {epoch + 1}/{cfg.epochs} ",
            enabled=self.show_progress and comm.rank == 0 and sync.trains,
        )

        def running() -> dict:  # called only when the bar redraws
            n, loss, hits = sums.read()
            return {"loss": loss / max(n, 1), "acc": hits / max(n, 1)}

        lrs = self._lrs(epoch)
        for s, idx in enumerate(batch_slices(order, self.steps, cfg.batch_size)):
            if s < first:
                continue  # done before the checkpoint we resumed from
            if sync.trains:
                y = data.train_y[idx]
                _, p = step(self._train_input(data.train_x[idx], epoch, s), y, self.class_w[y], lrs[s])
                probs.append(p)
                labels.append(y)
                bar.update(s + 1, values=running)
            sync.after_step(s + 1, self.steps, len(idx))
            self.done = s + 1
            self.dog.beat(f"epoch {epoch + 1} step {s + 1}")
            # Every rank asks at every step (the vote is collective); all get the same answer.
            if sync.stop_agreed(s + 1, self.steps) and self.checkpoints and s + 1 < self.steps:
                self._checkpoint(epoch, s + 1, sums.read())
                bar.close()
                raise StopRequested(epoch, s + 1)
            if cfg.checkpoint_every and (s + 1) % cfg.checkpoint_every == 0 and s + 1 < self.steps:
                self._checkpoint(epoch, s + 1, sums.read())
        sync.end_epoch()
        return (
            sums.read(),
            np.concatenate([p.numpy() for p in probs]) if probs else np.zeros((0, self.n_classes), np.float32),
            np.concatenate(labels) if labels else np.zeros(0, np.int32),
        )

    def _lrs(self, epoch: int) -> np.ndarray:
        """The learning rate of every step of `epoch` (float32), worked out once per epoch."""
        return np.array([self._lr(epoch * self.steps + s) for s in range(self.steps)], np.float32)

    def _validate(self, epoch: int):
        """Collective. Validation metrics and (rank 0) the gathered probabilities, labels and
        each row's index in the plan's validation list.

        Shares can be unequal (a master-worker master validates everything alone), so the
        ranks done early wait on progress pulses, one per batch of the largest share,
        rather than inside the next collective, where a slow peer looks like a stuck one.
        A batch is --batch-size images, forward only: shorter than a training step, so a
        --timeout that fits a step fits a validation batch (the last one is padded to the
        same shape, so the bits do not depend on how the rows were shared out).
        """
        data, comm, size = self.data, self.comm, self.cfg.batch_size
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
        vstats = np.array([len(vp), loss_sum(data.val_y, vp), float((vp.argmax(1) == data.val_y).sum())])
        comm.allreduce_sum_(vstats)  # collective: validation sums over the val shards
        m, all_vp, all_vy = epoch_metrics(comm, vstats, vp, data.val_y, self.n_classes)
        index = data.val_index if data.val_index is not None else np.full(len(vp), -1, np.int64)
        all_vi = comm.gather_rows(index.astype(np.int64))  # collective: same order as the probabilities
        return m, all_vp, all_vy, all_vi

    def _train_input(self, rows: np.ndarray, epoch: int, step: int) -> np.ndarray:
        """A training batch as the step takes it, augmented (--augment) from its position alone."""
        if self.integer_input:
            return rows[..., np.newaxis]  # a view: the step scales it in the graph
        if self.cfg.augment == "none":
            return as_float(rows, self.data.train_max)
        from mpitrain.data.augment import augment_batch

        return augment_batch(rows, self.data.train_max, self.cfg.augment, self.cfg.seed, epoch, self.comm.rank, step)

    def _watch(self, epoch: int) -> bool:
        """--keep-best / --early-stop after `epoch`: rank 0 decides from the history, every
        rank follows (collective). Returns whether to stop now."""
        cfg, comm = self.cfg, self.comm
        metric = cfg.watch_metric
        if metric is None:
            return False
        decision = None
        if comm.rank == 0:
            best = best_epoch(self.result.history, metric)
            improved = best == epoch + 1
            stop = bool(
                cfg.early_stop and best is not None and epoch + 1 < cfg.epochs and epoch + 1 - best >= cfg.early_stop
            )
            decision = (improved, stop, best)
        improved, stop, best = comm.bcast_obj(decision)  # collective: one decision for all
        if cfg.keep_best and improved and comm.rank == 0:
            from mpitrain.parallel.flat import FlatVars, float_vars

            self.best = FlatVars(float_vars(self.model.weights)).pack().copy()
            self.best_epoch = epoch + 1
        if stop:
            self.echo(f"early stop: no better {metric} for {cfg.early_stop} epoch(s) since epoch {best}")
        return stop

    def _restore_best(self) -> None:
        """--keep-best: every rank takes rank 0's best weights; validation is predicted again
        with them, so the threshold and metrics saved are those of the kept model."""
        if not self.cfg.keep_best:
            return
        comm = self.comm
        last = self.result.epochs_run
        kept = comm.bcast_obj(self.best_epoch if comm.rank == 0 else None)  # collective
        self.result.kept_epoch = kept if kept is not None else last
        if kept is None or kept == last:
            return  # the current weights are the best ones
        from mpitrain.parallel.flat import FlatVars, float_vars

        flat = FlatVars(float_vars(self.model.weights))
        if comm.rank == 0:
            flat.buffer[:] = self.best
        comm.bcast_(flat.buffer, 0)  # collective
        flat.unpack()
        _, *validated = self._validate(kept - 1)
        if comm.rank == 0:
            self.result.keep_validation(*validated)
            self.echo(f"kept the weights of epoch {kept} (best {self.cfg.keep_best})")

    def _checkpoint(self, epoch: int, done: int, stats: np.ndarray, status: str = "running") -> None:
        if not self.checkpoints:
            return
        self.sync.settle()  # until every rank has done its steps so far (a polled wait)
        gathered = self.state.gather(self.comm, stats)  # collective: every rank's state to rank 0
        if self.comm.rank == 0:
            from mpitrain.train import checkpoint as ckpt

            states, shared = gathered
            ckpt.save(
                self.run_dir,
                ckpt.Checkpoint(
                    epoch=epoch,
                    step=done,
                    ranks=self.comm.size,
                    strategy=self.cfg.strategy,
                    states=states,
                    shared=shared,
                    status=status,
                    config=self.cfg.to_dict(),
                    history=self.result.history,
                    best=self.best,
                    best_epoch=self.best_epoch,
                    steps=self.steps,
                ),
                keep=self.cfg.keep_checkpoints,
            )

    def _recover(self, epoch: int) -> int:
        """Survivors only: shrink, agree on rank 0's state and position, re-shard. Returns
        the step of `epoch` to go on from (in the new layout)."""
        comm = self.comm
        before = comm.size
        self.bar.close()
        # Shrinking is an agreement among the survivors; if it cannot finish, stopping beats
        # waiting: the newest checkpoint is on disk for --resume.
        deadline = threading.Timer(RECOVERY_SECONDS, _recovery_failed, args=(comm.rank,))
        deadline.daemon = True
        deadline.start()
        lost = comm.shrink()  # collective among the survivors
        self.dog.beat("recovering from a lost rank")
        too_few = strategy_class(self.cfg.strategy).too_few_ranks(comm.size)
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
        first = _same_fraction(resume_at, old_steps, self.steps)
        event = runfolder.event(
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
        self.result.events.append(event)
        if comm.rank == 0:
            self.echo(
                f"lost rank(s) {lost}: continuing on {comm.size} ranks from epoch {epoch + 1}, "
                f"step {first} of {self.steps} (lr {self.target_lr:.3g})"
            )
            if self.run_dir is not None:
                runfolder.append_event(self.run_dir, event)
        return first


RECOVERY_SECONDS = 60.0


def _same_fraction(step: int, of_steps: int, steps: int) -> int:
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


def fit(
    cfg: TrainConfig,
    comm,
    plan: Plan,
    data: Shard,
    model,
    echo=print,
    checkpoints: bool = False,
    run_dir=None,
    resume=None,
    resuming: bool = False,
    reshard=None,
) -> Result:
    """Train `model` in place on every rank; returns the history (complete on rank 0)."""
    trainer = Trainer(cfg, comm, plan, data, model, echo, checkpoints, run_dir, reshard)
    return trainer.fit(resume, resuming)


def _check_identical(comm, sync) -> str:
    """All ranks must end with bit-identical weights; a mismatch is a bug, never silent."""
    mine = sync.checksum()
    sums = comm.allgather_obj(mine)  # collective
    if len(set(sums)) != 1:
        bad = [r for r, s in enumerate(sums) if s != sums[0]]
        raise RuntimeError(f"final weights differ between ranks: rank(s) {bad} differ from rank 0")
    return mine
