"""--adjust-prior (evaluate/prior.py): the EM of Saerens et al. recovers a known class mix."""

import numpy as np
import pytest

from mpitrain.errors import UserError
from mpitrain.evaluate.prior import adjust, loss_prior, model_prior


def _calibrated(n, prior, means, train_prior, seed=0):
    """Labels drawn with ``prior``, one Gaussian feature per class (sd 1), and the exact
    posteriors of a model trained for ``train_prior``: calibrated probabilities."""
    rng = np.random.default_rng(seed)
    y = rng.choice(len(prior), size=n, p=prior)
    x = rng.normal(np.asarray(means)[y], 1.0)
    lik = np.exp(-0.5 * (x[:, None] - np.asarray(means)[None, :]) ** 2)
    post = lik * np.asarray(train_prior)
    return y, (post / post.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(
    "train_prior, true_prior, means",
    [
        ([0.5, 0.5], [0.37, 0.63], [0.0, 2.0]),  # balanced weights, the test half's mix
        ([0.26, 0.74], [0.6, 0.4], [0.0, 1.5]),  # no weights, the mix the other way round
        ([1 / 3, 1 / 3, 1 / 3], [0.2, 0.5, 0.3], [0.0, 2.0, 4.0]),
    ],
)
def test_em_recovers_a_known_prior_from_predictions_alone(train_prior, true_prior, means):
    y, probs = _calibrated(40_000, true_prior, means, train_prior)
    got = adjust(probs, train_prior)
    assert got.converged and got.iterations > 1
    np.testing.assert_allclose(got.prior, true_prior, atol=0.015)
    np.testing.assert_allclose(got.probs.sum(axis=1), 1.0, atol=1e-5)
    # Deciding by the adjusted probabilities is more accurate on these images than before.
    before = (probs.argmax(axis=1) == y).mean()
    after = (got.probs.argmax(axis=1) == y).mean()
    assert after >= before


def test_when_the_mix_is_the_trained_one_little_changes():
    y, probs = _calibrated(40_000, [0.5, 0.5], [0.0, 2.0], [0.5, 0.5], seed=2)
    got = adjust(probs, [0.5, 0.5])
    np.testing.assert_allclose(got.prior, [0.5, 0.5], atol=0.015)
    assert (got.probs.argmax(axis=1) != probs.argmax(axis=1)).mean() < 0.02


def test_loss_prior_is_counts_times_weights():
    assert loss_prior([1341, 3875], [3875 / 1341, 1.0]) == [0.5, 0.5]
    assert loss_prior([1341, 3875], [1.0, 1.0]) == [round(1341 / 5216, 6), round(3875 / 5216, 6)]


class _Info:
    def __init__(self, classes, extra=None, threshold=None, method="argmax", positive=None):
        self.classes, self.extra, self.members = classes, extra or {}, []
        self.threshold, self.threshold_method, self.positive = threshold, method, positive


def test_model_prior_recorded_then_prior_threshold_then_counts_then_refused():
    recorded = _Info(["A", "B"], {"train_prior": {"A": 0.25, "B": 0.75}})
    assert model_prior(recorded)[0].tolist() == [0.25, 0.75]
    older = _Info(["NORMAL", "PNEUMONIA"], threshold=0.5, method="prior", positive=1)
    assert model_prior(older)[0].tolist() == [0.5, 0.5]
    counts = _Info(["A", "B", "C"], {"train_class_counts": {"A": 1, "B": 1, "C": 2}})
    assert model_prior(counts)[0].tolist() == [0.25, 0.25, 0.5]
    with pytest.raises(UserError, match="records no training class mix"):
        model_prior(_Info(["A", "B", "C"]))
