"""Ingest: list every raw input once, with its content id and what its bytes really are.

The manifest has one row per input file (for IDX: per image), its columns in
imgpipe/data/manifest.py. `id` is the sha1 of the bytes, so the same image always has the same id
wherever it lives. A file that cannot be decoded is still listed, with `error` saying why;
`validate` decides what to quarantine. Images are read one at a time, by `runtime.workers`
processes (one per core by default), or on a Dask cluster (`runtime.executor: dask`), in batches
in listing order: memory does not grow with the dataset,
and the manifest's bytes do not depend on the number of workers. An image whose header claims
more than `ingest.max_pixels` pixels is refused before decoding, so a few bytes cannot make
the stage allocate gigabytes. With `runtime.ingest_cache_dir`, a re-run reads only the files that
changed since the last one (imgpipe/data/facts_cache.py).
"""

from __future__ import annotations

import collections
import contextlib
import csv
import functools
import hashlib
import io
import itertools
import logging
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

import cv2
from tqdm import tqdm

from imgpipe.data import facts_cache
from imgpipe.data.manifest import COLUMNS, FACTS, RECORD_COLUMNS
from imgpipe.data.parallel import Batches
from imgpipe.data.sources import Record, Source, TooLarge, hash_file, is_url, read_file
from imgpipe.images import facts as image_facts
from imgpipe.images import formats

# files per task sent to a worker: large enough that messaging costs little per image; on Dask,
# where a job's round trip costs milliseconds, 4x as many (bench/RESULTS.md)
CHUNKSIZE = 256
DASK_CHUNKSIZE = 1024
# A file's values (what describe and the others below return, and the facts cache keeps) are its
# manifest row without the RECORD_COLUMNS: manifest.BYTE_COLUMNS, in that order.
assert COLUMNS[1:4] == RECORD_COLUMNS  # manifest_row puts the record's back after the id
assert COLUMNS[-5:] == FACTS == list(image_facts.ImageFacts._fields)  # describe appends the facts' row
_NO_FACTS = [None] * len(image_facts.ImageFacts._fields)
# What an image file within ingest.max_pixels can hold: 8 bytes a pixel (16-bit RGBA stored raw,
# in a BMP or TIFF), and 64 MiB of what may come with the pixels (metadata, an embedded preview,
# the video a phone's motion photo appends). A larger file (a video, an archive) is hashed as it
# streams by, never held in memory.
BYTES_PER_PIXEL = 8
EXTRA_BYTES = 64 << 20
log = logging.getLogger(__name__)


def skipped_path(manifest: str | Path) -> Path:
    """Where ingest writes what the listing skipped, by why ({"hidden": 2, ...}: sources.SKIPPED),
    for validate's summary: beside the manifest, which holds inputs only (dvc.yaml names it too)."""
    return Path(f"{manifest}.skipped.json")


def max_file_bytes(max_pixels: int) -> int:
    """The largest file ingest reads into memory (see BYTES_PER_PIXEL)."""
    return BYTES_PER_PIXEL * max_pixels + EXTRA_BYTES


def describe(data: bytes, max_pixels: int, facts: image_facts.FactsBatch | None = None) -> list:
    """What the bytes of one image file say, in BYTE_COLUMNS order: pure, the same bytes give the same values.

    A list in column order, not a dict: it runs once per image, and the CSV writer and the facts
    cache both take the values in that order. With `facts`, a batch shared by many calls, the
    last five values (the image's facts) are appended when the batch is finished.
    """
    looked = formats.look(data, max_pixels, image_facts.FACTS_SIDE)
    if looked.shape is None:
        return [hashlib.sha1(data).hexdigest(), looked.format, None, None, None, None, len(data), looked.error,
                *_NO_FACTS]
    values = [hashlib.sha1(data).hexdigest(), looked.format, *looked.shape, len(data), ""]
    return _with_facts(values, looked.pixels, facts)


def describe_pixels(pixels, facts: image_facts.FactsBatch | None = None) -> list:
    """What one IDX image says, in BYTE_COLUMNS order: raw 8-bit grey pixels, nothing to decode."""
    height, width = pixels.shape
    values = [hashlib.sha1(pixels.tobytes()).hexdigest(), "idx", width, height, 1, 8, pixels.size, ""]
    return _with_facts(values, pixels, facts)


def _with_facts(values: list, pixels, facts: image_facts.FactsBatch | None) -> list:
    if facts is None:
        return values + list(image_facts.facts(pixels).row())
    facts.add(pixels, values)
    return values


