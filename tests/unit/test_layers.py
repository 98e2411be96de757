"""The package's layers, enforced: imports point downwards only, one module imports mpi4py.

    cli                                    (argparse and dispatch: may import everything)
    launcher/  -> train/, evaluate/, parallel/, data/   (the parent side of `-n N`)
    train/     -> evaluate/, parallel/, data/
    evaluate/  -> parallel/, data/             (never train/)
    parallel/, data/                           (neither train/ nor evaluate/)
    config, errors, runtime, slurm, atomic, outdir   (top level: below every layer, import none)

The ranks never import launcher/: everything a rank and the launcher tell each other is in
parallel/wire.py, which imports no other mpitrain module. Inside launcher/ the supervisor
and what it stands on (hosts, mpiexec, relay, reports, supervise) start and watch any
program: they import only the top-level errors, runtime and slurm, parallel/wire and each
other, never a command (so `mpitrain run script.py` needs nothing of training). The rest of
launcher/ (commands, elastic, hostloss) is mpitrain's own use of it: the parent's checks
before a job (data folder, run folder, strategy, model) and the restart from a checkpoint
after a lost host, so it may import train/, evaluate/, parallel/ and data/ below it.

config imports no layer: the strategies' names and "auto" rules stay in their registry
(parallel/strategies), applied where a config is used (`strategies.resolve`); the other
choice lists live in config, and data/ and evaluate/ import them from there.
"""

import ast
from pathlib import Path

import mpitrain

PKG = Path(mpitrain.__file__).parent
FORBIDDEN = {
    "data": {"train", "evaluate", "parallel", "cli", "launcher"},
    "parallel": {"train", "evaluate", "data", "cli", "launcher"},
    "evaluate": {"train", "cli", "launcher"},
    "train": {"cli", "launcher"},
    "launcher": {"cli"},
    None: set(),
}
LAYERS = ("data", "parallel", "train", "evaluate", "launcher", "cli")


def _imports(path: Path):
    """Every module name imported by `path`, at any depth (lazy imports count too)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def _layer(path: Path):
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else None


def test_layers_import_only_downwards():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        layer = _layer(path)
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "mpitrain" and len(parts) > 1 and parts[1] in FORBIDDEN[layer]:
                bad.append(f"{path.relative_to(PKG)} imports {name}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_top_level_modules_import_no_layer():
    # config, errors, runtime, slurm, atomic and outdir are used by every layer; they must not
    # pull one in (config least of all: every layer reads it).
    bad = [
        f"{p.name} imports {n}"
        for p in PKG.glob("*.py")
        if p.name not in ("cli.py", "__main__.py", "__init__.py")
        for n in _imports(p)
        if n.startswith("mpitrain.") and n.split(".")[1] in LAYERS
    ]
    assert not bad, bad


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
    assert [n for n in _imports(PKG / "parallel" / "wire.py") if n.startswith("mpitrain")] == []


def test_strategies_import_neither_config_nor_other_layers():
    # The registry is the home of the strategies' rules: the config asks it, never the reverse.
    bad = [
        f"{p.relative_to(PKG)} imports {n}"
        for p in (PKG / "parallel" / "strategies").glob("*.py")
        for n in _imports(p)
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


def test_the_readme_map_names_every_module():
    # The README's "Layout" map is the reader's first view of the package: it must not drift.
    readme = (PKG.parents[1] / "README.md").read_text()
    layout = readme.split("### Layout", 1)[1].split("```")[1]
    missing = [
        str(p.relative_to(PKG))
        for p in sorted(PKG.rglob("*.py"))
        if p.stem not in ("__init__", "__main__") and p.stem not in layout
    ]
    assert not missing, f"README's Layout does not mention: {missing}"
