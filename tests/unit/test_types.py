"""Annotations the type checker (mypy, `make lint`) relies on, pinned where a gap is silent.

A function whose parameters carry no annotation is not checked at all by mypy's default
settings, so an unannotated `comm` would let any misuse of the communicator through.
"""

import ast
from pathlib import Path

import mpitrain

PKG = Path(mpitrain.__file__).parent

# Files exempt from the rule (none now; a name here must be a file that exists).
BEING_RESTRUCTURED: set[str] = set()
COMM_TYPES = {"Comm", "Comm | None"}


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _comm_parameters(path: Path):
    """(line, function, annotation or None) of each parameter named `comm` in `path`."""
    for fn in _functions(ast.parse(path.read_text(), str(path))):
        a = fn.args
        for arg in a.posonlyargs + a.args + a.kwonlyargs:
            if arg.arg == "comm":
                yield fn.lineno, fn.name, None if arg.annotation is None else ast.unparse(arg.annotation)


def test_every_comm_parameter_is_annotated_with_the_protocol():
    bad, seen = [], 0
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel in BEING_RESTRUCTURED:
            continue
        for line, name, annotation in _comm_parameters(path):
            seen += 1
            if annotation not in COMM_TYPES:
                bad.append(f"{rel}:{line} {name}(comm: {annotation})")
    assert seen >= 10, "the search found too few `comm` parameters to be looking in the right place"
    assert not bad, "annotate these `comm` parameters with Comm:\n" + "\n".join(bad)


def test_the_exclusions_name_files_that_exist():
    # The list only shrinks: a module moved or removed leaves it (its successor is checked).
    missing = sorted(rel for rel in BEING_RESTRUCTURED if not (PKG / rel).is_file())
    assert not missing, missing
