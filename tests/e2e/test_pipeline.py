"""The whole pipeline in a real temporary git + DVC repository, on real photos.

One module-scoped clone runs `dvc repro` once (a few minutes on 2 cores); the tests then
check what DVC re-runs after each kind of change.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pandas as pd
import pytest
import yaml

from imgpipe.core.params import Paths
from imgpipe.model import shards

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]
SHARED = PROJECT.parent / "shared"
FLOWERS = SHARED / "datasets" / "flowers5-128px" / "flowers"
WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
PROJECT_FILES = ["stages", "imgpipe", "flows", "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore",
                 ".gitignore", "data/.gitkeep", "models/.gitkeep", "models/warm_start/README.md", "reports/.gitkeep",
                 "gx/great_expectations.yml", "gx/.gitignore", "web/package.json", "web/package-lock.json"]
CLASSES = {"daisy": 40, "rose": 30, "tulip": 36}  # small, real and imbalanced

# small and fast, but every stage does its real work
SMALL_RUN = {
    "ingest.source": "data/raw/flowers-small",
    "validate.min_images_per_class": 5,
    "split.method": "hash",
    "split.test_buckets": [0, 50],
    "split.val_buckets": [51, 90],
    "split.max_train_per_class": 0,
    "split.max_val_per_class": 0,
    "preprocess.colour_mode": "rgb",
    "preprocess.size": [48, 48],
    "train.backbone_size": 64,
    "train.epochs": 2,
    # fewer than train.epochs: a warm-started run is told apart by its log
    "train.warm_start_epochs": 1,
    "train.batch_size": 16,
    # no augmentation: phase 1 on cached features (the default flip trains on images, slower)
    "train.augment_flip": "none",
    # several files per split, so that what an update leaves untouched shows
    "preprocess.images_per_shard": 16,
}


def sh(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def set_params(repo: Path, changes: dict) -> None:
    path = repo / "params.yaml"
    data = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        data[section][key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def stage_env(keras_home: Path) -> dict:
    """What the stages run with: the offline ImageNet weights in `keras_home`, this Python first on PATH."""
    (keras_home / "models").mkdir(parents=True, exist_ok=True)
    (keras_home / "models" / WEIGHTS.name).symlink_to(WEIGHTS)
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": venv_bin + os.pathsep + os.environ["PATH"], "KERAS_HOME": str(keras_home),
            "DO_NOT_TRACK": "1", "GX_ANALYTICS_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "2",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    return stage_env(tmp_path_factory.mktemp("keras"))


def make_origin(root: Path, env: dict) -> Path:
    """A repository holding the project's files, as a user's remote would."""
    origin = root / "origin"
    for name in PROJECT_FILES:
        src, dst = PROJECT / name, origin / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    sh(["git", "init", "-q", "-b", "main"], origin, env)
    sh(["git", "add", "-A"], origin, env)
    sh(["git", "commit", "-qm", "project"], origin, env)
    return origin


def clone_with_small_data(origin: Path, dest: Path, env: dict) -> Path:
    sh(["git", "clone", "-q", str(origin), str(dest)], dest.parent, env)
    raw = dest / "data" / "raw" / "flowers-small"
    for cls, n in CLASSES.items():
        (raw / cls).mkdir(parents=True)
        for f in sorted((FLOWERS / cls).glob("*.jpg"))[:n]:
            shutil.copy(f, raw / cls / f.name)
    sh([sys.executable, "-m", "dvc", "add", "-q", "data/raw/flowers-small"], dest, env)
    set_params(dest, SMALL_RUN)
    return dest


@pytest.fixture(scope="module")
def repo(tmp_path_factory, env):
    root = tmp_path_factory.mktemp("e2e")
    clone = clone_with_small_data(make_origin(root, env), root / "clone", env)
    first = sh([sys.executable, "-m", "dvc", "repro"], clone, env)
    return clone, first.stdout


def dvc(repo: Path, env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "dvc", *args], repo, env, check=check)


def test_first_repro_runs_every_stage_and_evaluates(repo):
    clone, output = repo
    assert ran_stages(output) == ["ingest", "validate", "split", "preprocess", "rebalance", "train", "evaluate"]
    metrics = json.loads((clone / "reports" / "metrics.json").read_text())
    assert set(metrics["per_class"]) == set(CLASSES)
    assert (clone / "models" / "model.keras").stat().st_size > 100_000
    summary = json.loads((clone / "reports" / "data_quality" / "summary.json").read_text())
    quarantine = (clone / "reports" / "data_quality" / "quarantine.csv").read_text()
    # the photos the test copied (counted by it), none of them bad: an empty quarantine list
    assert (summary["inputs"], summary["quarantined"], quarantine) == (sum(CLASSES.values()), 0, "path,reason,detail\n")
    confusion = (clone / "reports" / "confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) - 1 == metrics["num_test"]
    # the accuracy is the share of test images the confusion rows put on the diagonal
    right = sum(1 for line in confusion[1:] if len(set(line.split(","))) == 1)
    assert metrics["accuracy"] == pytest.approx(right / metrics["num_test"])


def test_second_repro_runs_nothing(repo, env):
    clone, _ = repo
    out = dvc(clone, env, "repro").stdout
    assert ran_stages(out) == [] and "up to date" in out


def test_a_runtime_change_reruns_nothing(repo, env):
    """runtime: changes how fast, never what: no stage lists it."""
    clone, _ = repo
    set_params(clone, {"runtime.workers": 1, "runtime.ingest_cache_dir": ""})
    assert ran_stages(dvc(clone, env, "repro").stdout) == []


def test_a_code_change_reruns_the_stages_that_import_it(repo, env):
    """dvc.yaml's code deps: the model package is imported by preprocess (shards), train and evaluate."""
    clone, _ = repo
    with open(clone / "imgpipe" / "model" / "training.py", "a", encoding="utf-8") as fh:
        fh.write("\n# a change DVC must see\n")
    assert ran_stages(dvc(clone, env, "repro").stdout) == ["preprocess", "train", "evaluate"]


