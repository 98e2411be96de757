"""Model registry: `build_model(name, image_size, n_classes)`.

`image_size` is an int (a square) or a (height, width) pair / "WxH" text (`config.image_shape`):
every kind of model is built for input (height, width, channels).

Models are plain Keras 3 models ending in a softmax over the classes. They know nothing
about MPI: distribution is applied around them by the trainer.

Precision: a model is built under Keras' global dtype policy (`runtime.set_precision`), so
with --precision bf16 its layers compute in bfloat16 with float32 variables. The output
layer (the softmax) of every model must say `dtype="float32"`: probabilities, the loss and
the decision threshold need float32 (bfloat16 keeps 3 significant digits), and
tests/unit/test_models.py checks it for every registry model.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import re
import warnings
from collections.abc import Callable
from pathlib import Path

from mpitrain import runfiles
from mpitrain.config import WEIGHTS, ImageSize, image_shape, image_size_text
from mpitrain.errors import UserError


def _seed(image_size: ImageSize, n_classes: int):
    """The seed project's CNN: three conv/pool blocks, one hidden dense layer, softmax."""
    keras = _keras()
    from keras import layers

    return keras.Sequential(
        [
            keras.Input((*image_shape(image_size), 1)),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dropout(0.3),
            layers.Dense(n_classes, activation="softmax", dtype="float32"),
        ],
        name="seed",
    )


def _tiny(image_size: ImageSize, n_classes: int):
    """A small deterministic model (no dropout, no batch norm): tests and quick checks."""
    keras = _keras()
    from keras import layers

    return keras.Sequential(
        [
            keras.Input((*image_shape(image_size), 1)),
            layers.Conv2D(8, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(4),
            layers.Flatten(),
            layers.Dense(16, activation="relu"),
            layers.Dense(n_classes, activation="softmax", dtype="float32"),
        ],
        name="tiny",
    )


def _xray(image_size: ImageSize, n_classes: int):
    """A batch-norm CNN for grayscale X-rays: a 16-filter stem, then blocks of two 3x3
    convolutions (conv, batch norm, ReLU) with 32, 64, 128 (and 256 from 128 px on)
    filters, each followed by 2x2 max pooling, then global average pooling, dropout and
    softmax. Global pooling keeps the parameter count independent of the image size.

    Batch-norm momentum is 0.9 (Keras: 0.99): with ~75 steps per epoch on 2 ranks the
    moving statistics then follow the weights within an epoch, so that the weights kept
    by --keep-best from an early epoch come with matching statistics.
    """
    keras = _keras()
    from keras import layers

    def conv(x, filters):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        return layers.ReLU()(x)

    widths = [32, 64, 128] + ([256] if min(image_shape(image_size)) >= 128 else [])
    inputs = keras.Input((*image_shape(image_size), 1))
    x = layers.MaxPooling2D()(conv(inputs, 16))
    for filters in widths:
        x = layers.MaxPooling2D()(conv(conv(x, filters), filters))
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="xray")


# name -> (builder, smallest image side it accepts)
MODELS: dict[str, tuple[Callable, int]] = {
    "seed": (_seed, 8),
    "tiny": (_tiny, 4),
    "xray": (_xray, 16),
}


KINDS_HELP = (
    "a registry name, a keras.applications name (resnet50, mobilenet_v3_small, efficientnet_b0, ...), "
    "MODULE:FUNCTION (function(input_shape, num_classes) -> Keras model) or a .keras file / run folder"
)


def check_model(name: str, image_size: ImageSize, n_classes: int | None = None, channels: int = 1) -> None:
    """A UserError unless `name` is a model that can take `image_size` pixels. Registry names
    need no Keras; the other kinds import it (and, given `n_classes`, are built and checked)."""
    if name in MODELS:
        _check_side(name, image_size, MODELS[name][1])
        return
    kind = _kind(name)
    if kind == "application":
        _, module = applications()[name]
        _check_side(name, image_size, _MIN_SIDE.get(module, 32))
    elif kind == "function":
        _function(name)
    elif kind == "file":
        _saved_path(name)
    if n_classes is not None and kind != "application":
        build_model(name, image_size, n_classes, channels)


