"""The embedding cache: lookup, keys, computing only what is missing, and the head's batches."""

import hashlib
import json

import keras
import numpy as np
import pytest

from imgpipe.model import feature_cache
from imgpipe.model.shards import ShardWriter


def ids(*names) -> np.ndarray:
    return np.array([n.encode() for n in names], feature_cache.ID_DTYPE)


def test_lookup_finds_rows_and_marks_absent_ids():
    cached = ids("c", "a", "d")
    order = np.argsort(cached)
    assert feature_cache.lookup(cached[order], order, ids("a", "b", "d", "c", "z")).tolist() == [1, -1, 2, 0, -1]
    assert feature_cache.lookup(ids(), np.zeros(0, np.int64), ids("a")).tolist() == [-1]


def test_key_changes_with_the_weights_and_the_description():
    w = [np.ones((2, 2), np.float32)]
    key = feature_cache.cache_key(w, {"backbone": "mobilenet"})
    assert key == feature_cache.cache_key([np.ones((2, 2), np.float32)], {"backbone": "mobilenet"})
    assert key != feature_cache.cache_key([np.full((2, 2), 2, np.float32)], {"backbone": "mobilenet"})
    assert key != feature_cache.cache_key(w, {"backbone": "vgg16"})


class CountingExtractor:
    """A stand-in for the extractor: features = per-channel means, counting the images it sees."""

    output_shape = (None, 1)

    def __init__(self):
        self.seen = 0

    def predict_on_batch(self, images):
        self.seen += len(images)
        return images.mean(axis=(1, 2))


