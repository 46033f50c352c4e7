"""Training on several machines: the cluster that TF_CONFIG describes (docs/distributed-training.md).

With TF_CONFIG naming more than one task, training runs under MultiWorkerMirroredStrategy:
every worker holds a copy of the model, reads its own shard files, and the gradients of each
step are summed over all of them, so a step is one batch of train.batch_size images (the global
batch) split between the workers. The chief (the task of type `chief`, else worker 0) writes
the outputs; the others write theirs into a temporary folder that is removed.

Without TF_CONFIG, or with a single task in it, nothing here runs: `from_environment` is None.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

import tensorflow as tf

from imgpipe.core.errors import StageError

log = logging.getLogger(__name__)

# the task types that train; a TF_CONFIG naming this task `evaluator` or `ps` is another setup
TRAINING_TASKS = ("chief", "worker")


@dataclasses.dataclass(frozen=True)
class Cluster:
    """This process's place in the cluster, and the strategy that spans it."""

    workers: int  # the training tasks (chief included)
    index: int  # this task's position among them, the chief first: which shard files it reads
    task: str  # as TF_CONFIG names it, e.g. "worker:1"
    strategy: tf.distribute.Strategy

    @property
    def chief(self) -> bool:
        return self.index == 0

    def describe(self) -> str:
        role = "the chief" if self.chief else "not the chief"
        return f"worker {self.index} of {self.workers} ({self.task}, {role})"


_STRATEGY: list[tf.distribute.Strategy] = []  # one per process: TensorFlow allows one


def from_environment() -> Cluster | None:
    """The cluster of TF_CONFIG, its strategy created; None without TF_CONFIG or with one task in it.

    Must run before TensorFlow does any work in this process: the collective ops the strategy
    needs are configured when TensorFlow starts.
    """
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
        tasks = config["cluster"]
        task_type, task_id = config["task"]["type"], int(config["task"]["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise StageError(f"TF_CONFIG must be JSON with cluster and task.type / task.index: {exc}") from None
    members = [(kind, i) for kind in TRAINING_TASKS for i in range(len(tasks.get(kind) or []))]
    if (task_type, task_id) not in members:
        raise StageError(f"TF_CONFIG: this task ({task_type}:{task_id}) is not one of the cluster's training tasks "
                         f"({', '.join(f'{k}:{i}' for k, i in members) or 'none'}); only chief and worker tasks train")
    if len(members) == 1:
        log.info("TF_CONFIG names one task: training on this machine alone")
        return None
    if not _STRATEGY:
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        _STRATEGY.append(tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver))
    cluster = Cluster(len(members), members.index((task_type, task_id)), f"{task_type}:{task_id}", _STRATEGY[0])
    log.info("multi-worker training (MultiWorkerMirroredStrategy): %s; %d replica(s) in sync over the cluster",
             cluster.describe(), cluster.strategy.num_replicas_in_sync)
    return cluster


def worker_files(files: list[str], cluster: Cluster, split: str = "train") -> list[str]:
    """The files of `split` this worker reads: every `workers`-th, from its index (as tf.data's
    AutoShardPolicy.FILE deals them out).

    Fewer files than workers is an error, not a fall-back to reading every file and keeping
    every n-th record (AutoShardPolicy.DATA): that reads the whole split on every machine, n
    times the I/O, silently.
    """
    if len(files) < cluster.workers:
        raise StageError(
            f"the {split} split has {len(files)} shard file(s) for {cluster.workers} workers: each worker reads its "
            f"own files, so it needs at least {cluster.workers}; re-run preprocess with a smaller "
            "preprocess.images_per_shard, or train on fewer machines"
        )
    return files[cluster.index::cluster.workers]


def adapt_for_fit(model) -> None:
    """Let Keras 3's fit() run `model` under MultiWorkerMirroredStrategy: two of its steps fail
    there (Keras 3.15, TensorFlow 2.21; keras-team/keras#20585, tensorflow/tensorflow#72388).

    - Before the first step, fit() and evaluate() average the first distributed batch with
      strategy.reduce to get its shapes, which this strategy refuses (it cannot convert the
      PerReplica batch). The shapes are in the dataset's element_spec: the model, metrics and
      optimizer are built from that instead.
    - After each step, fit() and evaluate() average each scalar log over the replicas with
      strategy.reduce(..., axis=0), which fails on a scalar. The steps return them as vectors
      of one value. (The epoch's logs are read from the metrics afterwards, summed over every
      worker: those are the logs the callbacks see, the same on every worker.)
    """
    if getattr(model, "_imgpipe_multi_worker", False):
        return

    def symbolic_build(iterator=None, data_batch=None):
        if data_batch is None:
            data_batch = iterator.data_adapter.get_tf_dataset().element_spec  # TensorSpecs: shapes and dtypes
        with model.distribute_strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    def one_value_vectors(step):
        @functools.wraps(step)
        def wrapped(data):
            return {k: tf.reshape(v, [1]) if v.shape.rank == 0 else v for k, v in step(data).items()}
        return wrapped

    model._maybe_symbolic_build = symbolic_build
    model.train_step = one_value_vectors(model.train_step)
    model.test_step = one_value_vectors(model.test_step)
    model._imgpipe_multi_worker = True
