"""Command line: `mpitrain {train,data,synth,bench,evaluate,predict,export}`: train image classifiers over MPI.

Errors: a UserError is one line on stderr and exit code 2. Any other exception is a bug:
one line with the rank (rerun with --debug for the traceback), and under MPI the whole job
is aborted so that no other rank is left waiting for this one (mpi4py's `run.py` rule).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from mpitrain.errors import UserError

_SEEN = "_options_seen"  # the namespace's set of single-valued options given so far (while parsing)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the whole usage)
        # "mpitrain: error: ..." like every other error; the subcommand is in the hint. A
        # command line that does not parse fails alike on every rank of `srun -n N mpitrain
        # ...` (or mpiexec's): only the first rank says so.
        from mpitrain.parallel.runscript import env_rank

        self.exit(2, None if env_rank() > 0 else f"mpitrain: error: {message} (see {self.prog} --help)\n")

    def add_argument(self, *args, **kwargs):
        # An option that takes one value, given twice, is surely a mistake (argparse keeps the
        # last silently): refuse it. "append" options (--model for ensembles) stay repeatable.
        if args and args[0].startswith("-") and kwargs.get("action") in (None, "store"):
            kwargs["action"] = _Once
        return super().add_argument(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        vars(namespace).pop(_SEEN, None)  # bookkeeping of _Once, not an option
        return namespace, extras

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            # argparse's subcommand leaves the unknown ones to the top parser, which would
            # point at `mpitrain --help`: the subcommand says it, with the closest option.
            command = getattr(namespace, "command", None)
            parser = _subparsers(self).choices.get(command, self) if command else self
            parser.error(_unrecognized(parser, extras))
        return namespace


def _subparsers(parser: argparse.ArgumentParser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """ "unrecognized arguments: ...", with `did you mean --x?` for a mistyped option (as git does)."""
    import difflib

    typed = next((e.split("=", 1)[0] for e in extras if e.startswith("-")), None)
    if typed is None:
        return f"unrecognized arguments: {' '.join(extras)}"
    options = [o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings]
    close = difflib.get_close_matches(typed, options, n=1, cutoff=0.6)
    return f"unknown option {typed}" + (f": did you mean {close[0]}?" if close else "")


def _refuse_repeat(namespace, action: argparse.Action, option_string) -> None:
    seen = vars(namespace).setdefault(_SEEN, set())
    if action.dest in seen:
        raise argparse.ArgumentError(action, "given twice: it takes one value, give it once")
    seen.add(action.dest)


class _Once(argparse.Action):
    """store, refusing a second value (see _Parser.add_argument)."""

    def __call__(self, parser, namespace, values, option_string=None):
        _refuse_repeat(namespace, self, option_string)
        setattr(namespace, self.dest, values)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _image_size(text: str) -> int | str:
    """--image-size PX or WxH (config.parse_image_size); its range is checked with the other options."""
    from mpitrain.config import parse_image_size

    try:
        return parse_image_size(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--image-size ")) from None


def _given(namespace) -> set:
    """The TrainConfig fields set on the command line (a --recipe fills in the others)."""
    if "given_options" not in vars(namespace):
        namespace.given_options = set()
    return namespace.given_options


class _Store(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        _refuse_repeat(namespace, self, option_string)
        setattr(namespace, self.dest, values)
        _given(namespace).add(self.dest)


class _Flag(argparse.Action):
    def __init__(self, option_strings, dest, default=False, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        _given(namespace).add(self.dest)


def _add_train_args(p: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """One option per TrainConfig field, `--field-name`: type from the annotation (bool: a
    flag), default, help, choices and metavar from the field (see config.py). The options
    given are recorded, so that a --recipe changes only the others. ``only``: just these
    fields (other commands that take some training options, e.g. the label-file ones)."""
    import dataclasses
    import typing

    from mpitrain.config import RECIPES, TrainConfig
    from mpitrain.parallel.strategies import compressions
    from mpitrain.parallel.strategies import names as strategy_names
    from mpitrain.train.models import MODELS

    types = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if only is not None and f.name not in only:
            continue
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        kind = types[f.name]
        if kind is bool:
            assert f.default is False, f"TrainConfig.{f.name}: a flag must default to False"
            p.add_argument(flag, action=_Flag, help=meta["help"])
            continue
        kind = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # X | None -> X
        if f.name == "image_size":  # int | str: PX or WxH
            kind = _image_size
        text, choices = meta["help"], meta["choices"]
        if f.name in ("strategy", "compress"):  # the strategies' registry holds these lists
            choices = strategy_names() if f.name == "strategy" else compressions()
        if f.name == "model":
            text += ": " + ", ".join(sorted(MODELS))
        if f.name == "recipe":
            text += "; " + "; ".join(
                f"{name}: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items())
                for name, values in RECIPES.items()
                if values
            )
        if f.default is not None:
            text += f" (default: {f.default})"
        p.add_argument(
            flag,
            action=_Store,
            type=kind,
            default=f.default,
            choices=choices,
            metavar=meta["metavar"],
            help=text,
        )


def _add_launch_args(p: argparse.ArgumentParser, fixed_order: bool = False) -> None:
    """-n and the other options of the launcher, which starts mpiexec for this command. Their
    names are recorded (`launcher_options`): the launcher keeps them from the ranks' options
    (launcher/commands.py)."""
    added = [
        p.add_argument(
            "-n",
            "--np",
            type=_positive_int,
            dest="np",
            metavar="N",
            help="start N processes with mpiexec (omit when already under mpiexec)",
        ),
        p.add_argument("--hostfile", metavar="FILE", help="MPI hostfile for -n (ranks on several machines)"),
        p.add_argument("--iface", metavar="NAME|CIDR", help=IFACE_HELP),
        p.add_argument("--force-ranks", action="store_true", help=FORCE_RANKS_HELP),
    ]
    if fixed_order:
        added.append(
            p.add_argument(
                "--fixed-order",
                action="store_true",
                help="for -n: sum the gradients in an order set by the number of ranks alone, not by how "
                "they sit on hosts, so one host or several give bit-identical weights (turns off Open "
                "MPI's hierarchical collectives, coll/han, which may be faster on many hosts)",
            )
        )
    p.set_defaults(launcher_options=tuple(a.dest for a in added))


def _add_debug(p: argparse.ArgumentParser, top: bool = False) -> None:
    # After a subcommand: SUPPRESS leaves the value given before it (or False) alone.
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS, help="show tracebacks")


FORCE_RANKS_HELP = (
    "for -n: start the ranks even when this host's available memory looks too small for them "
    "(by default refused: they would swap or be killed)"
)

IFACE_HELP = (
    "network for all of the job's TCP traffic (MPI messages and Open MPI's runtime), for -n: "
    "interface names or CIDR networks, comma-separated (e.g. eth1 or 10.0.0.0/24); default: "
    "Open MPI's choice, with a warning when the job spans hosts and this host has several"
)

# Multi-label tables (`train`, `data` and `evaluate`).
MULTI_LABEL_OPTIONS = ("label_columns", "multi_label", "findings_column", "no_finding", "uncertain", "blank")
LABEL_OPTIONS = ("labels", "val_labels", "path_column", "label_column", "patient_column", *MULTI_LABEL_OPTIONS)


def _columns(args):
    from mpitrain.data.labels import Columns

    return Columns.of(args)


def _data_or_labels(args) -> None:
    """`data` and `evaluate` read a class-folder layout or a label file: exactly one."""
    if (args.data is None) == (args.labels is None):
        raise UserError(
            "give --data DIR (one sub-folder per class) or --labels FILE.csv"
            + (", not both" if args.data is not None else "")
        )


def build_parser() -> argparse.ArgumentParser:
    from mpitrain import __version__

    parser = _Parser(prog="mpitrain", description="Train image classifiers across processes and machines over MPI.")
    parser.add_argument("--version", action="version", version=f"mpitrain {__version__}")
    _add_debug(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (
        _add_train,
        _add_pretrain,
        _add_data,
        _add_labels,
        _add_synth,
        _add_bench,
        _add_evaluate,
        _add_predict,
        _add_export,
        _add_run,
    ):
        add(sub)
    for command in sub.choices.values():
        _add_debug(command)
    return parser


def _add_run(sub) -> None:
    r = sub.add_parser(
        "run",
        help="run a Python script as N processes (your own mpitrain.fit or training loop)",
        description="Start N ranks of a Python script under mpiexec, with what `train -n N` has: a crashed "
        "or killed rank ends the job naming the rank, Ctrl-C ends every rank (exit 130), a Slurm allocation "
        "is respected, and an uncaught error on any rank aborts the job. Only rank 0's output is shown unless "
        "--all-output. The same script runs unchanged under mpiexec -n N python SCRIPT.",
    )
    r.add_argument("-n", "--np", type=_positive_int, dest="np", metavar="N", required=True, help="processes to start")
    r.add_argument("--hostfile", metavar="FILE", help="MPI hostfile (ranks on several machines)")
    r.add_argument("--iface", metavar="NAME|CIDR", help=IFACE_HELP)
    r.add_argument("--all-output", action="store_true", help="show every rank's output, each line tagged [rank R]")
    r.add_argument(
        "--elastic",
        action="store_true",
        help="let the job outlive a lost rank (Open MPI ULFM), for the script's mpitrain.fit(..., elastic=True)",
    )
    r.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="the script's mpitrain.fit aborts the job after this many seconds without progress (default: its "
        "own timeout option, else never)",
    )
    r.add_argument("script", metavar="SCRIPT.py", help="the Python script each rank runs")
    r.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="the script's own arguments")
    r.set_defaults(func=_cmd_run)


INFER_PRECISION = (
    "compute precision of the model; fp32 (the default) gives the same numbers "
    "on every machine, bf16 is faster where the CPU/GPU supports it (auto: there); "
    "weights and the softmax stay float32"
)


def _add_resume(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest good checkpoint (with its saved options)",
    )


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train a classifier (add -n N to start N processes)")
    _add_launch_args(t, fixed_order=True)
    _add_train_args(t)
    _add_resume(t)
    t.set_defaults(func=_cmd_train)


def _add_pretrain(sub) -> None:
    import dataclasses

    from mpitrain.config import PRETEXTS, TrainConfig

    p = sub.add_parser(
        "pretrain",
        help="self-supervised pre-training on the images alone, labels unused: a run folder for train --init "
        "(add -n N to start N processes)",
    )
    _add_launch_args(p, fixed_order=True)
    _add_train_args(p, only=tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "pretext"))
    p.add_argument(
        "--pretext",
        action=_Store,
        default="rotation",
        choices=[t for t in PRETEXTS if t != "none"],
        help="the task: rotation: every image in four turns (0, 90, 180, 270 degrees), the model learns which "
        "(default: rotation)",
    )
    _add_resume(p)
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args) -> int:
    """`mpitrain train --pretext rotation`, under the name the task has."""
    _given(args).add("pretext")
    return _cmd_train(args)


def _add_data(sub) -> None:
    from mpitrain.config import GROUPINGS, TrainConfig

    d = sub.add_parser("data", help="inspect an image folder: classes, counts, load speed, cache")
    d.add_argument("--data", metavar="DIR", help="folder with one sub-folder per class (or --labels)")
    d.add_argument("--val-data", metavar="DIR", help="separate validation folder with the same class folders")
    _add_train_args(d, only=(*LABEL_OPTIONS, "recipe"))
    d.add_argument(
        "--image-size",
        action=_Store,  # recorded as given: a --recipe fills in only what was not
        type=_image_size,
        default=TrainConfig.image_size,
        metavar="PX|WxH",
        help="decode at this size (WxH: width x height), as training would (default: %(default)s)",
    )
    d.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=1,
        help="decode as training would: 1 grey (colour images converted to luma), 3 colour "
        "(RGB; grey images replicated) (default: %(default)s)",
    )
    d.add_argument("--cache-dir", metavar="DIR", help="where decoded images are cached")
    d.add_argument(
        "--groups",
        action=_Store,
        choices=GROUPINGS,
        default="none",
        help="groups to keep whole in a split (default: look for patient ids and copies)",
    )
    d.add_argument("--group-pattern", metavar="REGEX", help="first capture group names the group")
    d.add_argument(
        "--val-split",
        type=float,
        default=TrainConfig.val_split,
        metavar="F",
        help="the split to check for shared groups (default: %(default)s)",
    )
    d.add_argument("--seed", type=int, default=TrainConfig.seed, help="the split's seed (default: %(default)s)")
    d.set_defaults(func=_cmd_data)


def _add_labels(sub) -> None:
    from mpitrain.config import GROUPINGS

    lb = sub.add_parser(
        "labels",
        help="write a label table (CSV) of a class-folder layout, classes optionally read from file names",
        description="Write FILE with columns path, label (and patient): every image of the class folders of "
        "--data, its class from --class-pattern where that matches its path, else its folder. Give the table "
        "to train and evaluate with --labels FILE (--patient-column patient).",
    )
    lb.add_argument("--data", required=True, metavar="DIR", help="folder with one sub-folder per class")
    lb.add_argument("--out", required=True, metavar="FILE", help="the CSV file to write")
    lb.add_argument(
        "--class-pattern",
        metavar="REGEX",
        help="searched in each path relative to --data; its first group (or the match) is the class, "
        "e.g. '_(bacteria|virus)_'",
    )
    lb.add_argument("--groups", choices=GROUPINGS, help="fill a patient column from the file names (filename-patient)")
    lb.add_argument("--group-pattern", metavar="REGEX", help="fill a patient column from this pattern's first group")
    lb.set_defaults(func=_cmd_labels)


def _cmd_labels(args) -> int:
    from mpitrain.data.table import make_table, summary

    print(summary(args.out, make_table(args.data, args.out, args.class_pattern, args.groups, args.group_pattern)))
    return 0


def _add_synth(sub) -> None:
    from mpitrain.config import TrainConfig

    s = sub.add_parser("synth", help="write the synthetic chest-X-ray-like demo data set")
    s.add_argument(
        "--out", required=True, metavar="DIR", help="new or empty folder to write (one sub-folder per class)"
    )
    s.add_argument(
        "--per-class", type=_positive_int, default=300, metavar="N", help="images per class (default: %(default)s)"
    )
    s.add_argument(
        "--image-size",
        type=_image_size,
        default=TrainConfig.image_size,
        metavar="PX|WxH",
        help="side of the square images in pixels, or WxH (width x height) (default: %(default)s)",
    )
    s.add_argument("--seed", type=int, default=0, help="same seed = same images, byte for byte (default: %(default)s)")
    s.add_argument(
        "--multi-label",
        action="store_true",
        help="a multi-label set instead: --images N pictures in DIR/images and DIR/labels.csv (path, patient, "
        "and a 1/0 column per finding: opacity, consolidation, interstitial, each drawn as its own pattern)",
    )
    s.add_argument(
        "--images", type=_positive_int, default=600, metavar="N", help="--multi-label: pictures (default: %(default)s)"
    )
    s.add_argument(
        "--prevalence",
        type=float,
        default=0.3,
        metavar="P",
        help="--multi-label: each finding's chance, independently (default: %(default)s)",
    )
    s.set_defaults(func=_cmd_synth)


def _add_bench(sub) -> None:
    from mpitrain.config import OVERLAPS, TrainConfig
    from mpitrain.parallel.strategies import compressions as strategy_compressions
    from mpitrain.parallel.strategies import names as strategy_names
    from mpitrain.runtime import PRECISIONS
    from mpitrain.train.models import KINDS_HELP, MODELS

    b = sub.add_parser(
        "bench",
        help="training throughput on generated data (add -n N for N processes)",
        description="Training throughput of the real train step and strategy, on generated "
        "random images held in memory (no data folder, no decoding, no disk), "
        "so it measures the model and the communication, not the input; with the model's "
        "FLOPs per image (counted from its layers), the GFLOP/s achieved against the "
        "machine's matmul rate, and the shares of compute, communication and host work.",
    )
    _add_launch_args(b)
    b.add_argument(
        "--model",
        default="seed",
        metavar="NAME",
        help=f"as for train: {KINDS_HELP} (registry: {', '.join(sorted(MODELS))}; default: %(default)s)",
    )
    b.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        help="1: grey, 3: colour (default: 1, or what the model needs, as for train)",
    )
    b.add_argument(
        "--batch-size",
        type=_positive_int,
        default=64,
        help=f"per rank (default: %(default)s, not train's {TrainConfig.batch_size}: docs/benchmarks.md "
        f"was measured at 64, where per-step overheads weigh less; use {TrainConfig.batch_size} "
        "to time train's default)",
    )
    b.add_argument("--steps", type=_positive_int, default=60, help="timed steps (default: %(default)s)")
    b.add_argument("--warmup", type=_positive_int, default=5, help="untimed steps first (default: %(default)s)")
    b.add_argument(
        "--repeats", type=_positive_int, default=1, help="timed runs; the best is reported (default: %(default)s)"
    )
    b.add_argument(
        "--image-size",
        type=_image_size,
        default=TrainConfig.image_size,
        metavar="PX|WxH",
        help="input side in pixels, or WxH (width x height) (default: %(default)s)",
    )
    b.add_argument(
        "--strategy",
        choices=strategy_names(),
        default="allreduce",
        help="how ranks stay in step, as in train (default: %(default)s)",
    )
    b.add_argument("--threads", type=_positive_int, help="TensorFlow threads per rank")
    b.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help="compute precision, as for train (default: %(default)s)"
    )
    b.add_argument(
        "--compress",
        choices=strategy_compressions(),
        default="none",
        help="gradient compression, as for train (default: %(default)s)",
    )
    b.add_argument(
        "--accumulate",
        type=_positive_int,
        default=TrainConfig.accumulate,
        metavar="K",
        help="micro-batches of --batch-size per step, as for train (default: %(default)s)",
    )
    b.add_argument(
        "--overlap",
        choices=OVERLAPS,
        default=TrainConfig.overlap,
        help="sum the gradients in buckets during backprop, as for train (default: %(default)s)",
    )
    b.add_argument(
        "--bucket-mb",
        type=float,
        default=TrainConfig.bucket_mb,
        metavar="MB",
        help="--overlap's bucket size, as for train (default: %(default)s)",
    )
    b.add_argument(
        "--no-sync",
        action="store_true",
        help="no exchange at all: each rank steps alone (the ceiling the strategies are measured against)",
    )
    b.add_argument(
        "--compare-fit", action="store_true", help="also time plain model.fit, in the same precision (one process)"
    )
    b.add_argument(
        "--json",
        action="store_true",
        help="standard output is one JSON object and nothing else (the summary goes to stderr)",
    )
    b.set_defaults(func=_cmd_bench)


def _add_evaluate(sub) -> None:
    from mpitrain.config import AUGMENTS
    from mpitrain.runtime import PRECISIONS

    e = sub.add_parser("evaluate", help="metrics of a trained model on a labelled folder (add -n N for N processes)")
    _add_launch_args(e)
    e.add_argument(
        "--model",
        required=True,
        action="append",
        metavar="RUNDIR",
        help="RUNDIR/model.keras (or RUNDIR) of a finished training, or an export of it (its folder: "
        "refused if model.keras changed since); repeat it for an ensemble that averages the models' probabilities",
    )
    e.add_argument(
        "--data", metavar="DIR", help="folder with one sub-folder per class (the model's classes; or --labels)"
    )
    _add_train_args(e, only=tuple(o for o in LABEL_OPTIONS if o not in ("val_labels", "patient_column")))
    e.add_argument("--json", metavar="FILE", help="also write every number to this JSON file")
    e.add_argument(
        "--threshold",
        type=float,
        help="decision threshold on P(positive class) (default: the one saved with the model)",
    )
    e.add_argument("--plots", metavar="DIR", help="write confusion_matrix.png and roc_curve.png here")
    e.add_argument(
        "--image-size",
        type=_image_size,
        metavar="PX|WxH",
        help="refuse to run unless the model was trained at this size",
    )
    e.add_argument("--threads", type=_positive_int, help="TensorFlow threads per rank")
    e.add_argument("--precision", choices=PRECISIONS, default="fp32", help=INFER_PRECISION)
    e.add_argument("--cache-dir", help="where decoded images are cached")
    _add_tta_args(e)
    e.add_argument(
        "--shift",
        choices=AUGMENTS,
        metavar="POLICY",
        help="show every image through one seeded draw of this --augment policy (a simulated change of "
        "machine and positioning: e.g. the validation images, --labels RUN/val_predictions.csv)",
    )
    e.add_argument(
        "--adjust-prior",
        action="store_true",
        help="estimate these images' class mix from the predictions (Saerens EM, no labels used) and decide "
        "by argmax of the probabilities corrected for it",
    )
    e.add_argument(
        "--merge-classes",
        action="append",
        metavar="NAME=A,B",
        help="also report the model with classes A, B, ... merged into NAME (probabilities summed) and the "
        "accuracy among A, B, ... images; repeatable",
    )
    e.set_defaults(func=_cmd_evaluate)


def _add_tta_args(p) -> None:
    from mpitrain.config import AUGMENTS

    p.add_argument(
        "--tta",
        type=_positive_int,
        default=1,
        metavar="N",
        help="test-time augmentation: mean probabilities of N views, the image and N-1 seeded draws (default 1: off)",
    )
    p.add_argument(
        "--tta-augment",
        choices=AUGMENTS,
        metavar="POLICY",
        help="the --augment policy of the views (default: the model's training policy, else xray)",
    )
    p.add_argument("--tta-seed", type=int, default=0, metavar="S", help="seed of the views' draws (default 0)")


def _add_predict(sub) -> None:
    from mpitrain.runtime import PRECISIONS

    pr = sub.add_parser("predict", help="class probabilities for image files and folders, as CSV")
    pr.add_argument(
        "--model",
        required=True,
        action="append",
        metavar="RUNDIR",
        help="RUNDIR/model.keras (or RUNDIR) of a finished training, or an export of it (its folder: "
        "refused if model.keras changed since); repeat it for an ensemble that averages the models' probabilities",
    )
    pr.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    pr.add_argument("--csv", metavar="FILE", help="write the rows here (default: standard output)")
    pr.add_argument(
        "--threshold",
        type=float,
        help="decision threshold on P(positive class) (default: the one saved with the model)",
    )
    pr.add_argument(
        "--image-size",
        type=_image_size,
        metavar="PX|WxH",
        help="refuse to run unless the model was trained at this size",
    )
    pr.add_argument("--threads", type=_positive_int, help="TensorFlow threads")
    pr.add_argument("--precision", choices=PRECISIONS, default="fp32", help=INFER_PRECISION)
    _add_tta_args(pr)
    # predict runs in one process: -n is taken only to say so (not in --help)
    pr.add_argument("-n", "--np", dest="np", metavar="N", help=argparse.SUPPRESS)
    pr.add_argument("--hostfile", help=argparse.SUPPRESS)
    pr.add_argument("--iface", help=argparse.SUPPRESS)
    pr.set_defaults(func=_cmd_predict)


def _add_export(sub) -> None:

    from mpitrain.evaluate.export import FORMATS

    x = sub.add_parser(
        "export",
        help="write a run's model as a TensorFlow SavedModel or a TFLite file, checked against model.keras",
        description="Write RUN's model as a SavedModel or TFLite file taking uint8 pixels "
        "[n, H, W, C] (0-255, resized to the training size W x H by the caller; C: 1 grey or 3 RGB) and giving "
        "class probabilities, with export.json (classes, threshold, input contract). "
        "The export is checked against model.keras on validation images before it "
        "is written.",
    )
    x.add_argument("run", metavar="RUN", help="the run folder (or RUN/model.keras) of a finished training")
    x.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="savedmodel: a TensorFlow SavedModel folder; tflite: model.tflite for LiteRT / TFLite",
    )
    x.add_argument("--out", metavar="DIR", help="new or empty folder to write (default: RUN/export-FORMAT)")
    x.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export in --out (a folder with export.json; any other non-empty folder is refused)",
    )
    x.add_argument("--threads", type=_positive_int, help="TensorFlow threads")
    x.set_defaults(func=_cmd_export)


def _check_launch(args) -> None:
    """The processes of this command form one job: tasks of srun that MPI does not join
    into one world stop (each would work alone), and -n/--hostfile, which start mpiexec,
    are refused under an MPI launcher (that would nest a job in each rank)."""
    from mpitrain.errors import agree
    from mpitrain.parallel.comm import check_world, launched_by_mpi, world

    check_world()
    flag = next(
        (
            f
            for f, v in (
                ("-n", args.np),
                ("--hostfile", args.hostfile),
                ("--iface", args.iface),
                ("--fixed-order", getattr(args, "fixed_order", None) or None),
            )
            if v is not None
        ),
        None,
    )
    if flag is not None and launched_by_mpi():
        # Every rank has the same command line: all stop together, rank 0 says it once.
        agree(
            world(),
            f"{flag} starts its own mpiexec, but this command already runs under an MPI "
            f"launcher: drop {flag} (the launcher's -n sets the processes) or drop the launcher",
        )


def _check_hostfile(args) -> None:
    """--hostfile, --iface and --fixed-order: options of the launcher (-n), checked before it starts."""
    from mpitrain.launcher.hosts import check_hostfile, check_iface

    if args.hostfile is not None:
        if args.np is None:
            raise UserError("--hostfile needs -n N")
        check_hostfile(args.hostfile)
    if args.iface is not None:
        if args.np is None:
            raise UserError(
                "--iface needs -n N (under your own mpiexec, give it Open MPI's "
                "--mca btl_tcp_if_include and --prtemca oob_tcp_if_include)"
            )
        args.iface = check_iface(args.iface)
    if getattr(args, "fixed_order", False) and args.np is None:
        raise UserError("--fixed-order needs -n N (under your own mpiexec, give it Open MPI's --mca coll ^han)")


def _cmd_evaluate(args) -> int:
    _check_launch(args)
    _check_hostfile(args)
    _data_or_labels(args)
    if args.np is not None:
        from mpitrain.evaluate.command import prepare
        from mpitrain.launcher.commands import launch_evaluate

        # Validate once here (no Keras needed), so a mistake is reported before any rank starts.
        prepare(
            args.model,
            args.data,
            args.threshold,
            args.image_size,
            args.json,
            args.plots,
            labels=args.labels,
            columns=_columns(args),
            views=_views(args),
        )
        return launch_evaluate(args)
    from mpitrain.evaluate.command import evaluate_main

    return evaluate_main(
        args.model,
        args.data,
        json_path=args.json,
        threshold=args.threshold,
        plots=args.plots,
        image_size=args.image_size,
        cache_dir=args.cache_dir,
        threads=args.threads,
        precision=args.precision,
        labels=args.labels,
        columns=_columns(args),
        views=_views(args),
    )


def _views(args):
    from mpitrain.evaluate.command import Views

    return Views(
        tta=args.tta,
        tta_augment=args.tta_augment,
        tta_seed=args.tta_seed,
        shift=args.shift,
        adjust_prior=args.adjust_prior,
        merge_classes=tuple(args.merge_classes or ()),
    )


def _cmd_predict(args) -> int:
    from mpitrain.evaluate.predict import predict_main

    if args.np is not None or args.hostfile is not None or args.iface is not None:
        flag = "-n" if args.np is not None else "--hostfile" if args.hostfile is not None else "--iface"
        raise UserError(
            f"predict runs in one process: drop {flag} (evaluate -n N spreads labelled images over N processes)"
        )

    return predict_main(
        args.model,
        args.paths,
        csv_path=args.csv,
        threshold=args.threshold,
        image_size=args.image_size,
        threads=args.threads,
        precision=args.precision,
        tta=(args.tta, args.tta_augment, args.tta_seed),
    )


def _cmd_export(args) -> int:
    from mpitrain.evaluate.export import export_main

    return export_main(args.run, args.format, out=args.out, overwrite=args.overwrite, threads=args.threads)


def _cmd_run(args) -> int:
    from mpitrain.launcher.script import run_script

    _check_launch(args)
    if args.timeout is not None and args.timeout < 0:
        raise UserError(f"--timeout must be >= 0 (0: never), got {args.timeout}")
    return run_script(
        args.np,
        args.script,
        list(args.args),
        hostfile=args.hostfile,
        iface=args.iface,
        all_output=args.all_output,
        timeout=args.timeout,
        elastic=args.elastic,
        debug=args.debug,
    )


def _cmd_bench(args) -> int:
    from mpitrain.config import check_image_size
    from mpitrain.train.models import check_model

    _check_launch(args)
    check_image_size(args.image_size)
    check_model(args.model, args.image_size, channels=args.channels or 1)
    _check_hostfile(args)
    if args.np is not None:
        from mpitrain.launcher.commands import launch_bench

        return launch_bench(args)
    from mpitrain.train.bench import bench_main

    return bench_main(
        model_name=args.model,
        batch=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        image_size=args.image_size,
        strategy=args.strategy,
        threads=args.threads,
        as_json=args.json,
        compare_fit=args.compare_fit,
        repeats=args.repeats,
        precision=args.precision,
        compress=args.compress,
        channels=args.channels,
        accumulate=args.accumulate,
        no_sync=args.no_sync,
        overlap=args.overlap,
        bucket_mb=args.bucket_mb,
    )


def _config_from_args(args):
    """The TrainConfig of the options given, the rest from the --recipe; under our launcher
    the one it resolved and sent (launcher/commands.py)."""
    import dataclasses

    from mpitrain.config import TrainConfig

    if getattr(args, "config", None) is not None:
        return TrainConfig.from_dict(args.config)
    given = getattr(args, "given_options", set())
    return TrainConfig.with_recipe(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name in given}
    )


def _cmd_train(args) -> int:
    _check_launch(args)
    _check_hostfile(args)
    if args.np is None:
        from mpitrain.train.command import train_main

        return train_main(lambda: _config_from_args(args), resume=args.resume)
    from mpitrain.launcher.commands import launch_train

    return launch_train(args, _config_from_args(args))


def _data_recipe(args) -> None:
    """`data --recipe R`: the image size and groups that `train --recipe R` would use, for
    those not given (so that `data` warms the cache entry the training reads)."""
    from mpitrain.config import TrainConfig

    given = _given(args)
    # --labels too: --patient-column needs it (TrainConfig's rule).
    named = {k: getattr(args, k) for k in ("labels", "group_pattern", "val_data", "val_labels", "patient_column")}
    cfg = TrainConfig.with_recipe(
        recipe=args.recipe,
        **{k: v for k, v in named.items() if v is not None},  # these turn off the recipe's groups, as in train
        **{k: getattr(args, k) for k in ("image_size", "groups") if k in given},
    )
    for name in ("image_size", "groups"):
        if name not in given:
            setattr(args, name, getattr(cfg, name))


def _cmd_data(args) -> int:
    from mpitrain.config import check_image_size, check_multi_label, check_sources
    from mpitrain.data.describe import describe_data

    _data_recipe(args)
    check_image_size(args.image_size)  # train's rule: `data` shows what training would load
    if args.groups != "none" and args.group_pattern:
        raise UserError("give --groups or --group-pattern, not both")
    _data_or_labels(args)
    check_sources(
        args.data,
        args.labels,
        args.val_data,
        args.val_labels,
        args.path_column,
        args.label_column,
        args.patient_column,
        args.groups,
        args.group_pattern,
    )
    check_multi_label(args)
    return describe_data(
        args.data,
        image_size=args.image_size,
        channels=args.channels,
        val_data=args.val_data,
        cache_dir=args.cache_dir,
        groups=args.groups,
        group_pattern=args.group_pattern,
        val_split=args.val_split,
        seed=args.seed,
        labels=args.labels,
        val_labels=args.val_labels,
        columns=_columns(args),
    )


def _cmd_synth(args) -> int:
    from mpitrain.config import check_image_size, image_shape
    from mpitrain.data.synth import generate

    check_image_size(args.image_size)

    size = args.image_size if isinstance(args.image_size, int) else image_shape(args.image_size)
    if args.multi_label:
        from mpitrain.data.synth import LABELS_FILE, generate_multilabel

        out = generate_multilabel(args.out, args.images, size, args.seed, args.prevalence)
        print(
            f"wrote synthetic multi-label data set to {out} (train it with --labels {out / LABELS_FILE} --multi-label "
            "--patient-column patient)"
        )
        return 0
    out = generate(args.out, per_class=args.per_class, image_size=size, seed=args.seed)
    print(f"wrote synthetic data set to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from mpitrain.runtime import mark_started, process_start_time

    # The command's start, for "total" times: the process's start from a shell, now when called in-process.
    mark_started(process_start_time() if argv is None else time.time())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide TensorFlow's start-up chatter
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    code = _main(args)
    from mpitrain.parallel.comm import exit_if_a_rank_was_lost

    exit_if_a_rank_was_lost(code)  # after an elastic loss: now, without MPI_Finalize
    return code


def _parse(argv: list[str]) -> argparse.Namespace:
    """The command's options: from the command line, or as the launcher parsed them for its
    ranks (parallel/wire.py): then argv is just the command, and nothing is parsed again."""
    from mpitrain.parallel.wire import received_options

    parser = build_parser()
    options = received_options(argv)
    if options is None:
        return parser.parse_args(argv)
    command = _subparsers(parser).choices[argv[0]]
    args = argparse.Namespace(command=argv[0], func=command.get_default("func"), **options)
    if "given_options" in options:
        args.given_options = set(options["given_options"])
    return args


def _main(args) -> int:
    try:
        return args.func(args)
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
    from mpitrain.errors import AgreedError
    from mpitrain.parallel.comm import launched_by_mpi, world

    if not isinstance(e, AgreedError) and launched_by_mpi() and world().size > 1:
        world().abort(code)


def _crash(e: BaseException, debug: bool) -> int:
    from mpitrain.parallel.comm import launched_by_mpi, world

    comm = world() if launched_by_mpi() else None
    where = f" on rank {comm.rank}" if comm is not None and comm.size > 1 else ""
    if debug:
        import traceback

        traceback.print_exc()
    print(
        f"mpitrain: error{where}: {type(e).__name__}: {e}"
        + ("" if debug else " (rerun with --debug for the traceback)"),
        file=sys.stderr,
    )
    if comm is not None and comm.size > 1:
        # Ranks still inside a collective would wait for us forever: end the whole job.
        comm.abort(1)
    return 1
