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
  members digest, in one process (`layout` and `members_digest`, as the stage does before it
  decodes anything).

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
from imgpipe.data.manifest import read_split
from imgpipe.model import shards
t = time.perf_counter()
frame = read_split(sys.argv[1])
used = frame[frame["split"].isin(("train", "val", "test"))]
index = {c: i for i, c in enumerate(sorted(frame["label"].unique()))}
files = shards.layout(used, index, 2048)
digests = {name: shards.members_digest(m) for name, m in files.items()}
print(f"{len(files)} files in {time.perf_counter() - t:.1f} s")
"""


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


def peak(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """(peak RSS in MB, seconds, the last lines of output) of `cmd` as a child process."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], cwd=cwd, env=environment(),
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 and "MAXRSS" not in proc.stderr:
        raise RuntimeError(proc.stderr[-3000:])
    rss = int(re.search(r"MAXRSS (\d+)", proc.stderr).group(1)) / 1024
    tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:-1])
    return rss, seconds, tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
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
        for stage in ("validate", "split", "rebalance"):
            rss, seconds, tail = peak([sys.executable, "-m", f"stages.{stage}"], work)
            row[stage] = {"peak_mb": round(rss), "seconds": round(seconds, 1)}
            print(f"{rows} rows, {stage}: {rss:.0f} MB, {seconds:.1f} s  [{tail}]", flush=True)
        rss, seconds, tail = peak([sys.executable, "-c", PREPROCESS_TABLE_WORK, "data/interim/split.csv"], work)
        row["preprocess_tables"] = {"peak_mb": round(rss), "seconds": round(seconds, 1)}
        print(f"{rows} rows, preprocess's table work: {rss:.0f} MB, {seconds:.1f} s  [{tail}]", flush=True)
        results.append(row)
    print(json.dumps(results, indent=1))
    (ROOT / "tables" / "results.json").write_text(json.dumps(results, indent=1))
    if len(results) > 1:
        a, b = results[0], results[-1]
        for key in ("validate", "split", "rebalance", "preprocess_tables"):
            print(f"{key}: {b[key]['peak_mb']} / {a[key]['peak_mb']} MB = {b[key]['peak_mb'] / a[key]['peak_mb']:.2f}x "
                  f"for {b['rows'] / a['rows']:.0f}x the rows")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(PROJECT))
    main()
