"""Metrics as people read them: an aligned terminal table, and ``report.md`` for a run.

Both are built from the same rows (`metric_rows`), so the terminal, the JSON and the report
always show the same numbers. ``report.md`` lives in the run folder and shows the figures
with relative links, the validation metrics, the timings and the whole config.
"""

from __future__ import annotations

from pathlib import Path

from mpitrain import runfiles


def _v(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def threshold_text(metrics: dict, source: str | None = None) -> str:
    t = metrics.get("threshold")
    if metrics.get("positive_class") is None:
        return "argmax (more than two classes)"
    if t is None:
        return f"argmax (P({metrics['positive_class']}) vs the other class)"
    target = metrics.get("target_sensitivity")
    how = {
        "prior": "the class odds of the training loss",
        "youden": "Youden's J on validation",
        "target_sensitivity": f"sensitivity >= {target:g} on validation" if target else "target sensitivity",
        "--threshold": "--threshold",
    }.get(source or metrics.get("threshold_method") or "", source or "")
    return f"P({metrics['positive_class']}) >= {t:.4f}" + (f" ({how})" if how else "")


MIX_POINTS = 0.10  # a class share this much away from training's (absolute) is worth a warning


def mix_warning(train_counts: dict | None, counts: dict) -> str | None:
    """A warning when the evaluated images' class mix differs much from the training mix:
    accuracy, precision and F1 then move with the mix alone, and a threshold set for one
    mix trades errors differently on another."""
    if not train_counts or not counts:
        return None
    # Over the classes present here: evaluating on a subset of the classes is no mix change
    # (the absent ones are named in the table).
    present = [c for c in train_counts if counts.get(c, 0) > 0]
    n_train, n = sum(train_counts[c] for c in present), sum(counts[c] for c in present)
    if len(present) < 2 or n_train <= 0:
        return None
    shares = {c: (train_counts[c] / n_train, counts[c] / n) for c in present}
    far = {c: ab for c, ab in shares.items() if abs(ab[0] - ab[1]) >= MIX_POINTS}
    if not far:
        return None
    said = ", ".join(f"{c} {b:.0%} here vs {a:.0%} in training" for c, (a, b) in far.items())
    return (
        f"warning: the class mix differs from training ({said}): accuracy, precision and F1 "
        "depend on the mix; balanced accuracy, sensitivity, specificity and ROC AUC do not"
    )


def multilabel_rows(metrics: dict) -> list[tuple[str, str]]:
    """(label, value) rows of a multi-label result: the means over the labels."""
    return [
        ("images", f"{metrics['n_samples']:,}"),
        ("labels", str(len(metrics["label_names"]))),
        ("mean ROC AUC", _v(metrics["mean_roc_auc"])),
        ("mean PR AUC", _v(metrics["mean_pr_auc"])),
        ("mean sensitivity", _v(metrics["mean_sensitivity"])),
        ("mean specificity", _v(metrics["mean_specificity"])),
        ("label accuracy", _v(metrics["label_accuracy"])),
        ("exact match (every label right)", _v(metrics["exact_match"])),
        ("decision", "one threshold per label (below)"),
    ]


LABEL_HEADER = [
    "label",
    "positives",
    "negatives",
    "prevalence",
    "ROC AUC",
    "PR AUC",
    "sensitivity",
    "specificity",
    "threshold",
]


def label_table(metrics: dict) -> list[list[str]]:
    """The per-label rows of a multi-label result (masked entries are in neither count)."""
    rows = []
    for name, m in metrics["per_label"].items():
        rows.append(
            [
                name,
                f"{m['positives']:,}",
                f"{m['negatives']:,}",
                _v(m["prevalence"], 3),
                _v(m["roc_auc"]),
                _v(m["pr_auc"]),
                _v(m["sensitivity"]),
                _v(m["specificity"]),
                _v(m["threshold"]),
            ]
        )
    return rows


def metric_rows(metrics: dict, source: str | None = None) -> list[tuple[str, str]]:
    """(label, value) rows: binary metrics of the positive class, or macro/micro averages."""
    if metrics.get("multi_label"):
        return multilabel_rows(metrics)
    rows = [
        ("images", f"{metrics['n_samples']:,}"),
        ("accuracy", _v(metrics["accuracy"])),
        ("balanced accuracy", _v(metrics["balanced_accuracy"])),
    ]
    if metrics.get("positive_class") is not None:
        rows += [
            ("precision (PPV)", _v(metrics["precision"])),
            ("recall = sensitivity", _v(metrics["recall"])),
            ("specificity", _v(metrics["specificity"])),
            ("F1", _v(metrics["f1"])),
        ]
    else:
        for avg in ("macro", "micro"):
            rows += [
                (f"{avg} precision", _v(metrics[f"{avg}_precision"])),
                (f"{avg} recall", _v(metrics[f"{avg}_recall"])),
                (f"{avg} F1", _v(metrics[f"{avg}_f1"])),
            ]
    one_vs_rest = "" if metrics.get("positive_class") is not None else " (macro, one-vs-rest)"
    rows += [
        ("ROC AUC" + one_vs_rest, _v(metrics["roc_auc"])),
        ("PR AUC" + one_vs_rest, _v(metrics["pr_auc"])),
        ("decision", threshold_text(metrics, source)),
    ]
    absent = metrics.get("absent_classes") or []
    if absent:
        n_present = len(metrics["class_names"]) - len(absent)
        rows.append(
            (
                "absent classes",
                f"{', '.join(absent)}: no images in this data; averages are over "
                f"the {n_present} class{'es' * (n_present != 1)} present",
            )
        )
    return rows


def _grid(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [line(header)] + [line(r) for r in body]


def text_table(metrics: dict, source: str | None = None) -> str:
    """The terminal report of `mpitrain evaluate`."""
    rows = metric_rows(metrics, source)
    width = max(len(k) for k, _ in rows)
    out = [f"  {k.ljust(width)}  {v}" for k, v in rows]
    if metrics.get("multi_label"):
        return "\n".join(out + ["", "  per label"] + ["  " + s for s in _grid(LABEL_HEADER, label_table(metrics))])
    names = metrics["class_names"]
    out += ["", "  confusion matrix (rows: true class, columns: predicted class)"]
    cm = metrics["confusion_matrix"]
    out += [
        "  " + s
        for s in _grid(["true \\ predicted"] + names, [[n] + [f"{c:,}" for c in row] for n, row in zip(names, cm)])
    ]
    out += ["", "  per class"]
    pc = metrics["per_class"]
    absent = set(metrics.get("absent_classes") or [])  # named once in the rows above instead
    out += [
        "  " + s
        for s in _grid(
            ["class", "images", "precision", "recall", "F1"],
            [
                [n, f"{pc[n]['support']:,}", _v(pc[n]["precision"]), _v(pc[n]["recall"]), _v(pc[n]["f1"])]
                for n in names
                if n not in absent
            ],
        )
    ]
    return "\n".join(out)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(map(esc, header)) + " |", "|" + " --- |" * len(header)] + [
        "| " + " | ".join(map(esc, r)) + " |" for r in rows
    ]


def _duration(seconds: float) -> str:
    m, s = divmod(float(seconds), 60.0)
    return f"{int(m)} min {s:.1f} s" if m else f"{s:.1f} s"


def _loss(e: dict) -> list[str]:
    """An events.jsonl line: what was lost, the ranks before and after, where the run went on."""
    ranks = f"{e['ranks_before']} -> {e['ranks_after']}"
    if e.get("event") == "host_lost":  # the launcher started the job again (launcher/hostloss.py)
        return [f"host {e['host']} ({e['lost_ranks']} rank(s))", ranks, f"checkpoint: {e['continue_from']}"]
    return [
        f"rank(s) {', '.join(map(str, e['lost_ranks']))}",
        ranks,
        f"epoch {e['epoch']}, step {e['continue_at_step']} of {e['of_new_steps']} (lost at step {e['step']} "
        f"of {e['of_steps']})",
    ]


def _comm_label(strategy) -> str:
    """What rank 0's time inside MPI calls is: mostly waiting, not moving bytes."""
    if strategy == "master-worker":  # the master trains nothing: it waits while the workers train
        return "rank 0 (master) waiting in collectives, mostly for the workers' training"
    return "rank 0 in collectives (communication, and waiting for slower ranks)"


def _images(image_size, channels) -> str:
    """The run's images: "64x64 grayscale" as ever, "96 wide x 64 high, colour"."""
    from mpitrain.config import image_shape
    from mpitrain.errors import UserError

    kind = "colour" if channels == 3 else "grayscale"
    try:
        h, w = image_shape(image_size)
    except UserError:  # a config without one (a caller's own dict): said as it is
        return f"size {image_size}, {kind}"
    return f"{w}x{h} {kind}" if h == w else f"{w} wide x {h} high, {kind}"


def _single_label_section(metrics: dict, names: list[str]) -> list[str]:
    """report.md: the confusion matrix and how the decision was made, for one label."""
    lines = _md_table(
        ["true \\ predicted"] + names,
        [[n] + [f"{c:,}" for c in row] for n, row in zip(names, metrics["confusion_matrix"])],
    ) + [""]
    if metrics.get("threshold") is not None:
        lines += [
            f"Accuracy in this table is at the decision threshold, {threshold_text(metrics)}; the training "
            "curves and the epoch lines printed during training show accuracy at argmax, so the two "
            "accuracies differ.",
            "",
        ]
    else:
        lines += ["Accuracy here, in the training curves and in the epoch lines is at argmax.", ""]
    if "val_sensitivity" in metrics or metrics.get("threshold_method"):
        lines += [
            f"Threshold method: `{metrics.get('threshold_method')}`"
            + (f", target sensitivity {metrics['target_sensitivity']}" if metrics.get("target_sensitivity") else "")
            + ". `mpitrain evaluate` and `mpitrain predict` use this threshold unless `--threshold` is given.",
            "",
            (
                "The threshold was not tuned on these images (it is the class odds the loss was trained "
                "with), but the validation images come from the training folder, so they resemble the "
                "training images more than new patients' images will; measure on images of other "
                "patients (or another site) with `mpitrain evaluate`."
                if metrics.get("threshold_method") == "prior"
                else "The threshold was chosen on these same validation images, so the metrics above "
                "that depend on it (all but ROC AUC and PR AUC) are optimistic; measure them on "
                "images the run never saw with `mpitrain evaluate`."
            ),
            "",
        ]
    return lines


def _multilabel_section(metrics: dict) -> list[str]:
    """report.md: the per-label table and how the thresholds were made."""
    methods = sorted({m.get("threshold_method") or "0.5" for m in metrics["per_label"].values()})
    return _md_table(LABEL_HEADER, label_table(metrics)) + [
        "",
        f"Sensitivity and specificity are at each label's threshold (`{'/'.join(methods)}`); entries masked "
        "out (`--uncertain ignore`) are in no count and no metric. `mpitrain evaluate` and `mpitrain predict` "
        "use these thresholds.",
        "",
    ]


def write_report(
    out: Path,
    cfg: dict,
    metrics: dict,
    figures: dict[str, str],
    timings: dict,
    data_line: str,
    protocol: str | None = None,
    channels: int | None = None,
) -> Path:
    """``out/report.md``: figures, validation metrics, timings and the config (rank 0).
    ``channels``: those the run decoded (default: the config's --channels)."""
    from mpitrain.atomic import write_atomic

    names = metrics.get("class_names") or metrics["label_names"]
    lines = [
        f"# mpitrain run `{Path(out).name}`",
        "",
        f"Model `{cfg.get('model')}` ({_images(cfg.get('image_size'), channels or cfg.get('channels'))}), "
        f"trained for {cfg.get('epochs')} epochs on {data_line}.",
        "",
    ]
    if protocol:
        lines += [
            f"Validation images: {protocol}. They come from the same source as the training images, "
            "so the numbers below are an upper bound for images of new patients or another site; "
            "`mpitrain evaluate` measures those.",
            "",
        ]
    captions = {
        "training_curves": "Training curves",
        "confusion_matrix": "Confusion matrix (validation)",
        "roc_curve": "ROC curve (validation) with the decision threshold",
    }
    lines += ["## Validation metrics", ""]
    lines += _md_table(["metric", "value"], [list(r) for r in metric_rows(metrics)]) + [""]
    if metrics.get("multi_label"):
        captions["roc_curve"] = "ROC curves per label (validation), each with its threshold"
        lines += _multilabel_section(metrics)
    else:
        lines += _single_label_section(metrics, names)
    lines += ["## Figures", ""]
    for kind, name in figures.items():
        lines += [f"### {captions.get(kind, kind)}", "", f"![{captions.get(kind, kind)}]({name})", ""]
        if kind == "training_curves":
            lines += [
                "Training numbers are running means over each epoch, taken while the weights change; "
                "validation numbers are measured with the weights at the end of the epoch. So early on "
                "validation can be far ahead of training. Accuracy in the curves is at argmax.",
                "",
            ]
    lines += ["## Timings", ""]
    lines += _md_table(
        ["what", "value"],
        [
            ["ranks", str(timings.get("ranks"))],
            ["strategy", str(cfg.get("strategy"))],
            ["threads per rank", str(timings.get("threads_per_rank"))],
            ["training wall time", _duration(timings.get("seconds", 0.0))],
            ["training images per second (all ranks)", f"{timings.get('images_per_second', 0.0):,.1f}"],
            [_comm_label(cfg.get("strategy")), _duration(timings.get("comm_seconds", 0.0))],
            ["images", f"{timings.get('train_samples', 0):,} train / {timings.get('val_samples', 0):,} validation"],
            [
                "epochs trained / kept",
                f"{timings.get('epochs_run', '?')} / {timings.get('kept_epoch', '?')} "
                f"({timings.get('kept_by', 'last epoch')})",
            ],
        ],
    ) + [""]
    events_file = Path(out) / runfiles.EVENTS
    if events_file.is_file():  # --elastic: ranks or hosts lost during training
        import json

        events = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
        lines += ["## Lost ranks and hosts", ""]
        lines += _md_table(
            ["time", "lost", "ranks before -> after", "went on from"], [[e["time"], *_loss(e)] for e in events]
        ) + [""]
    lines += ["## Configuration", ""]
    lines += _md_table(
        ["option", "value"], [[k, "" if v is None else f"`{v}`"] for k, v in cfg.items() if k != "extra" or v]
    ) + [""]
    path = Path(out) / runfiles.REPORT
    write_atomic(path, "\n".join(lines))
    return path
