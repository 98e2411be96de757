"""The decision threshold: Youden's J and target sensitivity on hand-made data."""

import numpy as np
import pytest

from mpitrain.evaluate.threshold import (
    choose_for_classes,
    choose_threshold,
    describe,
    positive_index,
)


def _rates(y, s, t):
    called = s >= t
    return called[y == 1].mean(), 1.0 - called[y == 0].mean()


def test_youden_picks_the_point_with_the_largest_j():
    y = np.array([0, 0, 0, 1, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.35, 0.5, 0.6, 0.9])
    c = choose_threshold(y, s)
    # thresholds 0.9 / 0.6 / 0.5 / 0.35 / 0.3 give J = 1/3, 2/3, 5/12, 3/4, 1/2
    assert c.method == "youden" and c.threshold == 0.35
    assert (c.sensitivity, c.specificity) == (1.0, 0.75)
    assert _rates(y, s, c.threshold) == (1.0, 0.75)  # ">= threshold" reproduces them exactly


def test_youden_ties_go_to_the_more_sensitive_threshold():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    c = choose_threshold(y, s)  # J = 0.75 at 0.7 (sens 0.75, spec 1) and at 0.4 (sens 1, spec 0.75)
    assert c.threshold == 0.4 and c.sensitivity == 1.0 and c.specificity == 0.75


def test_target_sensitivity_keeps_the_target_with_the_best_specificity():
    # 20 positives at 0.05 .. 1.0; 10 negatives at 0.0, 0.1, ..., 0.9 (mixed in).
    pos = np.arange(1, 21) / 20.0
    neg = np.arange(10) / 10.0
    y = np.r_[np.ones(20), np.zeros(10)].astype(int)
    s = np.r_[pos, neg]
    c = choose_threshold(y, s, target_sensitivity=0.95)
    assert c.method == "target_sensitivity" and c.target_sensitivity == 0.95
    assert c.threshold == 0.1  # the 19th positive from the top is 0.10; one more negative would join below
    assert c.sensitivity == 0.95
    assert c.specificity == pytest.approx(0.1)  # only the negative at 0.0 stays below 0.1
    assert choose_threshold(y, s, target_sensitivity=1.0).threshold == 0.05


@pytest.mark.parametrize("seed", range(5))
def test_both_rules_agree_with_brute_force(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60) * 0.6 + 0.4 * y, 2)  # ties on purpose
    cands = np.unique(s)
    rates = {t: _rates(y, s, t) for t in cands}
    best_j = max(se + sp - 1 for se, sp in rates.values())
    c = choose_threshold(y, s)
    assert sum(_rates(y, s, c.threshold)) - 1 == pytest.approx(best_j)
    assert c.threshold == min(t for t, (se, sp) in rates.items() if abs(se + sp - 1 - best_j) < 1e-12)
    for target in (0.5, 0.8, 0.95, 1.0):
        c = choose_threshold(y, s, target_sensitivity=target)
        assert c.threshold == max(t for t, (se, _) in rates.items() if se >= target)
        assert c.sensitivity >= target


def test_no_threshold_without_both_classes_and_for_more_classes():
    c = choose_threshold(np.ones(5), np.linspace(0, 1, 5))
    assert c.threshold is None and "no negative" in c.reason
    assert "argmax" in describe(c, "PNEUMONIA")
    probs = np.full((4, 3), 1 / 3)
    c3 = choose_for_classes([0, 1, 2, 0], probs, ["a", "b", "c"])
    assert c3.threshold is None and c3.method == "argmax"
    with pytest.raises(ValueError):
        choose_threshold([0, 1], [0.2, 0.8], target_sensitivity=1.5)


def test_the_positive_class_is_the_finding():
    assert positive_index(["NORMAL", "PNEUMONIA"]) == 1
    assert positive_index(["PNEUMONIA", "normal"]) == 0
    assert positive_index(["Healthy", "tumour"]) == 1
    assert positive_index(["cat", "dog"]) == 1
    assert positive_index(["a", "b", "c"]) is None


def test_choose_for_classes_uses_the_positive_column():
    labels = np.array([0, 0, 1, 1])  # classes: PNEUMONIA = 0 is positive here
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45]])
    c = choose_for_classes(labels, probs, ["PNEUMONIA", "normal"])
    assert c.threshold == 0.6 and c.sensitivity == 1.0 and c.specificity == 1.0
    assert "P(PNEUMONIA)" in describe(c, "PNEUMONIA")


def test_prior_threshold_is_the_trained_with_odds_of_the_positive_class():
    from mpitrain.data.dataset import class_weights
    from mpitrain.evaluate.threshold import prior_threshold

    counts = np.array([1341, 3875])  # NORMAL, PNEUMONIA of the chest X-ray training folder
    # Balanced weights make both classes weigh the same in the loss: the point is 0.5 exactly.
    assert prior_threshold(counts, class_weights(counts, "balanced"), 1) == 0.5
    # Without weights the model learned the training prior: the point is the positive share.
    assert prior_threshold(counts, class_weights(counts, "none"), 1) == pytest.approx(3875 / 5216, abs=1e-6)
    assert prior_threshold(counts, class_weights(counts, "none"), 0) == pytest.approx(1341 / 5216, abs=1e-6)


def test_prior_policy_is_not_tuned_on_validation_but_measured_there():
    from mpitrain.data.dataset import class_weights

    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.45, 0.55], [0.6, 0.4], [0.2, 0.8], [0.1, 0.9]])
    counts = np.array([100, 300])
    for weighting, t in (("balanced", 0.5), ("none", 0.75)):
        c = choose_for_classes(
            labels,
            probs,
            ["NORMAL", "PNEUMONIA"],
            policy="prior",
            class_counts=counts,
            class_weights=class_weights(counts, weighting),
        )
        assert c.method == "prior" and c.threshold == pytest.approx(t)
        sens, spec = _rates(labels, probs[:, 1], c.threshold)
        assert (c.sensitivity, c.specificity) == pytest.approx((sens, spec))
        assert "not tuned on validation" in describe(c, "PNEUMONIA")
    # The same predictions pick another point under Youden (a tie of 0.4 and 0.8: the lower),
    # and a target sensitivity still overrides the policy.
    assert choose_for_classes(labels, probs, ["NORMAL", "PNEUMONIA"], policy="youden").threshold == 0.4
    c = choose_for_classes(
        labels,
        probs,
        ["NORMAL", "PNEUMONIA"],
        target_sensitivity=0.6,
        policy="prior",
        class_counts=counts,
        class_weights=class_weights(counts, "balanced"),
    )
    assert c.method == "target_sensitivity" and c.threshold == 0.8


def test_prior_policy_with_one_class_missing_from_validation_still_decides():
    from mpitrain.data.dataset import class_weights

    counts = np.array([10, 30])
    c = choose_for_classes(
        np.array([1, 1]),
        np.array([[0.3, 0.7], [0.6, 0.4]]),
        ["NORMAL", "PNEUMONIA"],
        policy="prior",
        class_counts=counts,
        class_weights=class_weights(counts, "balanced"),
    )
    assert c.threshold == 0.5 and c.sensitivity == 0.5 and c.specificity is None
    assert "specificity" not in describe(c, "PNEUMONIA")
