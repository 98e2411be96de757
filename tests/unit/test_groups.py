"""Patient-grouped validation split: groups from names and identical files, kept whole."""

from __future__ import annotations

import io

import numpy as np
import pytest

from mpitrain.config import GROUPINGS as CONFIG_GROUPINGS
from mpitrain.config import TrainConfig
from mpitrain.data.dataset import make_plan
from mpitrain.data.describe import describe_data
from mpitrain.data.groups import GROUPINGS, group_ids, shared_groups
from mpitrain.data.split import grouped_split, stratified_split
from mpitrain.errors import UserError


def _random_groups(seed, n=600, n_classes=3):
    """Patients with 1-12 images each, mostly of one class (a few mixed)."""
    rng = np.random.default_rng(seed)
    labels, groups, g = [], [], 0
    while len(labels) < n:
        size = int(rng.integers(1, 13))
        cls = int(rng.choice(n_classes, p=[0.6, 0.3, 0.1][:n_classes]))
        lab = np.full(size, cls)
        if rng.random() < 0.05:
            lab[0] = (cls + 1) % n_classes  # a mixed group
        labels.extend(lab)
        groups.extend([g] * size)
        g += 1
    order = rng.permutation(len(labels))  # groups are scattered in file order
    labels, groups = np.array(labels)[order], np.array(groups)[order]
    _, first = np.unique(groups, return_index=True)  # renumber by first image, like group_ids
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return labels.astype(np.int64), rank[groups]


def test_groupings_match_the_config_choices():
    assert GROUPINGS == CONFIG_GROUPINGS


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.35])
def test_no_group_on_both_sides_and_classes_stay_stratified(seed, fraction):
    labels, groups = _random_groups(seed)
    tr, va = grouped_split(labels, groups, fraction, seed)
    assert not set(groups[tr]) & set(groups[va])
    assert sorted([*tr, *va]) == list(range(len(labels)))
    biggest = np.bincount(groups).max()
    for cls in range(3):
        n_c = (labels == cls).sum()
        # per class within one group's size of the target (mixed groups add a little)
        assert abs((labels[va] == cls).sum() - fraction * n_c) <= biggest + 2, cls
        assert (labels[tr] == cls).sum() > 0


def test_seeded_and_identical_on_every_call():
    labels, groups = _random_groups(1)
    a = grouped_split(labels, groups, 0.2, 5)
    b = grouped_split(labels.copy(), groups.copy(), 0.2, 5)
    c = grouped_split(labels, groups, 0.2, 6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])


def test_one_image_per_group_is_the_plain_stratified_split():
    labels = np.random.default_rng(3).permutation(np.repeat([0, 1, 2], [100, 30, 3]))
    for seed in range(4):
        plain = stratified_split(labels, 0.2, seed)
        grouped = grouped_split(labels, np.arange(len(labels)), 0.2, seed)
        assert all(np.array_equal(x, y) for x, y in zip(plain, grouped))


def test_a_class_keeps_a_training_group():
    labels = np.array([0] * 6 + [1] * 6)
    groups = np.array([0] * 6 + [1] * 3 + [2] * 3)  # class 0 is one patient
    tr, va = grouped_split(labels, groups, 0.5, 0)
    assert set(labels[tr]) == {0, 1}
    assert (groups[va] != 0).all()


def _touch(root, rel, data=None):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data if data is not None else rel.encode())  # distinct bytes per name
    return str(p)


def test_filename_patient_groups_of_the_chest_xray_naming(tmp_path):
    names = [
        "NORMAL/IM-0115-0001.jpeg",
        "NORMAL/IM-0115-0002.jpeg",
        "NORMAL/IM-0117-0001.jpeg",
        "NORMAL/NORMAL2-IM-0115-0001.jpeg",
        "NORMAL/NORMAL2-IM-0115-0002.jpeg",
        "PNEUMONIA/person1_bacteria_1.jpeg",
        "PNEUMONIA/person1_virus_7.jpeg",
        "PNEUMONIA/person10_bacteria_2.jpeg",
        "PNEUMONIA/other.jpeg",
    ]
    paths = [_touch(tmp_path, n) for n in names]
    g = group_ids(paths, str(tmp_path), "filename-patient")
    ids = g.ids.tolist()
    assert ids[0] == ids[1] != ids[2]  # one IM patient, another one
    assert ids[3] == ids[4] != ids[0]  # NORMAL2-IM-0115 is not IM-0115
    assert ids[5] == ids[6] != ids[7]  # person1 twice, person10 apart
    assert ids[8] not in ids[:8]  # no match: a group of its own
    assert g.n_groups == 6 and g.matched == 8


