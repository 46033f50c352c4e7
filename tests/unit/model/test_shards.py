import json
import os

import numpy as np
import pytest

from imgpipe.model import shards
from imgpipe.core.errors import StageError
from imgpipe.core.params import params_from_dict


def write(folder, images, per_shard=3):
    folder.mkdir()
    with shards.ShardWriter(folder, "train", per_shard) as writer:
        for i, image in enumerate(images):
            writer.write(image, i % 2, f"{i:040x}", f"img/{i}.png")
    meta = {"height": 4, "width": 5, "channels": 1, "classes": ["a", "b"], "files": {"train": writer.files}}
    (folder / shards.META).write_text(json.dumps(meta))
    return writer


def test_round_trip_and_identical_bytes(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.random((4, 5, 1), dtype=np.float32) for _ in range(7)]
    writer = write(tmp_path / "a", images)
    assert writer.files == ["train-00000.tfrecord", "train-00001.tfrecord", "train-00002.tfrecord"]
    records = sorted(shards.iter_records(tmp_path / "a", "train"), key=lambda r: r[2])
    assert [r[2] for r in records] == [f"{i:040x}" for i in range(7)]
    assert [r[1] for r in records] == [i % 2 for i in range(7)]
    # float16 storage: three significant digits survive
    assert np.allclose(records[3][0], images[3], atol=1e-3)
    write(tmp_path / "b", images)
    for name in writer.files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_missing_metadata_is_a_stage_error_naming_it_and_the_stage_to_run(tmp_path):
    with pytest.raises(StageError, match=f"{tmp_path / shards.META} not found.*run the preprocess stage"):
        shards.read_meta(tmp_path)


def test_a_changed_shard_changes_the_resume_fingerprint(tmp_path):
    from imgpipe.model import training  # TensorFlow and Keras: only for this test

    rng = np.random.default_rng(0)
    write(tmp_path / "shards", [rng.random((4, 5, 1), dtype=np.float32) for _ in range(7)])
    (tmp_path / "rebalance").mkdir()
    (tmp_path / "rebalance" / "plan.json").write_text('{"method": "none"}')
    (tmp_path / "rebalance" / "copies.csv").write_text("id,label,copies\n")
    params = params_from_dict({"paths": {"shards": str(tmp_path / "shards"), "rebalance": str(tmp_path / "rebalance")}})

    def fingerprint():
        return training.run_fingerprint(params.train, params.base.seed, params.paths)

    before = fingerprint()
    assert fingerprint() == before  # nothing changed: a killed run may resume

    # other pixels, same size, meta.json untouched: what re-preprocessing changed images writes
    shard = tmp_path / "shards" / "train-00001.tfrecord"
    data = bytearray(shard.read_bytes())
    data[-8] ^= 0xFF
    info = shard.stat()
    shard.write_bytes(bytes(data))
    # a rewrite moves the file's time; set it apart explicitly, as a coarse file system clock might not
    os.utime(shard, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))
    assert fingerprint() != before

    shard.unlink()
    with pytest.raises(StageError, match=f"{shard}: listed in meta.json but missing"):
        fingerprint()


def layout_of(tmp_path, rows, per_shard):
    import pandas as pd

    from imgpipe.data import tables

    path = tmp_path / "split.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    with tables.connect() as con:
        columns = tables.read(con, path, "split table", "split", "split_table")
        con.execute("CREATE TEMP VIEW split AS SELECT * FROM split_table")
        layout = shards.Layout.of(con, per_shard, arrival="arrival" in columns)
        return layout, dict(layout.members(list(layout.files)[::-1]))


def test_the_layout_follows_arrivals_and_each_digest_is_its_members_in_order(tmp_path):
    import hashlib

    # arrivals out of row order, a gap (an image removed), a class only in unused, awkward paths
    rows = [{"id": f"{i:040x}", "label": label, "path": path, "split": split, "arrival": arrival}
            for i, (label, path, split, arrival) in enumerate([
                ("b", "b/ü, 1.png", "train", 3), ("a", 'a/"q".png', "train", 1), ("a", "a/x.png", "train", 0),
                ("b", "b/y.png", "test", 0), ("c", "c/z.png", "unused", 5), ("a", "a/w.png", "train", 4),
                ("b", "b/v.png", "val", 2)])]
    layout, members = layout_of(tmp_path, rows, per_shard=2)
    assert layout.classes == ["a", "b", "c"]
    assert list(layout.files) == ["train-00000.tfrecord", "train-00001.tfrecord", "train-00002.tfrecord",
                                  "val-00001.tfrecord", "test-00000.tfrecord"]
    assert {n: e["count"] for n, e in layout.files.items()} == {
        "train-00000.tfrecord": 2, "train-00001.tfrecord": 1, "train-00002.tfrecord": 1, "val-00001.tfrecord": 1,
        "test-00000.tfrecord": 1}
    assert layout.counts == {"train": 4, "val": 1, "test": 1}
    assert layout.class_counts["train"] == {"a": 3, "b": 1, "c": 0}
    # members come in files order, whatever order they are asked for
    assert list(members) == list(layout.files)
    assert members["train-00000.tfrecord"]["path"].tolist() == ["a/x.png", 'a/"q".png']  # arrival, not id, order
    assert members["train-00001.tfrecord"][["y", "arrival"]].values.tolist() == [[1, 3]]
    # the digest meta.json keeps: sha1 of "<id>\t<label index>\t<path>\n" per image, in arrival order
    for name, m in members.items():
        text = "".join(f"{i}\t{y}\t{p}\n" for i, y, p in zip(m["id"], m["y"], m["path"]))
        assert layout.files[name]["members"] == hashlib.sha1(text.encode()).hexdigest(), name


def test_a_split_table_without_arrivals_numbers_each_split_in_id_order(tmp_path):
    rows = [{"id": i, "label": "a", "path": f"{i}.png", "split": s}
            for i, s in (("c" * 40, "train"), ("a" * 40, "train"), ("b" * 40, "test"), ("d" * 40, "train"))]
    layout, members = layout_of(tmp_path, rows, per_shard=2)
    assert members["train-00000.tfrecord"]["id"].tolist() == ["a" * 40, "c" * 40]
    assert members["train-00001.tfrecord"]["id"].tolist() == ["d" * 40]
    assert members["test-00000.tfrecord"]["arrival"].tolist() == [0]
