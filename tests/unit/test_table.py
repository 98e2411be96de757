"""`mpitrain labels` (data/table.py): a label table from class folders and file names."""

import pytest

from mpitrain.data.labels import Columns, read_labels
from mpitrain.data.table import make_table, summary
from mpitrain.errors import UserError


@pytest.fixture
def xrays(tmp_path, write_image):
    root = tmp_path / "train"
    for name in ("IM-0001-0001.jpeg", "IM-0002-0001.jpeg", "NORMAL2-IM-0002-0001.jpeg"):
        write_image(root / "NORMAL" / name)
    for name in ("person1_bacteria_1.jpeg", "person1_virus_6.jpeg", "person2_bacteria_3.jpeg", "person3_virus_7.jpeg"):
        write_image(root / "PNEUMONIA" / name)
    return root


def test_classes_from_names_and_patients_read_back_by_label_files(xrays, tmp_path):
    (tmp_path / "tables").mkdir()
    out = tmp_path / "tables" / "t.csv"
    facts = make_table(str(xrays), str(out), "_(bacteria|virus)_", groups="filename-patient")
    assert facts["classes"] == {"NORMAL": 3, "bacteria": 2, "virus": 2} and facts["from_pattern"] == 4
    assert facts["patients"] == 6 and facts["unnamed"] == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "path,label,patient" and lines[1].startswith("../train/NORMAL/")  # relative to the table
    index = read_labels(str(out), Columns(patient="patient"))
    assert index.classes == ["NORMAL", "bacteria", "virus"]
    by_name = {
        p.split("/")[-1]: (index.classes[y], pat) for p, y, pat in zip(index.paths, index.labels, index.patients)
    }
    assert by_name["person1_virus_6.jpeg"] == ("virus", "person1")
    assert by_name["NORMAL2-IM-0002-0001.jpeg"] == ("NORMAL", "NORMAL2-IM-0002")
    assert "7 images, 3 classes (NORMAL 3, bacteria 2, virus 2)" in summary(str(out), facts)


def test_without_a_pattern_the_table_is_the_folder_layout(xrays, tmp_path):
    facts = make_table(str(xrays), str(tmp_path / "t.csv"), None)
    assert facts["classes"] == {"NORMAL": 3, "PNEUMONIA": 4} and facts["patients"] is None
    assert (tmp_path / "t.csv").read_text().splitlines()[0] == "path,label"


@pytest.mark.parametrize(
    "pattern, out, words",
    [
        ("_(fungus)_", "t.csv", "matches none of the 7 file names"),
        ("_(bac", "t.csv", "not a valid regular expression"),
        ("_(bacteria)_", "no/such/t.csv", "need a file in an existing folder"),
    ],
)
def test_mistakes_are_one_line_errors(xrays, tmp_path, pattern, out, words):
    with pytest.raises(UserError, match=words):
        make_table(str(xrays), str(tmp_path / out), pattern)
