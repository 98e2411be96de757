"""Training-time augmentation of image batches, seeded by position, with no hidden state.

`augment_batch` turns one training batch of stored rows (uint8/uint16 [n, s, s], or float
[n, s, s, 1] in [0, 1]) into model input (float32 [n, s, s, 1] in [0, 1]) with a random
geometric and photometric change per image. The random numbers are a pure function of
(seed, epoch, rank, step): the same batch at the same position gives the same output, a
resumed run draws exactly what the uninterrupted one drew, and there is no generator state
to save. The trainer calls it on training batches only; validation, `evaluate` and
`predict` never see it.

Rows need not be square ([n, h, w], a WxH ``--image-size``): shifts are fractions of the
width (x) and the height (y), and rotation is about the centre.

Colour rows ([n, s, s, 3], ``--channels 3``) take the same draws in the same order: one
warp per image for all three channels, and gamma, contrast (around the mean of all three)
and brightness applied alike to each channel, so hue is kept. They go through their own
function (`_augment_colour`); grey rows are augmented exactly as before.

Policies (`POLICIES`):

* ``none``: no change; the batch is converted exactly as `dataset.as_float` does.
* ``xray``: what differs between chest X-rays of different hospitals, machines and
  children: positioning and field of view (rotation within +-10 degrees, scale 0.9-1.1,
  shift within +-6 % of the side, reflected at the border, bilinear) and exposure
  (gamma 0.8-1.25, contrast 0.8-1.2 around the image's mean, brightness +-0.08), clipped
  to [0, 1]. No flips: the heart is on the left.
* ``xray-strong``: the same changes over wider ranges (rotation +-15 degrees, scale
  0.85-1.2, shift +-10 %, gamma 0.6-1.6, contrast 0.7-1.4, brightness +-0.12): the
  recipe's policy (`--recipe xray`). On the test patients it raised specificity without
  costing sensitivity (docs/accuracy.md); validation accuracy drops a little, since
  validation images are as alike to training as ever.
* ``xray-sharpness``: ``xray-strong`` plus a random change of sharpness, what differs
  between detectors, exposure times and JPEG settings: a Gaussian blur (sigma up to 0.6
  pixel of the stored image) or an unsharp mask (amount up to 0.6), each for half the
  images on average. In the chest X-rays the images' sharpness tells the classes apart
  (the mean absolute Laplacian at 64 px: 21.5 for train/ NORMAL, 15.6 for PNEUMONIA, and
  20.1 for test/ NORMAL, whose new patients the recipe calls PNEUMONIA too often): this
  policy makes that cue unreliable.

Implementation, chosen by measurement (batch 32 of 64x64, one core, docs/benchmarks.md):
OpenCV `warpAffine` on the integer rows before the float conversion (about 20,000
images/s for the warp alone), then the photometric part vectorised in NumPy. A NumPy
bilinear gather (about 2,900 images/s) and TensorFlow's ImageProjectiveTransformV3 in a
compiled function (about 7,100 images/s) were slower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from mpitrain import shards
from mpitrain.config import AUGMENTS as POLICIES  # the --augment names: one list, in config.py
from mpitrain.pixels import as_float

_TAG = 0xA06  # keeps these draws apart from the shuffle (shards.epoch_order) of the same numbers


@dataclass(frozen=True)
class Policy:
    rotate_degrees: float = 0.0  # uniform in +-this
    scale: tuple[float, float] = (1.0, 1.0)  # log-uniform zoom factor (>1: zoom in)
    shift: float = 0.0  # uniform in +-this fraction of the side, x and y
    gamma: tuple[float, float] = (1.0, 1.0)  # log-uniform exponent on [0, 1] values
    contrast: tuple[float, float] = (1.0, 1.0)  # uniform factor around the image's mean
    brightness: float = 0.0  # uniform in +-this, added to [0, 1] values
    # Sharpness: s uniform in [-sharpen, blur]; s > 0 blurs (Gaussian, sigma s pixels),
    # s < 0 sharpens (unsharp mask of sigma 1, amount -s). Applied after the warp.
    blur: float = 0.0
    sharpen: float = 0.0

    @property
    def sharpness(self) -> bool:
        return self.blur > 0 or self.sharpen > 0

    @property
    def geometric(self) -> bool:
        return self.rotate_degrees > 0 or self.scale != (1.0, 1.0) or self.shift > 0

    @property
    def photometric(self) -> bool:
        return self.gamma != (1.0, 1.0) or self.contrast != (1.0, 1.0) or self.brightness > 0


_STRONG = Policy(
    rotate_degrees=15.0, scale=(0.85, 1.2), shift=0.10, gamma=(0.6, 1.6), contrast=(0.7, 1.4), brightness=0.12
)


POLICY = {
    "none": Policy(),
    "xray": Policy(
        rotate_degrees=10.0, scale=(0.9, 1.1), shift=0.06, gamma=(0.8, 1.25), contrast=(0.8, 1.2), brightness=0.08
    ),
    "xray-strong": _STRONG,
    "xray-sharpness": replace(_STRONG, blur=0.6, sharpen=0.6),
}
if tuple(POLICY) != POLICIES:  # a policy is added in both places, or the option would not offer it
    raise ImportError(f"data/augment.py POLICY {tuple(POLICY)} differs from config.AUGMENTS {POLICIES}")


def batch_rng(seed: int, epoch: int, rank: int, step: int) -> np.random.Generator:
    """The generator of one batch: a function of its position in the run, nothing else."""
    return shards.batch_rng(seed, epoch, rank, step, _TAG)


def _log_uniform(rng, lo_hi, n):
    lo, hi = lo_hi
    return np.exp(rng.uniform(math.log(lo), math.log(hi), n))


def affine_matrices(rng: np.random.Generator, n: int, side: int | tuple[int, int], policy: Policy) -> np.ndarray:
    """[n, 2, 3] forward maps (source -> output pixel) about the image centre. ``side``: a
    square's side, or (height, width): x shifts by a fraction of the width, y of the height."""
    h, w = (side, side) if isinstance(side, int) else side
    angle = np.deg2rad(rng.uniform(-policy.rotate_degrees, policy.rotate_degrees, n))
    scale = _log_uniform(rng, policy.scale, n)
    shift = rng.uniform(-policy.shift, policy.shift, (n, 2)) * np.array([w, h])
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    m = np.empty((n, 2, 3))
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = c, s, -s, c
    m[:, 0, 2] = (1 - c) * cx - s * cy + shift[:, 0]
    m[:, 1, 2] = s * cx + (1 - c) * cy + shift[:, 1]
    return m


