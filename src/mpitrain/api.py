"""`mpitrain.fit`: the library's entry point, above every layer.

Two roads, one loop:

* arrays, a keras.utils.PyDataset or a tf.data.Dataset, in memory: the engine
  (`engine/fit.py`), each rank its shard;
* a folder of class folders or a label CSV, and arrays with a run folder (`out=`,
  `resume=`) or with what only `mpitrain train` does (`val_split=`, `keep_best=`, the
  decision threshold, ...): `mpitrain train`'s own pipeline (`train/command.py`,
  `train_given`) with the caller's model. The command line builds its model from --model
  and runs the same code, so the two cannot drift.

Keywords are `mpitrain train`'s options under their field names (`TrainConfig`, `Options`);
an unknown one is a TypeError, a wrong value a UserError in one line that names keywords
(`out=`, not `--out`). Nothing below this module imports it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mpitrain.engine.options import Options
from mpitrain.errors import AgreedError, QuietExit, UserError

if TYPE_CHECKING:
    from mpitrain.engine.loop import Result
    from mpitrain.parallel.comm import Comm

_ENGINE = frozenset(f.name for f in dataclasses.fields(Options))  # either road
# Only `mpitrain train`'s pipeline does these: with arrays they take that road too.
_RUN = frozenset(
    {"overwrite", "val_split", "split_seed", "threshold_policy", "target_sensitivity", "tensorboard"}
    | {"keep_best", "early_stop", "threads", "init", "classes", "freeze_backbone", "unfreeze_lr_factor"}
)
# A folder's or label file's own: arrays bring their images as they are.
_FILES = frozenset(
    {"image_size", "channels", "cache_dir", "store", "groups", "group_pattern", "data_on_root", "allow_nested_classes"}
    | {"path_column", "label_column", "patient_column"}
    | {"label_columns", "multi_label", "findings_column", "no_finding", "uncertain", "blank"}
)
KEYWORDS = _ENGINE | _RUN | _FILES  # besides fit's named parameters, of which these are options of train:
NAMED = frozenset({"augment", "class_weight", "elastic", "out"})
# TrainConfig fields that are no keyword: x and validation_data say where the images are,
# the model is the caller's, --pretext is `mpitrain pretrain`'s (tests/unit/test_fit_folders.py
# keeps this list complete).
NOT_KEYWORDS = frozenset({"data", "labels", "val_data", "val_labels", "model", "recipe", "weights", "pretext"})
# --flag -> flag=True in messages
_FLAGS = {"overwrite", "elastic", "tensorboard", "data_on_root", "resume", "multi_label"}


@dataclasses.dataclass
class _Call:
    """One `fit` call's arguments, as the two roads take them."""

    model: Any
    x: Any
    y: Any
    validation_data: Any
    callbacks: Any
    class_weight: Any
    augment: Any
    elastic: bool
    out: Any
    resume: Any
    presharded: bool
    comm: Comm | None
    echo: Callable
    progress: bool
    options: dict


def fit(
    model,
    x,
    y=None,
    *,
    validation_data=None,
    callbacks=(),
    class_weight=None,
    augment=None,
    elastic: bool = False,
    out=None,
    resume=False,
    presharded: bool = False,
    comm: Comm | None = None,
    echo=print,
    progress: bool = True,
    **options,
) -> Result:
    """Train `model` in place on every rank; returns the result, whose `history` (the same
    list on every rank) has Keras' keys: loss, accuracy, val_loss, val_accuracy, ...

    `x`: images (float32 in [0, 1], or integers at their dtype's full scale) with integer
    labels `y`; a PyDataset or tf.data.Dataset of (images, labels); or a folder of class
    folders or a label CSV, read by `mpitrain train`'s loader. `out=RUNDIR`: rank 0 writes
    the run folder `mpitrain evaluate`, `predict` and `export` read; `resume=True` goes on
    from its newest checkpoint. docs/library.md lists every keyword."""
    unknown = sorted(set(options) - KEYWORDS)
    if unknown:
        raise TypeError(f"fit() got unknown option(s): {', '.join(unknown)}")
    options = {k: v for k, v in options.items() if not (k in ("lr", "timeout") and v is None)}  # None: the default
    call = _Call(model, x, y, validation_data, callbacks, class_weight, augment, elastic, out, resume, presharded,
                 comm, echo, progress, options)  # fmt: skip
    folder = isinstance(x, (str, os.PathLike))
    if folder or out is not None or resume not in (False, None) or _RUN & set(options):
        return _fit_run(call)
    files = sorted(_FILES & set(options))
    if files:
        raise UserError(
            f"{files[0]}= is for a folder or a label file: arrays and datasets bring their images as they are"
        )
    return _fit_engine(call)


