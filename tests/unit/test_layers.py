"""The package's layers, enforced: imports point downwards only, one module imports mpi4py.

    cli, config, errors, runtime, atomic, pixels, shards   (top level: used by every layer)
    train/     -> engine/, evaluate/, parallel/, data/
    evaluate/  -> engine/, parallel/, data/    (never train/)
    engine/    -> parallel/                    (never data/, evaluate/, train/)
    parallel/, data/                           (neither each other nor the layers above)

One exception: config imports parallel/strategies. A strategy owns its rules (its name, what
"auto" means for its --sync-every and learning rate), and the config validates and
resolves options by asking the strategies' registry instead of keeping a second copy of
those rules. parallel/strategies imports only numpy, parallel/flat, parallel/pulses and errors, never
config.

Type-only imports of the `Comm` protocol (`if TYPE_CHECKING: from mpitrain.parallel.comm
import Comm`) are no dependency: they never run, and every layer is handed a communicator.
"""

import ast
from pathlib import Path

import mpitrain

PKG = Path(mpitrain.__file__).parent
FORBIDDEN = {
    "data": {"train", "evaluate", "parallel", "engine", "cli"},
    "parallel": {"train", "evaluate", "data", "engine", "cli"},
    # The engine takes a Keras model and arrays: no folders, plans, reports or the X-ray app.
    "engine": {"train", "evaluate", "data", "cli"},
    "evaluate": {"train", "cli"},
    "train": {"cli"},
    None: set(),
}


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


ALLOWED_TOP_LEVEL = {"config.py": "mpitrain.parallel.strategies"}  # see the module docstring


def test_top_level_modules_import_no_layer():
    # config, errors, runtime and atomic are used by every layer; they must not pull one in.
    # __init__.py is the public face: it re-exports the engine (lazily).
    bad = [
        f"{p.name} imports {n}"
        for p in PKG.glob("*.py")
        if p.name not in ("cli.py", "__main__.py", "__init__.py")
        for n in _layer_imports(p)
        if n.split(".")[:2][-1] in ("data", "parallel", "engine", "train", "evaluate", "cli")
        and n.startswith("mpitrain.")
        and not _allowed(p.name, n)
    ]
    assert not bad, bad


def _allowed(module: str, name: str) -> bool:
    prefix = ALLOWED_TOP_LEVEL.get(module)
    return prefix is not None and (name == prefix or name.startswith(prefix + "."))


def test_strategies_import_neither_config_nor_other_layers():
    # The one exception above must not become a cycle.
    bad = [
        f"{p.relative_to(PKG)} imports {n}"
        for p in (PKG / "parallel" / "strategies").glob("*.py")
        for n in _layer_imports(p)
        if n.startswith("mpitrain.")
        and not n.startswith(
            ("mpitrain.parallel.strategies", "mpitrain.parallel.flat", "mpitrain.parallel.pulses", "mpitrain.errors")
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
