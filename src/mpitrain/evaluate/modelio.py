"""A trained model and what it needs to be used: classes, image size, decision threshold.

``model.json`` beside ``model.keras`` (written at the end of training) says::

    {"format": 1, "classes": [...], "image_size": 50 | "96x64", "threshold": 0.42 | null,
     "threshold_method": "youden" | "target_sensitivity" | "argmax",
     "positive_class": "PNEUMONIA" | null, "channels": 1 | 3, ...}

A model.json without ``channels`` (written before --channels existed) is one channel.
``image_size`` is a square's side (an int, as it always was) or "WxH" (width x height, a
``--image-size 96x64`` run), as in config.json.

Safety rules, all `UserError`s with one line:

* A ``format`` (in model.json or config.json) newer than this version understands is
  refused, never guessed at. A run folder from before model.json existed is read from
  classes.json and config.json (no threshold: argmax).
* The Keras file is loaded with ``safe_mode=True``: a model that would run arbitrary
  Python code on load (lambda layers) is refused.
* The model's input and output shapes must match model.json, and callers check the image
  size and the class names they were given against it (`check_image_size`,
  `label_map`).

`predict_probs` is the one prediction loop of the package (evaluate, predict, and the
trainer's validation): every call of the model sees the same batch shape, so an image's
probabilities do not depend on which or how many other images are predicted with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpitrain import runfiles
from mpitrain.config import image_shape, image_size_text, image_size_value
from mpitrain.engine.predict import BATCH, predict_probs  # noqa: F401 - the loop modelio's users call
from mpitrain.errors import UserError

FORMAT = 1  # the model.json format this version writes and reads
CONFIG_FORMAT = 1  # the newest config.json format this version reads


@dataclass
class ModelInfo:
    """What model.json says (or, for older run folders, classes.json + config.json)."""

    path: Path  # the .keras file
    classes: list[str]
    image_size: int | str  # as in config.json: a square's side, or "WxH"
    threshold: float | None = None
    threshold_method: str = "argmax"
    positive_class: str | None = None
    extra: dict = field(default_factory=dict)
    members: list[ModelInfo] = field(default_factory=list)  # an ensemble's models (evaluate/ensemble.py)
    export: Path | None = None  # the export folder given for this model (`model_path`)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the model's images."""
        return image_shape(self.image_size)

    @property
    def size_text(self) -> str:
        """The images' size in messages: "50x50", "96x64" (width x height)."""
        return image_size_text(self.image_size)

    @property
    def channels(self) -> int:
        """1 (grey) or 3 (RGB): how the model's images are decoded."""
        return int(self.extra.get("channels", 1))

    @property
    def positive(self) -> int | None:
        return None if self.positive_class is None else self.classes.index(self.positive_class)

    @property
    def label(self) -> str:
        """How messages name the model: its file, or the ensemble's."""
        if not self.members:
            return f"export {self.export} of {self.path}" if self.export else str(self.path)
        return f"ensemble of {len(self.members)} ({', '.join(str(m.path) for m in self.members)})"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _check_format(doc: dict, path: Path, newest: int) -> None:
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if not isinstance(fmt, int):
        raise UserError(f"{path} has no format number: not an mpitrain run file")
    if fmt > newest:
        raise UserError(
            f"{path} has format {fmt}, but this mpitrain reads format {newest} at most: "
            "upgrade mpitrain to use this model"
        )


def model_path(given: str | Path) -> Path:
    """``RUNDIR/model.keras``, ``RUNDIR`` or an export folder -> the .keras file (must exist).

    An export folder (``mpitrain export``'s, with its export.json) stands for the model.keras
    it was made from, and only while that file is unchanged: a stale export is refused
    (`export.source_model`). Its exported files reproduce that model (export's check), so
    evaluating or predicting with the model is evaluating or predicting with the export."""
    from mpitrain.evaluate import export

    p = Path(given)
    if export.is_export(p):
        return export.source_model(p)
    if p.is_dir():
        p = p / runfiles.MODEL
    if not p.is_file():
        raise UserError(f"model {p} does not exist (give RUNDIR/{runfiles.MODEL}, RUNDIR or an export folder)")
    return p


