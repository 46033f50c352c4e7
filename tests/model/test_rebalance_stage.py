"""The rebalance stage, each method, on a real split table of MNIST 3s and 5s (13 training 3s,
5 training 5s) after the real preprocess stage wrote its shards; then what train reads of it:
copies.csv through the training stream over those shards, plan.json's class weights as Keras
gets them. (The pure functions: tests/unit/data/test_rebalancing.py; class weights changing what
a model learns: tests/model/test_train_evaluate.py.)
"""

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from imgpipe.core.params import Rebalance
from imgpipe.core.runner import run_stage
from imgpipe.data.sources import Source
from imgpipe.model import shards, training
from stages import preprocess, rebalance

from .mnist_run import MNIST, run_params

COUNTS = {"train": {"3": 13, "5": 5}, "val": {"3": 2, "5": 2}, "test": {"3": 3, "5": 3}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(params, split frame) of a real split.csv and the shards preprocess wrote from it."""
    root = tmp_path_factory.mktemp("rebalance")
    rows = []
    with Source(MNIST, "idx") as source:
        paths = {}
        for record in source.records():
            paths.setdefault(record.label, []).append(record.path)
        for digit in ("3", "5"):
            digit_paths = iter(paths[digit])
            for split, per_class in COUNTS.items():
                for _ in range(per_class[digit]):
                    path = next(digit_paths)
                    rows.append({"id": hashlib.sha1(source.read_bytes(path)).hexdigest(), "label": digit,
                                 "path": path, "format": "idx", "split": split})
    frame = pd.DataFrame(rows)
    frame.to_csv(root / "split.csv", index=False)
    params = run_params(root)
    run_stage(preprocess, params)
    return params, frame


def rebalanced(params, method: str):
    params = dataclasses.replace(params, rebalance=Rebalance(method=method))
    run_stage(rebalance, params)
    folder = Path(params.paths.rebalance)
    return (pd.read_csv(folder / "copies.csv", dtype={"id": str, "label": str}),
            json.loads((folder / "plan.json").read_text()), folder)


def ranks(train: pd.DataFrame) -> pd.Series:
    """Each training image's place within its class, by id (the order the methods go by)."""
    return train.sort_values("id").groupby("label").cumcount()


# per method: copies of the k-th image by id of each class, and plan.json's counts after and weights
EXPECTED = {
    "none": (lambda label, k: 1, {"3": 13, "5": 5}, None),
    # 13 = 5 * 2 + 3: every 5 twice, the first three by id once more
    "oversample": (lambda label, k: 1 if label == "3" else 2 + (k < 3), {"3": 13, "5": 13}, None),
    # the first five 3s by id, every 5
    "undersample": (lambda label, k: int(label == "5" or k < 5), {"3": 5, "5": 5}, None),
    # every image once; weights 18 / (2 * 13) and 18 / (2 * 5)
    "class_weight": (lambda label, k: 1, {"3": 13, "5": 5}, {"3": 0.692308, "5": 1.8}),
}


@pytest.mark.parametrize("method", list(EXPECTED))
def test_rebalance_stage_on_a_real_split_feeds_train_the_planned_epoch(data, method):
    params, split = data
    train = split[split["split"] == "train"]
    copies_of, after, weights = EXPECTED[method]

    copies, plan, folder = rebalanced(params, method)

    # copies.csv: every training image (no val or test one), in id order, with its copies
    assert copies["id"].tolist() == sorted(train["id"])
    expected = train.assign(k=ranks(train)).sort_values("id")
    assert copies["label"].tolist() == expected["label"].tolist()
    assert copies["copies"].tolist() == [copies_of(label, k) for label, k in zip(expected["label"], expected["k"])]
    assert plan == {"method": method, "counts_before": {"3": 13, "5": 5}, "counts_after": after, "class_weight": weights}

    # what train reads: the stream over the real shards uses each image its copies times ...
    meta = shards.read_meta(Path(params.paths.shards))
    assert meta["classes"] == ["3", "5"] and meta["counts"]["train"] == 18
    plan_read, copies_read = training.read_rebalance(folder, meta["counts"]["train"])
    assert copies_read == dict(zip(copies["id"], copies["copies"]))
    ds = training.training_dataset(Path(params.paths.shards), meta, copies_read, params.train, seed=0)
    labels = np.concatenate([batch for _, batch in ds.as_numpy_iterator()])
    assert np.bincount(labels, minlength=2).tolist() == [after["3"], after["5"]]
    # ... and the loss is weighed by the plan's class weights, by label index, only for class_weight
    by_index = training.class_weight_by_index(plan_read, meta["classes"])
    assert by_index == (None if weights is None else {0: 0.692308, 1: 1.8})
