"""What a callback of the engine is: Keras' callback methods, run on every rank.

The engine calls every callback on every rank, in list order, with the same arguments, so
a callback that decides something (stop now, keep these weights) decides the same on every
rank without a collective of its own. `logs` at an epoch's end are the global numbers (the
row of the history, the same dict on every rank); a callback that writes or prints does so
on rank 0 only (`self.engine.comm.rank == 0`).

Besides Keras' methods, two of the engine's own: `on_interrupt()` when training stops
abnormally (a stop request, Ctrl-C, an error: e.g. to clear a progress bar) and
`on_event(event)` for what the job lives through (a lost rank, as an events.jsonl line).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mpitrain.engine.loop import Engine


class Callback:
    """Override what you need; `self.engine` is set before training starts."""

    engine: Engine

    def set_engine(self, engine: Engine) -> None:
        self.engine = engine

    def on_train_begin(self, logs: dict | None = None) -> None: ...

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None: ...

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None: ...

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None: ...

    def on_train_end(self, logs: dict | None = None) -> None: ...

    def on_interrupt(self) -> None: ...

    def on_event(self, event: dict) -> None: ...


class CallbackList:
    """The engine's callbacks, called in order."""

    def __init__(self, callbacks: list[Any], engine: Engine):
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            cb.set_engine(engine)

    def _call(self, method: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, method, None)
            if fn is not None:
                fn(*args)

    def on_train_begin(self) -> None:
        self._call("on_train_begin", None)

    def on_epoch_begin(self, epoch: int) -> None:
        self._call("on_epoch_begin", epoch, None)

    def on_train_batch_end(self, batch: int) -> None:
        self._call("on_train_batch_end", batch, None)

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        self._call("on_epoch_end", epoch, logs)

    def on_train_end(self) -> None:
        self._call("on_train_end", None)

    def on_interrupt(self) -> None:
        self._call("on_interrupt")

    def on_event(self, event: dict) -> None:
        self._call("on_event", event)

    def find(self, kind: type) -> Any:
        """The first callback of class `kind`, or None."""
        return next((cb for cb in self.callbacks if isinstance(cb, kind)), None)
