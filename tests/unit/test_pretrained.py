"""--weights imagenet: Keras' own weights file, read from KERAS_HOME/models, fetched by one
process, and one line when it is absent and cannot be downloaded. No test touches the network:
downloads are Keras' get_file on a file:// URL, or a stand-in failing as an offline machine does."""

import hashlib

import numpy as np
import pytest

from keras_weights import MOBILENET_V3_SMALL, write_weights
from mpitrain.errors import UserError
from mpitrain.train import models, pretrained

FNAME = MOBILENET_V3_SMALL


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    return tmp_path / "keras-home"


@pytest.fixture
def offline(monkeypatch):
    """Keras' get_file as it fails without a network (its own message)."""

    def no_network(fname, origin, folder, file_hash):
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(pretrained, "_get_file", no_network)


def test_the_file_in_keras_home_is_used_without_a_network(keras_home, offline):
    written = write_weights(keras_home / "models" / FNAME)
    name, lines = models.fetch_weights("mobilenet_v3_small", 32)
    assert name == FNAME
    assert lines[0] == f"weights: ImageNet, {keras_home / 'models' / FNAME}"
    # Keras has weights for 224 px alone and uses them at any size: said in one line, not refused.
    assert len(lines) == 2 and lines[1].startswith("note: mobilenet_v3_small") and "224" in lines[1]
    model = models.build_model("mobilenet_v3_small", 32, 2, channels=3, weights="imagenet")
    got = model.get_layer("MobileNetV3Small").get_weights()
    assert len(got) == len(written)
    for a, b in zip(got, written, strict=True):
        np.testing.assert_array_equal(a, b)
    fresh = models.build_model("mobilenet_v3_small", 32, 2, channels=3)  # random: other values
    assert not np.array_equal(fresh.get_layer("MobileNetV3Small").get_weights()[0], written[0])


def test_a_missing_file_offline_is_one_line_naming_the_file_and_its_folder(keras_home, offline):
    with pytest.raises(UserError) as e:
        models.fetch_weights("mobilenet_v3_small", 32)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("--weights imagenet: cannot download https://") and f"/{FNAME} (" in msg
    assert "([Errno -3] Temporary failure in name resolution)" in msg
    assert msg.endswith(f"; put {FNAME} in {keras_home / 'models'}")
    assert not list((keras_home / "models").iterdir())  # no partial file left to be taken for the real one


def test_a_download_is_checked_against_keras_hash_and_renamed_into_place(keras_home, tmp_path):
    source = tmp_path / "published.h5"
    source.write_bytes(b"the weights" * 1000)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    target = pretrained.models_dir() / FNAME
    pretrained._download(pretrained._Asked(FNAME, source.as_uri(), digest), target)  # Keras' real get_file
    assert target.read_bytes() == source.read_bytes()
    assert [p.name for p in target.parent.iterdir()] == [FNAME]
    target.unlink()
    with pytest.raises(UserError, match=f"cannot download {source.as_uri()} .*hash"):
        pretrained._download(pretrained._Asked(FNAME, source.as_uri(), "0" * 64), target)
    assert not list(target.parent.iterdir())


def test_a_file_that_cannot_be_read_is_one_line(keras_home):
    (keras_home / "models").mkdir(parents=True)
    (keras_home / "models" / FNAME).write_bytes(b"not hdf5")
    with pytest.raises(UserError, match=f"cannot read {keras_home / 'models' / FNAME} .*delete it"):
        models.build_model("mobilenet_v3_small", 32, 2, channels=3, weights="imagenet")


def test_keras_home_is_read_as_keras_reads_it(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    assert pretrained.models_dir() == tmp_path / "kh" / "models"
    monkeypatch.delenv("KERAS_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert pretrained.models_dir() == tmp_path / ".keras" / "models"


def test_a_size_the_family_cannot_take_is_one_line():
    with pytest.raises(UserError, match=r"--model inception_v3 --weights imagenet cannot take 40x40x3 input"):
        models.fetch_weights("inception_v3", 40)


def test_weights_and_freezing_are_checked_for_the_model_kind():
    with pytest.raises(UserError, match="--weights imagenet is for keras.applications models.*xray is a registry"):
        models.check_weights("xray", "imagenet")
    with pytest.raises(UserError, match="mymod:build is MODULE:FUNCTION"):
        models.check_weights("mymod:build", "imagenet")
    models.check_weights("resnet50", "imagenet")
    models.check_weights("xray", "none")
    with pytest.raises(UserError, match="--freeze-backbone 2 would freeze random weights.*--weights imagenet"):
        models.check_freeze("resnet50", "none", None, 2)
    with pytest.raises(UserError, match="would freeze random weights.*--init RUN"):
        models.check_freeze("xray", "none", None, 1)
    models.check_freeze("xray", "none", "runs/first", 1)  # a run's features
    models.check_freeze("resnet50", "imagenet", None, 1)
    models.check_freeze("mymod:build", "none", None, 1)  # may bring its own weights
    models.check_freeze("xray", "none", None, 0)


def test_train_options_are_one_line_before_any_data(cli_error, tmp_path, keras_home, offline, synth_data, monkeypatch):
    from mpitrain.data import dataset

    def no_decoding(*args, **kwargs):
        raise AssertionError("images were decoded")

    monkeypatch.setattr(dataset, "load_shard", no_decoding)
    base = ["train", "--data", synth_data, "--out", tmp_path / "run", "--image-size", 32]
    cli_error([*base, "--model", "mobilenet_v3_small", "--weights", "imagenet"], FNAME, str(keras_home / "models"))
    cli_error([*base, "--model", "xray", "--weights", "imagenet"], "keras.applications")
    cli_error([*base, "--model", "resnet50", "--weights", "imagenet", "--channels", "1"], "colour")
    cli_error([*base, "--model", "xray", "--freeze-backbone", "2"], "random weights")
    cli_error([*base, "--freeze-backbone", "-1"], "--freeze-backbone must be >= 0")
    cli_error([*base, "--unfreeze-lr-factor", "0"], "--unfreeze-lr-factor must be in (0, 1]")
    assert not (tmp_path / "run").exists()
