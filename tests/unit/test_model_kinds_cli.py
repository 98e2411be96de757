"""`mpitrain train --model` with a keras.applications name and with MODULE:FUNCTION, in process."""

import sys

from mpitrain.cli import main


def _train(data, out, model, size):
    args = ["train", "--data", str(data), "--model", model, "--image-size", str(size), "--epochs", "1"]
    assert main([*args, "--batch-size", "16", "--out", str(out)]) == 0
    return out


def test_train_application_then_evaluate_predict(synth_data, tmp_path, capsys):
    run = _train(synth_data, tmp_path / "run", "mobilenet_v3_small", 32)
    assert (run / "model.keras").is_file()
    assert main(["evaluate", "--model", str(run), "--data", str(synth_data)]) == 0
    assert main(["predict", "--model", str(run), str(next(synth_data.rglob("*.png")))]) == 0
    assert "mobilenet_v3_small" in (run / "config.json").read_text()


def test_train_module_function(synth_data, tmp_path, monkeypatch):
    (tmp_path / "mymodule_cli.py").write_text(
        "import keras\n"
        "CALLS = []\n"
        "def build(input_shape, num_classes):\n"
        "    CALLS.append((tuple(input_shape), num_classes))\n"
        "    return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),\n"
        "                             keras.layers.Dense(num_classes, activation='softmax')])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    run = _train(synth_data, tmp_path / "run", "mymodule_cli:build", 16)
    assert sys.modules["mymodule_cli"].CALLS[-1] == ((16, 16, 1), 2)
    assert main(["export", str(run), "--format", "savedmodel"]) == 0  # checked against model.keras by export
    sys.modules.pop("mymodule_cli", None)


def test_unknown_model_is_one_line_before_data(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "nowhere"), "--model", "resnet51", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown model 'resnet51'" in err[0], err


def test_init_from_run(tiny_run, synth_data, tmp_path, capsys):
    args = ["train", "--data", str(synth_data), "--model", "tiny", "--image-size", "16", "--epochs", "1"]
    assert main([*args, "--init", str(tiny_run), "--out", str(tmp_path / "run")]) == 0
    assert f"init: 3 layer(s) from {tiny_run}" in capsys.readouterr().out
