"""Training-ready shards: TFRecord files of preprocessed images, streamed by tf.data.

Layout of a shard folder (written by `preprocess`, read by `rebalance`, `train`, `evaluate`):

    meta.json                   shapes, dtype, classes, counts per split, file names, the train split's
                                mean/std, under `preprocess` every param that decided the pixels, and
                                per file (`shards`) its image count and a digest of its members
    train-00000.tfrecord ...    one tf.train.Example per image:
                                  image: raw float16 bytes, shape [height, width, channels]
                                  label: int64 class index into meta["classes"]
                                  id:    the image's sha1 (bytes)
                                  path:  the image's path in the source (bytes)

float16 halves the disk and read cost of float32; preprocessed pixels are in small ranges
(0-1, or standardised), where float16 keeps three significant digits.

Which file an image is in follows from its split and its arrival number alone (the split
state's, imgpipe/data/splitting.py): `<split>-<arrival // images_per_shard>`, records in arrival
order. Images that arrive later land in new files; a removed image changes only its own file.
So after the data grows by 1%, preprocess (`Layout`, `kept`) rewrites about 1% of the files and
leaves the rest as they are, bytes and modification times (DVC then does not hash them again),
and a file it rewrites copies the records of the images it already held from the old file
(`stored_records`) instead of decoding them again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from imgpipe.core.errors import StageError

META = "meta.json"
STORE_DTYPE = np.float16


def pixel_params(p) -> dict:
    """Every preprocess param that decides a shard's pixels (how many images a file holds does not),
    as meta.json holds them (lists, not tuples), so the two compare equal."""
    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(p).items() if k != "images_per_shard"}))


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tfrecord"


@dataclasses.dataclass
class Layout:
    """Where the images in use go, from the split table's view `split` in a DuckDB connection
    (imgpipe/data/tables.py), in bounded memory whatever the number of rows: each file's image
    count and members digest (`files`, in split order then by number), the classes, the counts
    per split and per class. `members` streams each file's images, in the same order."""

    files: dict[str, dict]  # name -> {"count": n, "members": digest}
    classes: list[str]
    counts: dict[str, int]
    class_counts: dict[str, dict[str, int]]
    con: object
    per_shard: int
    splits: tuple

    _USED = """SELECT id, path, split, arrival, CAST(list_position(?, label) - 1 AS BIGINT) AS y,
                      arrival // ? AS number FROM split WHERE split IN ('train', 'val', 'test')"""

    @classmethod
    def of(cls, con, per_shard: int, splits=("train", "val", "test"), arrival: bool = True) -> "Layout":
        if not arrival:  # a split table made before arrivals were kept: each split's images in id order
            con.execute("""CREATE OR REPLACE TEMP VIEW split AS SELECT *, row_number() OVER (
                           PARTITION BY split ORDER BY id) - 1 AS arrival FROM split_table""")
        classes = [r[0] for r in con.execute("SELECT DISTINCT label FROM split ORDER BY label").fetchall()]
        counts = {s: 0 for s in splits}
        class_counts = {s: dict.fromkeys(classes, 0) for s in splits}
        for split, label, n in con.execute("SELECT split, label, count(*) FROM split WHERE split IN "
                                           "('train', 'val', 'test') GROUP BY ALL").fetchall():
            counts[split] += n
            class_counts[split][label] = n
        layout = cls({}, classes, counts, class_counts, con, per_shard, tuple(splits))
        # each file's members digest, from one sorted pass (a digest in SQL would hold every file's
        # members in memory at once: DuckDB does not spill an ordered string_agg)
        layout.files = {name: {"count": len(rows), "members": members_digest(rows)} for name, rows in layout._rows(None)}
        return layout

    def _rows(self, wanted: set | None) -> Iterator[tuple[str, list[tuple]]]:
        """(name, its images' (id, y, path, arrival) in arrival order) of each file in `wanted`
        (None: every file), in split order then by number: one pass, sorted by DuckDB out of core."""
        query = (f"SELECT split, number, id, y, path, arrival FROM ({self._USED}) "
                 "ORDER BY list_position(?, split), arrival")
        result = self.con.execute(query, [self.classes, self.per_shard, list(self.splits)])
        current, rows = None, []
        while batch := result.fetchmany(65_536):
            for split, number, image_id, y, path, arrival in batch:
                name = shard_name(split, number)
                if name != current:
                    if current is not None and (wanted is None or current in wanted):
                        yield current, rows
                    current, rows = name, []
                if wanted is None or name in wanted:
                    rows.append((image_id, y, path, arrival))
        if current is not None and (wanted is None or current in wanted):
            yield current, rows

    def any_path(self) -> str | None:
        """The path of one image in the shards (which one is left to DuckDB); None if there is none."""
        rows = self.con.execute("SELECT path FROM split WHERE split IN ('train', 'val', 'test') LIMIT 1").fetchall()
        return rows[0][0] if rows else None

    def members(self, names) -> Iterator[tuple[str, pd.DataFrame]]:
        """(name, its images: id, y, path, arrival, in arrival order) of each file of `names`, in
        `files` order."""
        for name, rows in self._rows(set(names)):
            yield name, _members(rows)


