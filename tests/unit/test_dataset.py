"""data/dataset.py: a rank's shard keeps labels with their images; class weights, and the
trainer feeding them into the loss."""

from __future__ import annotations

import numpy as np
import pytest

from mpitrain.data.dataset import (
    Plan,
    Shard,
    class_weights,
    load_shard,
    make_plan,
)
from mpitrain.errors import UserError
from mpitrain.pixels import as_float


@pytest.fixture
def dark_and_bright(tmp_path, write_image):
    """Class `bright` (value 230) and `dark` (value 20), 6 images each, and an unreadable
    file early in the first class, so that every later row would shift if labels were
    not filtered with the images."""
    root = tmp_path / "data"
    for i in range(6):
        write_image(root / "bright" / f"{i:02d}.png", value=230)
        write_image(root / "dark" / f"{i:02d}.png", value=20)
    (root / "bright" / "00b.png").write_bytes(b"not an image at all")
    return root


def _check_rows(x, y, max_value):
    means = as_float(x, max_value).reshape(len(x), -1).mean(1)
    assert len(x) == len(y)
    for m, label in zip(means, y):  # class 0 = bright, class 1 = dark (sorted names)
        assert (m > 0.5) == (label == 0), (m, label)


@pytest.mark.parametrize("parts", [1, 2])
def test_labels_stay_with_their_images_after_a_skipped_file(dark_and_bright, tmp_path, parts):
    plan = make_plan(str(dark_and_bright), None, 0.25, seed=0)
    assert plan.classes == ["bright", "dark"]
    assert any(p.endswith("00b.png") for p in plan.train_paths + plan.val_paths)
    rows = 0
    for part in range(parts):
        shard = load_shard(plan, 8, 0, (part, parts), (part, parts), cache_dir=str(tmp_path / "c"))
        _check_rows(shard.train_x, shard.train_y, shard.train_max)
        _check_rows(shard.val_x, shard.val_y, shard.val_max)
        rows += len(shard.train_y) + len(shard.val_y)
        assert shard.train_y.dtype == np.int32
    assert rows == 12  # 13 files, one skipped


def test_labels_of_a_skip_in_the_middle_of_the_list(dark_and_bright, tmp_path):
    # All files in training, in path order: bright (bad file second), then dark.
    from mpitrain.data.scan import scan

    index = scan(dark_and_bright)
    plan = Plan(str(dark_and_bright), index.classes, list(index.paths), index.labels, [], np.zeros(0, int), "split")
    shard = load_shard(plan, 8, 0, (0, 1), (0, 1), cache_dir=str(tmp_path / "c"))
    assert [p.rsplit("/", 1)[1] for p, _ in shard.errors] == ["00b.png"]
    assert shard.train_y.tolist() == [0] * 6 + [1] * 6
    _check_rows(shard.train_x, shard.train_y, shard.train_max)


def test_class_weights_balanced_and_none():
    w = class_weights(np.array([30, 10]), "balanced")
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, [40 / 60, 40 / 20])
    # every class adds the same total weight, and the weights sum to n over the samples
    np.testing.assert_allclose(w * [30, 10], [20, 20])
    np.testing.assert_allclose(class_weights(np.array([5, 5, 10]), "balanced"), [4 / 3, 4 / 3, 2 / 3])
    assert class_weights(np.array([30, 10]), "none").tolist() == [1.0, 1.0]
    w0 = class_weights(np.array([8, 0]), "balanced")  # a class without training images
    assert np.isfinite(w0).all() and w0[0] == pytest.approx(0.5)


def _train_one_step(class_weight: str, record=None):
    """One SGD step on a 3:1 imbalanced in-memory set; returns the final weights."""
    import mpitrain.engine.loop as trainer
    from mpitrain.config import TrainConfig
    from mpitrain.parallel.comm import SingleComm
    from mpitrain.runtime import configure_runtime
    from mpitrain.train import fitting
    from mpitrain.train.models import build_model

    rng = np.random.default_rng(5)
    y = np.array([0] * 12 + [1] * 4, np.int32)
    x = (rng.random((16, 12, 12, 1)) * 0.5).astype(np.float32)
    x[y == 1, 3:9, 3:9, 0] += 0.4
    cfg = TrainConfig(
        epochs=1,
        batch_size=16,
        lr=0.1,
        optimizer="sgd",
        model="tiny",
        image_size=12,
        seed=3,
        class_weight=class_weight,
        threads=1,
        lr_scaling="none",
        lr_schedule="constant",
    )
    configure_runtime(3, 1, 1)
    model = build_model("tiny", 12, 2)
    plan = Plan("mem", ["a", "b"], [""] * 16, y, [""] * 4, y[:4], "split")
    real = trainer.make_train_step

    def recording(*args, **kwargs):
        step = real(*args, **kwargs)

        def wrapped(xb, yb, wb, lr):
            if record is not None:
                record.append((np.array(yb), np.array(wb)))
            return step(xb, yb, wb, lr)

        return wrapped

    trainer.make_train_step = recording
    try:
        fitting.fit(cfg, SingleComm(), plan, Shard(x, y, x[:4], y[:4]), model, echo=lambda *_: None)
    finally:
        trainer.make_train_step = real
    return model.get_weights()


