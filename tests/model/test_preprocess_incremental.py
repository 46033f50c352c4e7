"""preprocess after the data changes: only the shard files whose images changed are written, each
image of a kept file is taken from the old file instead of decoded again, and the folder is, byte
for byte, what a run from nothing writes on the same split table."""

import hashlib
import logging
import shutil

import pandas as pd
import pytest

from imgpipe.core.params import Split, params_from_dict
from imgpipe.data.splitting import assign, next_state
from imgpipe.model import shards
from stages import preprocess
from tests.data.test_ingest import flower_files

CLASSES = ("daisy", "rose", "tulip")
# balancing off: a new image of a small class would set aside images already in use (another file changes)
HASH = Split(method="hash", test_buckets=(0, 50), val_buckets=(51, 90), balance=False)


class World:
    """A source folder of real photos, its split table written through the split's own rules and
    state, as the split stage does run after run."""

    def __init__(self, tmp_path, per_class=16):
        self.tmp, self.source = tmp_path, tmp_path / "src"
        self.pool = {c: flower_files(per_class + 8, c) for c in CLASSES}
        for c in CLASSES:
            (self.source / c).mkdir(parents=True)
            for f in self.pool[c][:per_class]:
                shutil.copy(f, self.source / c / f.name)
        self.state = None

    def accepted(self) -> pd.DataFrame:
        rows = []
        for c in CLASSES:
            for f in sorted((self.source / c).iterdir()):
                rows.append({"id": hashlib.sha1(f.read_bytes()).hexdigest(), "label": c, "path": f"{c}/{f.name}"})
        return pd.DataFrame(rows)

    def split(self, name="split.csv"):
        out = assign(self.accepted(), HASH, self.state)
        self.state = next_state(self.state, out)
        out.to_csv(self.tmp / name, index=False)
        return out

    def params(self, shards_folder, workers=1, **preprocess):
        return params_from_dict({
            "runtime": {"workers": workers},
            "ingest": {"source": str(self.source)},
            "preprocess": {"size": [24, 24], "colour_mode": "rgb", "images_per_shard": 4, **preprocess},
            "paths": {"split": str(self.tmp / "split.csv"), "shards": str(self.tmp / shards_folder)}})


def run(params, caplog):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stages.preprocess"):
        preprocess.run(params.preprocess, params.paths, params.ingest, params.runtime)
    return caplog.text


def files(folder):
    """Every file of a shard folder: name -> (bytes, inode, mtime in ns)."""
    return {e.name: (e.read_bytes(), e.stat().st_ino, e.stat().st_mtime_ns) for e in sorted(folder.iterdir())}


def same_as_from_scratch(world, folder, caplog, **preprocess_params):
    """From nothing, and on a pool of two worker processes (the updates decode in the test's process)."""
    scratch = world.tmp / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    run(world.params("scratch", workers=2, **preprocess_params), caplog)
    got, want = files(folder), files(scratch)
    assert list(got) == list(want)
    assert [n for n in got if got[n][0] != want[n][0]] == []


