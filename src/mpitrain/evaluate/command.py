"""`mpitrain evaluate`: a trained model's metrics on a labelled image folder, on 1..N ranks.

Every rank does the same cheap set-up (model metadata, folder scan), then predicts its own
share of the images. Images are split into fixed chunks of `modelio.BATCH` files in scan
order, and whole chunks are dealt out to the ranks (`shards.shard`), so each image is
predicted in the very same batch whatever the number of ranks. The probabilities and
their file indices are gathered on rank 0, put back into file order, and every metric is
computed there from them: the result is bit-identical to a one-rank evaluation. Only
rank 0 prints and writes files.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from mpitrain.errors import UserError
from mpitrain.evaluate.modelio import BATCH, ModelInfo


@dataclass(frozen=True)
class Views:
    """How images are shown to the model and read out: ``--tta``, ``--tta-augment``,
    ``--tta-seed``, ``--shift`` (`tta.py`), ``--adjust-prior`` (`prior.py`) and
    ``--merge-classes`` (`merged.py`)."""

    tta: int = 1
    tta_augment: str | None = None  # None: the model's training policy (`tta.default_policy`)
    tta_seed: int = 0
    shift: str | None = None
    adjust_prior: bool = False
    merge_classes: tuple[str, ...] = ()

    def check(self) -> None:
        from mpitrain.config import AUGMENTS

        if self.tta < 1:
            raise UserError(f"--tta must be 1 (off) or more views, got {self.tta}")
        for flag, policy in (("--tta-augment", self.tta_augment), ("--shift", self.shift)):
            if policy is not None and policy not in AUGMENTS:
                raise UserError(f"{flag} must be one of {', '.join(AUGMENTS)}, got {policy!r}")


@dataclass
class Setup:
    info: ModelInfo
    data_dir: str
    paths: list[str]
    labels: np.ndarray  # model class index per file; multi-label: [n, L] in the model's label order
    threshold: float | None
    source: str  # "model", "--threshold" or "argmax"
    skipped: list  # label-file rows left out (no such file, empty cells): (path, reason)
    views: Views = Views()  # --tta-augment resolved (`tta.default_policy`)
    merges: list = field(default_factory=list)  # `merged.parse` of --merge-classes
    train_prior: tuple | None = None  # --adjust-prior: `prior.model_prior` (the mix, where it came from)
    thresholds: np.ndarray | None = None  # multi-label: one per label (`per_label.py`)


def _check_outputs(json_path: str | None, plots: str | None) -> None:
    if json_path is not None:
        parent = Path(json_path).resolve().parent
        if Path(json_path).is_dir() or not parent.is_dir():
            raise UserError(f"--json {json_path}: need a file in an existing folder")
    if plots is not None:
        try:
            Path(plots).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--plots {plots}: cannot create the folder: {e.strerror or e}") from None


def prepare(
    model: str | list[str],
    data: str,
    threshold: float | None = None,
    image_size: int | str | None = None,
    json_path: str | None = None,
    plots: str | None = None,
    check_outputs: bool = True,
    labels: str | None = None,
    columns=None,
    views: Views | None = None,
) -> Setup:
    """Everything that can be checked without Keras; raises UserError (all ranks alike).
    ``labels``: a label file instead of the class folders of ``data`` (`data/labels.py`)."""
    from mpitrain.data.labels import Columns, index_of
    from mpitrain.evaluate import ensemble, merged, modelio, per_label, tta

    views = views or Views()
    views.check()
    info = ensemble.read_info(model, need_threshold=threshold is None)
    if per_label.is_multi_label(info):
        return _prepare_per_label(
            info, image_size, threshold, labels, columns or Columns(), views, check_outputs, json_path, plots
        )
    views = replace(views, tta_augment=views.tta_augment or tta.default_policy(info))
    merges = merged.parse(list(views.merge_classes), info.classes)
    train_prior = None
    if views.adjust_prior:  # its error, if any, before any image is read
        from mpitrain.evaluate.prior import model_prior

        train_prior = model_prior(info)
    modelio.check_image_size(info, image_size)
    t, source = modelio.resolve_threshold(info, threshold)
    index = index_of(data, labels, columns or Columns())
    where = f"labels file {index.source}" if labels is not None else f"data folder {index.root}"
    mapped = modelio.label_map(info, index.classes, where)[index.labels]
    if check_outputs:  # rank 0 writes, so rank 0 checks (the paths may not exist elsewhere)
        _check_outputs(json_path, plots)
    if views.adjust_prior and threshold is None:
        t, source = None, "argmax"  # the adjusted probabilities decide for the estimated mix
    return Setup(
        info, index.where, list(index.paths), mapped, t, source, list(index.skipped), views, merges, train_prior
    )


def _prepare_per_label(info, image_size, threshold, labels, columns, views, check_outputs, json_path, plots) -> Setup:
    """`prepare` for a multi-label model: a table's labels in its order, a threshold per label."""
    from mpitrain.evaluate import modelio, per_label, tta

    views = replace(views, tta_augment=views.tta_augment or tta.default_policy(info))
    modelio.check_image_size(info, image_size)
    ts, source = per_label.thresholds(info, threshold)
    index, mapped = per_label.read(info, labels, columns, views)
    if check_outputs:
        _check_outputs(json_path, plots)
    return Setup(info, index.where, list(index.paths), mapped, None, source, list(index.skipped), views, thresholds=ts)


