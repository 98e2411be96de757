"""`mpitrain evaluate`: agrees with predict's CSV, is exact on N ranks, refuses wrong models."""

import csv
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from mpirun import cli, mpirun
from mpitrain.cli import main
from mpitrain.engine.metrics import classification_metrics

UNTIMED = ("seconds", "total_seconds", "ranks")


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory, synth_data):
    """The synthetic images plus one unreadable file (it must be skipped, and listed)."""
    data = tmp_path_factory.mktemp("evaldata") / "data"
    shutil.copytree(synth_data, data)
    (data / "NORMAL" / "NORMAL-00017b.png").write_bytes(b"not a png at all")
    return data


@pytest.fixture(scope="module")
def one_rank(run, eval_data, tmp_path_factory):
    """evaluate in this process on one rank: (exit code, stdout, JSON, plots folder)."""
    folder = tmp_path_factory.mktemp("eval")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(
            [
                "evaluate",
                "--model",
                str(run / "model.keras"),
                "--data",
                str(eval_data),
                "--json",
                str(folder / "eval.json"),
                "--plots",
                str(folder / "plots"),
            ]
        )
    return code, buf.getvalue(), json.loads((folder / "eval.json").read_text()), folder / "plots"


def _untimed(doc):
    return {k: v for k, v in doc.items() if k not in UNTIMED}


def one_line_error(code, err, *words):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]


def test_evaluate_prints_a_table_and_writes_json_and_plots(one_rank, run):
    code, out, doc, plots = one_rank
    assert code == 0
    for word in (
        "accuracy",
        "balanced accuracy",
        "sensitivity",
        "specificity",
        "F1",
        "ROC AUC",
        "PR AUC",
        "confusion matrix",
        "P(PNEUMONIA) >=",
        "class odds of the training loss",
        "validated during training on",
    ):
        assert word in out, word
    model_info = json.loads((run / "model.json").read_text())
    assert doc["threshold"] == model_info["threshold"] and doc["threshold_source"] == "model"
    assert doc["n_samples"] == 80 and doc["per_class_counts"] == {"NORMAL": 40, "PNEUMONIA": 40}
    assert doc["positive_class"] == "PNEUMONIA" and doc["ranks"] == 1
    assert [Path(p).name for p, _ in doc["skipped_files"]] == ["NORMAL-00017b.png"]
    for key in ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc"):
        # The table shows the JSON's numbers (n/a where undefined, e.g. precision with no positive call).
        assert ("n/a" if doc[key] is None else f"{doc[key]:.4f}") in out, key
    assert sorted(p.name for p in plots.iterdir()) == ["confusion_matrix.png", "roc_curve.png"]
    # Two times, each saying what it covers: the whole command (model loading included) and decoding + predicting.
    assert 0 < doc["seconds"] < doc["total_seconds"]
    assert f"time: {doc['total_seconds']:.1f}s since the command started" in out
    assert f"of which {doc['seconds']:.1f}s decoding, predicting and gathering" in out


def test_evaluate_agrees_with_metrics_recomputed_from_predict_csv(one_rank, run, eval_data, tmp_path, capsys):
    _, _, doc, _ = one_rank
    out_csv = tmp_path / "pred.csv"
    # Another order (PNEUMONIA first), so every image is predicted in a different batch.
    code = main(
        ["predict", "--model", str(run), str(eval_data / "PNEUMONIA"), str(eval_data / "NORMAL"), "--csv", str(out_csv)]
    )
    assert code == 1  # the unreadable file is a row with an error
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows if r["error"]] == ["NORMAL-00017b.png"]
    rows = [r for r in rows if not r["error"]]
    classes = ["NORMAL", "PNEUMONIA"]
    labels = [classes.index(Path(r["path"]).relative_to(eval_data).parts[0]) for r in rows]
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    recomputed = classification_metrics(labels, probs, classes, threshold=doc["threshold"], positive=1)
    assert recomputed == {k: doc[k] for k in recomputed}  # exactly, every number
    assert [r["predicted"] for r in rows] == [classes[int(p[1] >= doc["threshold"])] for p in probs]


