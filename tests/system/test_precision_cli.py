"""--precision end to end: recorded in config.json, kept by --resume, and a bf16-trained model
that an fp32 process loads and runs in float32."""

import csv
import io
import json
import os
import subprocess
import zipfile

import numpy as np
import pytest

from mpirun import cli, script
from mpitrain.runtime import resolve_precision

pytestmark = pytest.mark.timeout(600)

TINY = ["--model", "tiny", "--image-size", 16, "--batch-size", 8, "--threads", 1]


def _run(program, **env):
    full = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **env)
    return subprocess.run(program, capture_output=True, text=True, timeout=300, env=full)


def test_precision_is_recorded_and_a_resumed_run_keeps_it(tmp_path, synth_data):
    # The precision "auto" does not resolve to here: a resume that re-resolved the option
    # (or took the command line's default) would show.
    chosen = "fp32" if resolve_precision("auto")[0] == "bf16" else "bf16"
    run = tmp_path / "run"
    # 72 training images, batch 8: 9 steps per epoch; killed in epoch 2, after its checkpoint.
    killed = _run(
        script(
            "fault_at_step.py", "train", "--data", synth_data, *TINY, "--epochs", 2, "--precision", chosen, "--out", run
        ),
        FAULT="kill",
        FAULT_RANK="0",
        FAULT_AT="12",
    )
    assert killed.returncode != 0 and not (run / "model.keras").exists()
    assert f"| {chosen}" in killed.stdout
    resumed = _run(cli("train", "--resume", "--out", run))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at epoch 2" in resumed.stdout and f"| {chosen}" in resumed.stdout
    doc = json.loads((run / "config.json").read_text())
    assert doc["config"]["precision"] == chosen
    assert doc["runtime"]["precision"]["used"] == chosen


def test_auto_is_recorded_with_what_it_resolved_to(tiny_run):
    doc = json.loads((tiny_run / "config.json").read_text())  # trained without --precision
    used, why = resolve_precision("auto")
    assert doc["config"]["precision"] == used  # resolved: a --resume keeps it
    assert doc["runtime"]["precision"] == {"requested": "auto", "used": used, "why": why}


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, synth_data):
    from mpirun import train_run

    return train_run(tmp_path_factory, synth_data, "--precision", "bf16")


def _csv_probs(text):
    rows = list(csv.DictReader(io.StringIO(text)))
    return [r["path"] for r in rows], np.array([[float(r["p_NORMAL"]), float(r["p_PNEUMONIA"])] for r in rows])


def test_a_bf16_trained_model_has_float32_weights_and_predicts_in_float32_in_an_fp32_process(bf16_run, synth_data):
    import h5py

    assert json.loads((bf16_run / "config.json").read_text())["config"]["precision"] == "bf16"
    with zipfile.ZipFile(bf16_run / "model.keras") as z:
        assert "mixed" not in z.read("config.json").decode()
        with z.open("model.weights.h5") as raw, h5py.File(io.BytesIO(raw.read()), "r") as h5:
            arrays = []
            h5.visititems(lambda name, obj: arrays.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    assert arrays and {a.dtype for a in arrays} == {np.dtype(np.float32)}

    fp32 = _run(cli("predict", "--model", bf16_run, synth_data))  # default: fp32
    assert fp32.returncode == 0, fp32.stderr
    paths, probs = _csv_probs(fp32.stdout)

    # Reference: the saved weights in a model built and run in float32 here.
    from mpitrain.data.decode import decode_images
    from mpitrain.evaluate import modelio
    from mpitrain.runtime import set_precision
    from mpitrain.train.models import build_model

    set_precision("fp32")
    ref = build_model("tiny", 16, 2)
    loaded = modelio.load_model(modelio.read_info(bf16_run))
    ref.set_weights(loaded.get_weights())
    x, ok, _ = decode_images(paths, 16)
    assert ok.all()
    np.testing.assert_array_equal(probs, modelio.predict_probs(ref, x, 2))

    bf16 = _run(cli("predict", "--model", bf16_run, synth_data, "--precision", "bf16"))
    assert bf16.returncode == 0, bf16.stderr
    paths16, probs16 = _csv_probs(bf16.stdout)
    assert paths16 == paths
    assert not np.array_equal(probs16, probs)  # --precision bf16 really computes in bfloat16
    np.testing.assert_allclose(probs16, probs, atol=0.02)
