"""preprocess: every image of the split table (`paths.split`) made training-ready
(imgpipe/images/transforms.py) and written to shards (`paths.shards`, imgpipe/model/shards.py).

Images are read one at a time from the source and written in id order (a hash order, so
classes are mixed within every shard); the same inputs and params give the same shard bytes.
With `standardize_scope: dataset`, a first streaming pass over train gives the mean and std.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from imgpipe.core.atomic_write import atomic_dir, write_json
from imgpipe.core.errors import StageError
from imgpipe.core.params import Ingest, Paths, Preprocess
from imgpipe.core.runner import stage_main
from imgpipe.data.manifest import read_split
from imgpipe.data.sources import Source
from imgpipe.images.transforms import ChannelStats, normalize, transform
from imgpipe.model import shards

SPLITS = ("train", "val", "test")
# the params sections `run` takes, in order (imgpipe/core/runner.py)
SECTIONS = ("preprocess", "paths", "ingest")
log = logging.getLogger(__name__)


def load(source: Source, path: str) -> np.ndarray:
    decoded = source.read_image(path)
    if not decoded.ok:  # validate accepted it, so the file changed since: say which
        raise StageError(f"{path}: {decoded.error} (the file changed after validation; re-run dvc repro)")
    return decoded.image


def images(source: Source, rows: pd.DataFrame, p: Preprocess, desc: str):
    for row in tqdm(rows.itertuples(index=False), total=len(rows), desc=desc, unit="img", mininterval=2, disable=None):
        yield row, transform(load(source, row.path), p)


def run(p: Preprocess, paths: Paths, ingest: Ingest) -> None:
    frame = read_split(paths.split)
    classes = sorted(frame["label"].unique())
    index = {c: i for i, c in enumerate(classes)}
    channels = 1 if p.colour_mode == "grey" else 3
    by_split = {s: frame[frame["split"] == s].sort_values("id") for s in SPLITS}
    if by_split["train"].empty:
        raise StageError(f"{paths.split} has no training images")

    with Source.from_params(ingest) as source:
        mean = std = None
        if p.normalization == "standardize" and p.standardize_scope == "dataset":
            stats = ChannelStats(channels)
            for _, x in images(source, by_split["train"], p, "train mean/std"):
                stats.add(x)
            mean, std = stats.mean_std()
            log.info("train mean %s, std %s", mean, std)

        with atomic_dir(paths.shards) as out:
            files, counts, class_counts = {}, {}, {}
            for split in SPLITS:
                rows = by_split[split]
                with shards.ShardWriter(out, split, p.images_per_shard) as writer:
                    for row, x in images(source, rows, p, split):
                        writer.write(normalize(x, p, mean, std), index[row.label], row.id, row.path)
                files[split], counts[split] = writer.files, writer.count
                class_counts[split] = {c: int((rows["label"] == c).sum()) for c in classes}
                log.info("%s: %d images in %d shards", split, writer.count, len(writer.files))
            write_json(Path(out) / shards.META, {
                "height": p.size[0], "width": p.size[1], "channels": channels, "dtype": "float16",
                "classes": classes, "counts": counts, "class_counts": class_counts, "files": files,
                "mean": mean, "std": std,
                # every param that decides the pixels (once: the export, train and the feature cache read it here)
                "preprocess": shards.pixel_params(p),
            })


def main(argv=None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
