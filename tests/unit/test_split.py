"""Stratified, seeded train/validation split."""

from __future__ import annotations

import numpy as np
import pytest

from mpitrain.data.split import stratified_split, val_count
from mpitrain.errors import UserError


def _labels():
    rng = np.random.default_rng(3)
    return rng.permutation(np.repeat([0, 1, 2, 3], [100, 30, 3, 1])).astype(np.int64)


def test_per_class_proportions():
    labels = _labels()
    tr, va = stratified_split(labels, 0.2, seed=1)
    assert np.bincount(labels[va], minlength=4).tolist() == [20, 6, 1, 0]
    assert np.bincount(labels[tr], minlength=4).tolist() == [80, 24, 2, 1]


def test_indices_sorted_disjoint_complete():
    labels = _labels()
    tr, va = stratified_split(labels, 0.25, seed=7)
    assert tr.dtype == va.dtype == np.int64
    assert (np.diff(tr) > 0).all() and (np.diff(va) > 0).all()
    assert not set(tr) & set(va)
    assert sorted([*tr, *va]) == list(range(len(labels)))


def test_small_classes_keep_one_on_each_side():
    assert val_count(2, 0.01) == 1  # at least 1 in validation
    assert val_count(2, 0.9) == 1  # at least 1 left for training
    assert val_count(1, 0.5) == 0  # a single image stays in training
    assert val_count(10, 0.25) == 3  # 2.5 rounds half up
    assert val_count(10, 0.0) == 0


def test_deterministic_and_seed_dependent():
    labels = _labels()
    a = stratified_split(labels, 0.2, seed=42)
    b = stratified_split(labels.copy(), 0.2, seed=42)
    c = stratified_split(labels, 0.2, seed=43)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])


def test_zero_fraction_gives_empty_validation():
    tr, va = stratified_split(np.array([0, 1, 1, 0]), 0.0, seed=0)
    assert tr.tolist() == [0, 1, 2, 3] and va.size == 0 and va.dtype == np.int64


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan"), "x", None])
def test_bad_fraction_is_a_user_error(bad):
    with pytest.raises(UserError, match="validation fraction"):
        stratified_split(np.array([0, 1]), bad, seed=0)
