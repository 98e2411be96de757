"""Training-time augmentation: seeded by position only, identity when off, training only."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import mpitrain
from mpitrain.config import AUGMENTS
from mpitrain.data.augment import POLICIES, POLICY, Policy, augment_batch, batch_rng
from mpitrain.pixels import as_float


def _batch(n=6, side=16, dtype=np.uint8, top=255):
    """Smooth pictures (a diagonal ramp and a bright block) with a little noise."""
    rng = np.random.default_rng(11)
    ramp = np.add.outer(np.arange(side), np.arange(side)) / (2 * side - 2)
    x = 0.6 * ramp + 0.1 * rng.random((n, side, side))
    x[:, side // 4 : side // 2, side // 4 : 3 * side // 4] += 0.3
    return np.round(x * top).astype(dtype)


def test_policies_match_the_config_choices():
    assert tuple(POLICIES) == AUGMENTS == tuple(POLICY)


AUGMENTING = [p for p in POLICIES if p != "none"]


@pytest.mark.parametrize("policy", AUGMENTING)
def test_same_position_same_output_other_position_other_output(policy):
    x = _batch()
    a = augment_batch(x, 255.0, policy, seed=3, epoch=1, rank=0, step=5)
    b = augment_batch(x.copy(), 255.0, policy, seed=3, epoch=1, rank=0, step=5)
    assert np.array_equal(a, b)  # bit for bit: a resumed run draws the same
    for other in ({"step": 6}, {"epoch": 2}, {"rank": 1}, {"seed": 4}):
        args = {"seed": 3, "epoch": 1, "rank": 0, "step": 5, **other}
        assert not np.array_equal(a, augment_batch(x, 255.0, policy, **args)), other


def test_the_strong_policy_widens_every_range_of_the_mild_one():
    mild, strong = POLICY["xray"], POLICY["xray-strong"]
    assert strong.rotate_degrees > mild.rotate_degrees and strong.shift > mild.shift
    assert strong.brightness > mild.brightness
    for lo_hi in ("scale", "gamma", "contrast"):
        (a, b), (c, d) = getattr(mild, lo_hi), getattr(strong, lo_hi)
        assert c < a and d > b, lo_hi


@pytest.mark.parametrize("policy", AUGMENTING)
def test_output_is_model_input_and_changes_each_image(policy):
    x = _batch()
    a = augment_batch(x, 255.0, policy, 0, 0, 0, 0)
    assert a.dtype == np.float32 and a.shape == (6, 16, 16, 1)
    assert a.min() >= 0.0 and a.max() <= 1.0
    plain = as_float(x, 255.0)
    assert all(not np.array_equal(a[i], plain[i]) for i in range(len(x)))
    # ... but it is still the same picture: strongly correlated with the original
    for i in range(len(x)):
        assert np.corrcoef(a[i].ravel(), plain[i].ravel())[0, 1] > 0.3


def test_none_is_exactly_as_float():
    for x, top in ((_batch(), 255.0), (_batch(dtype=np.uint16, top=4095), 4095.0)):
        assert np.array_equal(augment_batch(x, top, "none", 1, 2, 3, 4), as_float(x, top))
    f = as_float(_batch(), 255.0)
    assert np.array_equal(augment_batch(f, 1.0, "none", 1, 2, 3, 4), f)
    empty = np.zeros((0, 16, 16), np.uint8)
    assert augment_batch(empty, 255.0, "xray", 0, 0, 0, 0).shape == (0, 16, 16, 1)


def test_uint8_uint16_and_float_rows_give_the_same_picture():
    """The 8-bit path folds gamma/contrast/brightness into a lookup table; other inputs
    compute them in float. Both must mean the same transformation."""
    x8 = _batch()
    f = as_float(x8, 255.0)
    photometric = Policy(gamma=(0.8, 1.25), contrast=(0.8, 1.2), brightness=0.08)
    a = augment_batch(x8, 255.0, photometric, 0, 0, 0, 7)
    b = augment_batch(f, 1.0, photometric, 0, 0, 0, 7)
    assert np.abs(a - b).max() < 1e-5
    geometric = Policy(rotate_degrees=10, scale=(0.9, 1.1), shift=0.06)
    a = augment_batch(x8, 255.0, geometric, 0, 0, 0, 7)
    b = augment_batch(f, 1.0, geometric, 0, 0, 0, 7)
    assert np.abs(a - b).max() <= 1.0 / 255 + 1e-6  # 8-bit warping rounds to whole levels
    x16 = x8.astype(np.uint16) * 16
    c = augment_batch(x16, 255.0 * 16, "xray", 0, 0, 0, 7)
    d = augment_batch(x8, 255.0, "xray", 0, 0, 0, 7)
    assert np.abs(c - d).max() < 2.0 / 255


def _laplacian(x):
    import cv2

    return np.array([np.abs(cv2.Laplacian(np.asarray(i, np.float32), cv2.CV_32F)).mean() for i in x])


def test_sharpness_blurs_and_sharpens_and_keeps_the_rows_dtype():
    from mpitrain.data.augment import _sharpness

    for x in (_batch(n=3), _batch(n=3, dtype=np.uint16, top=4095), as_float(_batch(n=3), 255.0)[..., 0]):
        s = np.array([0.6, -0.6, 1e-3])
        y = _sharpness(x, s)
        assert y.dtype == x.dtype and y.shape == x.shape
        before, after = _laplacian(x), _laplacian(y)
        assert after[0] < 0.8 * before[0] and after[1] > 1.2 * before[1]  # blurred, sharpened
        assert abs(after[2] - before[2]) < 0.01 * before[2]  # sigma ~0: the image as it was


def test_the_sharpness_policy_is_the_strong_one_plus_a_spread_of_sharpness():
    strong, sharp = POLICY["xray-strong"], POLICY["xray-sharpness"]
    assert sharp == Policy(**{**strong.__dict__, "blur": sharp.blur, "sharpen": sharp.sharpen})
    assert not strong.sharpness and sharp.blur > 0 and sharp.sharpen > 0
    x = np.repeat(_batch(n=1, side=32), 64, axis=0)  # one image, 64 draws
    plain = as_float(x, 255.0)[..., 0]
    # Without the photometric and geometric parts, only the sharpness changes the image:
    only = Policy(blur=sharp.blur, sharpen=sharp.sharpen)
    lap = _laplacian(augment_batch(x, 255.0, only, 0, 0, 0, 0)[..., 0]) / _laplacian(plain[:1])[0]
    assert lap.min() < 0.8 and lap.max() > 1.2  # some images blurred, some sharpened
    assert (lap < 1).mean() > 0.25 and (lap > 1).mean() > 0.25


def test_geometry_is_a_rotation_scale_and_shift_about_the_centre():
    """The drawn matrix is OpenCV's rotation about the image centre, then the shift."""
    import cv2

    from mpitrain.data.augment import affine_matrices

    p = POLICY["xray"]
    m = affine_matrices(batch_rng(0, 1, 2, 3), 4, 64, p)
    rng = batch_rng(0, 1, 2, 3)  # the same draws, in the documented order
    angle = rng.uniform(-p.rotate_degrees, p.rotate_degrees, 4)
    scale = np.exp(rng.uniform(np.log(p.scale[0]), np.log(p.scale[1]), 4))
    shift = rng.uniform(-p.shift, p.shift, (4, 2)) * 64
    for i in range(4):
        expect = cv2.getRotationMatrix2D((31.5, 31.5), angle[i], scale[i])
        expect[:, 2] += shift[i]
        assert np.allclose(m[i], expect, atol=1e-9)
    assert np.abs(angle).max() <= 10 and (np.abs(shift) <= 64 * 0.06).all()


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_only_the_training_loop_and_explicit_views_use_augmentation():
    """The validation pass never touches it: training, and evaluate/predict's --tta and
    --shift (evaluate/tta.py, off unless asked for) are the only callers."""
    pkg = Path(mpitrain.__file__).parent
    users = sorted(
        str(p.relative_to(pkg))
        for p in pkg.rglob("*.py")
        if p.name != "augment.py" and any(m == "mpitrain.data.augment" for m in _imports(p))
    )
    assert users == ["evaluate/tta.py", "train/fitting.py"]


