"""Rebalance: how often each training image is used per epoch, to correct class imbalance.

Only the train split is touched; val and test keep their true distribution.

- `none`: every image once.
- `oversample`: every class is brought up to the largest class: each image is used
  `target // n` times and the first `target % n` images (by id) once more, so counts are exact.
- `undersample`: every class is cut to the smallest class: the first `target` images by id.
- `class_weight`: every image once; the loss is weighted by `total / (classes * n_class)`.

A query over the split table's view `split` in DuckDB (imgpipe/data/tables.py), so the memory it
takes does not grow with the number of images.
"""

from __future__ import annotations

METHODS = ("none", "oversample", "undersample", "class_weight")


def copies_query(method: str) -> str:
    """SQL for (id, label, copies) of each training image of the view `split`, by id."""
    if method in ("none", "class_weight"):
        copies, target = "1", "max"
    elif method == "oversample":
        copies, target = "t // n + CAST(rank < t % n AS BIGINT)", "max"
    elif method == "undersample":
        copies, target = "CAST(rank < t AS BIGINT)", "min"
    else:
        raise ValueError(f"rebalance.method must be one of {', '.join(METHODS)}, got {method!r}")
    return f"""
        WITH train AS (SELECT id, label FROM split WHERE split = 'train'),
             counts AS (SELECT label, count(*) AS n FROM train GROUP BY label),
             target AS (SELECT {target}(n) AS t FROM counts),
             ranked AS (SELECT id, label, n, row_number() OVER (PARTITION BY label ORDER BY id) - 1 AS rank
                        FROM train JOIN counts USING (label))
        SELECT id, label, {copies} AS copies FROM ranked, target ORDER BY id"""


def class_weights(counts: dict[str, int]) -> dict[str, float]:
    """Per class (training images per class in `counts`): total / (classes x its images)."""
    total, k = sum(counts.values()), len(counts)
    return {label: round(total / (k * int(n)), 6) for label, n in sorted(counts.items())}
