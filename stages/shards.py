"""Training-ready shards: TFRecord files of preprocessed images, streamed by tf.data.

Layout of a shard folder (written by `preprocess`, read by `rebalance`, `train`, `evaluate`):

    meta.json                   shapes, dtype, classes, counts per split, file names, normalisation
    train-00000.tfrecord ...    one tf.train.Example per image:
                                  image: raw float16 bytes, shape [height, width, channels]
                                  label: int64 class index into meta["classes"]
                                  id:    the image's sha1 (bytes)
                                  path:  the image's path in the source (bytes)

float16 halves the disk and read cost of float32; preprocessed pixels are in small ranges
(0-1, or standardised), where float16 keeps three significant digits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

META = "meta.json"
STORE_DTYPE = np.float16


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tfrecord"


class ShardWriter:
    """Writes records of one split into numbered TFRecord files of at most `per_shard` images."""

    def __init__(self, folder: Path, split: str, per_shard: int):
        import tensorflow as tf  # imported here so modules that only read metadata stay light

        self._tf = tf
        self.folder, self.split, self.per_shard = Path(folder), split, per_shard
        self.files: list[str] = []
        self.count = 0
        self._writer = None

    def write(self, image: np.ndarray, label: int, image_id: str, path: str) -> None:
        tf = self._tf
        if self.count % self.per_shard == 0:
            self._close_current()
            name = shard_name(self.split, len(self.files))
            self.files.append(name)
            self._writer = tf.io.TFRecordWriter(str(self.folder / name))
        feature = {
            "image": _bytes_feature(tf, np.ascontiguousarray(image, dtype=STORE_DTYPE).tobytes()),
            "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
            "id": _bytes_feature(tf, image_id.encode()),
            "path": _bytes_feature(tf, path.encode()),
        }
        example = tf.train.Example(features=tf.train.Features(feature=feature))
        # deterministic=True: protobuf map fields (the features) otherwise serialise in any order
        self._writer.write(example.SerializeToString(deterministic=True))
        self.count += 1

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        self._close_current()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _bytes_feature(tf, value: bytes):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / META
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no shard metadata; run the preprocess stage first")
    return json.loads(path.read_text(encoding="utf-8"))


def split_files(folder: str | Path, split: str, meta: dict | None = None) -> list[str]:
    meta = meta or read_meta(folder)
    return [str(Path(folder) / name) for name in meta["files"].get(split, [])]


def dataset(folder: str | Path, split: str, meta: dict | None = None, deterministic: bool = True):
    """A tf.data.Dataset of dicts {image: float32 [H, W, C], label: int64, id: string, path: string}.

    Files are read in parallel and records parsed in parallel; nothing is held in memory
    beyond tf.data's buffers, so the dataset can be far larger than RAM.
    """
    import tensorflow as tf

    meta = meta or read_meta(folder)
    files = split_files(folder, split, meta)
    shape = (meta["height"], meta["width"], meta["channels"])
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "id": tf.io.FixedLenFeature([], tf.string),
        "path": tf.io.FixedLenFeature([], tf.string),
    }

    def parse(record):
        ex = tf.io.parse_single_example(record, spec)
        image = tf.reshape(tf.io.decode_raw(ex["image"], tf.float16), shape)
        return {"image": tf.cast(image, tf.float32), "label": ex["label"], "id": ex["id"], "path": ex["path"]}

    options = tf.data.Options()
    options.deterministic = deterministic
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=min(len(files), 4) or None)
    return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE).with_options(options)


def iter_records(folder: str | Path, split: str):
    """Yield (image float32 array, label, id, path) per record (interleaved across files, deterministic)."""
    for rec in dataset(folder, split).as_numpy_iterator():
        yield rec["image"], int(rec["label"]), rec["id"].decode(), rec["path"].decode()
