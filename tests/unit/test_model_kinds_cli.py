"""`mpitrain train --model` with a keras.applications name and with MODULE:FUNCTION, in process."""

import sys

from mpitrain.cli import main


def _train(data, out, model, size):
    args = ["train", "--data", str(data), "--model", model, "--image-size", str(size), "--epochs", "1"]
    assert main([*args, "--batch-size", "16", "--out", str(out)]) == 0
    return out


def _evaluate_predict_export(run, data, tmp_path):
    """What a trained run of any model kind must do: evaluate, predict and export."""
    import json

    report = tmp_path / f"{run.name}-eval.json"
    assert main(["evaluate", "--model", str(run), "--data", str(data), "--json", str(report)]) == 0
    assert 0.0 <= json.loads(report.read_text())["accuracy"] <= 1.0
    csv = tmp_path / f"{run.name}-predictions.csv"
    assert main(["predict", "--model", str(run), str(next(data.rglob("*.png"))), "--csv", str(csv)]) == 0
    assert len(csv.read_text().splitlines()) == 2  # header and the one image
    assert main(["export", str(run), "--format", "savedmodel"]) == 0  # checked against model.keras by export


def test_train_application_then_evaluate_predict_export(synth_data, tmp_path, capsys):
    run = _train(synth_data, tmp_path / "run", "mobilenet_v3_small", 32)
    assert (run / "model.keras").is_file()
    assert "mobilenet_v3_small" in (run / "config.json").read_text()
    _evaluate_predict_export(run, synth_data, tmp_path)


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
    _evaluate_predict_export(run, synth_data, tmp_path)  # model.keras reloads without the module's code
    sys.modules.pop("mymodule_cli", None)


def test_unknown_model_is_one_line_before_data(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "nowhere"), "--model", "resnet51", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown model 'resnet51'" in err[0], err


def test_init_from_run(tiny_run, synth_data, tmp_path, capsys):
    args = ["train", "--data", str(synth_data), "--model", "tiny", "--image-size", "16", "--epochs", "1"]
    assert main([*args, "--init", str(tiny_run), "--out", str(tmp_path / "run")]) == 0
    assert f"init: 3 layer(s) from {tiny_run}" in capsys.readouterr().out
    _evaluate_predict_export(tmp_path / "run", synth_data, tmp_path)


def test_a_model_that_does_not_fit_the_classes_or_channels_is_one_line_before_decoding(
    cli_error, synth_data, tmp_path, monkeypatch
):
    # The class list is known once the folder is listed; nothing is decoded before the model
    # of a MODULE:FUNCTION or a saved file has been checked against it.
    import keras

    from mpitrain.data import dataset

    def no_decoding(*args, **kwargs):
        raise AssertionError("images were decoded")

    monkeypatch.setattr(dataset, "load_shard", no_decoding)
    (tmp_path / "mymodule_out.py").write_text(
        "import keras\n"
        "def build(input_shape, num_classes):\n"
        "    return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),\n"
        "                             keras.layers.Dense(num_classes + 1, activation='softmax')])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    three = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Flatten(), keras.layers.Dense(3)])
    three.save(tmp_path / "three.keras")
    base = ["train", "--data", synth_data, "--image-size", 16, "--out", tmp_path / "run"]
    cli_error([*base, "--model", "mymodule_out:build"], "expected output shape (2,) (the classes)", "(3,)")
    cli_error([*base, "--model", tmp_path / "three.keras", "--channels", 3], "expected output shape (2,)")
    cli_error([*base, "--model", tmp_path / "three.keras", "--channels", 1], "expected input shape (16, 16, 1)")
    assert not (tmp_path / "run").exists()
    sys.modules.pop("mymodule_out", None)
