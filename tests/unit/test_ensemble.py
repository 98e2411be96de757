"""Ensembles: which runs can be averaged, and the one threshold they decide with."""

import json

import numpy as np
import pytest

from mpitrain.errors import UserError
from mpitrain.evaluate import ensemble, valpreds
from mpitrain.evaluate.threshold import choose_threshold

CLASSES = ["NORMAL", "PNEUMONIA"]


def fake_run(folder, threshold=0.5, method="prior", classes=CLASSES, size=64, val=None, **extra):
    """A run folder as far as metadata goes (model.keras is not loaded by read_info)."""
    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(b"")
    doc = {
        "format": 1,
        "classes": classes,
        "image_size": size,
        "threshold": threshold,
        "threshold_method": method,
        **extra,
    }
    (folder / "model.json").write_text(json.dumps(doc))
    if val is not None:
        paths, labels, probs = val
        valpreds.write(folder, paths, labels, probs, classes)
    return folder


def test_one_model_is_read_as_before(tmp_path):
    info = ensemble.read_info([str(fake_run(tmp_path / "a", threshold=0.3))])
    assert not info.members and info.threshold == 0.3 and info.label.endswith("model.keras")


def test_prior_members_decide_at_the_mean_of_their_points(tmp_path):
    a, b = fake_run(tmp_path / "a", 0.5), fake_run(tmp_path / "b", 0.6)
    info = ensemble.read_info([str(a), str(b)])
    assert len(info.members) == 2 and info.threshold_method == "prior"
    assert info.threshold == pytest.approx(0.55)
    assert "ensemble of 2" in info.label


def test_validation_chosen_thresholds_are_chosen_again_on_the_averaged_validation(tmp_path):
    rng = np.random.default_rng(0)
    paths = [f"/d/{i}.png" for i in range(40)]
    labels = np.r_[np.zeros(20, int), np.ones(20, int)]
    runs, probs = [], []
    for name in "abc":
        p1 = np.clip(labels * 0.4 + rng.uniform(0, 0.6, 40), 0, 1).astype(np.float32)
        probs.append(np.c_[1 - p1, p1].astype(np.float32))
        runs.append(str(fake_run(tmp_path / name, 0.9, "youden", val=(paths, labels, probs[-1]))))
    info = ensemble.read_info(runs)
    mean = np.mean([p.astype(np.float64) for p in probs], axis=0).astype(np.float32)
    want = choose_threshold(labels == 1, mean[:, 1].astype(np.float64))
    assert info.threshold_method == "youden" and info.threshold == want.threshold
    assert info.threshold != 0.9  # not any member's own point


def test_runs_validated_on_different_images_need_an_explicit_threshold(tmp_path):
    labels, p = np.array([0, 1]), np.array([[0.8, 0.2], [0.3, 0.7]], np.float32)
    a = fake_run(tmp_path / "a", 0.4, "youden", val=(["/d/1.png", "/d/2.png"], labels, p))
    b = fake_run(tmp_path / "b", 0.4, "youden", val=(["/d/1.png", "/d/3.png"], labels, p))
    with pytest.raises(UserError, match="validated on different images.*--split-seed"):
        ensemble.read_info([str(a), str(b)])
    # With --threshold given nothing needs choosing.
    assert ensemble.read_info([str(a), str(b)], need_threshold=False).threshold is None
    old = fake_run(tmp_path / "old", 0.4, "youden")  # no val_predictions.csv
    with pytest.raises(UserError, match="no val_predictions.csv"):
        ensemble.read_info([str(a), str(old)])


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(classes=["NORMAL", "VIRAL"]), "different classes"),
        (dict(size=96), "different image sizes"),
        (dict(method="youden"), "chose their thresholds differently"),
    ],
)
def test_runs_that_cannot_be_averaged_are_refused_in_one_line(tmp_path, change, words):
    a = fake_run(tmp_path / "a")
    b = fake_run(tmp_path / "b", **change)
    with pytest.raises(UserError, match=words):
        ensemble.read_info([str(a), str(b)])
    with pytest.raises(UserError, match="given twice"):
        ensemble.read_info([str(a), str(a / "model.keras")])


def test_averaged_is_the_members_mean_per_image():
    nets = [lambda x: np.asarray(x) * 0 + 0.2, lambda x: np.asarray(x) * 0 + 0.6]
    out = ensemble.Averaged(nets)(np.ones((3, 2), np.float32))
    assert out.dtype == np.float32 and np.allclose(out, 0.4)


def test_validation_predictions_read_back_exactly(tmp_path):
    probs = np.array([[0.1234567, 0.8765433], [1 / 3, 2 / 3]], np.float32)
    valpreds.write(tmp_path, ["/x/a,b.png", "/x/c.png"], np.array([1, 0]), probs, CLASSES)
    back = valpreds.read(tmp_path, CLASSES)
    assert back.paths == ["/x/a,b.png", "/x/c.png"] and back.labels.tolist() == [1, 0]
    assert np.array_equal(back.probs, probs)  # bit for bit
    with pytest.raises(UserError, match="columns"):
        valpreds.read(tmp_path, ["cat", "dog"])


def test_a_class_mix_far_from_trainings_is_warned_about():
    from mpitrain.evaluate.report import mix_warning

    train = {"NORMAL": 1341, "PNEUMONIA": 3875}  # 26 % NORMAL
    warning = mix_warning(train, {"NORMAL": 115, "PNEUMONIA": 192})  # 37 % NORMAL
    assert "NORMAL 37% here vs 26% in training" in warning and "balanced accuracy" in warning
    assert mix_warning(train, {"NORMAL": 27, "PNEUMONIA": 73}) is None  # the same mix
    assert mix_warning(None, {"NORMAL": 1, "PNEUMONIA": 1}) is None  # older runs: nothing known
    # Classes absent here are left out of the comparison: a subset of the classes is no mix.
    assert mix_warning(train, {"NORMAL": 0, "PNEUMONIA": 10}) is None
    three = {"a": 100, "b": 100, "c": 200}
    assert mix_warning(three, {"a": 50, "b": 50, "c": 0}) is None
    assert "a 80% here vs 50% in training" in mix_warning(three, {"a": 80, "b": 20, "c": 0})
