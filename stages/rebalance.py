"""rebalance: how often each training image of the split table (`paths.split`) is used per epoch
(the methods: imgpipe/data/rebalancing.py).

Output folder `paths.rebalance`: `copies.csv` (id, label, copies) read by `train`, and
`plan.json` (method, counts before and after, class weights) for people and `dvc diff`.
Only metadata is read: no pixels, and shards are not rewritten.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from imgpipe.core.atomic_write import atomic_dir, write_json
from imgpipe.core.errors import StageError
from imgpipe.core.params import Paths, Rebalance
from imgpipe.core.runner import stage_main
from imgpipe.data.manifest import read_split
from imgpipe.data.rebalancing import class_weights, copies

# the params sections `run` takes, in order (imgpipe/core/runner.py)
SECTIONS = ("rebalance", "paths")
log = logging.getLogger(__name__)


def run(p: Rebalance, paths: Paths) -> None:
    method = p.method
    frame = read_split(paths.split, ["id", "label", "split"])
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
