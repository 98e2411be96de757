"""`mpitrain train|evaluate|bench -n N`: the parent's side.

The parent parses the command line once (cli.py) and checks what it can (options, data
folder, run folder), so a mistake is reported once, before any process starts. Then it
starts N ranks of `python -m mpitrain COMMAND` under the supervisor (launcher/supervise.py);
they take the options parsed and checked here from MPITRAIN_OPTIONS (parallel/wire.py)
instead of a command line: for `train` the resolved TrainConfig, recipe applied. The
launcher's own options (-n, --hostfile, --iface, --fixed-order) are left out by name as
the parser recorded them (`launcher_options`), never by reading tokens.

The options travel in the environment, not in a file: Open MPI forwards it to the ranks of
every host (-x), shared file system or not (`--data-on-root` runs have none).
"""

from __future__ import annotations

import dataclasses
import sys

from mpitrain.launcher.supervise import supervise
from mpitrain.parallel.wire import OPTIONS_ENV, options_json


def program(command: str) -> list[str]:
    """What each rank runs."""
    return [sys.executable, "-m", "mpitrain", command]


def rank_options(args, drop=()) -> dict:
    """The parsed options for the ranks: the launcher's own ones None (the ranks do not start
    mpiexec), the others as parsed, less those in `drop`."""
    mine = tuple(getattr(args, "launcher_options", ()))
    skip = {*mine, *drop, "func", "launcher_options", "command"}
    options = {k: v for k, v in vars(args).items() if k not in skip}
    if "given_options" in options:
        options["given_options"] = sorted(options["given_options"])
    return {**options, **dict.fromkeys(mine)}


def check_host(args) -> None:
    """The cores warning and the memory refusal for the ranks on this host (capacity.py)."""
    from mpitrain.launcher.capacity import RANK_MEMORY, check_capacity

    check_capacity(args.np, args.hostfile, per_rank=RANK_MEMORY, force=bool(getattr(args, "force_ranks", False)))


def launch(command: str, args, variables: dict | None = None) -> int:
    """Start the job of an `evaluate` or `bench` whose options were checked."""
    check_host(args)
    env = {OPTIONS_ENV: options_json(command, rank_options(args)), **(variables or {})}
    return supervise(
        args.np,
        program(command),
        hostfile=args.hostfile,
        debug=args.debug,
        iface=args.iface,
        variables=env,
        contact=True,
    )


def launch_evaluate(args) -> int:
    """evaluate -n N, telling the ranks when this command started (their "total" time counts from it)."""
    from mpitrain.runtime import STARTED_ENV, started_at

    return launch("evaluate", args, {STARTED_ENV: repr(started_at(False))})


def launch_bench(args) -> int:
    from mpitrain.parallel.strategies import strategy_class

    strategy_class(args.strategy).check_ranks(args.np)  # before starting any process
    strategy_class(args.strategy).check_compress(args.compress)
    return launch("bench", args)


def launch_train(args, cfg) -> int:
    """train -n N with `cfg` (recipe applied): everything that can be checked without the
    data, then the data folder's listing and the run folder, each mistake said here, once,
    before mpiexec starts. The run folder is only checked (and locked for a moment): rank 0
    creates and locks it for the run."""
    from mpitrain.launcher.elastic import Job, launch_options, run_training
    from mpitrain.parallel.strategies import resolve
    from mpitrain.train import runfolder

    cfg = resolve(cfg)
    fresh = []
    if args.resume:  # the ranks read the checkpoints and its saved options (an agreed error)
        runfolder.resume_folder(cfg.out, check_only=True)
    else:
        out = _check_fresh_run(args, cfg)
        fresh = _missing(out)
        cfg = dataclasses.replace(cfg, out=str(out))  # every rank must use the folder the launcher chose
    check_host(args)
    extra, hint, elastic = launch_options(args, cfg.out, cfg.elastic)
    given = ["given_options", *(f.name for f in dataclasses.fields(cfg))]  # all in the config now
    options = {**rank_options(args, drop=given), "config": cfg.to_dict()}
    job = Job(n=args.np, hostfile=args.hostfile, program=program("train"), options=options, hint=hint)
    return run_training(args, job, cfg.out, elastic, extra, fresh=fresh)


def _check_fresh_run(args, cfg):
    """The run folder a new run will write (checked, not created)."""
    from mpitrain.data.dataset import check_validation, plan_for
    from mpitrain.parallel.strategies import strategy_class
    from mpitrain.train import runfolder
    from mpitrain.train.models import check_freeze, check_model, check_weights

    check_model(cfg.model, cfg.image_size)
    check_weights(cfg.model, cfg.weights)
    check_freeze(cfg.model, cfg.weights, cfg.init, cfg.freeze_backbone)
    strategy_class(cfg.strategy).check_ranks(args.np)
    check_validation(plan_for(cfg))  # refusals only: rank 0 says the warning, once
    return runfolder.prepare(cfg.out, cfg.overwrite, check_only=True)


def _missing(out) -> list:
    from mpitrain.outdir import missing_dirs

    return missing_dirs(out)
