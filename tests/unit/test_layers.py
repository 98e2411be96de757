"""The package's layers, enforced: imports point downwards only, one module imports mpi4py.

    cli                                    (argparse and dispatch: may import everything)
    api        -> train/, engine/, evaluate/, parallel/, data/   (`mpitrain.fit`: runs in a rank)
    launcher/  -> train/, engine/, evaluate/, parallel/, data/   (the parent side of `-n N`)
    train/     -> engine/, evaluate/, parallel/, data/
    evaluate/  -> engine/, parallel/, data/    (never train/)
    engine/    -> parallel/                    (never data/, evaluate/, train/)
    parallel/, data/                           (neither each other nor the layers above)
    config, errors, runtime, slurm, atomic, outdir, pixels, shards, runfiles, targets
                                           (top level: below every layer, import none)
    __init__.py                            (the public face: re-exports the engine and api.fit, lazily)

Only the public face imports api: the layers below it never do (`mpitrain train` and
`mpitrain.fit` share train/, not each other).

The ranks never import launcher/: everything a rank and the launcher tell each other is in
parallel/wire.py, which imports no other mpitrain module. Inside launcher/ the supervisor
and what it stands on (hosts, mpiexec, relay, reports, supervise) start and watch any
program: they import only the top-level errors, runtime and slurm, parallel/wire and each
other, never a command (so `mpitrain run script.py` needs nothing of training). The rest of
launcher/ (commands, elastic, hostloss) is mpitrain's own use of it: the parent's checks
before a job (data folder, run folder, strategy, model) and the restart from a checkpoint
after a lost host, so it may import the layers below it.

config imports no layer: the strategies' names and "auto" rules stay in their registry
(parallel/strategies), applied where a config is used (`strategies.resolve`); the other
choice lists live in config, and data/ and evaluate/ import them from there.

Type-only imports of the `Comm` protocol (`if TYPE_CHECKING: from mpitrain.parallel.comm
import Comm`) are no dependency: they never run, and every layer is handed a communicator.
"""

import ast
from pathlib import Path

import mpitrain

PKG = Path(mpitrain.__file__).parent
FORBIDDEN = {
    "data": {"train", "evaluate", "parallel", "engine", "cli", "launcher"},
    "parallel": {"train", "evaluate", "data", "engine", "cli", "launcher"},
    # The engine takes a Keras model and arrays: no folders, plans, reports or the X-ray app.
    "engine": {"train", "evaluate", "data", "cli", "launcher"},
    "evaluate": {"train", "cli", "launcher"},
    "train": {"cli", "launcher"},
    "launcher": {"cli"},
    None: set(),
}
LAYERS = ("data", "parallel", "engine", "train", "evaluate", "launcher", "cli")


def _imports(path: Path):
    """Every module name imported by `path`, at any depth (lazy imports count too)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        yield from _names(node)


def _names(node: ast.AST):
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        yield node.module
        yield from (f"{node.module}.{a.name}" for a in node.names)


TYPE_ONLY_OK = "mpitrain.parallel.comm"  # the Comm protocol, for annotations (see the docstring)


def _layer_imports(path: Path):
    """`_imports` less the type-only imports of the Comm protocol's module."""
    tree = ast.parse(path.read_text(), str(path))
    type_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for n in ast.walk(block)
        if isinstance(n, ast.ImportFrom) and n.module == TYPE_ONLY_OK
    }
    for node in ast.walk(tree):
        if id(node) not in type_only:
            yield from _names(node)


def _layer(path: Path):
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else None