def augment_batch(
    x: np.ndarray, max_value: float, policy: str | Policy, seed: int, epoch: int, rank: int, step: int
) -> np.ndarray:
    """One training batch as augmented model input: float32 [n, s, s, 1] in [0, 1]."""
    return augment_with(x, max_value, policy, batch_rng(seed, epoch, rank, step))


def augment_with(x: np.ndarray, max_value: float, policy: str | Policy, rng: np.random.Generator) -> np.ndarray:
    """`augment_batch` with the caller's generator (test-time augmentation seeds each image
    by itself, `evaluate/tta.py`): the same draws, in the same order, from ``rng``."""
    p = POLICY[policy] if isinstance(policy, str) else policy
    x = np.asarray(x)
    if x.ndim == 4 and x.shape[-1] == 3:
        return _augment_colour(x, max_value, p, rng)
    if x.ndim == 4:
        x = x[..., 0]
    n = len(x)
    floats = x.dtype.kind == "f"
    if n == 0 or not (p.geometric or p.photometric or p.sharpness):
        return _to_float(x, max_value, floats)

    x, gamma, contrast, bright = _draw_and_warp(x, p, rng, x.shape[1:3])
    if not p.photometric:
        return _to_float(x, max_value, floats)
    if x.dtype == np.uint8:
        return _photometric_u8(x, max_value, gamma, contrast, bright)
    f = _to_float(x, max_value, floats)[..., 0]
    shape = (n, 1, 1)
    f = np.power(f, gamma.astype(np.float32).reshape(shape))
    mean = f.mean(axis=(1, 2), keepdims=True)
    f = (f - mean) * contrast.astype(np.float32).reshape(shape) + mean + bright.astype(np.float32).reshape(shape)
    np.clip(f, 0.0, 1.0, out=f)
    return np.ascontiguousarray(f, dtype=np.float32)[..., np.newaxis]