def test_train_param_change_reruns_only_train_and_evaluate(repo, env):
    clone, _ = repo
    set_params(clone, {"train.epochs": 1})
    assert ran_stages(dvc(clone, env, "repro").stdout) == ["train", "evaluate"]


def test_preprocess_param_change_reruns_preprocess_and_what_follows(repo, env):
    clone, _ = repo
    set_params(clone, {"preprocess.size": [40, 40]})
    assert ran_stages(dvc(clone, env, "repro").stdout) == ["preprocess", "train", "evaluate"]


def test_dvc_status_sees_a_change_to_the_raw_images(repo, env):
    clone, _ = repo
    assert "up to date" in dvc(clone, env, "status").stdout
    extra = sorted((FLOWERS / "rose").glob("*.jpg"))[-1]
    shutil.copy(extra, clone / "data" / "raw" / "flowers-small" / "rose" / extra.name)
    status = dvc(clone, env, "status").stdout
    assert "data/raw/flowers-small" in status and "changed" in status
    dvc(clone, env, "add", "-q", "data/raw/flowers-small")
    assert ran_stages(dvc(clone, env, "repro", "split").stdout) == ["ingest", "validate", "split"]


def shard_files(clone: Path) -> dict:
    """Each file of the shard folder: name -> (inode, mtime in ns, bytes)."""
    folder = clone / Paths().shards
    return {e.name: (e.stat().st_ino, e.stat().st_mtime_ns, e.read_bytes()) for e in folder.iterdir()}


