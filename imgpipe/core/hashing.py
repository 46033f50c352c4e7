"""File digests, streamed by hashlib.file_digest: a file of any size is never read into memory whole."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_hexdigest(path: str | Path, algorithm: str) -> str:
    """`algorithm`'s hex digest of the file's bytes (md5 is what DVC records in dvc.lock)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, algorithm).hexdigest()
