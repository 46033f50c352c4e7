"""The embedding cache: each image's backbone features, computed once, reused by every head-only run.

A frozen backbone computes the same features every epoch and every run. When phase 1 has no
augmentation, `train` computes them once per image and trains the head on them: a head-only
experiment (`dvc exp run -S train.learning_rate=...`) then costs seconds instead of a pass of
the backbone over every image in every epoch. A flip (the default augmentation of photos) is
one more view of each image, with its own cache file: the head then sees each image in one of
its two views, drawn each epoch, which is what a random flip before a frozen backbone shows it.
Any other augmentation makes new pixels every epoch, and phase 1 runs on the images.

Cache entries are keyed by (image id, what computes the features): the key of a cache file
hashes the extractor's weights (which pins the backbone and its ImageNet, file or hub weights),
the backbone settings, the preprocessing that made the pixels, and the view (when it is not the
image itself). One file per key:

    <train.cache_dir>/embeddings/<key>.npy    rows of (id, features float32[d]), in no order
    <train.cache_dir>/embeddings/<key>.json   what the key stands for (for people)

Images already there are never recomputed: new images add rows (the file is rewritten next to
the old one, then renamed over it, so a killed run leaves the old file intact). The cache
lives outside DVC's outputs: it is an accelerator, and deleting it only costs time.

The features are computed one shard file at a time, in the stage's process (TensorFlow uses
every core), or, with `runtime.executor: dask`, on the Dask cluster's workers: the extractor (its
Keras config and weights) is sent once to every worker, each shard file with images not yet
cached is one job, and only the features come back, in order: the same bytes either way, in
the same batches (tests/e2e/test_dask_stages.py). Workers that see the shard files as this
machine does (the same machine, or a file system shared at the same path) read them
themselves; if any does not, each file's bytes go with its job (fewer jobs in flight then). A
TF Hub backbone cannot be rebuilt from its config on a worker, so it is computed in the process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from imgpipe.model import shards
from imgpipe.core.atomic_write import atomic_path, write_json
from imgpipe.core.errors import StageError

log = logging.getLogger(__name__)

ID_DTYPE = "S64"  # sha1 ids are 40 characters; room for sha256
# The views of an image that a phase-1 flip (train.augment_flip) shows the backbone: the image
# itself, and the image flipped along these axes of (height, width, channels). As Keras'
# RandomFlip does, horizontal_and_vertical flips both axes or neither (one draw per image).
VIEWS = {"none": ((),), "horizontal": ((), (1,)), "vertical": ((), (0,)), "horizontal_and_vertical": ((), (0, 1))}
COPY_ROWS = 65536  # rows copied at a time when a cache file is extended
PARSE_BATCH = 128  # records parsed at a time (one op per batch is fast, bench/RESULTS.md)


def cache_key(weights: list[np.ndarray], description: dict) -> str:
    """sha1 of the extractor's weights (in order) and of everything else that shapes the features."""
    digest = hashlib.sha1(json.dumps(description, sort_keys=True).encode())
    for w in weights:
        digest.update(str(w.shape).encode())
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()


