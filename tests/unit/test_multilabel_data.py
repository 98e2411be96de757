"""Multi-label tables, the data layer (--label-columns, --multi-label, --findings-column):
CheXpert-style 1/0/-1/blank columns and NIH-style |-separated findings load as float32
[n, L] (NaN: masked), split by patient as one class, count and weigh per label, and every
bad table is a one-line error."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from mpitrain.config import TrainConfig, check_multi_label
from mpitrain.data.dataset import class_weights, load_shard, make_plan, plan_for
from mpitrain.data.labels import Columns, read_labels
from mpitrain.data.split import val_count
from mpitrain.errors import UserError
from mpitrain.targets import is_multi_label

NAN = np.nan
# CheXpert-style: a patient column and three findings, cells 1/0/-1/blank as pandas writes them.
CHEX_HEADER = ["path", "patient", "Atelectasis", "Edema", "Effusion"]
CHEX_ROWS = [
    ["b.png", "p1", "1.0", "", "-1.0"],
    ["a.png", "p1", "0.0", "1", "0"],
    ["c.png", "p2", "-1", "0.0", "1.0"],
    ["d.png", "p3", "", "-1.0", "1"],
]
# NIH-style: the ChestX-ray14 column names.
NIH_HEADER = ["Image Index", "Finding Labels", "Patient ID"]
NIH = Columns(path="Image Index", findings="Finding Labels", patient="Patient ID")


def write_table(folder: Path, header: list[str], rows: list[list[str]], write_image, name: str = "t.csv") -> Path:
    """The CSV, and a distinct tiny image for each row's path (first column) but gone*.png."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    for i, row in enumerate(rows):
        if row[0] and not row[0].startswith("gone") and not (folder / row[0]).exists():
            write_image(folder / row[0], value=(7 * i) % 256)  # distinct bytes: no duplicate groups
    return folder / name


def names(index) -> list[str]:
    return [Path(p).name for p in index.paths]


def test_is_multi_label_is_the_labels_rank():
    assert is_multi_label(np.zeros((3, 2), np.float32)) and not is_multi_label(np.zeros(3, np.int64))


def test_a_chexpert_table_loads_in_path_order_with_the_label_columns_order(tmp_path, write_image):
    table = write_table(tmp_path, CHEX_HEADER, CHEX_ROWS, write_image)
    index = read_labels(table, Columns(labels=("Edema", "Atelectasis"), patient="patient"))
    assert index.classes == ["Edema", "Atelectasis"] and names(index) == ["a.png", "b.png", "c.png", "d.png"]
    assert index.labels.dtype == np.float32 and index.labels.shape == (4, 2)
    # defaults: uncertain (-1) and blank are both 0
    np.testing.assert_array_equal(index.labels, [[1, 0], [0, 1], [0, 0], [0, 0]])
    assert index.patients == ["p1", "p1", "p2", "p3"]
    assert index.counts() == {"Edema": 1, "Atelectasis": 1}  # positives per label
    every = read_labels(table, Columns(all_labels=True, patient="patient"))
    assert every.classes == ["Atelectasis", "Edema", "Effusion"]  # the table's column order


@pytest.mark.parametrize(
    "uncertain, blank, expected",
    [
        ("zeros", "zeros", [[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1]]),
        ("ones", "zeros", [[0, 1, 0], [1, 0, 1], [1, 0, 1], [0, 1, 1]]),
        ("ignore", "zeros", [[0, 1, 0], [1, 0, NAN], [NAN, 0, 1], [0, NAN, 1]]),
        ("zeros", "ignore", [[0, 1, 0], [1, NAN, 0], [0, 0, 1], [NAN, 0, 1]]),
        ("ignore", "ignore", [[0, 1, 0], [1, NAN, NAN], [NAN, 0, 1], [NAN, NAN, 1]]),
    ],
)
def test_uncertain_and_blank_policies(tmp_path, write_image, uncertain, blank, expected):
    table = write_table(tmp_path, CHEX_HEADER, CHEX_ROWS, write_image)
    index = read_labels(table, Columns(all_labels=True, patient="patient", uncertain=uncertain, blank=blank))
    np.testing.assert_array_equal(index.labels, np.array(expected, np.float32))  # NaN == NaN here


