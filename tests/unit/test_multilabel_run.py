"""`mpitrain train` on multi-label tables, in one process: a CheXpert-style table (1 / 0 /
-1 / blank, a patient column) with `--uncertain ignore` learns its independent findings,
and the run folder speaks of labels: per-label metrics and thresholds, a report table,
validation predictions with the masked entries left empty; an NIH-style findings column
trains too.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from mpitrain import runfiles
from mpitrain.cli import main

FINDINGS = ["Edema", "Effusion", "Nodule"]


def _table(folder, n=120, seed=0):
    """Images where finding l lights up band l of the rows; the rows of the table, CheXpert style:
    a positive 1, a negative 0 (or blank), and some uncertain -1."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    rows = []
    for i in range(n):
        y = rng.random(3) < 0.4
        img = (rng.random((16, 16)) * 60).astype(np.uint8)
        for lab in range(3):
            if y[lab]:
                img[5 * lab : 5 * lab + 5] += 150
        name = f"img{i:03d}.png"
        cv2.imwrite(str(folder / name), img)
        cells = ["1" if v else rng.choice(["0", ""]) for v in y]
        if i % 7 == 0:
            cells[i % 3] = "-1"  # uncertain
        rows.append([name, f"p{i // 2}", *cells])
    return rows


def _write(path, header, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def _train(capsys, *options):
    rc = main(["train", *options, "--model", "tiny", "--image-size", "16", "--epochs", "6", "--batch-size", "16"])
    return rc, capsys.readouterr()


def test_a_chexpert_style_table_trains_and_the_run_speaks_of_labels(tmp_path, capsys):
    rows = _table(tmp_path / "img")
    table = tmp_path / "img" / "labels.csv"
    _write(table, ["path", "patient", *FINDINGS], rows)
    run = tmp_path / "run"
    args = ["--labels", str(table), "--label-columns", ",".join(FINDINGS), "--patient-column", "patient"]
    rc, out = _train(capsys, *args, "--uncertain", "ignore", "--out", str(run), "--lr", "0.01")
    assert rc == 0, out.err
    metrics = json.loads((run / runfiles.METRICS).read_text())
    assert metrics["multi_label"] and metrics["label_names"] == FINDINGS
    assert set(metrics["per_label"]) == set(FINDINGS)
    assert metrics["mean_roc_auc"] > 0.9, metrics["per_label"]
    assert sum(m["masked"] for m in metrics["per_label"].values()) > 0  # the -1 cells of validation
    info = json.loads((run / runfiles.MODEL_INFO).read_text())
    assert info["multi_label"] and list(info["thresholds"]) == FINDINGS
    assert all(t == 0.5 for t in info["thresholds"].values())  # prior: balanced weights per label
    report = (run / runfiles.REPORT).read_text()
    assert "| Edema |" in report and "mean ROC AUC" in report
    with open(run / runfiles.VAL_PREDICTIONS, newline="") as f:
        val = list(csv.reader(f))
    assert val[0] == ["path", *FINDINGS] + [f"p_{c}" for c in FINDINGS]
    assert any("" in r[1:4] for r in val[1:])  # a masked entry is an empty cell
    with open(run / runfiles.HISTORY, newline="") as f:
        history = list(csv.DictReader(f))
    assert float(history[-1]["val_mean_auc"]) == pytest.approx(float(history[-1]["val_auc"]))
    _evaluate(tmp_path, capsys, run, metrics)


def _evaluate(tmp_path, capsys, run, trained):
    """`evaluate` reads a table of new images by the model's label names (their columns in
    another order, a -1 masked with --uncertain ignore), with the model's thresholds or one
    --threshold for all; class folders are refused for a multi-label model."""
    rows = _table(tmp_path / "new", n=60, seed=5)
    table = tmp_path / "new" / "new.csv"
    _write(table, ["Nodule", "path", "Edema", "Effusion"], [[r[4], r[0], r[2], r[3]] for r in rows])
    out_json = tmp_path / "e.json"
    assert (
        main(
            ["evaluate", "--model", str(run), "--labels", str(table), "--uncertain", "ignore", "--json", str(out_json)]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "mean ROC AUC" in text and "Effusion" in text
    e = json.loads(out_json.read_text())
    assert e["label_names"] == FINDINGS and e["n_samples"] == 60 and e["mean_roc_auc"] > 0.9
    masked = sum(1 for r in rows for c in r[2:] if c == "-1")
    assert sum(v["masked"] for v in e["per_label"].values()) == masked > 0
    positives = [sum(r[2 + i] == "1" for r in rows) for i in range(3)]
    assert [e["per_label"][c]["positives"] for c in FINDINGS] == positives
    assert e["thresholds"] == json.loads((run / runfiles.MODEL_INFO).read_text())["thresholds"]
    assert (
        main(["evaluate", "--model", str(run), "--labels", str(table), "--threshold", "0.9", "--json", str(out_json)])
        == 0
    )
    capsys.readouterr()
    high = json.loads(out_json.read_text())
    assert set(high["thresholds"].values()) == {0.9} and high["threshold_source"] == "--threshold"
    assert high["mean_sensitivity"] <= e["mean_sensitivity"]
    assert main(["evaluate", "--model", str(run), "--data", str(tmp_path / "new")]) == 2
    assert "is multi-label" in capsys.readouterr().err
    _predict(tmp_path, capsys, run, rows)
    _export(tmp_path, capsys, run)


def _export(tmp_path, capsys, run):
    """`export`: export.json names the labels and their thresholds; checked on validation images."""
    target = tmp_path / "export"
    assert main(["export", str(run), "--format", "savedmodel", "--out", str(target)]) == 0
    capsys.readouterr()
    doc = json.loads((target / "export.json").read_text())
    info = json.loads((run / runfiles.MODEL_INFO).read_text())
    assert doc["multi_label"] and doc["labels"] == FINDINGS and doc["thresholds"] == info["thresholds"]
    assert "sigmoid" in doc["output"]["meaning"] and doc["check"]["decisions_changed"] == 0
    assert "validation images" in doc["check"]["inputs"]


def _predict(tmp_path, capsys, run, rows):
    """`predict`: a p_<label> column each, the set at or above the thresholds, the rule."""
    out_csv = tmp_path / "p.csv"
    assert main(["predict", "--model", str(run), str(tmp_path / "new"), "--csv", str(out_csv)]) == 0
    capsys.readouterr()
    with open(out_csv, newline="") as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(rows) and list(got[0])[2:5] == [f"p_{c}" for c in FINDINGS]
    ts = json.loads((run / runfiles.MODEL_INFO).read_text())["thresholds"]
    for r in got:
        expected = [c for c in FINDINGS if float(r[f"p_{c}"]) >= ts[c]]
        assert r["predicted"] == "|".join(expected)
        assert r["decision"] == "; ".join(f"p_{c} >= {ts[c]!r}" for c in FINDINGS)
    truth = {r[0]: dict(zip(FINDINGS, r[2:])) for r in rows}
    decided = [
        (c in r["predicted"].split("|")) == (truth[Path(r["path"]).name][c] == "1")
        for r in got
        for c in FINDINGS
        if truth[Path(r["path"]).name][c] != "-1"
    ]
    assert sum(decided) / len(decided) > 0.8  # the findings are easy: most decisions are right


def test_an_nih_style_findings_column_trains(tmp_path, capsys):
    rows = _table(tmp_path / "img", n=80, seed=1)
    table = tmp_path / "img" / "Data_Entry.csv"
    findings = ["|".join(f for f, c in zip(FINDINGS, r[2:]) if c == "1") or "No Finding" for r in rows]
    _write(table, ["Image Index", "Finding Labels", "Patient ID"], [[r[0], f, r[1]] for r, f in zip(rows, findings)])
    run = tmp_path / "run"
    options = [
        "--labels",
        str(table),
        "--path-column",
        "Image Index",
        "--findings-column",
        "Finding Labels",
        "--patient-column",
        "Patient ID",
    ]
    rc, out = _train(capsys, *options, "--out", str(run))
    assert rc == 0, out.err
    metrics = json.loads((run / runfiles.METRICS).read_text())
    assert metrics["label_names"] == sorted(FINDINGS)
    assert all(m["roc_auc"] is not None for m in metrics["per_label"].values())
    # An ensemble of two runs chosen with Youden's J label by label on their shared validation images.
    runs = []
    for seed in (0, 1):
        runs.append(tmp_path / f"youden{seed}")
        rc, out = _train(
            capsys,
            *options,
            "--threshold-policy",
            "youden",
            "--seed",
            str(seed),
            "--split-seed",
            "0",
            "--out",
            str(runs[-1]),
        )
        assert rc == 0, out.err
    e_json = tmp_path / "ensemble.json"
    args = ["evaluate", "--model", str(runs[0]), "--model", str(runs[1]), "--labels", str(table)]
    assert (
        main([*args, "--path-column", "Image Index", "--findings-column", "Finding Labels", "--json", str(e_json)]) == 0
    )
    capsys.readouterr()
    e = json.loads(e_json.read_text())
    members = [json.loads((r / runfiles.MODEL_INFO).read_text())["thresholds"] for r in runs]
    assert set(e["thresholds"]) == set(FINDINGS) and e["thresholds"] != members[0]  # chosen again, on the mean
    assert e["per_label"]["Edema"]["threshold_method"] == "youden"


def test_mpitrain_fit_takes_multi_label_arrays_and_writes_the_run_folder(tmp_path):
    import keras

    import mpitrain

    rng = np.random.default_rng(3)
    y = (rng.random((96, 3)) < 0.4).astype(np.float32)
    x = rng.random((96, 8, 8, 1)).astype(np.float32) * 0.2
    for lab in range(3):
        x[y[:, lab] == 1, 2 * lab : 2 * lab + 2] += 0.8
    y[::9, 1] = np.nan  # masked
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3, activation="sigmoid")]
    )
    run = tmp_path / "run"
    result = mpitrain.fit(model, x, y, classes=FINDINGS, out=run, epochs=6, batch_size=16, lr=0.05, progress=False)
    assert "val_mean_auc" in result.history[-1]
    metrics = json.loads((run / runfiles.METRICS).read_text())
    assert metrics["label_names"] == FINDINGS and metrics["mean_roc_auc"] > 0.9
    with pytest.raises(Exception, match=r"multi-label rows must be \[n, 3\]"):
        mpitrain.fit(model, x, np.full((96, 3), 2.0), out=tmp_path / "bad", epochs=1, progress=False)