def lookup(sorted_ids: np.ndarray, order: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Row of each `query` id in a cache whose ids sorted are `sorted_ids` (= ids[order]); -1 if absent."""
    if len(sorted_ids) == 0:
        return np.full(len(query), -1, np.int64)
    at = np.minimum(np.searchsorted(sorted_ids, query), len(sorted_ids) - 1)
    return np.where(sorted_ids[at] == query, order[at], -1).astype(np.int64)


class FeatureCache:
    """One cache file, memory-mapped: only the ids are read into memory (64 bytes per image)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.table = np.load(self.path, mmap_mode="r") if self.path.is_file() else None
        ids = np.zeros(0, ID_DTYPE) if self.table is None else np.asarray(self.table["id"])
        self._order = np.argsort(ids, kind="stable")
        self._sorted = ids[self._order]

    def __len__(self) -> int:
        return len(self._sorted)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of `ids` in the file (-1 for an id not cached)."""
        return lookup(self._sorted, self._order, np.asarray(ids, ID_DTYPE))

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Features of `rows`, float32 [len(rows), d], read from disk."""
        return np.asarray(self.table["features"][rows], np.float32)


def update(path: Path, extractor, folder: Path, meta: dict, splits: tuple[str, ...], ids: np.ndarray,
           batch_size: int, runner=None, view: tuple[int, ...] = ()) -> FeatureCache:
    """The cache at `path` holding features of all `ids` (images of `splits`): computes the missing ones,
    one shard file at a time, on `runner`'s Dask workers if it is given one (a `Batches` on Dask).
    `view`: the axes each image is flipped along before the backbone sees it (one of VIEWS')."""
    cache = FeatureCache(path)
    missing = np.unique(np.asarray(ids, ID_DTYPE)[cache.rows(ids) < 0])
    log.info("embedding cache %s: %d of %d images cached, computing %d", path.name, len(ids) - len(missing),
             len(ids), len(missing))
    if len(missing) == 0:
        return cache
    shape = {k: meta[k] for k in ("height", "width", "channels")}
    jobs = []  # (shard file, its images to compute): files with none cost no job
    for split in splits:
        for file in shards.split_files(folder, split, meta):
            in_file = np.asarray(file_ids(file, shape), ID_DTYPE)
            wanted = in_file[np.isin(in_file, missing)]
            if len(wanted):
                jobs.append((os.path.abspath(file), shape, wanted, batch_size, tuple(view)))

    old, dim = len(cache), int(extractor.output_shape[-1])
    dtype = np.dtype([("id", ID_DTYPE), ("features", np.float32, (dim,))])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(old + len(missing),))
        for start in range(0, old, COPY_ROWS):
            stop = min(start + COPY_ROWS, old)
            out[start:stop] = cache.table[start:stop]
        at = old
        for file_rows, features in _computed(jobs, extractor, runner):
            n = len(file_rows)
            if at + n > len(out):
                raise StageError(f"{folder}: an image id occurs more than once in the {'/'.join(splits)} shards")
            out["id"][at:at + n] = file_rows
            out["features"][at:at + n] = features
            at += n
        if at != len(out):
            raise StageError(f"{folder}: the shards changed while their features were computed; re-run")
        out.flush()
        del out
    return FeatureCache(path)


def file_ids(file: str, shape: dict) -> np.ndarray:
    """The image ids of one shard file, in its order, without decoding any pixels."""
    import tensorflow as tf

    ds = tf.data.TFRecordDataset([file]).batch(PARSE_BATCH).map(shards.parse_batch(shape, ("id",)))
    return np.concatenate([np.zeros(0, ID_DTYPE)] + [b["id"].astype(ID_DTYPE) for b in ds.as_numpy_iterator()])


def embed_file(extractor, file: str, shape: dict, wanted: np.ndarray, batch_size: int, view: tuple[int, ...] = (),
               data: bytes | None = None):
    """(ids, features) of the images of shard `file` whose id is in `wanted`, in file order, each
    image flipped along the axes `view` (of height, width, channels) first.

    `extractor` is a Keras model, or what `portable` made of one (rebuilt once per process). The
    images go to the backbone in batches of `batch_size` made the same way wherever this runs,
    so the features are the same bits in the stage's process and on a Dask worker. `data`: the
    file's bytes, for a worker that does not see `file` (read from a copy in a temporary folder).
    """
    import tensorflow as tf

    if data is not None:
        with tempfile.TemporaryDirectory(prefix="imgpipe-shard-") as tmp:
            copy = Path(tmp) / Path(file).name
            copy.write_bytes(data)
            return embed_file(extractor, str(copy), shape, wanted, batch_size, view)
    if isinstance(extractor, tuple):
        extractor = _rebuilt(*extractor)
    parse = shards.parse_batch(shape, ("image", "id"))
    ids, features, images, kept = [], [], [], 0

    def flush():
        nonlocal images, kept
        batch = np.concatenate(images)
        features.append(np.asarray(extractor.predict_on_batch(batch[:batch_size]), np.float32))
        images, kept = ([batch[batch_size:]], len(batch) - batch_size) if len(batch) > batch_size else ([], 0)

    for batch in tf.data.TFRecordDataset([file]).batch(PARSE_BATCH).map(parse).as_numpy_iterator():
        keep = np.isin(batch["id"].astype(ID_DTYPE), wanted)
        ids.append(batch["id"][keep].astype(ID_DTYPE))
        images.append(np.flip(batch["image"][keep], [axis + 1 for axis in view]) if view else batch["image"][keep])
        kept += int(keep.sum())
        while kept >= batch_size:
            flush()
    if kept:
        flush()
    dim = int(extractor.output_shape[-1])
    return np.concatenate([np.zeros(0, ID_DTYPE)] + ids), np.concatenate([np.zeros((0, dim), np.float32)] + features)


def _file_bytes(job: tuple) -> bytes:
    return Path(job[0]).read_bytes()


