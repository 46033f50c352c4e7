"""Raw-data sources: where the images are and what label each one has.

Three layouts, detected from the folder (or forced with `ingest.layout`):

- `folders`: `<source>/<class>/**/<image>`; or `<source>/{train,val,test}/<class>/...`, in which
  case the split each image came with is recorded.
- `csv`: `<source>/<labels_csv>` with a header and rows `<file or id>,<label>`; the first column
  is a path relative to the source folder or a file name without its extension (an id, as in
  `objectId,value`).
- `idx`: MNIST-style `<prefix>-images-idx3-ubyte[.gz]` + `<prefix>-labels-idx1-ubyte[.gz]` pairs;
  prefix `train` is the train split, `t10k`/`test` the test split. An optional `classes.txt`
  (one name per line, line i = label i) names the numeric labels.

A `Source` lists records (path, label, split) without reading pixels, and reads one image's
bytes on demand, so nothing holds the dataset in memory. IDX files are decompressed once to a
temporary file and memory-mapped: any image is then one slice away.
"""

from __future__ import annotations

import csv
import errno
import gzip
import hashlib
import logging
import os
import re
import shutil
import stat
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from imgpipe.images import formats

SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
IDX_IMAGES = re.compile(r"^(?P<prefix>.+)-images[-.]idx3-ubyte(?P<gz>\.gz)?$")
IDX_SPLITS = {"train": "train", "t10k": "test", "test": "test"}
IDX_REF = "#"  # an IDX image's path is "<images file>#<index>"
# What the listing leaves out, and so does not count as an input, by why (Source.skipped):
# hidden files (`.DS_Store`, macOS's `._photo.jpg`), the files below hidden folders
# (`.ipynb_checkpoints/`, `.git/`), and in an IDX folder the files that are neither IDX images,
# their labels nor classes.txt.
SKIPPED = ("hidden", "in_hidden_folders", "other_files")
log = logging.getLogger(__name__)


class SourceError(ValueError):
    """The source folder or its labels file cannot be read as any supported layout."""


class Record(NamedTuple):  # a named tuple: one per input file, sent to a worker process in batches
    path: str  # relative to the source folder, with forward slashes
    label: str  # class name; empty when the source gives none (the image is then quarantined)
    source_split: str  # train | val | test | "" (no split given by the source)
    problem: str = ""  # a reason the file must not be read (e.g. a link leaving the source)
    stamp: str = ""  # a source at a URL: what changes when the file does (imgpipe/data/remote.py)


