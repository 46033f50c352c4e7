"""Training: transfer learning in two phases on the preprocessed shards, resumable after a kill.

Phase 1 trains the head on the frozen backbone (lenet, learnt from scratch, trains whole).
When nothing in it changes the backbone's features (a frozen backbone, no augmentation in
phase 1) the features come from the embedding cache (imgpipe/model/feature_cache.py): computed once per
image, then every epoch and every head-only run reads them instead of running the backbone.
Phase 2 (train.fine_tune_epochs > 0) unfreezes the top train.fine_tune_layers layers of the
backbone and trains on the images at train.fine_tune_learning_rate, with augmentation if any
(train.augment_in_phase1: false keeps it for phase 2 only, so that phase 1 can use the cache).
train.backbone auto is resolved from the shards' image shape first (imgpipe/model/backbones.py).

The recipe (imgpipe/model/builder.py, imgpipe/model/augment.py): mixup and cutmix mix the
batches of the training stream (so labels are then one-hot class probabilities, as with label
smoothing, and the loss categorical); each phase gets its own learning-rate schedule over its
own steps; with train.ema_momentum the moving average of the weights is what is validated,
checkpointed and saved.

Images stream from the shards through tf.data (files read in parallel, records shuffled in a
bounded buffer, whole batches parsed at once, prefetching), so memory stays flat however large
the data set is; the rebalance plan is applied in the same stream (copies per image, or class
weights in the loss), never by writing a rebalanced copy of the data.

A run keeps its state in <runtime.train_cache_dir>/runs/<fingerprint of its inputs>/: Keras'
BackupAndRestore backup of the current phase, the weights after phase 1, the best epoch's
weights, and the log so far. A killed run re-run with the same inputs resumes from its last
finished epoch; a finished run deletes the folder.

With train.warm_start and a model in paths.warm_start that fits (imgpipe/model/warm_start.py),
the run begins from its weights and runs only its last phase, for train.warm_start_epochs epochs.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from imgpipe.model import augment
from imgpipe.model import backbones
from imgpipe.model import cluster as clusters
from imgpipe.model import feature_cache
from imgpipe.model import shards
from imgpipe.model import warm_start
from imgpipe.core.atomic_write import atomic_path, write_json
from imgpipe.core.errors import StageError
from imgpipe.model.builder import Classifier, build, compile_for_training
from imgpipe.core.params import Paths, Runtime, Train
from imgpipe.data.parallel import Batches, available_cores

log = logging.getLogger(__name__)

TRAIN_LOG = "train_log.csv"
LOG_COLUMNS = ["epoch", "accuracy", "loss", "val_accuracy", "val_loss", "learning_rate", "phase"]


# -- inputs -----------------------------------------------------------------------------------


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


def training_dataset(folder: Path, meta: dict, copies: dict[str, int], train: Train, seed: int,
                     mix: bool = False) -> tf.data.Dataset:
    """Batches of (image, label) for one epoch: each image `copies` times, shuffled; `mix`: with
    train's mixup / cutmix applied (labels one-hot then).

    Serialized records are repeated and shuffled (float16 bytes: half the buffer memory of
    decoded images), then parsed a whole batch at a time.
    """
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(list(copies), tf.string), tf.constant(list(copies.values()), tf.int64)
        ),
        # an image copies.csv does not list is dropped, and then caught by the length check below
        default_value=tf.constant(0, tf.int64),
    )
    ids_of = shards.parse_batch(meta, ("id",))
    ds = shards.records(folder, "train", meta, train.deterministic, shuffle_seed=seed)
    ds = ds.batch(128).map(lambda batch: tf.repeat(batch, table.lookup(ids_of(batch)["id"]))).unbatch()
    # Repeating makes the length unknown to tf.data; stating it lets Keras count the steps of
    # an epoch, and the epoch fails loudly if the shards and copies.csv disagree about the images.
    ds = ds.apply(tf.data.experimental.assert_cardinality(sum(copies.values())))
    # A new order every epoch, the same sequence of orders in every run with this seed. Copies
    # of one image arrive together, so the buffer also spreads them apart.
    ds = ds.shuffle(train.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    batches = _image_batches(ds, meta, train.batch_size, train.deterministic)
    mixing = augment.batch_mixing(train, seed) if mix else None
    if mixing is None:
        return batches
    # one batch after the other: the random draws follow the batch order, the same in every run
    return with_targets(batches, train, len(meta["classes"]), force=True).map(mixing).prefetch(tf.data.AUTOTUNE)


def worker_training_dataset(folder: Path, meta: dict, copies: dict[str, int], train: Train, seed: int,
                            cluster: clusters.Cluster, mix: bool = False) -> tf.data.Dataset:
    """This worker's endless stream of batches of train.batch_size (the global batch: the strategy
    splits each between this worker's replicas and the other workers' steps take theirs from
    their own streams): its own shard files only, each image `copies` times, shuffled.

    Sharded by file here rather than by tf.data's auto-sharding (which is turned off for it):
    the files are known, and logged, before anything is read. Endless, because the workers'
    files hold different numbers of images and every worker must run the same number of steps
    (fit() is given the steps per epoch).
    """
    files = clusters.worker_files(meta["files"]["train"], cluster)
    mine = {**meta, "files": {**meta["files"], "train": files}}
    ids, _ = shards.ids_and_labels(folder, "train", mine)
    own = {i.decode(): copies[i.decode()] for i in ids if i.decode() in copies}
    if not sum(own.values()):
        raise StageError(f"{cluster.describe()}: its train shard files ({', '.join(files)}) hold no image that "
                         "copies.csv gives a copy; fewer workers, or smaller shards (preprocess.images_per_shard)")
    log.info("%s reads %d of %d train shard files, %d images (%d with their copies) of %d: %s", cluster.describe(),
             len(files), len(meta["files"]["train"]), len(ids), sum(own.values()), sum(copies.values()),
             ", ".join(files))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return training_dataset(folder, mine, own, train, seed, mix=mix).repeat().with_options(options)


def worker_validation_dataset(folder: Path, meta: dict, batch_size: int, deterministic: bool) -> tf.data.Dataset:
    """The validation batches for a multi-worker fit(): every worker reads the whole split and keeps
    its part of each batch (AutoShardPolicy.DATA), so that the metrics, summed over the workers,
    are those of the whole split, however few files it has."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return validation_dataset(folder, meta, batch_size, deterministic).with_options(options)