def test_an_nih_table_loads_sorted_findings_with_no_finding_all_zero(tmp_path, write_image):
    rows = [
        ["x1.png", "Effusion|Atelectasis", "7"],
        ["x0.png", "No Finding", "7"],
        ["x2.png", " Hernia ", "8"],
        ["gone.png", "Edema", "9"],  # no such file: skipped, and Edema is no label
        ["", "Mass", "9"],
    ]
    table = write_table(tmp_path, NIH_HEADER, rows, write_image)
    index = read_labels(table, NIH)
    assert index.classes == ["Atelectasis", "Effusion", "Hernia"] and names(index) == ["x0.png", "x1.png", "x2.png"]
    np.testing.assert_array_equal(index.labels, [[0, 0, 0], [1, 1, 0], [0, 0, 1]])
    assert index.patients == ["7", "7", "8"]
    assert [r for _, r in index.skipped] == ["t.csv row 5: no such file", "t.csv row 6: empty 'Image Index'"]
    other = write_table(tmp_path / "o", NIH_HEADER, [["y.png", "normal", "1"], ["z.png", "Mass", "2"]], write_image)
    assert read_labels(other, Columns(path="Image Index", findings="Finding Labels", no_finding="normal")).classes == [
        "Mass"
    ]


@pytest.mark.parametrize(
    "header, rows, columns, message",
    [
        (  # an unknown label column: the columns are listed
            CHEX_HEADER,
            CHEX_ROWS,
            Columns(labels=("Edema", "Cardiomegaly")),
            r"has no column 'Cardiomegaly' \(columns: path, patient, Atelectasis, Edema, Effusion\); "
            r"choose one with --label-columns",
        ),
        (  # a value other than 1/0/-1/blank: file, row, column and value named
            CHEX_HEADER,
            [*CHEX_ROWS, ["e.png", "p4", "2", "0", "0"]],
            Columns(labels=("Atelectasis",)),
            r"labels file .*t\.csv row 6, column 'Atelectasis': '2' is not a label value \(1, 0, -1",
        ),
        (  # --multi-label on a metadata column: the hint names --label-columns
            [*CHEX_HEADER, "Sex"],
            [[*r, "F"] for r in CHEX_ROWS],
            Columns(all_labels=True, patient="patient"),
            r"row 2, column 'Sex': 'F' is not a label value .*name the label columns with --label-columns",
        ),
        (  # a label column blank in every row
            [*CHEX_HEADER, "Fracture"],
            [[*r, ""] for r in CHEX_ROWS],
            Columns(labels=("Edema", "Fracture")),
            r"label column 'Fracture' is blank in all 4 usable rows",
        ),
        (  # a label column masked in every row
            CHEX_HEADER,
            [[r[0], r[1], "-1", r[3], r[4]] for r in CHEX_ROWS],
            Columns(labels=("Atelectasis", "Edema"), uncertain="ignore"),
            r"label column 'Atelectasis' has no usable value in 4 rows: every one is masked",
        ),
        (  # an empty findings cell: its row
            NIH_HEADER,
            [["a.png", "Edema", "1"], ["b.png", " ", "2"]],
            NIH,
            r"t\.csv row 3: empty 'Finding Labels' \(write 'No Finding' for an image without findings\)",
        ),
        (
            NIH_HEADER,
            [["a.png", "Edema|No Finding", "1"]],
            NIH,
            r"row 2: 'Finding Labels' has 'No Finding' together with findings",
        ),
        (NIH_HEADER, [["a.png", "No Finding", "1"]], NIH, r"has no finding besides 'No Finding' in 1 usable rows"),
        (
            NIH_HEADER,
            [["a.png", "Edema", "1"]],
            Columns(path="Image Index", findings="Findings"),
            r"has no column 'Findings' .*--findings-column",
        ),
        (["path", "patient"], [["a.png", "1"]], Columns(all_labels=True, patient="patient"), r"no column besides"),
        (
            CHEX_HEADER,
            [["gone.png", "p", "1", "0", "0"]],
            Columns(all_labels=True, patient="patient"),
            r"has no usable rows \(1 row",
        ),
    ],
)
def test_bad_multi_label_tables_are_one_line_errors(tmp_path, write_image, header, rows, columns, message):
    table = write_table(tmp_path, header, rows, write_image)
    with pytest.raises(UserError, match=message) as e:
        read_labels(table, columns)
    assert "\n" not in str(e.value)


def test_a_bad_value_is_refused_even_where_the_image_is_missing(tmp_path, write_image):
    # a row that names an image is read whole: a typo in the table is not hidden by a missing file
    table = write_table(tmp_path, CHEX_HEADER, CHEX_ROWS, write_image)
    with open(table, "a") as f:
        f.write("gone.png,p9,yes,0,0\n")
    with pytest.raises(UserError, match=r"row 6, column 'Atelectasis': 'yes'"):
        read_labels(table, Columns(all_labels=True, patient="patient"))