def _utf8(name: str) -> bool:
    """Whether a name from the file system is UTF-8 text (Python keeps other bytes as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _escaped(name: str) -> str:
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _real_folder(path: Path) -> bool:
    """A folder, not a link to one (see Source._record)."""
    return path.is_dir() and not path.is_symlink()


def detect_layout(root: Path, labels_csv: str) -> str:
    if not root.is_dir():
        raise SourceError(f"ingest.source {root} does not exist or is not a folder")
    if any(IDX_IMAGES.match(p.name) for p in root.iterdir() if p.is_file()):
        return "idx"
    if (root / labels_csv).is_file():
        return "csv"
    return "folders"


class Source:
    def __init__(self, root: str | Path, layout: str = "auto", labels_csv: str = "labels.csv"):
        self.root = Path(root)
        self._prefix = os.path.join(str(self.root), "")  # what every listed path starts with
        if not self.root.is_dir():
            raise SourceError(f"ingest.source {self.root} does not exist or is not a folder")
        self.labels_csv = labels_csv
        self.layout = detect_layout(self.root, labels_csv) if layout == "auto" else layout
        self._tmp: str | None = None
        self.skipped = dict.fromkeys(SKIPPED, 0)  # what records() left out, by why (SKIPPED)
        self._idx: dict[str, np.ndarray] = {}  # images file name -> memmap [n, h, w]

    # -- listing -----------------------------------------------------------------------------

    def records(self) -> Iterator[Record]:
        self.skipped = dict.fromkeys(SKIPPED, 0)
        if self.layout == "folders":
            yield from self._folder_records()
        elif self.layout == "csv":
            yield from self._csv_records()
        elif self.layout == "idx":
            yield from self._idx_records()
        else:
            raise SourceError(f"unknown layout {self.layout!r}")

    def _files(self, folder: str | Path) -> Iterator[os.DirEntry]:
        """Every non-hidden file below `folder`, in a fixed order: its files, then its sub-folders.

        Scandir entries know whether they are links without another system call, which counts with
        millions of files. Links are not followed: a link is listed as a file and `_record` checks
        where it points (a link to a folder is then one input with a reason, instead of vanishing).
        """
        entries = sorted(self._visible(os.scandir(folder)), key=lambda e: e.name)
        folders = [e for e in entries if e.is_dir(follow_symlinks=False)]
        yield from (e for e in entries if not e.is_dir(follow_symlinks=False))
        for sub in folders:
            yield from self._files(sub.path)

    def _visible(self, entries: Iterable[os.DirEntry | Path]) -> Iterator[os.DirEntry | Path]:
        """The entries whose names do not start with a dot; the others are counted in `skipped`."""
        for entry in entries:
            if not entry.name.startswith("."):
                yield entry
            elif os.path.isdir(entry) and not os.path.islink(entry):
                # walked only to be counted: without links, as the listing does
                self.skipped["in_hidden_folders"] += sum(len(files) for _, _, files in os.walk(entry))
            else:
                self.skipped["hidden"] += 1

    def _relative(self, entry: os.DirEntry | Path) -> str:
        path = os.fspath(entry)
        # Listed paths are built by joining names onto the root, so cutting the root off is
        # enough; os.path.relpath costs 35 µs a file, as much as hashing the file (root "." or
        # a path given from elsewhere takes that route).
        relative = path[len(self._prefix):] if path.startswith(self._prefix) else os.path.relpath(path, self.root)
        return relative.replace(os.sep, "/")

    def _record(self, entry: os.DirEntry | Path, label: str, split: str) -> Record:
        relative = self._relative(entry)
        if not relative.isascii() and not _utf8(relative):
            # Linux names are bytes: these are not UTF-8 (an old archive's, say). The manifest is
            # UTF-8, so the name is written with \x escapes, and the file is not read.
            return Record(_escaped(relative), _escaped(label), split,
                          "the file or folder name is not UTF-8 text (shown with \\x escapes): rename it")
        problem = ""
        if entry.is_symlink():
            # realpath, not Path.resolve: on a loop of links Python 3.11 raises RuntimeError; the
            # loop is then reported when the file is read ("too many levels of symbolic links")
            target = Path(os.path.realpath(entry))
            # A link to a folder is never followed: it could lead anywhere (to / and the whole
            # disk, or to a parent folder: a loop), or list the same files twice.
            if target.is_dir():
                problem = f"symbolic link to the folder {target}: links to folders are not followed"
            elif not target.is_relative_to(self.root.resolve()):
                problem = f"symbolic link to {target}, outside the source folder"
        return Record(relative, label, split, problem)

    def _folder_records(self) -> Iterator[Record]:
        top = sorted(self._visible(self.root.iterdir()))
        split_layout = bool(top) and all(p.is_dir() and p.name.lower() in SPLIT_FOLDERS for p in top)
        for entry in top:
            if not _real_folder(entry):  # a file outside any class folder has no label; or a link
                yield self._record(entry, "", "")
            elif split_layout:
                split = SPLIT_FOLDERS[entry.name.lower()]
                for class_dir in sorted(self._visible(entry.iterdir())):
                    if _real_folder(class_dir):
                        yield from self._class_records(class_dir, split)
                    else:
                        yield self._record(class_dir, "", split)
            else:
                yield from self._class_records(entry, "")

    def _class_records(self, folder: Path, split: str) -> Iterator[Record]:
        empty, label = True, folder.name
        for file in self._files(folder):
            empty = False
            yield self._record(file, label, split)
        if empty:  # no input to list, but a class the user expects may be missing: say so
            log.warning("%s/ holds no files, so there is no class %r from it", self._relative(folder), folder.name)

    def _csv_records(self) -> Iterator[Record]:
        labels, problems = _labels_rows(self.root, self.labels_csv)
        csv_file = self._relative(self.root / self.labels_csv)
        files = {rel: f for f in self._files(self.root) if (rel := self._relative(f)) != csv_file}
        resolved = resolve_labels(labels, problems, files, lambda key: self._relative(self.root / key),
                                  self.root / self.labels_csv, self.root)
        for rel, f in files.items():  # files the CSV does not name are inputs too: listed without a label
            yield self._record(f, resolved.get(rel, ("",))[0], "")
    def _idx_records(self) -> Iterator[Record]:
        names = _class_names(self.root)
        used = {"classes.txt"}
        for images_file in sorted(p for p in self.root.iterdir() if IDX_IMAGES.match(p.name)):
            m = IDX_IMAGES.match(images_file.name)
            labels_file = self._labels_file_for(m.group("prefix"))
            used |= {images_file.name, labels_file.name}
            labels = _read_idx(labels_file, expected_dims=1)
            count = self._images(images_file.name).shape[0]
            if len(labels) != count:
                raise SourceError(f"{labels_file.name} has {len(labels)} labels but {images_file.name} has {count} images")
            split = IDX_SPLITS.get(m.group("prefix").lower(), "")
            for i, value in enumerate(labels):
                label = names[value] if names and value < len(names) else str(int(value))
                yield Record(f"{images_file.name}{IDX_REF}{i}", label, split)
        self.skipped["other_files"] = sum(p.name not in used for p in self._visible(self.root.iterdir()))

    def _labels_file_for(self, prefix: str) -> Path:
        for name in (f"{prefix}-labels-idx1-ubyte.gz", f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"):
            if (self.root / name).is_file():
                return self.root / name
        raise SourceError(f"{self.root}: no labels file for {prefix}-images (expected {prefix}-labels-idx1-ubyte[.gz])")

    # -- reading -----------------------------------------------------------------------------

    def read_bytes(self, path: str) -> bytes:
        """The bytes that identify an image: the file, or for IDX the image's raw pixels."""
        if self.layout == "idx":
            return self.read_idx_pixels(path).tobytes()
        return read_file(self.root, path)

    def read_image(self, path: str) -> formats.Decoded:
        """The image at `path`, decoded (for IDX: its pixels), or the reason it cannot be."""
        if self.layout == "idx":
            return formats.Decoded(self.read_idx_pixels(path), "")
        return formats.decode(self.read_bytes(path))

    def read_idx_pixels(self, path: str) -> np.ndarray:
        name, _, index = path.rpartition(IDX_REF)
        return np.asarray(self._images(name)[int(index)])

    def _images(self, name: str) -> np.ndarray:
        if name not in self._idx:
            if self._tmp is None:
                self._tmp = tempfile.mkdtemp(prefix="idx-")
            self._idx[name] = _memmap_idx(self.root / name, Path(self._tmp), expected_dims=3)
        return self._idx[name]

    def close(self) -> None:
        self._idx.clear()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    @classmethod
    def from_params(cls, p) -> "Source":
        """The source that params.yaml's `ingest:` section names: a folder, or a URL (s3://...)."""
        if is_url(p.source):
            from imgpipe.data.remote import RemoteSource  # fsspec only for sources at a URL

            return RemoteSource(p.source, p.layout, p.labels_csv)
        return cls(p.source, p.layout, p.labels_csv)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def resolve_labels(labels: dict[int, tuple[str, str]], problems: list[tuple[int, str]], files: dict[str, object],
                   relative, csv_path, folder) -> dict[str, tuple[str, int]]:
    """{file (relative path): (label, line)} of the labels CSV's good rows (`labels`, by line), each
    naming a file of `files` by its path (`relative(key)` of the row's key) or, without its extension,
    by its name; a SourceError naming every bad row (`problems` and those found here) at once."""
    by_stem: dict[str, list[str]] = {}
    for rel in files:
        by_stem.setdefault(Path(rel).stem, []).append(rel)
    folded: dict[str, str] | None = None  # a name's letters folded -> a file, built on the first miss
    resolved: dict[str, tuple[str, int]] = {}
    for line, (key, label) in labels.items():
        rel = relative(key)
        if rel not in files:
            matches = by_stem.get(key, [])
            if len(matches) > 1:
                problems.append((line, f"id {key!r} matches several files ({', '.join(matches[:3])})"))
                continue
            if not matches:
                if folded is None:
                    folded = {name.casefold(): name for name in [*files, *by_stem]}
                near = folded.get(rel.casefold()) or folded.get(key.casefold())
                hint = f" (there is {near!r}: the letter case differs)" if near else ""
                problems.append((line, f"{key!r} names no file in {folder}{hint}"))
                continue
            rel = matches[0]
        if rel in resolved and resolved[rel][0] != label:
            problems.append((line, f"{rel!r} is labelled {label!r} here and {resolved[rel][0]!r} on line "
                                   f"{resolved[rel][1]}"))
            continue
        resolved.setdefault(rel, (label, line))
    if problems:
        raise bad_rows(csv_path, problems)
    return resolved


