"""`mpitrain train`'s use of the engine: a TrainConfig and a Plan become the engine's
options, class weights, augmentation and callbacks.

The engine (`mpitrain.engine`) knows no folders, plans or recipes; this is the one place
where the command line's options meet it, so `mpitrain train` and a library caller train
with the same loop.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from mpitrain import runfiles
from mpitrain.config import TrainConfig
from mpitrain.data.dataset import Plan, class_weights
from mpitrain.engine.callbacks.base import Callback
from mpitrain.engine.callbacks.early_stopping import EarlyStopping
from mpitrain.engine.callbacks.freeze_backbone import FreezeBackbone
from mpitrain.engine.callbacks.keep_best import KeepBest
from mpitrain.engine.callbacks.tensorboard import TensorBoard
from mpitrain.engine.loop import Engine, Result
from mpitrain.engine.options import Options
from mpitrain.parallel.strategies import resolve

if TYPE_CHECKING:
    from mpitrain.parallel.comm import Comm
    from mpitrain.train.given import Given


class EventLog(Callback):
    """Rank 0 appends what the job lives through (a lost rank) to the run folder's events.jsonl."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def on_event(self, event: dict) -> None:
        if self.engine.comm.rank == 0:
            from mpitrain.train import runfolder

            runfolder.append_event(self.run_dir, event)


def callbacks_for(cfg: TrainConfig, run_dir) -> list:
    """The callbacks --freeze-backbone, --tensorboard, --keep-best and --early-stop ask for,
    in the order their lines and files are written (run_dir: rank 0's run folder, None
    elsewhere). The backbone --freeze-backbone freezes is FreezeBackbone's default: a
    keras.applications model's nested backbone, else every layer before the head."""
    out: list = []
    if cfg.freeze_backbone:
        out.append(FreezeBackbone(cfg.freeze_backbone, lr_factor=cfg.unfreeze_lr_factor))
    if run_dir is not None:
        out.append(EventLog(run_dir))
        if cfg.tensorboard:
            out.append(TensorBoard(Path(run_dir) / runfiles.TENSORBOARD))
    if cfg.keep_best:
        out.append(KeepBest(cfg.keep_best))
    if cfg.early_stop:
        out.append(EarlyStopping(cfg.watch_metric or "val_loss", cfg.early_stop))
    return out


def augment_for(cfg: TrainConfig):
    """--augment as the engine's augment callable (None for none)."""
    return policy_augment(cfg.augment, cfg.seed)


def policy_augment(policy: str, seed: int):
    """An --augment policy (data/augment.py) as the engine's augment callable (None for none)."""
    if policy == "none":
        return None
    from mpitrain.data.augment import augment_batch

    def augment(rows, max_value, epoch, rank, step):
        return augment_batch(rows, max_value, policy, seed, epoch, rank, step)

    return augment


def engine_for(
    cfg: TrainConfig,
    comm: Comm,
    plan: Plan,
    data,
    model,
    echo=print,
    checkpoints: bool = False,
    run_dir=None,
    given: Given | None = None,
    **kw,
) -> Engine:
    """The engine for `cfg` on this rank's `data` (a Shard) of `plan`; `given`: what a
    library caller brought besides the model (`mpitrain.fit`: callbacks, augmentation...)."""
    cfg = resolve(cfg)
    options, augment, callbacks = Options.of(cfg), augment_for(cfg), callbacks_for(cfg, run_dir)
    if given is not None:
        if given.own_lr:  # as engine.fit: a compiled optimizer keeps its rate, else Adam at 1e-3
            options = dataclasses.replace(options, lr=None)
        augment = given.augment or augment
        callbacks += given.callbacks
        kw["progress"] = given.progress
    return Engine(
        model,
        data,
        options,
        comm,
        class_weight=class_weights(plan.class_counts(), cfg.class_weight),
        augment=augment,
        callbacks=callbacks,
        echo=echo,
        checkpoints=checkpoints,
        checkpoint_dir=run_dir,
        checkpoint_config=cfg.to_dict(),
        **kw,
    )


def fit(
    cfg: TrainConfig,
    comm: Comm,
    plan: Plan,
    data,
    model,
    echo=print,
    checkpoints: bool = False,
    run_dir=None,
    resume=None,
    resuming: bool = False,
    reshard=None,
    given: Given | None = None,
) -> Result:
    """Train `model` in place on every rank; returns the result (history on every rank)."""
    engine = engine_for(cfg, comm, plan, data, model, echo, checkpoints, run_dir, given, reshard=reshard)
    return engine.fit(resume, resuming)
