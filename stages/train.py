"""Train: transfer learning in two phases on the preprocessed shards, resumable after a kill.

Reads  <paths.shards>/ (meta.json + TFRecords) and <paths.rebalance>/plan.json + copies.csv.
Writes <paths.model> (a .keras file) and <paths.reports>/train_log.csv (one row per epoch).

Phase 1 trains the head on the frozen backbone (lenet, learnt from scratch, trains whole).
When nothing in it changes the backbone's features (a frozen backbone, no augmentation in
phase 1) the features come from the embedding cache (imgpipe/model/feature_cache.py): computed once per
image, then every epoch and every head-only run reads them instead of running the backbone.
Phase 2 (train.fine_tune_epochs > 0) unfreezes the top train.fine_tune_layers layers of the
backbone and trains on the images at train.fine_tune_learning_rate, with augmentation if any
(train.augment_in_phase1: false keeps it for phase 2 only, so that phase 1 can use the cache).

Images stream from the shards through tf.data (files read in parallel, records shuffled in a
bounded buffer, whole batches parsed at once, prefetching), so memory stays flat however large
the data set is; the rebalance plan is applied in the same stream (copies per image, or class
weights in the loss), never by writing a rebalanced copy of the data.

A run keeps its state in <train.cache_dir>/runs/<fingerprint of its inputs>/: Keras'
BackupAndRestore backup of the current phase, the weights after phase 1, the best epoch's
weights, and the log so far. A killed run re-run with the same inputs resumes from its last
finished epoch; a finished run deletes the folder.
"""

from __future__ import annotations

import logging
import sys
import shutil
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