def write_shards(folder, per_split):
    """Shards of 4x4 grey images whose pixels all equal their index; returns the ids per split."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"height": 4, "width": 4, "channels": 1, "files": {}, "counts": {}}
    written, value = {}, 0
    for split, n in per_split.items():
        written[split] = []
        with ShardWriter(folder, split, per_shard=7) as writer:
            for _ in range(n):
                image_id = hashlib.sha1(str(value).encode()).hexdigest()
                writer.write(np.full((4, 4, 1), value, np.float32), value % 3, image_id, f"{value}.png")
                written[split].append((image_id, value))
                value += 1
        meta["files"][split], meta["counts"][split] = writer.files, writer.count
    (folder / "meta.json").write_text(json.dumps(meta))
    return meta, written


def test_features_are_computed_once_and_new_images_cost_only_themselves(tmp_path):
    meta, written = write_shards(tmp_path / "shards", {"train": 20, "val": 5})
    path = tmp_path / "cache" / "key.npy"
    train_ids = ids(*(i for i, _ in written["train"]))
    extractor = CountingExtractor()
    cache = feature_cache.update(path, extractor, tmp_path / "shards", meta, ("train",), train_ids, batch_size=8)
    assert extractor.seen == 20 and len(cache) == 20
    values = {image_id.encode(): v for image_id, v in written["train"] + written["val"]}
    np.testing.assert_array_equal(cache.gather(cache.rows(train_ids))[:, 0], [values[i] for i in train_ids])

    # the same images again: nothing computed; five more (the validation split): only those
    feature_cache.update(path, extractor, tmp_path / "shards", meta, ("train",), train_ids, batch_size=8)
    assert extractor.seen == 20
    every = np.concatenate([train_ids, ids(*(i for i, _ in written["val"]))])
    cache = feature_cache.update(path, extractor, tmp_path / "shards", meta, ("train", "val"), every, batch_size=8)
    assert extractor.seen == 25 and len(cache) == 25
    np.testing.assert_array_equal(cache.gather(cache.rows(every))[:, 0], [values[i] for i in every])
    assert sorted(p.name for p in path.parent.iterdir()) == ["key.npy"]  # no temporary file left


def test_head_batches_pair_each_row_with_its_label_and_reshuffle_every_epoch(tmp_path):
    meta, written = write_shards(tmp_path / "shards", {"train": 30})
    train_ids = ids(*(i for i, _ in written["train"]))
    cache = feature_cache.update(tmp_path / "c.npy", CountingExtractor(), tmp_path / "shards", meta, ("train",),
                              train_ids, batch_size=8)
    rows = np.repeat(cache.rows(train_ids), 2)  # every image twice, as oversampling does
    labels = np.repeat([v for _, v in written["train"]], 2)  # label = the pixel value, to check pairing
    ds = feature_cache.head_dataset(cache, rows, labels, batch_size=8, shuffle_seed=1)
    epochs = [[(x[:, 0], y) for x, y in ds.as_numpy_iterator()] for _ in range(2)]
    for epoch in epochs:
        features = np.concatenate([x for x, _ in epoch])
        labels_seen = np.concatenate([y for _, y in epoch])
        np.testing.assert_array_equal(features, labels_seen)
        assert sorted(labels_seen.tolist()) == sorted(labels.tolist())
    assert not np.array_equal(np.concatenate([y for _, y in epochs[0]]), np.concatenate([y for _, y in epochs[1]]))


def test_duplicate_ids_in_the_shards_are_a_stage_error(tmp_path):
    from imgpipe.core.errors import StageError

    folder = tmp_path / "shards"
    folder.mkdir()
    with ShardWriter(folder, "train", per_shard=10) as writer:
        for _ in range(2):
            writer.write(np.zeros((4, 4, 1), np.float32), 0, "same-id", "x.png")
    meta = {"height": 4, "width": 4, "channels": 1, "files": {"train": writer.files}, "counts": {"train": 2}}
    with pytest.raises(StageError, match="more than once"):
        feature_cache.update(tmp_path / "c.npy", CountingExtractor(), folder, meta, ("train",), ids("same-id"), 8)


def test_a_real_extractor_fills_the_cache_with_its_features(tmp_path):
    meta, written = write_shards(tmp_path / "shards", {"train": 10})
    inputs = keras.Input((4, 4, 1))
    extractor = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(3, 2)(inputs)))
    train_ids = ids(*(i for i, _ in written["train"]))
    cache = feature_cache.update(tmp_path / "c.npy", extractor, tmp_path / "shards", meta, ("train",), train_ids, 4)
    images = np.stack([np.full((4, 4, 1), v, np.float32) for _, v in written["train"]])
    np.testing.assert_allclose(cache.gather(cache.rows(train_ids)), extractor.predict_on_batch(images), rtol=1e-5)


def test_a_worker_rebuilds_the_extractor_from_its_config_and_weights_with_the_same_features(tmp_path):
    """What a Dask worker gets (`portable`: config + weights) computes the stage's features bit for bit,
    in the same batches (4 wanted images of the file's 7, in batches of 3 and 1)."""
    meta, written = write_shards(tmp_path / "shards", {"train": 10})
    inputs = keras.Input((4, 4, 1))
    extractor = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(3, 2)(inputs)))
    (file,) = [str(tmp_path / "shards" / name) for name in meta["files"]["train"][:1]]
    shape = {"height": 4, "width": 4, "channels": 1}
    wanted = ids(*(i for i, _ in written["train"][:7:2]), written["train"][8][0])  # the last is in file 2
    here_ids, here = feature_cache.embed_file(extractor, file, shape, wanted, 3)
    spec = feature_cache.portable(extractor)
    there_ids, there = feature_cache.embed_file(spec, file, shape, wanted, 3)
    assert here_ids.tolist() == there_ids.tolist() == wanted[:4].tolist()
    assert here.tobytes() == there.tobytes() and here.shape == (4, 3)
    images = np.stack([np.full((4, 4, 1), v, np.float32) for _, v in written["train"][:7:2]])
    np.testing.assert_allclose(here, extractor.predict_on_batch(images), rtol=1e-5)
    # another model, another key: the worker rebuilds rather than reuse the last one
    other = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(3, 2)(inputs)))
    assert feature_cache.portable(other)[0] != spec[0]
    assert feature_cache.embed_file(feature_cache.portable(other), file, shape, wanted, 3)[1].tobytes() != there.tobytes()


