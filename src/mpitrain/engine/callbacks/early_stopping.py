"""EarlyStopping: end training after `patience` epochs without a better `monitor`.

Like `keras.callbacks.EarlyStopping`, with the engine's rules: the monitored value is read
from the global epoch row (the same on every rank, so every rank stops at the same epoch
without a vote), a loss is minimised and anything else maximised, the earliest epoch wins
ties, and the last epoch is never "stopped early" (it simply finishes).
"""

from __future__ import annotations

from mpitrain.engine.callbacks.base import Callback
from mpitrain.engine.epochs import best_epoch


class EarlyStopping(Callback):
    def __init__(self, monitor: str = "val_loss", patience: int = 1):
        if patience < 1:
            raise ValueError(f"patience must be >= 1 epoch, got {patience}")
        self.monitor, self.patience = monitor, patience

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        engine = self.engine
        best = best_epoch(engine.history, self.monitor)
        if best is None or epoch + 1 >= engine.options.epochs or epoch + 1 - best < self.patience:
            return
        engine.stop_training = True
        engine.echo(f"early stop: no better {self.monitor} for {self.patience} epoch(s) since epoch {best}")
