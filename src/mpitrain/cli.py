"""Command line: `mpitrain {train,data,synth,bench,evaluate,predict}`: train image classifiers over MPI.

Errors: a UserError is one line on stderr and exit code 2. Any other exception is a bug:
one line with the rank (rerun with --debug for the traceback), and under MPI the whole job
is aborted so that no other rank is left waiting for this one (mpi4py's `run.py` rule).
"""

from __future__ import annotations

import argparse
import os
import sys

from mpitrain.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the whole usage)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from mpitrain.config import (AUGMENTS, CLASS_WEIGHTS, GROUPINGS, KEEP_BEST_METRICS, LR_SCALINGS, OPTIMIZERS,
                                 STRATEGIES)

    p.add_argument("--data", help="folder with one sub-folder per class (default: embedded demo data)")
    p.add_argument("--val-data", help="separate validation folder with the same class folders")
    p.add_argument("--val-split", type=float, default=0.1, help="stratified validation fraction (default 0.1)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32, help="batch size PER RANK (global = ranks x this)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate for one rank (see --lr-scaling)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    p.add_argument("--model", default="seed", help="model name (default: seed)")
    p.add_argument("--image-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="run folder (default: runs/<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty run folder")
    p.add_argument("--strategy", choices=STRATEGIES, default="allreduce")
    p.add_argument("--sync-every", type=int,
                   help="steps between weight syncs (local-sgd: default 4; master-worker: default one epoch)")
    p.add_argument("--lr-scaling", choices=LR_SCALINGS, default="auto",
                   help="scale --lr by the number of training ranks (auto: sqrt; none for master-worker)")
    p.add_argument("--lr-schedule", choices=("auto", "cosine", "constant"), default="auto",
                   help="after warm-up: cosine decay to zero over the run, or constant "
                        "(auto: cosine; constant for master-worker)")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear lr warm-up to the scaled rate")
    p.add_argument("--class-weight", choices=CLASS_WEIGHTS, default="balanced")
    p.add_argument("--target-sensitivity", type=float,
                   help="choose the decision threshold for this sensitivity on the validation data "
                        "(default: maximise Youden's J)")
    p.add_argument("--tensorboard", action="store_true", help="write TensorBoard logs to RUNDIR/tb")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest good checkpoint (with its saved options)")
    p.add_argument("--checkpoint-every", type=int, help="also checkpoint every S steps (always at epoch ends)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many checkpoints to keep (default 2)")
    p.add_argument("--elastic", action="store_true",
                   help="survive lost ranks: the others shrink the job and go on (Open MPI ULFM)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="abort the job after this many seconds without progress (0: never; default 600)")
    p.add_argument("--data-on-root", action="store_true",
                   help="only rank 0 reads the images and sends each rank its share (no shared file system)")
    p.add_argument("--threads", type=int, help="TensorFlow threads per rank (default: cores / ranks per node)")
    p.add_argument("--cache-dir", help="where decoded images are cached (default: ~/.cache/mpitrain)")
    # Augmentation, patient-grouped split, best epoch / early stop.
    p.add_argument("--augment", choices=AUGMENTS, default="none",
                   help="random rotation/zoom/shift/gamma/contrast/brightness of training batches, "
                        "seeded by seed, epoch, rank and step (xray; default none)")
    p.add_argument("--groups", choices=GROUPINGS, default="none",
                   help="keep groups on one side of --val-split: filename-patient (personNNN_, IM-NNNN-, "
                        "NORMAL2-IM-NNNN-) or duplicates (byte-identical files; always merged when grouping)")
    p.add_argument("--group-pattern", metavar="REGEX",
                   help="keep images whose relative path gives the same first capture group on one side "
                        "of --val-split, e.g. '(person\\d+)_'")
    p.add_argument("--keep-best", choices=KEEP_BEST_METRICS,
                   help="at the end, restore the weights of the epoch with the best value of this metric")
    p.add_argument("--early-stop", type=int, metavar="PATIENCE",
                   help="stop after PATIENCE epochs without a better --keep-best metric (default val_loss)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mpitrain", description="Train image classifiers across processes and machines over MPI.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a classifier (add -n N to start N processes)")
    t.add_argument("-n", "--np", type=_positive_int, dest="np",
                   help="start N processes with mpiexec (omit when already under mpiexec)")
    t.add_argument("--hostfile", help="MPI hostfile for -n (ranks on several machines)")
    _add_train_args(t)
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    t.set_defaults(func=_cmd_train)

    d = sub.add_parser("data", help="inspect an image folder: classes, counts, load speed, cache")
    d.add_argument("--data", required=True)
    d.add_argument("--val-data")
    d.add_argument("--image-size", type=int, default=50)
    d.add_argument("--cache-dir")
    d.add_argument("--groups", choices=("none", "filename-patient", "duplicates"), default="none",
                   help="groups to keep whole in a split (default: look for patient ids and copies)")
    d.add_argument("--group-pattern", metavar="REGEX", help="first capture group names the group")
    d.add_argument("--val-split", type=float, default=0.1, help="the split to check for shared groups")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_data)

    s = sub.add_parser("synth", help="write the synthetic chest-X-ray-like demo data set")
    s.add_argument("--out", required=True)
    s.add_argument("--per-class", type=int, default=300)
    s.add_argument("--image-size", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_synth)
    b = sub.add_parser("bench", help="training throughput on generated data (add -n N for N processes)")
    b.add_argument("-n", "--np", type=_positive_int, dest="np", help="start N processes with mpiexec")
    b.add_argument("--hostfile")
    b.add_argument("--model", default="seed")
    b.add_argument("--batch-size", type=_positive_int, default=64, help="per rank")
    b.add_argument("--steps", type=_positive_int, default=60)
    b.add_argument("--warmup", type=_positive_int, default=5)
    b.add_argument("--repeats", type=_positive_int, default=1, help="timed runs; the best is reported")
    b.add_argument("--image-size", type=_positive_int, default=50)
    b.add_argument("--strategy", choices=("allreduce", "local-sgd", "master-worker"), default="allreduce")
    b.add_argument("--threads", type=_positive_int, help="TensorFlow threads per rank")
    b.add_argument("--compare-fit", action="store_true", help="also time plain model.fit (one process)")
    b.add_argument("--json", action="store_true", help="last line: one JSON object")
    b.set_defaults(func=_cmd_bench)

    e = sub.add_parser("evaluate", help="metrics of a trained model on a labelled folder (add -n N for N processes)")
    e.add_argument("-n", "--np", type=_positive_int, dest="np", help="start N processes with mpiexec")
    e.add_argument("--hostfile", help="MPI hostfile for -n")
    e.add_argument("--model", required=True, help="RUNDIR/model.keras (or RUNDIR) of a finished training")
    e.add_argument("--data", required=True, help="folder with one sub-folder per class (the model's classes)")
    e.add_argument("--json", metavar="FILE", help="also write every number to this JSON file")
    e.add_argument("--threshold", type=float, help="decision threshold on P(positive class) "
                                                   "(default: the one saved with the model)")
    e.add_argument("--plots", metavar="DIR", help="write confusion_matrix.png and roc_curve.png here")
    e.add_argument("--image-size", type=int, help="refuse to run unless the model was trained at this size")
    e.add_argument("--threads", type=_positive_int, help="TensorFlow threads per rank")
    e.add_argument("--cache-dir", help="where decoded images are cached")
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    e.set_defaults(func=_cmd_evaluate)

    pr = sub.add_parser("predict", help="class probabilities for image files and folders, as CSV")
    pr.add_argument("--model", required=True, help="RUNDIR/model.keras (or RUNDIR) of a finished training")
    pr.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    pr.add_argument("--csv", metavar="FILE", help="write the rows here (default: standard output)")
    pr.add_argument("--threshold", type=float, help="decision threshold on P(positive class) "
                                                    "(default: the one saved with the model)")
    pr.add_argument("--image-size", type=int, help="refuse to run unless the model was trained at this size")
    pr.add_argument("--threads", type=_positive_int, help="TensorFlow threads")
    pr.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    pr.set_defaults(func=_cmd_predict)
    return parser


def _cmd_evaluate(args, argv) -> int:
    if args.np is not None:
        from mpitrain.dist import launch
        from mpitrain.evaluate.command import prepare

        # Validate once here (no Keras needed), so a mistake is reported before any rank starts.
        prepare(args.model, args.data, args.threshold, args.image_size, args.json, args.plots)
        return launch.run(args.np, _strip_launch_args(argv), hostfile=args.hostfile)
    from mpitrain.evaluate.command import evaluate_main

    return evaluate_main(args.model, args.data, json_path=args.json, threshold=args.threshold,
                         plots=args.plots, image_size=args.image_size, cache_dir=args.cache_dir,
                         threads=args.threads)


def _cmd_predict(args, argv) -> int:
    from mpitrain.evaluate.predict import predict_main

    return predict_main(args.model, args.paths, csv_path=args.csv, threshold=args.threshold,
                        image_size=args.image_size, threads=args.threads)


def _cmd_bench(args, argv) -> int:
    from mpitrain.train.models import MODELS

    if args.model not in MODELS:
        raise UserError(f"unknown model {args.model!r}; choose one of: {', '.join(sorted(MODELS))}")
    if args.np is not None:
        from mpitrain.dist import launch

        return launch.run(args.np, _strip_launch_args(argv), hostfile=args.hostfile)
    from mpitrain.train.bench import bench_main

    return bench_main(model_name=args.model, batch=args.batch_size, steps=args.steps, warmup=args.warmup,
                      image_size=args.image_size, strategy=args.strategy, threads=args.threads,
                      as_json=args.json, compare_fit=args.compare_fit, repeats=args.repeats)


def _config_from_args(args):
    from mpitrain.config import TrainConfig

    return TrainConfig(
        data=args.data, val_data=args.val_data, val_split=args.val_split, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer, momentum=args.momentum,
        model=args.model, image_size=args.image_size, seed=args.seed, out=args.out,
        overwrite=args.overwrite, strategy=args.strategy, sync_every=args.sync_every,
        lr_scaling=args.lr_scaling, lr_schedule=args.lr_schedule, warmup_epochs=args.warmup_epochs, class_weight=args.class_weight,
        target_sensitivity=args.target_sensitivity, tensorboard=args.tensorboard,
        threads=args.threads, cache_dir=args.cache_dir, data_on_root=args.data_on_root,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints, timeout=args.timeout,
        elastic=args.elastic,
        augment=args.augment, groups=args.groups, group_pattern=args.group_pattern,
        keep_best=args.keep_best, early_stop=args.early_stop)


def _strip_launch_args(argv: list[str]) -> list[str]:
    """The child command line: ours without -n/--np/--hostfile (they are for the launcher)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("-n", "--np", "--hostfile"):
            skip = True
            continue
        if a.startswith(("--np=", "--hostfile=")) or (a.startswith("-n") and a[2:].isdigit()):
            continue
        out.append(a)
    return out


def _cmd_train(args, argv) -> int:
    if args.np is None:
        from mpitrain.train.command import train_main

        return train_main(lambda: _config_from_args(args), resume=args.resume)
    cfg = _config_from_args(args)  # validates: errors are reported here, once, before launching
    if args.resume:  # the ranks check the run folder and its checkpoints (an agreed error)
        from mpitrain.dist import launch

        return launch.run(args.np, _strip_launch_args(argv), hostfile=args.hostfile,
                          extra=launch.elastic_flags() if args.elastic else None)
    from mpitrain.data.dataset import make_plan, resolve_data_dir
    from mpitrain.dist import launch
    from mpitrain.train.runfolder import prepare

    if cfg.strategy == "master-worker" and args.np < 2:
        raise UserError("--strategy master-worker needs -n 2 or more (1 master + workers)")
    make_plan(resolve_data_dir(cfg.data, cfg.cache_dir), cfg.val_data, cfg.val_split, cfg.seed,
              cfg.groups, cfg.group_pattern)
    out = prepare(cfg.out, cfg.overwrite)
    child = _strip_launch_args(argv)
    if cfg.out is None:  # every rank must use the folder the launcher just made
        child += ["--out", str(out)]
    hint = f"mpitrain train -n {args.np} --resume --out {out}"
    return launch.run(args.np, child, hostfile=args.hostfile, resume_hint=hint,
                      extra=launch.elastic_flags() if cfg.elastic else None)


def _cmd_data(args, argv) -> int:
    from mpitrain.data.describe import describe_data

    if args.image_size < 4:
        raise UserError(f"--image-size must be >= 4, got {args.image_size}")
    if args.groups != "none" and args.group_pattern:
        raise UserError("give --groups or --group-pattern, not both")
    return describe_data(args.data, image_size=args.image_size, val_data=args.val_data,
                         cache_dir=args.cache_dir, groups=args.groups, group_pattern=args.group_pattern,
                         val_split=args.val_split, seed=args.seed)


def _cmd_synth(args, argv) -> int:
    from mpitrain.data.synth import generate

    out = generate(args.out, per_class=args.per_class, image_size=args.image_size, seed=args.seed)
    print(f"wrote synthetic data set to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide TensorFlow's start-up chatter
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    code = _main(args, argv)
    _exit_if_a_rank_was_lost(code)
    return code


def _exit_if_a_rank_was_lost(code: int) -> None:
    """After an elastic loss, leave without MPI_Finalize.

    Finalize synchronises with every process the job started, dead ones included, and under
    ULFM it has been seen to wait forever after a lost rank. Everything is written and
    flushed by now, and Open MPI's ULFM mode accepts the exit code as it is.
    """
    from mpitrain.dist import comm

    if comm.current() is not None and comm.current().lost_any:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _main(args, argv) -> int:
    try:
        return args.func(args, argv)
    except UserError as e:
        print(f"mpitrain: error: {e}", file=sys.stderr)
        _abort_if_alone(e, 2)
        return 2
    except KeyboardInterrupt:
        print("mpitrain: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence
        from mpitrain.errors import QuietExit

        if isinstance(e, QuietExit):
            return e.code
        return _crash(e, getattr(args, "debug", False))


def _abort_if_alone(e: UserError, code: int) -> None:
    """A user error found by one rank alone, after set-up: the others must not wait."""
    from mpitrain.dist.comm import launched_by_mpi, world
    from mpitrain.errors import AgreedError

    if not isinstance(e, AgreedError) and launched_by_mpi() and world().size > 1:
        world().abort(code)


def _crash(e: BaseException, debug: bool) -> int:
    from mpitrain.dist.comm import launched_by_mpi, world

    comm = world() if launched_by_mpi() else None
    where = f" on rank {comm.rank}" if comm is not None and comm.size > 1 else ""
    if debug:
        import traceback

        traceback.print_exc()
    print(f"mpitrain: error{where}: {type(e).__name__}: {e}"
          + ("" if debug else " (rerun with --debug for the traceback)"), file=sys.stderr)
    if comm is not None and comm.size > 1:
        # Ranks still inside a collective would wait for us forever: end the whole job.
        comm.abort(1)
    return 1
