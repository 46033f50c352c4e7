import json

import numpy as np

from stages import shards


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
