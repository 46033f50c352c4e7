"""Split: assign every accepted image to train, val or test, once, and never move it.

Two columns, so that nothing has to move. `assigned` is an image's split, decided the first time
the image is seen and kept for as long as the split state remembers it (see "The state").
`split` is what the downstream stages use: train, val, test or unused, and it is always either
`assigned` or `unused`. `reason` says why an image is unused. So an image assigned to val or
test is never trained on, and one assigned to train is never evaluated.

How a new image is assigned:

- `hash`: by the bucket (the last byte of the sha1, 0-255) of its near-duplicate group's name,
  which for an image without near-duplicates is its own id; `split.test_buckets` and
  `split.val_buckets` say which buckets go where. The bucket depends on the bytes alone.
- `source`: the split the source came with (IDX train/t10k, train/ val/ test/ folders), so
  results compare with published figures. A source without a validation split, or without a
  test split (train/ and val/ folders only, as in the PyTorch transfer-learning tutorial), has
  it carved from its train split by hash, with the same bucket ranges, and the log says so.
- Near-duplicates (validate's `group` column: a group is named by its smallest id) stay in one
  split, or a near-copy of a test image would be trained on: a new image whose group holds
  assigned images takes their assignment. One whose group holds images assigned to different
  splits (it links two groups) gets none: it is unused, reason `conflict`, and a new
  assignment is tried on every run. With `source`, groups are kept together only within each
  source split (validate reports groups that cross the source's split).

What is set aside (`split` unused), never moved:

- `balance` (`split.balance`): in a split chosen by hash (hash: val and test; source: a carved
  one), each class keeps as many images as the smallest class has there, first arrived first
  (see `arrival` below; on a first run, lowest ids first), so per-class metrics are not skewed by
  class sizes, and an image evaluated once stays evaluated while the data grows. A split the
  source gave is never trimmed.
- `cap` (`split.max_train_per_class` / `max_val_per_class`): a split's images beyond the cap, per
  class, first arrived first.
- `near_duplicate`: a train image in a near-duplicate group that also holds images used in val
  or test (groups merged by a new linking image, or by a larger `validate.near_duplicate_distance`
  after the images were assigned): its near-copies are evaluated, so it is not trained on.
- `source_split` (`source` only): the source now lists the image in another split than the one
  it was assigned (a file moved between folders); it is used for neither.

The state (`paths.split_state`, a persist output of the split stage: DVC versions it but never
deletes it before a run) holds `id,assigned,arrival` for every image ever assigned, under a first
line naming the split's definition (split.method, test_buckets, val_buckets) it was made with.
`arrival` is the image's place in its split's order of arrival (0, 1, 2, ...; new images of a
run take the next numbers in id order; a number is never reused), kept like `assigned`:
preprocess lays the shards out by it, so images that arrive later land in new shards and
the existing shards keep their bytes (imgpipe/model/shards.py). A state without the column (made
before it existed) numbers its images in id order.
Removed images stay in it, so an image that comes back keeps its split. When the definition
changes the state no longer applies: the stage logs that and starts afresh. To start afresh by
hand, delete the file and run `dvc repro split`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from imgpipe.core.atomic_write import atomic_path
from imgpipe.core.errors import StageError
from imgpipe.core.params import Split

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
STATE_COLUMNS = ["id", "assigned", "arrival"]
# the state's first line; the rest is a CSV of STATE_COLUMNS
STATE_HEADER = "# imgpipe split state, made with "


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


def source_assign(frame: pd.DataFrame, buckets: pd.Series, p: Split) -> tuple[pd.Series, list[str]]:
    """The source's split of each image, with the splits the source lacks carved from its train
    split by `buckets`; and the names of those carved splits."""
    given = frame["source_split"].fillna("")
    missing = frame.loc[given == "", "path"]
    if len(missing):
        raise StageError(
            f"split.method source needs the split each image came with, but {len(missing)} images have none "
            f"(e.g. {missing.iloc[0]}); use split.method: hash for this source"
        )
    unknown = frame.loc[~given.isin(SPLITS), "path"]
    if len(unknown):
        raise StageError(f"split.method source: {len(unknown)} images have a source split other than "
                         f"{', '.join(SPLITS)} (e.g. {unknown.iloc[0]}: {given[unknown.index[0]]!r})")
    out = given.astype(object).copy()
    carved = [name for name in ("val", "test") if not (given == name).any()]
    for name in carved:
        bounds = getattr(p, f"{name}_buckets")
        out[(given == "train") & _in(buckets, bounds)] = name
        log.info("the source has no %s split: %s carved from its train split by hash (split.%s_buckets %s)",
                 name, name, name, list(bounds))
    return out, carved


def definition(p: Split) -> dict:
    """What decides a new image's assignment; a state made under another definition is void."""
    return {"method": p.method, "test_buckets": list(p.test_buckets), "val_buckets": list(p.val_buckets)}


# --- the state ---------------------------------------------------------------------------------

