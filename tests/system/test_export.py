"""`mpitrain export`: the exported files reproduce model.keras when loaded as a user would
(a fresh process, TensorFlow or the LiteRT interpreter alone); bad input is one line and
leaves every file as it was; a failed check leaves nothing behind."""

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_evaluate import one_line_error

from mpitrain.cli import main
from mpitrain.evaluate import export

LITERT = next((m for m in ("ai_edge_litert", "tflite_runtime") if importlib.util.find_spec(m)), None)

# What a user runs (docs/evaluate.md, "Export"): only TensorFlow, or only the interpreter package.
SAVEDMODEL_USER = """
import sys, numpy as np, tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
f = m.signatures["serving_default"]
spec = f.structured_input_signature[1]["pixels"]
print(spec.dtype.name, list(spec.shape))
np.save(sys.argv[3], f(pixels=tf.constant(np.load(sys.argv[2])))["probabilities"].numpy())
"""
TFLITE_USER = """
import sys, numpy as np
assert "tensorflow" not in sys.modules
try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:
    from tflite_runtime.interpreter import Interpreter
run = Interpreter(model_path=sys.argv[1]).get_signature_runner()
x = np.load(sys.argv[2])
print(run.get_input_details()["pixels"]["dtype"].__name__)
np.save(sys.argv[3], run(pixels=x)["probabilities"])
assert "tensorflow" not in sys.modules, "the interpreter must run without TensorFlow"
"""


def _val_pixels_and_reference(run):
    """Every validation image of the run as the export's uint8 input, and model.keras's
    probabilities for them computed the way training computes (float pixels / 255, Keras)."""
    import keras

    from mpitrain.data.decode import decode_images, decode_native
    from mpitrain.evaluate import valpreds

    info = json.loads((run / "model.json").read_text())
    paths = valpreds.read(run, info["classes"]).paths
    arr, max_value, ok, _ = decode_native(paths, info["image_size"])
    assert ok.all() and max_value == 255.0
    x, _, _ = decode_images(paths, info["image_size"])
    model = keras.saving.load_model(run / "model.keras", compile=False, safe_mode=True)
    return arr[..., np.newaxis], np.asarray(model(x, training=False)), info


def _run_user(code, model_path, pixels, tmp_path):
    np.save(tmp_path / "x.npy", pixels)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(model_path), str(tmp_path / "x.npy"), str(tmp_path / "p.npy")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split(), np.load(tmp_path / "p.npy")


