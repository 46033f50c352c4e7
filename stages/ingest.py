"""Ingest: list every raw input once, with its content id and what its bytes really are.

Output: the manifest CSV (`paths.manifest`), one row per input file (for IDX: per image):

    id, label, path, source_split, format, width, height, channels, bit_depth, bytes, error,
    sharpness, brightness, contrast, phash, phash_mirror

`id` is the sha1 of the bytes, so the same image always has the same id wherever it lives.
The last five columns describe the pixels (imgpipe/images/facts.py); they are empty when the image
could not be decoded. A file that cannot be decoded is still listed, with `error` saying why;
`validate` decides what to quarantine. Images are read one at a time, by `ingest.workers`
processes (one per core by default) in listing order: memory does not grow with the dataset,
and the manifest's bytes do not depend on the number of workers. An image whose header claims
more than `ingest.max_pixels` pixels is refused before decoding, so a few bytes cannot make
the stage allocate gigabytes. With `ingest.cache_dir`, a re-run reads only the files that
changed since the last one (imgpipe/data/facts_cache.py).
"""

from __future__ import annotations

import contextlib
import logging
import sys


from imgpipe.data import facts_cache
from imgpipe.core.atomic_write import atomic_path
from imgpipe.core.errors import StageError
from imgpipe.core.params import Ingest, Paths, Runtime
from imgpipe.core.runner import stage_main
from imgpipe.data.ingestion import available_cores, ingest
from imgpipe.data.sources import Source, SourceError

# the params sections `run` takes, in order (imgpipe/core/runner.py)
SECTIONS = ("ingest", "paths", "runtime")
log = logging.getLogger(__name__)


def run(p: Ingest, paths: Paths, runtime: Runtime) -> None:
    try:
        with Source.from_params(p) as source, atomic_path(paths.manifest) as tmp:
            # IDX images are raw pixels, nothing to decode: too little work to share out
            workers = 1 if source.layout == "idx" else runtime.workers or available_cores()
            log.info("reading %s (layout: %s, %d worker processes)", p.source, source.layout, workers)
            # IDX images are not worth caching: reading them is a slice of memory
            cache = facts_cache.FactsCache(runtime.ingest_cache_dir) if runtime.ingest_cache_dir and source.layout != "idx" else None
            if cache and cache.dropped:
                log.info("facts cache: %d entries made by an earlier version of the code deleted", cache.dropped)
            with open(tmp, "w", newline="", encoding="utf-8") as fh, cache or contextlib.nullcontext():
                count = ingest(source, fh, p.max_pixels, workers, cache)
            if count == 0:
                raise StageError(f"ingest.source {p.source} holds no files")
    except SourceError as exc:
        raise StageError(str(exc)) from None
    reused = f"; {cache.hits} unchanged files not read again ({runtime.ingest_cache_dir})" if cache else ""
    log.info("%d inputs listed in %s%s", count, paths.manifest, reused)


def main(argv=None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
