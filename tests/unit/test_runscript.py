"""`mpitrain run`'s rank side: the user's script as __main__, its exit code, its output."""

import io
import sys

import pytest

from mpitrain.parallel import runscript


def _script(tmp_path, body):
    path = tmp_path / "s.py"
    path.write_text(body)
    return str(path)


@pytest.fixture(autouse=True)
def _keep_streams(monkeypatch):
    # run() re-routes sys.stdout/sys.stderr and sys.argv for the rest of a real process.
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID", runscript.ALL_OUTPUT_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    "body, code",
    [("pass", 0), ("import sys; sys.exit(3)", 3), ("raise SystemExit", 0), ("raise KeyboardInterrupt", 130)],
)
def test_the_scripts_exit_is_the_ranks_exit_code(tmp_path, body, code):
    assert runscript.run([_script(tmp_path, body)]) == code


def test_the_script_sees_its_arguments_its_name_and_its_folder_first(tmp_path, capsys):
    (tmp_path / "helper_mod.py").write_text("VALUE = 7\n")
    path = _script(tmp_path, "import sys, helper_mod\nprint(__name__, sys.argv[1:], helper_mod.VALUE)\n")
    assert runscript.run([path, "--x", "1"]) == 0
    assert capsys.readouterr().out.strip() == "__main__ ['--x', '1'] 7"


def test_an_uncaught_error_is_its_traceback_and_one_line_naming_the_rank(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert runscript.run([_script(tmp_path, "raise ValueError('bad input')")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "mpitrain: error on rank 3: ValueError: bad input"


def test_only_rank_0_shows_its_stdout_unless_all_output(tmp_path, monkeypatch):
    path = _script(tmp_path, "import sys\nprint('out'); print('err', file=sys.stderr)\n")
    for rank, all_output, want_out, want_err in [
        ("0", None, "out\n", "err\n"),
        ("1", None, "", "err\n"),
        ("1", "1", "[rank 1] out\n", "[rank 1] err\n"),
    ]:
        out, err = io.StringIO(), io.StringIO()
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        monkeypatch.setenv("PMIX_RANK", rank)
        if all_output:
            monkeypatch.setenv(runscript.ALL_OUTPUT_ENV, all_output)
        assert runscript.run([path]) == 0
        assert (out.getvalue(), err.getvalue()) == (want_out, want_err), (rank, all_output)


def test_tagged_lines_stay_whole_when_written_in_pieces():
    buf = io.StringIO()
    tagged = runscript.Tagged(buf, "[rank 2] ")
    for piece in ("ab", "c\nde", "f\n", "\n"):
        tagged.write(piece)
    assert buf.getvalue() == "[rank 2] abc\n[rank 2] def\n[rank 2] \n"
