"""Benchmark workspaces: the project's real stages, run outside the repository on a chosen data set.

A workspace is a folder with its own params.yaml (the project's, plus overrides) where the
stages ingest -> rebalance run exactly as `dvc repro` runs them (`python -m stages.X`), so the
training benchmarks read real shards. Prepared once; later calls reuse it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared"
WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
# Fashion-MNIST's IDX files, from the Debian package dataset-fashion-mnist
FASHION = Path("/usr/share/datasets/fashion-mnist")
ROOT = Path(os.environ.get("IMGPIPE_BENCH_DIR", f"/tmp/imgpipe-bench-{os.getuid()}"))
DATA_STAGES = ("ingest", "validate", "split", "preprocess", "rebalance")

# The data sets of bench/RESULTS.md: name -> params.yaml overrides (section.key: value)
DATASETS = {
    # Fashion-MNIST capped at 1000 training images per class (the default before issue 16), 32x32 grey
    "fashion": {"ingest.source": str(PROJECT / "data" / "raw" / "fashion-mnist"),
                "split.max_train_per_class": 1000, "split.max_val_per_class": 200},
    # all of Fashion-MNIST: 60,000 training images (val carved from them by hash)
    "fashion-full": {"ingest.source": str(PROJECT / "data" / "raw" / "fashion-mnist"),
                     "split.max_train_per_class": 0, "split.max_val_per_class": 0},
    "flowers96": {"ingest.source": str(SHARED / "datasets" / "flowers5-128px" / "flowers"), "split.method": "hash",
                  "preprocess.colour_mode": "rgb", "preprocess.size": [96, 96]},
    "flowers128": {"ingest.source": str(SHARED / "datasets" / "flowers5-128px" / "flowers"), "split.method": "hash",
                   "preprocess.colour_mode": "rgb", "preprocess.size": [128, 128]},
}


def environment() -> dict:
    """The environment the stages run in: offline ImageNet weights, no telemetry, quiet TensorFlow."""
    keras_home = ROOT / "keras"
    (keras_home / "models").mkdir(parents=True, exist_ok=True)
    link = keras_home / "models" / WEIGHTS.name
    if not link.exists():
        link.symlink_to(WEIGHTS)
    return {**os.environ, "KERAS_HOME": str(keras_home), "PYTHONPATH": str(PROJECT), "DO_NOT_TRACK": "1",
            "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "2"}


def write_params(folder: Path, overrides: dict, name: str = "params.yaml") -> Path:
    """`name` in `folder`: the project's params.yaml, with `overrides` ({"section.key": value}) applied."""
    data = yaml.safe_load((PROJECT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        data[section][key] = value
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def prepare(name: str) -> Path:
    """The workspace of data set `name`, with shards and rebalance plan (built on first use)."""
    folder = ROOT / name
    done = folder / ".prepared"
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        write_params(folder, DATASETS[name])
        for stage in DATA_STAGES:
            run_stage(folder, stage)
        done.touch()
    return folder


def run_stage(folder: Path, stage: str, params: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"stages.{stage}"] + (["--params", str(params)] if params else [])
    proc = subprocess.run(cmd, cwd=folder, env=environment(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} failed in {folder}:\n{proc.stderr[-3000:]}")
    return proc


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(prepare(arg))


def fashion_splits():
    """(split, images [n, 28, 28] uint8, labels [n]) of Fashion-MNIST: train, then test (t10k)."""
    import gzip

    import numpy as np

    for split, prefix in (("train", "train"), ("test", "t10k")):
        with gzip.open(FASHION / f"{prefix}-images-idx3-ubyte.gz") as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(FASHION / f"{prefix}-labels-idx1-ubyte.gz") as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8)
        yield split, images, labels