def read_info(given: str | Path) -> ModelInfo:
    """The model's metadata, with every format check; does not import Keras."""
    path = model_path(given)
    from mpitrain.evaluate import export

    exported = Path(given) if export.is_export(Path(given)) else None
    meta, cfg = path.with_name(runfiles.MODEL_INFO), path.with_name(runfiles.CONFIG)
    if cfg.is_file():
        _check_format(_read_json(cfg), cfg, CONFIG_FORMAT)
    if meta.is_file():
        doc = _read_json(meta)
        _check_format(doc, meta, FORMAT)
        try:
            classes = [str(c) for c in doc["classes"]]
            info = ModelInfo(
                path,
                classes,
                _size_of(doc["image_size"]),
                doc.get("threshold"),
                doc.get("threshold_method") or "argmax",
                doc.get("positive_class"),
                {k: v for k, v in doc.items() if k not in ("format", "classes", "image_size")},
            )
        except (KeyError, TypeError, ValueError, UserError) as e:
            raise UserError(f"{meta} is incomplete or damaged ({type(e).__name__}: {e})") from None
    elif cfg.is_file() and path.with_name(runfiles.CLASSES).is_file():  # before model.json existed
        try:
            classes = [str(c) for c in _read_json(path.with_name(runfiles.CLASSES))]
            size = _size_of(_read_json(cfg)["config"]["image_size"])
        except (KeyError, TypeError, ValueError, UserError) as e:
            raise UserError(f"{cfg} or classes.json is incomplete ({type(e).__name__}: {e})") from None
        info = ModelInfo(path, classes, size)  # no threshold was chosen then: argmax
    else:
        raise UserError(f"no model.json beside {path}: give the model of an mpitrain run folder")
    if len(info.classes) < 2 or len(set(info.classes)) != len(info.classes):
        raise UserError(f"model {path}: needs two or more distinct class names, got {info.classes}")
    if info.positive_class is None:
        from mpitrain.evaluate.threshold import positive_index

        k = positive_index(info.classes)  # None with more than two classes
        info.positive_class = None if k is None else info.classes[k]
    if info.positive_class is not None and info.positive_class not in info.classes:
        raise UserError(f"{meta}: positive class {info.positive_class!r} is not one of the classes")
    t = info.threshold
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0):
        raise UserError(f"{meta}: threshold {t!r} is not a probability")
    info.export = exported
    return info


def _size_of(value) -> int | str:
    """model.json's / config.json's image size: an int (a square; older files say 50 or "50") or "WxH"."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return image_size_value(value)


def check_image_size(info: ModelInfo, image_size: int | str | None) -> None:
    """--image-size PX or WxH given to evaluate/predict: the model's own size, or refused."""
    if image_size is not None and image_shape(image_size) != info.shape:
        raise UserError(
            f"model {info.path} was trained on {info.size_text} images"
            + ("" if len(set(info.shape)) == 1 else " (width x height)")
            + f"; --image-size {image_size_text(image_size, True)} does not match (omit it to use the model's size)"
        )


def label_map(info: ModelInfo, data_classes: list[str], where) -> np.ndarray:
    """Model class index of each data class; refuses classes the model does not know."""
    unknown = [c for c in data_classes if c not in info.classes]
    if unknown:
        raise UserError(
            f"model {info.path} was trained for classes {', '.join(info.classes)}; "
            f"{where} has other classes: {', '.join(unknown)}"
        )
    return np.array([info.classes.index(c) for c in data_classes], dtype=np.int64)


