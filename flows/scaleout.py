"""Per-shard work beyond one process: one Prefect task per TFRecord shard, run on a Dask cluster.

The shards that `preprocess` writes are independent files, so work on them maps over them:
`.map()` makes one task run per shard, and prefect-dask's DaskTaskRunner spreads those task runs
over the worker processes of a Dask cluster: a local one by default, or an existing one by its
scheduler's address. Workers on other machines need this project installed and the shard files
at the same path (a shared file system, or a `dvc pull` there first).

The work itself is a check worth having before training on a large dataset: per split, the
records, the records per class and the mean pixel value, read back from the TFRecords, and
compared with the counts meta.json claims.

    python -m flows.scaleout [--repo PATH] [--workers 2 | --address tcp://HOST:8786]
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner

from imgpipe.model import shards
from imgpipe.core.errors import StageError
from imgpipe.core.params import load_params

# One thread per worker process: TensorFlow decodes in its own threads, and two busy processes
# already fill this project's 2-core machines.
LOCAL_CLUSTER = {"n_workers": 2, "processes": True, "threads_per_worker": 1}
BATCH_SIZE = 256


class ShardsMismatch(ValueError):
    """The shards hold other counts than their meta.json says."""


def batch_statistics(images: np.ndarray, labels: np.ndarray, n_classes: int) -> dict:
    """Records, records per class index, and pixel sum and count of one batch."""
    return {
        "records": len(labels),
        "class_counts": np.bincount(labels, minlength=n_classes).tolist(),
        "pixel_sum": float(images.sum(dtype=np.float64)),
        "pixels": int(images.size),
    }


def add_statistics(a: dict, b: dict) -> dict:
    return {
        "records": a["records"] + b["records"],
        "class_counts": [x + y for x, y in zip(a["class_counts"], b["class_counts"], strict=True)],
        "pixel_sum": a["pixel_sum"] + b["pixel_sum"],
        "pixels": a["pixels"] + b["pixels"],
    }


def empty_statistics(n_classes: int) -> dict:
    return {"records": 0, "class_counts": [0] * n_classes, "pixel_sum": 0.0, "pixels": 0}


def split_summary(parts: list[dict], classes: list[str]) -> dict[str, dict]:
    """Per split, from per-shard statistics: shards, records, per-class records, pixel mean."""
    totals: dict[str, dict] = {}
    shard_counts: dict[str, int] = {}
    for part in parts:
        split = part["split"]
        totals[split] = add_statistics(totals.get(split, empty_statistics(len(classes))), part)
        shard_counts[split] = shard_counts.get(split, 0) + 1
    return {
        split: {
            "shards": shard_counts[split],
            "records": total["records"],
            "per_class": dict(zip(classes, total["class_counts"], strict=True)),
            "pixel_mean": total["pixel_sum"] / total["pixels"] if total["pixels"] else None,
        }
        for split, total in totals.items()
    }


def mismatches(summary: dict[str, dict], meta: dict) -> list[str]:
    """Where the shards' own counts differ from meta.json's `counts` and `class_counts`."""
    problems = []
    for split, claimed in meta["counts"].items():
        found = summary.get(split, {"records": 0, "per_class": {}})
        if found["records"] != claimed:
            problems.append(
                f"{split}: meta.json says {claimed} records, the shards hold {found['records']}"
            )
        for name, count in meta["class_counts"].get(split, {}).items():
            held = found["per_class"].get(name, 0)
            if held != count:
                problems.append(f"{split}/{name}: meta.json says {count}, the shards hold {held}")
    return problems


@task(cache_policy=NO_CACHE)
def shard_statistics(folder: str, split: str, file: str) -> dict:
    """Statistics of one shard file of `split`, streamed batch by batch."""
    meta = shards.read_meta(folder)
    # shards.dataset reads the files meta.json lists for the split: a copy listing only this
    # file reads this shard alone, with the format's own parser.
    one_shard = {**meta, "files": {split: [file]}}
    n_classes = len(meta["classes"])
    total = empty_statistics(n_classes)
    for batch in shards.dataset(folder, split, one_shard).batch(BATCH_SIZE).as_numpy_iterator():
        total = add_statistics(total, batch_statistics(batch["image"], batch["label"], n_classes))
    return {"split": split, "file": file, **total}


@flow(name="shard-statistics", task_runner=DaskTaskRunner(cluster_kwargs=LOCAL_CLUSTER))
def shard_stats(folder: str) -> dict[str, dict]:
    """Per split of the shard folder: shards, records, records per class and pixel mean, one task
    run per shard. Raises ShardsMismatch when the shards disagree with their meta.json."""
    folder = str(Path(folder).resolve())
    meta = shards.read_meta(folder)
    work = [(split, file) for split, files in meta["files"].items() for file in files]
    futures = shard_statistics.map(
        unmapped(folder), [split for split, _ in work], [file for _, file in work]
    )
    summary = split_summary(futures.result(), meta["classes"])
    problems = mismatches(summary, meta)
    if problems:
        details = "\n".join(problems)
        raise ShardsMismatch(f"{folder}: the shards disagree with meta.json:\n{details}")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.scaleout",
        description="Per-split statistics of the training shards, one Dask task per shard.",
    )
    parser.add_argument(
        "--repo", default=".", help="the repository whose params.yaml names the shards (default: .)"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--workers",
        type=int,
        default=LOCAL_CLUSTER["n_workers"],
        help="worker processes of a local Dask cluster (default: 2)",
    )
    where.add_argument(
        "--address", help="the scheduler of an existing Dask cluster, e.g. tcp://HOST:8786"
    )
    args = parser.parse_args(argv)
    folder = Path(args.repo) / load_params(Path(args.repo) / "params.yaml").paths.shards
    if args.address:
        runner = DaskTaskRunner(address=args.address)
    else:
        runner = DaskTaskRunner(cluster_kwargs={**LOCAL_CLUSTER, "n_workers": args.workers})
    try:
        summary = shard_stats.with_options(task_runner=runner)(str(folder))
    except (ShardsMismatch, StageError) as exc:
        sys.exit(f"shard statistics failed: {exc}")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