def unreadable(reason: str) -> list:
    """The values of a file that could not be read: no id, so never cached."""
    return [None, "unknown", None, None, None, None, None, reason, *_NO_FACTS]


def file_values(record: Record, root: str, max_pixels: int, facts: image_facts.FactsBatch | None = None) -> list:
    """What one file of a folder or CSV source says, in BYTE_COLUMNS order (in a worker process, if there are
    any); with `facts`, see describe."""
    if record.problem:
        return unreadable(record.problem)
    try:
        data = read_file(root, record.path, limit=max_file_bytes(max_pixels))
    except TooLarge:
        return too_large(root, record.path, max_pixels)
    except OSError as exc:
        return unreadable(f"cannot read file: {exc.strerror}")
    return describe(data, max_pixels, facts)


def too_large(root: str, path: str, max_pixels: int) -> list:
    """The values of a file too large to hold an image within `max_pixels`: its id and format, from
    bytes read 1 MB at a time, and why it is not described."""
    try:
        digest, head, size = hash_file(root, path)
    except OSError as exc:
        return unreadable(f"cannot read file: {exc.strerror}")
    reason = (f"too large to read: {size} bytes, more than an image of {max_pixels} pixels (ingest.max_pixels) "
              f"can take ({max_file_bytes(max_pixels)} bytes)")
    return [digest, formats.detect_format(head), None, None, None, None, size, reason, *_NO_FACTS]


def manifest_row(record: Record, values: list) -> list:
    """A manifest row (COLUMNS order): the id, then what the record says, then what the bytes say."""
    return [values[0], record.label, record.path, record.source_split, *values[1:]]


def ingest(source: Source, out: TextIO, max_pixels: int, workers: int,
           cache: facts_cache.FactsCache | None = None, cluster: Batches | None = None) -> int:
    """Write the manifest (header, then one row per input, in listing order) to `out`; returns the rows.

    With a `cache`, a file it knows (same path, inode, size and time) is not read again. With a
    `cluster` (Batches on a Dask cluster), the files are read and described on its workers.
    """
    csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n").writeheader()
    batches = _batched(source.records(), CHUNKSIZE if cluster is None else DASK_CHUNKSIZE)
    if source.layout == "idx":
        def idx_lines(batch: list[Record]) -> Described:
            facts = image_facts.FactsBatch()
            values = [describe_pixels(source.read_idx_pixels(r.path), facts) for r in batch]
            facts.finish()
            return _csv(map(manifest_row, batch, values)), len(batch), [], 0, []

        return write_lines(map(idx_lines, batches), out)
    work = functools.partial(describe_files, root=str(source.root), max_pixels=max_pixels)
    folder = cache.folder if cache else None
    if cluster is not None:
        with _reader_in_this_process(folder):
            return write_lines(_on_cluster(cluster, batches, str(source.root), max_pixels), out, cache)
    if workers == 1:
        with _reader_in_this_process(folder):
            return write_lines(map(work, batches), out, cache)
    # Forked workers start in milliseconds; ingest never imports TensorFlow, whose threads do not
    # survive a fork. `imap` returns the batches in listing order, so the manifest's bytes do not
    # depend on the number of workers, and it reads the listing only as fast as the workers need
    # it (the pipe to them is bounded), so memory stays flat. Each worker sends back the CSV text
    # of a batch, not its rows, and looks its files up in the facts cache itself: the main
    # process, which shares the cores, only lists, writes and stores.
    with (_single_threaded_opencv(),
          multiprocessing.get_context("fork").Pool(workers, initializer=_open_reader, initargs=(folder,)) as pool):
        return write_lines(pool.imap(work, batches), out, cache)


# what a batch of files gives: its manifest rows as CSV text, their number, the facts-cache
# entries of the files read (key, encoded row), the number of files found in the cache, and the
# decoders' messages that are not damage, each with its file's name (logged by the stage's own
# process, whose log the user reads: a Dask worker's or a pool worker's log is not it)
Described = tuple[str, int, list[tuple[str, str]], int, list[str]]

# this process's read-only view of the facts cache (None: no cache); each worker opens its own
_reader: facts_cache.Reader | None = None


def _open_reader(folder: Path | None) -> None:
    global _reader
    _reader = facts_cache.Reader(folder) if folder else None


@contextlib.contextmanager
def _reader_in_this_process(folder: Path | None):
    _open_reader(folder)
    try:
        yield
    finally:
        if _reader:
            _reader.close()
        _open_reader(None)


