import pandas as pd
import pytest

from imgpipe.data import tables
from imgpipe.data.rebalancing import class_weights, copies_query


@pytest.fixture
def train():
    labels = ["a"] * 10 + ["b"] * 4 + ["c"] * 3
    # rows not in id order, and images of other splits that must not count
    rows = pd.DataFrame({"id": [f"{i:040x}" for i in range(len(labels))], "label": labels, "split": "train"})
    others = pd.DataFrame({"id": ["f" * 40, "e" * 40], "label": ["c", "c"], "split": ["val", "unused"]})
    return pd.concat([rows.iloc[::-1], others], ignore_index=True)


def copies(train, method) -> pd.DataFrame:
    with tables.connect() as con:
        con.register("split", train)
        return con.execute(copies_query(method)).df()


def per_class(train, method):
    return copies(train, method).groupby("label").copies.sum().to_dict()


def test_none_and_class_weight_use_each_training_image_once_in_id_order(train):
    for method in ("none", "class_weight"):
        out = copies(train, method)
        assert out["id"].tolist() == sorted(train.loc[train.split == "train", "id"])
        assert (out["copies"] == 1).all()


def test_oversample_brings_every_class_exactly_to_the_largest(train):
    assert per_class(train, "oversample") == {"a": 10, "b": 10, "c": 10}
    out = copies(train, "oversample")
    assert out.loc[out.label == "b", "copies"].tolist() == [3, 3, 2, 2]  # 10 = 4*2 + 2 extra, lowest ids first


def test_undersample_cuts_every_class_exactly_to_the_smallest(train):
    assert per_class(train, "undersample") == {"a": 3, "b": 3, "c": 3}
    out = copies(train, "undersample")
    assert set(out["copies"]) == {0, 1}
    assert out.loc[(out.label == "a") & (out.copies == 1), "id"].tolist() == [f"{i:040x}" for i in range(3)]


def test_an_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="rebalance.method must be one of none, oversample"):
        copies_query("smote")


def test_class_weights_are_inverse_frequency():
    w = class_weights({"b": 4, "a": 10, "c": 3})
    assert w == {"a": round(17 / 30, 6), "b": round(17 / 12, 6), "c": round(17 / 9, 6)}
    # weighted counts are equal across classes
    assert len({round(w[k] * n, 3) for k, n in {"a": 10, "b": 4, "c": 3}.items()}) == 1
