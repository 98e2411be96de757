"""Deterministic synthetic chest-X-ray-like data set (for demos, tests and CI).

``generate(out)`` writes ``out/<CLASS>/<CLASS>-NNNNN.png`` (8-bit grayscale PNG,
``image_size`` x ``image_size``) for each class plus a marker file
``out/.mpitrain-synth.json`` holding the parameters. Every picture is a dark background with
a brighter torso, two dark lung fields, curved rib stripes, spine, clavicles and heart,
randomly shifted/scaled/rotated with random brightness, contrast and noise, plus clutter that
says nothing about the label (side marker, ECG wires, electrodes, soft-tissue shadows,
vessel markings). The first class is healthy; every other class adds opacities inside the
lungs: with the default classes, PNEUMONIA gets soft blurred patches of random size, position
and strength that fill the dark lung in towards soft-tissue brightness, some of them faint.
(A third or fourth class gets a different pattern: lobar consolidation, then bilateral
interstitial haze.) At the defaults (300 per class, 50 x 50) the project's small seed CNN
reaches about 90-96 % validation accuracy after 3-5 epochs: learnable, but not at once.

Images are a pure function of ``(seed, class index, image index, image_size)``: each image
has its own ``numpy.random.Generator(PCG64([seed, class index, index]))``, so the same seed
gives the same bytes and a larger ``per_class`` only appends images.

``image_size`` may be 8 to 1024 (sizes up to 128 are drawn at twice the size and shrunk,
for smooth edges), or a (height, width) pair of such sides: drawn square at the longer
side and resized to width x height, aspect ratio not kept, as training resizes. The first class *in the given order* is the healthy one.

``out`` must not exist or be an empty folder. If it already holds a complete ``generate()``
output with the same parameters it is reused as it is; anything else is refused. The data
set is built in a hidden temporary sibling folder and renamed into place in one step, so a
crash never leaves a half data set under ``out`` and several processes (MPI ranks on one
machine) may call ``generate``/``demo_data_dir`` at once.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path

import cv2
import numpy as np

from mpitrain.config import IMAGE_SIZES, image_size_value
from mpitrain.errors import UserError
from mpitrain.outdir import check_new_or_empty

MARKER = ".mpitrain-synth.json"
GENERATOR_VERSION = 1  # bump (and the demo folder name) whenever the pictures change
DEMO_DIR_NAME = "demo-v1"
_SUPERSAMPLE = 2


def _smooth_inside(d: np.ndarray, edge: float) -> np.ndarray:
    """1 where ``d`` < 0 (inside a shape), 0 outside, with a soft edge of width ``edge``."""
    return 1.0 / (1.0 + np.exp(np.clip(d / edge, -30.0, 30.0)))


def _ellipse(x, y, cx, cy, a, b, power=2.0):
    """Signed-ish distance of a super-ellipse: negative inside, positive outside."""
    return (np.abs((x - cx) / a) ** power + np.abs((y - cy) / b) ** power) ** (1.0 / power) - 1.0


def _segment_distance(x, y, x0, y0, x1, y1):
    """Euclidean distance from every point to the segment (x0, y0)-(x1, y1)."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(x - x0 - t * dx, y - y0 - t * dy)


def _blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), sigmaX=max(sigma_px, 0.3))


def _opacities(rng, x, y, style: int, n: int) -> np.ndarray:
    """How much of each lung pixel is filled in (0..1) for a sick class ``style`` 1, 2 or 3."""
    if style == 1:  # patchy pneumonia: a few soft blobs, from faint to dense
        dose = np.zeros_like(x)
        for _ in range(rng.integers(1, 5)):
            side = float(rng.choice([-1.0, 1.0]))
            cx = side * 0.37 + rng.uniform(-0.14, 0.14)
            cy = rng.uniform(-0.35, 0.35)
            sigma = rng.uniform(0.12, 0.28)
            strength = rng.uniform(1.2, 3.0) * (0.3 if rng.random() < 0.12 else 1.0)
            dose += strength * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
        texture = _blur(rng.standard_normal(x.shape).astype(np.float32), n / 25)
        return 1.0 - np.exp(-dose * np.clip(0.85 + 0.4 * texture, 0.4, 1.3))
    if style == 2:  # lobar: one dense, well-defined patch low in one lung
        side = float(rng.choice([-1.0, 1.0]))
        d = _ellipse(x, y, side * 0.38, rng.uniform(0.1, 0.35), rng.uniform(0.12, 0.2), rng.uniform(0.12, 0.2))
        return rng.uniform(0.6, 0.95) * _smooth_inside(d, 0.1)
    # interstitial: fine reticular texture plus haze over both lungs
    texture = np.abs(_blur(rng.standard_normal(x.shape).astype(np.float32), n / 60))
    haze = rng.uniform(0.15, 0.3) + rng.uniform(0.5, 1.0) * texture
    return np.clip(haze, 0.0, 1.0) * rng.uniform(0.6, 1.0)


