"""Label files (--labels): the same plan as the class-folder layout they describe, patients
kept together, missing images listed as skips, and one-line errors for unusable tables."""

from __future__ import annotations

import csv
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from mpitrain.data.dataset import make_plan
from mpitrain.data.labels import Columns, read_labels
from mpitrain.errors import UserError

REAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "chest_xray" / "train"
PATIENT = re.compile(r"(person\d+)_|((?:NORMAL2-)?IM-\d+)-")  # the chest X-ray naming (README)


def write_csv(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def table_of_folder(root: Path, csv_path: Path, relative: bool, seed: int = 0, patients: bool = False) -> Path:
    """A label file listing every image of a class-folder layout, rows shuffled."""
    rows = []
    for cls in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for f in sorted((root / cls).rglob("*")):
            if f.is_file():
                path = os.path.relpath(f, csv_path.parent) if relative else str(f)
                m = PATIENT.search(f.name)
                rows.append([path, cls] + ([next(g for g in m.groups() if g) if m else ""] if patients else []))
    random.Random(seed).shuffle(rows)
    return write_csv(csv_path, ["path", "label"] + (["patient"] if patients else []), rows)


def same_plan(a, b) -> None:
    assert a.classes == b.classes
    assert a.train_paths == b.train_paths and a.val_paths == b.val_paths
    np.testing.assert_array_equal(a.train_labels, b.train_labels)
    np.testing.assert_array_equal(a.val_labels, b.val_labels)


@pytest.mark.parametrize("relative", [True, False])
def test_a_table_of_a_folder_gives_the_folders_plan(synth_data, tmp_path, relative):
    table = table_of_folder(synth_data, tmp_path / "tables" / "labels.csv", relative)
    folder = make_plan(str(synth_data), None, 0.25, seed=3)
    listed = make_plan(None, None, 0.25, seed=3, labels=str(table))
    same_plan(folder, listed)
    assert listed.data_dir == str(table) and not listed.skipped
    assert len(folder.val_paths) > 0


def test_patient_column_splits_like_the_filename_patient_groups(tmp_path, write_image):
    root = tmp_path / "xr"
    names = {
        "NORMAL": [f"IM-{i // 3:04d}-{i:04d}.png" for i in range(24)],
        "PNEUMONIA": [f"person{i // 4}_virus_{i}.png" for i in range(32)],
    }
    for cls, files in names.items():
        for i, n in enumerate(files):
            write_image(root / cls / n, value=(7 * i + len(cls)) % 250)
    table = table_of_folder(root, tmp_path / "t.csv", relative=True, patients=True)
    folder = make_plan(str(root), None, 0.25, seed=5, groups="filename-patient")
    listed = make_plan(None, None, 0.25, seed=5, labels=str(table), columns=Columns(patient="patient"))
    same_plan(folder, listed)
    assert listed.grouping.startswith("16 groups (--patient-column patient), 56 of 56 rows name a patient")
    assert listed.protocol().startswith("25% of the training label file, split by group: 16 groups")
    # No patient on both sides, and not the image-by-image split.
    val_patients = {PATIENT.search(p).group(0) for p in listed.val_paths}
    assert not val_patients & {PATIENT.search(p).group(0) for p in listed.train_paths}
    assert listed.val_paths != make_plan(None, None, 0.25, seed=5, labels=str(table)).val_paths


def test_rows_are_read_from_any_separator_with_a_bom_and_sorted_by_class_then_path(tmp_path, write_image):
    for n in ("b.png", "a.png", "c.png"):
        write_image(tmp_path / "img" / n)
    abs_c = str(tmp_path / "img" / "c.png")
    text = "\ufeffpath;finding;pid\nimg/b.png;sick;7\nimg/a.png;well;\n" + f"{abs_c};sick;7\n"
    (tmp_path / "t.csv").write_text(text, encoding="utf-8")
    index = read_labels(tmp_path / "t.csv", Columns(label="finding", patient="pid"))
    assert index.classes == ["sick", "well"]
    assert [Path(p).name for p in index.paths] == ["b.png", "c.png", "a.png"]
    assert index.labels.tolist() == [0, 0, 1] and index.patients == ["7", "7", None]
    assert index.root == tmp_path and index.source == str(tmp_path / "t.csv")


def test_rows_without_an_image_are_listed_with_their_row(tmp_path, write_image):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    table = write_csv(
        tmp_path / "t.csv",
        ["path", "label"],
        [["a.png", "x"], ["gone.png", "x"], ["", "y"], ["b.png", "y"], ["b2.png", ""]],
    )
    index = read_labels(table)
    assert [Path(p).name for p in index.paths] == ["a.png", "b.png"]
    reasons = [r for _, r in index.skipped]
    assert reasons == ["t.csv row 3: no such file", "t.csv row 4: empty 'path'", "t.csv row 6: empty 'label'"]
    assert index.skipped[0][0] == str(tmp_path / "gone.png")


@pytest.mark.parametrize(
    "content, columns, message",
    [
        (
            "file,label\na.png,x\n",
            Columns(),
            r"has no column 'path' \(columns: file, label\); choose one with --path-column",
        ),
        ("path,label\na.png,x\n", Columns(label="dx"), r"no column 'dx' .* --label-column"),
        ("path,label\na.png,x\n", Columns(patient="pid"), r"no column 'pid' .* --patient-column"),
        ("", Columns(), "is empty"),
        ("path,label\n", Columns(), "has a header but no rows"),
        ("path,label\na.png,x\nb.png,x\n", Columns(), r"has only 'x' as usable class; need at least 2"),
        ("path,label\na.png,x\nb.png,y\na.png,y\n", Columns(), r"lists a.png twice \(rows 2 and 4\)"),
    ],
)
def test_unusable_tables_are_one_line_errors(tmp_path, write_image, content, columns, message):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    (tmp_path / "t.csv").write_text(content)
    with pytest.raises(UserError, match=message) as e:
        read_labels(tmp_path / "t.csv", columns)
    assert "\n" not in str(e.value)


def test_missing_table_and_validation_classes(tmp_path, synth_data):
    with pytest.raises(UserError, match="does not exist"):
        read_labels(tmp_path / "nope.csv")
    table = table_of_folder(synth_data, tmp_path / "t.csv", relative=False)
    other = write_csv(
        tmp_path / "v.csv",
        ["path", "label"],
        [
            [str(next((synth_data / "NORMAL").iterdir())), "NORMAL"],
            [str(next((synth_data / "PNEUMONIA").iterdir())), "COVID"],
        ],
    )
    with pytest.raises(UserError, match="do not match the training classes .*missing PNEUMONIA; unexpected COVID"):
        make_plan(None, None, 0.1, 0, labels=str(table), val_labels=str(other))
    plan = make_plan(None, None, 0.1, 0, labels=str(table), val_labels=str(table))
    assert plan.val_paths == plan.train_paths and plan.protocol() == f"a separate label file ({table})"


def test_cli_errors_are_one_line_exit_2(tmp_path, synth_data, capsys):
    from mpitrain.cli import main

    bad = write_csv(tmp_path / "t.csv", ["file", "label"], [["a.png", "x"]])
    cases = [
        (["data", "--labels", str(bad)], "has no column 'path'"),
        (["data", "--labels", str(bad), "--data", str(synth_data)], "not both"),
        (["data"], "give --data DIR"),
        (["data", "--data", str(synth_data), "--patient-column", "p"], "--patient-column needs --labels"),
        (["train", "--labels", str(bad), "--data", str(synth_data)], "not both"),
        (["train", "--labels", str(bad), "--epochs", "1"], "has no column 'path'"),
        (["evaluate", "--model", str(tmp_path), "--labels", str(bad), "--data", str(synth_data)], "not both"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mpitrain: error: ") and message in err[0], (argv, err)


def test_data_reports_rows_without_images_as_skipped(tmp_path, synth_data, capsys):
    from mpitrain.data.describe import describe_data
    from mpitrain.runfiles import SKIPPED

    table = table_of_folder(synth_data, tmp_path / "t.csv", relative=False)
    with open(table, "a") as f:
        f.write(f"{tmp_path / 'gone.png'},NORMAL\n")
    shutil.copy(next((synth_data / "NORMAL").iterdir()), tmp_path / "broken.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with open(table, "a") as f:
        f.write(f"{tmp_path / 'broken.png'},PNEUMONIA\n")
    cache = tmp_path / "cache"
    describe_data(None, image_size=16, cache_dir=cache, labels=str(table))
    out = capsys.readouterr().out
    assert f"data:           {table}" in out
    assert "skipped:        2 file(s), 80 usable" in out
    listed = (cache / SKIPPED).read_text().splitlines()
    assert listed == [
        f"{tmp_path / 'gone.png'}\tt.csv row 82: no such file",
        f"{tmp_path / 'broken.png'}\ttruncated PNG (no IEND chunk)",
    ]


@pytest.mark.realdata
@pytest.mark.skipif(not REAL.is_dir(), reason=f"needs the chest X-rays in {REAL}")
def test_real_chest_xrays_a_table_gives_the_folders_plan(tmp_path):
    table = table_of_folder(REAL.resolve(), tmp_path / "labels.csv", relative=False, patients=True)
    # scan gives abspath, not realpath: list the folder as the scan will see it
    root = str(REAL.resolve())
    by_image = make_plan(root, None, 0.1, seed=0)
    same_plan(by_image, make_plan(None, None, 0.1, seed=0, labels=str(table)))
    by_patient = make_plan(root, None, 0.1, seed=0, groups="filename-patient")
    listed = make_plan(None, None, 0.1, seed=0, labels=str(table), columns=Columns(patient="patient"))
    same_plan(by_patient, listed)
    assert len(listed.train_paths) + len(listed.val_paths) == 5216
    assert listed.val_paths != by_image.val_paths


def test_plan_for_a_config_reads_the_label_files_and_never_the_demo_data(synth_data, tmp_path, monkeypatch):
    from mpitrain.config import TrainConfig
    from mpitrain.data import dataset, synth
    from mpitrain.data.dataset import plan_for

    def no_demo(*a, **k):
        raise AssertionError("the demo data was generated for a --labels run")

    monkeypatch.setattr(synth, "demo_data_dir", no_demo)
    table = table_of_folder(synth_data, tmp_path / "t.csv", relative=True)
    cfg = TrainConfig(labels=str(table), val_labels=str(table), path_column="path", label_column="label")
    plan = plan_for(cfg)
    assert plan.data_dir == str(table) and plan.val_is_table and plan.val_paths == plan.train_paths
    # one "patient" per class: a class cannot give a group to validation and keep one for
    # training, so nothing would validate: refused at planning, before any image is read
    with pytest.raises(
        UserError, match=r"no validation images .* at least 2 groups \(2 groups \(--patient-column label"
    ):
        plan_for(TrainConfig(labels=str(table), patient_column="label", val_split=0.25))
    assert (
        dataset.make_plan(str(synth_data), None, 0.25, 0).train_paths
        == plan_for(TrainConfig(data=str(synth_data), val_split=0.25)).train_paths
    )
