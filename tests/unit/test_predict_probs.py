"""The one prediction loop (evaluate, predict, the trainer's validation): fixed batch shape."""

import numpy as np
import pytest

from mpitrain.evaluate.modelio import BATCH, predict_probs


class FakeModel:
    """Probabilities from each row's mean; records the shape of every call."""

    def __init__(self):
        self.shapes = []

    def __call__(self, batch):
        assert batch.dtype == np.float32
        self.shapes.append(batch.shape)
        m = batch.reshape(len(batch), -1).mean(axis=1)
        return np.stack([1 - m, m], axis=1)


@pytest.mark.parametrize("n", [0, 1, BATCH - 1, BATCH, BATCH + 1, 3 * BATCH + 5])
def test_every_call_has_the_same_shape_and_rows_come_back_in_order(n):
    rng = np.random.default_rng(n)
    x = rng.integers(0, 256, (n, 4, 4), dtype=np.uint8)
    model = FakeModel()
    got = predict_probs(model, x, 2, convert=lambda c: (c / 255.0).astype(np.float32)[..., None])
    assert got.shape == (n, 2) and got.dtype == np.float32
    assert set(model.shapes) <= {(BATCH, 4, 4, 1)} and len(model.shapes) == -(-n // BATCH)
    want = (x.reshape(n, -1) / 255.0).astype(np.float32).mean(axis=1) if n else np.zeros(0)
    np.testing.assert_allclose(got[:, 1], want, rtol=1e-6)


def test_a_row_does_not_depend_on_the_rows_predicted_with_it():
    x = np.random.default_rng(0).random((50, 3, 3, 1), dtype=np.float32)
    model = FakeModel()
    whole = predict_probs(model, x, 2)
    parts = np.concatenate([predict_probs(model, x[:7], 2), predict_probs(model, x[7:], 2)])
    assert np.array_equal(whole, parts)


def test_the_trainer_validates_with_it():
    # One loop: the old per-caller loop in train/steps.py is gone, the trainer imports this one.
    import mpitrain.engine.loop as trainer
    import mpitrain.engine.steps as steps

    assert trainer.predict_probs is predict_probs
    assert not hasattr(steps, "predict_all")