def grouped_table(tmp_path: Path, write_image, patients: int = 12, per_patient: int = 3) -> Path:
    rows = []
    for p in range(patients):
        for k in range(per_patient):
            cells = [str((p + k + j) % 3 - 1) if (p + 2 * k + j) % 4 else "" for j in range(3)]
            rows.append([f"img/p{p:02d}_{k}.png", f"P{p}", *cells])
    return write_table(tmp_path, CHEX_HEADER, rows, write_image)


def test_the_split_of_multi_label_rows_keeps_patients_whole_and_is_seeded(tmp_path, write_image):
    table = grouped_table(tmp_path, write_image)
    columns = Columns(all_labels=True, patient="patient", uncertain="ignore")
    plan = make_plan(None, None, 0.25, 3, labels=str(table), columns=columns)
    patient = {p: read_labels(table, columns).patients[i] for i, p in enumerate(read_labels(table, columns).paths)}
    train, val = {patient[p] for p in plan.train_paths}, {patient[p] for p in plan.val_paths}
    assert not train & val and len(val) == 3  # 9 of 36 images: 3 whole patients
    assert plan.grouping.startswith("12 groups (--patient-column patient)")
    assert plan.train_labels.shape == (27, 3) and plan.val_labels.dtype == np.float32
    again = make_plan(None, None, 0.25, 3, labels=str(table), columns=columns)
    assert again.val_paths == plan.val_paths  # every rank computes the same split
    other = make_plan(None, None, 0.25, 4, labels=str(table), columns=columns)
    assert other.val_paths != plan.val_paths
    # image by image: val_count of the whole set, a seeded permutation of the rows
    loose = make_plan(None, None, 0.25, 3, labels=str(table), columns=Columns(labels=("Edema", "Effusion")))
    assert len(loose.val_paths) == val_count(36, 0.25) and {patient[p] for p in loose.val_paths} & {
        patient[p] for p in loose.train_paths
    }
    assert sorted(loose.train_paths + loose.val_paths) == sorted(read_labels(table, columns).paths)


def test_a_split_too_small_for_validation_says_so(tmp_path, write_image):
    table = grouped_table(tmp_path, write_image, patients=1)
    with pytest.raises(UserError, match=r"no validation images in .*\(3 images\): give --val-labels .* 2 groups"):
        make_plan(None, None, 0.25, 0, labels=str(table), columns=Columns(all_labels=True, patient="patient"))


def test_counts_and_balanced_weights_per_label(tmp_path, write_image):
    table = write_table(tmp_path, CHEX_HEADER, CHEX_ROWS, write_image)
    columns = Columns(all_labels=True, patient="patient", uncertain="ignore")
    plan = make_plan(None, None, 0, 0, labels=str(table), val_labels=str(table), columns=columns)
    # Atelectasis: 0, 1, masked, 0 -> 2 negatives, 1 positive; Edema: blank=0, 1, 0, masked
    counts = plan.class_counts()
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, [[2, 2, 1], [1, 1, 2]])
    w = class_weights(counts, "balanced")
    assert w.dtype == np.float32 and w.shape == (2, 3)
    np.testing.assert_allclose(w, [[3 / 4, 3 / 4, 3 / 2], [3 / 2, 3 / 2, 3 / 4]])
    np.testing.assert_array_equal(class_weights(counts, "none"), np.ones((2, 3), np.float32))
    np.testing.assert_allclose(class_weights(np.array([3, 1]), "balanced"), [2 / 3, 2.0])  # single-label: as ever


def test_a_shard_keeps_float_labels_and_their_masks(tmp_path, write_image):
    table = write_table(tmp_path, CHEX_HEADER, CHEX_ROWS, write_image)
    columns = Columns(all_labels=True, patient="patient", uncertain="ignore")
    plan = make_plan(None, None, 0, 0, labels=str(table), val_labels=str(table), columns=columns)
    shard = load_shard(plan, 16, 0, (0, 1), (0, 1), cache_dir=str(tmp_path / "cache"))
    assert shard.train_y.dtype == np.float32 and shard.train_y.shape == (4, 3)
    np.testing.assert_array_equal(shard.val_y, plan.val_labels[shard.val_index])
    assert np.isnan(shard.train_y).sum() == 3
    empty = load_shard(plan, 16, 0, (0, 1), (4, 5), cache_dir=str(tmp_path / "cache"))  # 5 parts of 4 rows: none
    assert empty.val_y.shape == (0, 3) and empty.val_y.dtype == np.float32


