"""Test-time augmentation (``--tta N``) and a simulated acquisition shift (``--shift POLICY``)
for `evaluate` and `predict`.

``--tta N``: an image's probabilities are the mean over N views, the image itself and N-1
draws of ``--tta-augment`` (an `data/augment.py` policy; default the one the model was
trained with, ``xray`` for a model trained without augmentation). ``--shift POLICY``: each
image is replaced by one draw of POLICY before it is predicted (and before its TTA views):
an X-ray of the same patient as another hospital's machine and positioning might have taken
it. Evaluating the validation images (``--labels RUN/val_predictions.csv``) under a shift
is a validation signal closer to new patients than the plain one (docs/accuracy.md).

Every draw is a pure function of (``--tta-seed``, the view, the file's name): the same file
gets the same views in `evaluate` and `predict`, in any batch, order or number of ranks;
results are bit-identical across rank counts (tests/unit/test_tta.py, tests/system).
"""

from __future__ import annotations

import os
import zlib

import numpy as np

_TTA, _SHIFT = 0x77A, 0x5F1  # keep the two streams apart (and apart from training's draws)


def image_keys(paths: list[str]) -> list[int]:
    """Each file's key: CRC-32 of its name (not its folder: a copied folder draws alike)."""
    return [zlib.crc32(os.path.basename(p).encode("utf-8", "surrogateescape")) for p in paths]


def draw(x: np.ndarray, keys: list[int], policy: str, seed: int, view: int, stream: int = _TTA) -> np.ndarray:
    """One view of every row of ``x`` (float [n, h, w, c] in [0, 1]): a generator per image."""
    from mpitrain.data.augment import augment_with

    out = np.empty(x.shape, np.float32)
    for i, key in enumerate(keys):
        rng = np.random.default_rng([int(seed), int(view), int(key), stream])
        out[i] = augment_with(x[i : i + 1], 1.0, policy, rng)[0].reshape(x.shape[1:])
    return out


def shifted(x: np.ndarray, keys: list[int], policy: str, seed: int) -> np.ndarray:
    """Every image through one draw of ``policy`` (``--shift``)."""
    return draw(x, keys, policy, seed, 0, _SHIFT)


def predict_views(
    net, x: np.ndarray, keys: list[int], n_classes: int, views: int = 1, policy: str = "xray", seed: int = 0
) -> np.ndarray:
    """float32 [n, k]: the mean probabilities of ``views`` views (1: the image alone)."""
    from mpitrain.engine.predict import predict_probs

    total = predict_probs(net, x, n_classes).astype(np.float64)
    for v in range(1, views):
        total += predict_probs(net, draw(x, keys, policy, seed, v), n_classes)
    return (total / views).astype(np.float32)


def predict(
    net, x: np.ndarray, paths: list[str], n_classes: int, views: int, policy: str, seed: int, shift: str | None = None
) -> np.ndarray:
    """Evaluate's and predict's probabilities of ``x`` (decoded ``paths``): through ``--shift``
    and ``--tta`` when asked, else the plain prediction loop (no keys, no copies)."""
    if views == 1 and shift is None:
        from mpitrain.engine.predict import predict_probs

        return predict_probs(net, x, n_classes)
    keys = image_keys(paths)
    if shift is not None:
        x = shifted(x, keys, shift, seed)
    return predict_views(net, x, keys, n_classes, views, policy, seed)


def default_policy(info) -> str:
    """The policy a model's TTA views are drawn from unless ``--tta-augment`` says."""
    trained = (info.members or [info])[0].extra.get("augment")
    return trained if trained and trained != "none" else "xray"
