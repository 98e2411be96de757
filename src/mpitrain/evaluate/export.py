"""`mpitrain export RUN --format savedmodel|tflite`: a trained model for use without mpitrain.

What is written into ``--out`` (default ``RUN/export-<format>``):

* ``savedmodel``: a TensorFlow SavedModel (``saved_model.pb``, ``variables/``) whose
  ``serving_default`` signature maps ``pixels`` to ``probabilities``;
  ``tflite``: ``model.tflite`` (float32, no quantisation) with the same signature.
* ``export.json``: classes, positive class, decision threshold and rule (copied from
  ``model.json``), image size, the input contract, and the check below.

**Input contract.** ``pixels`` is uint8 ``[n, H, W, C]`` (H rows of W pixels: the training
image size, S x S for ``--image-size S``, W x H for ``--image-size WxH``; C its channels, 1
or 3 (RGB) as in model.json; n free): pixel values 0-255 of images the caller has already
decoded and resized to W x H. The graph casts to float32 and divides by 255, which is what
training did to its decoded pixels, so the caller never scales. Decoding and resizing stay outside the graph:
training resized each whole image to W x H with OpenCV's ``cv2.INTER_AREA`` (aspect ratio
not kept), and no TensorFlow or TFLite resize op computes the same pixels (nor could a
graph with a fixed input take images of any size in one batch). uint8 rather than float
input makes the contract hard to get wrong: a float array scaled to [0, 1] (or not) is
refused by the interpreter's type check instead of giving quiet nonsense. `INPUT_CONTRACT`
states what the caller must do, in words, in export.json and the README.

**The check.** Before anything is written to ``--out`` the exported file is loaded back and
run on a sample of the run's validation images (`SAMPLE`, seeded, from
``val_predictions.csv``, decoded as training decodes them), and its probabilities are
compared with ``model.keras`` (loaded in safe mode, computing in float32) on the very same
uint8 pixels. The export is written to a hidden folder beside ``--out`` and renamed into
place only when the largest absolute difference of any probability is within `TOLERANCE`;
otherwise it is removed and the command fails in one line. When the validation images
cannot be read (the run folder was moved to another machine) seeded random pixels are
used instead, and the command says so.

`TOLERANCE`, and why: both formats compute in float32 from the same float32 weights, so
what differs is only the order of the sums and the kernels. A SavedModel runs TensorFlow's
own kernels, fused differently by graph optimisation; TFLite runs others (XNNPACK) with
its own summation orders and softmax. Measured on all 522 validation images of a chest
X-ray run (`xray` model, 64 px, trained in bf16): max |difference| 8.0e-7 (SavedModel) and
1.4e-6 (TFLite). The bounds, 1e-5 and 1e-4, leave margins of 12x and 70x for other models
and inputs, and still fail on anything wrong: the same weights computing in bf16 moved a
probability by 1.8e-2 there, an input left unscaled by up to 1.0.

**Stale exports.** ``export.json`` records the path and SHA-256 of the ``model.keras`` it was
made from. ``mpitrain train --out RUN --overwrite`` removes ``RUN/export-*`` with the rest of
the old run, but an export written elsewhere (``--out``) outlives it: `source_model` (used by
``evaluate``/``predict --model EXPORT``) refuses an export whose model.keras has changed since.

Trained models may have computed in bfloat16; ``model.keras`` holds float32 weights and
computes in float32 (`modelio.set_model_precision`), and the export is traced from it, so
it computes in float32 too.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from mpitrain import runfiles
from mpitrain.errors import UserError

FORMAT = 1  # the export.json format this version writes
FORMATS = tuple(runfiles.EXPORTS)
NAME = "export.json"
TFLITE_FILE = "model.tflite"
SIGNATURE, INPUT, OUTPUT = "serving_default", "pixels", "probabilities"
SAMPLE = 64  # validation images (or random ones) the export is checked on
SEED = 0  # which of them: same run, same images
TOLERANCE = {"savedmodel": 1e-5, "tflite": 1e-4}  # max |p_export - p_model.keras|, see above

INPUT_CONTRACT = (
    "uint8 [n, {h}, {w}, 1]: grayscale pixel values 0-255, one channel, of images already "
    "resized to {size}; the model casts to float32 and divides by 255 itself. Training decoded "
    "each file with OpenCV as grayscale (cv2.imdecode(..., cv2.IMREAD_GRAYSCALE): colour to luma "
    "by OpenCV) and resized the whole image to {size}, aspect ratio not kept, with "
    "cv2.resize(img, ({w}, {h}), interpolation=cv2.INTER_AREA); do the same, since other "
    "resizers (PIL, tf.image) give other pixels. 16-bit images: training divided by 65535; pass "
    "round(v / 257) (at most 1/510 off per pixel). JPEGs larger than {twice} were "
    "decoded at 1/2, 1/4 or 1/8 scale first (cv2.IMREAD_REDUCED_GRAYSCALE_*). DICOM files were "
    "mapped to 16-bit grey levels first (rescale, VOI window or LUT, else the Bits Stored range; "
    "MONOCHROME1 inverted; mpitrain.data.dicom), then resized the same way; "
    "mpitrain.data.decode.decode_native(paths, {arg}) gives training's pixels exactly."
)
# --channels 3: the same rules in colour.
INPUT_CONTRACT_RGB = (
    "uint8 [n, {h}, {w}, 3]: RGB pixel values 0-255 (red first, not OpenCV's BGR) of images "
    "already resized to {size}; the model casts to float32 and divides by 255 itself. Training "
    "decoded each file with OpenCV in colour (cv2.imdecode(..., cv2.IMREAD_COLOR), then BGR to "
    "RGB; grey images with their one channel replicated, alpha dropped) and resized the whole "
    "image to {size}, aspect ratio not kept, with cv2.resize(img, ({w}, {h}), "
    "interpolation=cv2.INTER_AREA); do the same, since other resizers (PIL, tf.image) give other "
    "pixels. 16-bit images: training divided by 65535; pass round(v / 257). JPEGs larger than "
    "{twice} were decoded at 1/2, 1/4 or 1/8 scale first (cv2.IMREAD_REDUCED_COLOR_*); "
    "mpitrain.data.decode.decode_native(paths, {arg}, channels=3) gives training's pixels exactly."
)


def contract(info) -> str:
    """The input contract in words for this model's size and channels (a square's as ever)."""
    h, w = info.shape
    square = h == w
    return (INPUT_CONTRACT if info.channels == 1 else INPUT_CONTRACT_RGB).format(
        h=h,
        w=w,
        size=f"{w}x{h}" if square else f"{w}x{h} (width x height)",
        twice=f"2x{w} on both sides" if square else f"2x{w} wide and 2x{h} high",
        arg=w if square else f"({h}, {w})",
    )


def input_shape(info) -> list:
    """The export's input shape: [None, H, W, C]."""
    return [None, *info.shape, info.channels]