class TooLarge(OSError):
    """The file holds more bytes than the caller would read into memory."""

    def __init__(self, size: int, limit: int):
        super().__init__(errno.EFBIG, f"{size} bytes, over the limit of {limit}")
        self.size = size


def is_url(source: str | Path) -> bool:
    """Whether ingest.source is a URL (s3://bucket/prefix, file:///data), read through fsspec."""
    return "://" in str(source)


def read_file(root: str | Path, path: str, limit: int | None = None) -> bytes:
    """The bytes of the file at `path` (relative to the source folder `root`, or its URL); TooLarge
    if it holds more than `limit` bytes."""
    if is_url(root):
        from imgpipe.data import remote

        return remote.read_file(str(root), path, limit)
    # os.read on a descriptor: half the cost of open().read() (no file object, no buffer), which
    # counts when the file is a 3 KB thumbnail read once per image
    fd, size = _open_regular(root, path)
    try:
        if limit is not None and size > limit:
            raise TooLarge(size, limit)
        chunks = [os.read(fd, size)]
        while chunk := os.read(fd, 1 << 20):  # to the end: the file may have grown, or be over 2 GB
            chunks.append(chunk)
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def hash_file(root: str | Path, path: str) -> tuple[str, bytes, int]:
    """(sha1 hex digest, first 64 bytes, size) of a file, read 1 MB at a time: never all in memory."""
    if is_url(root):
        from imgpipe.data import remote

        return remote.hash_file(str(root), path)
    digest, head, size = hashlib.sha1(), b"", 0
    fd, _ = _open_regular(root, path)
    try:
        while chunk := os.read(fd, 1 << 20):
            head = head or chunk[:64]
            digest.update(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest(), head, size


def _open_regular(root: str | Path, path: str) -> tuple[int, int]:
    """A descriptor open for reading on a regular file, and its size; OSError for anything else."""
    # O_NONBLOCK: opening a named pipe would otherwise wait for a writer, forever
    fd = os.open(os.path.join(root, path), os.O_RDONLY | os.O_NONBLOCK)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # a pipe has no end, a device may have none
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file (a folder, named pipe, socket or device)")
    return fd, info.st_size


# bad rows of a labels file shown in the error; the rest are counted
BAD_ROWS_SHOWN = 20


def bad_rows(path: Path, problems: list[tuple[int, str]]) -> SourceError:
    """One error for every bad row of the labels file `path` (line, reason): fixing one row a run
    would take as many runs as there are bad rows."""
    problems = sorted(problems)
    count = len(problems)
    lines = [f"{path}: {count} bad row{'s' if count > 1 else ''} (expected `<file or id>,<label>` "
             f"naming a file in the source folder):"]
    lines += [f"  line {line}: {reason}" for line, reason in problems[:BAD_ROWS_SHOWN]]
    if count > BAD_ROWS_SHOWN:
        lines.append(f"  ... and {count - BAD_ROWS_SHOWN} more bad rows")
    return SourceError("\n".join(lines))


def read_labels_csv(root: Path, name: str) -> dict[int, tuple[str, str]]:
    """Rows of the labels CSV as {line number: (file or id, label)}; one error names every bad line."""
    rows, problems = _labels_rows(root, name)
    if problems:
        raise bad_rows(root / name, problems)
    return rows


def _labels_rows(root: Path, name: str) -> tuple[dict[int, tuple[str, str]], list[tuple[int, str]]]:
    """The good rows of the labels CSV ({line number: (file or id, label)}) and the bad ones
    ((line number, reason)); an error for a file that cannot be read as text at all."""
    path = root / name
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not UTF-8 text (byte {exc.start}); save the labels file as UTF-8") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot read labels file: {exc.strerror}") from None
    root_resolved = root.resolve()
    # realpath: Path.resolve raises on a loop of links (Python 3.11); the listing reports those
    return parse_labels(text, path, lambda key: Path(key).is_absolute()
                        or not Path(os.path.realpath(root / key)).is_relative_to(root_resolved))


