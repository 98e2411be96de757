"""Several trained runs used as one model: their class probabilities are averaged.

`mpitrain evaluate --model A --model B --model C` (and `predict`) average the members'
probabilities image by image, then decide with one threshold:

* ``--threshold T`` when given.
* Members whose threshold policy is ``prior`` (the default): the mean of their thresholds,
  each the class odds its loss was trained with (0.5 for all with balanced class weights).
  An average of such models estimates the same odds, so the same point applies.
* Members whose thresholds were chosen on validation (``youden``, ``target_sensitivity``):
  the same rule on the members' *averaged* validation predictions (``val_predictions.csv``).
  That needs one set of validation images for all: the same data, ``--val-split`` and
  ``--split-seed``. Runs split differently trained on each other's validation images, so
  no clean validation set exists for their average: refused, with the way out.
* Members without a threshold (more than two classes): argmax.

Members must agree on the classes (same names, same order), the image size (height and
width) and the channels. Averaging is
done in float64 and rounded once to float32.
"""

from __future__ import annotations

import numpy as np

from mpitrain.errors import UserError
from mpitrain.evaluate import modelio, per_label
from mpitrain.evaluate.modelio import ModelInfo


def read_info(models: list[str] | str, need_threshold: bool = True) -> ModelInfo:
    """One run's `modelio.read_info`, or the combined metadata of several. `need_threshold`
    False (a --threshold was given) skips choosing the members' common threshold."""
    if isinstance(models, str):
        models = [models]
    infos = [modelio.read_info(m) for m in models]
    if len(infos) == 1:
        return infos[0]
    paths = [i.path.resolve() for i in infos]
    if len(set(paths)) != len(paths):
        raise UserError("the same model was given twice: an ensemble needs different runs")
    first = infos[0]
    for other in infos[1:]:
        if other.classes != first.classes:
            raise UserError(
                f"models {first.path} and {other.path} have different classes "
                f"({', '.join(first.classes)} vs {', '.join(other.classes)}): they cannot be averaged"
            )
        if other.shape != first.shape:
            raise UserError(
                f"models {first.path} and {other.path} take different image sizes "
                f"({first.size_text} vs {other.size_text}): they cannot be averaged"
            )
        if other.channels != first.channels:
            raise UserError(
                f"models {first.path} and {other.path} take different channels "
                f"({first.channels} vs {other.channels}): they cannot be averaged"
            )
        if other.positive_class != first.positive_class:
            raise UserError(f"models {first.path} and {other.path} have different positive classes")
    info = ModelInfo(
        first.path,
        list(first.classes),
        first.image_size,
        None,
        "argmax",
        first.positive_class,
        {"channels": first.channels},
        infos,
    )
    multi = {per_label.is_multi_label(i) for i in infos}
    if len(multi) > 1:
        raise UserError("the models are not all multi-label (or all single-label): they cannot be averaged")
    if multi == {True}:  # a threshold per label, from the members' (`per_label.ensemble_thresholds`)
        info.extra = {"channels": first.channels, "multi_label": True}
        if need_threshold:
            info.extra.update(per_label.ensemble_thresholds(infos, _common_validation))
    elif need_threshold and len(first.classes) == 2:
        info.threshold, info.threshold_method, extra = _threshold(infos)
        info.extra = {**extra, "channels": first.channels}
    return info


def _threshold(infos: list[ModelInfo]) -> tuple[float | None, str, dict]:
    methods = {i.threshold_method for i in infos}
    if methods == {"argmax"}:
        return None, "argmax", {}
    if len(methods) > 1:
        raise UserError(
            f"the models chose their thresholds differently ({', '.join(sorted(methods))}): "
            "give --threshold T for the ensemble"
        )
    method = methods.pop()
    if method == "prior":
        return float(np.mean([i.threshold for i in infos])), "prior", {}
    targets = {i.extra.get("target_sensitivity") for i in infos}
    if len(targets) > 1:
        raise UserError(
            "the models were trained for different --target-sensitivity values: give --threshold T for the ensemble"
        )
    target = targets.pop()
    preds = _common_validation(infos)
    from mpitrain.evaluate.threshold import choose_threshold

    scores = preds[1][:, infos[0].positive]
    choice = choose_threshold(preds[0] == infos[0].positive, scores, target)
    if choice.threshold is None:
        raise UserError(f"no ensemble threshold: {choice.reason}; give --threshold T")
    return (
        choice.threshold,
        method,
        {
            "target_sensitivity": target,
            "val_sensitivity": choice.sensitivity,
            "val_specificity": choice.specificity,
            "val_images": len(scores),
        },
    )


def _common_validation(infos: list[ModelInfo]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, averaged probabilities) of the members' shared validation images."""
    from mpitrain import runfiles
    from mpitrain.evaluate import valpreds

    read = [valpreds.read(i.path.parent, i.classes) for i in infos]
    missing = [str(i.path.parent) for i, r in zip(infos, read) if r is None]
    if missing:
        raise UserError(
            f"{missing[0]} has no {runfiles.VAL_PREDICTIONS} (trained by an older mpitrain): give --threshold T for the ensemble"
        )
    runs = [r for r in read if r is not None]  # every one of them
    if any(r.paths != runs[0].paths for r in runs[1:]):
        raise UserError(
            "the models were validated on different images (another --seed moves the "
            "--val-split), so no image is unseen by all of them: give --threshold T, train "
            "them with one --split-seed, or with --threshold-policy prior"
        )
    return runs[0].labels, average([r.probs for r in runs])


def average(probs: list[np.ndarray]) -> np.ndarray:
    return np.mean(np.stack([np.asarray(p, np.float64) for p in probs]), axis=0).astype(np.float32)


class Averaged:
    """Callable like a Keras model on a batch: the members' mean probabilities."""

    def __init__(self, nets: list):
        self.nets = nets

    def __call__(self, x):
        return average([np.asarray(net(x)) for net in self.nets])


def load(info: ModelInfo, precision: str = "fp32"):
    """The model to predict with: a Keras model, or an `Averaged` of the members."""
    if not info.members:
        return modelio.load_model(info, precision)
    return Averaged([modelio.load_model(m, precision) for m in info.members])
