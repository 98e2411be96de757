"""The run folder's one list of names (`mpitrain.runfiles`): its docstring and its entries
agree, no other module spells a name, and --overwrite's `remove_all` takes exactly those."""

import ast
import re
from pathlib import Path

import pytest

import mpitrain
from mpitrain import runfiles
from mpitrain.errors import UserError
from mpitrain.evaluate import export

PKG = Path(mpitrain.__file__).parent


def _docstring_table() -> dict[str, str]:
    """{name as the docstring writes it (folders end in /): its "when" column}."""
    rows = {}
    for line in runfiles.__doc__.splitlines():
        m = re.fullmatch(r" {4}(\S+) {2,}(.+?) {2,}(\S+\.py)", line)
        if m and m.group(1) != "name":
            rows[m.group(1)] = m.group(2)
    return rows


def test_the_docstring_lists_exactly_the_entries():
    table = _docstring_table()
    assert list(table) == [e.name + ("/" if e.folder else "") for e in runfiles.ENTRIES]
    for e in runfiles.ENTRIES:
        assert table[e.name + ("/" if e.folder else "")].startswith("always") == e.always, e.name


def test_the_docstring_names_each_names_writer():
    # The third column: the module that writes the name, and it does use the constant.
    constant = {v: k for k, v in vars(runfiles).items() if k.isupper() and isinstance(v, str)}
    for line in runfiles.__doc__.splitlines():
        m = re.fullmatch(r" {4}(\S+) {2,}.+? {2,}(\S+\.py)", line)
        if not m or m.group(1) == "name":
            continue
        name = m.group(1).rstrip("/")
        source = (PKG / m.group(2)).read_text()
        if name in runfiles.EXPORTS.values():
            assert "runfiles.export_name" in source
        else:
            assert re.search(rf"\b{constant[name]}\b", source), f"{m.group(2)} does not use runfiles.{constant[name]}"


def _string_constants(path: Path):
    """(line, text) of every string constant in `path` that is not a docstring."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_no_other_module_spells_a_run_folder_name():
    # A path in code has no spaces; prose (help, messages) may mention a name.
    names = set(runfiles.NAMES)
    bad = [
        f"{path.relative_to(PKG)}:{line}: {text!r}"
        for path in sorted(PKG.rglob("*.py"))
        if path.name != "runfiles.py"
        for line, text in _string_constants(path)
        if not any(c.isspace() for c in text)
        and (text in names or text.rsplit("/", 1)[-1] in names or text.startswith("export-"))
    ]
    assert not bad, "run-folder names spelled outside runfiles.py:\n" + "\n".join(bad)


def test_export_formats_have_their_folder_names_here():
    assert export.FORMATS == tuple(runfiles.EXPORTS) and set(export.FORMATS) == {"savedmodel", "tflite"}
    assert all(runfiles.export_name(f) in runfiles.NAMES for f in export.FORMATS)


def test_strays_of_interrupted_writes_are_ours_and_look_alikes_are_not():
    assert runfiles.is_ours(".tmp-4242-model.keras") and runfiles.is_ours(".tmp-7-export-tflite-old")
    for name in ("model.keras.bak", ".tmp-x-model.keras", ".tmp-12-notes.txt", "tb2", "export-onnx", "Model.keras"):
        assert not runfiles.is_ours(name), name


def test_remove_all_takes_every_name_and_nothing_else(tmp_path):
    for e in runfiles.ENTRIES:
        if e.folder:
            (tmp_path / e.name / "sub").mkdir(parents=True)
            (tmp_path / e.name / "sub" / "f").write_text("old")
        else:
            (tmp_path / e.name).write_text("old")
    (tmp_path / ".tmp-99-history.csv").write_text("torn")
    (tmp_path / ".tmp-99-export-savedmodel").mkdir()
    mine = ["notes.txt", "model.keras.bak", "my-exports", ".tmp-mine"]
    for name in mine:
        (tmp_path / name).write_text("mine")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x").write_text("mine")
    (tmp_path / "tb-link").symlink_to(tmp_path / "elsewhere")
    removed = runfiles.remove_all(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(mine + ["elsewhere", "tb-link", ".lock"])
    assert (tmp_path / ".lock").read_text() == "old"  # the caller's own lock stays
    assert set(removed) == set(runfiles.NAMES) - {runfiles.LOCK} | {".tmp-99-history.csv", ".tmp-99-export-savedmodel"}


def test_remove_all_unlinks_a_link_named_like_a_folder_of_ours_not_its_target(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("mine")
    run = tmp_path / "run"
    run.mkdir()
    (run / runfiles.TENSORBOARD).symlink_to(target)
    runfiles.remove_all(run)
    assert list(run.iterdir()) == [] and (target / "keep").read_text() == "mine"


def test_remove_all_says_in_one_line_what_it_cannot_remove(tmp_path, monkeypatch):
    (tmp_path / runfiles.MODEL).write_text("old")

    def refuse(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(UserError, match=r"--overwrite: cannot remove .*model\.keras: Permission denied"):
        runfiles.remove_all(tmp_path)


def test_file_sha256_is_of_the_bytes(tmp_path):
    import hashlib

    data = bytes(range(256)) * 9000  # more than one read chunk
    (tmp_path / "f").write_bytes(data)
    assert runfiles.file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
