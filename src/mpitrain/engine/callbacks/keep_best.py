"""KeepBest: at the end, restore the weights of the epoch with the best `monitor`.

`keras.callbacks.EarlyStopping(restore_best_weights=True)` without the stopping. Rank 0
keeps a copy of the best weights (one flat float buffer; every rank's would be the same
under a per-step allreduce, and rank 0's is the one that is saved under the other
strategies); at the end every rank takes rank 0's copy, and validation is predicted again
with it, so the threshold and metrics saved belong to the weights kept. The copy and its
epoch travel in checkpoints (`Checkpoint.best`, `.best_epoch`), so a resumed run keeps it.
"""

from __future__ import annotations

import numpy as np

from mpitrain.engine.callbacks.base import Callback
from mpitrain.engine.epochs import best_epoch
from mpitrain.errors import UserError


class KeepBest(Callback):
    def __init__(self, monitor: str = "val_loss"):
        self.monitor = monitor
        self.best: np.ndarray | None = None  # rank 0 only: the flat weights of `best_epoch`
        self.best_epoch: int | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        # The rows have mean_auc (the mean per-label ROC AUC) only for multi-label data.
        if self.monitor == "val_mean_auc" and not self.engine.multi:
            raise UserError("--keep-best val_mean_auc is for multi-label data; use val_auc for one label per image")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        engine = self.engine
        if best_epoch(engine.history, self.monitor) == epoch + 1 and engine.comm.rank == 0:
            from mpitrain.parallel.flat import FlatVars, float_vars

            self.best = FlatVars(float_vars(engine.model.weights)).pack().copy()
            self.best_epoch = epoch + 1

    def on_train_end(self, logs: dict | None = None) -> None:
        engine = self.engine
        comm = engine.comm
        last = engine.result.epochs_run
        kept = comm.bcast_obj(self.best_epoch if comm.rank == 0 else None)  # collective
        engine.result.kept_epoch = kept if kept is not None else last
        if kept is None or kept == last:
            return  # the current weights are the best ones
        from mpitrain.parallel.flat import FlatVars, float_vars

        flat = FlatVars(float_vars(engine.model.weights))
        if comm.rank == 0:
            flat.buffer[:] = self.best
        comm.bcast_(flat.buffer, 0)  # collective
        flat.unpack()
        engine.revalidate(kept - 1)
        engine.echo(f"kept the weights of epoch {kept} (best {self.monitor})")
