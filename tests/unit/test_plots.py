"""The figures: valid PNGs of a sensible size, for two and more classes, odd histories too."""

import numpy as np

from mpitrain.engine.metrics import classification_metrics
from mpitrain.evaluate import plots

PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    import matplotlib.image

    data = path.read_bytes()
    assert data.startswith(PNG), path
    img = matplotlib.image.imread(path)
    return img.shape[1], img.shape[0]  # width, height


def _binary(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p1 = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0, 1)
    return y, np.c_[1 - p1, p1].astype(np.float32)


def test_the_binary_figures_and_the_training_curves(tmp_path):
    y, probs = _binary()
    m = classification_metrics(y, probs, ["NORMAL", "PNEUMONIA"], threshold=0.5)
    history = [
        {
            "epoch": e,
            "loss": 1 / e,
            "accuracy": 0.5 + 0.1 * e,
            "auc": None if e == 1 else 0.6 + 0.05 * e,
            "val_loss": 1.1 / e,
            "val_accuracy": 0.5 + 0.08 * e,
            "val_auc": "",
            "lr": 1e-3,
        }
        for e in range(1, 5)
    ]
    made = plots.write_all(tmp_path, y, probs, m, history)
    assert made == {
        "training_curves": "training_curves.png",
        "confusion_matrix": "confusion_matrix.png",
        "roc_curve": "roc_curve.png",
    }
    w, h = _png_size(tmp_path / "training_curves.png")
    assert w > 2.5 * h and w >= 1000  # three panels side by side, readable
    for name in ("confusion_matrix.png", "roc_curve.png"):
        w, h = _png_size(tmp_path / name)
        assert 400 <= w <= 1200 and 400 <= h <= 1200
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_more_classes_a_single_epoch_and_a_missing_class(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 90)
    probs = rng.dirichlet(np.ones(3), 90).astype(np.float32)
    m = classification_metrics(y, probs, ["a", "b", "c"])
    made = plots.write_all(tmp_path / "three", y, probs, m, [{"epoch": 1, "loss": 0.7, "val_loss": 0.69}])
    for name in made.values():
        _png_size(tmp_path / "three" / name)
    # Validation data with one class only: no ROC curve can be drawn, but the files exist.
    y1 = np.ones(10, int)
    p1 = np.tile([0.3, 0.7], (10, 1))
    m1 = classification_metrics(y1, p1, ["NORMAL", "PNEUMONIA"])
    made = plots.write_all(tmp_path / "one", y1, p1, m1)
    assert set(made) == {"confusion_matrix", "roc_curve"}
    for name in made.values():
        _png_size(tmp_path / "one" / name)


def test_training_curves_say_which_accuracy_and_how_each_series_is_measured():
    from matplotlib.text import Text

    history = [
        {
            "epoch": e,
            "loss": 1 / e,
            "accuracy": 0.6,
            "auc": 0.55,
            "val_loss": 0.9 / e,
            "val_accuracy": 0.9,
            "val_auc": 0.98,
        }
        for e in (1, 2)
    ]
    fig = plots.curves_figure(history)
    texts = " | ".join(t.get_text() for t in fig.findobj(Text))
    assert "Accuracy (argmax)" in texts and "accuracy (argmax)" in texts  # title and axis label
    assert "train (running mean over the epoch)" in texts and "validation (at the epoch's end)" in texts
    assert plots.CURVES_NOTE in texts  # the one line under the panels
    assert "not at the decision threshold" in plots.CURVES_NOTE
