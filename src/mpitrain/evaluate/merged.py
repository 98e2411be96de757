"""``evaluate --merge-classes NAME=A,B``: a many-class model read as a coarser one, and
the finer decision inside the merged group.

A three-class X-ray model (NORMAL, bacteria, virus) answers two clinical questions: is it
pneumonia at all (NORMAL against bacteria + virus), and which kind (bacteria against virus,
among the pneumonia images). For every merge NAME=A,B,...:

* the merged model: P(NAME) = P(A) + P(B) + ...; the other classes stay; the metrics of a
  model with those classes (argmax; with two classes left, sensitivity and specificity of
  the non-"normal" class, the positive-class rule of `threshold.positive_index`);
* within the group: the images whose true class is one of A, B, ..., each called the member
  class of highest probability: accuracy, per-class recall and the confusion matrix.
"""

from __future__ import annotations

import numpy as np

from mpitrain.errors import UserError


def parse(specs: list[str] | None, classes: list[str]) -> list[tuple[str, list[str]]]:
    """[(NAME, [member classes])]; one-line errors for an unknown class or a bad spec."""
    out: list[tuple[str, list[str]]] = []
    used: set[str] = set()
    for spec in specs or []:
        name, eq, rest = spec.partition("=")
        members = [m.strip() for m in rest.split(",") if m.strip()]
        if not eq or not name.strip() or len(members) < 2:
            raise UserError(f"--merge-classes {spec!r}: write NAME=CLASS,CLASS[,...] (two classes or more)")
        unknown = [m for m in members if m not in classes]
        if unknown:
            raise UserError(
                f"--merge-classes {spec!r}: the model has no class {unknown[0]!r} (classes: {', '.join(classes)})"
            )
        again = used.intersection(members)
        if again or len(set(members)) != len(members):
            raise UserError(f"--merge-classes {spec!r}: class {sorted(again or members)[0]!r} is merged twice")
        used.update(members)
        out.append((name.strip(), members))
    left = [c for c in classes if c not in used]
    names = [n for n, _ in out] + left
    if len(names) < 2:
        raise UserError("--merge-classes leaves a single class: keep at least two")
    if len(set(names)) != len(names):
        raise UserError(f"--merge-classes: a merged name is also a class name ({', '.join(names)})")
    return out


def merged_view(probs: np.ndarray, labels: np.ndarray, classes: list[str], merges) -> tuple:
    """(names, merged probabilities, merged labels)."""
    groups = [(n, [classes.index(m) for m in ms]) for n, ms in merges]
    used = {i for _, idx in groups for i in idx}
    columns = groups + [(c, [i]) for i, c in enumerate(classes) if i not in used]
    names = [n for n, _ in columns]
    p = np.stack([probs[:, idx].sum(axis=1) for _, idx in columns], axis=1).astype(np.float32)
    where = np.empty(len(classes), np.int64)
    for j, (_, idx) in enumerate(columns):
        where[idx] = j
    return names, p, where[labels]


def merge_metrics(probs: np.ndarray, labels: np.ndarray, classes: list[str], merges) -> list[dict]:
    """One dict per merge: the merged model's metrics and the within-group figures."""
    from mpitrain.engine.metrics import classification_metrics, confusion_matrix
    from mpitrain.evaluate.threshold import positive_index

    names, p, y = merged_view(probs, labels, classes, merges)
    pos = positive_index(names) if len(names) == 2 else None
    whole = classification_metrics(y, p, names, positive=1 if pos is None else pos)
    out = []
    for name, members in merges:
        idx = [classes.index(m) for m in members]
        inside = np.isin(labels, idx)
        y_in = np.array([idx.index(int(v)) for v in labels[inside]], np.int64)
        pred = probs[inside][:, idx].argmax(axis=1) if inside.any() else np.zeros(0, np.int64)
        cm = confusion_matrix(y_in, pred, len(idx))
        support = cm.sum(axis=1)
        out.append(
            {
                "name": name,
                "members": members,
                "merged": whole,
                "within": {
                    "n_samples": int(inside.sum()),
                    "accuracy": float(np.trace(cm) / cm.sum()) if cm.sum() else None,
                    "recall": {
                        m: (float(cm[i, i] / support[i]) if support[i] else None) for i, m in enumerate(members)
                    },
                    "confusion_matrix": cm.tolist(),
                },
            }
        )
    return out


def text_lines(results: list[dict]) -> list[str]:
    """The terminal lines of `evaluate`: one block per merge."""
    from mpitrain.evaluate.report import _v

    lines: list[str] = []
    for r in results:
        m, w = r["merged"], r["within"]
        head = f"  merged {r['name']} = {' + '.join(r['members'])}: classes {', '.join(m['class_names'])}"
        body = (
            f"accuracy {_v(m['accuracy'])}, balanced accuracy {_v(m['balanced_accuracy'])}, ROC AUC {_v(m['roc_auc'])}"
        )
        if m.get("positive_class") is not None:
            body += f", sensitivity ({m['positive_class']}) {_v(m['sensitivity'])}, specificity {_v(m['specificity'])}"
        recall = ", ".join(f"{c} {_v(v)}" for c, v in w["recall"].items())
        lines += [
            "",
            head,
            f"    {body} (argmax)",
            f"    within {r['name']} ({w['n_samples']:,} images): accuracy {_v(w['accuracy'])}; recall {recall}",
        ]
    return lines
