"""The `-n N` launcher's decisions, in-process: mpiexec flags for a resumed run, the resume
hint, holding back Open MPI's box after our own error, the progress relay, Ctrl-C report."""

import io

import numpy as np
import pytest

from mpitrain.cli import build_parser
from mpitrain.engine import checkpoint
from mpitrain.engine.callbacks.progress import Progress
from mpitrain.launcher.elastic import launch_options
from mpitrain.launcher.mpiexec import mpiexec_command
from mpitrain.launcher.relay import StdoutRelay
from mpitrain.launcher.reports import NoStartBox, StderrFilter, lost_rank_message
from mpitrain.parallel.wire import parse_progress, progress_line
from mpitrain.train.command import interrupted_message


def _saved_run(tmp_path, elastic: bool, epoch=0, step=10):
    run = tmp_path / "run"
    checkpoint.save(
        run,
        checkpoint.Checkpoint(
            epoch=epoch,
            step=step,
            ranks=3,
            strategy="allreduce",
            states=[[np.zeros(4, np.float32)]],
            shared=True,
            config={"elastic": elastic, "epochs": 5, "strategy": "allreduce"},
        ),
    )
    return run


def _args(*argv):
    return build_parser().parse_args(["train", *map(str, argv)])


def test_resuming_an_elastic_run_keeps_it_elastic(tmp_path):
    # --elastic is not on the command line: it comes from the run's newest checkpoint.
    run = _saved_run(tmp_path, elastic=True)
    extra, hint, _ = launch_options(_args("-n", 3, "--resume", "--out", run), run, elastic=False)
    assert extra == ["--with-ft", "ulfm"]
    assert hint == f"mpitrain train -n 3 --resume --out {run} --elastic"


def test_resuming_a_plain_run_adds_no_ulfm_flags(tmp_path):
    run = _saved_run(tmp_path / "plain", elastic=False)
    extra, hint, _ = launch_options(_args("-n", 2, "--resume", "--out", run), run, elastic=False)
    assert not extra
    assert hint == f"mpitrain train -n 2 --resume --out {run}"


def test_the_config_is_read_from_the_meta_alone(tmp_path):
    run = _saved_run(tmp_path, elastic=True)
    path = checkpoint.list_checkpoints(run)[-1]
    assert checkpoint.read_meta(path)["config"]["elastic"] is True
    assert checkpoint.saved_config(run)["elastic"] is True
    assert checkpoint.saved_config(tmp_path / "nothing-here") is None


def test_the_resume_hint_of_a_new_run_is_complete(tmp_path):
    hosts = tmp_path / "my hosts"
    extra, hint, _ = launch_options(
        _args("-n", 4, "--hostfile", hosts, "--elastic", "--out", tmp_path / "r"), tmp_path / "r", elastic=True
    )
    assert extra == ["--with-ft", "ulfm"]
    assert hint == f"mpitrain train -n 4 --hostfile '{hosts}' --resume --out {tmp_path / 'r'} --elastic"
    msg = lost_rank_message(
        "prterun noticed that process rank 1 with PID 7 on node vm exited on\n signal 9 (Killed).", hint
    )
    assert msg.endswith("continue it with: " + hint)


def test_fixed_order_turns_off_hierarchical_sums_and_is_kept_by_the_resume_hint(tmp_path):
    from mpitrain.launcher.commands import rank_options

    argv = ["train", "-n", "4", "--fixed-order", "--elastic", "--out", str(tmp_path / "r")]
    extra, hint, elastic = launch_options(build_parser().parse_args(argv), tmp_path / "r", elastic=True)
    assert elastic and extra == ["--with-ft", "ulfm", "--mca", "coll", "^han"]
    assert hint == f"mpitrain train -n 4 --fixed-order --resume --out {tmp_path / 'r'} --elastic"
    options = rank_options(build_parser().parse_args(argv))  # not for the ranks
    assert options["fixed_order"] is None and options["np"] is None and options["elastic"] is True
    cmd, _ = mpiexec_command(4, ["prog"], extra=extra)
    assert cmd[-6:] == ["--with-ft", "ulfm", "--mca", "coll", "^han", "prog"]


