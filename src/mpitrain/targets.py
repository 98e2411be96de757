"""What a label array is: class indices int [n], or multi-label targets float32 [n, L].

Multi-label data holds 1.0 (present), 0.0 (absent) or NaN (masked out of the loss and the
metrics of that label) per label; data/ reads it (`data/findings.py`), the engine trains it
(`engine/multilabel.py`), and both tell the two kinds apart by this one rule.
"""

from __future__ import annotations

import numpy as np


def is_multi_label(labels) -> bool:
    """Multi-label data: labels [n, L], not class indices [n]."""
    return np.ndim(labels) == 2


def strata(labels) -> np.ndarray:
    """Class indices [n] to stratify or sample by: multi-label rows [n, L] have no one class
    and are all one (class 0)."""
    labels = np.asarray(labels)
    if is_multi_label(labels):
        return np.zeros(len(labels), np.int64)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (or [n, L] multi-label), got shape {labels.shape}")
    return labels
