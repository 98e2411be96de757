"""--mixup ALPHA, in one process.

The mixed batch is the formula's for given draws; the draws are a function of the batch's
position alone (and not augmentation's); the training loss is the hand-computed mixed,
class-weighted, smoothed cross-entropy while val_loss stays plain; a resumed run ends
bit-identical to the uninterrupted one; the refusals are one line.
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import mpitrain  # noqa: E402
from blobs import blobs, tiny_model  # noqa: E402
from mpitrain.config import TrainConfig  # noqa: E402
from mpitrain.data.augment import batch_rng as augment_rng  # noqa: E402
from mpitrain.engine import Engine, InMemory, Options  # noqa: E402
from mpitrain.engine.checkpoint import list_checkpoints, read  # noqa: E402
from mpitrain.engine.mixup import draws, mix  # noqa: E402
from mpitrain.errors import UserError  # noqa: E402
from mpitrain.parallel.comm import SingleComm  # noqa: E402
from mpitrain.shards import epoch_order  # noqa: E402


def _model(seed=0, compiled=None):
    return tiny_model(seed=seed, compiled=compiled)


def _blobs(n=48, seed=0):
    return blobs(n, seed=seed)


def test_the_mixed_batch_is_the_formula_for_given_draws():
    x, y = _blobs(4)
    class_w = np.array([1.0, 2.0, 0.5], np.float32)
    lam = np.array([0.5, 0.2, 0.9, 0.0], np.float32)
    perm = np.array([2, 0, 3, 1])
    m = mix(x, y, class_w, lam, perm)
    for i, j in enumerate(perm):
        np.testing.assert_allclose(m.x[i], lam[i] * x[i] + (1 - lam[i]) * x[j], rtol=1e-6)
        expected = lam[i] * np.eye(3)[y[i]] + (1 - lam[i]) * np.eye(3)[y[j]]
        np.testing.assert_allclose(m.target[i], expected, rtol=1e-6)
        assert m.weight[i] == pytest.approx(lam[i] * class_w[y[i]] + (1 - lam[i]) * class_w[y[j]], rel=1e-6)
        assert m.label[i] == (y[i] if lam[i] >= 0.5 else y[j])  # the dominant label; a tie keeps the image's own
    assert m.x.dtype == m.target.dtype == m.weight.dtype == np.float32 and m.label.dtype == np.int32
    empty = mix(x[:0], y[:0], class_w, *draws(0.4, 0, 0, 0, 0, 0))  # a rank whose shard has run out
    assert empty.x.shape == (0, 8, 8, 1) and empty.target.shape == (0, 3)


def test_the_draws_are_a_function_of_the_position_alone():
    first = draws(0.4, 16, 7, 1, 2, 3)
    again = draws(0.4, 16, 7, 1, 2, 3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    lam, perm = first
    assert lam.dtype == np.float32 and ((lam >= 0) & (lam <= 1)).all()
    assert sorted(perm) == list(range(16))
    for other in [(8, 1, 2, 3), (7, 2, 2, 3), (7, 1, 3, 3), (7, 1, 2, 4)]:  # seed, epoch, rank, step
        assert not np.array_equal(draws(0.4, 16, *other)[0], lam)
    # Not augmentation's generator at the same position.
    assert not np.array_equal(augment_rng(7, 1, 2, 3).beta(0.4, 0.4, 16).astype(np.float32), lam)
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
    many = draws(0.4, 20000, 0, 0, 0, 0)[0].astype(np.float64)
    assert many.mean() == pytest.approx(0.5, abs=0.01)
    assert many.var() == pytest.approx(1 / (4 * 1.8), rel=0.03)


def _cross_entropy(probs: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy of probabilities against target distributions (Keras' clipping)."""
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    return -(target * np.log(p)).sum(1)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_the_training_loss_is_the_mixed_weighted_cross_entropy_and_val_loss_stays_plain(eps):
    x, y = _blobs(24)
    vx, vy = _blobs(12, seed=1)
    class_w = np.array([1.0, 2.0, 0.5], np.float32)
    alpha, seed = 0.4, 3
    # One step of the whole set: its loss is at the starting weights, on the batch in the epoch's order.
    batch = epoch_order(24, seed, 0, 0)
    xb, yb = x[batch], y[batch]
    lam, perm = draws(alpha, 24, seed, 0, 0, 0)
    lam64 = lam.astype(np.float64)[:, None]
    mixed = lam64[..., None, None] * xb + (1 - lam64[..., None, None]) * xb[perm]
    target = lam64 * np.eye(3)[yb] + (1 - lam64) * np.eye(3)[yb[perm]]
    weight = lam64[:, 0] * class_w[yb] + (1 - lam64[:, 0]) * class_w[yb[perm]]
    start = np.asarray(_model()(mixed.astype(np.float32)))
    expected = (weight * _cross_entropy(start, target * (1 - eps) + eps / 3)).sum() / 24
    dominant = np.where(lam >= 0.5, yb, yb[perm])

    opts = Options(epochs=1, batch_size=24, lr=0.1, mixup=alpha, label_smoothing=eps, seed=seed)
    engine = Engine(_model(), InMemory(x, y, vx, vy), opts, SingleComm(), class_weight=class_w, progress=False)
    result = engine.fit()
    row = result.history[0]
    assert row["loss"] == pytest.approx(expected, rel=1e-5)
    assert row["accuracy"] == pytest.approx(float((start.argmax(1) == dominant).mean()))
    plain = _cross_entropy(result.val_probs, np.eye(3)[result.val_labels]).mean()
    assert row["val_loss"] == pytest.approx(plain, rel=1e-5)  # never mixed, smoothed nor weighted


