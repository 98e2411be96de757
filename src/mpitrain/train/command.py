"""`mpitrain train` on each rank: set up, agree, load, fit, save.

Failure handling follows two rules:

* Set-up mistakes (bad option, missing folder, occupied run folder) are found by every rank
  or by rank 0 alone. The ranks exchange their error (one small allgather), so all of them
  stop together with exit code 2 and rank 0 prints the message once.
* Anything that goes wrong after that is unexpected; the cli layer prints it with the rank
  and aborts the whole MPI job, so no rank is left waiting in a collective.

`mpitrain.fit(model, "data/", ...)` runs this same pipeline with the caller's model
(`train_given`, with a `train/given.py` Given): one training loop for both.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import TYPE_CHECKING

import numpy as np

from mpitrain.config import TrainConfig, save_config
from mpitrain.errors import StopRequested, UserError, agree
from mpitrain.parallel.comm import launched_by_mpi, world
from mpitrain.runtime import started_at
from mpitrain.targets import is_multi_label

if TYPE_CHECKING:
    from mpitrain.engine.loop import Result
    from mpitrain.parallel.comm import Comm
    from mpitrain.train.given import Given
from mpitrain.parallel.strategies import resolve, strategy_class


def _open_resume(cfg: TrainConfig, library: bool = False):
    """Rank 0: the newest good checkpoint of --out and the config it was trained with
    (`library`: mpitrain.fit resumes it, with the caller's model)."""

    from mpitrain import runfiles
    from mpitrain.engine import checkpoint
    from mpitrain.train import runfolder
    from mpitrain.train.given import refuse_cli_resume

    out = runfolder.resume_folder(cfg.out)  # locked from here on: no other job writes it while we read
    try:
        ckpt = checkpoint.load_latest(out, warn=lambda m: print(m, file=sys.stderr))
    except ValueError as e:
        raise UserError(f"cannot resume {cfg.out}: newest checkpoint {e}") from None
    if ckpt is None:
        raise UserError(f"no usable checkpoint in {out / runfiles.CHECKPOINTS}; nothing to resume")
    # An older mpitrain marked the last checkpoint finished before saving the model: without
    # model.keras such a run is resumed (validated and saved) like a "trained" one.
    if ckpt.status == "finished" and (out / runfiles.MODEL).exists():
        raise UserError(f"the run in {cfg.out} has already finished; nothing to resume")
    # Runs from before --precision existed trained in fp32; "auto" would re-resolve here.
    saved = TrainConfig.from_dict({"precision": "fp32", **ckpt.config, "out": cfg.out, "overwrite": False})
    if not library:
        refuse_cli_resume(saved, cfg.out)
    return ckpt, saved


def channels_for(cfg: TrainConfig) -> int:
    """--channels, or when not given what the model needs (3 for a model that only takes
    colour): `models.needs_channels(spec)` where the model registry has it, else 1."""
    if cfg.channels is not None:
        return cfg.channels
    from mpitrain.train import models

    needs = getattr(models, "needs_channels", None)  # the model registry's rule (3 for pretrained colour models)
    got = None if needs is None else needs(cfg.model, cfg.weights)
    return got if got in (1, 3) else 1


def images_line(image_size: int | str, channels: int, colour: tuple[int, int] = (0, 0)) -> str:
    """The data line's words on how images are decoded: the shape and "colour" or "grey"
    said for colour or WxH runs. `colour`: (colour files, files sniffed) of a grey run
    (`decode.sniff_colour`); the conversion to luma is said only when colour was found."""
    from mpitrain.config import image_shape

    h, w = image_shape(image_size)
    lost = (
        f" ({colour[0]} of {colour[1]} sampled images are colour, converted to luma: --channels 3 keeps colour)"
        if colour[0]
        else ""
    )
    if channels == 1 and h == w:
        return "1 channel" + lost
    if channels == 1:
        return f"grey {w}x{h} (width x height), 1 channel" + lost
    shape = f"{w}x{h}" + ("" if h == w else " (width x height)")
    return f"colour {shape}, 3 channels (RGB), grey images replicated"


def _sniff(plan, channels: int, given: Given | None) -> tuple[int, int]:
    """Rank 0, grey runs on files: (colour files, files looked at) of the training images
    (`decode.sniff_colour`, a few dozen small decodes; arrays have no files)."""
    if channels != 1 or (given is not None and given.arrays is not None) or not plan.train_paths:
        return 0, 0
    from mpitrain.data.decode import sniff_colour

    return sniff_colour(plan.train_paths, plan.train_labels)


def _fingerprint(cfg: TrainConfig, plan, given: Given | None = None) -> str:
    """What every rank must agree on before the first collective: config, code, data (and a
    library caller's model and arrays)."""
    import hashlib
    import json

    from mpitrain import __version__

    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    h.update(__version__.encode())
    if given is not None:
        h.update(given.fingerprint().encode())
    if plan is not None and not cfg.data_on_root:
        h.update("\n".join(plan.train_paths + ["--val--"] + plan.val_paths).encode())
    return h.hexdigest()[:16]


def train_main(make_config, echo=print, resume: bool = False) -> int:
    """`make_config()` builds (and validates) the TrainConfig inside the agreed set-up.

    Rank 0 locks the run folder (`runfolder.prepare`) and lets go when this returns or
    raises, Ctrl-C included; a folder it created is removed again if nothing was written."""
    return _guarded(make_config, echo, resume, None)[0]


def train_given(make_config, given: Given, echo=print, resume: bool = False) -> Result:
    """`train_main` with the caller's model (`mpitrain.fit`): returns the engine's result.
    Without `cfg.out` nothing is written. Ctrl-C and a stop request are said as
    `mpitrain train` says them, then raised (KeyboardInterrupt, StopRequested)."""
    result = _guarded(make_config, echo, resume, given)[1]
    assert result is not None
    return result


def _guarded(make_config, echo, resume: bool, given: Given | None) -> tuple[int, Result | None]:
    from mpitrain.parallel import preempt
    from mpitrain.parallel.comm import launched_by_mpi
    from mpitrain.train import runlock

    # SIGTERM/SIGUSR1 from now on: checkpoint with every rank, then stop. A rank keeps the
    # handlers until its process ends: a request arriving while a finished run exits is
    # moot and must not kill it in MPI_Finalize (a failed job for a complete run folder).
    # An in-process caller (a library, the tests) gets its own handlers back.
    restore = preempt.install()
    try:
        return _train_main(make_config, echo, resume, given)
    finally:
        runlock.release_all()
        if not launched_by_mpi():
            restore()


def _train_main(make_config, echo, resume: bool, given: Given | None) -> tuple[int, Result | None]:
    from mpitrain.data import dataset
    from mpitrain.parallel import preempt
    from mpitrain.train import pretext, runfolder

    comm = world()
    say = echo if comm.rank == 0 else (lambda *a, **k: None)
    plan = out = ckpt = weights_file = None
    err = None
    try:
        cfg: TrainConfig = resolve(make_config())
        if resume and comm.rank == 0:
            ckpt, cfg = _open_resume(cfg, library=given is not None)
        _check_model(cfg, given)  # on every rank: one agreed error, not one per rank
    except UserError as e:
        err = str(e)
    agree(comm, err)
    if resume:  # collective: every rank trains with the saved config
        cfg = TrainConfig.from_dict(comm.bcast_obj(cfg.to_dict() if comm.rank == 0 else None))
    # Collective: rank 0 resolves --precision auto for all, so that ranks on different
    # hardware still compute alike. The config keeps the resolved value (a resumed run
    # keeps its precision); config.json's runtime facts also say what was asked and why.
    requested = cfg.precision
    precision, why = comm.bcast_obj(_resolve_precision(cfg.precision) if comm.rank == 0 else None)
    cfg = dataclasses.replace(cfg, precision=precision)
    if resume:
        why = "the precision the resumed run was trained with"
    err = None
    writes = given is None or cfg.out is not None  # a library call without out= writes nothing
    try:
        strategy_class(cfg.strategy).check_ranks(comm.size)
        if comm.rank == 0 or not cfg.data_on_root:
            plan = dataset.plan_for(cfg) if given is None else given.plan(cfg)
            if cfg.pretext != "none":
                plan = pretext.planned(plan)
            if given is not None:
                given.check_classes(plan.classes)
        if comm.rank == 0:
            if plan is not None and (given is None or given.arrays is None):  # files: not training's?
                overlap = dataset.check_validation(plan)
                if overlap:
                    print(overlap, file=sys.stderr)
            if given is None:
                weights_file = _check_model_for(cfg, plan, say)
            if writes:
                out = runfolder.prepare(cfg.out, cfg.overwrite or resume, resume)
    except UserError as e:
        err = str(e)
    agree(comm, err)
    if cfg.weights == "imagenet":
        _share_weights(comm, comm.bcast_obj(weights_file if comm.rank == 0 else None))  # collective
    # Collective: a rank started with other options, another mpitrain or other files would
    # silently train something else (or deadlock on different step counts): refuse it.
    prints = comm.allgather_obj(_fingerprint(cfg, plan, given))
    differ = [r for r, f in enumerate(prints) if f != prints[0]]
    if differ:
        agree(
            comm,
            f"rank(s) {differ} were started with a different config, mpitrain version or data file list than rank 0",
        )

    try:
        try:
            return 0, _train(cfg, comm, plan, out, ckpt, resume, say, requested=requested, why=why, given=given)
        except Exception as e:
            if preempt.interrupted():  # Ctrl-C inside TensorFlow's C++, which raised something else
                raise KeyboardInterrupt from e
            raise
    except KeyboardInterrupt:
        from mpitrain.engine.callbacks import progress

        progress.clear_active()
        if comm.rank == 0:
            where = progress.last_position() or "set-up, before the first training step"
            hint = _resume_hint(comm, out, cfg, given) if writes else None
            print(interrupted_message(where, out, hint), file=sys.stderr, flush=True)
        if given is not None:
            raise
        return 130, None
    except StopRequested as stop:
        from mpitrain.engine.callbacks import progress

        progress.clear_active()
        if comm.rank == 0:
            hint = _resume_hint(comm, out, cfg, given)
            print(stopped_message(stop, cfg.epochs, out, hint), file=sys.stderr, flush=True)
        if given is not None:
            raise
        return 0, None  # asked for: a batch system's stop or preemption, not a failure


def _check_model(cfg: TrainConfig, given: Given | None) -> None:
    """--model names a model that takes --image-size (and --weights, --freeze-backbone go
    with it), or the caller's model takes the run's images."""
    if given is not None:
        given.check_images(cfg, channels_for(cfg))
        return
    from mpitrain.train.models import check_freeze, check_model, check_weights

    check_model(cfg.model, cfg.image_size)
    check_weights(cfg.model, cfg.weights)
    check_freeze(cfg.model, cfg.weights, cfg.init, cfg.freeze_backbone)


def _check_model_for(cfg: TrainConfig, plan, say) -> str | None:
    """Rank 0, once the classes are known and before any image is decoded: the model must
    fit the images and the classes (a MODULE:FUNCTION or saved model is built for that),
    and --weights imagenet's file must be on disk (downloaded here if it is not: by this one
    process). Returns that file's name (None without --weights)."""
    from mpitrain.train.models import check_built, fetch_weights

    check_built(cfg.model, cfg.image_size, len(plan.classes), channels_for(cfg), cfg.freeze_backbone)
    if cfg.weights != "imagenet":
        return None
    name, lines = fetch_weights(cfg.model, cfg.image_size)
    for line in lines:
        say(line)
    return name


def _share_weights(comm: Comm, name: str) -> None:
    """Collective: every rank has rank 0's weights file (a rank that does not see it gets its bytes)."""
    from mpitrain.train import pretrained

    err = None
    try:
        pretrained.share(comm, name)
    except UserError as e:
        err = str(e)
    agree(comm, err)


def _resume_hint(comm: Comm, out, cfg, given: Given | None = None) -> str:
    """The command that continues this run: the launcher's (it knows its --hostfile), srun's
    when srun started the ranks, else one for this many processes (a library call: its script)."""
    import os

    from mpitrain import slurm
    from mpitrain.parallel.wire import RESUME_HINT_ENV

    if given is not None:
        return given.resume_hint(out)
    if os.environ.get(RESUME_HINT_ENV):
        return os.environ[RESUME_HINT_ENV]
    if comm.size > 1 and slurm.step_tasks() == comm.size and "OMPI_COMM_WORLD_SIZE" not in os.environ:
        return f"srun --mpi=pmix {resume_command(None, out, elastic=cfg.elastic)}"
    return resume_command(comm.size if comm.size > 1 else None, out, elastic=cfg.elastic)


def resume_command(
    n: int | None,
    out,
    hostfile: str | None = None,
    elastic: bool = False,
    iface: str | None = None,
    fixed_order: bool = False,
) -> str:
    """The command that continues the run in `out` (`n` None: one process)."""
    import shlex

    words = ["mpitrain", "train"]
    if n is not None:
        words += ["-n", str(n)]
    if hostfile is not None:
        words += ["--hostfile", shlex.quote(str(hostfile))]
    if iface is not None:
        words += ["--iface", shlex.quote(iface)]
    if fixed_order:
        words.append("--fixed-order")
    words += ["--resume", "--out", shlex.quote(str(out))]
    if elastic:
        words.append("--elastic")
    return " ".join(words)


def stopped_message(stop: StopRequested, epochs: int, run_dir, resume_cmd: str) -> str:
    """What rank 0 says after every rank agreed to stop on a signal and checkpointed."""
    from pathlib import Path

    from mpitrain.engine import checkpoint

    at = checkpoint.describe_position(stop.epoch, stop.step)
    lines = [
        f"mpitrain: stopped on request (SIGTERM or SIGUSR1 to a rank): every rank saved its state "
        f"at {at} (of {epochs} epochs)"
    ]
    found = checkpoint.latest_meta(Path(run_dir))
    if found is not None:
        lines.append(f"newest checkpoint: {found[0]}")
    lines.append(f"continue with: {resume_cmd}")
    return "\n".join(lines)


def interrupted_message(where: str | None, run_dir, resume_cmd: str | None) -> str:
    """What to tell after Ctrl-C: where training stopped, the newest checkpoint on disk
    (found by reading the run folder, so the launcher can tell it too), how to go on."""
    from pathlib import Path

    from mpitrain.engine import checkpoint

    found = checkpoint.latest_meta(Path(run_dir)) if run_dir is not None else None
    if found is not None:
        where = _not_behind(where, found[1])
    lines = ["mpitrain: interrupted" + (f" in {where}" if where else "")]
    if found is None:
        lines.append("newest checkpoint: none yet, so there is nothing to resume; start the run again")
    else:
        path, meta = found
        lines.append(
            f"newest checkpoint: {path} ({checkpoint.describe_position(meta.get('epoch', 0), meta.get('step', 0))})"
        )
        if meta.get("status") == "finished":
            lines.append("training had finished; the run folder may be incomplete")
        elif resume_cmd:
            lines.append(f"continue with: {resume_cmd}")
    return "\n".join(lines)


def _not_behind(where: str | None, meta: dict) -> str | None:
    """`where` ("epoch E/N, step S/T"), moved up to the checkpoint `meta` if that is later:
    the launcher's last progress line can lag behind rank 0, the checkpoint cannot."""
    import re

    m = re.fullmatch(r"epoch (\d+)/(\d+), step (\d+)/(\d+)", where or "")
    if not m:
        return where
    epoch, epochs, step, steps = map(int, m.groups())
    saved = (meta.get("epoch", 0) + 1, meta.get("step", 0)) if meta.get("step") else (meta.get("epoch", 0), steps)
    if saved > (epoch, step) and saved[0] <= epochs and saved[1] <= steps:
        return f"epoch {saved[0]}/{epochs}, step {saved[1]}/{steps}"
    return where


def _train(cfg, comm: Comm, plan, out, ckpt, resume, say, *, requested: str, why: str, given=None) -> Result:
    """The run after the agreed set-up; `requested` and `why`: the --precision asked for and
    why `cfg.precision` is the one used (config.json's runtime facts). `given`: the caller's
    model and what came with it (`mpitrain.fit`); then without `cfg.out` nothing is written."""
    from mpitrain.config import image_size_text
    from mpitrain.data import dataset
    from mpitrain.runtime import configure_rank
    from mpitrain.train import pretext
    from mpitrain.train.fitting import fit
    from mpitrain.train.models import build_model, may_overlap

    overlap = may_overlap(cfg.overlap, cfg.model, cfg.strategy, comm.size)
    threads = configure_rank(comm, cfg.seed, cfg.threads, cfg.precision, overlap)  # collective
    channels = channels_for(cfg)
    # Which shards this rank owns (the trainer builds the strategy itself).
    data_parts = strategy_class(cfg.strategy).data_parts
    if comm.rank == 0:
        colour = _sniff(plan, channels, given)
        for text in data_lines(cfg, plan, channels, colour):
            say(text)
    roles = strategy_class(cfg.strategy).describe_roles(comm.size)
    say(
        f"strategy: {cfg.strategy} | {roles} | {threads} thread(s) per rank | "
        f"batch {_batch_text(cfg)} per rank | model {cfg.model} {image_size_text(cfg.image_size)}x{channels} | "
        f"{cfg.precision}" + (f" ({why})" if requested == "auto" else "")
    )
    writes = given is None or cfg.out is not None
    stores = None
    if _store_mode(cfg, comm, plan, channels, given) == "disk":  # collective
        from mpitrain.data.store import open_stores

        stores = open_stores(comm, plan, cfg.image_size, channels, cfg.cache_dir)  # collective: written once per host
        say(stores.line())

    def load(train_part, val_part):  # this rank's rows (again in a new layout after a lost rank: elastic)
        if given is not None and given.arrays is not None:
            return given.arrays.load(plan, cfg.seed, train_part, val_part)
        if stores is not None:
            return stores.shard(plan, cfg.seed, train_part, val_part)
        shard = dataset.load_shard(plan, cfg.image_size, cfg.seed, train_part, val_part, cfg.cache_dir, channels)
        return pretext.turned(shard) if cfg.pretext != "none" else shard

    if cfg.data_on_root:
        plan, data = dataset.scatter_from_root(
            comm, plan, cfg.image_size, cfg.seed, lambda r: data_parts(r, comm.size), cfg.cache_dir, channels
        )
        if cfg.pretext != "none":
            plan, data = pretext.planned(plan), pretext.turned(data)
    else:
        data = load(*data_parts(comm.rank, comm.size))
    counts = np.array([len(data.train_x), len(data.val_x), data.seconds, data.cache_hits, data.loads], dtype=np.float64)
    comm.allreduce_sum_(counts)  # collective: global usable counts, load time, cache use
    all_errors = [e for part in comm.allgather_obj(data.errors) for e in part]
    if comm.rank == 0:  # label-file rows left out at planning, then the files the ranks could not decode
        all_errors = list(plan.skipped) + all_errors
    if counts[0] == 0 or counts[1] == 0:
        which = "training" if counts[0] == 0 else "validation"
        agree(comm, f"no usable {which} images in {plan.data_dir}")
    if cfg.pretext != "none":
        say(
            f"pretext {cfg.pretext}: every image in {pretext.TURNS} turns ({', '.join(pretext.CLASSES)} degrees), labelled by its turn"
        )
    say(
        f"loaded {int(counts[0])} train + {int(counts[1])} val images in "
        f"{counts[2] / comm.size:.1f}s per rank (cache: {int(counts[3])}/{int(counts[4])} hits)"
    )
    if all_errors and comm.rank == 0:
        from mpitrain.data.describe import skip_warning, write_skip_report

        listed = write_skip_report(all_errors, out) if out is not None else "no run folder: give out= for it"
        print(skip_warning(all_errors, listed), file=sys.stderr)

    if given is None:
        model = build_model(cfg.model, cfg.image_size, len(plan.classes), channels, weights=cfg.weights)
    else:
        model = given.prepared(cfg)
    if is_multi_label(plan.train_labels):
        from mpitrain.train.models import as_multilabel

        model = as_multilabel(model)
    if cfg.init:
        from mpitrain.train.models import init_from

        say(init_from(model, cfg.init))
    if cfg.elastic:
        comm.make_elastic()  # collective: from here on a dead peer raises RankLost

    result = fit(
        cfg,
        comm,
        plan,
        data,
        model,
        echo=say,
        checkpoints=writes,
        run_dir=out,
        resume=ckpt,
        resuming=resume,
        reshard=load,
        given=given,
    )
    if comm.rank == 0 and writes:
        precision_facts = {"requested": requested, "used": cfg.precision, "why": why}
        library = {} if given is None else {"library": given.facts()}
        for line in _save(
            cfg, out, plan, model, result, comm.size, threads, int(counts[0]), int(counts[1]), precision_facts, library
        ):
            say(line)
        from mpitrain.engine import checkpoint

        checkpoint.mark_finished(out)  # only now: a kill before this point can still --resume
        say(f"run folder: {out}")
    say(time_line(time.time() - started_at(launched_by_mpi()), counts[2] / comm.size, result.seconds, comm.size))
    return result


def _batch_text(cfg: TrainConfig) -> str:
    """The start line's batch: B, or with --accumulate K "K x B (K micro-batches per step)"."""
    if cfg.accumulate == 1:
        return str(cfg.batch_size)
    return f"{cfg.accumulate} x {cfg.batch_size} ({cfg.accumulate} micro-batches per step)"


def _store_mode(cfg: TrainConfig, comm: Comm, plan, channels: int, given: Given | None) -> str:
    """Collective: "disk" or "memory" (--store), rank 0's answer for every rank. Arrays a
    library caller passed are in memory already; --data-on-root and pre-training hold their
    rows in memory (TrainConfig refuses them with --store disk)."""
    if cfg.data_on_root or cfg.pretext != "none" or (given is not None and given.arrays is not None):
        return "memory"
    if cfg.store != "auto":
        return cfg.store
    from mpitrain.data.store import disk_wanted
    from mpitrain.runtime import available_memory

    wanted = None
    if comm.rank == 0:  # the rows this host's ranks would hold in memory, against its memory
        here = (len(plan.train_paths) + len(plan.val_paths)) * comm.local_size // comm.size
        wanted = disk_wanted(here, cfg.image_size, channels, available_memory())
    return "disk" if comm.bcast_obj(wanted) else "memory"


def data_lines(cfg: TrainConfig, plan, channels: int, colour: tuple[int, int] = (0, 0)) -> list[str]:
    """The start-up lines on the data: the folder and classes, the images, and the groups the
    split kept whole (on one line, the X-ray recipe's passed 150 columns)."""
    split = "split " + str(cfg.val_split) if plan.val_from == "split" else plan.val_from
    return [
        f"data: {plan.data_dir} | classes: {', '.join(plan.classes)}",
        f"images: {len(plan.train_paths)} train / {len(plan.val_paths)} val ({split}) | "
        + images_line(cfg.image_size, channels, colour),
        *([f"grouped: {plan.grouping}"] if plan.grouping else []),
    ]


def _train_loss_note(cfg: TrainConfig) -> str | None:
    """What makes the training loss of the curves other than val_loss's plain cross-entropy."""
    why = ["class-weighted (--class-weight balanced)"] if cfg.class_weight == "balanced" else []
    if cfg.label_smoothing:
        why.append(f"smoothed labels (--label-smoothing {cfg.label_smoothing:g})")
    if cfg.mixup:
        why.append(f"mixed images and labels (--mixup {cfg.mixup:g})")
    return "train: " + ", ".join(why) if why else None


def time_line(total: float, loading: float, training: float, ranks: int) -> str:
    """The last line of a run: its wall time from the command's start, as `evaluate` says it."""
    start_up = "starting the ranks" if ranks > 1 else "Python start-up"
    return (
        f"time: {total:.1f}s since the command started ({start_up}, TensorFlow and model building "
        f"included), of which {loading:.1f}s loading images and {training:.1f}s training"
    )


def _resolve_precision(requested: str) -> tuple[str, str]:
    from mpitrain.runtime import resolve_precision

    precision, why = resolve_precision(requested)
    if precision == "fp16" and not _has_gpu():
        print(
            "mpitrain: note: --precision fp16 on a CPU is emulated and several times slower than "
            "fp32; bf16 or fp32 suit CPUs",
            file=sys.stderr,
        )
    return precision, why


def _has_gpu() -> bool:
    from mpitrain.runtime import gpu_capabilities

    return bool(gpu_capabilities())


def _decide(cfg, plan, result, lines: list[str]):
    """One label: (metrics, the threshold's Choice, the positive class, model.json's extra keys)."""
    from mpitrain.data.dataset import class_weights
    from mpitrain.engine.metrics import classification_metrics
    from mpitrain.evaluate.prior import loss_prior
    from mpitrain.evaluate.threshold import choose_for_classes, positive_index

    positive = positive_index(plan.classes)
    # The decision threshold is chosen on the validation predictions (gathered on rank 0).
    counts = plan.class_counts()
    weights = class_weights(counts, cfg.class_weight)
    choice = choose_for_classes(
        result.val_labels, result.val_probs, plan.classes, cfg.target_sensitivity, cfg.threshold_policy, counts, weights
    )
    if cfg.target_sensitivity is not None and positive is None:
        lines.append(f"note: --target-sensitivity needs two classes; {len(plan.classes)} classes use argmax")
    metrics = classification_metrics(
        result.val_labels,
        result.val_probs,
        plan.classes,
        threshold=choice.threshold,
        positive=1 if positive is None else positive,
    )
    metrics.update({k: v for k, v in choice.to_dict().items() if k != "threshold"})
    info = {
        "train_class_counts": {c: int(n) for c, n in zip(plan.classes, counts)},
        # The class mix the loss saw (counts x class weights): the prior that
        # `evaluate --adjust-prior` replaces, and the policy `--tta` draws from by default.
        "train_prior": dict(zip(plan.classes, loss_prior(counts, weights))),
    }
    return metrics, choice, positive, info


def _decide_per_label(cfg, plan, result):
    """Several labels: a threshold per label (the same policies, label by label), the
    per-label metrics at them, and model.json's `multi_label`, `thresholds` and counts."""
    from mpitrain.data.dataset import class_weights
    from mpitrain.engine.multilabel import multilabel_metrics
    from mpitrain.evaluate.threshold import Choice, choose_per_label

    counts = plan.class_counts()  # [2, L]: negatives, positives
    weights = class_weights(counts, cfg.class_weight)
    choices = choose_per_label(
        result.val_labels, result.val_probs, cfg.target_sensitivity, cfg.threshold_policy, counts, weights
    )
    metrics = multilabel_metrics(result.val_labels, result.val_probs, plan.classes, [c.threshold for c in choices])
    for m, c in zip(metrics["per_label"].values(), choices):
        m["threshold_method"] = c.method
    thresholds = {name: c.threshold for name, c in zip(plan.classes, choices)}
    info = {
        "multi_label": True,
        "thresholds": thresholds,
        "threshold_policy": cfg.threshold_policy,
        "target_sensitivity": cfg.target_sensitivity,
        "train_label_counts": {c: {"negatives": int(n), "positives": int(p)} for c, n, p in zip(plan.classes, *counts)},
    }
    return metrics, Choice(None, "per-label"), None, info


def _counts_text(plan) -> str:
    """The training images per class, or per label's positives (multi-label)."""
    counts = plan.class_counts()
    if np.ndim(counts) == 2:
        return ", ".join(f"{c} {p:,} positive" for c, p in zip(plan.classes, counts[1]))
    return ", ".join(f"{c} {n:,}" for c, n in zip(plan.classes, counts))


def _save(cfg, out, plan, model, result, ranks, threads, n_train, n_val, precision: dict, facts=None) -> list[str]:
    """Rank 0 only: the run folder. Returns lines to show the user.

    Order matters: the model and its metadata first (the valuable part), then the numbers,
    then the figures and report.md, whose failure is only a warning.
    """
    from mpitrain import runfiles
    from mpitrain.atomic import write_json
    from mpitrain.evaluate import modelio
    from mpitrain.evaluate.threshold import describe, describe_per_label
    from mpitrain.train import runfolder

    lines: list[str] = []
    if is_multi_label(result.val_labels):
        metrics, choice, positive, info = _decide_per_label(cfg, plan, result)
    else:
        metrics, choice, positive, info = _decide(cfg, plan, result, lines)
    metrics["train_samples"], metrics["val_samples"] = n_train, n_val
    # Which weights these numbers (and model.keras) belong to.
    kept = {
        "epochs_run": result.epochs_run,
        "kept_epoch": result.kept_epoch or result.epochs_run,
        "kept_by": cfg.keep_best or "last epoch",
        "stopped_early": result.stopped_early,
    }
    metrics.update(kept)
    runfolder.save_model(out / runfiles.MODEL, model)
    modelio.write_info(
        out,
        plan.classes,
        cfg.image_size,
        choice,
        positive,
        model=cfg.model,
        channels=channels_for(cfg),
        validation=plan.protocol(),
        **info,
        augment=cfg.augment,
    )
    timings = {
        "ranks": ranks,
        "threads_per_rank": threads,
        "seconds": round(result.seconds, 3),
        "images_per_second": round(result.images_per_second, 1),
        "comm_seconds": round(result.comm_seconds, 3),
        "train_samples": n_train,
        "val_samples": n_val,
        **kept,
    }
    save_config(
        cfg,
        out / runfiles.CONFIG,
        ranks=ranks,
        threads_per_rank=threads,
        precision=precision,
        data_dir=plan.data_dir,
        classes=plan.classes,
        checksum=result.checksum,
        seconds=timings["seconds"],
        images_per_second=timings["images_per_second"],
        comm_seconds=timings["comm_seconds"],
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        grouping=plan.grouping,
        **kept,
        **(facts or {}),
    )
    runfolder.write_history(out / runfiles.HISTORY, result.history)
    idx = result.val_index
    if idx is not None and len(idx) and (idx >= 0).all():  # plan order; an ensemble's threshold reads it
        from mpitrain.evaluate import valpreds

        order = np.argsort(idx, kind="stable")
        valpreds.write(
            out,
            [plan.val_paths[i] for i in idx[order]],
            result.val_labels[order],
            result.val_probs[order],
            plan.classes,
        )
    write_json(out / runfiles.METRICS, metrics)
    write_json(out / runfiles.CLASSES, plan.classes)
    if "thresholds" in info:
        lines.append(describe_per_label(info["thresholds"]))
    else:
        lines.append(describe(choice, None if positive is None else plan.classes[positive]))
    if choice.threshold is not None:
        lines.append("metrics.json and report.md use this threshold; acc and val_acc in the epoch lines are at argmax")
    try:
        from mpitrain.evaluate import plots, report

        figures = plots.write_all(
            out, result.val_labels, result.val_probs, metrics, result.history, loss_note=_train_loss_note(cfg)
        )
        counts = _counts_text(plan)
        report.write_report(
            out,
            cfg.to_dict(),
            metrics,
            figures,
            timings,
            f"`{plan.data_dir}` ({counts} training images)",
            plan.protocol(),
            channels=channels_for(cfg),
        )
        lines.append(f"report: {out / runfiles.REPORT} ({', '.join(figures.values())})")
    except Exception as e:  # noqa: BLE001 - the trained model is saved; a figure must not lose it
        print(f"warning: could not write the figures or report.md: {type(e).__name__}: {e}", file=sys.stderr)
    if cfg.tensorboard:
        from mpitrain.engine.callbacks import tensorboard as tb

        lines.append(f"tensorboard: {tb.write_history(out / runfiles.TENSORBOARD, result.history)}")
    return lines
