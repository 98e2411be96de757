"""Test-time augmentation and --shift (evaluate/tta.py): views are a function of the file's
name, the view and the seed, never of the batch, the order or the rank."""

import numpy as np
import pytest

from mpitrain.engine.predict import predict_probs
from mpitrain.errors import UserError
from mpitrain.evaluate import tta
from mpitrain.evaluate.command import Views


def _images(n=40, side=16, channels=1, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, side, side, channels)).astype(np.float32)


def _net(x):
    """A stand-in model: P(class 1) from the mean brightness of the left half."""
    x = np.asarray(x, np.float64)
    s = 1.0 / (1.0 + np.exp(-8.0 * (x[:, :, : x.shape[2] // 2].mean(axis=(1, 2, 3)) - 0.5)))
    return np.stack([1 - s, s], axis=1).astype(np.float32)


def _paths(n):
    return [f"/data/{'NORMAL' if i % 2 else 'PNEUMONIA'}/img-{i:03d}.png" for i in range(n)]


@pytest.mark.parametrize("channels", [1, 3])
def test_views_do_not_depend_on_order_batch_or_folder(channels):
    x, paths = _images(channels=channels), _paths(40)
    keys = tta.image_keys(paths)
    whole = tta.draw(x, keys, "xray-strong", seed=3, view=1)
    assert whole.shape == x.shape and whole.dtype == np.float32
    order = np.random.default_rng(1).permutation(40)
    shuffled = tta.draw(x[order], [keys[i] for i in order], "xray-strong", seed=3, view=1)
    assert np.array_equal(shuffled, whole[order])
    halves = [tta.draw(x[a:b], keys[a:b], "xray-strong", 3, 1) for a, b in ((0, 13), (13, 40))]
    assert np.array_equal(np.concatenate(halves), whole)
    moved = tta.image_keys([p.replace("/data/", "/copy/of/data/") for p in paths])
    assert moved == keys  # a copied folder draws alike: the key is the file's name


def test_views_differ_by_view_seed_stream_and_from_the_image():
    x, keys = _images(), tta.image_keys(_paths(40))
    v1 = tta.draw(x, keys, "xray", 0, 1)
    assert not np.allclose(v1, x)
    assert not np.allclose(v1, tta.draw(x, keys, "xray", 0, 2))
    assert not np.allclose(v1, tta.draw(x, keys, "xray", 1, 1))
    assert not np.allclose(tta.shifted(x, keys, "xray", 0), tta.draw(x, keys, "xray", 0, 0))
    assert np.array_equal(tta.draw(x, keys, "none", 0, 1), x)  # the identity policy is the image
    assert 0.0 <= v1.min() and v1.max() <= 1.0


def test_predict_views_is_the_mean_of_the_views_and_one_view_is_plain_prediction():
    x, keys = _images(), tta.image_keys(_paths(40))
    assert np.array_equal(tta.predict_views(_net, x, keys, 2, views=1), predict_probs(_net, x, 2))
    got = tta.predict_views(_net, x, keys, 2, views=4, policy="xray-strong", seed=5)
    views = [x] + [tta.draw(x, keys, "xray-strong", 5, v) for v in (1, 2, 3)]
    want = np.mean([predict_probs(_net, v, 2).astype(np.float64) for v in views], axis=0).astype(np.float32)
    assert np.array_equal(got, want)
    assert not np.array_equal(got, predict_probs(_net, x, 2))
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)


def test_default_policy_is_the_models_training_policy():
    class Info:
        members: list = []

        def __init__(self, augment):
            self.extra = {} if augment is None else {"augment": augment}

    assert tta.default_policy(Info("xray-strong")) == "xray-strong"
    assert tta.default_policy(Info("none")) == "xray"  # no training policy: the mild one
    assert tta.default_policy(Info(None)) == "xray"  # an older run


@pytest.mark.parametrize(
    "views, words",
    [
        (Views(tta=0), "--tta must be 1"),
        (Views(tta_augment="flip"), "--tta-augment must be one of"),
        (Views(shift="wobble"), "--shift must be one of"),
    ],
)
def test_bad_views_are_one_line_errors(views, words):
    with pytest.raises(UserError, match=words):
        views.check()