def test_only_the_changed_files_are_written_and_the_result_is_a_from_scratch_run(tmp_path, caplog):
    world = World(tmp_path)
    world.split()
    params = world.params("shards")
    run(params, caplog)
    folder = tmp_path / "shards"
    same_as_from_scratch(world, folder, caplog)
    first = files(folder)

    # nothing changed: nothing written, not even meta.json
    assert "nothing to write" in run(params, caplog)
    assert files(folder) == first

    # new photos arrive: they take new arrival numbers, so only the last file of a split and new files change
    before_ids = set(world.accepted()["id"])
    for c in CLASSES:
        for f in world.pool[c][16:19]:
            shutil.copy(f, world.source / c / f.name)
    out = world.split()
    log = run(params, caplog)
    after = files(folder)
    new = out[~out["id"].isin(before_ids)]
    assert len(new) == 9 and (new["split"] != "unused").all()
    touched = {n for n in after if n != shards.META and after[n] != first.get(n)}
    assert touched == {shards.shard_name(s, int(a) // 4) for s, a in zip(new["split"], new["arrival"])}
    assert all(after[n] == first[n] for n in first if n not in touched | {shards.META})  # same bytes, inode and mtime
    assert "9 images decoded" in log, log  # the 9 new photos, nothing else
    assert len(touched) < len(after) / 2
    same_as_from_scratch(world, folder, caplog)

    # photos removed from the middle: only their files change, the rest of their images are not decoded
    gone = world.split().query("split == 'train'").sort_values("arrival").iloc[[1, 2]]
    for path in gone["path"]:
        (world.source / path).unlink()
    world.split()
    before = files(folder)
    log = run(params, caplog)
    after = files(folder)
    changed = {n for n in after if n != shards.META and after[n] != before.get(n)}
    assert changed == {"train-00000.tfrecord"}, changed
    assert "0 images decoded" in log and "2 taken from the old files" in log, log
    same_as_from_scratch(world, folder, caplog)

    # a photo moved to another class: same bytes, same id, another label; its pixels are not decoded again
    moved = world.split().query("split == 'train' and label == 'daisy'").iloc[0]
    shutil.move(world.source / moved["path"], world.source / "rose" / "moved.jpg")
    world.split()
    log = run(params, caplog)
    assert "0 images decoded" in log, log
    same_as_from_scratch(world, folder, caplog)

    # other pixel params: every file is written again, from the source
    params = world.params("shards", size=[20, 20])
    log = run(params, caplog)
    assert "0 of" in log and "0 taken from the old files" in log, log
    same_as_from_scratch(world, folder, caplog, size=[20, 20])


def test_a_run_killed_half_way_is_rebuilt_whole_and_litter_is_removed(tmp_path, caplog):
    world = World(tmp_path, per_class=8)
    world.split()
    params = world.params("shards")
    run(params, caplog)
    folder = tmp_path / "shards"
    # what a killed update leaves: meta.json deleted, a file half rewritten, a temporary file
    (folder / shards.META).unlink()
    (folder / "train-00000.tfrecord").write_bytes(b"half")
    (folder / ".train-00001.tfrecord.x.tmp").write_bytes(b"litter")
    log = run(params, caplog)
    assert "0 taken from the old files" in log, log
    same_as_from_scratch(world, folder, caplog)


@pytest.mark.parametrize("grow", ["test", "train"])
def test_dataset_standardisation_reuses_the_mean_while_train_is_unchanged(tmp_path, caplog, grow):
    world = World(tmp_path, per_class=10)
    out = world.split()
    standardize = {"normalization": "standardize", "standardize_scope": "dataset"}
    params = world.params("shards", **standardize)
    run(params, caplog)
    meta = shards.read_meta(tmp_path / "shards")
    # a new photo that hashes into `grow`, dropped in
    extra = next(f for c in CLASSES for f in world.pool[c][10:]
                 if assign(pd.DataFrame([{"id": hashlib.sha1(f.read_bytes()).hexdigest(), "label": c, "path": "x"}]),
                           HASH).loc[0, "split"] == grow)
    shutil.copy(extra, world.source / extra.parent.name / extra.name)
    assert len(world.split()) == len(out) + 1
    log = run(params, caplog)
    if grow == "test":  # train is the same: so is the mean, and train's photos are not decoded for it
        assert "train unchanged: its mean and std as last run's" in log, log
        assert shards.read_meta(tmp_path / "shards")["mean"] == meta["mean"]
        assert "1 images decoded" in log, log
    else:  # a new train image moves the mean: every pixel of every file changes
        assert f"train mean and std of {meta['counts']['train'] + 1} images" in log, log
        assert shards.read_meta(tmp_path / "shards")["mean"] != meta["mean"]
        assert "0 of" in log and "0 taken from the old files" in log, log
    same_as_from_scratch(world, tmp_path / "shards", caplog, **standardize)
