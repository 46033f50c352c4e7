"""Atomic output writing: write to a temporary sibling, then rename over the target.

A stage killed half-way then leaves the previous output (or none), never a half-written one
that DVC could cache as if it were complete; the next write of the same output deletes what the
killed one left behind.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_leftovers(path: Path) -> None:
    """Delete the temporary siblings of `path` that a killed run left (they can be as large as the
    output). Only one run writes an output at a time (DVC holds its repository lock), so any such
    sibling is litter."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if stale.name.endswith(".tmp") or stale.name == f".{path.name}.old":
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _publish_mode(path: Path, mode: int) -> None:
    # mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual permissions
    os.chmod(path, mode & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary file path next to `path`; rename it onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _publish_mode(Path(tmp), 0o666)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a fresh temporary directory next to `path`; swap it in for `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _publish_mode(tmp, 0o777)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data) -> None:
    # sorted keys and a fixed layout: the same data always gives the same bytes (and dvc.lock)
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | Path, frame) -> None:
    """Write a pandas DataFrame as CSV, atomically, with a stable byte layout."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")