def _fit_engine(c: _Call) -> Result:
    """Arrays or a dataset, in memory: `engine.fit`."""
    from mpitrain.engine.fit import _is_dataset
    from mpitrain.engine.fit import fit as engine_fit

    x, validation_data, class_weight = c.x, c.validation_data, c.class_weight
    if not _is_dataset(x) and c.y is not None:
        x = _images(x)
        _check_arrays(c.model, x, np.asarray(c.y), "x")
        if isinstance(validation_data, tuple) and len(validation_data) == 2 and not _is_dataset(validation_data[0]):
            vx, vy = _images(validation_data[0]), np.asarray(validation_data[1])
            _check_arrays(c.model, vx, vy, "validation_data")
            validation_data = (vx, vy)
        if c.augment not in (None, "none") and not callable(c.augment):
            _check_channels_for_augment(x)
    if isinstance(class_weight, str):
        class_weight = _named_class_weight(c.model, x, c.y, class_weight)
    options = {**c.options, "precision": _engine_precision(c.model, c.options.get("precision"), c.comm)}
    return engine_fit(
        c.model,
        x,
        c.y,
        validation_data=validation_data,
        presharded=c.presharded,
        comm=c.comm,
        callbacks=c.callbacks,
        class_weight=class_weight,
        augment=_augment_function(c.augment, options.get("seed", 0)),
        elastic=c.elastic,
        echo=c.echo,
        progress=c.progress,
        **options,
    )


def _fit_run(c: _Call) -> Result:
    """A folder, a label file, or arrays with a run folder: `mpitrain train`'s pipeline."""
    from mpitrain.config import image_size_value
    from mpitrain.engine.fit import _is_dataset
    from mpitrain.train.given import ARRAYS, GIVEN_MODEL, Given, model_precision

    if _is_dataset(c.x) or _is_dataset(c.validation_data):
        raise UserError(
            "a dataset as x or validation_data trains without a run folder: out=, resume= and the options of "
            "mpitrain train's pipeline take arrays, a folder or a label file"
        )
    if c.presharded or c.comm is not None:
        raise UserError(f"{'presharded=' if c.presharded else 'comm='} is for arrays and datasets without a run folder")
    if c.class_weight is not None and not isinstance(c.class_weight, str):
        raise UserError("class_weight= with a folder or a run folder is 'balanced' or 'none'")
    out, resume = _run_folder(c.out, c.resume)
    fields: dict[str, Any] = dict(c.options)
    classes = fields.pop("classes", None)
    source = None
    if isinstance(c.x, (str, os.PathLike)):
        fields.update(_from_files(c.model, c.x, c.y, c.validation_data, classes, fields))
    else:
        source = _arrays_source(c.model, c.x, c.y, c.validation_data, classes, fields)
        size = image_size_value((source.x.shape[1], source.x.shape[2]))
        fields.update(data=ARRAYS, image_size=size, channels=int(source.x.shape[-1]))
    own_augment = c.augment if callable(c.augment) else None
    given = Given(c.model, list(c.callbacks), own_augment, c.progress, own_lr="lr" not in c.options, arrays=source)
    fields.update(
        model=GIVEN_MODEL + str(c.model.name),
        out=out,
        elastic=bool(c.elastic),
        augment="none" if c.augment is None or own_augment else c.augment,
        class_weight=c.class_weight or ("none" if source is not None else "balanced"),
    )
    # The library's defaults, the same on both roads (Keras' epochs, the model's own precision,
    # no watchdog unless `mpitrain run --timeout` set one); the folder's are mpitrain train's.
    fields.setdefault("epochs", 1)
    fields.setdefault("precision", model_precision(c.model))
    fields.setdefault("timeout", Options().resolved().timeout)
    return _run_pipeline(fields, given, c.echo if c.progress else _silent, resume)


def _run_pipeline(fields: dict, given, echo, resume: bool) -> Result:
    import keras

    from mpitrain.config import TrainConfig
    from mpitrain.train.command import train_given

    policy = keras.config.dtype_policy()  # the run sets Keras' global policy: the caller gets theirs back
    try:
        return train_given(lambda: TrainConfig(**fields), given, echo=echo, resume=resume)
    except QuietExit as e:  # another rank said it; a library caller gets the reason on every rank
        if e.message is None:
            raise
        raise AgreedError(keyword_terms(e.message)) from None
    except UserError as e:
        raise type(e)(keyword_terms(str(e))) from None
    finally:
        keras.config.set_dtype_policy(policy)


