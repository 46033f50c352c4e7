"""Statistics of the training shards, read back from the TFRecords, checked against meta.json.

A check worth having before training on a large dataset: per split, the shards, the records, the
records per class and the mean pixel value. The figures of each shard file are independent and
add up, so the work maps over the files (flows/scaleout.py runs one task per file on a Dask
cluster) and `split_summary` adds up the parts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgpipe.model import shards

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


def shard_files(meta: dict) -> list[tuple[str, str]]:
    """(split, file name) of every shard file meta.json lists: the units of work."""
    return [(split, file) for split, files in meta["files"].items() for file in files]


def shard_statistics(folder: str | Path, split: str, file: str) -> dict:
    """Statistics of one shard file of `split`, streamed batch by batch: {split, file, **figures}."""
    import tensorflow as tf  # here, so that summing and checking figures needs no TensorFlow

    meta = shards.read_meta(folder)
    # the readers take the files meta.json lists for a split: a copy listing only this file
    # reads this shard alone
    one_shard = {**meta, "files": {split: [file]}}
    parse = shards.parse_batch(meta, ("image", "label"))
    batches = shards.records(folder, split, one_shard).batch(BATCH_SIZE).map(parse)
    n_classes = len(meta["classes"])
    total = empty_statistics(n_classes)
    for batch in batches.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
        total = add_statistics(total, batch_statistics(batch["image"], batch["label"], n_classes))
    return {"split": split, "file": file, **total}


def split_summary(parts: list[dict], classes: list[str]) -> dict[str, dict]:
    """Per split, from per-shard statistics: shards, records, per-class records, pixel mean, and
    the addresses of the Dask workers that computed the parts (a part's `worker`, when recorded)."""
    totals: dict[str, dict] = {}
    shard_counts: dict[str, int] = {}
    workers: dict[str, set] = {}
    for part in parts:
        split = part["split"]
        totals[split] = add_statistics(totals.get(split, empty_statistics(len(classes))), part)
        shard_counts[split] = shard_counts.get(split, 0) + 1
        workers.setdefault(split, set()).update([part["worker"]] if part.get("worker") else [])
    return {
        split: {
            "shards": shard_counts[split],
            "records": total["records"],
            "per_class": dict(zip(classes, total["class_counts"], strict=True)),
            "pixel_mean": total["pixel_sum"] / total["pixels"] if total["pixels"] else None,
            "workers": sorted(workers[split]),
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


def checked_summary(folder: str | Path, parts: list[dict], meta: dict) -> dict[str, dict]:
    """`split_summary` of the parts; ShardsMismatch, listing every difference, when it disagrees
    with meta.json."""
    summary = split_summary(parts, meta["classes"])
    problems = mismatches(summary, meta)
    if problems:
        details = "\n".join(problems)
        raise ShardsMismatch(f"{folder}: the shards disagree with meta.json:\n{details}")
    return summary