def my_indices(n: int, rank: int, size: int) -> np.ndarray:
    """File indices this rank predicts: whole chunks of BATCH files, dealt by `shards.shard`."""
    from mpitrain.shards import shard

    chunks = shard(np.arange(math.ceil(n / BATCH)), rank, size, seed=0)  # sorted chunk ids
    parts = [np.arange(c * BATCH, min(n, (c + 1) * BATCH)) for c in chunks]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def evaluate_main(
    model: str | list[str],
    data: str,
    json_path: str | None = None,
    threshold: float | None = None,
    plots: str | None = None,
    image_size: int | str | None = None,
    cache_dir: str | None = None,
    threads: int | None = None,
    precision: str = "fp32",
    echo=print,
    labels: str | None = None,
    columns=None,
    views: Views | None = None,
) -> int:
    from mpitrain.data.cache import load_images_cached
    from mpitrain.errors import agree
    from mpitrain.parallel.comm import launched_by_mpi, world
    from mpitrain.runtime import started_at

    started = started_at(launched_by_mpi())  # the command's start (the launcher's, under `-n N`)
    comm = world()
    setup, err = None, None
    try:
        setup = prepare(
            model,
            data,
            threshold,
            image_size,
            json_path,
            plots,
            check_outputs=comm.rank == 0,
            labels=labels,
            columns=columns,
            views=views,
        )
    except UserError as e:
        err = str(e)
    agree(comm, err)  # collective: a set-up error stops every rank, rank 0 says it once
    assert setup is not None  # (agree raised otherwise)

    from mpitrain.runtime import configure_rank, resolve_precision

    # Collective: rank 0 resolves "auto" for all, so every rank predicts alike.
    precision = comm.bcast_obj(resolve_precision(precision)[0] if comm.rank == 0 else None)
    configure_rank(comm, 0, threads, precision)
    err = None
    try:
        from mpitrain.evaluate import ensemble

        net = ensemble.load(setup.info, precision)
    except UserError as e:
        err = str(e)
    agree(comm, err)  # collective: the same file fails on every rank

    info, n = setup.info, len(setup.paths)
    t0 = time.perf_counter()  # timing: decode + predict + gather, not start-up
    idx = my_indices(n, comm.rank, comm.size)
    k = len(info.classes)
    if len(idx):
        x, ok, errors, _ = load_images_cached(
            [setup.paths[i] for i in idx],
            info.image_size,
            Path(cache_dir) if cache_dir else None,
            whole=setup.paths,
            channels=info.channels,
        )  # `mpitrain data` caches the whole folder
        # idx is whole chunks in order (only the last chunk of all may be short), so the
        # BATCH-row slices of predict_probs are exactly the global chunks.
        from mpitrain.evaluate import tta

        v = setup.views
        probs = tta.predict(net, x, [setup.paths[i] for i in idx], k, v.tta, str(v.tta_augment), v.tta_seed, v.shift)
    else:
        ok, errors, probs = np.zeros(0, bool), [], np.zeros((0, k), np.float32)

    counts = np.r_[len(idx), ok.sum(), _class_counts(setup, setup.labels[idx][ok], k)].astype(np.float64)
    comm.allreduce_sum_(counts)  # collective: exact file / readable / per-class counts
    all_idx = comm.gather_rows(idx)  # collective: file indices, rank order
    all_probs = comm.gather_rows(probs.astype(np.float32))  # collective: probabilities, same order
    all_ok = comm.gather_rows(ok.astype(np.uint8))  # collective
    all_errors = [e for part in comm.allgather_obj(errors) for e in part]  # collective, small
    where = {p: i for i, p in enumerate(setup.paths)}
    all_errors.sort(key=lambda e: where.get(e[0], -1))  # file order, whatever the ranks
    all_errors = setup.skipped + all_errors  # label-file rows without an image first
    if counts[1] == 0:
        agree(comm, f"no readable images in {setup.data_dir}")  # collective: all ranks know counts
    if all_idx is None or all_probs is None or all_ok is None:
        return 0  # not the root: rank 0 reports

    order = np.argsort(all_idx, kind="stable")
    if not np.array_equal(all_idx[order], np.arange(n)) or int(counts[0]) != n:
        raise RuntimeError("evaluation shards do not cover every file exactly once")
    probs, ok = all_probs[order], all_ok[order].astype(bool)
    truth = setup.labels[ok]
    probs, adjustment = _adjusted(setup, probs[ok])
    result = _metrics(setup, truth, probs, counts)
    result.update(_view_facts(setup), prior_adjustment=adjustment)
    if setup.merges:
        from mpitrain.evaluate.merged import merge_metrics

        result["merged_classes"] = merge_metrics(probs, truth, list(info.classes), setup.merges)
    result.update(
        model=info.label,
        members=[str(m.path) for m in info.members],
        data=setup.data_dir,
        skipped_files=[list(e) for e in all_errors],
        ranks=comm.size,
        compute_precision=precision,
        seconds=round(time.perf_counter() - t0, 3),
        total_seconds=round(time.time() - started, 3),
    )
    result["validation_protocol"] = [m.extra.get("validation") for m in (info.members or [info])]
    _report(setup, result, comm.size, echo)
    if all_errors:
        print(
            f"warning: skipped {len(all_errors)} unreadable file(s): "
            + "; ".join(f"{p}: {r}" for p, r in all_errors[:3])
            + (" ..." if len(all_errors) > 3 else ""),
            file=sys.stderr,
        )
    if json_path is not None:
        from mpitrain.atomic import write_json

        write_json(Path(json_path), result)
        echo(f"wrote {json_path}")
    if plots is not None:
        from mpitrain.evaluate import plots as figures

        made = figures.write_all(Path(plots), truth, probs, result, title=Path(setup.data_dir).name)
        echo(f"wrote {', '.join(made.values())} to {plots}")
    return 0


