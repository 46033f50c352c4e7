"""What ingest learnt about each file, kept between runs: a re-run decodes only the changed files.

DVC re-runs ingest whenever the raw folder changes, so a data set that grows by 1% would have
every image read, hashed and decoded again. This cache keeps each file's manifest columns
(everything but label, path and split) under the file's identity as the file system states it,
the way DVC's own state database and git's index skip unchanged files: (path, inode, size,
modification time in ns; for a source at a URL, its size and ETag from the listing), plus what else decides the row (`max_pixels`, and a hash of the code
that describes files and of OpenCV's version). A file rewritten in place gets a new
modification time, so it is read again; a hit costs one `stat`. The first run of changed code
deletes the entries the old code made, so the cache holds about one row per file, not one per
file and code version. Entries of files deleted since are kept (~200 bytes each).

The cache is a SQLite file (`ingest.cache_dir`/facts.sqlite, outside git and DVC's outputs) in
WAL mode, so readers and the writer never wait for each other. The worker processes look files
up, each through a `Reader` it opens itself after the fork (a connection never crosses a fork),
and encode the rows of the files they read; the main process is the only writer (`FactsCache`,
one transaction per batch). The look-ups thus run in parallel, and the main process, which
shares the cores with the workers, only stores. The cache never changes the manifest: a row from
the cache is the row the file would get now. Delete the folder at will; only time is lost.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import cv2

FILE = "facts.sqlite"
# the modules that turn a file's bytes into its manifest columns
CODE = ("data/ingestion.py", "data/manifest.py", "images/formats.py", "images/facts.py", "images/pixels.py")


def code_version() -> str:
    """What decides a file's row besides its bytes: that code and OpenCV's version. A change to
    either gives every key another prefix, so no entry of the old code is ever used."""
    digest = hashlib.sha1(cv2.__version__.encode())
    for name in CODE:
        digest.update((Path(__file__).parents[1] / name).read_bytes())
    return digest.hexdigest()[:12]


VERSION = code_version()


def file_key(path: str, max_pixels: int) -> str | None:
    """The file's identity for the cache; None when it cannot be stat'ed (ingest will say why)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    # os.path.abspath only when needed: it costs as much as the stat
    absolute = path if os.path.isabs(path) else os.path.abspath(path)
    return f"{VERSION}|{max_pixels}|{info.st_ino}|{info.st_size}|{info.st_mtime_ns}|{absolute}"


def stamp_key(url: str, stamp: str, max_pixels: int) -> str:
    """The identity of a file at a URL: what its listing says changes with it (size, ETag)."""
    return f"{VERSION}|{max_pixels}|{stamp}|{url}"


class FactsCache:
    """The writer: creates the database, drops other code's entries, stores new ones."""

    def __init__(self, folder: str | Path):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.folder = Path(folder)
        # `put` commits once per batch: a killed run loses at most one batch
        self._db = sqlite3.connect(self.folder / FILE)
        # a cache: no waiting for the disk at each commit (an entry lost to a power cut is only
        # time lost), and readers never wait for the writer
        self._db.execute("PRAGMA synchronous = OFF")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS facts (key TEXT PRIMARY KEY, row TEXT NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.dropped = self._drop_other_versions()
        self.hits = 0  # files not read again, as the readers report them

    def _drop_other_versions(self) -> int:
        """Delete the entries other code made: their keys start with another version, so they could
        never be used again, and each change to the describing code would otherwise leave a full
        copy of the data set's rows behind. Checked once, when the version differs from the last
        run's; returns the entries deleted."""
        last = self._db.execute("SELECT value FROM meta WHERE name = 'version'").fetchone()
        if last and last[0] == VERSION:
            return 0
        with self._db:  # one transaction
            dropped = self._db.execute("DELETE FROM facts WHERE substr(key, 1, ?) != ?",
                                       (len(VERSION) + 1, VERSION + "|")).rowcount
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (VERSION,))
        return dropped

    def put(self, entries: list[tuple[str, str]]) -> None:
        """Store (key, encoded row) pairs, in one transaction."""
        if entries:
            self._db.executemany("INSERT OR REPLACE INTO facts VALUES (?, ?)", entries)
            self._db.commit()

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Reader:
    """A read-only view of the cache, for one process (a worker opens its own after the fork)."""

    def __init__(self, folder: str | Path):
        self._db = sqlite3.connect(Path(folder) / FILE)

    def get(self, keys: list[str | None]) -> list[list | None]:
        """The cached values of each key, in order (None: not cached)."""
        wanted = [k for k in keys if k is not None]
        found: dict[str, list] = {}
        # SQLite takes at most 32766 parameters in one statement; a batch is far smaller
        for start in range(0, len(wanted), 10_000):
            chunk = wanted[start:start + 10_000]
            marks = ",".join("?" * len(chunk))
            for key, row in self._db.execute(f"SELECT key, row FROM facts WHERE key IN ({marks})", chunk):
                found[key] = json.loads(row)
        return [found.get(k) if k is not None else None for k in keys]

    def close(self) -> None:
        self._db.close()


def encode(values: list) -> str:
    """A manifest row's byte columns as the cache stores them."""
    return json.dumps(values)