def _render(rng: np.random.Generator, image_size: int | tuple[int, int], style: int | tuple[int, ...]) -> np.ndarray:
    """One picture as uint8 [image_size, image_size], or [height, width] for a pair (drawn
    square at the longer side, then resized, aspect ratio not kept); ``style`` 0 means healthy,
    a tuple of styles (multi-label) draws each of them, one after the other, () none."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    longest = max(h, w)
    n = longest * (_SUPERSAMPLE if longest <= 128 else 1)  # anti-aliasing for small sizes
    v, u = (np.mgrid[0:n, 0:n].astype(np.float32) + 0.5) / n * 2.0 - 1.0
    # Random pose: move the patient instead of the camera (inverse transform of the grid).
    angle = math.radians(rng.uniform(-7.0, 7.0))
    sx, sy = rng.uniform(0.88, 1.08), rng.uniform(0.88, 1.08)
    u, v = u - rng.uniform(-0.07, 0.07), v - rng.uniform(-0.07, 0.07)
    x = (math.cos(angle) * u + math.sin(angle) * v) / sx
    y = (-math.sin(angle) * u + math.cos(angle) * v) / sy
    edge = 2.0 / n

    img: np.ndarray = np.full((n, n), rng.uniform(0.02, 0.08), dtype=np.float32)
    torso = np.maximum(
        _smooth_inside(_ellipse(x, y, 0, 0.3, 0.92, 1.05, 3.0), edge * 3),
        _smooth_inside(_ellipse(x, y, 0, -0.85, 0.22, 0.4, 4.0), edge * 3),
    )
    img += rng.uniform(0.5, 0.6) * torso
    lungs = np.zeros_like(x)
    lung_h = rng.uniform(0.5, 0.6)
    for side in (-1.0, 1.0):
        # Narrow apex, wide base: scale the horizontal coordinate with the height.
        taper = np.clip(0.85 + 0.2 * (y + 0.02) / lung_h, 0.6, 1.05)
        d = _ellipse(
            side * 0.38 + (x - side * 0.38) / taper, y, side * 0.38, -0.02, rng.uniform(0.25, 0.3), lung_h, 2.2
        )
        lungs = np.maximum(lungs, _smooth_inside(d, 0.06))
    # The heart is a soft-tissue shadow over the lower medial lungs (mostly the image right).
    heart = _smooth_inside(
        _ellipse(x, y, rng.uniform(0.05, 0.14), 0.45, rng.uniform(0.22, 0.3), rng.uniform(0.18, 0.24)), 0.08
    )
    lungs *= 1.0 - 0.7 * heart
    darkness = rng.uniform(0.3, 0.4)
    img -= darkness * lungs * torso
    # Label-independent lung texture: vessel markings, a soft shadow at the bases.
    vessels = np.abs(_blur(rng.standard_normal((n, n)).astype(np.float32), n / 40))
    img += rng.uniform(0.03, 0.1) * vessels * lungs * np.clip(1.0 - np.abs(x) * 1.5, 0, 1)
    img += rng.uniform(0.0, 0.08) * lungs * _smooth_inside(0.3 - y, 0.12)
    # Ribs: stripes that arch down laterally, brightest where they cross the lungs.
    r = y - 0.55 * np.abs(x) ** 1.5 + rng.uniform(0, 0.2)
    ribs = np.maximum(np.cos(2 * np.pi * r / rng.uniform(0.15, 0.19)), 0.0) ** 3
    img += rng.uniform(0.1, 0.18) * ribs * torso * _smooth_inside(y - 0.55, 0.08)
    # Spine with vertebrae, clavicles.
    spine = _smooth_inside(np.abs(x) - 0.07, edge) * (0.8 + 0.2 * np.cos(2 * np.pi * y / 0.11))
    img += 0.12 * spine * torso
    for side in (-1.0, 1.0):
        dist = _segment_distance(x, y, side * 0.08, -0.6, side * 0.58, -0.74)
        img += 0.2 * _smooth_inside(dist - 0.035, edge)
    for one in (style,) if isinstance(style, int) else style:  # a multi-label image may have several
        if one:
            # Consolidated lung is about as dense as soft tissue: fill the dark lung in.
            img += (darkness + 0.15) * lungs * torso * _opacities(rng, x, y, one, n)
    # Clutter: side marker, ECG wire, electrodes.
    if rng.random() < 0.7:
        mx, my = float(rng.choice([-0.82, 0.82])), rng.uniform(-0.85, -0.6)
        img += 0.5 * _smooth_inside(np.maximum(np.abs(x - mx), np.abs(y - my)) - 0.05, edge)
    if rng.random() < 0.35:
        x0, x1 = rng.uniform(-0.8, 0.8, size=2).tolist()
        wire = _segment_distance(u, v, x0, -1.0, x1, 1.0) - rng.uniform(0.01, 0.025)
        img += 0.3 * _smooth_inside(wire, edge)
    for _ in range(rng.poisson(0.7)):
        cx, cy = rng.uniform(-0.7, 0.7, size=2).tolist()
        img += 0.35 * _smooth_inside(np.hypot(u - cx, v - cy) - rng.uniform(0.03, 0.06), edge)
    # Exposure, noise, detector blur.
    img = (img - 0.4) * rng.uniform(0.8, 1.2) + 0.4 + rng.uniform(-0.08, 0.08)
    img += rng.uniform(-0.08, 0.08) * v
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    img = _blur(img, rng.uniform(0.3, 0.8))
    img += rng.normal(0.0, rng.uniform(0.01, 0.035), size=img.shape).astype(np.float32)
    return np.clip(np.rint(np.clip(img, 0.0, 1.0) ** 0.9 * 255.0), 0, 255).astype(np.uint8)


def _check_whole(name: str, value, low: int, high: int | None = None) -> None:
    ok = (
        isinstance(value, (int, np.integer))
        and not isinstance(value, bool)
        and value >= low
        and (high is None or value <= high)
    )
    if not ok:
        span = f">= {low}" if high is None else f"from {low} to {high}"
        raise UserError(f"{name} must be a whole number {span}, got {value!r}")


def _check_args(per_class, image_size, seed, classes) -> list[str]:
    """Validate the arguments of generate(); return the class names as a list."""
    _check_whole("per_class", per_class, 1)
    for side in image_size if isinstance(image_size, tuple) and len(image_size) == 2 else (image_size,):
        _check_whole("image_size", side, *IMAGE_SIZES)
    _check_whole("seed", seed, 0)
    names = [classes] if isinstance(classes, str) else list(classes)
    if not 2 <= len(names) <= 4:
        raise UserError(f"need 2 to 4 class names, got {len(names)}")
    for name in names:
        if (
            not isinstance(name, str)
            or not name
            or name.startswith(".")
            or "/" in name
            or "\\" in name
            or name != name.strip()
        ):
            raise UserError(f"bad class name {name!r}: use a plain folder name")
    if len(set(names)) != len(names):
        raise UserError(f"class names must be distinct, got {names}")
    return names


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def generate(
    out: Path | str,
    per_class: int = 300,
    image_size: int | tuple[int, int] = 50,
    seed: int = 0,
    classes=("NORMAL", "PNEUMONIA"),
) -> Path:
    """Write the data set to ``out`` (see module doc) and return ``out`` as a Path.

    Raises UserError for bad arguments, or if ``out`` is a file, a non-empty folder that is
    not a ``generate()`` output, or a ``generate()`` output made with other parameters.
    """
    names = _check_args(per_class, image_size, seed, classes)
    out = Path(out).expanduser()
    params = {
        "generator": "mpitrain.data.synth",
        "version": GENERATOR_VERSION,
        "per_class": int(per_class),
        "image_size": image_size_value(image_size),  # a square's side (as ever), else "WxH"
        "seed": int(seed),
        "classes": names,
    }

    def fill(tmp: Path) -> None:
        for ci, name in enumerate(names):
            (tmp / name).mkdir(parents=True)
            for i in range(per_class):
                rng = np.random.Generator(np.random.PCG64([int(seed), ci, i]))
                img = _render(rng, image_size if isinstance(image_size, tuple) else int(image_size), style=ci)
                if not cv2.imwrite(str(tmp / name / f"{name}-{i:05d}.png"), img):
                    raise OSError(f"could not write {tmp / name}")

    return _build(out, params, fill)


def _build(out: Path, params: dict, fill) -> Path:
    """``out`` as ``fill(folder)`` writes it, with the marker of ``params``: built in a hidden
    sibling and renamed into place; an existing output of the same ``params`` is reused."""

    def reuse_or_refuse() -> Path | None:
        if not out.exists():
            return None
        marker = _read_marker(out) if out.is_dir() else None
        if marker == params:
            return out
        if marker is not None:
            raise UserError(
                f"{out} holds a synthetic data set made with other parameters "
                f"({marker}); delete it or choose another folder"
            )
        check_new_or_empty(out, "--out", "choose a new or empty folder")  # train's rule for its --out
        return None

    if reuse_or_refuse() is not None:
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out.parent}: {e.strerror or e}") from None
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        fill(tmp)
        (tmp / MARKER).write_text(json.dumps(params, indent=1) + "\n", encoding="utf-8")
        try:
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # allowed when empty; os.rename cannot replace it everywhere
            os.rename(tmp, out)
        except OSError:
            # Someone else (another rank) won the race, or the folder filled up meanwhile.
            if reuse_or_refuse() is None:
                raise
    except OSError as e:
        raise UserError(f"cannot write synthetic data to {out}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


FINDINGS = ("opacity", "consolidation", "interstitial")  # styles 1, 2, 3 of `_opacities`
LABELS_FILE = "labels.csv"
_MULTI = 0x3A1  # apart from the classes' generator streams ([seed, class index, index])


def generate_multilabel(
    out: Path | str, images: int = 600, image_size: int | tuple[int, int] = 50, seed: int = 0, prevalence: float = 0.3
) -> Path:
    """A multi-label data set: ``out/images/IMG-NNNNN.png`` and ``out/labels.csv`` (path,
    patient, then a 1/0 column per finding of `FINDINGS`). Each finding is present
    independently with probability ``prevalence`` and drawn as its own pattern (several
    may overlap; none: a healthy picture); two images per patient. A pure function of
    (seed, index, image_size) as `generate` is, and built and reused the same way."""
    _check_whole("images", images, 1)
    _check_args(1, image_size, seed, ("NORMAL", "PNEUMONIA"))  # the size's and the seed's rules
    if not 0.0 < float(prevalence) < 1.0:
        raise UserError(f"--prevalence must be between 0 and 1, got {prevalence}")
    out = Path(out).expanduser()
    params = {
        "generator": "mpitrain.data.synth",
        "version": GENERATOR_VERSION,
        "multi_label": list(FINDINGS),
        "images": int(images),
        "image_size": image_size_value(image_size),
        "seed": int(seed),
        "prevalence": float(prevalence),
    }
    size = image_size if isinstance(image_size, tuple) else int(image_size)

    def fill(tmp: Path) -> None:
        (tmp / "images").mkdir()
        rows = [["path", "patient", *FINDINGS]]
        for i in range(int(images)):
            rng = np.random.Generator(np.random.PCG64([int(seed), _MULTI, i]))
            present = rng.random(len(FINDINGS)) < prevalence
            name = f"images/IMG-{i:05d}.png"
            if not cv2.imwrite(str(tmp / name), _render(rng, size, tuple(int(k) + 1 for k in np.flatnonzero(present)))):
                raise OSError(f"could not write {tmp / name}")
            rows.append([name, f"P{i // 2:05d}", *(str(int(v)) for v in present)])
        (tmp / LABELS_FILE).write_text("\n".join(",".join(r) for r in rows) + "\n", encoding="utf-8")

    return _build(out, params, fill)


def demo_data_dir(cache_dir: Path | None = None) -> Path:
    """The default synthetic data set in ``<cache>/demo-v1``, generated on first use only."""
    from mpitrain.data.cache import default_cache_dir

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return generate(root / DEMO_DIR_NAME)