def resolve_threshold(info: ModelInfo, override: float | None) -> tuple[float | None, str]:
    """(threshold to use, where it comes from: "model", "--threshold" or "argmax")."""
    if override is not None:
        if len(info.classes) != 2:
            raise UserError(f"--threshold applies to two-class models; this one has {len(info.classes)} classes")
        if not 0.0 <= override <= 1.0:
            raise UserError(f"--threshold must be in [0, 1], got {override}")
        return float(override), "--threshold"
    if info.threshold is None or len(info.classes) != 2:
        return None, "argmax"
    return float(info.threshold), "model"


def output_layers(model) -> list:
    """The layers whose outputs are the model's outputs (the softmax)."""
    return [t._keras_history.operation for t in model.outputs]


def set_model_precision(model, precision: str) -> None:
    """Make every layer of a built model compute in `precision` (fp32 | bf16 | fp16), except
    the output layers (the softmax), which compute in float32 whatever the precision.
    Variables are untouched: the mixed policies keep them float32, so the weights are the
    same whatever the precision.

    Before saving, trained models are set to fp32, so model.keras computes in float32
    wherever it is loaded; evaluate and predict then apply their own --precision.
    """
    import keras

    from mpitrain.runtime import POLICIES

    outputs = {id(layer) for layer in output_layers(model)}
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if not isinstance(layer, keras.layers.InputLayer):
            layer.dtype_policy = POLICIES["fp32" if id(layer) in outputs else precision]


def load_model(info: ModelInfo, precision: str = "fp32"):
    """The Keras model, loaded in safe mode, checked against the metadata, computing in
    `precision` (see `set_model_precision`)."""
    import keras

    try:
        model = keras.saving.load_model(info.path, compile=False, safe_mode=True)
    except Exception as e:  # noqa: BLE001 - any load failure is the file's fault, not ours
        text = " ".join(str(e).split())
        if "safe_mode" in text or "lambda" in text.lower():
            raise UserError(
                f"refusing to load {info.path}: it contains Python code (e.g. a Lambda "
                "layer), which safe mode does not run"
            ) from None
        raise UserError(f"cannot load model {info.path}: {type(e).__name__}: {text[:300]}") from None
    want_in = (None, *info.shape, info.channels)
    if tuple(model.input_shape) != want_in:
        kind = "grayscale" if info.channels == 1 else f"{info.channels}-channel"
        raise UserError(
            f"model {info.path} takes inputs {tuple(model.input_shape)[1:]}, but its "
            f"model.json says {info.size_text} {kind}: files do not belong together"
        )
    if tuple(model.output_shape) != (None, len(info.classes)):
        raise UserError(
            f"model {info.path} has {model.output_shape[-1]} outputs for "
            f"{len(info.classes)} classes in model.json: files do not belong together"
        )
    set_model_precision(model, precision)
    return model


def exact(p) -> str:
    """A probability as text: the exact float32 value, the shortest decimal that reads back to it
    (predict's CSV and val_predictions.csv, so metrics recomputed from them are the same)."""
    return repr(float(p))


def decide(probs: np.ndarray, threshold: float | None, positive: int | None) -> np.ndarray:
    """Predicted class per row: P(positive) >= threshold for two classes, else argmax."""
    if threshold is None or positive is None:
        return probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    return np.where(probs[:, positive].astype(np.float64) >= threshold, positive, 1 - positive)


def write_info(out: Path, classes: list[str], image_size: int | str, choice, positive: int | None, **extra) -> dict:
    """Write ``out/model.json`` (rank 0, at the end of training) and return it."""
    from mpitrain.atomic import write_json

    doc = {
        "format": FORMAT,
        "classes": list(classes),
        "image_size": image_size_value(image_size),  # a square's side as ever, else "WxH"
        **choice.to_dict(),
        "positive_class": None if positive is None else classes[positive],
        **extra,
    }
    write_json(Path(out) / runfiles.MODEL_INFO, doc)
    return doc