@pytest.mark.mpi
@pytest.mark.timeout(240)
def test_sharded_evaluation_on_2_and_3_ranks_equals_one_rank(one_rank, run, eval_data, tmp_path, capsys):
    _, _, ref, _ = one_rank
    # Test-time augmentation and --shift draw per image: 2 ranks must give one rank's numbers too.
    views = ["--tta", "3", "--shift", "xray-strong", "--tta-seed", "7"]
    assert (
        main(["evaluate", "--model", str(run), "--data", str(eval_data), "--json", str(tmp_path / "tta1.json")] + views)
        == 0
    )
    out = capsys.readouterr().out
    assert "mean of 3 views (the image and 2 draws of xray, seed 7)" in out
    tta1 = json.loads((tmp_path / "tta1.json").read_text())
    assert tta1["tta"] == {"views": 3, "augment": "xray", "seed": 7} and tta1["shift"]["augment"] == "xray-strong"
    assert tta1["per_class_counts"] == ref["per_class_counts"] and tta1["roc_auc"] != ref["roc_auc"]
    # 2 ranks under a plain mpiexec (with the views), 3 ranks through `mpitrain evaluate -n 3`.
    two, _ = mpirun(
        2,
        cli("evaluate", "--model", run / "model.keras", "--data", eval_data, "--json", tmp_path / "two.json", *views),
        timeout=180,
    )
    assert two.returncode == 0, two.stderr
    wall = time.time()
    three = subprocess.run(
        cli("evaluate", "-n", 3, "--model", run, "--data", eval_data, "--json", tmp_path / "three.json"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    wall = time.time() - wall
    assert three.returncode == 0, three.stderr
    # The total counts from the launcher's start: starting mpiexec, 3 ranks, TensorFlow, the model.
    total = json.loads((tmp_path / "three.json").read_text())["total_seconds"]
    assert 0.5 * wall < total <= wall, (total, wall)
    assert f"time: {total:.1f}s since the command started (starting the ranks" in three.stdout
    for proc, name, n, want in ((two, "two.json", 2, tta1), (three, "three.json", 3, ref)):
        doc = json.loads((tmp_path / name).read_text())
        assert doc["ranks"] == n
        assert _untimed(doc) == _untimed(want)  # bit-identical numbers
        assert proc.stdout.count("confusion matrix") == 1  # rank 0 alone prints
        assert proc.stderr.count("skipped 1 unreadable file") == 1


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_a_setup_error_under_mpiexec_is_reported_once(run, tmp_path, write_image):
    write_image(tmp_path / "d" / "cat" / "a.png")
    write_image(tmp_path / "d" / "dog" / "a.png")
    proc, _ = mpirun(2, cli("evaluate", "--model", run, "--data", tmp_path / "d"), timeout=100)
    assert proc.returncode != 0
    assert proc.stderr.count("was trained for classes NORMAL, PNEUMONIA") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_threshold_override_changes_the_decision(run, synth_data, tmp_path, capsys):
    code = main(
        [
            "evaluate",
            "--model",
            str(run),
            "--data",
            str(synth_data),
            "--threshold",
            "0",
            "--json",
            str(tmp_path / "t0.json"),
        ]
    )
    assert code == 0
    doc = json.loads((tmp_path / "t0.json").read_text())
    assert doc["threshold"] == 0.0 and doc["threshold_source"] == "--threshold"
    assert doc["confusion_matrix"] == [[0, 40], [0, 40]]  # everything called PNEUMONIA
    assert doc["sensitivity"] == 1.0 and doc["specificity"] == 0.0


def test_adjust_prior_estimates_the_mix_of_the_images_evaluated(run, synth_data, tmp_path, capsys):
    # Three NORMAL images to each PNEUMONIA one: the estimate must lean to NORMAL.
    data = tmp_path / "mix"
    shutil.copytree(synth_data / "NORMAL", data / "NORMAL")
    (data / "PNEUMONIA").mkdir()
    for f in sorted((synth_data / "PNEUMONIA").iterdir())[:13]:
        shutil.copy(f, data / "PNEUMONIA" / f.name)
    args = ["evaluate", "--model", str(run), "--data", str(data), "--json", str(tmp_path / "a.json"), "--adjust-prior"]
    assert main(args) == 0
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "a.json").read_text())
    a = doc["prior_adjustment"]
    assert a["trained_for"] == {"NORMAL": 0.5, "PNEUMONIA": 0.5} and a["trained_for_from"] == "recorded with the model"
    assert a["estimated"]["NORMAL"] > 0.6 and a["converged"]
    assert doc["threshold"] is None and "argmax of the adjusted probabilities" in out
    assert "these images estimated at NORMAL" in out