def _export(capsys, *args):
    code = main(["export", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _tree(folder):
    """Every file under `folder` with its bytes: to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_export_json(doc, run, fmt, n_val):
    model_info = json.loads((run / "model.json").read_text())
    for key in ("classes", "positive_class", "threshold", "threshold_method", "image_size"):
        assert doc[key] == model_info[key], key
    s = model_info["image_size"]
    assert doc["model_format"] == fmt and doc["format"] == export.FORMAT
    assert doc["input"]["dtype"] == "uint8" and doc["input"]["shape"] == [None, s, s, 1]
    assert "INTER_AREA" in doc["input"]["contract"] and f"{s}x{s}" in doc["input"]["contract"]
    assert doc["decision"] == f"p_{model_info['positive_class']} >= {model_info['threshold']!r}"
    check = doc["check"]
    assert check["n"] == n_val and check["random_because"] is None and "validation images" in check["inputs"]
    assert check["max_abs_diff"] <= check["tolerance"] == export.TOLERANCE[fmt]


def test_savedmodel_reproduces_model_keras_in_a_fresh_tensorflow(tiny_run, tmp_path, capsys):
    pixels, reference, info = _val_pixels_and_reference(tiny_run)
    assert np.ptp(reference[:, 1]) > 1e-3  # images the model tells apart: a constant export would not pass
    out = tmp_path / "exports" / "sm"
    code, stdout, err = _export(capsys, tiny_run, "--format", "savedmodel", "--out", out)
    assert code == 0, err
    assert f"checked on {len(pixels)} validation images" in stdout and err == ""
    _check_export_json(json.loads((out / "export.json").read_text()), tiny_run, "savedmodel", len(pixels))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]
    spec, got = _run_user(SAVEDMODEL_USER, out, pixels, tmp_path)
    assert spec[0] == "uint8" and spec[1:] == ["[None,", f"{info['image_size']},", f"{info['image_size']},", "1]"]
    assert got.shape == reference.shape
    assert np.abs(got - reference).max() <= export.TOLERANCE["savedmodel"]


@pytest.mark.skipif(
    LITERT is None, reason="neither ai-edge-litert nor tflite-runtime is installed (pip install ai-edge-litert)"
)
def test_tflite_reproduces_model_keras_in_the_litert_interpreter(tiny_run, tmp_path, capsys):
    pixels, reference, _ = _val_pixels_and_reference(tiny_run)
    out = tmp_path / "tfl"
    out.mkdir()  # an empty folder is fine
    code, _, err = _export(capsys, tiny_run, "--format", "tflite", "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.tflite"]  # no scratch SavedModel
    doc = json.loads((out / "export.json").read_text())
    _check_export_json(doc, tiny_run, "tflite", len(pixels))
    assert doc["check"]["run_with"].startswith(LITERT.replace("_", "-"))
    dtype, got = _run_user(TFLITE_USER, out / "model.tflite", pixels, tmp_path)  # a batch of all, not 1
    assert dtype == ["uint8"]
    assert np.abs(got - reference).max() <= export.TOLERANCE["tflite"]
    if LITERT == "ai_edge_litert":
        _readme_snippet_gives(out, tiny_run, reference, doc)


def _readme_snippet_gives(out, run, reference, doc):
    """docs/evaluate.md's TFLite snippet, run as printed on one validation image, agrees with model.keras."""
    from mpitrain.evaluate import valpreds

    page = (Path(__file__).parents[2] / "docs" / "evaluate.md").read_text()
    code = page.split("Using a TFLite export with the LiteRT interpreter", 1)[1].split("```python\n", 1)[1]
    code = code.split("```", 1)[0]
    pos = doc["classes"].index(doc["positive_class"])
    i = int(np.argmax(np.abs(reference[:, pos] - doc["threshold"])))  # clear of the threshold
    image = valpreds.read(run, doc["classes"]).paths[i]
    line = 'EXPORT, IMAGE = "xray-tflite", "scan.png"'
    assert line in code
    code = code.replace(line, f"EXPORT, IMAGE = {str(out)!r}, {image!r}")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    printed, verdict = proc.stdout.strip().rsplit(" ", 1)
    probs = ast.literal_eval(printed)
    assert list(probs) == doc["classes"]
    assert np.abs(np.array(list(probs.values())) - reference[i]).max() <= export.TOLERANCE["tflite"]
    assert verdict == ("positive" if reference[i, pos] >= doc["threshold"] else "negative")


def test_overwrite_replaces_an_earlier_export_whole(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert _export(capsys, tiny_run, "--format", "savedmodel", "--out", out)[0] == 0
    code, _, err = _export(capsys, tiny_run, "--format", "tflite", "--out", out)
    one_line_error(code, err, "--overwrite", str(out))
    assert (out / "saved_model.pb").is_file()
    code, _, err = _export(capsys, tiny_run, "--format", "tflite", "--out", out, "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.tflite"]
    assert json.loads((out / "export.json").read_text())["model_format"] == "tflite"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old export is not kept aside


def test_default_out_is_in_the_run_folder(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export-*"))
    code, stdout, err = _export(capsys, run, "--format", "savedmodel")
    assert code == 0, err
    assert (run / "export-savedmodel" / "saved_model.pb").is_file() and str(run / "export-savedmodel") in stdout


def _copy_run(tiny_run, dest, *names):
    dest.mkdir()
    for name in names:
        shutil.copy(tiny_run / name, dest / name)
    return dest


def test_unreadable_validation_images_fall_back_to_seeded_random_pixels(tiny_run, tmp_path, capsys):
    run = _copy_run(tiny_run, tmp_path / "moved", "model.keras", "model.json", "config.json")
    rows = (tiny_run / "val_predictions.csv").read_text().splitlines()
    (run / "val_predictions.csv").write_text("\n".join([rows[0]] + ["/nowhere/" + r.split("/")[-1] for r in rows[1:]]))
    code, _, err = _export(capsys, run, "--format", "savedmodel", "--out", tmp_path / "out")
    assert code == 0, err
    assert "seeded random images" in err and "/nowhere/" in err  # says so, and why
    check = json.loads((tmp_path / "out" / "export.json").read_text())["check"]
    assert check["n"] == export.SAMPLE and "can be read" in check["random_because"]
    assert check["max_abs_diff"] <= export.TOLERANCE["savedmodel"]


def test_a_failed_check_leaves_nothing_behind(tiny_run, tmp_path, capsys, monkeypatch):
    real = export.exported_predictor

    def off_by_a_little(fmt, folder):  # an export whose probabilities are 1e-3 off
        predict, name = real(fmt, folder)
        return (lambda x: predict(x) + np.float32(1e-3)), name

    monkeypatch.setattr(export, "exported_predictor", off_by_a_little)
    new = tmp_path / "new" / "deeper" / "out"
    code, _, err = _export(capsys, tiny_run, "--format", "savedmodel", "--out", new)
    one_line_error(code, err, "does not reproduce", "tolerance 1e-05", "nothing written")
    assert list(tmp_path.iterdir()) == []  # the folders made for --out are gone too

    earlier = tmp_path / "earlier"  # an earlier export stays as it was when the new one fails
    monkeypatch.setattr(export, "exported_predictor", real)
    assert _export(capsys, tiny_run, "--format", "savedmodel", "--out", earlier)[0] == 0
    before = _tree(earlier)
    monkeypatch.setattr(export, "exported_predictor", off_by_a_little)
    code, _, err = _export(capsys, tiny_run, "--format", "tflite", "--out", earlier, "--overwrite")
    one_line_error(code, err, "tflite export does not reproduce")
    assert _tree(earlier) == before and sorted(p.name for p in tmp_path.iterdir()) == ["earlier"]


@pytest.mark.parametrize(
    "case",
    [
        "missing run",
        "no model.json",
        "unknown format",
        "out not empty",
        "overwrite a folder that is no export",
        "out is a file",
    ],
)
def test_bad_input_is_one_line_and_loses_nothing(case, tiny_run, tmp_path, capsys):
    run, out, extra = tiny_run, tmp_path / "out", []
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    if case == "missing run":
        run, words = tmp_path / "no-such-run", ["does not exist", "no-such-run"]
    elif case == "no model.json":  # a run folder of an older mpitrain: model, classes.json, config.json
        run, words = _copy_run(tiny_run, tmp_path / "old", "model.keras", "classes.json", "config.json"), ["model.json"]
    elif case == "unknown format":
        extra, words = ["--format", "onnx"], ["invalid choice", "onnx"]
    elif case == "out not empty":
        words = ["not empty", "--overwrite"]
    elif case == "overwrite a folder that is no export":
        extra, words = ["--overwrite"], ["holds no export.json"]
    else:
        out = tmp_path / "file"
        out.write_text("a file")
        words = ["not a folder"]
    before, run_before = _tree(tmp_path), _tree(tiny_run)
    args = ["export", str(run), "--out", str(out)] + (
        extra if "--format" in extra else ["--format", "savedmodel"] + extra
    )
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    one_line_error(code, capsys.readouterr().err, "mpitrain: error:", *words)
    assert _tree(tmp_path) == before and _tree(tiny_run) == run_before
    assert not [p for p in tmp_path.rglob(".tmp-*")]


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")  # the very point of the fallback
def test_without_litert_the_tflite_check_runs_in_tensorflows_interpreter(tiny_run, tmp_path, capsys, monkeypatch):
    import tensorflow as tf

    if not hasattr(tf.lite, "Interpreter"):
        pytest.skip(f"TensorFlow {tf.__version__} has no tf.lite.Interpreter")
    for name in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime", "tflite_runtime.interpreter"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    code, _, err = _export(capsys, tiny_run, "--format", "tflite", "--out", tmp_path / "out")
    assert code == 0, err
    check = json.loads((tmp_path / "out" / "export.json").read_text())["check"]
    assert check["run_with"].endswith("tf.lite.Interpreter") and check["max_abs_diff"] <= export.TOLERANCE["tflite"]
