"""Tests for mpitrain.engine.metrics against hand-computed values and brute-force definitions."""

import json
import math

import numpy as np
import pytest

from mpitrain.engine.metrics import (
    classification_metrics,
    confusion_matrix,
    pr_auc,
    roc_auc,
    roc_curve,
)


def brute_auc(y, s):
    """P(score of a random positive > score of a random negative), ties count 1/2."""
    pos, neg = s[y == 1], s[y == 0]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def brute_ap(y, s):
    """Average precision: mean over positives of precision at that positive's score."""
    precisions = []
    for t in s[y == 1]:
        predicted = s >= t
        precisions.append(np.sum(predicted & (y == 1)) / np.sum(predicted))
    return float(np.mean(precisions))


def test_roc_auc_matches_pairwise_counting_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            y[0] = 1 - y[0]
        s = rng.integers(0, 5, n) / 4.0  # few distinct values: many ties
        assert roc_auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)
        assert pr_auc(y, s) == pytest.approx(brute_ap(y, s), abs=1e-12)


def test_roc_auc_hand_example_and_extremes():
    y = np.array([0, 0, 1, 1])
    # Pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3/4.
    assert roc_auc(y, [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert roc_auc([True, False], [0.7, 0.2]) == 1.0


def test_one_class_gives_nan():
    assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.5, 0.9]))
    assert math.isnan(roc_auc([0, 0], [0.1, 0.5]))
    assert math.isnan(pr_auc([0, 0], [0.1, 0.5]))
    assert pr_auc([1, 1], [0.1, 0.5]) == 1.0


def test_roc_curve_points_and_trapezoid_area():
    y = np.array([0, 0, 1, 1])
    fpr, tpr, thr = roc_curve(y, [0.1, 0.4, 0.35, 0.8])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])
    rng = np.random.default_rng(1)
    y, s = rng.integers(0, 2, 50), rng.integers(0, 7, 50).astype(float)
    fpr, tpr, _ = roc_curve(y, s)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(roc_auc(y, s))
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_pr_auc_hand_example():
    # Ranked: 0.8 (pos) P=1 R=.5; 0.4 (neg); 0.35 (pos) P=2/3 R=1 -> AP = .5*1 + .5*2/3.
    assert pr_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.5 + 1 / 3)


def test_bad_binary_inputs():
    with pytest.raises(ValueError):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError):
        roc_auc([0, 1, 1], [0.1, 0.2])


def test_confusion_matrix_three_classes():
    cm = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    assert cm.dtype == np.int64
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1], 3)


def one_hot_probs(pred, k, p=0.8):
    probs = np.full((len(pred), k), (1 - p) / (k - 1))
    probs[np.arange(len(pred)), pred] = p
    return probs


def test_binary_metrics_by_hand():
    y = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    p1 = np.array([0.1, 0.6, 0.3, 0.9, 0.4, 0.7, 0.8, 0.2])
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(y, probs, ["NORMAL", "PNEUMONIA"])
    # argmax predicts [0,1,0,1,0,1,1,0]: tp=3 fp=1 fn=1 tn=3
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy"] == pytest.approx(3 / 4)
    assert m["roc_auc"] == pytest.approx(brute_auc(y, p1))
    assert m["pr_auc"] == pytest.approx(brute_ap(y, p1))
    assert m["n_samples"] == 8
    assert m["per_class_counts"] == {"NORMAL": 4, "PNEUMONIA": 4}
    assert m["threshold"] is None and m["positive_class"] == "PNEUMONIA"
    json.dumps(m, allow_nan=False)


def test_threshold_changes_predictions():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.2, 0.45, 0.3, 0.9])
    probs = np.stack([1 - p1, p1], axis=1)
    low = classification_metrics(y, probs, ["N", "P"], threshold=0.25)
    # predicts [0,1,1,1]: tp=2 fp=1 tn=1 fn=0
    assert low["confusion_matrix"] == [[1, 1], [0, 2]]
    assert low["recall"] == 1.0 and low["specificity"] == 0.5
    assert low["precision"] == pytest.approx(2 / 3) and low["threshold"] == 0.25
    high = classification_metrics(y, probs, ["N", "P"], threshold=0.95)
    assert high["confusion_matrix"] == [[2, 0], [2, 0]]
    assert high["precision"] is None and high["f1"] == 0.0 and high["recall"] == 0.0
    assert high["roc_auc"] == low["roc_auc"]  # ranking metrics ignore the threshold


def test_positive_index_zero():
    y = np.array([0, 0, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]])
    m = classification_metrics(y, probs, ["SICK", "OK"], positive=0)
    # positive = class 0: tp=1 (row 0), fn=1 (row 1), tn=1
    assert m["positive_class"] == "SICK"
    assert m["recall"] == 0.5 and m["precision"] == 1.0 and m["specificity"] == 1.0
    assert m["roc_auc"] == 1.0