def test_a_validation_table_gives_the_training_label_names(tmp_path, write_image):
    table = write_table(tmp_path, CHEX_HEADER, CHEX_ROWS, write_image)
    # the same labels in another column order, other images
    shuffled = [[f"v{r[0]}", r[1], r[4], r[2], r[3]] for r in CHEX_ROWS]
    val = write_table(tmp_path, ["path", "patient", "Effusion", "Atelectasis", "Edema"], shuffled, write_image, "v.csv")
    columns = Columns(all_labels=True, patient="patient")
    plan = make_plan(None, None, 0, 0, labels=str(table), val_labels=str(val), columns=columns)
    assert plan.classes == ["Atelectasis", "Edema", "Effusion"]
    np.testing.assert_array_equal(plan.val_labels, plan.train_labels)  # read in the training's order
    lacking = write_table(
        tmp_path, ["path", "patient", "Atelectasis", "Edema"], [["va.png", "p", "1", "0"]], write_image, "l.csv"
    )
    with pytest.raises(
        UserError, match=r"label columns in .* do not match the training label columns .*missing Effusion"
    ):
        make_plan(None, None, 0, 0, labels=str(table), val_labels=str(lacking), columns=columns)
    by_name = Columns(labels=("Effusion", "Edema"))
    with pytest.raises(UserError, match=r"no column 'Effusion' .*--label-columns"):
        make_plan(None, None, 0, 0, labels=str(table), val_labels=str(lacking), columns=by_name)


def test_a_validation_findings_table_may_lack_a_finding_but_not_add_one(tmp_path, write_image):
    rows = [["a.png", "Edema|Mass", "1"], ["b.png", "No Finding", "2"], ["c.png", "Hernia", "3"]]
    table = write_table(tmp_path, NIH_HEADER, rows, write_image)
    val = write_table(tmp_path / "v", NIH_HEADER, [["d.png", "Mass", "4"]], write_image)
    plan = make_plan(None, None, 0, 0, labels=str(table), val_labels=str(val), columns=NIH)
    assert plan.classes == ["Edema", "Hernia", "Mass"]
    np.testing.assert_array_equal(plan.val_labels, [[0, 0, 1]])
    new = write_table(tmp_path / "n", NIH_HEADER, [["e.png", "Pneumonia|Mass", "5"]], write_image)
    with pytest.raises(UserError, match=r"findings that are no training label: Pneumonia \(training labels: Edema"):
        make_plan(None, None, 0, 0, labels=str(table), val_labels=str(new), columns=NIH)


def test_plan_for_a_config_reads_the_multi_label_options(tmp_path, write_image):
    table = write_table(tmp_path, NIH_HEADER, [["a.png", "Edema", "1"], ["b.png", "No Finding", "2"]], write_image)
    cfg = TrainConfig(
        labels=str(table),
        val_labels=str(table),
        path_column="Image Index",
        findings_column="Finding Labels",
        patient_column=None,
    )
    assert Columns.of(cfg) == Columns(path="Image Index", findings="Finding Labels")
    plan = plan_for(cfg)
    assert plan.classes == ["Edema"] and plan.train_labels.shape == (2, 1)
    single = TrainConfig(labels=str(table), path_column="Image Index", label_column="Finding Labels")
    assert Columns.of(single) == Columns("Image Index", "Finding Labels")  # single-label: as before


@pytest.mark.parametrize(
    "options, message",
    [
        ({"label_columns": "A,B"}, "--label-columns needs --labels FILE.csv"),
        ({"labels": "t.csv", "label_columns": "A", "multi_label": True}, "not --label-columns and --multi-label"),
        ({"labels": "t.csv", "multi_label": True, "label_column": "dx"}, "--label-column names the one class column"),
        ({"labels": "t.csv", "label_columns": "A,,B"}, "empty column name"),
        ({"labels": "t.csv", "label_columns": "A, B,A"}, "names A twice"),
        ({"labels": "t.csv", "label_columns": "path,B"}, "'path' is the --path-column"),
        ({"labels": "t.csv", "findings_column": "p", "patient_column": "p"}, "'p' is the --patient-column"),
        ({"labels": "t.csv", "multi_label": True, "uncertain": "maybe"}, "--uncertain must be one of zeros"),
        ({"labels": "t.csv", "multi_label": True, "blank": "ones"}, "--blank must be one of zeros, ignore"),
        ({"labels": "t.csv", "findings_column": "F", "uncertain": "ones"}, "--uncertain / --blank need"),
        ({"labels": "t.csv", "label_columns": "A", "no_finding": "normal"}, "--no-finding needs --findings-column"),
        ({"labels": "t.csv", "findings_column": "F", "no_finding": " "}, "--no-finding must name a value"),
    ],
)
def test_option_rules(options, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**options)