def _adjusted(setup: Setup, probs: np.ndarray) -> tuple[np.ndarray, dict | None]:
    """(the probabilities to score, the JSON's record of --adjust-prior or None)."""
    if setup.train_prior is None or not len(probs):
        return probs, None
    from mpitrain.evaluate.prior import adjust

    (train_prior, where), classes = setup.train_prior, list(setup.info.classes)
    got = adjust(probs, train_prior)
    return got.probs, {
        "trained_for": dict(zip(classes, map(float, train_prior))),
        "trained_for_from": where,
        "estimated": dict(zip(classes, map(float, got.prior))),
        "iterations": got.iterations,
        "converged": got.converged,
    }


def _view_facts(setup: Setup) -> dict:
    """The JSON's record of --tta and --shift (null when not used)."""
    v = setup.views
    return {
        "tta": {"views": v.tta, "augment": v.tta_augment, "seed": v.tta_seed} if v.tta > 1 else None,
        "shift": {"augment": v.shift, "seed": v.tta_seed} if v.shift else None,
    }


def _class_counts(setup: Setup, labels: np.ndarray, k: int) -> np.ndarray:
    """Images per class, or per label's positives (multi-label): reduced over the ranks."""
    if setup.thresholds is not None:
        from mpitrain.data.findings import positives

        return positives(labels)
    return np.bincount(labels, minlength=k)


