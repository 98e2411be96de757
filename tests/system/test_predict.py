"""`mpitrain predict`: a row per image, errors as rows, the threshold, more than two classes."""

import csv
import io
import json
import shutil

import numpy as np
import pytest
from test_evaluate import one_line_error

from mpirun import train_run
from mpitrain.cli import main


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def three_class_run(tmp_path_factory, synth_data):
    """A tiny model for classes a, b, c (copies of the synthetic images, 20 each)."""
    data = tmp_path_factory.mktemp("three") / "data"
    for name, src, start in (("a", "NORMAL", 0), ("b", "PNEUMONIA", 0), ("c", "NORMAL", 20)):
        (data / name).mkdir(parents=True)
        for f in sorted((synth_data / src).iterdir())[start : start + 20]:
            shutil.copy(f, data / name / f.name)
    return train_run(tmp_path_factory, data, "--val-split", "0.2"), data


def _rows(text):
    return list(csv.DictReader(io.StringIO(text)))


def test_unreadable_files_become_rows_with_an_error_and_the_run_goes_on(run, synth_data, tmp_path, capsys):
    folder = tmp_path / "mixed"
    (folder / "deep" / "er").mkdir(parents=True)
    good = sorted((synth_data / "PNEUMONIA").iterdir())[:3]
    for i, f in enumerate(good):
        shutil.copy(f, (folder / "deep" / "er" if i == 0 else folder) / f.name)
    (folder / "broken.png").write_bytes(b"this is not a png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / ".hidden.png").write_bytes(b"ignored")
    (folder / "notes.txt").write_text("not an image extension: not searched")
    (tmp_path / "nothing-here").mkdir()
    code = main(
        [
            "predict",
            "--model",
            str(run),
            str(folder),
            str(tmp_path / "missing.png"),
            str(tmp_path / "nothing-here"),
            "--csv",
            str(tmp_path / "out.csv"),
        ]
    )
    assert code == 1  # some rows failed
    out = capsys.readouterr().out
    assert "predicted 3 image(s)" in out and "4 row(s) with an error" in out
    rows = _rows((tmp_path / "out.csv").read_text())
    assert list(rows[0]) == ["path", "predicted", "p_NORMAL", "p_PNEUMONIA", "decision", "error"]
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    assert set(by_name) == {f.name for f in good} | {"broken.png", "empty.jpg", "missing.png", "nothing-here"}
    for f in good:
        r = by_name[f.name]
        assert r["error"] == "" and r["predicted"] in ("NORMAL", "PNEUMONIA")
        assert float(r["p_NORMAL"]) + float(r["p_PNEUMONIA"]) == pytest.approx(1.0, abs=1e-6)
    for name in ("broken.png", "empty.jpg", "missing.png", "nothing-here"):
        r = by_name[name]
        assert r["error"] and r["predicted"] == "" and r["p_NORMAL"] == "", r
    assert "no such file" in by_name["missing.png"]["error"]
    assert "no image files" in by_name["nothing-here"]["error"]


def test_each_row_names_the_decision_rule_with_the_exact_threshold(run, synth_data, capsys):
    saved = json.loads((run / "model.json").read_text())["threshold"]
    for t, expected in ((None, saved), ("0.25", 0.25)):
        code = main(["predict", "--model", str(run), str(synth_data)] + ([] if t is None else ["--threshold", t]))
        assert code == 0
        rows = _rows(capsys.readouterr().out)
        assert {r["decision"] for r in rows} == {f"p_PNEUMONIA >= {expected!r}"}
        for r in rows:  # the row alone explains its prediction
            column, threshold = r["decision"].split(" >= ")
            assert r["predicted"] == ("PNEUMONIA" if float(r[column]) >= float(threshold) else "NORMAL")


def test_csv_goes_to_stdout_and_the_threshold_override_changes_predictions(run, synth_data, capsys):
    saved = json.loads((run / "model.json").read_text())["threshold"]
    results = {}
    for t in (None, "0", "1", "median"):
        if t == "median":
            t = str(np.median([float(r["p_PNEUMONIA"]) for r in results[None]]))
        code = main(["predict", "--model", str(run), str(synth_data)] + ([] if t is None else ["--threshold", t]))
        assert code == 0
        captured = capsys.readouterr()
        assert "predicted 80 image(s)" in captured.err  # the summary stays off the CSV
        results[t] = _rows(captured.out)
        threshold = saved if t is None else float(t)
        for r in results[t]:
            assert r["predicted"] == ("PNEUMONIA" if float(r["p_PNEUMONIA"]) >= threshold else "NORMAL")
    assert {r["predicted"] for r in results["0"]} == {"PNEUMONIA"}
    assert {r["predicted"] for r in results["1"]} == {"NORMAL"}
    assert [r["path"] for r in results["0"]] == [r["path"] for r in results[None]]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--threshold", "1.5"], ["--threshold", "[0, 1]"]),
        (["--csv", "/no/such/folder/out.csv"], ["--csv"]),
    ],
)
def test_bad_options_are_one_line(run, synth_data, args, words, capsys):
    code = main(["predict", "--model", str(run), str(synth_data), *args])
    one_line_error(code, capsys.readouterr().err, *words)


