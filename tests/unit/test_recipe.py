"""--recipe: a preset of options measured together; options given explicitly win."""

import dataclasses

import pytest

from mpitrain.cli import _config_from_args, build_parser
from mpitrain.config import RECIPES, TrainConfig
from mpitrain.errors import UserError


def parse(*argv):
    return _config_from_args(build_parser().parse_args([str(a) for a in argv]))


def test_the_xray_recipe_sets_its_options_and_keeps_the_defaults_of_the_rest():
    cfg = parse("train", "--recipe", "xray")
    assert cfg.recipe == "xray"
    for name, value in RECIPES["xray"].items():
        assert getattr(cfg, name) == value
    untouched = {f.name for f in dataclasses.fields(TrainConfig)} - set(RECIPES["xray"]) - {"recipe"}
    assert {n: getattr(cfg, n) for n in untouched} == {n: getattr(TrainConfig(), n) for n in untouched}


def test_options_given_on_the_command_line_win_even_when_they_equal_the_default():
    # 50 is the default image size: given explicitly it must still beat the recipe's 64.
    cfg = parse("train", "--recipe", "xray", "--image-size", "50", "--augment", "none", "--epochs", "3")
    assert (cfg.image_size, cfg.augment, cfg.epochs, cfg.model) == (50, "none", 3, "xray")
    # Order does not matter, and flags count as given too.
    cfg = parse("train", "--epochs", "7", "--recipe", "xray", "--overwrite")
    assert (cfg.epochs, cfg.overwrite, cfg.image_size) == (7, True, RECIPES["xray"]["image_size"])


def test_a_recipe_does_not_force_groups_on_a_group_pattern_or_a_separate_validation_folder():
    cfg = parse("train", "--recipe", "xray", "--group-pattern", r"(case\d+)_")
    assert cfg.groups == "none" and cfg.group_pattern == r"(case\d+)_"
    cfg = parse("train", "--recipe", "xray", "--val-data", "somewhere")
    assert cfg.groups == "none" and cfg.val_data == "somewhere"
    # But a clash the user wrote is still refused.
    with pytest.raises(UserError, match="not both"):
        parse("train", "--recipe", "xray", "--groups", "filename-patient", "--group-pattern", "x(y)")


def test_without_a_recipe_nothing_changes_and_an_unknown_recipe_is_refused():
    assert parse("train") == TrainConfig()
    assert TrainConfig.with_recipe(epochs=2) == TrainConfig(epochs=2)
    with pytest.raises(UserError, match="--recipe must be one of"):
        TrainConfig.with_recipe(recipe="fast")
    with pytest.raises(UserError, match="--recipe must be one of"):
        TrainConfig(recipe="fast")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_is_a_valid_config_of_known_options(name):
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(RECIPES[name]) <= fields - {"recipe", "data", "out", "seed"}
    TrainConfig.with_recipe(recipe=name)  # validates