def default_out(info, fmt: str) -> Path:
    return info.path.parent / runfiles.export_name(fmt)


def is_export(folder: Path) -> bool:
    """Whether `folder` holds an export (its export.json)."""
    return Path(folder).is_dir() and (Path(folder) / NAME).is_file()


def source_model(folder: Path) -> Path:
    """The model.keras export `folder` was made from, as long as it is the very file it was
    made from (the SHA-256 in export.json); a stale export (model.keras retrained or
    replaced since) is refused in one line naming both."""
    import json

    folder = Path(folder)
    try:
        doc = json.loads((folder / NAME).read_text())
        source = doc.get("source") or {}
        recorded, fmt = source.get("model_sha256"), doc.get("model_format", "|".join(FORMATS))
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"export {folder}: cannot read its {NAME}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(recorded, str):
        raise UserError(
            f"export {folder}: its {NAME} does not record which model.keras it was made from (exported by an "
            "older mpitrain); export again"
        )
    # Where it was then, or beside the export (its default place, in a run folder moved since).
    given = [Path(source["model"])] if isinstance(source.get("model"), str) else []
    model = next((p for p in given + [folder.parent / runfiles.MODEL] if p.is_file()), None)
    if model is None:
        raise UserError(
            f"export {folder} was made from {(given or [folder.parent / runfiles.MODEL])[0]}, which is gone"
        )
    now = runfiles.file_sha256(model)
    if now != recorded:
        raise UserError(
            f"export {folder} is stale: {model} has changed since it was exported (sha256 {recorded[:12]}... then, "
            f"{now[:12]}... now); export again: mpitrain export {model.parent} --format {fmt} --out {folder} --overwrite"
        )
    return model


