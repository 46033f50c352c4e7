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
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from imgpipe.core.errors import StageError
from imgpipe.core.params import Split

log = logging.getLogger(__name__)


def bucket(image_id: str) -> int:
    """The hash bucket of an image: the last byte of its sha1."""
    return int(image_id[-2:], 16)


def _in(buckets: pd.Series, bounds: tuple[int, int]) -> pd.Series:
    return buckets.between(bounds[0], bounds[1])


def hash_assign(buckets: pd.Series, p: Split) -> pd.Series:
    out = pd.Series("train", index=buckets.index, dtype=object)
    out[_in(buckets, p.val_buckets)] = "val"
    out[_in(buckets, p.test_buckets)] = "test"
    return out


def source_assign(frame: pd.DataFrame, buckets: pd.Series, p: Split) -> pd.Series:
    given = frame["source_split"].fillna("")
    missing = frame.loc[given == "", "path"]
    if len(missing):
        raise StageError(
            f"split.method source needs the split each image came with, but {len(missing)} images have none "
            f"(e.g. {missing.iloc[0]}); use split.method: hash for this source"
        )
    out = given.astype(object).copy()
    if not (given == "val").any():  # no validation split in the source: carve one from train by hash
        out[(given == "train") & _in(buckets, p.val_buckets)] = "val"
    return out


def keep_first(frame: pd.DataFrame, mask: pd.Series, per_class: int | pd.Series, order: pd.Series) -> pd.Series:
    """Of the rows in `mask`, which are among the first `per_class` of their class in `order`."""
    rank = frame.loc[order[mask].sort_values().index].groupby("label").cumcount()
    limit = per_class if np.isscalar(per_class) else frame.loc[rank.index, "label"].map(per_class)
    keep = pd.Series(False, index=frame.index)
    keep[rank.index] = rank < limit
    return keep


def balance(frame: pd.DataFrame, split: pd.Series, name: str, classes: list[str], order: pd.Series) -> pd.Series:
    """Trim split `name` to the same count per class; the surplus goes to train."""
    mask = split == name
    counts = frame.loc[mask, "label"].value_counts().reindex(classes, fill_value=0)
    smallest = int(counts.min()) if len(counts) else 0
    if smallest == 0:
        empty = counts[counts == 0].index.tolist()
        log.warning("not balancing %s: classes %s have no image there", name, empty)
        return split
    keep = keep_first(frame, mask, smallest, order)
    split = split.copy()
    split[mask & ~keep] = "train"
    return split


def cap(frame: pd.DataFrame, split: pd.Series, name: str, limit: int, order: pd.Series) -> pd.Series:
    if limit <= 0:
        return split
    mask = split == name
    keep = keep_first(frame, mask, limit, order)
    split = split.copy()
    split[mask & ~keep] = "unused"
    return split


def keep_groups_together(split: pd.Series, keys: pd.Series, order: pd.Series) -> pd.Series:
    """Every row takes the split of the first row in `order` with the same key."""
    rows = pd.DataFrame({"key": keys, "split": split}).loc[order.sort_values().index]
    return rows.groupby("key")["split"].transform("first").reindex(split.index)


def assign(frame: pd.DataFrame, p: Split) -> pd.DataFrame:
    """The accepted manifest with `bucket` and `split` columns: the pure core of the stage."""
    out = frame.reset_index(drop=True)
    # an accepted list without groups (written by hand, say) splits image by image
    group = out["group"] if "group" in out.columns else out["id"]
    out["bucket"] = group.map(bucket)
    # Balancing and caps keep images in this order: lowest ids first, as before, except that a
    # group's members come together, right after its name (its smallest id). A cut then falls
    # inside one group at most, and that group follows its first member.
    order = group + out["id"]
    classes = sorted(out["label"].unique())
    if p.method == "hash":
        split, by_hash = hash_assign(out["bucket"], p), ["val", "test"]
    else:
        split = source_assign(out, out["bucket"], p)
        by_hash = [] if (out["source_split"] == "val").any() else ["val"]
    if p.balance:
        for name in by_hash:
            split = balance(out, split, name, classes, order)
    split = cap(out, split, "train", p.max_train_per_class, order)
    split = cap(out, split, "val", p.max_val_per_class, order)
    keys = group if p.method == "hash" else group + "/" + out["source_split"]
    out["split"] = keep_groups_together(split, keys, order)
    return out