def with_targets(ds: tf.data.Dataset, train: Train, num_classes: int, force: bool = False) -> tf.data.Dataset:
    """(x, label) batches with the labels the loss wants: one-hot class probabilities when train's
    labels are soft (or `force`), the class indices as they are otherwise."""
    if not (train.soft_labels or force) or ds.element_spec[1].shape.rank != 1:
        return ds
    return ds.map(lambda x, label: (x, tf.one_hot(label, num_classes)))


def validation_dataset(folder: Path, meta: dict, batch_size: int, deterministic: bool = True) -> tf.data.Dataset:
    ds = shards.records(folder, "val", meta, deterministic)
    return _image_batches(ds.apply(tf.data.experimental.assert_cardinality(meta["counts"]["val"])), meta, batch_size,
                          deterministic)


def _image_batches(ds: tf.data.Dataset, meta: dict, batch_size: int, deterministic: bool) -> tf.data.Dataset:
    parse = shards.parse_batch(meta, ("image", "label"))

    def image_and_label(batch):
        ex = parse(batch)
        return ex["image"], ex["label"]

    options = tf.data.Options()
    options.deterministic = deterministic  # False: parallel steps may deliver out of order (faster)
    ds = ds.batch(batch_size).map(image_and_label, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def cached_datasets(clf: Classifier, train: Train, seed: int, paths: Paths, meta: dict, copies: dict[str, int],
                    runtime: Runtime):
    """(train, val) batches of (features, label) from the embedding cache, filling it first (on the Dask
    cluster with runtime.executor dask)."""
    folder = Path(paths.shards)
    splits = ("train", "val") if meta["counts"].get("val") else ("train",)
    ids = {split: shards.ids_and_labels(folder, split, meta) for split in splits}
    description = {
        "backbone": train.backbone, "alpha": train.alpha, "weights": train.weights, "hub_handle": train.hub_handle,
        "hub_endpoint": train.hub_endpoint, "backbone_size": train.backbone_size,
        "dtype_policy": clf.extractor.dtype_policy.name, "keras": keras.__version__,
        "preprocess": meta["preprocess"],
        "shards": {k: meta.get(k) for k in ("height", "width", "channels", "mean", "std")},
    }
    train_ids, train_labels = ids["train"]
    weights = clf.extractor.get_weights()
    every_id = np.concatenate([split_ids for split_ids, _ in ids.values()])
    on_dask = runtime.executor == "dask"
    caches = []  # one per view: the images as they are (train and val), then each flip (train only)
    with Batches("dask", runtime.workers or available_cores(), runtime.scheduler) if on_dask \
            else contextlib.nullcontext() as runner:
        for view in feature_cache.VIEWS[train.phase1_flip]:
            described = {**description, "view": list(view)} if view else description
            key = feature_cache.cache_key(weights, described)
            path = Path(runtime.train_cache_dir) / "embeddings" / f"{key}.npy"
            view_ids, view_splits = (every_id, splits) if not view else (train_ids, ("train",))
            caches.append(feature_cache.update(path, clf.extractor, folder, meta, view_splits, view_ids,
                                               train.batch_size, runner, view))
            feature_cache.describe(key, described, path)

    times = np.array([copies.get(i.decode(), 0) for i in train_ids])
    if times.sum() != sum(copies.values()):
        raise StageError(f"{paths.rebalance}/copies.csv and the shards list different training images; "
                         "re-run preprocess and rebalance (dvc repro)")
    rows = np.repeat(np.stack([cache.rows(train_ids) for cache in caches], axis=1), times, axis=0)
    train_ds = feature_cache.head_dataset(caches, rows, np.repeat(train_labels, times), train.batch_size, seed)
    val_ds = None
    if "val" in ids:
        val_ids, val_labels = ids["val"]
        val_ds = feature_cache.head_dataset(caches[0], caches[0].rows(val_ids), val_labels, train.batch_size)
    return train_ds, val_ds


# -- the run's state: resume, best epoch, log -------------------------------------------------


def run_fingerprint(train: Train, seed: int, paths: Paths) -> str:
    """sha1 of everything that makes a training run what it is.

    A killed run resumes only when this is unchanged: same params, shards, rebalance plan and code.
    """
    rebalance = Path(paths.rebalance)
    parts = {
        "train": dataclasses.asdict(train),
        "seed": seed,
        "versions": [tf.__version__, keras.__version__],
    }
    digest = hashlib.sha1(json.dumps(parts, sort_keys=True).encode())
    # the shards: their metadata and each file's size and time, not their bytes (cheap on any data set)
    digest.update(shards.stamp(paths.shards).encode())
    # the weights a warm start begins from
    record = warm_start.read_record(paths.warm_start) if train.warm_start else None
    digest.update((record["md5"] if record else "").encode())
    # the model package's code shapes a run: a resumed run must be the same program
    code = sorted(Path(__file__).parent.glob("*.py"))
    for path in [rebalance / "plan.json", rebalance / "copies.csv", *code]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class EpochLog(keras.callbacks.Callback):
    """Writes each epoch's row into the run's log, and one log line (Keras' progress bars are
    noise in a DVC or Prefect log).

    The whole file is rewritten (atomically) keeping the rows of earlier epochs only: when a
    resumed run repeats an epoch that finished but was not backed up, its row is replaced.
    """

    def __init__(self, path: Path, phase: str, last_epoch: int):
        super().__init__()
        self.path, self.phase, self.last_epoch = path, phase, last_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {"epoch": epoch, "phase": self.phase,
               "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))}
        row.update({k: float(logs[k]) for k in LOG_COLUMNS if k in logs})
        rows = [r for r in read_log(self.path) if int(r["epoch"]) < epoch] + [row]
        with atomic_path(self.path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, LOG_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        figures = ", ".join(f"{k} {logs[k]:.4f}" for k in LOG_COLUMNS if k in logs)
        log.info("epoch %d/%d (%s): %s (%.1f s)", epoch + 1, self.last_epoch, self.phase, figures,
                 time.perf_counter() - self._start)


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


class BestCheckpoint(keras.callbacks.Callback):
    """The best-model checkpoint: the weights at the epoch with the lowest `monitor` so far,
    across both phases and resumes (best.json carries the best value over a restart).

    It saves `model`, the classifier that is saved in the end, whichever model fit() trains:
    the head trained on cached features shares its weights with it.
    """

    def __init__(self, model: keras.Model, folder: Path, monitor: str):
        super().__init__()
        self.target, self.monitor = model, monitor
        self.weights, self.state = folder / "best.weights.h5", folder / "best.json"
        self.best = json.loads(self.state.read_text())["value"] if self.state.is_file() else math.inf

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not value < self.best:
            return
        self.best = float(value)
        partial = self.weights.with_name("best.partial.weights.h5")  # Keras insists on the .weights.h5 suffix
        self.target.save_weights(partial)
        os.replace(partial, self.weights)
        write_json(self.state, {"epoch": epoch, "monitor": self.monitor, "value": self.best})

    def restore(self) -> None:
        if self.state.is_file():
            self.target.load_weights(self.weights)
            best = json.loads(self.state.read_text())
            log.info("keeping epoch %d, the best (%s %.4f)", best["epoch"] + 1, best["monitor"], best["value"])


def fit_phase(model: keras.Model, data, val, epochs: tuple[int, int], phase: str, run_dir: Path, train: Train,
              best: BestCheckpoint, class_weight, steps_per_epoch: int | None = None) -> int:
    """fit() epochs [first, last) of one phase, resuming from its backup; returns the next epoch number.

    `steps_per_epoch`: for an endless `data` (multi-worker); None: one pass over `data`.
    """
    first, last = epochs
    num_classes = model.output_shape[-1]
    data = with_targets(data, train, num_classes)
    val = None if val is None else with_targets(val, train, num_classes)
    # With weight EMA, the average is in the model at the end of every epoch (Keras swaps it with
    # the raw weights): what is validated, checkpointed and backed up. First, so that the
    # callbacks after it see the average.
    callbacks = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if train.ema_momentum else []
    callbacks += [EpochLog(run_dir / TRAIN_LOG, phase, last), best]
    if train.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(best.monitor, patience=train.early_stopping_patience))
    if train.reduce_lr_patience:
        callbacks.append(keras.callbacks.ReduceLROnPlateau(best.monitor, factor=train.reduce_lr_factor,
                                                           patience=train.reduce_lr_patience))
    # last, so that its backup (weights, optimizer, epoch) is taken after the epoch's row is logged
    callbacks.append(keras.callbacks.BackupAndRestore(run_dir / f"{phase}-backup", double_checkpoint=True))
    # BackupAndRestore tells fit() where to resume through the model's _initial_epoch, which
    # nothing resets afterwards: clear what restoring an earlier phase left there.
    model._initial_epoch = None
    # shuffle=False: the datasets shuffle themselves (seeded)
    history = model.fit(data, validation_data=val, epochs=last, initial_epoch=first, class_weight=class_weight,
                        steps_per_epoch=steps_per_epoch, callbacks=callbacks, shuffle=False, verbose=0)
    return history.epoch[-1] + 1 if history.epoch else last


# -- hardware -------------------------------------------------------------------------------


def distribution_strategy(cluster: clusters.Cluster | None = None) -> tf.distribute.Strategy:
    """The cluster's MultiWorkerMirroredStrategy (imgpipe/model/cluster.py) when there is one;
    else MirroredStrategy over several GPUs (each batch split between them); else the default (one device)."""
    if cluster is not None:
        return cluster.strategy
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


@contextlib.contextmanager
def precision(mixed: bool):
    """Layers built inside compute in float16 with float32 weights when `mixed` and a GPU is there."""
    if mixed and not tf.config.list_physical_devices("GPU"):
        log.info("train.mixed_precision: no GPU, so float32 (float16 on a CPU is slower, not faster)")
        mixed = False
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16" if mixed else "float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


# -- the stage ------------------------------------------------------------------------------


def save_model(model: keras.Model, path: Path) -> None:
    """Save as .keras atomically: into a temporary folder next to `path`, then rename.

    (imgpipe.core.atomic_write.atomic_path names its temporary file *.tmp, and Keras saves only to *.keras.)
    """
    if path.suffix != ".keras":
        raise StageError(f"paths.model must end with .keras, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        model.save(Path(tmp) / path.name)
        os.replace(Path(tmp) / path.name, path)


@contextlib.contextmanager
def exclusive(run_dir: Path):
    """Hold a lock on the run's folder: two runs with the same inputs would overwrite each other's state.

    The kernel releases the lock when the process dies, however it dies, so a killed run never
    blocks its own resumption.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageError(f"another train run with the same inputs is running (its state: {run_dir})") from None
        yield


def train_phases(train: Train, seed: int, paths: Paths, meta: dict, plan: dict, copies: dict[str, int], run_dir: Path,
                 runtime: Runtime, cluster: clusters.Cluster | None = None) -> Classifier:
    """Phase 1, then phase 2 if asked for, resuming what a killed run left; the classifier to save.

    With a `cluster`, this is one of its workers: it trains on its own shard files, in step with
    the others (every worker must call this, with the same params).
    """
    folder, counts = Path(paths.shards), meta["counts"]
    class_weight = class_weight_by_index(plan, meta["classes"])
    has_val = bool(counts.get("val"))

    train = backbones.resolve(train, (meta["height"], meta["width"], meta["channels"]))

    def image_data(augmented: bool):
        if cluster is not None:
            val = worker_validation_dataset(folder, meta, train.batch_size, train.deterministic) if has_val else None
            return worker_training_dataset(folder, meta, copies, train, seed, cluster, mix=augmented), val
        val = validation_dataset(folder, meta, train.batch_size, train.deterministic) if has_val else None
        return training_dataset(folder, meta, copies, train, seed, mix=augmented), val

    strategy = distribution_strategy(cluster)
    with strategy.scope():
        with precision(train.mixed_precision):
            clf = build(len(meta["classes"]), (meta["height"], meta["width"], meta["channels"]), train,
                        meta["preprocess"]["normalization"], seed)
        # a warm start runs only the last phase, for fewer epochs (imgpipe/model/warm_start.py)
        head_epochs, tune_epochs = train.epochs, train.fine_tune_epochs
        warm = warm_start.load_into(clf.model, paths.warm_start, meta["classes"]) if train.warm_start else None
        schedule = train
        if warm is not None:
            head_epochs, tune_epochs = (0, train.warm_start_epochs) if tune_epochs else (train.warm_start_epochs, 0)
            # no warm-up from a trained model: it only spends the few epochs at a low rate (on
            # flowers x5, 2 epochs: 65.4% test accuracy without, 64.7% with; bench/RESULTS.md)
            schedule = dataclasses.replace(train, warmup_epochs=0.0)
            log.info("warm start from %s (md5 %s, blessed %s): %s only, %d epochs", Path(paths.warm_start),
                     warm["md5"], warm.get("blessed_at"), "fine-tuning" if tune_epochs else "phase 1",
                     train.warm_start_epochs)
        best = BestCheckpoint(clf.model, run_dir, "val_loss" if has_val else "loss")
        # phase 1 on cached features: a frozen backbone, and no augmentation there but flips
        cached = train.embedding_cache and train.pretrained and train.phase1_flip is not None
        if cached and cluster is not None:
            # Every worker would compute the features of every image and write the same cache
            # file, and the cached features are one in-memory array, not shard files to split.
            log.info("train.embedding_cache: off for multi-worker training; phase 1 runs on the images")
            cached = False
        phase_one_input = "images" if not cached else "cached features" if train.phase1_flip == "none" \
            else f"cached features of the images and of their {train.phase1_flip} flips"
        per_epoch = sum(copies.values())
        steps = -(-per_epoch // train.batch_size)
        # multi-worker: the workers' streams are endless, fit() is told the steps of an epoch
        fixed_steps = steps if cluster is not None else None
        log.info(
            "%s%s (%s weights) on %d images per epoch (rebalance: %s), %d steps of %d; %d validation images; "
            "%d device(s), %s; phase 1 on %s",
            "resuming " if (run_dir / TRAIN_LOG).is_file() else "", train.backbone, train.weights, per_epoch,
            plan.get("method"), steps, train.batch_size, counts.get("val", 0),
            strategy.num_replicas_in_sync, clf.model.dtype_policy.name, phase_one_input,
        )

        # Phase 1: the head on the frozen backbone (lenet: the whole network). Its end is
        # recorded, so that a run killed in phase 2 does not train phase 1 again.
        phase_one = run_dir / "phase1.json"
        if phase_one.is_file():
            clf.model.load_weights(run_dir / "phase1.weights.h5")
            next_epoch = json.loads(phase_one.read_text())["next_epoch"]
        elif not head_epochs:
            next_epoch = 0
        else:
            if cached:
                (data, val), fitted = cached_datasets(clf, train, seed, paths, meta, copies, runtime), clf.head
            else:
                augmented = train.augments_phase1
                (data, val), fitted = image_data(augmented), clf.training if augmented else clf.model
            compile_for_training(fitted, train.learning_rate, schedule, steps, head_epochs)
            if cluster is not None:
                clusters.adapt_for_fit(fitted)
            phase = "head" if train.pretrained else "scratch"
            next_epoch = fit_phase(fitted, data, val, (0, head_epochs), phase, run_dir, train, best, class_weight,
                                   fixed_steps)
            clf.model.save_weights(run_dir / "phase1.weights.h5")
            write_json(phase_one, {"next_epoch": next_epoch})

        # Phase 2: fine-tune the top of the backbone on the images, at a lower learning rate
        # (large updates would destroy the pretrained features the head was fitted to).
        if tune_epochs:
            backbones.unfreeze_top(clf.backbone.network, train.fine_tune_layers)
            compile_for_training(clf.training, train.fine_tune_learning_rate, schedule, steps, tune_epochs)
            if cluster is not None:
                clusters.adapt_for_fit(clf.training)
            data, val = image_data(train.augments)
            epochs = (next_epoch, next_epoch + tune_epochs)
            fit_phase(clf.training, data, val, epochs, "fine_tune", run_dir, train, best, class_weight, fixed_steps)

    if train.restore_best:
        best.restore()
    return clf

