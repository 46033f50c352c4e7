"""Split: assign every accepted image to train, val or test, deterministically.

`hash`: the bucket is the last byte of the image's sha1 (0-255), and `split.test_buckets` /
`split.val_buckets` say which buckets go where. The bucket depends on the image's bytes alone,
so adding or removing other images never moves it.

`source`: the split the source came with (IDX train/t10k, train/ val/ test/ folders), so results
compare with published figures. Validation is carved from the source's train split by hash when
the source has no validation split.

Balancing (`split.balance`): in a split chosen by hash, each class keeps as many images as the
smallest class has there (lowest ids first) and the surplus goes to train, so per-class metrics
on val/test are not skewed by class sizes. A split the source gave is never changed.
Balancing is the one thing that can move an image, and only between its hash split and train:
when a small class grows, more images of the other classes stay in val/test.

`split.max_train_per_class` / `max_val_per_class` cap a split (lowest ids first); the surplus
is kept in the output as split `unused`, so every image is still accounted for.

Near-duplicates (validate's `group` column: a group is named by its smallest id) stay in one
split, or a near-copy of a test image would be trained on. The bucket is that of the group's
name, so a whole group falls in the same split, and an image without near-duplicates (its
own group) keeps the bucket of its own id, as before. Balancing and caps count images, so
their cut can fall inside a group: the whole group then follows its smallest id, and those
counts are exact up to the size of one group. With `source`, a split the source gave is never
changed, so a group is only kept together within each source split (validate reports groups
that cross the source's split).

Output: `paths.split`, the accepted manifest plus `bucket` and `split` columns.
"""

from __future__ import annotations

import logging
import sys

import pandas as pd

from imgpipe.core.atomic_write import write_csv
from imgpipe.core.errors import StageError
from imgpipe.core.params import Paths, Split
from imgpipe.core.runner import stage_main
from imgpipe.data.splitting import assign

# the params sections `run` takes, in order (imgpipe/core/runner.py)
SECTIONS = ("split", "paths")
log = logging.getLogger(__name__)


def run(p: Split, paths: Paths) -> None:
    try:
        frame = pd.read_csv(paths.accepted, keep_default_na=False,
                            dtype={"id": str, "label": str, "path": str, "source_split": str, "group": str})
    except FileNotFoundError:
        raise StageError(f"{paths.accepted} not found; run the validate stage first") from None
    if frame.empty:
        raise StageError(f"{paths.accepted} lists no accepted images")
    out = assign(frame, p)
    write_csv(paths.split, out)
    table = out.groupby(["split", "label"]).size().unstack(fill_value=0)
    log.info("images per split and class:\n%s", table.to_string())


def main(argv=None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
