import hashlib

import pandas as pd
import pytest

from imgpipe.core.errors import StageError
from imgpipe.core.params import Split
from imgpipe.data.splitting import assign, bucket


def frame(n_per_class: dict[str, int], salt: str = "") -> pd.DataFrame:
    rows = []
    for label, n in n_per_class.items():
        for i in range(n):
            image_id = hashlib.sha1(f"{salt}{label}{i}".encode()).hexdigest()
            rows.append({"id": image_id, "label": label, "path": f"{label}/{salt}{i}.png", "source_split": ""})
    return pd.DataFrame(rows)


def test_bucket_is_last_byte():
    assert bucket("ab" * 19 + "ff") == 255 and bucket("00" * 20) == 0


def test_hash_split_follows_bucket_ranges():
    p = Split(method="hash", test_buckets=(0, 63), val_buckets=(64, 127), balance=False)
    out = assign(frame({"a": 300, "b": 300}), p)
    assert (out.loc[out.bucket <= 63, "split"] == "test").all()
    assert (out.loc[out.bucket.between(64, 127), "split"] == "val").all()
    assert (out.loc[out.bucket >= 128, "split"] == "train").all()
    # a quarter of the buckets each: roughly a quarter of the images
    assert 0.18 < (out.split == "test").mean() < 0.32


def test_adding_images_never_moves_an_existing_one():
    p = Split(method="hash", balance=False)
    before = assign(frame({"a": 200, "b": 50}), p).set_index("id")["split"]
    grown = pd.concat([frame({"a": 200, "b": 50}), frame({"a": 120, "b": 300, "c": 80}, salt="new")])
    after = assign(grown, p).set_index("id")["split"]
    assert (after.loc[before.index] == before).all()


def test_balanced_splits_have_equal_class_counts_and_surplus_goes_to_train():
    p = Split(method="hash", test_buckets=(0, 50), val_buckets=(51, 101), balance=True)
    data = frame({"big": 900, "mid": 400, "small": 120})
    out = assign(data, p)
    for name in ("val", "test"):
        counts = out[out.split == name].label.value_counts()
        assert counts.nunique() == 1 and len(counts) == 3, counts
    unbalanced = assign(data, Split(method="hash", test_buckets=(0, 50), val_buckets=(51, 101), balance=False))
    moved = unbalanced.split != out.split
    # balancing only ever moves an image from its hash split into train
    assert set(out.split[moved]) == {"train"} and set(unbalanced.split[moved]) <= {"val", "test"}


def test_balancing_with_growth_never_moves_between_val_and_test():
    p = Split(method="hash", test_buckets=(0, 50), val_buckets=(51, 101), balance=True)
    before = assign(frame({"a": 300, "b": 100}), p).set_index("id")["split"]
    grown = pd.concat([frame({"a": 300, "b": 100}), frame({"b": 150}, salt="new")])
    after = assign(grown, p).set_index("id")["split"].loc[before.index]
    changed = before != after
    assert not ((before == "val") & (after == "test")).any()
    assert not ((before == "test") & (after == "val")).any()
    assert set(before[changed]) | set(after[changed]) <= {"train", "val", "test"}


def test_source_split_is_honoured_and_val_carved_from_train():
    data = frame({"a": 400, "b": 400})
    data["source_split"] = ["test" if i % 5 == 0 else "train" for i in range(len(data))]
    out = assign(data, Split(method="source", val_buckets=(26, 76), test_buckets=(0, 25)))
    assert (out.loc[data.source_split == "test", "split"] == "test").all()
    carved = out[(data.source_split == "train") & (out.split == "val")]
    assert len(carved) > 0 and carved.bucket.between(26, 76).all()
    assert not (out.loc[data.source_split == "train", "split"] == "test").any()


def test_source_split_missing_is_a_clear_error():
    with pytest.raises(StageError, match="split.method source needs the split each image came with"):
        assign(frame({"a": 10}), Split(method="source"))


def test_caps_mark_the_surplus_unused():
    out = assign(frame({"a": 500, "b": 80}), Split(method="hash", balance=False, max_train_per_class=50))
    train = out[out.split == "train"].label.value_counts()
    assert train["a"] == 50 and train["b"] == 50
    assert len(out) == 580  # nothing dropped: the surplus is `unused`
    assert (out.split == "unused").sum() == 580 - 100 - out.split.isin(["val", "test"]).sum()


# --- near-duplicate groups (validate's `group` column) stay in one split ---------------------

def with_groups(data: pd.DataFrame, size: int = 4) -> pd.DataFrame:
    """Every `size` consecutive rows of a class form a group named by its smallest id."""
    data = data.copy()
    data["group"] = data.groupby([data["label"], data.groupby("label").cumcount() // size])["id"].transform("min")
    return data


def test_a_group_shares_one_split_and_the_bucket_of_its_name():
    p = Split(method="hash", test_buckets=(0, 63), val_buckets=(64, 127), balance=False)
    out = assign(with_groups(frame({"a": 300, "b": 300})), p)
    assert (out.groupby("group")["split"].nunique() == 1).all()
    assert (out["bucket"] == out["group"].map(bucket)).all()
    assert set(out["split"]) == {"train", "val", "test"}


def test_images_without_near_duplicates_keep_their_split():
    p = Split(method="hash", balance=False)
    data = frame({"a": 200, "b": 200})
    grouped = data.copy()
    grouped["group"] = grouped["id"]
    grouped.loc[:3, "group"] = grouped.loc[:3, "id"].min()  # one group of four; the rest alone
    before, after = assign(data, p).set_index("id"), assign(grouped, p).set_index("id")
    alone = grouped.loc[4:, "id"]
    assert (after.loc[alone, "split"] == before.loc[alone, "split"]).all()
    assert (after.loc[alone, "bucket"] == before.loc[alone, "bucket"]).all()


def test_balancing_and_caps_never_split_a_group():
    data = with_groups(frame({"big": 900, "mid": 400, "small": 120}), size=3)
    p = Split(method="hash", test_buckets=(0, 50), val_buckets=(51, 101), balance=True, max_train_per_class=200,
              max_val_per_class=30)
    out = assign(data, p)
    assert (out.groupby("group")["split"].nunique() == 1).all()
    assert len(out) == len(data)  # nothing dropped
    # balance and caps hold up to one group's size (3)
    for name in ("val", "test"):
        counts = out[out.split == name].label.value_counts()
        assert counts.max() - counts.min() <= 3, counts
    assert out[out.split == "train"].label.value_counts().max() <= 200 + 3


def test_source_split_is_kept_and_groups_are_kept_together_within_it():
    data = with_groups(frame({"a": 400, "b": 400}), size=2)
    data["source_split"] = ["test" if i % 2 else "train" for i in range(len(data))]  # every group crosses
    data.loc[data.index % 10 == 0, "source_split"] = "test"  # and some lie within the test split
    out = assign(data, Split(method="source", val_buckets=(26, 76), test_buckets=(0, 25)))
    assert (out["split"][data["source_split"] == "test"] == "test").all()  # the source's split is never changed
    assert not (out["split"][data["source_split"] == "train"] == "test").any()
    per_source = out.groupby([out["group"], data["source_split"]])["split"].nunique()
    assert (per_source == 1).all()
