"""FreezeBackbone: the head alone for the first epochs, then every layer at a lower rate.

Keras' transfer-learning recipe (freeze the pretrained base, train the new head, unfreeze,
go on at a low rate) as one callback of the engine:

* epochs 1..`epochs`: the backbone's layers are set `trainable = False`. In Keras 3 that
  also runs their batch normalisation in inference mode, so its moving statistics stay the
  pretrained ones. The train step is made again for the head's variables alone (its fused
  gradient buffer, the one allreduce per step, shrinks to them), and the strategies leave
  the frozen weights out of what they average.
* from epoch `epochs + 1` on: every layer has the trainable flag it had before (a layer you
  froze yourself stays frozen), the step is made again for them all, the learning rate is
  `lr_factor` times what the engine's schedule gives (warm-up and cosine decay go on), and
  the optimizer starts afresh, as the Keras guide compiles the model again: Adam's
  moments of the head and a step count in the thousands would otherwise give the
  backbone's first updates several times the rate (its bias correction assumes moments
  that have been accumulating all along).

`backbone` says what is frozen: a layer, a layer's name or a list of them; by default the
model's one nested model (a keras.applications backbone, as `mpitrain train --model
resnet50` builds it), else every layer with weights before the last one (the head).

Every rank makes the same change at the same epoch: callbacks run on every rank alike.
What the model trains follows from the epoch number alone, so a run resumed from a
checkpoint in or after the frozen epochs trains as the uninterrupted one (the optimizer's
fresh start is in the checkpoints written after it). At the end (and when training stops
abnormally) every layer gets its own trainable flag back, so the model saved afterwards
is not saved frozen.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpitrain.engine.callbacks.base import Callback


def backbone_layers(model, backbone: Any = None) -> list:
    """The layers FreezeBackbone freezes in `model` (see the module's docstring). A
    ValueError when there is nothing to freeze or a name is not a layer of the model."""
    if backbone is not None:
        items = backbone if isinstance(backbone, (list, tuple)) else [backbone]
        return [model.get_layer(b) if isinstance(b, str) else b for b in items]
    import keras

    layers = list(model.layers)
    nested = [layer for layer in layers if isinstance(layer, keras.Model) and layer.weights]
    if len(nested) == 1:
        return nested
    weighted = [i for i, layer in enumerate(layers) if layer.weights]
    if len(weighted) < 2:
        raise ValueError("no layer with weights comes before the head (the last one): nothing to freeze")
    return [layer for layer in layers[: weighted[-1]] if layer.weights]


def _every_layer(model) -> list:
    """The model and every layer in it, each before the layers inside it (Keras' own walk),
    so that setting their flags in this order restores each one's own."""
    return list(model._flatten_layers(include_self=True, recursive=True))


class FreezeBackbone(Callback):
    def __init__(self, epochs: int, backbone: Any = None, lr_factor: float = 0.1):
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        if not 0 < lr_factor <= 1:
            raise ValueError(f"lr_factor must be in (0, 1], got {lr_factor}")
        self.epochs, self.backbone, self.lr_factor = epochs, backbone, lr_factor
        self.frozen = False
        self._own_lr: float | None = None  # the rate of a caller's optimizer whose rate is its own

    def set_engine(self, engine) -> None:
        """Frozen from the start (before the engine makes its first step, and after it has
        built its optimizer for every variable, so that unfreezing needs no new one)."""
        super().set_engine(engine)
        if not self.epochs:
            return
        self._layers = backbone_layers(engine.model, self.backbone)
        self._flags = [(layer, bool(layer.trainable)) for layer in _every_layer(engine.model)]
        if not engine.set_lr and self.lr_factor != 1:
            rate = engine.optimizer.learning_rate
            if not hasattr(rate, "assign"):
                raise ValueError(
                    "FreezeBackbone(lr_factor < 1) lowers the learning rate, and the model's optimizer has a "
                    "schedule of its own: give the engine lr=..., or lr_factor=1.0"
                )
            self._own_lr = float(np.asarray(rate))
        self._freeze(True)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if not self.epochs:
            return
        engine = self.engine
        if self._freeze(epoch < self.epochs):
            engine.rebuild_step()
        engine.lr_factor = 1.0 if epoch < self.epochs else self.lr_factor
        # The switch itself, once: at the first step of epoch `epochs` (not again when a run
        # resumes in the middle of it: its checkpoint holds the optimizer as it was then).
        if epoch == self.epochs and engine.done == 0:
            _fresh_optimizer_state(engine.optimizer, engine.model.trainable_variables)
            if self._own_lr is not None:
                engine.optimizer.learning_rate = self._own_lr * self.lr_factor
            engine.echo(
                f"fine-tuning: every layer trains from epoch {epoch + 1} at {self.lr_factor:g} x the learning rate"
            )

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.epochs:
            self._freeze(False)

    def on_interrupt(self) -> None:
        # The model as it was given; if the engine goes on (an elastic recovery), the next
        # epoch's begin freezes it again.
        if self.epochs:
            self._freeze(False)

    def _freeze(self, frozen: bool) -> bool:
        """Freeze the backbone, or give every layer its own flag back; True if that changed anything."""
        if frozen == self.frozen:
            return False
        if frozen:
            for layer in self._layers:
                layer.trainable = False
        else:
            for layer, flag in self._flags:
                layer.trainable = flag
        self.frozen = frozen
        return True


def _fresh_optimizer_state(optimizer, variables) -> None:
    """Set every variable of `optimizer` but its learning rate to what a new optimizer of
    its kind and configuration, built for `variables`, starts with: step count 0, zero
    moments (Adagrad's own initial accumulators). With loss scaling, the inner optimizer's:
    the loss scale goes on."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    fresh = type(inner).from_config(inner.get_config())
    fresh.build(variables)
    old, new = list(inner.variables), list(fresh.variables)
    if [(v.name, tuple(v.shape)) for v in old] != [(v.name, tuple(v.shape)) for v in new]:
        raise RuntimeError(f"cannot start {type(inner).__name__} afresh: its variables differ from a new one's")
    for mine, theirs in zip(old, new):
        if mine.name != "learning_rate":
            mine.assign(theirs)