def test_fixed_order_without_n_is_one_line(tmp_path, capsys):
    from mpitrain.cli import main

    assert main(["train", "--fixed-order", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == (
        "mpitrain: error: --fixed-order needs -n N (under your own mpiexec, give it Open MPI's --mca coll ^han)\n"
    )


BOX = [
    "-" * 74 + "\n",
    "prterun detected that one or more processes exited with non-zero status,\n",
    "thus causing the job to be terminated. The first process to do so was:\n",
    "\n",
    "   Process name: [prterun-vm-7771@1,1]\n",
    "   Exit code:    2\n",
    "-" * 74 + "\n",
]


def _filtered(lines, debug=False):
    out = io.StringIO()
    f = StderrFilter(out, debug=debug)
    for line in lines:
        f.feed(line)
    f.close()
    return out.getvalue()


def test_open_mpis_box_is_held_back_after_our_own_error():
    error = "mpitrain: error: the run in r has already finished; nothing to resume\n"
    assert _filtered([error, *BOX, *BOX]) == error
    assert _filtered([error, *BOX], debug=True) == error + "".join(BOX)  # --debug shows everything


def test_open_mpis_box_is_shown_when_nobody_explained():
    assert _filtered(["warning: x\n", *BOX]) == "warning: x\n" + "".join(BOX)
    # An unfinished box at the end is still shown.
    assert _filtered(BOX[:3]) == "".join(BOX[:3])


def test_rank_0_writes_progress_as_marker_lines_under_the_launcher(monkeypatch):
    monkeypatch.setenv("MPITRAIN_LAUNCHER", "1")
    out = io.StringIO()
    bar = Progress(45, "epoch 1/5 ", stream=out)
    bar.update(12, loss=0.5)
    bar.close()
    lines = out.getvalue().splitlines(keepends=True)
    assert len(lines) == 2 and all(line.endswith("\n") and "\r" not in line for line in lines)
    where, text = parse_progress(lines[0])
    assert where == "epoch 1/5, step 12/45" and text.startswith("epoch 1/5 12/45 [") and "loss 0.5000" in text
    assert parse_progress(lines[1]) == ("epoch 1/5, step 12/45", "")


def test_the_launcher_redraws_marker_lines_as_a_bar_on_a_terminal():
    line = progress_line("epoch 1/5, step 3/45", "epoch 1/5 3/45 [>   ] loss 0.7")
    out = io.StringIO()
    relay = StdoutRelay(out, draw=True, width=80)
    relay.feed("data: d\n")
    relay.feed(line)
    relay.feed(progress_line("epoch 1/5, step 45/45", ""))
    relay.feed("epoch 1/5 [allreduce x2] loss 0.6\n")
    assert out.getvalue() == (
        "data: d\n\repoch 1/5 3/45 [>   ] loss 0.7\x1b[K\r\x1b[Kepoch 1/5 [allreduce x2] loss 0.6\n"
    )
    assert relay.where == "epoch 1/5, step 45/45"
    # Not a terminal: the markers vanish, every other line passes unchanged.
    quiet = io.StringIO()
    relay = StdoutRelay(quiet, draw=False)
    relay.feed("a\n")
    relay.feed(line)
    relay.feed("b\n")
    assert quiet.getvalue() == "a\nb\n" and relay.where == "epoch 1/5, step 3/45"


def test_a_bar_longer_than_the_terminal_is_cut():
    out = io.StringIO()
    relay = StdoutRelay(out, draw=True, width=20)
    relay.feed(progress_line("w", "x" * 50))
    assert out.getvalue() == "\r" + "x" * 19 + "\x1b[K"


@pytest.mark.parametrize("step", [10, 0])
def test_the_interrupt_report_names_position_checkpoint_and_command(tmp_path, step):
    run = _saved_run(tmp_path, elastic=False, epoch=1 if step == 0 else 0, step=step)
    newest = checkpoint.list_checkpoints(run)[-1]
    msg = interrupted_message("epoch 2/5, step 17/45", run, f"mpitrain train -n 2 --resume --out {run}")
    assert msg.startswith("mpitrain: interrupted in epoch 2/5, step 17/45")
    assert str(newest) in msg
    assert ("epoch 1, step 10" if step else "end of epoch 1") in msg
    assert msg.rstrip().endswith(f"continue with: mpitrain train -n 2 --resume --out {run}")
    empty = interrupted_message(None, tmp_path / "empty", "mpitrain train --resume --out x")
    assert "none yet" in empty and "continue with" not in empty


def test_the_interrupt_report_is_never_behind_the_checkpoint_on_disk(tmp_path):
    # The launcher's last progress line can lag behind rank 0 (Open MPI drops what it has
    # not forwarded when it stops the job); the checkpoint on disk proves how far it got.
    run = _saved_run(tmp_path, elastic=False, epoch=0, step=20)
    msg = interrupted_message("epoch 1/5, step 11/45", run, "mpitrain train -n 2 --resume --out r")
    assert msg.startswith("mpitrain: interrupted in epoch 1/5, step 20/45\n")
    run2 = _saved_run(tmp_path / "b", elastic=False, epoch=1, step=0)
    msg = interrupted_message("epoch 1/5, step 44/45", run2, "x")
    assert msg.startswith("mpitrain: interrupted in epoch 1/5, step 45/45\n")
    msg = interrupted_message("epoch 2/5, step 3/45", run2, "x")
    assert msg.startswith("mpitrain: interrupted in epoch 2/5, step 3/45\n")


def test_under_a_plain_mpiexec_without_a_terminal_the_bar_becomes_plain_lines(monkeypatch):
    from mpitrain.engine.callbacks import progress

    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # as if started by mpiexec
    monkeypatch.delenv("MPITRAIN_LAUNCHER", raising=False)
    monkeypatch.setattr(progress, "_tty", False)  # no /dev/tty to draw on
    monkeypatch.setenv("MPITRAIN_TTY", "0")
    assert progress.mode() is None
    monkeypatch.setenv("MPITRAIN_TTY", "1")
    out = io.StringIO()
    monkeypatch.setattr(progress, "LINES_EVERY", 0.0)
    bar = Progress(10, "epoch 1/2 ", stream=out)
    assert bar.mode == "lines"
    bar.update(3, loss=0.25)
    bar.close()
    assert out.getvalue().startswith("epoch 1/2 3/10 [") and out.getvalue().endswith("loss 0.2500\n")
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


NO_DAEMON_BOX = [
    "-" * 60 + "\n",
    "A daemon failed to report back after being spawned. This could\n",
    "be due to several factors, including inability to find the\n",
    "\n",
    "  Local host:    vm\n",
    "  Remote host:   node7\n",
    "  Daemon exit status: 255\n",
    "-" * 60 + "\n",
]


def test_a_job_that_could_not_start_on_a_host_is_one_line():
    passed, said = [], []
    f = NoStartBox(passed.append, said.append)
    for line in ["data: d\n", "-" * 40 + "\n", "not a box\n", *NO_DAEMON_BOX, "after\n"]:
        f.feed(line)
    f.close()
    assert passed == ["data: d\n", "-" * 40 + "\n", "not a box\n", "after\n"]  # our own output unchanged
    assert f.host == "node7" and len(said) == 1
    assert said[0].startswith("mpitrain: error: mpiexec could not start the job on host node7: check the --hostfile")
    shown = []
    debug = NoStartBox(shown.append, said.append, debug=True)  # --debug: Open MPI's own report
    for line in NO_DAEMON_BOX:
        debug.feed(line)
    assert "".join(shown) == "".join(NO_DAEMON_BOX) and debug.host is None
