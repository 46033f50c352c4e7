import hashlib

import pandas as pd
import pytest

from stages.cli import StageError
from stages.params import Split
from stages.split import assign, bucket


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
