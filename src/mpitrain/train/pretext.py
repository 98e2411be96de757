"""--pretext rotation (`mpitrain pretrain`): self-supervised pre-training on the images
themselves, no labels and no downloads (Gidaris et al. 2018, "Unsupervised representation
learning by predicting image rotations").

Every image enters the training and the validation set four times, turned by 0, 90, 180
and 270 degrees, labelled by its turn; the model (--model, with four outputs) learns to
tell which. To do so it must find the anatomy (the spine, the clavicles, the heart's side),
which is what a classifier of the labels needs too. The run folder's model is then an
`--init` for `mpitrain train` on the labels: `init_from` copies every layer but the head,
whose shape differs (four outputs here).

Nothing else changes: the engine trains a four-class classifier, so every strategy, the
checkpoints and `--resume` (exact), `--elastic` and the metrics work as for any training.
The turns are applied to the stored rows before any augmentation; no --augment policy
flips an image (the heart is on the left), so a turned image keeps its label under them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mpitrain.data.dataset import Plan

__all__ = ["CLASSES", "TurnedPlan", "planned", "turned"]

CLASSES = ["0", "90", "180", "270"]  # degrees counter-clockwise: the pretext's class names
TURNS = len(CLASSES)


@dataclasses.dataclass
class TurnedPlan(Plan):
    """A plan whose classes are the turns. Its paths and labels stay the folder's (the rows
    are loaded, cached and split as for the labels); every image counts once in each turn."""

    def class_counts(self) -> np.ndarray:
        return np.full(TURNS, len(self.train_labels), np.int64)


def planned(plan: Plan) -> TurnedPlan:
    """The plan with the pretext's classes (the labels of the rows `turned` makes)."""
    fields = {f.name: getattr(plan, f.name) for f in dataclasses.fields(Plan)}
    return TurnedPlan(**{**fields, "classes": list(CLASSES)})


def turned(shard):
    """This rank's rows, each in its four turns (labels 0-3), in that order per image:
    row i becomes rows 4i..4i+3, so a shard's order stays the order of its images. A
    validation row's index (its file, for the saved predictions) is repeated likewise."""
    out = dataclasses.replace(shard)
    for split in ("train", "val"):
        x = getattr(shard, f"{split}_x")
        setattr(out, f"{split}_x", _turns(x))
        setattr(out, f"{split}_y", np.tile(np.arange(TURNS, dtype=np.int32), len(x)))
    if shard.val_index is not None:
        out.val_index = np.repeat(np.asarray(shard.val_index), TURNS)
    return out


def _turns(x: np.ndarray) -> np.ndarray:
    """[n, H, W(, C)] -> [4n, H, W(, C)]: each image turned by 0, 90, 180, 270 degrees
    (square: TrainConfig refuses --pretext rotation with other images)."""
    stacked = np.stack([np.rot90(x, k, axes=(1, 2)) for k in range(TURNS)], axis=1)
    return np.ascontiguousarray(stacked.reshape(len(x) * TURNS, *x.shape[1:]))