def test_predict_with_tta_is_the_same_in_any_order(run, synth_data, tmp_path, capsys):
    rows = {}
    for name, folders in (("a", ["NORMAL", "PNEUMONIA"]), ("b", ["PNEUMONIA", "NORMAL"])):
        args = ["predict", "--model", str(run), *(str(synth_data / f) for f in folders), "--tta", "3"]
        assert main(args + ["--csv", str(tmp_path / f"{name}.csv")]) == 0
        with open(tmp_path / f"{name}.csv", newline="") as f:
            rows[name] = {r["path"]: r["p_PNEUMONIA"] for r in csv.DictReader(f)}
    # The same views whatever the order: equal probabilities, to float32 rounding. Not to the
    # bit: an image's place in the batch can change the last bit of the model's sums on some
    # CPUs (AVX2 without AVX-512, measured: 4e-8), while another draw of views moves them by 1e-3.
    assert rows["a"].keys() == rows["b"].keys() and len(rows["a"]) == 80
    for path, p in rows["a"].items():
        assert float(p) == pytest.approx(float(rows["b"][path]), abs=1e-6), path
    assert main(["predict", "--model", str(run), str(synth_data), "--csv", str(tmp_path / "plain.csv")]) == 0
    with open(tmp_path / "plain.csv", newline="") as f:
        plain = {r["path"]: r["p_PNEUMONIA"] for r in csv.DictReader(f)}
    assert plain != rows["a"]  # the views changed the probabilities
    assert "test-time augmentation: 3 views" in capsys.readouterr().out


def _copy_run(run, dest, **changes):
    shutil.copytree(run, dest)
    info = json.loads((dest / "model.json").read_text())
    info.update(changes)
    (dest / "model.json").write_text(json.dumps(info))
    return dest


@pytest.mark.parametrize(
    "case, words",
    [
        ("image_size", ["16x16", "--image-size 24"]),
        ("classes", ["trained for classes NORMAL, PNEUMONIA", "cat, dog"]),
        ("newer_model_json", ["format 2", "upgrade"]),
        ("newer_config_json", ["config.json", "format 3", "upgrade"]),
        ("tampered_size", ["model.json says 24x24", "do not belong together"]),
        ("missing", ["does not exist"]),
    ],
)
def test_wrong_models_are_refused_with_one_line(case, words, run, synth_data, tmp_path, write_image, capsys):
    model, data, extra = run, synth_data, []
    if case == "image_size":
        extra = ["--image-size", "24"]
    elif case == "classes":
        write_image(tmp_path / "d" / "cat" / "a.png")
        write_image(tmp_path / "d" / "dog" / "a.png")
        data = tmp_path / "d"
    elif case == "newer_model_json":
        model = _copy_run(run, tmp_path / "r", format=2)
    elif case == "newer_config_json":
        model = _copy_run(run, tmp_path / "r")
        cfg = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(dict(cfg, format=3)))
    elif case == "tampered_size":
        model = _copy_run(run, tmp_path / "r", image_size=24)
    else:
        model = tmp_path / "nothing"
    capsys.readouterr()
    code = main(["evaluate", "--model", str(model), "--data", str(data), *extra])
    one_line_error(code, capsys.readouterr().err, *words)
    if case in ("image_size", "newer_model_json", "tampered_size"):  # predict refuses alike
        code = main(["predict", "--model", str(model), str(data), *extra])
        one_line_error(code, capsys.readouterr().err, *words)


def test_a_model_with_python_code_is_refused_in_safe_mode(tmp_path, synth_data, capsys):
    import keras

    inp = keras.Input((16, 16, 1))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inp)
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(x))
    keras.Model(inp, out).save(tmp_path / "model.keras")
    (tmp_path / "model.json").write_text(
        json.dumps(
            {
                "format": 1,
                "classes": ["NORMAL", "PNEUMONIA"],
                "image_size": 16,
                "threshold": None,
                "threshold_method": "argmax",
                "positive_class": "PNEUMONIA",
            }
        )
    )
    capsys.readouterr()
    code = main(["evaluate", "--model", str(tmp_path), "--data", str(synth_data)])
    one_line_error(code, capsys.readouterr().err, "refusing to load", "safe mode")


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--merge-classes", "ANY=NORMAL,PNEUMONIA"], ["leaves a single class"]),
        (["--merge-classes", "X=NORMAL,COVID"], ["no class 'COVID'", "NORMAL, PNEUMONIA"]),
        (["--tta", "0"], ["--tta"]),
        (["--shift", "wobble"], ["--shift", "xray-strong"]),
    ],
)
def test_view_and_merge_mistakes_are_one_line(extra, words, run, synth_data, cli_error):
    cli_error(["evaluate", "--model", run, "--data", synth_data, *extra], *words)