def test_layers_import_only_downwards():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        layer = _layer(path)
        for name in _layer_imports(path):
            parts = name.split(".")
            if parts[0] == "mpitrain" and len(parts) > 1 and parts[1] in FORBIDDEN[layer]:
                bad.append(f"{path.relative_to(PKG)} imports {name}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_top_level_modules_import_no_layer():
    # The top-level modules are used by every layer; they must not pull one in (config least
    # of all: every layer reads it). __init__.py is the public face: it re-exports the engine
    # and api.py's fit, which stands above the layers as cli.py does.
    bad = [
        f"{p.name} imports {n}"
        for p in PKG.glob("*.py")
        if p.name not in ("cli.py", "__main__.py", "__init__.py", "api.py")
        for n in _layer_imports(p)
        if n.startswith("mpitrain.") and n.split(".")[1] in LAYERS
    ]
    assert not bad, bad


def test_the_library_entry_stands_above_the_layers():
    # api.py runs in every rank of a user's script: never the launcher or the command line.
    # Nothing but the public face imports it, so the command line cannot lean on it.
    assert not [n for n in _imports(PKG / "api.py") if n.startswith(("mpitrain.cli", "mpitrain.launcher"))]
    users = sorted(
        str(p.relative_to(PKG))
        for p in PKG.rglob("*.py")
        if p.name != "api.py" and any(n == "mpitrain.api" or n.startswith("mpitrain.api.") for n in _imports(p))
    )
    assert users == ["__init__.py"]


def test_the_ranks_never_import_the_launcher():
    # Every module but cli and launcher/ itself may run in a rank.
    bad = [
        f"{p.relative_to(PKG)} imports {n}"
        for p in sorted(PKG.rglob("*.py"))
        if _layer(p) != "launcher" and p.name != "cli.py"
        for n in _imports(p)
        if n == "mpitrain.launcher" or n.startswith("mpitrain.launcher.")
    ]
    assert not bad, bad


SUPERVISOR = ("hosts", "mpiexec", "relay", "reports", "supervise")  # see the module docstring
SUPERVISOR_MAY_IMPORT = ("mpitrain.errors", "mpitrain.runtime", "mpitrain.slurm", "mpitrain.parallel.wire") + tuple(
    f"mpitrain.launcher.{m}" for m in SUPERVISOR
)


def test_the_supervisor_knows_no_command():
    bad = [
        f"launcher/{m}.py imports {n}"
        for m in SUPERVISOR
        for n in _imports(PKG / "launcher" / f"{m}.py")
        if n.startswith("mpitrain.") and n != "mpitrain.launcher" and not n.startswith(SUPERVISOR_MAY_IMPORT)
    ]
    assert not bad, bad


def test_the_wire_protocol_imports_nothing_of_mpitrain():
    # Both sides import it: it must not drag either side's modules into the other.
    # (The Comm protocol for annotations, under TYPE_CHECKING, is no import: see the docstring.)
    assert [n for n in _layer_imports(PKG / "parallel" / "wire.py") if n.startswith("mpitrain")] == []


def test_strategies_import_neither_config_nor_other_layers():
    # The registry is the home of the strategies' rules: the config asks it, never the reverse.
    bad = [
        f"{p.relative_to(PKG)} imports {n}"
        for p in (PKG / "parallel" / "strategies").glob("*.py")
        for n in _layer_imports(p)
        if n.startswith("mpitrain.")
        and not n.startswith(
            (
                "mpitrain.parallel.strategies",
                "mpitrain.parallel.flat",
                "mpitrain.parallel.pulses",
                "mpitrain.parallel.overlap",
                "mpitrain.errors",
            )
        )
    ]
    assert not bad, bad


def test_only_the_comm_module_imports_mpi4py():
    users = sorted(
        str(p.relative_to(PKG))
        for p in PKG.rglob("*.py")
        if any(n == "mpi4py" or n.startswith("mpi4py.") for n in _imports(p))
    )
    assert users == ["parallel/comm.py"]


def test_the_layout_map_names_every_module():
    # docs/development.md's "Layout" map is a maintainer's first view of the package: it must not drift.
    page = (PKG.parents[1] / "docs" / "development.md").read_text()
    layout = page.split("\n## Layout\n", 1)[1].split("```")[1]
    missing = [
        str(p.relative_to(PKG))
        for p in sorted(PKG.rglob("*.py"))
        if p.stem not in ("__init__", "__main__") and p.stem not in layout
    ]
    assert not missing, f"docs/development.md's Layout does not mention: {missing}"
