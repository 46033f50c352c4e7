"""Peak memory of the table stages at N manifest rows (issue 14's "flat memory" benchmark).

A synthetic manifest of N rows (what ingest writes for N 28x28 grey PNGs of 10 classes: real
column types, random ids and perceptual hashes, so almost no near-duplicates; the image files
do not exist, the table work does not read them), then, each as its own process like `dvc
repro` runs it, with its peak resident memory (ru_maxrss of the child, from `/usr/bin/time`):

- validate (`python -m stages.validate`): triage, near-duplicate grouping, Great Expectations
  on the four tables, Data Docs, the summary pages (no thumbnails: the source does not exist);
- split (`python -m stages.split`);
- rebalance (`python -m stages.rebalance`);
- preprocess's table work: the split table read and laid out into shard files with each file's
  members digest, and every file's members streamed in order, in one process (`Layout.of` and
  `Layout.members`, what the stage does on a full run besides decoding and writing).

Without validate in `--stages`, the accepted list is made from the manifest in chunks
(`accepted_table`); without split, the split table (`split_table`): so that one stage can be
measured without running the ones before it.

Usage: .venv/bin/python bench/table_memory_bench.py --rows 100000 1000000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.workspace import PROJECT, ROOT, environment, write_params  # noqa: E402
from imgpipe.data.manifest import COLUMNS  # noqa: E402

PREPROCESS_TABLE_WORK = """
import sys, time
from imgpipe.data import tables
from imgpipe.model import shards
t = time.perf_counter()
with tables.connect() as con:
    columns = tables.read(con, sys.argv[1], "split table", "split", "split_table")
    con.execute("CREATE TEMP VIEW split AS SELECT * FROM split_table")
    layout = shards.Layout.of(con, 2048, arrival="arrival" in columns)
    images = sum(len(members) for _, members in layout.members(list(layout.files)))
print(f"{len(layout.files)} files, {images} images streamed in {time.perf_counter() - t:.1f} s")
"""
STAGES = ("validate", "split", "rebalance", "preprocess_tables")


def manifest(rows: int, path: Path) -> None:
    """A manifest of `rows` rows, written in chunks (the generator itself stays small)."""
    rng = np.random.default_rng(0)
    chunk = 200_000
    with path.open("w", encoding="utf-8", newline="") as fh:
        fh.write(",".join(COLUMNS) + "\n")
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            i = np.arange(start, start + n)
            ids = [hashlib.sha1(b"%d" % k).hexdigest() for k in i]
            labels = (i % 10).astype(str)
            frame = pd.DataFrame({
                "id": ids, "label": ["class" + c for c in labels],
                "path": [f"train/class{c}/{k:08d}.png" for c, k in zip(labels, i)],
                "source_split": "train", "format": "png", "width": 28, "height": 28, "channels": 1,
                "bit_depth": 8, "bytes": rng.integers(200, 400, n), "error": "",
                "sharpness": rng.random(n).round(2) * 1000, "brightness": rng.random(n).round(2) * 255,
                "contrast": rng.random(n).round(2) * 80,
                "phash": [f"{x:016x}" for x in rng.integers(0, 2**63, n, dtype=np.int64)],
                "phash_mirror": [f"{x:016x}" for x in rng.integers(0, 2**63, n, dtype=np.int64)],
            })[COLUMNS]
            frame.to_csv(fh, header=False, index=False, lineterminator="\n")


def split_table(manifest_path: Path, path: Path) -> None:
    """A split table for a manifest without running validate and split: each image in its own group, assigned by its bucket as split.method
    hash does with the default buckets, numbered in arrival order per split; written in chunks."""
    taken = {"train": 0, "val": 0, "test": 0}
    with path.open("w", encoding="utf-8", newline="") as fh:
        for i, chunk in enumerate(pd.read_csv(manifest_path, dtype=str, keep_default_na=False, chunksize=200_000)):
            bucket = chunk["id"].str[-2:].map(lambda h: int(h, 16))
            assigned = np.where(bucket <= 25, "test", np.where(bucket <= 51, "val", "train"))
            arrival = np.zeros(len(chunk), dtype=np.int64)
            for name in taken:
                mask = assigned == name
                arrival[mask] = taken[name] + np.arange(mask.sum())
                taken[name] += int(mask.sum())
            chunk = chunk.assign(group=chunk["id"], bucket=bucket, assigned=assigned, arrival=arrival,
                                 split=assigned, reason="")
            chunk.to_csv(fh, header=i == 0, index=False, lineterminator="\n")


def accepted_table(manifest_path: Path, path: Path) -> None:
    """An accepted list for a manifest without running validate: every row accepted, each image its
    own near-duplicate group (what validate writes for these random hashes); written in chunks."""
    with path.open("w", encoding="utf-8", newline="") as fh:
        for i, chunk in enumerate(pd.read_csv(manifest_path, dtype=str, keep_default_na=False, chunksize=200_000)):
            chunk.assign(group=chunk["id"]).to_csv(fh, header=i == 0, index=False, lineterminator="\n")


def peak(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """(peak RSS in MB, seconds, the last lines of output) of `cmd` as a child process."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], cwd=cwd, env=environment(),
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"MAXRSS (\d+)", proc.stderr).group(1)) / 1024
    tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:-1])
    return rss, seconds, tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="without validate and split, the split table is made by split_table()")
    args = parser.parse_args()
    results = []
    for rows in args.rows:
        work = ROOT / "tables" / str(rows)
        work.mkdir(parents=True, exist_ok=True)
        (work / "data" / "interim").mkdir(parents=True, exist_ok=True)
        write_params(work, {"ingest.source": str(work / "no-images"), "split.method": "hash",
                            "split.max_train_per_class": 0, "split.max_val_per_class": 0,
                            "validate.min_images_per_class": 1})
        if not (work / "data/interim/manifest.csv").exists():
            manifest(rows, work / "data/interim/manifest.csv")
        (work / "data/interim/split_state.csv").unlink(missing_ok=True)
        row = {"rows": rows, "manifest_mb": round((work / "data/interim/manifest.csv").stat().st_size / 2**20, 1)}
        if "split" not in args.stages:
            split_table(work / "data/interim/manifest.csv", work / "data/interim/split.csv")
        elif "validate" not in args.stages:
            accepted_table(work / "data/interim/manifest.csv", work / "data/interim/accepted.csv")
        for stage in args.stages:
            cmd = ([sys.executable, "-c", PREPROCESS_TABLE_WORK, "data/interim/split.csv"] if stage == "preprocess_tables"
                   else [sys.executable, "-m", f"stages.{stage}"])
            rss, seconds, tail = peak(cmd, work)
            row[stage] = {"peak_mb": round(rss), "seconds": round(seconds, 1)}
            print(f"{rows} rows, {stage}: {rss:.0f} MB, {seconds:.1f} s  [{tail}]", flush=True)
        results.append(row)
    print(json.dumps(results, indent=1))
    (ROOT / "tables" / f"results-{'-'.join(args.stages)}.json").write_text(json.dumps(results, indent=1))
    if len(results) > 1:
        a, b = results[0], results[-1]
        for key in args.stages:
            print(f"{key}: {b[key]['peak_mb']} / {a[key]['peak_mb']} MB = {b[key]['peak_mb'] / a[key]['peak_mb']:.2f}x "
                  f"for {b['rows'] / a['rows']:.0f}x the rows")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(PROJECT))
    main()
