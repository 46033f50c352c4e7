"""Preprocess's per-image work: an image of the source -> the pixel bytes a shard record stores.

It runs on worker processes (a local pool or Dask workers, imgpipe/data/parallel.py) in batches
of paths, and never imports TensorFlow. A worker opens each source once and keeps it.
"""

from __future__ import annotations

import itertools

import numpy as np

from imgpipe.core.errors import StageError
from imgpipe.core.params import Ingest, Preprocess
from imgpipe.data.sources import Source
from imgpipe.images.transforms import ChannelStats, normalize, transform
from imgpipe.model.shards import pixel_bytes

# images per job sent to a worker: enough that the per-job overhead (~1 ms on Dask) is small,
# few enough that the workers are all busy on a file of a few hundred images
BATCH = 64
# on Dask, where a job's round trip costs milliseconds (bench/RESULTS.md): 4x as many, and for
# small output images as many as make DASK_PIXELS output pixels (Fashion-MNIST at 32x32: 1024)
DASK_BATCH = 256
DASK_PIXELS = 1 << 20


def job_size(on_dask: bool, p: Preprocess) -> int:
    """Images per job sent to a worker."""
    return max(DASK_BATCH, DASK_PIXELS // (p.size[0] * p.size[1])) if on_dask else BATCH

_sources: dict[Ingest, Source] = {}


def source(ingest: Ingest) -> Source:
    if ingest not in _sources:
        _sources[ingest] = Source.from_params(ingest)
    return _sources[ingest]


def load(src: Source, path: str) -> np.ndarray:
    decoded = src.read_image(path)
    if not decoded.ok:  # validate accepted it, so the file changed since: say which
        raise StageError(f"{path}: {decoded.error} (the file changed after validation; re-run dvc repro)")
    return decoded.image


def encode(ingest: Ingest, p: Preprocess, mean, std, paths: list[str]) -> list[bytes]:
    """The stored pixels of each image at `paths`, in order."""
    src = source(ingest)
    return [pixel_bytes(normalize(transform(load(src, path), p), p, mean, std)) for path in paths]


def channel_sums(ingest: Ingest, p: Preprocess, channels: int, paths: list[str]) -> ChannelStats:
    """The transformed images' per-channel sums, for the train split's mean and std."""
    src = source(ingest)
    stats = ChannelStats(channels)
    for path in paths:
        stats.add(transform(load(src, path), p))
    return stats


def batches(items: list, size: int = BATCH) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def chunks(items, size: int = BATCH):
    """Lists of `size` items from an iterable (a stream of paths), the last one shorter."""
    items = iter(items)
    while chunk := list(itertools.islice(items, size)):
        yield chunk
