"""Rebalance: how often each training image is used per epoch, to correct class imbalance.

Only the train split is touched; val and test keep their true distribution.

- `none`: every image once.
- `oversample`: every class is brought up to the largest class: each image is used
  `target // n` times and the first `target % n` images (by id) once more, so counts are exact.
- `undersample`: every class is cut to the smallest class: the first `target` images by id.
- `class_weight`: every image once; the loss is weighted by `total / (classes * n_class)`.
"""

from __future__ import annotations

import pandas as pd


def copies(train: pd.DataFrame, method: str) -> pd.Series:
    """Copies per training image (index aligned with `train`): the pure core of the stage."""
    counts = train["label"].value_counts()
    if method in ("none", "class_weight") or train.empty:
        return pd.Series(1, index=train.index)
    target = int(counts.max() if method == "oversample" else counts.min())
    rank = train.sort_values("id").groupby("label").cumcount().reindex(train.index)
    n = train["label"].map(counts)
    if method == "oversample":
        return (target // n + (rank < target % n)).astype(int)
    return (rank < target).astype(int)


def class_weights(train: pd.DataFrame) -> dict[str, float]:
    counts = train["label"].value_counts()
    total, k = int(counts.sum()), len(counts)
    return {label: round(total / (k * int(n)), 6) for label, n in sorted(counts.items())}