def read_state(path: str | Path) -> tuple[dict, pd.DataFrame] | None:
    """The definition a state was made with and its `assigned` and `arrival` by id; None when
    there is no state."""
    path = Path(path)
    if not path.exists():
        return None
    reset = "delete it and run `dvc repro split` to assign every image afresh"
    with open(path, encoding="utf-8") as fh:
        first = fh.readline()
        try:
            made_with = json.loads(first[len(STATE_HEADER):]) if first.startswith(STATE_HEADER) else None
        except ValueError:
            made_with = None
        if not isinstance(made_with, dict):
            raise StageError(f"{path}: not a split state (its first line should start with {STATE_HEADER.strip()!r}); "
                             f"{reset}")
        try:
            table = pd.read_csv(fh, dtype=str, keep_default_na=False)
        except (ValueError, pd.errors.ParserError) as exc:
            raise StageError(f"{path}: not a readable split state: {exc}; {reset}") from None
    if list(table.columns) == STATE_COLUMNS[:2]:  # made before arrivals were kept
        table["arrival"] = arrivals_in_id_order(table, "assigned")
    if list(table.columns) != STATE_COLUMNS:
        raise StageError(f"{path}: a split state has columns {','.join(STATE_COLUMNS)}, this one "
                         f"{','.join(map(str, table.columns))}; {reset}")
    arrival = pd.to_numeric(table["arrival"], errors="coerce")
    bad = table[~table["assigned"].isin(SPLITS) | (table["id"] == "") | table["id"].duplicated()
                | ~(arrival >= 0) | (arrival % 1 != 0)
                | pd.DataFrame({"a": table["assigned"], "n": arrival}).duplicated()]
    if len(bad):
        row = bad.iloc[0]
        raise StageError(f"{path}: {len(bad)} rows are not one image id with train, val or test and its own arrival "
                         f"number (e.g. line {bad.index[0] + 3}: {row['id']!r},{row['assigned']!r},{row['arrival']!r}); "
                         f"{reset}")
    table["arrival"] = arrival.astype("int64")
    return made_with, table.set_index("id")


def previous_assignment(path: str | Path, p: Split) -> pd.DataFrame | None:
    """The state at `path` (`assigned` and `arrival` by id), if it was made with the split's
    current definition."""
    found = read_state(path)
    if found is None:
        log.info("no split state at %s: every image is assigned afresh", path)
        return None
    made_with, assigned = found
    if made_with != definition(p):
        log.warning("%s was made with split %s, the split is now defined as %s: the state no longer applies, "
                    "every image is assigned afresh (images may change split)", path,
                    json.dumps(made_with, sort_keys=True), json.dumps(definition(p), sort_keys=True))
        return None
    return assigned


def next_state(previous: pd.DataFrame | None, out: pd.DataFrame) -> pd.DataFrame:
    """The previous state plus the images `assign` assigned this time, by id (removed images stay)."""
    new = out.loc[out["assigned"].isin(SPLITS), STATE_COLUMNS].set_index("id")
    new["arrival"] = new["arrival"].astype("int64")
    if previous is not None:
        new = pd.concat([previous, new[~new.index.isin(previous.index)]])
    return new.sort_index()


def write_state(path: str | Path, state: pd.DataFrame, p: Split) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(STATE_HEADER + json.dumps(definition(p), sort_keys=True) + "\n")
        state[STATE_COLUMNS[1:]].rename_axis("id").reset_index().to_csv(fh, index=False, lineterminator="\n")


def arrivals_in_id_order(table: pd.DataFrame, split_column: str) -> pd.Series:
    """Arrival numbers for a table that has none (a state or split table made before they were
    kept, or by hand): each split's images numbered in id order, as a first run numbers them."""
    return table.groupby(split_column)["id"].rank(method="first").astype("int64") - 1


def arrivals(out: pd.DataFrame, previous: pd.DataFrame | None) -> pd.Series:
    """Each assigned image's arrival number: the state's, or for a new image the next free
    numbers of its split, in id order; missing (NA) where `assigned` is empty."""
    arrival = pd.Series(pd.NA, index=out.index, dtype="Int64")
    if previous is not None:
        arrival[:] = out["id"].map(previous["arrival"]).astype("Int64")
    for name in SPLITS:
        new = (out["assigned"] == name) & arrival.isna()
        if not new.any():
            continue
        taken = previous.loc[previous["assigned"] == name, "arrival"] if previous is not None else ()
        start = int(taken.max()) + 1 if len(taken) else 0
        arrival[new] = start + out.loc[new, "id"].rank(method="first").astype("int64") - 1
    return arrival


# --- the assignment ----------------------------------------------------------------------------

def inherit(prior: pd.Series, wanted: pd.Series, keys: pd.Series) -> pd.Series:
    """Each image's assignment: its prior one; else that of the assigned images sharing its key
    (near-duplicate group), "" if they disagree; else the one `wanted`."""
    known = pd.DataFrame({"key": keys, "prior": prior})[prior.notna()]
    by_key = known.groupby("key")["prior"]
    distinct = by_key.nunique()
    agreed = by_key.first()[distinct == 1]
    assigned = prior.copy().astype(object)
    new = prior.isna()
    assigned[new] = keys[new].map(agreed)
    assigned[new & keys.isin(distinct.index[distinct > 1])] = ""
    fresh = new & assigned.isna()
    assigned[fresh] = wanted[fresh]
    return assigned


