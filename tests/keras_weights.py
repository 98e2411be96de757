"""A stand-in for Keras' published ImageNet weights, written where Keras keeps them.

The tests never download: they write a real weights file of the same model and layout
(random weights, Keras' legacy HDF5 weights layout, as Keras' own files are) under the
exact name Keras asks for, and check that `--weights imagenet` loads those values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The name Keras 3.15 gives MobileNetV3Small's no-top weights (keras/src/applications/mobilenet_v3.py):
# mpitrain must find it by asking the constructor, not from a table of its own.
MOBILENET_V3_SMALL = "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"


def write_weights(path: Path, seed: int = 5) -> list[np.ndarray]:
    """The no-top MobileNetV3Small's weights file at `path`, random weights. Returns them."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(seed)
    backbone = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, backbone)
    return backbone.get_weights()
