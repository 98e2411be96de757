"""Tests for mpitrain.data.synth: determinism, layout, refusals, the cached demo data set."""

import json
import threading

import cv2
import numpy as np
import pytest

from mpitrain.data import synth
from mpitrain.errors import UserError


def files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_layout_counts_shape_dtype(tmp_path):
    out = synth.generate(tmp_path / "d", per_class=5, image_size=32, seed=3)
    assert out == tmp_path / "d"
    for name in ("NORMAL", "PNEUMONIA"):
        pngs = sorted((out / name).glob("*.png"))
        assert len(pngs) == 5
        for p in pngs:
            img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            assert img.shape == (32, 32) and img.dtype == np.uint8
            assert img.std() > 10  # a picture, not a flat field
    marker = json.loads((out / synth.MARKER).read_text())
    assert marker["per_class"] == 5 and marker["seed"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name != "d"]  # no temp dir left behind


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = synth.generate(tmp_path / "a", per_class=3, seed=7)
    b = synth.generate(tmp_path / "b", per_class=3, seed=7)
    c = synth.generate(tmp_path / "c", per_class=3, seed=8)
    assert files(a) == files(b) == files(c)
    pngs = [f for f in files(a) if f.suffix == ".png"]
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in pngs)
    assert all((a / f).read_bytes() != (c / f).read_bytes() for f in pngs)
    # More images per class only appends: the first ones are unchanged.
    d = synth.generate(tmp_path / "d", per_class=4, seed=7)
    assert all((a / f).read_bytes() == (d / f).read_bytes() for f in pngs)


def test_pneumonia_lungs_brighter_on_average(tmp_path):
    out = synth.generate(tmp_path / "d", per_class=40, seed=0)

    def mean_image(name):
        pngs = sorted((out / name).glob("*.png"))
        return np.mean([cv2.imread(str(p), 0).astype(float) for p in pngs], axis=0)

    normal, sick = mean_image("NORMAL"), mean_image("PNEUMONIA")
    lungs = (slice(15, 35), slice(8, 42))
    assert sick[lungs].mean() > normal[lungs].mean() + 5


def test_more_classes(tmp_path):
    classes = ("A", "B", "C", "D")
    out = synth.generate(tmp_path / "d", per_class=2, classes=classes)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(classes)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"per_class": 0},
        {"per_class": 2.5},
        {"per_class": True},
        {"image_size": 7},
        {"image_size": "50"},
        {"seed": -1},
        {"classes": ("ONLY",)},
        {"classes": ("A", "A")},
        {"classes": ("A", "b/c")},
        {"classes": ("A", ".hidden")},
        {"classes": ("A", "")},
        {"classes": ("A", "B", "C", "D", "E")},
    ],
)
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(UserError):
        synth.generate(tmp_path / "d", **kwargs)
    assert not (tmp_path / "d").exists()


def test_existing_target(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        synth.generate(tmp_path / "file", per_class=1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        synth.generate(tmp_path / "full", per_class=1)
    assert [p.name for p in files(tmp_path / "full")] == ["mine.txt"]
    (tmp_path / "empty").mkdir()
    assert len(list(synth.generate(tmp_path / "empty", per_class=1).rglob("*.png"))) == 2
    # Same parameters: reused untouched; other parameters: refused.
    before = (tmp_path / "empty" / synth.MARKER).stat().st_mtime_ns
    synth.generate(tmp_path / "empty", per_class=1)
    assert (tmp_path / "empty" / synth.MARKER).stat().st_mtime_ns == before
    with pytest.raises(UserError, match="other parameters"):
        synth.generate(tmp_path / "empty", per_class=2)


def test_crash_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(synth.cv2, "imwrite", boom)
    with pytest.raises(UserError, match="disk full"):
        synth.generate(tmp_path / "d", per_class=2)
    assert list(tmp_path.iterdir()) == []


def test_demo_data_dir_generates_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MPITRAIN_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real_render = synth._render
    monkeypatch.setattr(synth, "_render", lambda *a, **k: calls.append(1) or real_render(*a, **k))
    first = synth.demo_data_dir()
    assert first == tmp_path / "cache" / synth.DEMO_DIR_NAME
    assert len(list((first / "NORMAL").glob("*.png"))) == 300
    assert len(list((first / "PNEUMONIA").glob("*.png"))) == 300
    n = len(calls)
    assert synth.demo_data_dir() == first and len(calls) == n
    assert synth.demo_data_dir(tmp_path / "cache") == first and len(calls) == n


def test_demo_data_follows_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MPITRAIN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(synth, "generate", lambda out: out)
    assert synth.demo_data_dir() == tmp_path / "xdg" / "mpitrain" / synth.DEMO_DIR_NAME


def test_concurrent_callers_agree(tmp_path):
    results, errors = [], []

    def worker():
        try:
            results.append(synth.generate(tmp_path / "shared", per_class=3, seed=1))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [tmp_path / "shared"] * 4
    assert len(list((tmp_path / "shared").rglob("*.png"))) == 6
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]