def _draw_and_warp(x: np.ndarray, p: Policy, rng: np.random.Generator, side: tuple[int, int]):
    """Grey and colour alike: every parameter drawn in a fixed order, whether or not a part
    is enabled, then the geometric warp (one matrix per image, the same for its channels).
    Returns (rows, gamma, contrast, brightness)."""
    import cv2

    n, floats = len(x), x.dtype.kind == "f"
    mats = affine_matrices(rng, n, side, p)
    gamma = _log_uniform(rng, p.gamma, n)
    contrast = rng.uniform(p.contrast[0], p.contrast[1], n)
    bright = rng.uniform(-p.brightness, p.brightness, n)
    if p.geometric:
        src = np.ascontiguousarray(x, dtype=np.float32 if floats else x.dtype)
        warped = np.empty_like(src)
        size = (x.shape[2], x.shape[1])
        for i in range(n):
            cv2.warpAffine(
                src[i], mats[i], size, dst=warped[i], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
            )
        x = warped
    if p.sharpness:  # drawn last and only here: the older policies' draws stay bit-identical
        x = _sharpness(x, rng.uniform(-p.sharpen, p.blur, n))
    return x, gamma, contrast, bright


def _sharpness(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Blur image i (Gaussian, sigma s[i] pixels) where s[i] > 0, or sharpen it (unsharp
    mask of sigma 1, amount -s[i]) where s[i] < 0; the rows keep their dtype and range."""
    import cv2

    out = np.empty_like(x)
    top = 1.0 if x.dtype.kind == "f" else float(np.iinfo(x.dtype).max)
    for i in range(len(x)):
        f = x[i].astype(np.float32)
        if s[i] > 0:
            f = cv2.GaussianBlur(f, (0, 0), float(s[i]))
        else:
            f = f + float(-s[i]) * (f - cv2.GaussianBlur(f, (0, 0), 1.0))
        f = np.clip(f, 0.0, top)
        out[i] = f if x.dtype.kind == "f" else np.rint(f)
    return out


def _augment_colour(x: np.ndarray, max_value: float, p: Policy, rng: np.random.Generator) -> np.ndarray:
    """Colour rows [n, s, s, 3] -> float32 [n, s, s, 3]: `augment_batch`'s draws, in its order."""
    n, floats = len(x), x.dtype.kind == "f"
    if n == 0 or not (p.geometric or p.photometric or p.sharpness):
        return np.asarray(x, np.float32) if floats else as_float(x, max_value)
    x, gamma, contrast, bright = _draw_and_warp(x, p, rng, x.shape[1:3])
    f = np.asarray(x, np.float32) if floats else as_float(x, max_value)
    if not p.photometric:
        return f
    shape = (n, 1, 1, 1)
    f = np.power(f, gamma.astype(np.float32).reshape(shape))
    mean = f.mean(axis=(1, 2, 3), keepdims=True)
    f = (f - mean) * contrast.astype(np.float32).reshape(shape) + mean + bright.astype(np.float32).reshape(shape)
    np.clip(f, 0.0, 1.0, out=f)
    return np.ascontiguousarray(f, dtype=np.float32)


def _photometric_u8(x, max_value, gamma, contrast, bright) -> np.ndarray:
    """8-bit rows: gamma, contrast and brightness folded into one 256-entry float table per
    image (the image's mean after gamma comes from its histogram), applied with cv2.LUT."""
    import cv2

    n = len(x)
    levels = np.minimum(np.arange(256, dtype=np.float64) / float(max_value), 1.0)
    g = levels[None, :] ** gamma[:, None]  # [n, 256]
    hist = np.bincount((x.reshape(n, -1) + (np.arange(n) * 256)[:, None]).ravel(), minlength=256 * n).reshape(n, 256)
    mean = (hist * g).sum(axis=1, keepdims=True) / max(1, x[0].size)
    luts = np.clip((g - mean) * contrast[:, None] + mean + bright[:, None], 0.0, 1.0).astype(np.float32)
    out = np.empty(x.shape + (1,), dtype=np.float32)
    for i in range(n):
        out[i, ..., 0] = cv2.LUT(x[i], luts[i])
    return out


def _to_float(x: np.ndarray, max_value: float, floats: bool) -> np.ndarray:
    if floats:
        return np.asarray(x, dtype=np.float32)[..., np.newaxis]
    from mpitrain.data.decode import to_float

    return to_float(x, max_value)