def test_identical_files_join_one_group(tmp_path):
    same = b"\x89PNG same bytes"
    paths = [
        _touch(tmp_path, "A/x1.png", same),
        _touch(tmp_path, "A/x2.png"),
        _touch(tmp_path, "B/copy.png", same),
        _touch(tmp_path, "B/y.png", b"\x89PNG same byteZ"),
    ]
    g = group_ids(paths, str(tmp_path), "duplicates")
    assert g.ids.tolist() == [0, 1, 0, 2] and g.duplicate_sets == 1 and g.duplicate_files == 2
    # and they bridge name groups: person1 and person2 share a copied file
    paths = [
        _touch(tmp_path, "P/person1_a.png", same),
        _touch(tmp_path, "P/person1_b.png"),
        _touch(tmp_path, "P/person2_a.png", same),
        _touch(tmp_path, "P/person3_a.png"),
    ]
    g = group_ids(paths, str(tmp_path), group_pattern=r"(person\d+)_")
    assert g.ids.tolist() == [0, 0, 0, 1]
    assert group_ids(paths, str(tmp_path), "none") is None


def test_a_pattern_without_any_match_or_an_invalid_one_is_a_user_error(tmp_path):
    paths = [_touch(tmp_path, "A/a.png"), _touch(tmp_path, "B/b.png")]
    with pytest.raises(UserError, match="matches none"):
        group_ids(paths, str(tmp_path), group_pattern=r"patient(\d+)")
    for bad in (
        {"group_pattern": "(unclosed"},
        {"groups": "patients"},
        {"groups": "filename-patient", "group_pattern": "(x)"},
        {"groups": "duplicates", "val_data": "somewhere"},
    ):
        with pytest.raises(UserError) as e:
            TrainConfig(**bad)
        assert "\n" not in str(e.value)


def _patient_tree(root, write_image):
    """Two classes, patients with 1-4 images each; a patient's images differ."""
    rng = np.random.default_rng(0)
    k = 0
    for cls, prefix, patients in (("NORMAL", "IM-", 12), ("PNEUMONIA", "person", 20)):
        for p in range(patients):
            for i in range(int(rng.integers(1, 5))):
                name = f"IM-{p:04d}-{i:04d}.png" if prefix == "IM-" else f"person{p}_bacteria_{k}.png"
                write_image(root / cls / name, value=int(k % 250))
                k += 1
    return root


def test_plan_keeps_patients_whole_and_describe_reports_the_leak(tmp_path, write_image):
    root = _patient_tree(tmp_path / "data", write_image)
    plan = make_plan(str(root), None, 0.25, 3, groups="filename-patient")
    again = make_plan(str(root), None, 0.25, 3, groups="filename-patient")
    assert plan.val_paths == again.val_paths and plan.grouping.startswith("32 groups")
    g = group_ids(plan.train_paths + plan.val_paths, str(root), "filename-patient")
    n = len(plan.train_paths)
    assert shared_groups(g.ids, np.arange(n), np.arange(n, len(g.ids))) == (0, 0)
    assert set(plan.val_labels.tolist()) == {0, 1}
    plain = make_plan(str(root), None, 0.25, 3)
    assert plain.grouping == ""

    out = io.StringIO()
    describe_data(root, image_size=8, cache_dir=tmp_path / "c", out=out, val_split=0.25, seed=3)
    text = out.getvalue()
    assert "32 groups (filename-patient)" in text
    assert "warning: an image-by-image --val-split 0.25 (seed 3) puts" in text
    assert "use --groups filename-patient" in text and "0 sharing a group with training" in text