def embed_sent(extractor, data: bytes, file: str, shape: dict, wanted: np.ndarray, batch_size: int,
               view: tuple[int, ...] = ()):
    """embed_file on a worker that was sent the file's bytes (`Batches.map(..., sent=...)`)."""
    return embed_file(extractor, file, shape, wanted, batch_size, view, data)


def portable(extractor) -> tuple[str, str, list[np.ndarray]] | None:
    """(key, Keras JSON config, weights) from which a worker rebuilds `extractor`; None if it cannot."""
    if any(type(layer).__name__ == "TFSMLayer" for layer in _layers(extractor)):
        return None  # a SavedModel on this machine's disk
    weights, config = extractor.get_weights(), extractor.to_json()
    return cache_key(weights, {"config": config}), config, weights


def _layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _layers(layer)


_REBUILT: dict[str, object] = {}  # on a worker: the extractor rebuilt last, by key


def _rebuilt(key: str, config: str, weights: list[np.ndarray]):
    if key not in _REBUILT:
        import keras

        _REBUILT.clear()  # one extractor at a time: a worker's memory is not a model zoo
        model = keras.models.model_from_json(config)
        model.set_weights(weights)
        _REBUILT[key] = model
    return _REBUILT[key]


def _computed(jobs: list[tuple], extractor, runner):
    """embed_file's (ids, features) for each job, in order: on `runner`'s Dask workers, or here."""
    spec = portable(extractor) if runner is not None and runner.on_dask else None
    if runner is not None and runner.on_dask and spec is None:
        log.info("embedding cache: a TF Hub backbone is not rebuilt on Dask workers; computing here")
    if spec is None:
        for job in jobs:
            yield embed_file(extractor, *job)
        return
    shared, sent = runner.share(spec), None
    unseen = runner.unseen(job[0] for job in jobs)
    if unseen:
        log.info("embedding cache: Dask workers %s do not see the shard files as this machine does (%s): each "
                 "file's bytes go with its job", ", ".join(unseen), next(iter(unseen.values()))[0])
        sent = _file_bytes
    # with the files' bytes, 2 jobs a worker in flight: a shard file is tens of megabytes
    yield from runner.map(embed_sent if sent else embed_file, jobs, shared, 2 * runner.workers if sent else None, sent)
    log.info("embedding cache: %d shard files computed on the Dask cluster (files per worker: %s)", len(jobs),
             dict(runner.where))


def head_dataset(views, rows: np.ndarray, labels: np.ndarray, batch_size: int, shuffle_seed: int | None = None):
    """Batches of (features, label) for the head; with `shuffle_seed`, a new full shuffle every epoch.

    `views`: one FeatureCache, or one per view of the images (VIEWS), with `rows` then [n, views]:
    each image's row in each. With more than one and a `shuffle_seed`, every image is seen in one
    of its views, drawn anew each epoch with equal chances, as a random flip would show it;
    without a seed (validation), always in the first. Only row numbers and labels are held in
    memory (and shuffled); the features of each batch are read from the memory-mapped cache
    files as the batch is made.
    """
    import tensorflow as tf

    views = [views] if isinstance(views, FeatureCache) else list(views)
    rows = np.asarray(rows).reshape(len(rows), -1)
    if rows.shape[1] != len(views):
        raise ValueError(f"rows has {rows.shape[1]} columns for {len(views)} views")
    dim = views[0].table["features"].shape[1]
    ds = tf.data.Dataset.from_tensor_slices((rows, labels))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(rows), seed=shuffle_seed, reshuffle_each_iteration=True)
    if shuffle_seed is not None and len(views) > 1:
        draws = tf.data.Dataset.random(seed=shuffle_seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, draws).map(
            lambda pair, draw: ((tf.math.floormod(draw, len(views)), pair[0]), pair[1]))
    else:
        ds = ds.map(lambda row, label: ((tf.constant(0, tf.int64), row), label))

    def gather(view, row):
        out = np.empty((len(row), dim), np.float32)
        for v in np.unique(view):
            picked = view == v
            out[picked] = views[v].gather(row[picked, v])
        return out

    def features(batch, batch_labels):
        x = tf.numpy_function(gather, list(batch), tf.float32, stateful=False)
        return tf.ensure_shape(x, [None, dim]), batch_labels

    return ds.batch(batch_size).map(features).prefetch(tf.data.AUTOTUNE)


def describe(key: str, description: dict, path: Path) -> None:
    """<key>.json next to the cache file: what its features were computed with."""
    write_json(path.with_suffix(".json"), {"key": key, **description})
