"""`mpitrain predict` on paths that name one file twice: one row per file, and a note."""

import csv
import os

from mpitrain.evaluate.predict import collect, unique


def test_a_file_named_and_inside_a_folder_given_is_kept_once(tmp_path, write_image):
    a, b = write_image(tmp_path / "d" / "a.png"), write_image(tmp_path / "d" / "b.png")
    os.symlink(b, tmp_path / "link.png")
    items, again = unique(collect([str(a), str(tmp_path / "d"), str(tmp_path / "link.png")]))
    assert [p for p, _ in items] == [str(a), str(b)]  # argument order, the first of each
    assert again == [str(a), str(tmp_path / "link.png")]


def test_error_rows_are_not_merged(tmp_path):
    missing = str(tmp_path / "gone.png")
    items, again = unique(collect([missing, missing]))
    assert len(items) == 2 and again == []


def test_predict_writes_one_row_per_file_and_says_so_once(tiny_run, synth_data, tmp_path, capsys):
    from mpitrain.cli import main

    folder = next(p for p in synth_data.iterdir() if p.is_dir())
    one = sorted(folder.rglob("*.png"))[0]
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(tiny_run), str(one), str(folder), "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(list(folder.rglob("*.png")))
    assert [r["path"] for r in rows].count(str(one)) == 1
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "1 file(s) given more than once" in notes[0]