def test_trainer_feeds_the_class_weights_into_the_loss():
    seen = []
    balanced = _train_one_step("balanced", seen)
    ((y, w),) = seen  # one step: the whole batch
    expected = class_weights(np.array([12, 4]), "balanced")
    np.testing.assert_array_equal(w, expected[y])
    np.testing.assert_allclose(w[y == 0], 16 / 24, rtol=1e-6)
    np.testing.assert_allclose(w[y == 1], 2.0, rtol=1e-6)
    none = _train_one_step("none")
    # and they change the update: balanced and unweighted steps end in different weights
    assert max(float(np.abs(a - b).max()) for a, b in zip(balanced, none)) > 1e-6


@pytest.mark.parametrize("val", ["split", "folder"])
def test_mpitrain_data_warms_the_shards_of_every_rank(dark_and_bright, tmp_path, write_image, val, monkeypatch):
    import io

    import mpitrain.data.cache as cache
    from mpitrain.data.describe import describe_data

    val_dir = None
    if val == "folder":
        val_dir = tmp_path / "val"
        for name, value in (("bright", 230), ("dark", 20)):
            for i in range(3):
                write_image(val_dir / name / f"{i}.png", value=value)
    describe_data(dark_and_bright, image_size=8, val_data=val_dir, cache_dir=tmp_path / "c", out=io.StringIO())
    plan = make_plan(str(dark_and_bright), None if val_dir is None else str(val_dir), 0.25, seed=0)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although `mpitrain data` cached these files")

    monkeypatch.setattr(cache, "decode_native", no_decoding)
    for part in range(3):  # 3 ranks: 3 other shards of the training and of the validation list
        shard = load_shard(plan, 8, 0, (part, 3), (part, 3), cache_dir=str(tmp_path / "c"))
        assert shard.cache_hits == shard.loads == 2
        _check_rows(shard.train_x, shard.train_y, shard.train_max)


@pytest.mark.parametrize("parts", [1, 3])
def test_val_index_points_each_row_at_its_plan_path_across_skips_and_ranks(dark_and_bright, tmp_path, parts):
    plan = make_plan(str(dark_and_bright), None, 0.5, 0)
    seen = []
    for r in range(parts):
        s = load_shard(plan, 8, 0, (0, 1), (r, parts), str(tmp_path / "cache"))
        assert len(s.val_index) == len(s.val_x)
        _check_rows(s.val_x, plan.val_labels[s.val_index], s.val_max)  # the rows are those paths
        seen += s.val_index.tolist()
    readable = [i for i, p in enumerate(plan.val_paths) if not p.endswith("00b.png")]
    assert sorted(seen) == readable  # every readable val image once, the unreadable one never


def test_the_split_seed_moves_the_split_and_the_seed_alone_does_not(dark_and_bright):
    from mpitrain.config import TrainConfig

    def val_of(**kw):
        cfg = TrainConfig(val_split=0.5, **kw)
        return make_plan(str(dark_and_bright), None, cfg.val_split, cfg.split_seed_used).val_paths

    assert val_of(seed=1) != val_of(seed=2)  # without --split-seed, --seed moves the split
    assert val_of(seed=1, split_seed=7) == val_of(seed=2, split_seed=7)
    assert val_of(seed=3) == val_of(seed=9, split_seed=3)


def test_the_validation_protocol_says_how_the_split_was_made(dark_and_bright, tmp_path, write_image):
    by_image = make_plan(str(dark_and_bright), None, 0.5, 0).protocol()
    assert "image by image" in by_image and "both sides" in by_image
    grouped = make_plan(str(dark_and_bright), None, 0.5, 0, "duplicates").protocol()
    assert "split by group" in grouped and "image by image" not in grouped
    other = make_plan(str(dark_and_bright), str(dark_and_bright), 0.1, 0).protocol()
    assert other.startswith("a separate folder")


def _folder(root, values: dict[str, list[int]], write_image):
    for cls, vs in values.items():
        for v in vs:
            write_image(root / cls / f"{v}.png", value=v)
    return root


def test_validation_folders_made_of_training_files_are_refused_or_warned(tmp_path, write_image):
    from mpitrain.data.dataset import check_validation, make_plan

    train = _folder(tmp_path / "train", {"a": [1, 2, 3], "b": [100, 101, 102]}, write_image)
    assert "all 6 validation images" in str(
        pytest.raises(UserError, check_validation, make_plan(str(train), str(train), 0.1, 0)).value
    )
    copy = _folder(tmp_path / "copy", {"a": [1, 2, 3], "b": [100, 101, 102]}, write_image)  # same bytes
    with pytest.raises(UserError, match="identical copies"):
        check_validation(make_plan(str(train), str(copy), 0.1, 0))
    some = _folder(tmp_path / "some", {"a": [1, 50], "b": [100, 150, 160]}, write_image)
    warning = check_validation(make_plan(str(train), str(some), 0.1, 0))
    assert warning is not None and "2 of 5 validation images" in warning
    other = _folder(tmp_path / "other", {"a": [60, 61], "b": [200, 201]}, write_image)
    assert check_validation(make_plan(str(train), str(other), 0.1, 0)) is None
    assert check_validation(make_plan(str(train), None, 0.5, 0)) is None  # a split: disjoint


def test_a_split_that_leaves_no_validation_image_is_refused_at_planning(tmp_path, write_image):
    from mpitrain.data.dataset import make_plan

    single = _folder(tmp_path / "single", {"a": [1], "b": [2]}, write_image)
    with pytest.raises(UserError, match=r"no validation images in .*single \(a 1, b 1\): give --val-data"):
        make_plan(str(single), None, 0.1, 0)
    two = _folder(tmp_path / "two", {"a": [1, 2], "b": [3, 4]}, write_image)
    assert len(make_plan(str(two), None, 0.1, 0).val_paths) == 2
