import json

import pytest

from mpitrain.config import TrainConfig, save_config
from mpitrain.errors import UserError
from mpitrain.parallel.strategies import resolve


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"epochs": 0}, "--epochs"),
        ({"batch_size": 0}, "--batch-size"),
        ({"lr": 0}, "--lr"),
        ({"val_split": 1.0}, "--val-split"),
        ({"val_split": -0.1}, "--val-split"),
        ({"val_split": 0.0}, "validation"),
        ({"image_size": 4}, "--image-size"),
        ({"strategy": "ring"}, "--strategy"),
        ({"sync_every": 0}, "--sync-every"),
        ({"lr_scaling": "cubic"}, "--lr-scaling"),
        ({"warmup_epochs": -1}, "--warmup-epochs"),
        ({"class_weight": "inverse"}, "--class-weight"),
    ],
)
def test_bad_values_are_one_line_user_errors(kwargs, words):
    with pytest.raises(UserError) as e:
        resolve(TrainConfig(**kwargs))  # the strategy's rules: where the config is used
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_config_is_keyword_only():
    with pytest.raises(TypeError):
        TrainConfig(None)  # noqa


def test_round_trip_and_saved_with_versions(tmp_path):
    cfg = TrainConfig(epochs=3, strategy="local-sgd", sync_every=4, seed=9)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    save_config(cfg, tmp_path / "config.json", ranks=2)
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["config"]["sync_every"] == 4 and doc["runtime"]["ranks"] == 2
    assert "keras" in doc["versions"] and "numpy" in doc["versions"]
    with pytest.raises(UserError):
        TrainConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_config_of_an_older_version_with_its_empty_extra_field_still_loads():
    # config.json and checkpoints written before `extra` was removed carry "extra": {}.
    old = {**TrainConfig(epochs=2).to_dict(), "extra": {}}
    assert TrainConfig.from_dict(old) == TrainConfig(epochs=2)
    with pytest.raises(UserError, match="extra"):
        TrainConfig.from_dict({**old, "extra": {"something": 1}})  # never written; not ours
