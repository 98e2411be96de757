"""Fine-tuning under a real mpiexec: --weights imagenet and --freeze-backbone on two ranks.

Rank 0 has the weights file in its KERAS_HOME and rank 1 an empty one of its own (another
host without a shared home): rank 1 gets rank 0's file, neither downloads. The first epoch
trains the head alone, with the backbone (batch-norm statistics included) exactly the
file's; the second trains everything, and both ranks agree throughout.
"""

import os
import sys

import cv2
import numpy as np
import pytest

from keras_weights import MOBILENET_V3_SMALL, write_weights
from mpirun import mpirun

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(600)]

SIDE = 32


def colour_folder(root, per_class=16, seed=0):
    """Two classes that differ in hue: reddish and greenish noise."""
    rng = np.random.default_rng(seed)
    for name, channel in (("red", 2), ("green", 1)):  # OpenCV writes BGR
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 90, (SIDE, SIDE, 3)).astype(np.uint8)
            img[..., channel] += 120
            cv2.imwrite(str(root / name / f"{i:02d}.png"), img)
    return root


def _backbone_of_checkpoint(path, keras_home):
    """The backbone's weights in a checkpoint: the model is built the same way here, and a
    rank's state starts with its model's variables in order."""
    from mpitrain.engine import checkpoint
    from mpitrain.train.models import build_model

    os.environ["KERAS_HOME"] = str(keras_home)
    ckpt = checkpoint.read(path)
    model = build_model("mobilenet_v3_small", SIDE, 2, channels=3, weights="imagenet")
    arrays = ckpt.states[0][: len(model.variables)]
    for v, a in zip(model.variables, arrays, strict=True):
        assert tuple(v.shape) == a.shape
        v.assign(a)
    return ckpt, model.get_layer("MobileNetV3Small").get_weights()


def test_two_ranks_fine_tune_from_rank_0s_weights_file(tmp_path, monkeypatch):
    import keras

    data = colour_folder(tmp_path / "data")
    written = write_weights(tmp_path / "home0" / "models" / MOBILENET_V3_SMALL)
    out = tmp_path / "run"
    args = ["--data", data, "--out", out, "--model", "mobilenet_v3_small", "--image-size", SIDE]
    args += ["--weights", "imagenet", "--freeze-backbone", 1, "--epochs", 2, "--batch-size", 8]
    args += ["--val-split", 0.25, "--threads", 1, "--keep-checkpoints", 5]
    # Each rank its own KERAS_HOME: $0/home<rank>.
    program = ["sh", "-c", 'KERAS_HOME="$0/home$OMPI_COMM_WORLD_RANK" exec "$@"', str(tmp_path)]
    program += [sys.executable, "-m", "mpitrain", "train", *map(str, args)]
    proc, _ = mpirun(2, program, env={"TF_CPP_MIN_LOG_LEVEL": "2", "MPITRAIN_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"weights: ImageNet, {tmp_path / 'home0' / 'models' / MOBILENET_V3_SMALL}" in proc.stdout
    assert "fine-tuning: every layer trains from epoch 2 at 0.1 x the learning rate" in proc.stdout
    assert "Downloading" not in proc.stdout + proc.stderr
    shared = tmp_path / "home1" / "models" / MOBILENET_V3_SMALL
    assert shared.read_bytes() == (tmp_path / "home0" / "models" / MOBILENET_V3_SMALL).read_bytes()

    folder = out / "checkpoints"
    frozen_ckpt, frozen = _backbone_of_checkpoint(folder / "ckpt-e00001-s0000000.npz", tmp_path / "home0")
    assert frozen_ckpt.shared  # both ranks held the very same state
    assert len(frozen) == len(written)
    assert all(np.array_equal(a, b) for a, b in zip(frozen, written, strict=True))  # moving statistics too
    final = keras.saving.load_model(out / "model.keras", safe_mode=True).get_layer("MobileNetV3Small").get_weights()
    changed = sum(not np.array_equal(a, b) for a, b in zip(final, written, strict=True))
    assert changed > len(written) // 2, f"only {changed} of {len(written)} backbone weights trained after the switch"
