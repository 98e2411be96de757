"""The `mpitrain data` report and the skipped-files helpers."""

from __future__ import annotations

import io

import pytest

from mpitrain.data.describe import describe_data, skip_warning, write_skip_report
from mpitrain.errors import UserError


def _report(data_dir, **kwargs) -> str:
    out = io.StringIO()
    assert describe_data(data_dir, out=out, **kwargs) == 0
    return out.getvalue()


def test_report_shows_classes_counts_and_cache(image_tree, tmp_path):
    text = _report(image_tree, image_size=16, cache_dir=tmp_path / "c")
    assert str(image_tree) in text
    lines = text.splitlines()
    cat = next(ln for ln in lines if ln.strip().startswith("cat"))
    dog = next(ln for ln in lines if ln.strip().startswith("dog"))
    assert cat.split()[1:] == ["3", "60.0%"] and dog.split()[1:] == ["2", "40.0%"]
    assert "1.50 : 1" in text and "16 x 16" in text
    assert "cache miss" in text and "images/s" in text and "skipped:" in text
    assert "cache hit" in _report(image_tree, image_size=16, cache_dir=tmp_path / "c")


def test_skipped_files_listed_in_cache_dir(image_tree, tmp_path):
    (image_tree / "dog" / "broken.png").write_bytes(b"")
    (image_tree / "cat" / "noise.jpg").write_bytes(b"\x00" * 50)
    text = _report(image_tree, image_size=8, cache_dir=tmp_path / "c")
    report = tmp_path / "c" / "skipped_files.txt"
    assert report.is_file() and str(report) in text and "2 file(s)" in text
    lines = report.read_text().splitlines()
    assert len(lines) == 2 and all(len(ln.split("\t")) == 2 for ln in lines)
    assert not list(image_tree.rglob("skipped_files.txt"))


def test_val_data_report_and_mismatch(image_tree, tmp_path, write_image):
    val = tmp_path / "val"
    write_image(val / "cat" / "v.png")
    write_image(val / "dog" / "v.png")
    text = _report(image_tree, image_size=8, val_data=val, cache_dir=tmp_path / "c")
    assert "validation:" in text and "val load:" in text
    write_image(val / "cow" / "v.png")
    with pytest.raises(UserError, match="cow"):
        _report(image_tree, val_data=val, cache_dir=tmp_path / "c")


def test_write_skip_report_and_warning(tmp_path):
    errors = [("/d/a.png", "empty file (0 bytes)"), ("/d/b\tc.jpg", "bad\nreason")]
    path = write_skip_report(errors, tmp_path / "out")
    assert path == tmp_path / "out" / "skipped_files.txt"
    assert path.read_text() == "/d/a.png\tempty file (0 bytes)\n/d/b c.jpg\tbad reason\n"
    assert skip_warning(errors, path) == f"warning: skipped 2 unreadable files (list in {path})"
    assert "skipped 1 unreadable file " in skip_warning(errors[:1], path)


def test_byte_identical_duplicates_are_reported(image_tree, tmp_path):
    from mpitrain.data.describe import find_duplicates

    assert "duplicates:     none" in _report(image_tree, image_size=8, cache_dir=tmp_path / "c")
    (image_tree / "dog" / "copy-of-cat-a.png").write_bytes((image_tree / "cat" / "a.png").read_bytes())
    (image_tree / "dog" / "same-size-other-bytes.png").write_bytes(
        bytes(reversed((image_tree / "cat" / "a.png").read_bytes()))
    )
    text = _report(image_tree, image_size=8, cache_dir=tmp_path / "c")
    assert "1 group(s) of byte-identical files: 2 files, 1 redundant copies" in text
    assert "  data/cat/a.png = data/dog/copy-of-cat-a.png" in text
    listed = (tmp_path / "c" / "duplicate_files.txt").read_text().splitlines()
    assert listed == [f"{image_tree}/cat/a.png\t{image_tree}/dog/copy-of-cat-a.png"]
    paths = [str(p) for p in sorted(image_tree.rglob("*.*"))]
    assert find_duplicates(paths) == [[f"{image_tree}/cat/a.png", f"{image_tree}/dog/copy-of-cat-a.png"]]


@pytest.fixture
def patient_tree(tmp_path, write_image):
    """Two classes of chest-X-ray-named files (personN_...): 10 patients each, 2 images per patient."""
    root = tmp_path / "xray"
    for c, cls in enumerate(("NORMAL", "PNEUMONIA")):
        for p in range(10):
            for k in range(2):
                write_image(root / cls / f"person{100 * c + p}_virus_{k}.jpeg", value=10 * p + k + 100 * c)
    return root


def test_data_recipe_warms_the_cache_entry_the_recipes_training_reads(patient_tree, tmp_path, capsys):
    from mpitrain.cli import main
    from mpitrain.config import TrainConfig
    from mpitrain.data import dataset

    cache = tmp_path / "cache"
    assert main(["data", "--data", str(patient_tree), "--cache-dir", str(cache), "--recipe", "xray"]) == 0
    text = capsys.readouterr().out
    size = TrainConfig.with_recipe(recipe="xray").image_size
    assert f"{size} x {size}" in text and "(filename-patient)" in text
    cfg = TrainConfig.with_recipe(recipe="xray", data=str(patient_tree), cache_dir=str(cache))
    plan = dataset.plan_for(cfg)
    loaded = dataset.load_shard(plan, cfg.image_size, cfg.seed, (0, 1), (0, 1), cfg.cache_dir)
    assert loaded.cache_hits == loaded.loads > 0  # nothing decoded again


def test_data_recipe_keeps_the_options_given(patient_tree, tmp_path, capsys):
    from mpitrain.cli import main

    argv = ["data", "--data", str(patient_tree), "--cache-dir", str(tmp_path / "c"), "--recipe", "xray"]
    assert main([*argv, "--image-size", "24", "--groups", "duplicates"]) == 0
    text = capsys.readouterr().out
    assert "24 x 24" in text and "(duplicates)" in text and "filename-patient" not in text
    assert main([*argv, "--group-pattern", r"(person\d)"]) == 0  # the recipe's groups give way, as in train
    assert "--group-pattern" in capsys.readouterr().out


@pytest.mark.parametrize("groups", ["none", "duplicates"])
def test_each_file_is_hashed_once(image_tree, tmp_path, monkeypatch, groups):
    # The groups line and the duplicates report need the same hashes: reading every file
    # twice cost `mpitrain data` its cold speed on the chest X-rays.
    import collections
    import hashlib

    (image_tree / "dog" / "copy-of-cat-a.png").write_bytes((image_tree / "cat" / "a.png").read_bytes())
    hashed: collections.Counter = collections.Counter()
    real = hashlib.file_digest

    def counting(f, digest):
        hashed[f.name] += 1
        return real(f, digest)

    monkeypatch.setattr(hashlib, "file_digest", counting)
    text = _report(image_tree, image_size=8, cache_dir=tmp_path / "c", groups=groups)
    assert "1 set(s) of identical files" in text and "1 group(s) of byte-identical files" in text
    assert hashed and max(hashed.values()) == 1, hashed