def write_random_shards(folder, n, seed=0):
    """One shard split of n random 4x6 RGB images (no symmetry, so that a flip changes them)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, written = rng.integers(0, 256, (n, 4, 6, 3)).astype(np.float32), []  # exact in float16 shards
    with ShardWriter(folder, "train", per_shard=5) as writer:
        for i, image in enumerate(images):
            image_id = hashlib.sha1(str(i).encode()).hexdigest()
            writer.write(image, i % 2, image_id, f"{i}.png")
            written.append(image_id)
    meta = {"height": 4, "width": 6, "channels": 3, "files": {"train": writer.files}, "counts": {"train": n}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return meta, images, ids(*written)


@pytest.mark.parametrize("flip, axes", [("horizontal", (2,)), ("vertical", (1,)), ("horizontal_and_vertical", (1, 2))])
def test_a_flipped_view_holds_the_features_of_the_flipped_images_here_and_on_a_worker(tmp_path, flip, axes):
    meta, images, train_ids = write_random_shards(tmp_path / "shards", 12)
    inputs = keras.Input((4, 6, 3))
    extractor = keras.Model(inputs, keras.layers.Flatten()(keras.layers.Conv2D(2, 2)(inputs)))
    (_, view) = feature_cache.VIEWS[flip]
    cache = feature_cache.update(tmp_path / "f.npy", extractor, tmp_path / "shards", meta, ("train",), train_ids, 4,
                                 view=view)
    flipped = np.flip(images, axes)
    np.testing.assert_allclose(cache.gather(cache.rows(train_ids)), extractor.predict_on_batch(flipped), rtol=1e-5)
    assert not np.allclose(cache.gather(cache.rows(train_ids)), extractor.predict_on_batch(images), rtol=1e-3)
    # what a Dask worker computes from the extractor's config and weights: the same bytes
    file = str(tmp_path / "shards" / meta["files"]["train"][0])
    shape = {k: meta[k] for k in ("height", "width", "channels")}
    here = feature_cache.embed_file(extractor, file, shape, train_ids, 4, view)[1]
    there = feature_cache.embed_sent(feature_cache.portable(extractor), open(file, "rb").read(), file, shape,
                                     train_ids, 4, view)[1]
    assert here.tobytes() == there.tobytes() and len(here) == 5


def test_with_two_views_each_image_is_seen_in_one_drawn_anew_every_epoch(tmp_path):
    """The plain view's features are the pixel value v, the flipped view's are 1000 + v (a stand-in
    extractor that tells them apart): each batch row is one of its image's two, about half each."""
    meta, written = write_shards(tmp_path / "shards", {"train": 60})
    train_ids = ids(*(i for i, _ in written["train"]))
    plain = feature_cache.update(tmp_path / "a.npy", CountingExtractor(), tmp_path / "shards", meta, ("train",),
                                 train_ids, 8)

    class Shifted(CountingExtractor):
        def predict_on_batch(self, images):
            return images.mean(axis=(1, 2)) + 1000

    flipped = feature_cache.update(tmp_path / "b.npy", Shifted(), tmp_path / "shards", meta, ("train",),
                                   train_ids[::-1], 8)  # another order of rows in its file
    rows = np.stack([plain.rows(train_ids), flipped.rows(train_ids)], axis=1)
    labels = np.array([v for _, v in written["train"]])
    ds = feature_cache.head_dataset([plain, flipped], rows, labels, batch_size=8, shuffle_seed=5)
    seen = []
    for _ in range(2):
        x, y = map(np.concatenate, zip(*[(x[:, 0], y) for x, y in ds.as_numpy_iterator()]))
        assert sorted(y.tolist()) == sorted(labels.tolist())
        assert np.all((x == y) | (x == y + 1000))  # each image's own features, in one of its views
        assert 15 <= int((x >= 1000).sum()) <= 45
        seen.append(dict(zip(y.tolist(), (x >= 1000).tolist())))
    assert seen[0] != seen[1]  # the views are drawn again each epoch
    # without a seed (validation): the images as they are
    val = np.concatenate([x[:, 0] for x, _ in
                          feature_cache.head_dataset([plain, flipped], rows, labels, 8).as_numpy_iterator()])
    np.testing.assert_array_equal(val, labels)
