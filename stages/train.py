"""Train: the classifier, learnt from the preprocessed shards (imgpipe/model/training.py says how).

Reads  <paths.shards>/ (meta.json + TFRecords) and <paths.rebalance>/plan.json + copies.csv.
Writes <paths.model> (a .keras file) and <paths.train_log> (one row per epoch).
Keeps  cached features and an unfinished run's state in <runtime.train_cache_dir>: a killed run,
       re-run with the same inputs, resumes from its last finished epoch.

With TF_CONFIG naming several workers, this is one of them (docs/distributed-training.md): only
the chief writes the model and the train log; every worker keeps its run state in a temporary
folder, removed at the end (a killed multi-worker run starts over).
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path

import keras
import tensorflow as tf

from imgpipe.model import cluster as clusters
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
    cluster = clusters.from_environment()  # first: before TensorFlow does anything
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
    if cluster is not None:
        run_worker(cluster, p, paths, base, runtime, meta, plan, copies)
        return
    run_dir = Path(runtime.train_cache_dir) / "runs" / run_fingerprint(p, base.seed, paths)
    with exclusive(run_dir):
        clf = train_phases(p, base.seed, paths, meta, plan, copies, run_dir, runtime)
        save_model(clf.model, Path(paths.model))
        with atomic_path(paths.train_log) as tmp:
            shutil.copyfile(run_dir / TRAIN_LOG, tmp)
        shutil.rmtree(run_dir)
    log.info("saved %s", paths.model)


def run_worker(cluster: clusters.Cluster, p: Train, paths: Paths, base: Base, runtime: Runtime, meta: dict,
               plan: dict, copies: dict[str, int]) -> None:
    """One worker of a multi-worker run. Every worker saves, as TensorFlow's multi-worker guide
    asks (saving may read variables the workers hold together, which needs all of them), the
    others into their temporary folder; the chief's copies are the outputs.

    The run state stays in the temporary folder on every worker, chief included: resuming would
    need every worker to restore the same epoch, and each one's state is on its own machine.
    """
    with tempfile.TemporaryDirectory(prefix=f"imgpipe-train-worker{cluster.index}-") as tmp:
        run_dir = Path(tmp)
        log.info("%s: run state in %s (removed at the end; a killed multi-worker run starts over)",
                 cluster.describe(), run_dir)
        clf = train_phases(p, base.seed, paths, meta, plan, copies, run_dir, runtime, cluster)
        model_path = Path(paths.model) if cluster.chief else run_dir / "model" / Path(paths.model).name
        save_model(clf.model, model_path)
        if cluster.chief:
            with atomic_path(paths.train_log) as tmp_log:
                shutil.copyfile(run_dir / TRAIN_LOG, tmp_log)
    if cluster.chief:
        log.info("saved %s", paths.model)
    else:
        log.info("%s: wrote no outputs (the chief writes them); removed %s", cluster.describe(), run_dir)


def main(argv: list[str] | None = None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
