"""evaluate --merge-classes (evaluate/merged.py): a coarser model and the finer decision inside."""

import numpy as np
import pytest

from mpitrain.errors import UserError
from mpitrain.evaluate.merged import merge_metrics, merged_view, parse, text_lines

CLASSES = ["NORMAL", "bacteria", "virus"]


def test_merged_probabilities_sum_and_labels_follow():
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.6, 0.1, 0.3]], np.float32)
    names, p, y = merged_view(probs, np.array([0, 2, 1]), CLASSES, parse(["PNEUMONIA=bacteria,virus"], CLASSES))
    assert names == ["PNEUMONIA", "NORMAL"]
    np.testing.assert_allclose(p, [[0.5, 0.5], [0.9, 0.1], [0.4, 0.6]])
    assert y.tolist() == [1, 0, 0]


def test_merge_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array(
        [
            [0.8, 0.1, 0.1],  # NORMAL, right
            [0.3, 0.3, 0.4],  # NORMAL called pneumonia (0.7)
            [0.1, 0.6, 0.3],  # bacteria, right within
            [0.2, 0.3, 0.5],  # bacteria called virus within
            [0.1, 0.2, 0.7],  # virus, right
            [0.6, 0.3, 0.1],  # virus called NORMAL (pneumonia 0.4); within: bacteria
        ],
        np.float32,
    )
    (r,) = merge_metrics(probs, labels, CLASSES, parse(["PNEUMONIA=bacteria,virus"], CLASSES))
    m, w = r["merged"], r["within"]
    assert m["positive_class"] == "PNEUMONIA" and m["accuracy"] == pytest.approx(4 / 6)
    assert m["sensitivity"] == pytest.approx(3 / 4) and m["specificity"] == pytest.approx(1 / 2)
    assert w["n_samples"] == 4 and w["accuracy"] == pytest.approx(2 / 4)
    assert w["recall"] == {"bacteria": 0.5, "virus": 0.5}
    assert w["confusion_matrix"] == [[1, 1], [1, 1]]
    text = "\n".join(text_lines([r]))
    assert "merged PNEUMONIA = bacteria + virus" in text and "within PNEUMONIA (4 images): accuracy 0.5000" in text


@pytest.mark.parametrize(
    "specs, words",
    [
        (["PNEUMONIA"], "write NAME=CLASS,CLASS"),
        (["P=bacteria"], "two classes or more"),
        (["P=bacteria,fungus"], "no class 'fungus'"),
        (["P=bacteria,virus", "Q=virus,NORMAL"], "merged twice"),
        (["ALL=NORMAL,bacteria,virus"], "single class"),
        (["NORMAL=bacteria,virus"], "also a class name"),
    ],
)
def test_bad_merges_are_one_line_errors(specs, words):
    with pytest.raises(UserError, match=words):
        parse(specs, CLASSES)
