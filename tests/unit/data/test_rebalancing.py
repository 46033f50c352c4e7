import pandas as pd
import pytest

from imgpipe.data.rebalancing import class_weights, copies


@pytest.fixture
def train():
    labels = ["a"] * 10 + ["b"] * 4 + ["c"] * 3
    return pd.DataFrame({"id": [f"{i:040x}" for i in range(len(labels))], "label": labels})


def per_class(train, method):
    return train.assign(c=copies(train, method)).groupby("label").c.sum().to_dict()


def test_none_and_class_weight_use_each_image_once(train):
    assert (copies(train, "none") == 1).all() and (copies(train, "class_weight") == 1).all()


def test_oversample_brings_every_class_exactly_to_the_largest(train):
    assert per_class(train, "oversample") == {"a": 10, "b": 10, "c": 10}
    c = copies(train, "oversample")
    assert c[train.label == "b"].tolist() == [3, 3, 2, 2]  # 10 = 4*2 + 2 extra, lowest ids first


def test_undersample_cuts_every_class_exactly_to_the_smallest(train):
    assert per_class(train, "undersample") == {"a": 3, "b": 3, "c": 3}
    assert set(copies(train, "undersample")) == {0, 1}


def test_class_weights_are_inverse_frequency(train):
    w = class_weights(train)
    assert w == {"a": round(17 / 30, 6), "b": round(17 / 12, 6), "c": round(17 / 9, 6)}
    # weighted counts are equal across classes
    assert len({round(w[k] * n, 3) for k, n in {"a": 10, "b": 4, "c": 3}.items()}) == 1