def _check_side(name: str, image_size: ImageSize, low: int) -> None:
    """The model's smallest side, for each side of a WxH size."""
    if min(image_shape(image_size)) < low:
        each = "" if len(set(image_shape(image_size))) == 1 else " on each side"
        raise UserError(
            f"--image-size {image_size_text(image_size, True)} is too small for model {name!r} (needs >= {low}{each})"
        )


def check_weights(name: str, weights: str) -> None:
    """One line unless --weights `weights` can apply to --model `name` (no Keras for registry names)."""
    if weights in (None, "none"):
        return
    if weights not in WEIGHTS:
        raise UserError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    kind = "registry" if name in MODELS else _kind(name)
    if kind != "application":
        what = {"registry": "a registry model", "function": "MODULE:FUNCTION", "file": "a saved model"}[kind]
        raise UserError(
            f"--weights imagenet is for keras.applications models (resnet50, mobilenet_v3_small, ...); "
            f"--model {name} is {what} (--init RUN starts any model from a run's weights)"
        )


def check_freeze(name: str, weights: str | None, init: str | None, freeze_backbone: int) -> None:
    """--freeze-backbone trains the head alone over features learnt elsewhere: refused for a
    model whose backbone would be random (a registry or keras.applications model without
    --weights imagenet or --init). A MODULE:FUNCTION or saved model may bring its own."""
    if not freeze_backbone or init or weights == "imagenet":
        return
    kind = "registry" if name in MODELS else _kind(name)
    if kind in ("registry", "application"):
        raise UserError(
            f"--freeze-backbone {freeze_backbone} would freeze random weights: give --model {name} "
            f"--weights imagenet{' (keras.applications models)' if kind == 'registry' else ''} or --init RUN"
        )


def check_built(name: str, image_size: ImageSize, n_classes: int, channels: int, freeze_backbone: int = 0) -> None:
    """Before any image is decoded, once the classes are known: a MODULE:FUNCTION or saved
    model is built and must take the images' shape and give one output per class (and, for
    --freeze-backbone, have a backbone to freeze). Registry and keras.applications models
    get their head from `n_classes`, so they are not built here."""
    if name in MODELS or _kind(name) == "application":
        return
    model = build_model(name, image_size, n_classes, channels)
    if freeze_backbone:
        from mpitrain.engine.callbacks.freeze_backbone import backbone_layers

        try:
            backbone_layers(model)
        except ValueError as e:
            raise UserError(f"--freeze-backbone with --model {name}: {e}") from None


def needs_channels(spec: str, weights: str | None = None) -> int | None:
    """The channels a model needs (3 for --weights imagenet; a saved model's own); None: no preference."""
    if weights == "imagenet":
        return 3
    if spec not in MODELS and _kind(spec) == "file":
        return int(_load(spec).input_shape[-1])
    return None


def may_overlap(overlap: str, model: str, strategy: str, ranks: int) -> bool:
    """Whether a run may sum its gradients during backprop (--overlap), decided before the
    model is built (TensorFlow's threads are set first: `runtime.configure_runtime`): on, or
    auto for a model that is not the registry's (whose gradients, 1-2 MB, fill one bucket),
    with a strategy that can and more than one rank."""
    from mpitrain.parallel.strategies import strategy_class

    if overlap == "off" or ranks == 1 or not strategy_class(strategy).overlaps:
        return False
    return overlap == "on" or model not in MODELS


def build_model(name: str, image_size: ImageSize, n_classes: int, channels: int = 1, weights: str | None = None):
    """`weights="imagenet"`: a keras.applications model starts from Keras' ImageNet weights,
    read from KERAS_HOME/models (`pretrained.fetch` put the file there first)."""
    if n_classes < 2:
        raise UserError(f"need at least 2 classes, got {n_classes}")
    check_model(name, image_size)
    weights = None if weights in (None, "none") else weights
    if weights is not None:
        check_weights(name, weights)
    if name in MODELS:
        builder, _ = MODELS[name]
        if channels == 1:  # the registry's recipes stay bit for bit what they were
            return builder(image_size, n_classes)
        return _with_channels(builder, image_size, n_classes, channels)
    kind = _kind(name)
    if kind == "application":
        model = _application(name, image_size, n_classes, channels, weights)
    elif kind == "function":
        model = _function(name)((*image_shape(image_size), channels), n_classes)
    else:
        model = _load(name)
    _check_shapes(name, model, image_size, n_classes, channels)
    return model