def test_more_than_two_classes_use_argmax_and_macro_micro_averages(three_class_run, tmp_path, capsys):
    run, data = three_class_run
    info = json.loads((run / "model.json").read_text())
    assert info["threshold"] is None and info["threshold_method"] == "argmax" and info["positive_class"] is None
    code = main(
        [
            "evaluate",
            "--model",
            str(run),
            "--data",
            str(data),
            "--json",
            str(tmp_path / "e.json"),
            "--plots",
            str(tmp_path / "plots"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    for word in ("macro precision", "micro F1", "ROC AUC (macro, one-vs-rest)", "argmax"):
        assert word in out
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["n_samples"] == 60 and "sensitivity" not in doc and doc["threshold"] is None
    code = main(["predict", "--model", str(run), str(data / "a"), "--csv", str(tmp_path / "p.csv")])
    assert code == 0
    rows = _rows((tmp_path / "p.csv").read_text())
    assert len(rows) == 20
    for r in rows:
        p = [float(r[f"p_{c}"]) for c in "abc"]
        assert r["predicted"] == "abc"[int(np.argmax(p))] and r["decision"] == "argmax"
    capsys.readouterr()
    code = main(["evaluate", "--model", str(run), "--data", str(data), "--threshold", "0.3"])
    one_line_error(code, capsys.readouterr().err, "two-class")


def test_evaluating_on_a_subset_of_the_classes_names_the_absent_one_and_averages_over_the_rest(
    three_class_run, tmp_path, capsys
):
    run, data = three_class_run
    subset = tmp_path / "ab"
    subset.mkdir()
    for name in "ab":
        (subset / name).symlink_to(data / name, target_is_directory=True)
    capsys.readouterr()
    code = main(["evaluate", "--model", str(run), "--data", str(subset), "--json", str(tmp_path / "e.json")])
    assert code == 0
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["absent_classes"] == ["c"] and doc["n_samples"] == 40
    absent = [line for line in out.splitlines() if "absent classes" in line]
    assert len(absent) == 1 and "c: no images in this data" in absent[0] and "the 2 classes present" in absent[0]
    per_class = out.split("per class", 1)[1].splitlines()
    assert not [line for line in per_class if line.split()[:1] == ["c"]], out  # no row of 0 images
    assert "c 0" not in out
    present = [doc["per_class"][c] for c in "ab"]
    for metric in ("precision", "recall", "f1"):
        values = [p[metric] for p in present if p[metric] is not None]
        assert doc[f"macro_{metric}"] == pytest.approx(np.mean(values)), metric
