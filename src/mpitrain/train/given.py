"""What `mpitrain.fit` brings to `mpitrain train`'s pipeline: the caller's own model, and
maybe its callbacks, an augmentation function and arrays instead of a folder.

`mpitrain train` builds its model from --model after loading the data; `mpitrain.fit(model,
"data/", out=...)` hands one in. Both then run the same code (train/command.py: plan, load,
engine, run folder), which asks a `Given` where the two differ: the model's checks against
the images and classes, its precision, the resume hint, and for arrays the plan and the
rows of a rank. The config of such a run says whose model it was (`model` is
"mpitrain.fit:NAME"), so `mpitrain train --resume` refuses it in one line: only the script
can build that model again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpitrain.data.dataset import Plan, Shard
from mpitrain.errors import UserError
from mpitrain.shards import shard

GIVEN_MODEL = "mpitrain.fit:"  # TrainConfig.model of a run whose model the caller built (then its name)
ARRAYS = "<arrays>"  # TrainConfig.data of a run on arrays
# The precision a model was built for, by Keras' dtype policy (anything else: fp32).
_POLICY_PRECISION = {"mixed_bfloat16": "bf16", "mixed_float16": "fp16"}


def is_given(model_spec: str) -> bool:
    return model_spec.startswith(GIVEN_MODEL)


def refuse_cli_resume(cfg, out) -> None:
    """`mpitrain train --resume` of a run whose model came from a script."""
    if is_given(cfg.model):
        raise UserError(
            f"the run in {out} trained a model of its script's own (mpitrain.fit); "
            "continue it from that script with out= and resume=True"
        )


def model_precision(model) -> str:
    """The precision `model` computes in, by its dtype policy: fp32, bf16 or fp16."""
    policy = getattr(model, "dtype_policy", None)
    return _POLICY_PRECISION.get(getattr(policy, "name", "float32"), "fp32")


def input_shape(model) -> tuple:
    """(height, width, channels) of the images `model` takes (None where any size goes); a
    UserError if it has no input yet."""
    try:
        shape = tuple(model.input_shape[1:])
    except (AttributeError, ValueError):
        raise UserError(
            "the model has no input shape yet: start it with keras.Input((height, width, channels))"
        ) from None
    if len(shape) != 3:
        raise UserError(f"the model takes inputs of shape {shape}: images need (height, width, channels)")
    return shape


@dataclass
class ArraysPlan(Plan):
    """The plan of arrays: rows, not files (named `x[i]` and `validation_data[i]`)."""

    train_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # into x
    val_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # into x or validation_data

    def protocol(self) -> str:
        if self.val_from != "split":
            return "separate arrays (validation_data)"
        n = len(self.train_paths) + len(self.val_paths)
        return f"{len(self.val_paths) / max(n, 1):.0%} of the training arrays, split row by row (stratified)"


@dataclass
class ArraysSource:
    """Images every rank holds whole ([n, H, W, C] or grey [n, H, W]; float32 in [0, 1] or
    integers at their dtype's full scale), integer labels, maybe validation arrays."""

    x: np.ndarray
    y: np.ndarray
    val_x: np.ndarray | None
    val_y: np.ndarray | None
    classes: list[str]

    def plan(self, cfg) -> Plan:
        """Every row, or `cfg.val_split` of them held out as `mpitrain train` splits a folder."""
        from mpitrain.data.split import stratified_split

        if self.val_x is not None and self.val_y is not None:
            tr, va = np.arange(len(self.x)), np.arange(len(self.val_x))
            val_y, val_names, val_from = self.val_y[va], [f"validation_data[{i}]" for i in va], "validation_data"
        else:
            tr, va = stratified_split(self.y, cfg.val_split, cfg.split_seed_used)
            if len(tr) == 0:
                raise UserError(f"--val-split {cfg.val_split} leaves no training rows of {len(self.x)}")
            val_y, val_names, val_from = self.y[va], [f"x[{i}]" for i in va], "split"
        names = [f"x[{i}]" for i in tr]
        return ArraysPlan(
            ARRAYS, self.classes, names, self.y[tr], val_names, val_y, val_from, train_rows=tr, val_rows=va
        )

    def load(self, plan: ArraysPlan, seed: int, train_part: tuple[int, int], val_part: tuple[int, int]) -> Shard:
        """This rank's rows of `plan`, sharded as `dataset.load_shard` shards a folder's files."""
        from mpitrain.engine.fit import as_labels

        tr = shard(np.arange(len(plan.train_paths)), *train_part, seed)
        va = shard(np.arange(len(plan.val_paths)), *val_part, seed)
        tx = self.x[plan.train_rows[tr]]
        held = self.x if plan.val_from == "split" or self.val_x is None else self.val_x
        vx = held[plan.val_rows[va]]
        return Shard(
            tx,
            as_labels(plan.train_labels[tr]),
            vx,
            as_labels(plan.val_labels[va]),
            _full_scale(tx),
            _full_scale(vx),
            np.asarray(va, np.int64),
        )


def _full_scale(x: np.ndarray) -> float:
    return 1.0 if x.dtype.kind == "f" else float(np.iinfo(x.dtype).max)


@dataclass
class Given:
    """The caller's part of a run (see the module docstring)."""

    model: Any
    callbacks: list = field(default_factory=list)  # after mpitrain train's own (--keep-best, ...)
    augment: Callable | None = None  # a function of the caller's; a policy name is cfg.augment
    progress: bool = True  # rank 0's bar and epoch lines
    own_lr: bool = False  # no lr= given: a compiled optimizer keeps its own rate (Options.lr None)
    arrays: ArraysSource | None = None  # instead of cfg.data / cfg.labels

    def check_images(self, cfg, channels: int) -> None:
        """The model must take the run's images (a resumed run's included), have a
        backbone for --freeze-backbone, and no optimizer or loss of its own for --ema,
        --label-smoothing or --mixup (before any run folder is made)."""
        from mpitrain.config import image_shape
        from mpitrain.engine.loop import check_own_parts

        check_own_parts(self.model, cfg.ema, cfg.label_smoothing, cfg.mixup)

        want, got = (*image_shape(cfg.image_size), channels), input_shape(self.model)
        if any(g is not None and g != w for g, w in zip(got, want)):
            raise UserError(f"the model takes images of {_shape(got)}, the run's are {_shape(want)}")
        if cfg.freeze_backbone:
            from mpitrain.engine.callbacks.freeze_backbone import backbone_layers

            try:
                backbone_layers(self.model)
            except ValueError as e:
                raise UserError(f"--freeze-backbone: {e}") from None

    def check_classes(self, classes: list[str]) -> None:
        out = tuple(self.model.output_shape[1:])
        if out != (len(classes),):
            shown = ", ".join(classes[:6]) + (", ..." if len(classes) > 6 else "")
            raise UserError(
                f"the model gives {out[-1] if out else 0} output(s) per image, the data has {len(classes)} "
                f"classes ({shown}): its last layer needs one unit per class"
            )

    def plan(self, cfg) -> Plan:
        from mpitrain.data import dataset

        return self.arrays.plan(cfg) if self.arrays is not None else dataset.plan_for(cfg)

    def prepared(self, cfg):
        """The model, computing in `cfg.precision` as `mpitrain train` builds its models
        (the softmax in float32); left as it is when it already does."""
        if cfg.precision != model_precision(self.model):
            from mpitrain.evaluate.modelio import set_model_precision

            set_model_precision(self.model, cfg.precision)
        return self.model

    def fingerprint(self) -> str:
        """What ranks started with different models or arrays would differ in."""
        h = hashlib.sha256(repr([tuple(w.shape) for w in self.model.weights]).encode())
        if self.arrays is not None:
            h.update(repr((self.arrays.x.shape, str(self.arrays.x.dtype))).encode())
            h.update(np.ascontiguousarray(self.arrays.y).tobytes())
        return h.hexdigest()[:16]

    def facts(self) -> dict:
        """config.json's runtime facts about what the caller brought."""
        if getattr(self.model, "optimizer", None) is None:
            optimizer = "mpitrain's: --optimizer at --lr"
        else:
            optimizer = "the model's own, at its own learning rate" if self.own_lr else "the model's own, at --lr"
        return {
            "trained_by": "mpitrain.fit",
            "model_name": self.model.name,
            "optimizer": optimizer,
            "augment": getattr(self.augment, "__qualname__", repr(self.augment)) if self.augment else None,
            "callbacks": [type(c).__name__ for c in self.callbacks],
        }

    @staticmethod
    def resume_hint(out) -> str:
        return f"the same script, with mpitrain.fit(..., out={str(out)!r}, resume=True)"


def _shape(hwc: tuple) -> str:
    h, w, c = hwc
    return f"{h}x{w}x{c}"