def _with_channels(builder, image_size: ImageSize, n_classes: int, channels: int):
    """A registry model taking `channels` channels: the same layers on a wider input."""
    keras = _keras()

    grey = builder(image_size, n_classes)
    inputs = keras.Input((*image_shape(image_size), channels))
    x = inputs
    layers = grey.layers if isinstance(grey, keras.Sequential) else grey.layers[1:]
    fresh = [type(layer).from_config(layer.get_config()) for layer in layers]
    if isinstance(grey, keras.Sequential):
        return keras.Sequential([inputs, *fresh], name=grey.name)
    for layer in fresh:  # the functional registry models are chains
        x = layer(x)
    return keras.Model(inputs, x, name=grey.name)


def _kind(name: str) -> str:
    if name.endswith(".keras") or "/" in name or Path(name).is_dir():
        return "file"
    if ":" in name:
        return "function"
    if name in applications():
        return "application"
    raise UserError(f"unknown model {name!r}; expected {KINDS_HELP} (registry: {', '.join(sorted(MODELS))})")


def _snake(camel: str) -> str:
    """keras.applications' class-like names in snake case: MobileNetV3Small -> mobilenet_v3_small."""
    words: list[str] = []
    for w in re.findall(r"[A-Z]\d+|[A-Z]+(?![a-z])|[A-Z][a-z]+|\d+", camel.replace("NeXt", "Next")):
        if words and (w in ("Net", "Next") or w.isdigit()):
            words[-1] += w  # ResNet, ConvNeXt, VGG16: one word
        else:
            words.append(w)
    return "_".join(words).lower()


@functools.cache
def applications() -> dict[str, tuple[Callable, str]]:
    """snake_case name -> (keras.applications constructor, its module's last part: the family)."""
    keras = _keras()

    out = {}
    for attr in dir(keras.applications):
        fn = getattr(keras.applications, attr)
        if attr[:1].isupper() and callable(fn):
            out[_snake(attr)] = (fn, getattr(fn, "__module__", "").rsplit(".", 1)[-1])
    return out


# Smallest side keras.applications accepts without a top (imagenet_utils.obtain_input_shape).
_MIN_SIDE = {"inception_v3": 75, "inception_resnet_v2": 75, "xception": 71}
# Families whose model starts with its own normalisation and expects pixels in [0, 255].
_OWN_PREPROCESSING = ("efficientnet", "efficientnet_v2", "convnext", "mobilenet_v3")
# Families trained on caffe-style input: BGR [0, 255] minus the ImageNet mean (resnet.preprocess_input).
_CAFFE = ("resnet", "vgg16", "vgg19")
# Families trained on torch-style input: [0, 1], then ImageNet mean and standard deviation.
_TORCH = ("densenet",)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN, _TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _preprocessing(module: str, channels: int):
    """Keras layers turning mpitrain's float32 [0, 1] pixels into what the family expects
    (serialisable layers only, so that model.keras reloads without code)."""
    import keras
    from keras import layers

    def per_channel(values):
        return list(values) if channels == 3 else [sum(values) / len(values)] * channels

    if module in _OWN_PREPROCESSING:
        return [layers.Rescaling(255.0, name="to_255")]
    if module in _CAFFE:
        if channels != 3:  # grey: one mean (summed in the order it always was: the same bits)
            mean = per_channel(_CAFFE_MEAN_BGR[::-1])
            return [layers.Rescaling(255.0, name="to_255"), layers.Normalization(mean=mean, variance=[1.0] * channels)]
        # Colour: RGB -> BGR (a fixed 1x1 permutation), then the BGR mean, as resnet's
        # preprocess_input. Done with random weights too, so that a family has one
        # architecture: `--init` from a run trained on ImageNet weights keeps the order the
        # backbone learnt, whatever --weights the new run has.
        flip = layers.Conv2D(
            3,
            1,
            use_bias=False,
            trainable=False,
            kernel_initializer=keras.initializers.Constant([[0, 0, 1], [0, 1, 0], [1, 0, 0]]),
            name="rgb_to_bgr",
        )
        mean = list(_CAFFE_MEAN_BGR)
        return [layers.Rescaling(255.0, name="to_255"), flip, layers.Normalization(mean=mean, variance=[1.0] * 3)]
    if module in _TORCH:
        return [layers.Normalization(mean=per_channel(_TORCH_MEAN), variance=[s * s for s in per_channel(_TORCH_STD)])]
    return [layers.Rescaling(2.0, offset=-1.0, name="to_pm1")]  # "tf" mode: [-1, 1]


