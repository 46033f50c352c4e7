"""Rebalance: how often each training image is used per epoch, to correct class imbalance.

Only the train split is touched; val and test keep their true distribution.

- `none`: every image once.
- `oversample`: every class is brought up to the largest class: each image is used
  `target // n` times and the first `target % n` images (by id) once more, so counts are exact.
- `undersample`: every class is cut to the smallest class: the first `target` images by id.
- `class_weight`: every image once; the loss is weighted by `total / (classes * n_class)`.

Output folder `paths.rebalance`: `copies.csv` (id, label, copies) read by `train`, and
`plan.json` (method, counts before and after, class weights) for people and `dvc diff`.
Only metadata is read: no pixels, and shards are not rewritten.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pandas as pd

from imgpipe.core.atomic_write import atomic_dir, write_json
from imgpipe.core.errors import StageError
from imgpipe.core.params import Paths, Rebalance
from imgpipe.core.runner import stage_main
from imgpipe.data.rebalancing import class_weights, copies

# the params sections `run` takes, in order (imgpipe/core/runner.py)
SECTIONS = ("rebalance", "paths")
log = logging.getLogger(__name__)


def run(p: Rebalance, paths: Paths) -> None:
    method = p.method
    try:
        frame = pd.read_csv(paths.split, dtype=str, keep_default_na=False, usecols=["id", "label", "split"])
    except FileNotFoundError:
        raise StageError(f"{paths.split} not found; run the split stage first") from None
    train = frame[frame["split"] == "train"].sort_values("id").reset_index(drop=True)
    if train.empty:
        raise StageError(f"{paths.split} has no training images")
    train["copies"] = copies(train, method)
    before = train["label"].value_counts().sort_index()
    after = train.groupby("label")["copies"].sum().sort_index()
    with atomic_dir(paths.rebalance) as out:
        train[["id", "label", "copies"]].to_csv(Path(out) / "copies.csv", index=False, lineterminator="\n")
        write_json(Path(out) / "plan.json", {
            "method": method,
            "counts_before": {k: int(v) for k, v in before.items()},
            "counts_after": {k: int(v) for k, v in after.items()},
            "class_weight": class_weights(train) if method == "class_weight" else None,
        })
    log.info("%s: %d training images per epoch (was %d)", method, int(after.sum()), int(before.sum()))


def main(argv=None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
