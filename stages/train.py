"""Train: the classifier, learnt from the preprocessed shards (imgpipe/model/training.py says how).

Reads  <paths.shards>/ (meta.json + TFRecords) and <paths.rebalance>/plan.json + copies.csv.
Writes <paths.model> (a .keras file) and <paths.train_log> (one row per epoch).
Keeps  cached features and an unfinished run's state in <runtime.train_cache_dir>: a killed run,
       re-run with the same inputs, resumes from its last finished epoch.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import keras
import tensorflow as tf

from imgpipe.model import shards
from imgpipe.core.atomic_write import atomic_path
from imgpipe.core.errors import StageError
from imgpipe.core.params import Base, Paths, Runtime, Train
from imgpipe.core.runner import stage_main
from imgpipe.model.training import TRAIN_LOG, exclusive, read_rebalance, run_fingerprint, save_model, train_phases

# the params sections `run` takes, in order (imgpipe/core/runner.py)
SECTIONS = ("train", "paths", "base", "runtime")
log = logging.getLogger(__name__)


def run(p: Train, paths: Paths, base: Base, runtime: Runtime) -> None:
    folder = Path(paths.shards)
    meta = shards.read_meta(folder)
    if not meta["counts"].get("train"):
        raise StageError(f"{folder}: the shards hold no training images")
    plan, copies = read_rebalance(Path(paths.rebalance), meta["counts"]["train"])
    if sum(copies.values()) == 0:
        raise StageError(f"{paths.rebalance}/copies.csv gives every training image 0 copies")

    keras.utils.set_random_seed(base.seed)  # Python, NumPy and TensorFlow: initial weights, dropout, shuffling
    if p.deterministic:
        tf.config.experimental.enable_op_determinism()
    run_dir = Path(runtime.train_cache_dir) / "runs" / run_fingerprint(p, base.seed, paths)
    with exclusive(run_dir):
        clf = train_phases(p, base.seed, paths, meta, plan, copies, run_dir, Path(runtime.train_cache_dir))
        save_model(clf.model, Path(paths.model))
        with atomic_path(paths.train_log) as tmp:
            shutil.copyfile(run_dir / TRAIN_LOG, tmp)
        shutil.rmtree(run_dir)
    log.info("saved %s", paths.model)


def main(argv: list[str] | None = None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
