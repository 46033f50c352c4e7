"""The per-shard flow on a local Dask cluster (two worker processes), against a real Prefect server.

The test writes real TFRecord shards with the project's ShardWriter, then compares the flow's
figures with a direct, single-process read of the same shards, and the Dask workers each task
recorded with the workers of the cluster it started.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import StateType

from flows.scaleout import LOCAL_CLUSTER, shard_stats, task_runner
from imgpipe.model import shards
from imgpipe.model.shard_stats import (
    ShardsMismatch,
    checked_summary,
    mismatches,
    split_summary,
)
from tests.e2e.helpers import eventually

CLASSES = ["cat", "dog", "fox"]
# records per split, 4 per shard: train fills 3 shards (4 + 4 + 3), test 1
SPLITS = {"train": 11, "test": 3}
SHAPE = (6, 5, 1)


def write_shards(folder: Path) -> dict:
    """Random images with known labels, written as preprocess writes them; returns meta.json."""
    rng = np.random.default_rng(7)
    files, counts, class_counts = {}, {}, {}
    for split, n in SPLITS.items():
        labels = rng.integers(0, len(CLASSES), n)
        with shards.ShardWriter(folder, split, per_shard=4) as writer:
            for i, label in enumerate(labels):
                image = rng.random(SHAPE, dtype=np.float32)
                writer.write(image, int(label), f"{split}-{i:03d}", f"{CLASSES[label]}/{i}.png")
        files[split], counts[split] = writer.files, writer.count
        class_counts[split] = {name: int((labels == k).sum()) for k, name in enumerate(CLASSES)}
    meta = {
        "height": SHAPE[0], "width": SHAPE[1], "channels": SHAPE[2], "dtype": "float16",
        "classes": CLASSES, "counts": counts, "class_counts": class_counts, "files": files,
    }
    (folder / shards.META).write_text(json.dumps(meta))
    return meta


def direct_summary(folder: Path) -> dict:
    """The same figures in one process, record by record, through the project's own reader."""
    summary = {}
    for split in SPLITS:
        records = list(shards.iter_records(folder, split))
        pixels = np.concatenate([image.ravel() for image, *_ in records]).astype(np.float64)
        labels = [label for _, label, *_ in records]
        summary[split] = {
            "records": len(records),
            "per_class": {name: labels.count(k) for k, name in enumerate(CLASSES)},
            "pixel_mean": pixels.mean(),
        }
    return summary


# about 35 s: each of the two worker processes imports TensorFlow to read its shards
@pytest.mark.slow
def test_maps_one_task_per_shard_on_dask_and_matches_a_direct_read(prefect_api, client, tmp_path):
    meta = write_shards(tmp_path)
    assert [len(meta["files"][split]) for split in SPLITS] == [3, 1]

    # the flow's cluster settings, started here so that the test can ask the cluster who its workers are
    with LocalCluster(**LOCAL_CLUSTER) as cluster, Client(cluster) as dask:
        worker_pids = dask.run(os.getpid)  # {worker address: its process id}
        flow = shard_stats.with_options(task_runner=task_runner(address=cluster.scheduler_address))
        state = flow(str(tmp_path), return_state=True)
        summary = state.result()

    # every shard was read in one of the cluster's worker processes, none in the flow's (this one)
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids.values()
    workers = [address for split in SPLITS for address in summary[split]["workers"]]
    assert workers and set(workers) <= set(worker_pids), (workers, worker_pids)
    expected = direct_summary(tmp_path)
    assert {split: summary[split]["shards"] for split in SPLITS} == {"train": 3, "test": 1}
    for split in SPLITS:
        assert summary[split]["records"] == expected[split]["records"] == SPLITS[split]
        per_class = summary[split]["per_class"]
        assert per_class == expected[split]["per_class"] == meta["class_counts"][split]
        mean = summary[split]["pixel_mean"]
        assert mean == pytest.approx(expected[split]["pixel_mean"], rel=1e-9)
    # one task run per shard, each completed, on the server
    flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))

    def task_run_states():
        return sorted(run.state_type for run in client.read_task_runs(flow_run_filter=flow_run))

    expected_states = [StateType.COMPLETED] * 4
    assert eventually(lambda: task_run_states() == expected_states), task_run_states()


def test_split_summary_adds_up_shards_per_split():
    def part(split, records, class_counts, pixel_sum, pixels):
        return {"split": split, "file": "f", "records": records, "class_counts": class_counts,
                "pixel_sum": pixel_sum, "pixels": pixels}

    parts = [part("train", 2, [1, 1], 3.0, 8), part("train", 1, [0, 1], 1.0, 4),
             part("test", 1, [1, 0], 0.0, 4)]

    assert split_summary(parts, ["a", "b"]) == {
        "train": {"shards": 2, "records": 3, "per_class": {"a": 1, "b": 2}, "pixel_mean": 4.0 / 12, "workers": []},
        "test": {"shards": 1, "records": 1, "per_class": {"a": 1, "b": 0}, "pixel_mean": 0.0, "workers": []},
    }
    # the Dask workers that computed the parts, each once, sorted
    on_workers = [{**p, "worker": w} for p, w in zip(parts, ["tcp://b:2", "tcp://a:1", "tcp://b:2"])]
    assert {split: s["workers"] for split, s in split_summary(on_workers, ["a", "b"]).items()} == {
        "train": ["tcp://a:1", "tcp://b:2"], "test": ["tcp://b:2"]}


def test_mismatches_name_the_split_and_class_that_disagree_with_meta():
    summary = {"train": {"records": 3, "per_class": {"a": 1, "b": 2}}}
    meta = {
        "counts": {"train": 4, "val": 1},
        "class_counts": {"train": {"a": 2, "b": 2}, "val": {"a": 1}},
    }

    assert mismatches(summary, meta) == [
        "train: meta.json says 4 records, the shards hold 3",
        "train/a: meta.json says 2, the shards hold 1",
        "val: meta.json says 1 records, the shards hold 0",
        "val/a: meta.json says 1, the shards hold 0",
    ]


def test_checked_summary_returns_the_summary_or_raises_with_every_difference():
    parts = [{"split": "train", "file": "f", "records": 2, "class_counts": [1, 1], "pixel_sum": 2.0,
              "pixels": 8}]
    meta = {"classes": ["a", "b"], "counts": {"train": 2}, "class_counts": {"train": {"a": 1, "b": 1}}}

    assert checked_summary("shards", parts, meta) == split_summary(parts, ["a", "b"])
    claims_more = {**meta, "counts": {"train": 3}, "class_counts": {"train": {"a": 2, "b": 1}}}
    with pytest.raises(ShardsMismatch) as raised:
        checked_summary("shards", parts, claims_more)
    assert str(raised.value) == (
        "shards: the shards disagree with meta.json:\n"
        "train: meta.json says 3 records, the shards hold 2\n"
        "train/a: meta.json says 2, the shards hold 1"
    )