def _metrics(setup: Setup, labels: np.ndarray, probs: np.ndarray, counts: np.ndarray) -> dict:
    from mpitrain.engine.metrics import classification_metrics

    info = setup.info
    if setup.thresholds is not None:
        from mpitrain.evaluate import per_label

        return per_label.metrics(info, labels, probs, setup.thresholds, setup.source, counts)
    pos = info.positive if info.positive is not None else 1
    m = classification_metrics(labels, probs, info.classes, threshold=setup.threshold, positive=pos)
    # The reduced per-class counts must equal the gathered labels: a broken shard is a bug.
    if [m["per_class_counts"][c] for c in info.classes] != counts[2:].astype(int).tolist():
        raise RuntimeError("per-class counts differ between the reduction and the gathered labels")
    m["threshold_source"] = setup.source
    m["threshold_method"] = info.threshold_method if setup.source == "model" else setup.source
    m["target_sensitivity"] = info.extra.get("target_sensitivity") if setup.source == "model" else None
    return m


def _report(setup: Setup, result: dict, ranks: int, echo) -> None:
    from mpitrain.evaluate.report import text_table

    info = setup.info
    if setup.thresholds is not None:
        from mpitrain.evaluate.per_label import data_text

        per_class = data_text(result)
    else:
        per_class = ", ".join(
            f"{c} {v:,}" for c, v in result["per_class_counts"].items() if c not in result["absent_classes"]
        )  # those are named in the table
    echo(
        f"model: {info.label} | {'labels' if setup.thresholds is not None else 'classes'}: {', '.join(info.classes)}"
        f"{' (multi-label)' if setup.thresholds is not None else ''} | {info.size_text}"
        + ("" if len(set(info.shape)) == 1 else " (width x height)")
        + ("" if info.channels == 1 else f" | {info.channels} channels (RGB)")
    )
    echo(
        f"data: {setup.data_dir} | {result['n_samples']:,} images ({per_class}) | "
        f"{ranks} rank{'s' * (ranks > 1)} | {result['compute_precision']}"
    )
    start_up = "starting the ranks" if ranks > 1 else "Python start-up"
    echo(
        f"time: {result['total_seconds']:.1f}s since the command started ({start_up}, TensorFlow and model "
        f"loading included), of which {result['seconds']:.1f}s decoding, predicting and gathering "
        f"({result['n_samples'] / max(result['seconds'], 1e-9):,.0f} images/s)"
    )
    source = {"model": info.threshold_method, "--threshold": "--threshold"}.get(setup.source)
    echo(text_table(result, source))
    for line in _view_lines(result):
        echo(line)
    if result.get("merged_classes"):
        from mpitrain.evaluate.merged import text_lines

        for line in text_lines(result["merged_classes"]):
            echo(line)
    for line in context_lines(info, result):
        echo(line)


def _view_lines(result: dict) -> list[str]:
    """What --tta, --shift and --adjust-prior did, under the table."""
    lines = []
    if result.get("shift"):
        s = result["shift"]
        lines.append(f"shift: every image through one seeded draw of --augment {s['augment']} (seed {s['seed']})")
    if result.get("tta"):
        t = result["tta"]
        lines.append(
            f"test-time augmentation: mean of {t['views']} views (the image and {t['views'] - 1} draws of "
            f"{t['augment']}, seed {t['seed']})"
        )
    a = result.get("prior_adjustment")
    if a:
        mix = lambda d: ", ".join(f"{c} {v:.1%}" for c, v in d.items())  # noqa: E731
        lines.append(
            f"prior adjustment (Saerens EM, {a['iterations']} iterations"
            + ("" if a["converged"] else ", not converged")
            + f"): trained for {mix(a['trained_for'])} ({a['trained_for_from']}); these images estimated at "
            f"{mix(a['estimated'])}; decisions by argmax of the adjusted probabilities"
        )
    return lines


def context_lines(info, result: dict) -> list[str]:
    """How the model was validated, and whether these images' class mix is the training's."""
    from mpitrain.evaluate.report import mix_warning

    members = info.members or [info]
    lines = []
    protocols = sorted({m.extra.get("validation") or "not recorded (an older run)" for m in members})
    lines.append("validated during training on: " + "; ".join(protocols))
    train = members[0].extra.get("train_class_counts")
    warning = mix_warning(train, result["per_class_counts"]) if "per_class_counts" in result else None
    if warning:
        lines.append(warning)
    return lines
