"""preprocess: every image of the split table (`paths.split`) in use made training-ready
(imgpipe/images/transforms.py) and written to shards (`paths.shards`, imgpipe/model/shards.py).

The shards are updated in place (a `persist` output in dvc.yaml): a file whose images are the
same as the last run's, with the same pixel params, is left as it is; one that changed is
rewritten, from the pixels the old file held for the images it keeps and from the source for
the new ones. The folder then holds exactly what a run from nothing would write, byte for byte.
An update deletes meta.json before it changes a file and writes it last, so a run killed
half-way leaves a folder the next run rebuilds whole.
With `standardize_scope: dataset`, a first streaming pass over train gives the mean and std
(skipped when train holds the same images as last time); a new mean changes every file.
Images are decoded and transformed on `runtime.workers` processes, or on a Dask cluster with
`runtime.executor: dask` (imgpipe/data/parallel.py, imgpipe/model/encoding.py): same bytes.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from imgpipe.core.atomic_write import atomic_path, write_json
from imgpipe.core.errors import StageError
from imgpipe.core.params import Ingest, Paths, Preprocess, Runtime
from imgpipe.core.runner import stage_main
from imgpipe.data import tables
from imgpipe.data.parallel import Batches, available_cores
from imgpipe.data.sources import Source, is_url
from imgpipe.images.transforms import ChannelStats
from imgpipe.model import encoding, shards

SPLITS = ("train", "val", "test")
# the params sections `run` takes, in order (imgpipe/core/runner.py)
SECTIONS = ("preprocess", "paths", "ingest", "runtime")
log = logging.getLogger(__name__)


def train_stats(runner: Batches, ingest: Ingest, layout: shards.Layout, p: Preprocess, channels: int):
    train = [name for name in layout.files if name.startswith("train-")]
    size = encoding.job_size(runner.on_dask, p)
    paths = (path for _, members in layout.members(train) for path in members["path"])
    stats = ChannelStats(channels)
    jobs = ((ingest, p, channels, batch) for batch in encoding.chunks(paths, size))
    with tqdm(total=layout.counts["train"], desc="train mean/std", unit="img", mininterval=2, disable=None) as bar:
        for part in runner.map(encoding.channel_sums, jobs):  # in order: the same sums whatever runs them
            stats.merge(part)
            bar.update(part.n // (p.size[0] * p.size[1]))
    return stats.mean_std()


def run(p: Preprocess, paths: Paths, ingest: Ingest, runtime: Runtime | None = None) -> None:
    runtime = runtime or Runtime()
    with tables.connect() as con:
        columns = tables.read(con, paths.split, "split table", "split", "split_table")
        con.execute("CREATE TEMP VIEW split AS SELECT * FROM split_table")
        layout = tables.guarded(lambda: shards.Layout.of(con, p.images_per_shard, SPLITS, "arrival" in columns),
                                f"{paths.split}: not a readable split table")
        write_shards(p, paths, ingest, runtime, layout)


def write_shards(p: Preprocess, paths: Paths, ingest: Ingest, runtime: Runtime, layout: shards.Layout) -> None:
    channels = 1 if p.colour_mode == "grey" else 3
    if not layout.counts["train"]:
        raise StageError(f"{paths.split} has no training images")
    folder = Path(paths.shards)
    files = layout.files
    digests = {name: entry["members"] for name, entry in files.items()}
    old = shards.previous_meta(folder)
    if old is not None and old.get("preprocess") != shards.pixel_params(p):
        old = None  # other pixels: nothing of the old files can be kept

    Source.from_params(ingest).close()  # a missing or unreadable source: an error before any work
    workers = runtime.workers or available_cores()
    with Batches(runtime.executor, workers, runtime.scheduler) as runner:
        if runner.on_dask and not is_url(ingest.source):
            # the workers start in their own folders, maybe on other machines, and must see the
            # source's folder as this machine does (asked about one image, when the cluster is reached)
            ingest = dataclasses.replace(ingest, source=os.path.abspath(ingest.source))
            one = layout.any_path()
            if one is not None:
                runner.needs([os.path.join(ingest.source, one)], "ingest.source")
        mean = std = None
        if p.normalization == "standardize" and p.standardize_scope == "dataset":
            same_train = old is not None and {n: d for n, d in digests.items() if n.startswith("train-")} == {
                n: e["members"] for n, e in old.get("shards", {}).items() if n.startswith("train-")}
            if same_train:
                mean, std = old["mean"], old["std"]
                log.info("train unchanged: its mean and std as last run's, %s and %s", mean, std)
            else:
                mean, std = train_stats(runner, ingest, layout, p, channels)
                log.info("train mean and std of %d images: %s and %s", layout.counts["train"], mean, std)
        if old is not None and (old.get("mean"), old.get("std")) != (mean, std):
            old = None
        keep = shards.kept(folder, digests, old)
        meta = {
            "height": p.size[0], "width": p.size[1], "channels": channels, "dtype": "float16",
            "classes": layout.classes,
            "counts": layout.counts,
            "class_counts": layout.class_counts,
            "files": {s: [n for n in files if n.startswith(f"{s}-")] for s in SPLITS},
            "mean": mean, "std": std,
            # every param that decides the pixels (once: the export, train and the feature cache read it here)
            "preprocess": shards.pixel_params(p),
            "images_per_shard": p.images_per_shard,
            "shards": files,
        }
        stale = [e for e in folder.iterdir() if e.name not in files and e.name != shards.META] if folder.is_dir() else []
        if len(keep) == len(files) and not stale and old == json.loads(json.dumps(meta)):
            log.info("shards up to date: %d files, nothing to write", len(files))
            return
        folder.mkdir(parents=True, exist_ok=True)
        (folder / shards.META).unlink(missing_ok=True)  # from here on, the folder is not a finished run's
        update(runner, ingest, folder, layout, keep, old, p, mean, std)
        for entry in stale:  # files of no image any more, and what a killed run left
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else entry.unlink(missing_ok=True)
        write_json(folder / shards.META, meta)
    for s in SPLITS:
        log.info("%s: %d images in %d shards", s, meta["counts"][s], len(meta["files"][s]))


def update(runner: Batches, ingest: Ingest, folder: Path, layout: shards.Layout, keep: set[str],
           old: dict | None, p: Preprocess, mean, std) -> None:
    """Write every file of the layout not in `keep`: the records the old files hold with the same
    pixels (`old` is not None) copied, the other images decoded by `runner`'s workers. The next
    file's images are sent to the workers before this file's are waited for."""
    todo = [name for name in layout.files if name not in keep]
    old_per_shard = (old or {}).get("images_per_shard")

    def start(name: str, members: pd.DataFrame):
        split = name.split("-")[0]
        stored = {}
        if old is not None and old_per_shard:
            olds = {shards.shard_name(split, int(a) // old_per_shard) for a in members["arrival"]}
            stored = shards.stored_records(folder / n for n in sorted(olds) if n in old["shards"])
        missing = [path for image_id, path in zip(members["id"], members["path"]) if image_id not in stored]
        size = encoding.job_size(runner.on_dask, p)
        handles = [runner.submit(encoding.encode, (ingest, p, mean, std, batch)) for batch in encoding.batches(missing, size)]
        return name, members, stored, handles

    decoded = reused = 0
    started = collections.deque()
    upcoming = layout.members(todo)
    with tqdm(total=sum(layout.files[n]["count"] for n in todo), desc="shards", unit="img", mininterval=2,
              disable=None) as bar:
        for name, members in upcoming:
            started.append(start(name, members))
            break
        while started:
            following = next(upcoming, None)
            if following is not None:
                started.append(start(*following))
            name, members, stored, handles = started.popleft()
            fresh = iter([pixels for h in handles for pixels in runner.result(h)])
            records = []
            for image_id, y, path in zip(members["id"], members["y"], members["path"]):
                found = stored.get(image_id)
                if found is None:
                    records.append((next(fresh), y, image_id, path))
                    decoded += 1
                else:  # the same pixels: the record as it was, or with its new label or path
                    record, old_y, old_path = found
                    records.append(record if (old_y, old_path) == (y, path) else
                                   (shards.stored_pixels(record), y, image_id, path))
                    reused += 1
            bar.update(len(records))
            with atomic_path(folder / name) as tmp:
                shards.write_file(tmp, records)
    log.info("%d of %d shard files kept as they were; %d rewritten: %d images decoded, %d taken from the old files",
             len(keep), len(layout.files), len(todo), decoded, reused)
    if runner.where:
        log.info("decoded on %d Dask workers: %s", len(runner.where), dict(sorted(runner.where.items())))


def main(argv=None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
