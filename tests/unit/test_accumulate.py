"""--accumulate K, in one process.

A step of K micro-batches of B rows is one step of K x B rows: the same update up to float
rounding for a softmax model, bit for bit for a model whose sums are exact, a short last
micro-batch and an empty batch included; the engine lays an epoch out in steps of K x B
rows and scales the rate by K as by ranks; a run resumed from a checkpoint ends bit-identical
to the uninterrupted one; a bad K is refused in one line.
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from blobs import blobs, tiny_model  # noqa: E402
from mpitrain.config import TrainConfig  # noqa: E402
from mpitrain.engine import Engine, InMemory, Options  # noqa: E402
from mpitrain.engine.checkpoint import list_checkpoints, read  # noqa: E402
from mpitrain.engine.steps import make_train_step  # noqa: E402
from mpitrain.errors import UserError  # noqa: E402
from mpitrain.parallel.comm import SingleComm  # noqa: E402


def _values(variables) -> list[np.ndarray]:
    return [np.array(v.numpy()) for v in variables]


def _one_step(model, x, y, micro, lr=0.5, loss_fn=None):
    """The weights and stats after one SGD step over all of (x, y), `micro` rows at a time."""
    opt = keras.optimizers.SGD(lr)
    opt.build(model.trainable_variables)
    step = make_train_step(model, opt, loss_fn=loss_fn, micro_batch=micro)
    stats, probs = step(x, y, np.ones(len(y), np.float32), np.float32(lr))
    return _values(model.trainable_variables), stats.numpy(), probs.numpy()


@pytest.mark.parametrize("rows", [16, 13])  # 13: a short last micro-batch
def test_k_micro_batches_make_the_update_of_one_batch_of_k_times_the_rows(rows):
    x, y = blobs(rows)
    whole = _one_step(tiny_model(seed=3), x, y, micro=0)
    parts = _one_step(tiny_model(seed=3), x, y, micro=4)
    start = _values(tiny_model(seed=3).trainable_variables)
    assert not np.allclose(whole[0][0], start[0])  # the step moved the weights
    for a, b in zip(parts[0], whole[0]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(parts[1], whole[1], rtol=1e-6)  # samples, loss sum, hits
    np.testing.assert_allclose(parts[2], whole[2], rtol=1e-6)  # every row's probabilities, in order
    assert parts[2].shape == (rows, 3)


def _linear():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(2, use_bias=False)])
    # Weights on a grid of 1/8: with the inputs below every product and sum is exact.
    model.set_weights([np.round(w * 8) / 8 for w in model.get_weights()])
    return model


def test_with_exact_sums_the_update_is_bit_identical():
    """A linear model and a loss linear in its outputs: every gradient is a sum of inputs on a
    grid of 1/4, exact in float32 whatever the grouping, so K micro-batches must give the very
    bits of one batch."""
    rng = np.random.default_rng(1)
    x = (rng.integers(0, 4, (12, 4, 4, 1)) / 4).astype(np.float32)
    y = rng.integers(0, 2, 12).astype(np.int32)

    def loss(y, out):  # sum of the outputs, signed by the label: linear, so exact gradients
        return keras.ops.sum(out, axis=-1) * (2.0 * keras.ops.cast(y, "float32") - 1.0)

    whole = _one_step(_linear(), x, y, micro=0, lr=0.25, loss_fn=loss)
    for micro in (5, 4, 1):
        parts = _one_step(_linear(), x, y, micro=micro, lr=0.25, loss_fn=loss)
        for a, b in zip(parts[0], whole[0]):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(whole[0][0], _values(_linear().trainable_variables)[0])


@pytest.mark.parametrize("batch_norm", [False, True])
def test_an_empty_batch_adds_nothing(batch_norm):
    keras.utils.set_random_seed(0)
    layers = [keras.layers.BatchNormalization()] if batch_norm else []
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), *layers, keras.layers.Flatten(), keras.layers.Dense(3, "softmax")]
    )
    before = _values(model.variables)
    weights, stats, probs = _one_step(model, *[a[:0] for a in blobs(4)], micro=4, lr=0.0)
    assert stats.tolist() == [0.0, 0.0, 0.0] and probs.shape == (0, 3)
    for a, b in zip(_values(model.variables), before):
        np.testing.assert_array_equal(a, b)


def _engine(run_dir=None, accumulate=2, batch=8, **kw):
    x, y = blobs(48)
    opts = Options(epochs=2, batch_size=batch, accumulate=accumulate, lr=0.1, lr_scaling="none", **kw)
    return Engine(
        tiny_model(seed=5),
        InMemory(x, y, x[:16], y[:16]),
        opts,
        SingleComm(),
        checkpoints=run_dir is not None,
        checkpoint_dir=run_dir,
        progress=False,
    )


def test_the_engine_steps_over_k_micro_batches_and_trains_as_the_bigger_batch():
    acc, big = _engine(accumulate=2, batch=8), _engine(accumulate=1, batch=16)
    assert acc.steps == big.steps == 3  # 48 rows in steps of 2 x 8
    acc.fit(), big.fit()
    for a, b in zip(_values(acc.model.trainable_variables), _values(big.model.trainable_variables)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert acc.history[-1]["loss"] == pytest.approx(big.history[-1]["loss"], rel=1e-5)


@pytest.mark.parametrize(("scaling", "factor"), [("linear", 4.0), ("sqrt", 2.0), ("none", 1.0)])
def test_the_rate_scales_with_the_micro_batches_as_with_ranks(scaling, factor):
    x, y = blobs(32)
    opts = Options(batch_size=4, accumulate=4, lr=0.01, lr_scaling=scaling, lr_schedule="constant")
    engine = Engine(tiny_model(), InMemory(x, y, x[:4], y[:4]), opts, SingleComm(), progress=False)
    assert engine.target_lr == pytest.approx(0.01 * factor)


def test_a_resumed_run_ends_bit_identical_to_the_uninterrupted_one(tmp_path):
    whole = _engine(tmp_path / "whole", checkpoint_every=1, keep_checkpoints=20)
    history = whole.fit().history
    names = [p.name for p in list_checkpoints(tmp_path / "whole")]
    name = "ckpt-e00001-s0000002.npz"  # epoch 2, after 2 of its 3 steps of 2 micro-batches
    assert name in names
    again = _engine(tmp_path / "again", checkpoint_every=1, keep_checkpoints=20)
    result = again.fit(read(tmp_path / "whole" / "checkpoints" / name), resuming=True)
    assert [r["loss"] for r in result.history] == [r["loss"] for r in history]
    for a, b in zip(_values(again.model.variables), _values(whole.model.variables)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_values(again.optimizer.variables), _values(whole.optimizer.variables)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("k", [0, -2, 1.5, True])
def test_a_bad_k_is_refused_by_the_config_the_engine_and_the_command(k, capsys):
    from mpitrain.cli import main

    for make in (TrainConfig, Options):
        with pytest.raises(UserError) as e:
            make(accumulate=k)
        assert str(e.value).startswith("--accumulate must be an integer >= 1") and "\n" not in str(e.value)
    if not isinstance(k, float | bool):
        assert main(["train", "--accumulate", str(k), "--epochs", "1"]) == 2
        assert capsys.readouterr().err.strip() == f"mpitrain: error: {e.value}"


def test_bench_times_k_micro_batches_per_step_and_the_no_sync_ceiling(capsys):
    import json

    from mpitrain.train.bench import bench_main

    for extra in ({"accumulate": 3}, {"no_sync": True}):
        assert bench_main("tiny", batch=4, steps=2, warmup=1, image_size=16, as_json=True, **extra) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["steps"] == 2 and result["accumulate"] == extra.get("accumulate", 1)
        images = 4 * extra.get("accumulate", 1) * 2  # (the seconds are rounded to ms: a loose check)
        assert result["images_per_second"] * result["seconds"] == pytest.approx(images, rel=0.3)
    assert result["strategy"] == "none (no exchange: the ceiling)" and result["comm_fraction"] == 0.0
