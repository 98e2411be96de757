"""--model's other kinds: keras.applications names, MODULE:FUNCTION, a .keras file or run folder."""

import sys

import numpy as np
import pytest

from mpitrain.errors import UserError
from mpitrain.train import models


def test_application_names_are_derived_snake_case():
    names = models.applications()
    for want in ("resnet50", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "convnext_tiny", "vgg16"):
        assert want in names
    assert "efficientnet_v2_b0" in names and "inception_resnet_v2" in names and "resnet50_v2" in names
    assert names["mobilenet_v3_small"][0].__name__ == "MobileNetV3Small"


@pytest.mark.parametrize("channels", [1, 3])
def test_application_builds_with_head_and_preprocessing(channels):
    model = models.build_model("mobilenet_v3_small", 32, 3, channels=channels)
    assert model.input_shape == (None, 32, 32, channels)
    assert model.output_shape == (None, 3)
    assert model.layers[1].name == "to_255"  # MobileNetV3 normalises [0, 255] itself
    probs = model.predict(np.random.default_rng(0).random((2, 32, 32, channels), np.float32), verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_family_preprocessing_maps_unit_range():
    import keras

    x = np.full((1, 1, 1, 3), 0.5, np.float32)
    tf_mode = keras.Sequential(models._preprocessing("mobilenet_v2", 3))
    assert np.allclose(tf_mode(x), 0.0)  # [0, 1] -> [-1, 1]


@pytest.mark.parametrize("family", ["resnet", "vgg16", "vgg19"])
def test_caffe_families_flip_rgb_to_bgr_as_keras_preprocess_input(family):
    # The weights of these families were trained on BGR minus the BGR mean: mpitrain's RGB
    # [0, 1] pixel must come out exactly as Keras' own preprocess_input of it x 255.
    import keras
    from keras.applications.resnet import preprocess_input

    pixel = np.array([[[[0.9, 0.5, 0.1]]]], np.float32)  # red-ish: the order shows
    layers = models._preprocessing(family, 3)
    assert "rgb_to_bgr" in [layer.name for layer in layers]
    ours = np.asarray(keras.Sequential([keras.Input((1, 1, 3)), *layers])(pixel))[0, 0, 0]
    np.testing.assert_allclose(ours, preprocess_input(pixel * 255.0)[0, 0, 0], rtol=1e-6, atol=1e-4)
    grey = keras.Sequential([keras.Input((1, 1, 1)), *models._preprocessing(family, 1)])
    assert np.asarray(grey(np.full((1, 1, 1, 1), 0.5, np.float32)))[0, 0, 0, 0] == pytest.approx(
        127.5 - 114.799, abs=1e-3
    )


def test_a_caffe_family_model_reloads_without_mpitrain_and_keeps_the_flip(tmp_path):
    import subprocess

    model = models.build_model("resnet50", 32, 2, channels=3)
    flip = model.get_layer("rgb_to_bgr")
    assert not flip.trainable and not flip.trainable_weights
    model.save(tmp_path / "m.keras")
    saved = str(tmp_path / "m.keras")
    code = (
        f"import keras, numpy as np; m = keras.saving.load_model({saved!r}, safe_mode=True); "
        "print(*np.asarray(m.get_layer('rgb_to_bgr').kernel).reshape(3, 3).argmax(0))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-3:] == ["2", "1", "0"]  # output channel c reads input channel 2 - c


def test_application_too_small_and_unknown_are_one_line():
    with pytest.raises(UserError, match=r"too small for model 'resnet50' \(needs >= 32\)"):
        models.check_model("resnet50", 16)
    with pytest.raises(UserError, match="unknown model 'resnet51'.*keras.applications"):
        models.check_model("resnet51", 64)


def test_registry_check_needs_no_keras():
    import subprocess

    code = "import sys; from mpitrain.train.models import check_model; check_model('xray', 64); print('keras' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "usermodels_t.py").write_text(
        "import keras\n"
        "def build(input_shape, num_classes):\n"
        "    return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),\n"
        "                             keras.layers.Dense(num_classes, activation='softmax')])\n"
        "def wrong_out(input_shape, num_classes):\n"
        "    return build(input_shape, num_classes + 1)\n"
        "def no_args():\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "usermodels_t"
    sys.modules.pop("usermodels_t", None)


def test_module_function_is_called_with_shape_and_classes(user_module):
    model = models.build_model(f"{user_module}:build", 16, 4, channels=3)
    assert model.input_shape == (None, 16, 16, 3) and model.output_shape == (None, 4)


def test_module_function_errors(user_module):
    with pytest.raises(UserError, match=r"expected a function\(input_shape, num_classes\)"):
        models.check_model(f"{user_module}:no_args", 16)
    with pytest.raises(UserError, match=r"expected output shape \(4,\) \(the classes\), the model gives \(5,\)"):
        models.check_model(f"{user_module}:wrong_out", 16, n_classes=4)
    with pytest.raises(UserError, match="has no 'nothing'"):
        models.check_model(f"{user_module}:nothing", 16)
    with pytest.raises(UserError, match="cannot import 'no_such_mod_x'"):
        models.check_model("no_such_mod_x:build", 16)


def test_saved_model_file_and_run_folder(tmp_path):
    saved = models.build_model("tiny", 16, 2)
    run = tmp_path / "run"
    run.mkdir()
    saved.save(run / "model.keras")
    for spec in (str(run), str(run / "model.keras")):
        loaded = models.build_model(spec, 16, 2)
        for a, b in zip(loaded.get_weights(), saved.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    assert models.needs_channels(str(run)) == 1
    with pytest.raises(UserError, match=r"expected input shape \(32, 32, 1\)"):
        models.build_model(str(run), 32, 2)
    with pytest.raises(UserError, match="no such model file"):
        models.check_model(str(tmp_path / "missing.keras"), 16)


def test_needs_channels():
    assert models.needs_channels("resnet50", weights="imagenet") == 3
    assert models.needs_channels("resnet50") is None and models.needs_channels("xray") is None


def test_registry_weights_unchanged_by_channels_parameter():
    import keras

    keras.utils.set_random_seed(3)
    a = models.build_model("xray", 32, 2).get_weights()
    keras.utils.set_random_seed(3)
    b = models.build_model("xray", 32, 2, channels=1).get_weights()
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert models.build_model("xray", 32, 2, channels=3).input_shape == (None, 32, 32, 3)


def test_init_matches_layers_by_name_and_shape(tmp_path):
    import keras

    keras.utils.set_random_seed(1)
    donor = models.build_model("tiny", 16, 2)
    donor.save(tmp_path / "donor.keras")
    donor.save_weights(tmp_path / "donor.weights.h5")
    keras.utils.set_random_seed(2)
    three = models.build_model("tiny", 16, 3)  # same layer names, the head has 3 outputs
    line = models.init_from(three, str(tmp_path / "donor.keras"))
    head = three.layers[-1].name
    assert line.startswith("init: 2 layer(s)") and f"not matched: {head} (shape)" in line, line
    for a, b in zip(three.layers[0].get_weights(), donor.layers[0].get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    keras.utils.set_random_seed(3)
    same = models.build_model("tiny", 16, 2)
    assert (
        models.init_from(same, str(tmp_path / "donor.weights.h5"))
        == f"init: 3 layer(s) from {tmp_path}/donor.weights.h5"
    )
    for a, b in zip(same.get_weights(), donor.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(UserError, match="no such weights file"):
        models.init_from(same, str(tmp_path / "x.weights.h5"))