def check_out(out: Path, overwrite: bool) -> None:
    """`outdir`'s rule for --out, with one addition: --overwrite replaces only a folder that
    holds an earlier export (an export.json), never any other non-empty folder, so a slip
    such as ``--out RUN --overwrite`` cannot delete a run."""
    from mpitrain import outdir

    out = Path(out)
    if overwrite and out.is_dir() and any(out.iterdir()):
        if not (out / NAME).is_file():
            raise UserError(
                f"--out {out} is not empty and holds no {NAME}: --overwrite replaces only an "
                "earlier export; choose another folder"
            )
        return
    outdir.check_new_or_empty(out, "--out", "pass --overwrite to replace an earlier export, or choose another folder")


def to_pixels(arr: np.ndarray, max_value: float) -> np.ndarray:
    """Decoded rows (`decode.decode_native`: uint8, or uint16 with max 65535) -> the export's
    uint8 input: 16-bit rows rounded to round(v / 257), the contract's rule."""
    if max_value == 255.0:
        return np.asarray(arr, np.uint8)
    return ((np.asarray(arr, np.uint32) + 128) // 257).astype(np.uint8)


def check_sample(
    info, threads: int | None = None, n: int = SAMPLE, seed: int = SEED
) -> tuple[np.ndarray, str, str | None]:
    """(uint8 pixels [m, H, W, C], what they are, why not validation images or None).

    A seeded sample of the run's validation images (``val_predictions.csv``) decoded as
    training decoded them; seeded random pixels when none of them can be read."""
    from mpitrain.data.decode import decode_native
    from mpitrain.evaluate import valpreds

    rng = np.random.default_rng(seed)
    try:
        val = valpreds.read(info.path.parent, info.classes)
        reason = (
            f"the run has no {runfiles.VAL_PREDICTIONS}"
            if val is None
            else f"{runfiles.VAL_PREDICTIONS} lists no images"
            if not val.paths
            else None
        )
    except UserError as e:
        val, reason = None, str(e)
    if reason is None and val is not None:
        pick = np.sort(rng.choice(len(val.paths), min(n, len(val.paths)), replace=False))
        paths = [val.paths[i] for i in pick]
        arr, max_value, ok, errors = decode_native(paths, info.shape, threads, channels=info.channels)
        if arr.ndim == 3:
            arr = arr[..., np.newaxis]
        if ok.any():
            what = f"{int(ok.sum())} validation images of the run"
            if errors:
                what += f" ({len(errors)} of the {len(paths)} sampled could not be read)"
            return to_pixels(arr[ok], max_value), what, None
        reason = f"none of the {len(paths)} sampled validation images can be read ({errors[0][0]}: {errors[0][1]})"
    random = rng.integers(0, 256, (n, *info.shape), dtype=np.uint8)  # the grey draws as they always were
    if info.channels != 1:
        random = rng.integers(0, 256, (n, *info.shape, info.channels), dtype=np.uint8)
    return random[..., np.newaxis] if random.ndim == 3 else random, f"{n} seeded random images (seed {seed})", reason


def _save_savedmodel(model, shape: list, folder: Path) -> None:
    """The SavedModel: one signature, uint8 pixels -> float32 probabilities, batch free."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(pixels):
        return {OUTPUT: model(tf.cast(pixels, tf.float32) / 255.0, training=False)}

    archive.add_endpoint(SIGNATURE, serve, input_signature=[tf.TensorSpec(shape, tf.uint8, name=INPUT)])
    archive.write_out(str(folder), verbose=False)


def _tflite_bytes(savedmodel: Path) -> bytes:
    """The SavedModel converted to TFLite, float32 (no optimisation: no quantisation)."""
    import tensorflow as tf

    return tf.lite.TFLiteConverter.from_saved_model(str(savedmodel)).convert()


def tflite_interpreter():
    """(Interpreter class, its name and version): ai-edge-litert, else tflite-runtime, else
    TensorFlow's own (deprecated, removed in later TensorFlow versions)."""
    try:
        import ai_edge_litert
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, f"ai-edge-litert {getattr(ai_edge_litert, '__version__', '')}".strip()
    except ImportError:
        pass
    try:
        import tflite_runtime
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, f"tflite-runtime {getattr(tflite_runtime, '__version__', '')}".strip()
    except ImportError:
        pass
    import tensorflow as tf

    if not hasattr(tf.lite, "Interpreter"):
        raise UserError(
            "a TFLite export is checked by running it, and no TFLite interpreter is installed: "
            "pip install ai-edge-litert"
        )
    return tf.lite.Interpreter, f"tensorflow {tf.__version__} tf.lite.Interpreter"


def exported_predictor(fmt: str, folder: Path):
    """(batch of uint8 pixels -> probabilities, what runs it), loaded from the written files
    as a user would load them."""
    if fmt == "savedmodel":
        import tensorflow as tf

        signature = tf.saved_model.load(str(folder)).signatures[SIGNATURE]
        return (
            lambda x: signature(**{INPUT: tf.constant(x)})[OUTPUT].numpy()
        ), f"tensorflow {tf.__version__} tf.saved_model.load"
    interpreter, name = tflite_interpreter()
    runner = interpreter(model_path=str(folder / TFLITE_FILE)).get_signature_runner(SIGNATURE)
    return (lambda x: runner(**{INPUT: x})[OUTPUT]), name


def describe(info, fmt: str, check: dict, model_sha256: str) -> dict:
    """export.json: what using the exported model needs, how it was checked, and which
    model.keras it was made from (its path and SHA-256: `source_model` tells a stale export)."""
    from mpitrain import __version__
    from mpitrain.evaluate import per_label

    k = len(info.classes)
    return {
        "format": FORMAT,
        "model_format": fmt,
        "file": TFLITE_FILE if fmt == "tflite" else ".",
        "signature": SIGNATURE,
        "classes": list(info.classes),
        **_labels_doc(info),
        "image_size": info.image_size,  # a square's side, or "WxH" (width x height)
        "channels": info.channels,
        "input": {
            "name": INPUT,
            "dtype": "uint8",
            "shape": input_shape(info),
            "contract": contract(info),
        },
        "output": {
            "name": OUTPUT,
            "dtype": "float32",
            "shape": [None, k],
            "meaning": "per-label probabilities (sigmoid) in the order of classes"
            if per_label.is_multi_label(info)
            else "class probabilities (softmax) in the order of classes",
        },
        "compute_precision": "fp32",
        "source": {"model": str(info.path.resolve()), "model_sha256": model_sha256, "mpitrain_version": __version__},
        "check": check,
    }


def _flips(info, got: np.ndarray, reference: np.ndarray) -> int:
    """Decisions (images; multi-label: label decisions) the export makes otherwise than the model."""
    from mpitrain.evaluate import modelio, per_label

    if per_label.is_multi_label(info):
        ts, _ = per_label.thresholds(info, None)
        return int(((got.astype(np.float64) >= ts) != (reference.astype(np.float64) >= ts)).sum())
    return int(
        (
            modelio.decide(got, info.threshold, info.positive)
            != modelio.decide(reference, info.threshold, info.positive)
        ).sum()
    )


def _labels_doc(info) -> dict:
    """export.json's decision keys: a class and its threshold, or (multi-label) a threshold per label."""
    from mpitrain.evaluate import per_label
    from mpitrain.evaluate.predict import decision_rule

    if not per_label.is_multi_label(info):
        return {
            "positive_class": info.positive_class,
            "threshold": info.threshold,
            "threshold_method": info.threshold_method,
            "decision": decision_rule(info.classes, info.threshold, info.positive),
        }
    ts, _ = per_label.thresholds(info, None)
    return {
        "multi_label": True,
        "labels": list(info.classes),
        "thresholds": dict(zip(info.classes, map(float, ts))),
        "threshold_method": info.extra.get("threshold_policy"),
        "decision": per_label.rule(info.classes, ts) + " (each label on its own)",
    }


def export_main(
    run: str, fmt: str, out: str | None = None, overwrite: bool = False, threads: int | None = None, echo=print
) -> int:
    from mpitrain import outdir
    from mpitrain.atomic import atomic_dir, write_json
    from mpitrain.evaluate import modelio
    from mpitrain.parallel.comm import launched_by_mpi, world
    from mpitrain.pixels import scaled

    if launched_by_mpi() and world().rank != 0:
        return 0  # one process does the work; more would write the same folder
    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    path = modelio.model_path(run)
    if not path.with_name(runfiles.MODEL_INFO).is_file():  # older runs: no threshold, no positive class to carry
        raise UserError(
            f"no model.json beside {path}: export needs a run folder written by an mpitrain "
            "that saves model.json (classes, threshold, positive class)"
        )
    info = modelio.read_info(path)
    target = Path(out) if out else default_out(info, fmt)
    check_out(target, overwrite)

    from mpitrain.runtime import configure_runtime, quiet_fd2

    configure_runtime(0, threads, 1, "fp32")
    source_sha256 = runfiles.file_sha256(info.path)  # checked again below: nothing holds the file meanwhile
    model = modelio.load_model(info, "fp32")
    pixels, what, fallback = check_sample(info, threads)
    if fallback:
        print(f"note: checking the export on {what} instead of validation images: {fallback}", file=sys.stderr)
    k = len(info.classes)
    reference = modelio.predict_probs(model, scaled(pixels, 255.0), k)  # training's scaling, in numpy

    created = outdir.make_dirs(target.parent, "--out")
    try:
        with contextlib.ExitStack() as staging:  # leaving it renames the folder into place
            try:
                tmp = staging.enter_context(atomic_dir(target, replace=overwrite))
            except OSError as e:  # the folder above --out is not writable
                raise UserError(f"--out {target}: cannot create a folder beside it: {e.strerror or e}") from None
            with quiet_fd2():  # the converter's and the interpreter's C++ notices (MPITRAIN_TF_VERBOSE=1 shows them)
                if fmt == "savedmodel":
                    _save_savedmodel(model, input_shape(info), tmp)
                else:
                    scratch = tmp / ".savedmodel"
                    _save_savedmodel(model, input_shape(info), scratch)
                    (tmp / TFLITE_FILE).write_bytes(_tflite_bytes(scratch))
                    shutil.rmtree(scratch)
                predict, runner = exported_predictor(fmt, tmp)
                got = modelio.predict_probs(predict, pixels, k)
            diff = float(np.abs(got.astype(np.float64) - reference).max())
            tol = TOLERANCE[fmt]
            if not diff <= tol:  # NaN fails too
                raise UserError(
                    f"the {fmt} export does not reproduce {path}: probabilities differ by up to "
                    f"{diff:.3g} on {what} (tolerance {tol:g}); nothing written"
                )
            flips = _flips(info, got, reference)
            check = {
                "inputs": what,
                "n": len(pixels),
                "random_because": fallback,
                "reference": f"{path.name} in float32 (Keras, safe mode)",
                "run_with": runner,
                "max_abs_diff": diff,
                "tolerance": tol,
                "decisions_changed": flips,
            }
            if runfiles.file_sha256(info.path) != source_sha256:
                raise UserError(f"{path} changed while it was being exported (a training writing it?); nothing written")
            write_json(tmp / NAME, describe(info, fmt, check, source_sha256))
    except BaseException:
        outdir.remove_empty(created)
        raise
    h, w = info.shape
    echo(
        f"exported {path} as {'a SavedModel' if fmt == 'savedmodel' else 'TFLite ' + TFLITE_FILE} to {target} "
        f"in {time.perf_counter() - t0:.1f}s: uint8 pixels [n, {h}, {w}, {info.channels}] (0-255, resized to {w}x{h} by the "
        f"caller) -> {OUTPUT} of {', '.join(info.classes)}; checked on {what}: max |p - {path.name}| = "
        f"{diff:.2g} <= {tol:g}"
    )
    return 0