def _engine(run_dir, mixup=0.4):
    x, y = _blobs()
    opts = Options(epochs=2, batch_size=16, lr=0.1, mixup=mixup, checkpoint_every=1, keep_checkpoints=20)
    data = InMemory(x, y, x[:16], y[:16])
    return Engine(
        _model(seed=5),
        data,
        opts,
        SingleComm(),
        class_weight=np.array([1.0, 2.0, 0.5], np.float32),
        checkpoints=True,
        checkpoint_dir=run_dir,
        progress=False,
    )


def _untimed(history: list[dict], partial: int | None = None) -> list[dict]:
    """The rows less their timings; and for epoch `partial`, resumed mid-way, less the training
    AUC and balanced accuracy, which cover only its steps after the checkpoint (engine/loop.py)."""
    drop = {"seconds", "images_per_second"}
    return [
        {
            k: v
            for k, v in row.items()
            if k not in drop and not (row["epoch"] == partial and k in ("auc", "balanced_accuracy"))
        }
        for row in history
    ]


def _values(variables) -> list[np.ndarray]:
    return [np.array(v.numpy()) for v in variables]


def test_a_resumed_run_ends_bit_identical_to_the_uninterrupted_one(tmp_path):
    whole = _engine(tmp_path / "whole")
    history = whole.fit().history
    plain = _engine(tmp_path / "plain", mixup=0.0).fit().history
    assert history[0]["loss"] != pytest.approx(plain[0]["loss"], rel=1e-3)  # the batches were mixed
    names = [p.name for p in list_checkpoints(tmp_path / "whole")]
    for name, partial in (
        ("ckpt-e00001-s0000001.npz", 2),
        ("ckpt-e00001-s0000000.npz", None),
    ):  # mid-epoch 2, the end of epoch 1
        assert name in names
        again = _engine(tmp_path / name[:-4])
        result = again.fit(read(tmp_path / "whole" / "checkpoints" / name), resuming=True)
        assert _untimed(result.history, partial) == _untimed(history, partial)
        for a, b in zip(_values(again.model.variables), _values(whole.model.variables)):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(_values(again.optimizer.variables), _values(whole.optimizer.variables)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("alpha", [-0.1, float("nan"), float("inf")])
def test_a_bad_alpha_is_refused_by_the_config_the_engine_and_the_command(alpha, capsys):
    from mpitrain.cli import main

    for make in (TrainConfig, Options):
        with pytest.raises(UserError) as e:
            make(mixup=alpha)
        assert str(e.value).startswith("--mixup must be a number >= 0") and "\n" not in str(e.value)
    assert main(["train", "--mixup", str(alpha), "--epochs", "1"]) == 2
    assert capsys.readouterr().err.strip() == f"mpitrain: error: {e.value}"


def test_a_model_with_its_own_loss_is_refused():
    x, y = _blobs(16)
    model = _model(compiled={"loss": "sparse_categorical_crossentropy"})
    with pytest.raises(UserError, match="--mixup trains mpitrain's cross-entropy against mixed labels") as e:
        mpitrain.fit(model, x, y, mixup=0.2, progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_the_soft_target_step_scores_hits_on_y_and_takes_an_empty_batch(batch_norm):
    from mpitrain.engine.steps import make_train_step, soft_loss

    keras.utils.set_random_seed(0)
    layers = [keras.layers.BatchNormalization()] if batch_norm else []
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), *layers, keras.layers.Flatten(), keras.layers.Dense(3, "softmax")]
    )
    opt = keras.optimizers.SGD(0.0)
    opt.build(model.trainable_variables)
    step = make_train_step(model, opt, loss_fn=soft_loss(), soft_targets=True)
    x, y = _blobs(6)
    target = np.full((6, 3), 1 / 3, np.float32)
    stats, probs = step(x, y, np.ones(6, np.float32), np.float32(0.0), target)
    stats, probs = np.asarray(stats), np.asarray(probs)
    assert stats[0] == 6 and stats[2] == (probs.argmax(1) == y).sum()
    assert stats[1] == pytest.approx(_cross_entropy(probs, target).sum(), rel=1e-5)  # against the targets
    stats, probs = step(x[:0], y[:0], np.zeros(0, np.float32), np.float32(0.0), target[:0])
    assert np.asarray(stats).tolist() == [0.0, 0.0, 0.0] and probs.shape[0] == 0