def test_perfect_inverted_and_one_class():
    y = np.array([0, 1, 0, 1])
    perfect = one_hot_probs(y, 2, 0.9)
    assert classification_metrics(y, perfect, ["a", "b"])["roc_auc"] == 1.0
    inverted = one_hot_probs(1 - y, 2, 0.9)
    m = classification_metrics(y, inverted, ["a", "b"])
    assert m["roc_auc"] == 0.0 and m["accuracy"] == 0.0
    only = classification_metrics(np.ones(3, int), one_hot_probs([1, 0, 1], 2), ["a", "b"])
    assert only["roc_auc"] is None and only["specificity"] is None
    assert only["balanced_accuracy"] == pytest.approx(2 / 3)
    json.dumps(only, allow_nan=False)


def test_multiclass_macro_micro_by_hand():
    y = np.array([0, 0, 1, 2, 2, 2])
    pred = np.array([0, 1, 1, 2, 0, 2])
    m = classification_metrics(y, one_hot_probs(pred, 3), ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    # precision a=1/2 b=1/2 c=1; recall a=1/2 b=1 c=2/3; f1 a=1/2 b=2/3 c=4/5
    pc = m["per_class"]
    assert [pc[c]["precision"] for c in "abc"] == pytest.approx([0.5, 0.5, 1.0])
    assert [pc[c]["recall"] for c in "abc"] == pytest.approx([0.5, 1.0, 2 / 3])
    assert [pc[c]["f1"] for c in "abc"] == pytest.approx([0.5, 2 / 3, 0.8])
    assert m["macro_precision"] == pytest.approx(2 / 3)
    assert m["macro_recall"] == pytest.approx((0.5 + 1 + 2 / 3) / 3)
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    assert m["micro_precision"] == m["micro_recall"] == m["micro_f1"] == pytest.approx(4 / 6)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx(m["macro_recall"])
    assert m["per_class_counts"] == {"a": 2, "b": 1, "c": 3}
    assert "specificity" not in m and m["positive_class"] is None
    json.dumps(m, allow_nan=False)


def test_multiclass_ovr_auc_and_undefined_class():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 60)
    probs = rng.dirichlet(np.ones(3), 60)
    m = classification_metrics(y, probs, ["a", "b", "c"])
    expected = np.mean([brute_auc((y == i).astype(int), probs[:, i]) for i in range(3)])
    assert m["roc_auc"] == pytest.approx(expected)
    # Class "c" never occurs and is never predicted: its ratios are None, not crashes.
    y2, pred2 = np.array([0, 1, 1]), np.array([0, 1, 0])
    m2 = classification_metrics(y2, one_hot_probs(pred2, 3), ["a", "b", "c"])
    assert m2["per_class"]["c"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert m2["macro_recall"] == pytest.approx(0.75)
    json.dumps(m2, allow_nan=False)
    with pytest.raises(ValueError):
        classification_metrics(y2, one_hot_probs(pred2, 3), ["a", "b", "c"], threshold=0.5)


def test_an_absent_class_is_named_and_left_out_of_every_macro_average():
    # A 3-class model on data without class "c"; one image is (wrongly) called "c".
    y, pred = np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1])
    m = classification_metrics(y, one_hot_probs(pred, 3), ["a", "b", "c"])
    assert m["absent_classes"] == ["c"]
    assert m["per_class"]["c"]["precision"] == 0.0  # defined, but not averaged: c has no images
    assert m["macro_precision"] == pytest.approx(1.0)  # a 1/1, b 2/2
    assert m["macro_recall"] == m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["accuracy"] == m["micro_precision"] == pytest.approx(3 / 4)  # the "c" call is still an error
    assert classification_metrics(y, one_hot_probs(y, 3), ["a", "b", "c"])["absent_classes"] == ["c"]
    assert classification_metrics(y, one_hot_probs(y, 2), ["a", "b"])["absent_classes"] == []


def test_one_hot_labels_and_shape_errors():
    y = np.array([0, 1, 1])
    probs = one_hot_probs([0, 1, 0], 2)
    assert classification_metrics(np.eye(2)[y], probs, ["a", "b"]) == classification_metrics(y, probs, ["a", "b"])
    with pytest.raises(ValueError):
        classification_metrics(y, probs, ["a", "b", "c"])
    with pytest.raises(ValueError):
        classification_metrics(y[:2], probs, ["a", "b"])


def test_empty_input():
    m = classification_metrics(np.zeros(0, int), np.zeros((0, 2)), ["a", "b"])
    assert m["n_samples"] == 0 and m["accuracy"] is None and m["roc_auc"] is None
    json.dumps(m, allow_nan=False)
