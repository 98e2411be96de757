"""The command line is built from TrainConfig: every field an option, defaults and choices
written once; --debug before or after every subcommand."""

import dataclasses
import typing

import pytest

import mpitrain.parallel.strategies as strategies
from mpitrain import config
from mpitrain.cli import _config_from_args, build_parser
from mpitrain.config import TrainConfig

FIELDS = dataclasses.fields(TrainConfig)
TYPES = typing.get_type_hints(TrainConfig)


def parse(*argv):
    return build_parser().parse_args([str(a) for a in argv])


# The fields whose choices are the strategies' registry's, not the config's.
REGISTRY_CHOICES = {"strategy": strategies.names(), "compress": strategies.compressions()}


def _other_value(f):
    """A valid value different from the field's default, and how to write it."""
    kind = TYPES[f.name]
    if kind is bool:
        return True, []
    choices = f.metadata["choices"] or REGISTRY_CHOICES.get(f.name)
    if choices:
        value = next(c for c in choices if c != f.default)
    elif f.name == "model":
        value = "tiny"
    elif int in typing.get_args(kind) or kind is int:
        value = 3 if f.default is None else f.default + 1
    elif float in typing.get_args(kind) or kind is float:
        value = 0.5
    else:
        value = "somewhere"
    return value, [value]


def test_no_options_give_the_dataclass_defaults():
    assert _config_from_args(parse("train")) == TrainConfig()


# Options that are only valid together with another one: given with it (NEEDS: and refused
# alone, with any value; a flag or a choice cannot take "x", so these are in ALSO_NEEDS).
TABLE = {"labels": "table.csv"}
NEEDS = {k: TABLE for k in ("patient_column", "label_columns", "findings_column")}
ALSO_NEEDS = {
    "multi_label": TABLE,
    "no_finding": {**TABLE, "findings_column": "Finding Labels"},
    "uncertain": {**TABLE, "label_columns": "A,B"},
    "blank": {**TABLE, "label_columns": "A,B"},
}


@pytest.mark.parametrize("f", FIELDS, ids=[f.name for f in FIELDS])
def test_every_field_is_an_option_that_reaches_the_config(f):
    value, rest = _other_value(f)
    needs = {**NEEDS, **ALSO_NEEDS}.get(f.name, {})
    also = [a for k, v in needs.items() for a in ("--" + k.replace("_", "-"), v)]
    cfg = _config_from_args(parse("train", *also, "--" + f.name.replace("_", "-"), *rest))
    assert getattr(cfg, f.name) == value and type(getattr(cfg, f.name)) is type(value)
    # Nothing else moved (but what a --recipe presets, and the options it needs).
    assert dataclasses.replace(cfg, **{f.name: f.default}) == dataclasses.replace(
        TrainConfig.with_recipe(**needs, **{f.name: value}), **{f.name: f.default}
    )


def test_options_that_need_another_are_refused_alone():
    from mpitrain.errors import UserError

    for name in NEEDS:
        with pytest.raises(UserError, match="needs"):
            _config_from_args(parse("train", "--" + name.replace("_", "-"), "x"))