@pytest.mark.timeout(300)
def test_training_batches_only_in_a_real_fit(monkeypatch):
    """Every training image is augmented once per epoch, with its position; validation never."""
    import mpitrain.data.augment as augment
    from mpitrain.config import TrainConfig
    from mpitrain.data.dataset import Plan, Shard
    from mpitrain.parallel.comm import world
    from mpitrain.runtime import configure_runtime
    from mpitrain.train.fitting import fit
    from mpitrain.train.models import build_model

    calls = []
    real = augment.augment_batch

    def spy(x, max_value, policy, seed, epoch, rank, step):
        calls.append((len(x), epoch, rank, step, float(np.asarray(x).max())))
        return real(x, max_value, policy, seed, epoch, rank, step)

    monkeypatch.setattr(augment, "augment_batch", spy)
    configure_runtime(0, 1, 1)
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 200, (21, 16, 16)).astype(np.uint8)  # never above 200
    val_x = np.full((6, 16, 16), 255, np.uint8)  # all 255: recognisable
    train_y, val_y = np.arange(21, dtype=np.int32) % 2, np.arange(6, dtype=np.int32) % 2
    cfg = TrainConfig(epochs=2, batch_size=8, model="xray", image_size=16, augment="xray", threads=1)
    plan = Plan("mem", ["a", "b"], [""] * 21, train_y, [""] * 6, val_y, "split")
    data = Shard(train_x, train_y, val_x, val_y, train_max=255.0, val_max=255.0)
    fit(cfg, world(), plan, data, build_model("xray", 16, 2), echo=lambda *_: None)
    assert sum(c[0] for c in calls) == 2 * 21
    assert [(c[1], c[3]) for c in calls] == [(e, s) for e in range(2) for s in range(3)]
    assert all(c[2] == 0 and c[4] <= 200 for c in calls)  # no validation image among them