def _run_folder(out, resume) -> tuple[str | None, bool]:
    """(out, resuming) of out= and resume= (True, or the run folder itself)."""
    if isinstance(resume, (str, os.PathLike)):
        if out is not None and Path(out) != Path(resume):
            raise UserError("give the run folder once: resume=RUNDIR, or out=RUNDIR with resume=True")
        return str(resume), True
    if resume not in (True, False, None):
        raise UserError(f"resume= is True (with out=RUNDIR) or the run folder, got {resume!r}")
    if resume and out is None:
        raise UserError("resume=True needs out=RUNDIR: the run folder to continue")
    return (None if out is None else str(out)), bool(resume)


def _from_files(model, x, y, validation_data, classes, fields: dict) -> dict:
    """TrainConfig's data fields and image shape for a folder or label file `x`."""
    if y is not None:
        raise UserError("y= goes with arrays: a folder's classes are its sub-folders, a label file's its label column")
    if classes is not None:
        raise UserError("classes= names the classes of arrays; a folder or label file names its own")
    found = {**_where(x, "x", "data", "labels"), **_validation_files(validation_data)}
    return {**found, **_image_fields(model, fields)}


def _image_fields(model, fields: dict) -> dict:
    """image_size and channels: the model's input unless given, and given, agreeing with it."""
    from mpitrain.config import image_shape, image_size_text, image_size_value
    from mpitrain.train.given import input_shape

    h, w, c = input_shape(model)
    size, channels = fields.get("image_size"), fields.get("channels", c)
    if size is None and (h is None or w is None):
        raise UserError("the model takes images of any size: give image_size=PX or image_size='WxH'")
    size = image_size_value((h, w)) if size is None else size
    gh, gw = image_shape(size)
    if h not in (None, gh) or w not in (None, gw) or (c is not None and channels != c):
        takes = f"{w or 'any'}x{h or 'any'} (width x height) with {c or 'any'} channel(s)"
        raise UserError(
            f"image_size={image_size_text(size, True)} and channels={channels}, but the model takes {takes}"
        )
    return {"image_size": size, "channels": channels}


def _where(path, name: str, folder_field: str, file_field: str) -> dict:
    p = Path(path)
    if p.is_dir():
        return {folder_field: str(path)}
    if p.is_file():
        return {file_field: str(path)}
    raise UserError(f"{name}: no such folder or label file: {path}")


def _validation_files(validation_data) -> dict:
    if validation_data is None:
        return {}
    if isinstance(validation_data, (str, os.PathLike)):
        return _where(validation_data, "validation_data", "val_data", "val_labels")
    raise UserError(
        "validation_data= with a folder or label file is a folder or label file too (or leave it out: val_split=)"
    )


def _arrays_source(model, x, y, validation_data, classes, fields: dict):
    """The caller's arrays for the pipeline, checked against the model."""
    from mpitrain.train.given import ArraysSource

    files = sorted(_FILES & set(fields))
    if files:
        raise UserError(f"{files[0]}= is for a folder or a label file: arrays bring their images as they are")
    if y is None:
        raise TypeError("fit() needs labels y with array images x (or a folder or label file as x)")
    x, y = _images(x), np.asarray(y)
    _check_arrays(model, x, y, "x")
    val_x = val_y = None
    if validation_data is not None:
        if not (isinstance(validation_data, tuple) and len(validation_data) == 2):
            raise UserError("validation_data= with arrays is (x_val, y_val), or leave it out: val_split=")
        val_x, val_y = _images(validation_data[0]), np.asarray(validation_data[1])
        _check_arrays(model, val_x, val_y, "validation_data")
    if x.shape[-1] not in (1, 3):
        raise UserError(f"a run folder's images have 1 or 3 channels; these have {x.shape[-1]}")
    n = int(model.output_shape[-1])
    names = [str(i) for i in range(n)] if classes is None else [str(c) for c in classes]
    if len(names) != n or len(set(names)) != n:
        raise UserError(f"classes= needs {n} different names, one per output of the model, got {list(classes)}")
    from mpitrain.engine.fit import as_labels

    return ArraysSource(x, as_labels(y), val_x, None if val_y is None else as_labels(val_y), names)