def keep_first(frame: pd.DataFrame, mask: pd.Series, per_class: int) -> pd.Series:
    """Of the rows in `mask`, which are among the first `per_class` of their class to arrive (by
    arrival number, which is id order within a run): images in use stay in use as the data grows,
    and new ones wait for room."""
    rows = frame.loc[mask].sort_values(["arrival", "id"])
    rank = rows.groupby("label").cumcount()
    keep = pd.Series(False, index=frame.index)
    keep[rank.index] = rank < per_class
    return keep


def set_aside(out: pd.DataFrame, rows: pd.Series, reason: str, what: str) -> None:
    rows = rows & (out["split"] != "unused")
    out.loc[rows, "split"] = "unused"
    out.loc[rows, "reason"] = reason
    if rows.any():
        log.info("%d images set aside (split unused, reason %s): %s", int(rows.sum()), reason, what)


def balance(out: pd.DataFrame, name: str, classes: list[str]) -> None:
    """Trim split `name` to the same count per class; the surplus is set aside."""
    mask = out["split"] == name
    counts = out.loc[mask, "label"].value_counts().reindex(classes, fill_value=0)
    if not len(counts) or counts.min() == 0:
        log.warning("not balancing %s: classes %s have no image there", name, counts[counts == 0].index.tolist())
        return
    set_aside(out, mask & ~keep_first(out, mask, int(counts.min())), "balance",
              f"{name} balanced to {int(counts.min())} images per class")


def cap(out: pd.DataFrame, name: str, limit: int) -> None:
    if limit > 0:
        mask = out["split"] == name
        set_aside(out, mask & ~keep_first(out, mask, limit), "cap", f"{name} capped at {limit} images per class")


def assign(frame: pd.DataFrame, p: Split, previous: pd.DataFrame | None = None) -> pd.DataFrame:
    """The accepted manifest with `bucket` (of the image's own id), `assigned`, `arrival`, `split`
    and `reason` columns, given the `previous` state by id (None: no state): the pure core of the
    stage."""
    out = frame.reset_index(drop=True)
    # an accepted list without groups (written by hand, say) splits image by image
    group = out["group"] if "group" in out.columns else out["id"]
    out["bucket"] = out["id"].map(bucket)
    group_bucket = group.map(bucket)
    if p.method == "hash":
        wanted, carved, keys = hash_assign(group_bucket, p), ["val", "test"], group
    else:
        wanted, carved = source_assign(out, group_bucket, p)
        keys = group + "/" + out["source_split"]
    prior = out["id"].map(previous["assigned"]) if previous is not None else pd.Series(pd.NA, index=out.index, dtype=object)
    out["assigned"] = inherit(prior, wanted, keys)
    out["arrival"] = arrivals(out, previous)
    out["split"] = out["assigned"]
    out["reason"] = ""

    conflict = out["assigned"] == ""
    set_aside(out, conflict, "conflict", "new near-duplicates of images already in different splits")
    mixed = (pd.DataFrame({"key": keys, "a": out["assigned"]})[~conflict].groupby("key")["a"].nunique() > 1).sum()
    if mixed:
        log.warning("%d near-duplicate groups hold images assigned to different splits (a new image links them, or "
                    "validate.near_duplicate_distance grew since they were assigned); they keep their splits", mixed)
    if p.method == "source":
        given = out["source_split"]
        agrees = (out["assigned"] == given) | ((given == "train") & out["assigned"].isin(carved))
        set_aside(out, ~agrees, "source_split", "the source now lists them in another split than they were assigned")

    classes = sorted(out["label"].unique())
    if p.balance:
        for name in carved:
            balance(out, name, classes)
    cap(out, "val", p.max_val_per_class)
    # Before the train cap, so that it counts only the images that can be trained on.
    evaluated = keys[out["split"].isin(["val", "test"])].unique()
    set_aside(out, (out["split"] == "train") & keys.isin(evaluated), "near_duplicate",
              "training images whose near-duplicates are in val or test")
    cap(out, "train", p.max_train_per_class)
    return out


def check_splits(out: pd.DataFrame) -> None:
    """A StageError, before any training, when no image is left to train on or to test on."""
    counts = out["split"].value_counts()
    for name, what in (("train", "to train on"), ("test", "to test on")):
        if not counts.get(name, 0):
            split_counts = ", ".join(f"{s} {int(counts.get(s, 0))}" for s in (*SPLITS, "unused"))
            reasons = out.loc[out["split"] == "unused", "reason"].value_counts()
            why = f" (unused: {', '.join(f'{r} {n}' for r, n in reasons.items())})" if len(reasons) else ""
            raise StageError(f"no image is left {what}: of {len(out)} accepted images, {split_counts}{why}; "
                             f"see the split params (split.method, split.test_buckets) and the source's folders")