def test_help_shows_defaults_choices_and_the_model_registry(capsys):
    from mpitrain.train.models import MODELS

    with pytest.raises(SystemExit):
        parse("train", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "passes over the training data (default: 5)" in text
    assert "(default: 0.001)" in text and "{adam,sgd}" in text
    assert f"model from the registry: {', '.join(sorted(MODELS))} (default: seed)" in text


def test_choice_lists_are_the_configs():
    actions = {a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    assert actions["optimizer"].choices == config.OPTIMIZERS
    assert tuple(actions["strategy"].choices) == tuple(strategies.names())
    assert actions["lr_scaling"].choices == config.LR_SCALINGS
    assert actions["lr_schedule"].choices == config.LR_SCHEDULES
    assert actions["class_weight"].choices == config.CLASS_WEIGHTS


# The fewest arguments each subcommand accepts.
MINIMAL = {
    "train": [],
    "pretrain": [],
    "data": ["--data", "d"],
    "labels": ["--data", "d", "--out", "t.csv"],
    "synth": ["--out", "o"],
    "bench": [],
    "evaluate": ["--model", "m", "--data", "d"],
    "predict": ["--model", "m", "p.png"],
    "export": ["runs/x", "--format", "tflite"],
    "run": ["-n", "2", "s.py"],
}


def test_every_subcommand_is_covered_here():
    assert set(build_parser()._subparsers._group_actions[0].choices) == set(MINIMAL)


@pytest.mark.parametrize("command", sorted(MINIMAL))
def test_debug_before_or_after_every_subcommand(command):
    args = MINIMAL[command]
    assert parse(command, *args).debug is False
    assert parse("--debug", command, *args).debug is True
    assert parse(command, "--debug", *args).debug is True
    if command == "run":  # after the script, every word is the script's own
        assert parse(command, *args, "--debug").args == ["--debug"]
        return
    assert parse(command, *args, "--debug").debug is True


@pytest.mark.parametrize("command", sorted(MINIMAL))
def test_every_option_says_what_it_does(command):
    import argparse

    sub = build_parser()._subparsers._group_actions[0].choices[command]
    bare = [
        a.option_strings[-1] if a.option_strings else a.dest
        for a in sub._actions
        if a.help is not argparse.SUPPRESS and (not a.help or a.help.startswith("(default"))
    ]
    assert not bare, f"{command}: options without a description: {bare}"


def test_version(capsys):
    from mpitrain import __version__

    with pytest.raises(SystemExit) as e:
        parse("--version")
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mpitrain {__version__}"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "--epocs", "3"], ["unknown option --epocs: did you mean --epochs?", "see mpitrain train --help"]),
        (["data", "--dta", "x"], ["did you mean --data?", "see mpitrain data --help"]),
        (
            ["predict", "--model", "m", "--cvs", "o.csv", "x.png"],
            ["did you mean --csv?", "see mpitrain predict --help"],
        ),
        (
            ["evaluate", "--model", "m", "--labls=x.csv"],
            ["unknown option --labls: did you mean --labels?", "evaluate --help"],
        ),
    ],
)
def test_a_mistyped_option_names_the_closest_and_the_subcommands_help(cli_error, argv, words):
    cli_error(argv, *words)


def test_an_unknown_option_with_nothing_close_names_no_option(cli_error):
    line = cli_error(["train", "--zzzzzz"], "unknown option --zzzzzz", "see mpitrain train --help")
    assert "did you mean" not in line


def test_abbreviations_still_work():
    args = parse("train", "--epo", "3", "--path-col", "y")
    assert (args.epochs, args.path_column) == (3, "y")
    # --label-column is a prefix of --label-columns: written out, it is still itself
    args = parse("train", "--label-column", "y", "--label-columns", "A,B")
    assert (args.label_column, args.label_columns) == ("y", "A,B")


@pytest.mark.parametrize(
    "argv, option",
    [
        (["data", "--label-column", "a", "--label-column", "b", "--labels", "x.csv"], "--label-column"),
        (["data", "--data", "a", "--data=b"], "--data"),
        (["train", "--path-column", "a", "--path-col", "b"], "--path-column"),
        (["train", "--epochs", "2", "--epochs", "3"], "--epochs"),
        (["predict", "--model", "m", "--csv", "a", "--csv", "b", "x.png"], "--csv"),
        (["evaluate", "--model", "m", "--data", "d", "--threshold", "0.3", "--threshold", "0.4"], "--threshold"),
    ],
)
def test_a_single_valued_option_given_twice_is_refused(cli_error, argv, option):
    cli_error(argv, f"argument {option}: given twice", "give it once")


def test_model_stays_repeatable_for_ensembles():
    assert parse("predict", "--model", "a", "--model", "b", "x.png").model == ["a", "b"]
    assert parse("evaluate", "--model", "a", "--model", "b", "--data", "d").model == ["a", "b"]


def test_the_repeat_bookkeeping_is_no_option():
    assert "_options_seen" not in vars(parse("train", "--epochs", "2"))


@pytest.mark.parametrize(
    ("env", "says"),
    [({}, True), ({"PMIX_RANK": "1"}, False), ({"SLURM_PROCID": "3"}, False), ({"OMPI_COMM_WORLD_RANK": "0"}, True)],
)
def test_a_bad_command_line_is_said_once_by_the_first_rank_of_an_srun_or_mpiexec(monkeypatch, capsys, env, says):
    # `srun -n 4 mpitrain train --epochs 2 --epochs 3`: every task parses and fails alike.
    from mpitrain.cli import main

    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID", "PMI_RANK"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        main(["train", "--epochs", "2", "--epochs", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert ("given twice" in err) is says and (err.count("\n") == 1 if says else err == "")