def _images(x) -> np.ndarray:
    """Image arrays as [n, H, W, C]: grey [n, H, W] gets its channel axis (a view)."""
    x = np.asarray(x)
    return x[..., np.newaxis] if x.ndim == 3 else x


def _check_arrays(model, x: np.ndarray, y: np.ndarray, name: str) -> None:
    """Images the model takes ([n, H, W, C]) and a class index per image."""
    from mpitrain.train.given import input_shape

    want, got = input_shape(model), tuple(x.shape[1:])
    if len(got) != 3 or any(w is not None and w != g for w, g in zip(want, got)):
        raise UserError(f"{name}: images of shape {got}, but the model takes {want}")
    if len(y) != len(x):
        raise UserError(f"{name}: {len(x)} images but {len(y)} labels")
    n = int(model.output_shape[-1])
    if y.ndim == 2 and y.shape[1] > 1:  # multi-label: [n, L] of 1, 0, NaN (masked)
        values = y[~np.isnan(y)] if y.dtype.kind == "f" else y
        if y.shape[1] != n or not np.isin(values, (0, 1)).all():
            raise UserError(f"{name}: multi-label rows must be [n, {n}] of 1, 0 or NaN (the model has {n} outputs)")
        return
    if y.dtype.kind not in "iub" or (len(y) and not (0 <= int(y.min()) and int(y.max()) < n)):
        raise UserError(f"{name}: labels must be class indices 0..{n - 1} (the model has {n} outputs)")


def _check_channels_for_augment(x: np.ndarray) -> None:
    if x.shape[-1] not in (1, 3):
        raise UserError(f"augment= policies take grey (1 channel) or colour (3) images; these have {x.shape[-1]}")


def _augment_function(augment, seed: int) -> Callable | None:
    """augment=: None or "none", a policy name of --augment, or the caller's function."""
    if augment is None or callable(augment):
        return augment
    from mpitrain.config import AUGMENTS
    from mpitrain.train.fitting import policy_augment

    if augment not in AUGMENTS:
        raise UserError(
            f"augment= must be one of {', '.join(AUGMENTS)} or a function(rows, max_value, epoch, rank, step)"
        )
    return policy_augment(augment, seed)


def _named_class_weight(model, x, y, mode: str):
    """class_weight="balanced" / "none" for arrays (the counts of y), as --class-weight."""
    from mpitrain.config import CLASS_WEIGHTS
    from mpitrain.data.dataset import class_weights

    if mode not in CLASS_WEIGHTS:
        raise UserError(f"class_weight= must be one of {', '.join(CLASS_WEIGHTS)}, a dict or an array")
    if mode == "none":
        return None
    if y is None:
        raise UserError("class_weight='balanced' counts the labels: give arrays (or a {class: weight} dict)")
    counts = np.bincount(np.asarray(y, np.int64).reshape(-1), minlength=int(model.output_shape[-1]))
    return class_weights(counts, mode)


def _engine_precision(model, asked: str | None, comm: Comm | None) -> str:
    """precision= for the engine's road: the model's own unless asked; asked, the model is
    set to compute in it (the softmax in float32) as `mpitrain train` builds its models."""
    from mpitrain.runtime import PRECISIONS
    from mpitrain.train.given import model_precision

    if asked is None:
        return model_precision(model)
    if asked not in PRECISIONS:
        raise UserError(f"precision= must be one of {', '.join(PRECISIONS)}")
    if asked == "auto":
        from mpitrain.parallel.comm import world
        from mpitrain.runtime import resolve_precision

        comm = world() if comm is None else comm
        asked = comm.bcast_obj(resolve_precision("auto")[0] if comm.rank == 0 else None)  # rank 0's, for all
    if asked != model_precision(model):
        from mpitrain.evaluate.modelio import set_model_precision

        set_model_precision(model, asked)
    return asked


def keyword_terms(message: str) -> str:
    """A message of `mpitrain train`'s in the library's words: `--val-split` -> `val_split=`,
    `--overwrite` -> `overwrite=True` (options that are no keyword stay as they are)."""

    def term(m: re.Match) -> str:
        name = m.group(1).replace("-", "_")
        if name in _FLAGS:
            return f"{name}=True"
        return f"{name}=" if name in KEYWORDS | NAMED else m.group(0)

    return re.sub(r"--([a-z][a-z0-9-]*)", term, message)


def _silent(*args, **kwargs) -> None:
    """progress=False: no lines at all."""
