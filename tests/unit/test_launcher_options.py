"""The options of `mpitrain <command> -n N` travel once: the launcher parses the command line,
keeps its own options (-n, --hostfile, --iface, --fixed-order, however abbreviated) and
sends the rest, parsed, to the ranks (MPITRAIN_OPTIONS), which parse no command line.
A fake mpiexec records what it was given; no rank starts."""

import dataclasses
import json

import numpy as np
import pytest

from mpitrain import cli
from mpitrain.config import TrainConfig
from mpitrain.engine import checkpoint
from mpitrain.launcher.commands import rank_options
from mpitrain.parallel.strategies import resolve
from mpitrain.parallel.wire import OPTIONS_ENV, options_json

LAUNCHER = ("np", "hostfile", "iface", "fixed_order")


@pytest.fixture
def mpiexec(tmp_path, monkeypatch):
    """A fake Open MPI mpiexec whose ranks start, meet and end at once. Returns a function
    giving (mpiexec's arguments, the options document the ranks got) of its one job."""
    log = tmp_path / "mpiexec.log"
    script = tmp_path / "mpiexec"
    script.write_text(
        "#!/bin/sh\n"
        '[ "$1" = "--version" ] && { echo "mpiexec (Open MPI) 5.0.11"; exit 0; }\n'
        f"printf '%s\\n' \"$*\" > {log}\n"
        f"printf '%s\\n' \"$MPITRAIN_OPTIONS\" >> {log}\n"
        "printf '\\033]mpitrain-state;started\\007\\n\\033]mpitrain-state;contact\\007\\n'\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("MPITRAIN_MPIEXEC", str(script))

    def job():
        argv, options = log.read_text().splitlines()
        return argv, json.loads(options)

    return job


@pytest.fixture
def hosts(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("localhost slots=2\n")
    return str(path)


def _saved_run(tmp_path):
    run = tmp_path / "run"
    checkpoint.save(
        run,
        checkpoint.Checkpoint(
            epoch=1,
            step=0,
            ranks=2,
            strategy="allreduce",
            states=[[np.zeros(4, np.float32)]],
            shared=True,
            status="running",
            config={"epochs": 5, "strategy": "allreduce"},
        ),
    )
    return run


def test_abbreviated_launcher_options_stay_with_the_launcher(tmp_path, mpiexec, hosts):
    # argparse takes --fixed for --fixed-order and --hostf for --hostfile; a token list did not,
    # and passed them on to every rank, which then refused to start a nested mpiexec.
    run = _saved_run(tmp_path)
    assert (
        cli.main(["train", "-n", "2", "--fixed", "--hostf", hosts, "--ifa", "lo", "--resume", "--out", str(run)]) == 0
    )
    argv, doc = mpiexec()
    assert "--mca coll ^han" in argv and f"--hostfile {hosts}" in argv and "btl_tcp_if_include lo" in argv
    assert argv.endswith("-m mpitrain train")  # no command line for the ranks: the options are in doc
    assert doc["command"] == "train" and all(doc["options"][k] is None for k in LAUNCHER)
    assert doc["options"]["resume"] is True and doc["options"]["config"]["out"] == str(run)


def test_a_new_run_sends_its_resolved_config_with_the_folder_chosen(tmp_path, mpiexec, synth_data, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run folder the launcher names goes to runs/ here
    argv = ["train", "-n", "2", "--data", str(synth_data), "--image-size", "16", "--strategy", "local-sgd"]
    assert cli.main([*argv, "--epochs", "2"]) == 0
    _, doc = mpiexec()
    sent = TrainConfig.from_dict(doc["options"]["config"])
    assert sent.out is not None and sent.out.startswith("runs/")
    assert not (tmp_path / "runs").exists()  # only checked here: rank 0 makes it
    # The recipe and the strategy's "auto" rules applied once, by the launcher.
    wanted = resolve(TrainConfig.with_recipe(data=str(synth_data), image_size=16, strategy="local-sgd", epochs=2))
    assert sent == dataclasses.replace(wanted, out=sent.out)
    assert (sent.sync_every, sent.lr_scaling) == (4, "sqrt")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not fields & set(doc["options"])  # the config travels once, not also as options


def test_evaluate_and_bench_send_their_options_too(tmp_path, mpiexec, hosts, monkeypatch):
    monkeypatch.setattr("mpitrain.evaluate.command.prepare", lambda *a, **k: None)  # no model needed here
    argv = ["evaluate", "-n", "2", "--hostf", hosts, "--model", "r1", "--model", "r2", "--data", "d", "--thresh", "0.3"]
    assert cli.main(argv) == 0
    args, doc = mpiexec()
    assert f"--hostfile {hosts}" in args and args.endswith("-m mpitrain evaluate")
    assert (doc["options"]["model"], doc["options"]["threshold"], doc["options"]["hostfile"]) == (
        ["r1", "r2"],
        0.3,
        None,
    )
    assert cli.main(["bench", "-n", "2", "--hostf", hosts, "--steps", "3"]) == 0
    args, doc = mpiexec()
    assert args.endswith("-m mpitrain bench") and doc["options"]["steps"] == 3 and doc["options"]["np"] is None


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "-n", "2", "--fixed-order", "--epochs", "3", "--recipe", "xray", "--augment", "none"],
        ["evaluate", "-n", "3", "--iface", "lo", "--model", "r", "--data", "d", "--json", "m.json"],
        ["--debug", "bench", "-n", "2", "--steps", "4", "--compress", "bf16"],
    ],
)
def test_a_rank_gets_the_launchers_parse_and_parses_nothing(monkeypatch, argv):
    parsed = cli.build_parser().parse_args(argv)
    monkeypatch.setenv(OPTIONS_ENV, options_json(parsed.command, rank_options(parsed)))
    got = cli._parse([parsed.command])
    want = {**vars(parsed), **dict.fromkeys(parsed.launcher_options)}
    assert {k: v for k, v in vars(got).items() if k != "launcher_options"} == {
        k: v for k, v in want.items() if k != "launcher_options"
    }


def test_a_user_command_line_is_parsed_even_with_options_in_the_environment(monkeypatch):
    monkeypatch.setenv(OPTIONS_ENV, options_json("train", {"epochs": 9}))
    assert cli._parse(["train", "--epochs", "2"]).epochs == 2
    assert cli._parse(["bench"]).steps == 60  # another command's options are not taken