def _application(name: str, image_size: ImageSize, n_classes: int, channels: int, weights: str | None = None):
    """A keras.applications backbone with its preprocessing, average pooling and a fresh softmax head."""
    keras = _keras()

    ctor, module = applications()[name]
    shape = (*image_shape(image_size), channels)
    with _weights_source(weights) as used, warnings.catch_warnings():
        # Said once, in one line, by rank 0 (`fetch_weights`), not by every rank in Keras' words.
        warnings.filterwarnings("ignore", message=r".*Weights for input shape")
        try:
            backbone = ctor(include_top=False, weights=weights, input_shape=shape, pooling="avg")
        except (ValueError, OSError) as e:
            if used:  # the constructor had its file: reading it failed
                raise UserError(
                    f"--model {name} --weights {weights}: cannot read {used[0]} ({' '.join(str(e).split())}); "
                    "delete it to download it again"
                ) from None
            if isinstance(e, OSError):
                raise
            raise UserError(f"model {name!r} cannot take {image_size_text(image_size)}x{channels} input: {e}") from None
    inputs = keras.Input(shape)
    x = inputs
    for layer in _preprocessing(module, channels):
        x = layer(x)
    x = backbone(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", dtype="float32", name="head")(x)
    return keras.Model(inputs, outputs, name=name)


def _weights_source(weights: str | None):
    """Where a constructor's weights come from: the file `pretrained.fetch` left on disk.
    Yields the list `pretrained.from_disk` fills (empty without weights)."""
    if weights != "imagenet":
        return contextlib.nullcontext([])
    from mpitrain.train import pretrained

    return pretrained.from_disk()


def fetch_weights(name: str, image_size: ImageSize) -> tuple[str, list[str]]:
    """The one process that fetches (rank 0): --model `name`'s ImageNet weights file is in
    KERAS_HOME/models afterwards. Returns (its file name, lines to show)."""
    from mpitrain.train import pretrained

    ctor, _ = applications()[name]
    try:
        return pretrained.fetch(name, ctor, (*image_shape(image_size), 3))
    except ValueError as e:
        raise UserError(
            f"--model {name} --weights imagenet cannot take {image_size}x{image_size}x3 input: {e}"
        ) from None


def _function(spec: str) -> Callable:
    """MODULE:FUNCTION imported from PYTHONPATH, checked to take (input_shape, num_classes)."""
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise UserError(f"--model {spec}: cannot import {module_name!r} from PYTHONPATH ({e})") from None
    except AttributeError:
        raise UserError(f"--model {spec}: module {module_name!r} has no {attr!r}") from None
    try:
        inspect.signature(fn).bind((32, 32, 1), 2)
    except (TypeError, ValueError):
        raise UserError(
            f"--model {spec}: expected a function(input_shape, num_classes) returning a Keras model"
        ) from None
    return fn


def _saved_path(spec: str) -> Path:
    path = Path(spec)
    if path.is_dir():
        path = path / runfiles.MODEL
    if not path.is_file():
        raise UserError(f"--model {spec}: no such model file {path} (expected a .keras file or a run folder)")
    return path


def _load(spec: str):
    keras = _keras()

    try:
        return keras.saving.load_model(_saved_path(spec), compile=False)
    except (ValueError, OSError, TypeError) as e:
        raise UserError(f"--model {spec}: cannot load it as a Keras model ({e})") from None


def _check_shapes(name: str, model, image_size: ImageSize, n_classes: int, channels: int) -> None:
    keras = _keras()

    if not isinstance(model, keras.Model):
        raise UserError(f"--model {name}: expected a Keras model, got {type(model).__name__}")
    want_in, got_in = (*image_shape(image_size), channels), tuple(model.input_shape[1:])
    if got_in != want_in:
        raise UserError(f"--model {name}: expected input shape {want_in} (the images), the model takes {got_in}")
    got_out = tuple(model.output_shape[1:])
    if got_out != (n_classes,):
        raise UserError(
            f"--model {name}: expected output shape ({n_classes},) (the classes), the model gives {got_out}"
        )


def init_from(model, source: str) -> str:
    """Fine-tuning: copy the weights of RUN / FILE.keras / FILE.weights.h5 into `model`, layer
    by layer, matched by name and shape. Returns the one line saying what matched."""
    keras = _keras()

    path = Path(source)
    if source.endswith(".weights.h5"):
        if not path.is_file():
            raise UserError(f"--init {source}: no such weights file")
        donor = keras.models.clone_model(model)
        try:
            donor.load_weights(path, skip_mismatch=True)
        except (ValueError, OSError) as e:
            raise UserError(f"--init {source}: cannot read it as Keras weights ({e})") from None
    else:
        donor = _load(source)
    # By name; else the k-th layer of its class (Keras' automatic names, conv2d_7, depend on
    # how many models the process built before).
    donors = {layer.name: layer for layer in _leaves(donor)}
    by_kind = _by_kind(_leaves(donor))
    copied, missing = 0, []
    for layer, kind_key in zip(_leaves(model), _kind_keys(_leaves(model)), strict=True):
        other = donors.get(layer.name, by_kind.get(kind_key))
        if other is None:
            missing.append(f"{layer.name} (absent)")
        elif [w.shape for w in other.get_weights()] != [w.shape for w in layer.get_weights()]:
            missing.append(f"{layer.name} (shape)")
        else:
            layer.set_weights(other.get_weights())
            copied += 1
    line = f"init: {copied} layer(s) from {source}"
    return line + (f"; not matched: {', '.join(missing)}" if missing else "")


def _leaves(model) -> list:
    """The layers holding weights, nested models opened (a keras.applications backbone)."""
    keras = _keras()

    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out += _leaves(layer)
        elif layer.weights:
            out.append(layer)
    return out


def _kind_keys(layers: list) -> list[tuple[str, int]]:
    seen: dict[str, int] = {}
    keys = []
    for layer in layers:
        kind = type(layer).__name__
        keys.append((kind, seen.get(kind, 0)))
        seen[kind] = seen.get(kind, 0) + 1
    return keys


def _by_kind(layers: list) -> dict:
    return dict(zip(_kind_keys(layers), layers, strict=True))


def _keras():
    """Keras, imported without TensorFlow's start-up banner (runtime.import_tensorflow): the
    parent checks --model before any rank starts, and its error must stay one line."""
    from mpitrain.runtime import import_tensorflow

    import_tensorflow()
    import keras

    return keras


def as_multilabel(model):
    """Multi-label data: the model's last layer gives one sigmoid per label. A softmax head
    (every registry model's, and a MODULE:FUNCTION's built for classes) becomes a sigmoid
    one, the same weights; another activation is a one-line error."""
    import keras

    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    name = getattr(activation, "__name__", str(activation))
    if name == "softmax":
        last.activation = keras.activations.sigmoid
    elif name != "sigmoid":
        raise UserError(
            f"multi-label data needs one sigmoid output per label; the model's last layer "
            f"({last.name}) has activation {name!r}"
        )
    return model
