"""The whole training recipe in one real train run (MNIST 0, 1 and 7, the small CNN learnt from
scratch): mixup, cutmix, RandAugment, label smoothing, AdamW, cosine with warm-up, weight EMA."""

import json
import math
from pathlib import Path

import keras
import pandas as pd
import pytest

from stages import train
from tests.model.test_train_evaluate import make_params, shard_data

pytestmark = pytest.mark.slow

PER_CLASS = {"train": 40, "val": 10, "test": 0}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shard_data(tmp_path_factory, PER_CLASS)


def test_every_recipe_element_at_once_trains_logs_the_schedule_and_saves_a_plain_model(data, tmp_path):
    folder, _ = data
    recipe = {"backbone": "auto", "weights": "none", "epochs": 4, "batch_size": 16, "learning_rate": 0.004,
              "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "randaugment_ops": 2, "randaugment_magnitude": 0.3,
              "label_smoothing": 0.1, "optimizer": "adamw", "weight_decay": 0.05, "lr_schedule": "cosine",
              "warmup_epochs": 1.0, "ema_momentum": 0.9}
    params = make_params(folder / "shards", tmp_path, rebalance=folder / "rebalance", **recipe)
    train.run(params.train, params.paths, params.base, params.runtime)
    log = pd.read_csv(params.paths.train_log)
    assert log["phase"].tolist() == ["scratch"] * 4
    # logged at each epoch's end: the peak after the warm-up epoch, then the cosine, 0 at the last step
    steps = -(-3 * PER_CLASS["train"] // 16)
    expected = [0.004 * 0.5 * (1 + math.cos(math.pi * k * steps / (3 * steps))) for k in range(4)]
    assert log["learning_rate"].tolist() == pytest.approx(expected, abs=1e-7)
    model = keras.saving.load_model(Path(params.paths.model), safe_mode=True)  # no recipe layer in it
    assert model.name == "cnn_classifier" and model.input_shape == (None, 28, 28, 1)
    assert not any(layer.name == "augment" for layer in model.layers)
    meta = json.loads((folder / "shards" / "meta.json").read_text())
    assert model.output_shape == (None, len(meta["classes"]))