def _members(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["id", "y", "path", "arrival"])


def members_digest(rows: list[tuple]) -> str:
    """What decides a file's records, but for the pixels: each image's id, label index and path, in
    order (rows of (id, y, path, ...)), as meta.json keeps it."""
    digest = hashlib.sha1()
    for image_id, y, path, *_ in rows:
        digest.update(f"{image_id}\t{y}\t{path}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def previous_meta(folder: str | Path) -> dict | None:
    """The meta.json a finished earlier run left in `folder`; None if there is none (a first run,
    or an update killed half-way: it deletes meta.json before it changes any file)."""
    try:
        return json.loads((Path(folder) / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def kept(folder: str | Path, digests: dict[str, str], old: dict | None) -> set[str]:
    """The files (name -> members digest, see Layout) that an earlier run with the same pixels already wrote
    as they are now: same members, same labels and paths. `old` is that run's meta.json, None if
    its pixels differ (other params, another train mean/std) or there was none."""
    if old is None:
        return set()
    before = {name: entry["members"] for name, entry in old.get("shards", {}).items()}
    return {name for name, digest in digests.items()
            if before.get(name) == digest and (Path(folder) / name).is_file()}


def stored_records(paths) -> dict[str, tuple[bytes, int, str]]:
    """Image id -> (the serialized record, its label index, its path) of every record in the
    TFRecord files `paths` (those that exist). Only ids, labels and paths are parsed: a record
    kept as it is is copied, not decoded and serialized again."""
    import tensorflow as tf

    found = {}
    paths = [str(p) for p in paths if Path(p).is_file()]
    if not paths:
        return found
    spec = _spec(tf, ("id", "label", "path"))
    for serialized in tf.data.TFRecordDataset(paths).batch(512).as_numpy_iterator():
        ex = tf.io.parse_example(serialized, spec)
        for record, image_id, label, path in zip(serialized.tolist(), ex["id"].numpy().tolist(),
                                                 ex["label"].numpy().tolist(), ex["path"].numpy().tolist()):
            found[image_id.decode()] = (record, label, path.decode("utf-8", "surrogateescape"))
    return found


def stored_pixels(record: bytes) -> bytes:
    """The pixel bytes of one serialized record."""
    import tensorflow as tf

    return tf.train.Example.FromString(record).features.feature["image"].bytes_list.value[0]


def write_file(path: str | Path, records) -> None:
    """One TFRecord file of `records`, each serialized (bytes) or (pixel bytes, label index, id, path)."""
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record if isinstance(record, bytes) else example(tf, *record))


def pixel_bytes(image: np.ndarray) -> bytes:
    return np.ascontiguousarray(image, dtype=STORE_DTYPE).tobytes()


def example(tf, pixels: bytes, label: int, image_id: str, path: str) -> bytes:
    """One image's serialized tf.train.Example."""
    feature = {
        "image": _bytes_feature(tf, pixels),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        "id": _bytes_feature(tf, image_id.encode()),
        "path": _bytes_feature(tf, path.encode("utf-8", "surrogateescape")),
    }
    # deterministic=True: protobuf map fields (the features) otherwise serialise in any order
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


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
        self._writer.write(example(tf, pixel_bytes(image), label, image_id, path))
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
        raise StageError(f"{path} not found: no shard metadata; run the preprocess stage first")
    return json.loads(path.read_text(encoding="utf-8"))


def stamp(folder: str | Path) -> str:
    """A cheap token that changes when the shards change: meta.json's bytes, then each shard
    file's name, size and modification time (nanoseconds).

    Reading no shard bytes, it is instant on any data set. Rewriting a shard (preprocess, `dvc
    checkout`) changes its time even with the same bytes: the token then changes too, which only
    costs a resumable run its resumption.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    lines = [(folder / META).read_text(encoding="utf-8")]
    for split, names in sorted(meta["files"].items()):
        for name in names:
            try:
                info = (folder / name).stat()
            except FileNotFoundError:
                raise StageError(f"{folder / name}: listed in {META} but missing; re-run the preprocess stage") from None
            lines.append(f"{split}/{name} {info.st_size} {info.st_mtime_ns}")
    return "\n".join(lines)


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


def _spec(tf, keys=("image", "label", "id", "path")) -> dict:
    types = {"image": tf.string, "label": tf.int64, "id": tf.string, "path": tf.string}
    return {key: tf.io.FixedLenFeature([], types[key]) for key in keys}


def records(folder: str | Path, split: str, meta: dict | None = None, deterministic: bool = True,
            shuffle_seed: int | None = None):
    """A tf.data.Dataset of the serialized records of `split`, for pipelines that parse whole batches.

    Up to four files are read at once, their records interleaved. With `shuffle_seed`, the order
    of the files changes every epoch (the same sequence of orders for the same seed), so that a
    shuffle buffer smaller than the data set still mixes records from all over it.
    """
    import tensorflow as tf

    files = split_files(folder, split, meta)
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(files, tf.string, shape=[len(files)]))
    if shuffle_seed is not None and len(files) > 1:
        ds = ds.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.interleave(tf.data.TFRecordDataset, cycle_length=max(min(len(files), 4), 1),
                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)


def parse_batch(meta: dict, keys=("image", "label", "id", "path")):
    """A function from a batch of serialized records to {key: tensor}; the image as float32 [N, H, W, C].

    One op parses the whole batch: for small images that is several times faster than parsing
    record by record (bench/RESULTS.md).
    """
    import tensorflow as tf

    shape = (-1, meta["height"], meta["width"], meta["channels"])
    spec = _spec(tf, keys)

    def parse(serialized):
        ex = tf.io.parse_example(serialized, spec)
        if "image" in ex:
            ex["image"] = tf.cast(tf.reshape(tf.io.decode_raw(ex["image"], tf.float16), shape), tf.float32)
        return ex

    return parse


def ids_and_labels(folder: str | Path, split: str, meta: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ids (bytes) and labels of `split` in file order, without decoding any pixels."""
    import tensorflow as tf

    meta = meta or read_meta(folder)
    ds = records(folder, split, meta).batch(256)
    ds = ds.map(parse_batch(meta, ("id", "label")), num_parallel_calls=tf.data.AUTOTUNE)
    ids, labels = [np.zeros(0, "S1")], [np.zeros(0, np.int64)]
    for batch in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
        ids.append(batch["id"].astype(bytes))
        labels.append(batch["label"])
    return np.concatenate(ids), np.concatenate(labels)


def iter_records(folder: str | Path, split: str):
    """Yield (image float32 array, label, id, path) per record (interleaved across files, deterministic)."""
    for rec in dataset(folder, split).as_numpy_iterator():
        yield rec["image"], int(rec["label"]), rec["id"].decode(), rec["path"].decode()