def parse_labels(text: str, path, outside) -> tuple[dict[int, tuple[str, str]], list[tuple[int, str]]]:
    """The labels CSV's text as _labels_rows returns it; `outside(key)`: whether a row's key points
    outside the source folder. `path` names the file in messages."""
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise SourceError(f"{path}: empty labels file (expected a header, then `<file or id>,<label>` rows)")
    out: dict[int, tuple[str, str]] = {}
    problems: list[tuple[int, str]] = []
    seen: dict[str, tuple[int, str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            got = ",".join(row)
            # a spreadsheet saved with another separator: say which, the usual cause
            other = next((sep for sep in (";", "\t", "|") if len(row) == 1 and sep in got), None)
            hint = f" (separated by {other!r}: the separator is a comma)" if other else ""
            problems.append((line, f"expected `<file or id>,<label>`, got {got!r}{hint}"))
            continue
        key, label = row[0].strip(), row[1].strip()
        if outside(key):
            problems.append((line, f"{key!r} points outside the source folder"))
            continue
        if key in seen:
            first_line, first_label = seen[key]
            if first_label != label:
                problems.append((line, f"{key!r} labelled {label!r}, but line {first_line} labels it {first_label!r}"))
            continue  # the same row twice says nothing new
        seen[key] = (line, label)
        out[line] = (key, label)
    return out, problems


def _class_names(root: Path) -> list[str]:
    path = root / "classes.txt"
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _idx_header(fh, path: Path, expected_dims: int) -> tuple[int, ...]:
    magic = fh.read(4)
    if len(magic) < 4 or magic[:2] != b"\x00\x00" or magic[2] != 0x08:
        raise SourceError(f"{path.name}: not an unsigned-byte IDX file (magic {magic.hex()})")
    if magic[3] != expected_dims:
        raise SourceError(f"{path.name}: IDX file has {magic[3]} dimensions, expected {expected_dims}")
    return struct.unpack(f">{expected_dims}I", fh.read(4 * expected_dims))


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    with _open(path) as fh:
        dims = _idx_header(fh, path, expected_dims)
        data = np.frombuffer(fh.read(), dtype=np.uint8)
    if data.size != int(np.prod(dims)):
        raise SourceError(f"{path.name}: truncated IDX file ({data.size} values, header says {int(np.prod(dims))})")
    return data.reshape(dims)


def _memmap_idx(path: Path, tmp: Path, expected_dims: int) -> np.ndarray:
    """Decompress an IDX file to `tmp` in chunks and memory-map its values."""
    with _open(path) as fh:
        dims = _idx_header(fh, path, expected_dims)
        raw = tmp / (path.name + ".raw")
        with open(raw, "wb") as out:
            shutil.copyfileobj(fh, out, length=1 << 20)
    size = raw.stat().st_size
    if size != int(np.prod(dims)):
        raise SourceError(f"{path.name}: truncated IDX file ({size} values, header says {int(np.prod(dims))})")
    return np.memmap(raw, dtype=np.uint8, mode="r", shape=dims)