def test_valid_option_sets():
    check_multi_label(TrainConfig(labels="t.csv", label_columns="A, B", uncertain="ignore", blank="ignore"))
    assert Columns.of(TrainConfig(labels="t.csv", label_columns=" A, B")).labels == ("A", "B")
    TrainConfig(labels="t.csv", findings_column="Finding Labels", no_finding="normal", patient_column="Patient ID")


def test_cli_bad_tables_are_one_line_exit_2(tmp_path, write_image, capsys):
    from mpitrain.cli import main

    chex = write_table(tmp_path, CHEX_HEADER, CHEX_ROWS, write_image)
    blank = write_table(tmp_path / "b", [*CHEX_HEADER, "Fracture"], [[*r, ""] for r in CHEX_ROWS], write_image)
    bad = write_table(tmp_path / "v", CHEX_HEADER, [*CHEX_ROWS, ["e.png", "p", "0", "x", "0"]], write_image)
    nih = write_table(tmp_path / "n", NIH_HEADER, [["a.png", "Edema", "1"], ["b.png", "", "2"]], write_image)
    nih_opts = ["--path-column", "Image Index", "--findings-column", "Finding Labels"]
    cases = [
        (["train", "--labels", chex, "--label-columns", "Edema,Nope", "--epochs", "1"], "has no column 'Nope'"),
        (["data", "--labels", nih, *nih_opts], "row 3: empty 'Finding Labels'"),
        (["train", "--labels", blank, "--multi-label", "--patient-column", "patient"], "'Fracture' is blank in all"),
        (["data", "--labels", bad, "--label-columns", "Edema"], "row 6, column 'Edema': 'x' is not a label value"),
        (["train", "--multi-label"], "--multi-label needs --labels"),
        (["data", "--labels", chex, "--multi-label", "--findings-column", "F"], "give one of --label-columns"),
        (["train", "--labels", chex, "--uncertain", "ones"], "--uncertain / --blank need"),
    ]
    for argv, message in cases:
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mpitrain: error: ") and message in err[0], (argv, err)


def test_data_reports_positives_per_label_and_the_grouped_split(tmp_path, write_image, capsys):
    from mpitrain.cli import main

    table = grouped_table(tmp_path, write_image)
    argv = ["data", "--labels", str(table), "--multi-label", "--patient-column", "patient", "--uncertain", "ignore"]
    assert main([*argv, "--image-size", "16", "--cache-dir", str(tmp_path / "cache"), "--val-split", "0.25"]) == 0
    out = capsys.readouterr().out
    index = read_labels(table, Columns(all_labels=True, patient="patient", uncertain="ignore"))
    assert "labels:         3 (multi-label: images with each finding)" in out
    for name, n in index.counts().items():
        assert any(line.split()[:2] == [name, str(n)] for line in out.splitlines()), (name, out)
    assert f"masked:         {int(np.isnan(index.labels).sum())} label entries" in out
    assert "grouped split:  9 validation images (positives: Atelectasis" in out
    assert "imbalance" not in out


def test_patients_named_in_chexpert_paths_group_the_split(tmp_path, write_image):
    # CheXpert has no patient column: its paths name the patient (train/patient00001/study1/...)
    rows = [[f"train/patient{p:05d}/study1/view{v}.png", "1", "0", ""] for p in range(6) for v in range(2)]
    table = write_table(tmp_path, ["Path", "Atelectasis", "Edema", "Effusion"], rows, write_image)
    columns = Columns(path="Path", labels=("Atelectasis", "Edema"))
    plan = make_plan(None, None, 0.34, 0, group_pattern=r"patient\d+", labels=str(table), columns=columns)
    assert len(plan.val_paths) == 4 and len({Path(p).parent.parent for p in plan.val_paths}) == 2
    assert not {Path(p).parent.parent for p in plan.val_paths} & {Path(p).parent.parent for p in plan.train_paths}