def test_new_raw_images_never_move_an_assigned_image(repo, env):
    """The nightly promise: images added to the raw folder are assigned, and no image assigned
    before changes `assigned` (split's state, a persist output, carries it from run to run)."""
    clone, _ = repo
    paths = Paths()

    def table() -> pd.DataFrame:
        return pd.read_csv(clone / paths.split, dtype=str, keep_default_na=False).set_index("id")

    dvc(clone, env, "repro", "preprocess")  # the shards of the data as it is before the new photos
    before, shards_before = table(), shard_files(clone)
    raw = clone / "data" / "raw" / "flowers-small"
    for cls, n in CLASSES.items():  # 5 new photos a class, never used by the other tests
        for f in sorted((FLOWERS / cls).glob("*.jpg"))[n + 10:n + 15]:
            shutil.copy(f, raw / cls / f.name)
    dvc(clone, env, "add", "-q", "data/raw/flowers-small")
    assert ran_stages(dvc(clone, env, "repro", "split").stdout) == ["ingest", "validate", "split"]
    after = table()
    assert len(after.index.difference(before.index)) == 5 * len(CLASSES)
    assert (after.loc[before.index, "assigned"] == before["assigned"]).all()
    assert ((after["split"] == after["assigned"]) | (after["split"] == "unused")).all()
    state = (clone / paths.split_state).read_text().splitlines()
    assert state[0].startswith("# imgpipe split state, made with") and state[1] == "id,assigned,arrival"
    assert {line.split(",")[0] for line in state[2:]} == set(after.index)
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]["split"]
    assert {o["path"] for o in lock["outs"]} == {paths.split, paths.split_state}

    # preprocess writes only the files the new images go to (their split's arrival numbers); the
    # others keep their bytes, inode and modification time through DVC's run and commit
    assert ran_stages(dvc(clone, env, "repro", "preprocess").stdout) == ["preprocess"]
    shards_now = shard_files(clone)

    def placed(t: pd.DataFrame) -> set:  # (image, its file) by the documented layout
        return {(i, shards.shard_name(s, int(a) // 16)) for i, s, a in zip(t.index, t["split"], t["arrival"]) if s != "unused"}

    written = {name for _, name in placed(before) ^ placed(after)}  # the files whose images changed
    changed = {n for n in shards_now if n != shards.META and shards_now[n] != shards_before.get(n)}
    assert changed == written and len(written) < len(shards_now) - 1, (changed, written, sorted(shards_now))
    assert len(shards_now) - 1 == sum(len(v) for v in shards.read_meta(clone / paths.shards)["files"].values())
    # the documented reset: delete the state, and DVC runs split again (not restored from its run-cache)
    (clone / paths.split_state).unlink()
    assert ran_stages(dvc(clone, env, "repro", "split").stdout) == ["split"]
    assert (clone / paths.split_state).is_file()


def test_an_image_changed_in_place_reaches_every_stage_that_reads_it(repo, env):
    """Only ingest lists the raw folder as a DVC dependency; validate and preprocess, which also
    read images from it, see a file's new bytes through the manifest (`id` is their sha1)."""
    clone, _ = repo
    paths = Paths()
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    assert [s for s, v in lock.items() if any(d["path"] == "data/raw/flowers-small" for d in v["deps"])] == ["ingest"]
    dvc(clone, env, "repro", "preprocess")
    table = pd.read_csv(clone / paths.split, dtype=str, keep_default_na=False)
    used = table[table["split"] == "train"].iloc[0]
    target = clone / "data" / "raw" / "flowers-small" / used["path"]
    image = cv2.imread(str(target))
    cv2.imwrite(str(target), cv2.flip(image, 0), [cv2.IMWRITE_JPEG_QUALITY, 90])  # upside down: new bytes, same path
    dvc(clone, env, "add", "-q", "data/raw/flowers-small")
    assert ran_stages(dvc(clone, env, "repro", "preprocess").stdout) == ["ingest", "validate", "split", "preprocess"]
    now = pd.read_csv(clone / paths.split, dtype=str, keep_default_na=False).set_index("path")
    assert now.loc[used["path"], "id"] != used["id"] and used["id"] not in set(now["id"])
    stored = {i for s in ("train", "val", "test") for i in shards.ids_and_labels(clone / paths.shards, s)[0].tolist()}
    assert used["id"].encode() not in stored
    assert (now.loc[used["path"], "id"].encode() in stored) == (now.loc[used["path"], "split"] != "unused")


def test_same_inputs_and_params_give_the_same_bytes(repo, env, tmp_path):
    """A second, independent clone reproduces manifest, split and shards byte for byte."""
    clone, _ = repo
    origin = clone.parent / "origin"
    other = clone_with_small_data(origin, tmp_path / "other", env)
    dvc(other, env, "repro", "preprocess")
    dvc(other, env, "repro", "preprocess")  # nothing changes on a re-run either
    again = clone_with_small_data(origin, tmp_path / "again", env)
    dvc(again, env, "repro", "preprocess")

    def hashes(repo_dir: Path) -> dict:
        lock = yaml.safe_load((repo_dir / "dvc.lock").read_text())["stages"]
        return {o["path"]: o["md5"] for name in ("ingest", "split", "preprocess") for o in lock[name]["outs"]}

    assert hashes(other) == hashes(again)
    paths = Paths()
    assert {paths.manifest, paths.split, paths.split_state, paths.shards} <= set(hashes(other))


def test_bad_params_and_missing_source_are_clear_errors(repo, env, tmp_path):
    clone, _ = repo
    broken = tmp_path / "broken"
    shutil.copytree(clone, broken, ignore=shutil.ignore_patterns(".dvc", "data", "models", "reports"))
    set_params(broken, {"ingest.source": "data/raw/nowhere"})
    proc = sh([sys.executable, "-m", "stages.ingest"], broken, env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "ingest: error: ingest.source data/raw/nowhere does not exist" in proc.stderr
    text = (broken / "params.yaml").read_text().replace("  epochs:", "  epoch:")
    (broken / "params.yaml").write_text(text)
    proc = sh([sys.executable, "-m", "stages.split"], broken, env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "unknown key 'train.epoch' (did you mean 'epochs'?)" in proc.stderr
