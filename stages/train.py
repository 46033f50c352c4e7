"""Train: a frozen ImageNet backbone with a softmax head, on the preprocessed shards.

Reads  <paths.shards>/ (meta.json + TFRecords) and <paths.rebalance>/plan.json + copies.csv.
Writes <paths.model> (a .keras file) and <paths.reports>/train_log.csv (one row per epoch).

The training split streams from the shards through tf.data, so memory stays flat however large
the data set is; the rebalance plan is applied in the same stream (copies per image, or class
weights in the loss), never by writing a rebalanced copy of the data.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import keras
import tensorflow as tf

from stages import shards
from stages.atomic import atomic_path
from stages.cli import StageError, stage_main
from stages.model import build_model
from stages.params import Params, Train

log = logging.getLogger(__name__)

TRAIN_LOG = "train_log.csv"


def class_weight_by_index(plan: dict, classes: list[str]) -> dict[int, float] | None:
    """The plan's {class name: weight} as the {label index: weight} Keras wants, or None without class weights.

    A class the plan does not weigh (it had no training images) keeps weight 1.
    """
    if plan.get("method") != "class_weight":
        return None
    weights = plan.get("class_weight")
    if not weights:
        raise StageError("rebalance plan.json: method is class_weight but it holds no class_weight")
    unknown = sorted(set(weights) - set(classes))
    if unknown:
        raise StageError(f"rebalance plan.json weighs classes the shards do not have: {', '.join(unknown)}; re-run rebalance")
    return {index: float(weights.get(name, 1.0)) for index, name in enumerate(classes)}


def read_rebalance(folder: Path, num_train: int) -> tuple[dict, dict[str, int]]:
    """plan.json and copies.csv ({image id: copies per epoch}) of the rebalance stage."""
    plan_path, copies_path = folder / "plan.json", folder / "copies.csv"
    for path in (plan_path, copies_path):
        if not path.is_file():
            raise StageError(f"{path}: not found; run the rebalance stage first")
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    with copies_path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"id", "copies"} <= set(rows[0]):
        raise StageError(f"{copies_path}: needs the columns id and copies")
    copies = {}
    for line, row in enumerate(rows, start=2):
        if not (row["copies"] or "").isdigit():
            raise StageError(f"{copies_path}, line {line}: copies must be a whole number >= 0, got {row['copies']!r}")
        copies[row["id"]] = int(row["copies"])
    # Both stages list the same training images; a mismatch means one of them is stale.
    if len(copies) != num_train:
        raise StageError(
            f"{copies_path} lists {len(copies)} training images but the shards hold {num_train}; "
            "re-run preprocess and rebalance (dvc repro)"
        )
    return plan, copies


def training_dataset(folder: Path, meta: dict, copies: dict[str, int], train: Train, seed: int) -> tf.data.Dataset:
    """Batches of (image, label) for one epoch: each image `copies` times, shuffled."""
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(list(copies), tf.string), tf.constant(list(copies.values()), tf.int64)
        ),
        # an image copies.csv does not list is dropped, and then caught by the length check below
        default_value=tf.constant(0, tf.int64),
    )
    ds = shards.dataset(folder, "train", meta)
    ds = ds.filter(lambda rec: table.lookup(rec["id"]) > 0)
    ds = ds.flat_map(lambda rec: tf.data.Dataset.from_tensors(rec).repeat(table.lookup(rec["id"])))
    # Filtering makes the length unknown to tf.data; stating it lets Keras count the steps of
    # an epoch, and the epoch fails loudly if the shards and copies.csv disagree about the images.
    ds = ds.apply(tf.data.experimental.assert_cardinality(sum(copies.values())))
    # A new order every epoch, the same sequence of orders in every run with this seed. Copies
    # of one image arrive together, so the buffer also spreads them apart.
    ds = ds.shuffle(train.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return _batches(ds, train.batch_size)


def validation_dataset(folder: Path, meta: dict, batch_size: int) -> tf.data.Dataset:
    ds = shards.dataset(folder, "val", meta)
    return _batches(ds.apply(tf.data.experimental.assert_cardinality(meta["counts"]["val"])), batch_size)


def _batches(ds: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    ds = ds.map(lambda rec: (rec["image"], rec["label"]), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


class EpochLog(keras.callbacks.Callback):
    """One log line per epoch (Keras' own progress bars are noise in a DVC or Prefect log)."""

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        figures = ", ".join(f"{name} {value:.4f}" for name, value in sorted((logs or {}).items()))
        seconds = time.perf_counter() - self._start
        log.info("epoch %d/%d: %s (%.1f s)", epoch + 1, self.params["epochs"], figures, seconds)


def save_model(model: keras.Model, path: Path) -> None:
    """Save as .keras atomically: into a temporary folder next to `path`, then rename.

    (stages.atomic.atomic_path names its temporary file *.tmp, and Keras saves only to *.keras.)
    """
    if path.suffix != ".keras":
        raise StageError(f"paths.model must end with .keras, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        model.save(Path(tmp) / path.name)
        os.replace(Path(tmp) / path.name, path)


def run(params: Params) -> None:
    folder = Path(params.paths.shards)
    try:
        meta = shards.read_meta(folder)
    except FileNotFoundError as exc:
        raise StageError(str(exc)) from None
    counts = meta["counts"]
    if not counts.get("train"):
        raise StageError(f"{folder}: the shards hold no training images")
    plan, copies = read_rebalance(Path(params.paths.rebalance), counts["train"])
    class_weight = class_weight_by_index(plan, meta["classes"])

    keras.utils.set_random_seed(params.base.seed)  # Python, NumPy and TensorFlow: initial weights, dropout
    train = params.train
    model = build_model(
        len(meta["classes"]), (meta["height"], meta["width"], meta["channels"]), train, meta["normalization"]
    )
    train_ds = training_dataset(folder, meta, copies, train, params.base.seed)
    # Tiny data sets may have no validation split: then train without validation.
    val_ds = validation_dataset(folder, meta, train.batch_size) if counts.get("val") else None
    per_epoch = sum(copies.values())
    if per_epoch == 0:
        raise StageError(f"{params.paths.rebalance}/copies.csv gives every training image 0 copies")
    log.info(
        "training %s (frozen, %s weights) + head on %d images per epoch (rebalance: %s), %d steps of %d; %d validation images",
        train.backbone, train.weights, per_epoch, plan.get("method"), -(-per_epoch // train.batch_size),
        train.batch_size, counts.get("val", 0),
    )

    # CSVLogger writes each epoch's row as it ends; it writes into a temporary file that
    # replaces train_log.csv only once the model is saved, so a killed run leaves no half log.
    with atomic_path(Path(params.paths.reports) / TRAIN_LOG) as log_tmp:
        model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=train.epochs,
            class_weight=class_weight,
            callbacks=[keras.callbacks.CSVLogger(str(log_tmp)), EpochLog()],
            shuffle=False,  # the dataset shuffles itself (seeded); Keras cannot shuffle a stream
            verbose=0,
        )
        save_model(model, Path(params.paths.model))
    log.info("saved %s", params.paths.model)


def main(argv: list[str] | None = None) -> int:
    return stage_main("train", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
