"""Model registry: `build_model(name, image_size, n_classes)`.

Models are plain Keras 3 models ending in a softmax over the classes. They know nothing
about MPI: distribution is applied around them by the trainer.

Precision: a model is built under Keras' global dtype policy (`runtime.set_precision`), so
with --precision bf16 its layers compute in bfloat16 with float32 variables. The output
layer (the softmax) of every model must say `dtype="float32"`: probabilities, the loss and
the decision threshold need float32 (bfloat16 keeps 3 significant digits), and
tests/unit/test_models.py checks it for every registry model.
"""

from __future__ import annotations

from collections.abc import Callable

from mpitrain.errors import UserError


def _seed(image_size: int, n_classes: int, channels: int = 1):
    """The seed project's CNN: three conv/pool blocks, one hidden dense layer, softmax."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input((image_size, image_size, channels)),
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


def _tiny(image_size: int, n_classes: int, channels: int = 1):
    """A small deterministic model (no dropout, no batch norm): tests and quick checks."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input((image_size, image_size, channels)),
            layers.Conv2D(8, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(4),
            layers.Flatten(),
            layers.Dense(16, activation="relu"),
            layers.Dense(n_classes, activation="softmax", dtype="float32"),
        ],
        name="tiny",
    )


def _xray(image_size: int, n_classes: int, channels: int = 1):
    """A batch-norm CNN for grayscale X-rays: a 16-filter stem, then blocks of two 3x3
    convolutions (conv, batch norm, ReLU) with 32, 64, 128 (and 256 from 128 px on)
    filters, each followed by 2x2 max pooling, then global average pooling, dropout and
    softmax. Global pooling keeps the parameter count independent of the image size.

    Batch-norm momentum is 0.9 (Keras: 0.99): with ~75 steps per epoch on 2 ranks the
    moving statistics then follow the weights within an epoch, so that the weights kept
    by --keep-best from an early epoch come with matching statistics.
    """
    import keras
    from keras import layers

    def conv(x, filters):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        return layers.ReLU()(x)

    widths = [32, 64, 128] + ([256] if image_size >= 128 else [])
    inputs = keras.Input((image_size, image_size, channels))
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


def check_model(name: str, image_size: int) -> None:
    """A UserError unless `name` is a model that can take `image_size` pixels (no Keras needed)."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    if image_size < MODELS[name][1]:
        raise UserError(f"--image-size {image_size} is too small for model {name!r} (needs >= {MODELS[name][1]})")


def build_model(name: str, image_size: int, n_classes: int, channels: int = 1):
    check_model(name, image_size)
    builder, _ = MODELS[name]
    if n_classes < 2:
        raise UserError(f"need at least 2 classes, got {n_classes}")
    return builder(image_size, n_classes, channels)
