"""Evaluating a multi-label model (model.json's `multi_label`): a table's labels in the
model's order, each label's threshold, and the per-label metrics.

The images come from a label table (`--labels FILE.csv`; class folders hold one class per
image). Without `--label-columns`, `--multi-label` or `--findings-column` the table's label
columns are the model's label names, so a table in the training's form needs no option
but `--labels`. The table's labels must be the model's (in any order); a findings table
may lack a finding (no image has it: all zeros), never add one.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mpitrain.errors import UserError
from mpitrain.evaluate.modelio import ModelInfo


def is_multi_label(info: ModelInfo) -> bool:
    return bool(info.extra.get("multi_label"))


def thresholds(info: ModelInfo, override: float | None) -> tuple[np.ndarray, str]:
    """(a threshold per label, where they come from: "model" or "--threshold")."""
    if override is not None:
        if not 0.0 <= override <= 1.0:
            raise UserError(f"--threshold must be in [0, 1], got {override}")
        return np.full(len(info.classes), float(override)), "--threshold"
    saved = info.extra.get("thresholds") or {}
    return np.array([float(saved.get(c, 0.5)) for c in info.classes]), "model"


def columns_for(info: ModelInfo, columns):
    """The table's columns: as given, or the model's label names as label columns."""
    if columns.labels or columns.all_labels or columns.findings:
        return columns
    return dataclasses.replace(columns, labels=tuple(info.classes))


def read(info: ModelInfo, labels_file: str | None, columns, views) -> tuple:
    """(the table's FileIndex, its labels [n, L] in the model's label order)."""
    from mpitrain.data.labels import read_labels

    if labels_file is None:
        raise UserError(
            f"model {info.path} is multi-label: evaluate it on a label table (--labels FILE.csv), not class folders"
        )
    if views.adjust_prior or views.merge_classes:
        raise UserError("--adjust-prior and --merge-classes are for one label per image; drop them")
    cols = columns_for(info, columns)
    index = read_labels(labels_file, cols)
    if index.labels.ndim != 2:
        raise UserError(
            f"model {info.path} is multi-label; read {labels_file} as a multi-label table "
            "(--label-columns, --multi-label or --findings-column)"
        )
    unknown = [c for c in index.classes if c not in info.classes]
    if unknown:
        raise UserError(
            f"model {info.path} was trained for labels {', '.join(info.classes)}; "
            f"labels file {index.source} has others: {', '.join(unknown)}"
        )
    missing = [c for c in info.classes if c not in index.classes]
    if missing and not cols.findings:
        raise UserError(f"labels file {index.source} lacks the model's label(s) {', '.join(missing)}")
    mapped = np.zeros((len(index.paths), len(info.classes)), np.float32)  # a finding nobody has: 0
    for j, name in enumerate(index.classes):
        mapped[:, info.classes.index(name)] = index.labels[:, j]
    return index, mapped


def rule(names: list[str], ts: np.ndarray) -> str:
    """predict's decision column: each label's comparison, exactly as made."""
    return "; ".join(f"p_{c} >= {float(t)!r}" for c, t in zip(names, ts))


def metrics(info: ModelInfo, labels, probs, ts: np.ndarray, source: str, counts: np.ndarray) -> dict:
    """The per-label metrics at the thresholds, checked against the reduced positive counts."""
    from mpitrain.engine.multilabel import multilabel_metrics

    m = multilabel_metrics(labels, probs, info.classes, ts)
    if [v["positives"] for v in m["per_label"].values()] != counts[2:].astype(int).tolist():
        raise RuntimeError("per-label counts differ between the reduction and the gathered labels")
    m["threshold_source"] = source
    method = info.extra.get("threshold_policy") if source == "model" else source
    for v in m["per_label"].values():
        v["threshold_method"] = method
    m["thresholds"] = dict(zip(info.classes, map(float, ts)))
    return m


def data_text(result: dict) -> str:
    """The data line's counts: positives per label."""
    return ", ".join(f"{c} {v['positives']:,}" for c, v in result["per_label"].items()) + " positive"


def ensemble_thresholds(infos: list[ModelInfo], common_validation) -> dict:
    """model.json's threshold keys for an ensemble of multi-label runs: with the members'
    policy `prior`, each label's mean threshold; with thresholds chosen on validation, the
    same policy again, label by label, on the members' averaged validation predictions
    (`common_validation(infos)` -> (labels, probs): the same images for all)."""
    from mpitrain.evaluate.threshold import choose_per_label

    policies = {i.extra.get("threshold_policy") for i in infos}
    targets = {i.extra.get("target_sensitivity") for i in infos}
    if len(policies) > 1 or len(targets) > 1:
        raise UserError(
            "the models chose their thresholds differently (--threshold-policy / --target-sensitivity): "
            "give --threshold T for the ensemble"
        )
    policy, target = policies.pop(), targets.pop()
    names = infos[0].classes
    if policy == "prior" and target is None:
        ts = np.mean([thresholds(i, None)[0] for i in infos], axis=0)
    else:
        labels, probs = common_validation(infos)
        ts = np.array([c.threshold for c in choose_per_label(labels, probs, target, policy or "youden")])
    return {"thresholds": dict(zip(names, map(float, ts))), "threshold_policy": policy}
