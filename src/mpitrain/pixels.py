"""Stored pixels -> model input: the one rule, in NumPy (engine/steps.py does it in the graph).

Images are held as the cache stores them, integers (uint8, or uint16 when a 16-bit file is
among them) with their full-scale value; the model takes float32 in [0, 1]. The conversion
is one correctly rounded IEEE division, so the NumPy path here and the in-graph path of the
train step (`engine.steps.to_float_input`) give the same bits.
"""

from __future__ import annotations

import numpy as np


def scaled(arr: np.ndarray, max_value: float) -> np.ndarray:
    """Integer pixels -> float32 in [0, 1], same shape (one correctly rounded division)."""
    return np.divide(arr, np.float32(max_value), dtype=np.float32)


def to_float(arr: np.ndarray, max_value: float) -> np.ndarray:
    """Integer rows [n, s, s] -> float32 [n, s, s, 1] in [0, 1] (correctly rounded)."""
    return scaled(arr, max_value)[..., np.newaxis]


def as_float(x: np.ndarray, max_value: float) -> np.ndarray:
    """A batch as the model's input: float32 in [0, 1], exactly as decoded. Grey rows
    [n, H, W] get their channel axis; rows [n, H, W, C] keep theirs; float rows are taken
    as they are."""
    if x.dtype.kind == "f":
        return x
    return to_float(x, max_value) if x.ndim == 3 else scaled(x, max_value)