def _on_cluster(cluster: Batches, batches: Iterable[list[Record]], root: str, max_pixels: int) -> Iterator[Described]:
    """What each batch gives, in order, the files read and described on the cluster's workers.

    This process looks the files up in the facts cache (the workers, on other machines, may not
    reach it) and sends a worker only the batches with files to read, with what the cache knows;
    a batch the cache knows whole is made here. At most `cluster.in_flight` batches in flight.
    """
    pending = collections.deque()
    local = not is_url(root)
    if local:  # the workers start in their own folders, maybe on other machines
        root = os.path.abspath(root)
    for batch in batches:
        looked_up = _look_up(batch, root, max_pixels)
        if None in looked_up[1]:
            if local:  # they must see the folder as this machine does: asked about one file, once
                local = False
                cluster.needs([os.path.join(root, batch[looked_up[1].index(None)].path)], "ingest.source")
            pending.append(cluster.submit(describe_files, (batch, root, max_pixels, looked_up)))
        else:
            pending.append(describe_files(batch, root, max_pixels, looked_up))
        if len(pending) >= cluster.in_flight:
            yield _finished(cluster, pending.popleft())
    while pending:
        yield _finished(cluster, pending.popleft())


def _finished(cluster: Batches, handle) -> Described:
    return handle if isinstance(handle, tuple) else cluster.result(handle)


def describe_files(records: list[Record], root: str, max_pixels: int,
                   looked_up: tuple[list, list] | None = None) -> Described:
    """What a batch of files gives (see Described): the cached rows of the files the cache knows, and
    the others read and described. `looked_up`: the files' keys and cached values, when the caller
    looked them up (on a Dask worker, which has no cache of its own)."""
    keys, cached = looked_up or _look_up(records, root, max_pixels)
    facts = image_facts.FactsBatch()  # the files' facts are completed together, once all are read
    # what a decoder prints (libjpeg's "Corrupt JPEG data: ...") is tied to the file: a JPEG's
    # damage becomes its error, other messages are logged with the file's name
    notes = []
    with formats.DecoderMessages() as messages:
        values = []
        for r, v in zip(records, cached):
            values.append(file_values(r, root, max_pixels, facts) if v is None else v)
            if messages.notes:
                notes.append(f"{r.path}: the decoder says: {'; '.join(messages.notes)}")
                messages.notes.clear()
    facts.finish()
    # read and described (an id): the same bytes give the same row
    fresh = [(key, facts_cache.encode(v)) for key, v, c in zip(keys, values, cached)
             if c is None and key is not None and v[0] is not None]
    return _csv(map(manifest_row, records, values)), len(records), fresh, len(records) - cached.count(None), notes


def _look_up(records: list[Record], root: str, max_pixels: int) -> tuple[list, list]:
    """Each file's key in the facts cache (None: not to be cached) and the values the cache holds
    for it, in BYTE_COLUMNS order (None: not cached, or no cache)."""
    if _reader is None:
        nothing = [None] * len(records)
        return nothing, nothing
    if is_url(root):  # the listing's stamps: no request per file
        keys = [None if r.problem else facts_cache.stamp_key(f"{root}/{r.path}", r.stamp, max_pixels) for r in records]
        return keys, _reader.get(keys)
    base = os.path.abspath(root)  # once per batch: the keys hold absolute paths
    keys = [None if r.problem else facts_cache.file_key(os.path.join(base, r.path), max_pixels) for r in records]
    return keys, _reader.get(keys)


def _batched(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    records = iter(records)
    while batch := list(itertools.islice(records, size)):
        yield batch


def _csv(rows: Iterable[list]) -> str:
    """Manifest rows (lists in COLUMNS order; None is an empty field) as CSV text."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return text.getvalue()


@contextlib.contextmanager
def _single_threaded_opencv():
    """The worker processes are the parallelism: OpenCV's own threads would only compete with them.

    Set before forking, which the workers inherit: a forked worker cannot change it itself (if
    this process has used OpenCV's thread pool, OpenCV would wait for threads a fork does not copy).
    """
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


def write_lines(batches: Iterable[Described], out: TextIO, cache: facts_cache.FactsCache | None = None) -> int:
    """Write each batch's CSV text to `out` and its new entries to the cache; returns the rows written."""
    count = 0
    with tqdm(desc="ingest", unit="img", mininterval=2, disable=None) as progress:
        for text, rows, fresh, hits, notes in batches:
            for note in notes:
                log.warning("%s", note)
            out.write(text)
            count += rows
            progress.update(rows)
            if cache is not None:
                cache.put(fresh)
                cache.hits += hits
    return count
