"""The embedding cache: each image's backbone features, computed once, reused by every head-only run.

A frozen backbone computes the same features every epoch and every run. When phase 1 has no
augmentation, `train` computes them once per image and trains the head on them: a head-only
experiment (`dvc exp run -S train.learning_rate=...`) then costs seconds instead of a pass of
the backbone over every image in every epoch.

Cache entries are keyed by (image id, what computes the features): the key of a cache file
hashes the extractor's weights (which pins the backbone and its ImageNet, file or hub weights),
the backbone settings, and the preprocessing that made the pixels. One file per key:

    <train.cache_dir>/embeddings/<key>.npy    rows of (id, features float32[d]), in no order
    <train.cache_dir>/embeddings/<key>.json   what the key stands for (for people)

Images already there are never recomputed: new images add rows (the file is rewritten next to
the old one, then renamed over it, so a killed run leaves the old file intact). The cache
lives outside DVC's outputs: it is an accelerator, and deleting it only costs time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from imgpipe.model import shards
from imgpipe.core.atomic_write import atomic_path, write_json
from imgpipe.core.errors import StageError

log = logging.getLogger(__name__)

ID_DTYPE = "S64"  # sha1 ids are 40 characters; room for sha256
COPY_ROWS = 65536  # rows copied at a time when a cache file is extended


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
           batch_size: int) -> FeatureCache:
    """The cache at `path` holding features of all `ids` (images of `splits`): computes the missing ones."""
    import tensorflow as tf

    cache = FeatureCache(path)
    missing = np.unique(np.asarray(ids, ID_DTYPE)[cache.rows(ids) < 0])
    log.info("embedding cache %s: %d of %d images cached, computing %d", path.name, len(ids) - len(missing),
             len(ids), len(missing))
    if len(missing) == 0:
        return cache
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(missing), tf.ones(len(missing), tf.int64)),
        default_value=tf.constant(0, tf.int64),
    )

    def only_missing(batch):
        keep = table.lookup(batch["id"]) > 0
        return tf.data.Dataset.from_tensor_slices({k: tf.boolean_mask(batch[k], keep) for k in ("image", "id")})

    ds = shards.records(folder, splits[0], meta)
    for split in splits[1:]:
        ds = ds.concatenate(shards.records(folder, split, meta))
    # parse whole batches (fast), keep the missing images, then batch them for the backbone
    ds = ds.batch(128).map(shards.parse_batch(meta, ("image", "id")), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.flat_map(only_missing).batch(batch_size).prefetch(tf.data.AUTOTUNE)

    old, dim = len(cache), int(extractor.output_shape[-1])
    dtype = np.dtype([("id", ID_DTYPE), ("features", np.float32, (dim,))])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(old + len(missing),))
        for start in range(0, old, COPY_ROWS):
            stop = min(start + COPY_ROWS, old)
            out[start:stop] = cache.table[start:stop]
        at = old
        for batch in ds.as_numpy_iterator():
            n = len(batch["id"])
            if at + n > len(out):
                raise StageError(f"{folder}: an image id occurs more than once in the {'/'.join(splits)} shards")
            out["id"][at:at + n] = batch["id"]
            out["features"][at:at + n] = extractor.predict_on_batch(batch["image"])
            at += n
        if at != len(out):
            raise StageError(f"{folder}: the shards changed while their features were computed; re-run")
        out.flush()
        del out
    return FeatureCache(path)


def head_dataset(cache: FeatureCache, rows: np.ndarray, labels: np.ndarray, batch_size: int,
                 shuffle_seed: int | None = None):
    """Batches of (features, label) for the head; with `shuffle_seed`, a new full shuffle every epoch.

    Only row numbers and labels are held in memory (and shuffled); the features of each batch
    are read from the memory-mapped cache file as the batch is made.
    """
    import tensorflow as tf

    dim = cache.table["features"].shape[1]
    ds = tf.data.Dataset.from_tensor_slices((rows, labels))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(rows), seed=shuffle_seed, reshuffle_each_iteration=True)

    def features(batch_rows, batch_labels):
        x = tf.numpy_function(cache.gather, [batch_rows], tf.float32, stateful=False)
        return tf.ensure_shape(x, [None, dim]), batch_labels

    return ds.batch(batch_size).map(features).prefetch(tf.data.AUTOTUNE)


def describe(key: str, description: dict, path: Path) -> None:
    """<key>.json next to the cache file: what its features were computed with."""
    write_json(path.with_suffix(".json"), {"key": key, **description})
