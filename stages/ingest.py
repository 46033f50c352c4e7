"""ingest: the manifest (`paths.manifest`, its columns in imgpipe/data/manifest.py) of the raw inputs
(`ingest.source`); how each file is described: imgpipe/data/ingestion.py. Beside it,
`<manifest>.skipped.json`: the files the listing left out (hidden ones), counted by why.
"""

from __future__ import annotations

import contextlib
import logging
import sys

from imgpipe.core import atomic_write
from imgpipe.core.atomic_write import atomic_path
from imgpipe.core.errors import StageError
from imgpipe.core.params import Ingest, Paths, Runtime
from imgpipe.core.runner import stage_main
from imgpipe.data import facts_cache
from imgpipe.data.ingestion import ingest, skipped_path
from imgpipe.data.parallel import Batches, available_cores
from imgpipe.data.sources import Source, SourceError

# the params sections `run` takes, in order (imgpipe/core/runner.py)
SECTIONS = ("ingest", "paths", "runtime")
log = logging.getLogger(__name__)


def run(p: Ingest, paths: Paths, runtime: Runtime) -> None:
    try:
        with Source.from_params(p) as source, atomic_path(paths.manifest) as tmp:
            # IDX images are raw pixels, nothing to decode: too little work to share out
            workers = 1 if source.layout == "idx" else runtime.workers or available_cores()
            on_dask = runtime.executor == "dask" and source.layout != "idx"
            log.info("reading %s (layout: %s, %s)", p.source, source.layout,
                     "on a Dask cluster" if on_dask else f"{workers} worker processes")
            # IDX images are not worth caching: reading them is a slice of memory
            cache = facts_cache.FactsCache(runtime.ingest_cache_dir) if runtime.ingest_cache_dir and source.layout != "idx" else None
            if cache and cache.dropped:
                log.info("facts cache: %d entries made by an earlier version of the code deleted", cache.dropped)
            cluster = Batches("dask", workers, runtime.scheduler) if on_dask else contextlib.nullcontext()
            with (open(tmp, "w", newline="", encoding="utf-8") as fh, cache or contextlib.nullcontext(),
                  cluster as cluster):
                count = ingest(source, fh, p.max_pixels, workers, cache, cluster)
            if on_dask and cluster.where:
                log.info("described on %d Dask workers: %s", len(cluster.where), dict(sorted(cluster.where.items())))
            if count == 0:
                hidden = sum(source.skipped.values())
                raise StageError(f"ingest.source {p.source} holds no files"
                                 + (f" but {hidden} skipped ones (hidden, or not IDX files)" if hidden else ""))
            # the listing has run to its end: the counts are whole
            atomic_write.write_json(skipped_path(paths.manifest), source.skipped)
    except SourceError as exc:
        raise StageError(str(exc)) from None
    reused = f"; {cache.hits} unchanged files not read again ({runtime.ingest_cache_dir})" if cache else ""
    log.info("%d inputs listed in %s%s", count, paths.manifest, reused)
    if any(source.skipped.values()):
        log.info("skipped, not inputs: %s",
                 ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in source.skipped.items() if n))


def main(argv=None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
