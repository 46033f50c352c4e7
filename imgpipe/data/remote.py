"""A source at a URL (`ingest.source: s3://bucket/flowers`, or any fsspec file system: gs://, az://,
file://): listed and read through fsspec, so Dask workers on other machines read the raw images
themselves, with no shared file system.

The folder and CSV layouts, with the rules of a local folder (imgpipe/data/sources.py): paths
relative to the source with forward slashes, hidden names skipped and counted, class folders or a
train/val/test layout, a labels CSV naming files by path or by name. The records come in the
order a local copy of the same files lists them, so the manifest is the same byte for byte.
IDX files are not read from a URL (copy them first, e.g. `dvc import-url`); object stores have no
links, so none of the local checks on links apply.

Credentials and endpoints come from the file system's usual places (S3: the AWS_* variables,
~/.aws, an instance role; AWS_ENDPOINT_URL for an S3-compatible store such as MinIO). Each file's
`stamp` (its size and ETag, or modification time, from the listing) keys ingest's facts cache:
a re-run reads only the objects that changed, with no request per unchanged object.
"""

from __future__ import annotations

import errno
import hashlib
import posixpath
from collections.abc import Iterator

import fsspec

from imgpipe.data.sources import (IDX_IMAGES, SKIPPED, SPLIT_FOLDERS, Record, Source, SourceError, TooLarge,
                                  parse_labels, resolve_labels)

_filesystems: dict[str, tuple[fsspec.AbstractFileSystem, str]] = {}  # per process: one client per URL


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system of `url` and the path in it, without a trailing slash."""
    if url not in _filesystems:
        fs, path = fsspec.core.url_to_fs(url)
        _filesystems[url] = fs, path.rstrip("/")
    return _filesystems[url]


def _stamp(info: dict) -> str:
    """What changes when the object does, from its listing entry: size and ETag (or time)."""
    version = next((info[k] for k in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified")
                    if info.get(k)), "")
    return f"{info.get('size')}|{str(version).strip(chr(34))}"


def _io_error(url: str, exc: Exception) -> OSError:
    if isinstance(exc, FileNotFoundError):
        return OSError(errno.ENOENT, f"no such object: {url}")
    return OSError(errno.EIO, f"{type(exc).__name__}: {exc}")


def read_file(root: str, path: str, limit: int | None = None) -> bytes:
    """The bytes of `path` under the URL `root`; TooLarge past `limit` bytes (one ranged GET)."""
    fs, base = filesystem(root)
    url = f"{base}/{path}"
    try:
        data = fs.cat_file(url, start=0, end=None if limit is None else limit + 1)
        if limit is not None and len(data) > limit:
            raise TooLarge(fs.size(url), limit)
    except (TooLarge, OSError) as exc:
        if isinstance(exc, TooLarge) or (isinstance(exc, OSError) and exc.strerror):
            raise
        raise _io_error(url, exc) from None
    except Exception as exc:  # the file system's own errors (botocore's, say): as an OSError, with why
        raise _io_error(url, exc) from None
    return data


def hash_file(root: str, path: str) -> tuple[str, bytes, int]:
    """(sha1 hex digest, first 64 bytes, size), read 1 MB at a time: never all in memory."""
    fs, base = filesystem(root)
    digest, head, size = hashlib.sha1(), b"", 0
    try:
        with fs.open(f"{base}/{path}", "rb", block_size=1 << 20) as fh:
            while chunk := fh.read(1 << 20):
                head = head or chunk[:64]
                digest.update(chunk)
                size += len(chunk)
    except Exception as exc:
        raise _io_error(f"{base}/{path}", exc) from None
    return digest.hexdigest(), head, size


class _Object:
    __slots__ = ("info",)

    def __init__(self, info: dict):
        self.info = info


class RemoteSource(Source):
    """Source's listing and reading over fsspec (see the module's docstring)."""

    def __init__(self, url: str, layout: str = "auto", labels_csv: str = "labels.csv"):
        self.root = url.rstrip("/")
        self.labels_csv = labels_csv
        self.fs, self._base = filesystem(self.root)
        try:
            listing = self.fs.find(self._base, detail=True)
        except Exception as exc:
            raise SourceError(f"ingest.source {url}: cannot list it: {exc}") from None
        if not listing:
            raise SourceError(f"ingest.source {url} does not exist, is not a folder or holds no files")
        # a tree of the listing: folder name -> sub-tree (a dict), file name -> its listing entry (an _Object)
        self._tree: dict = {}
        for full, info in listing.items():
            *folders, name = full[len(self._base):].strip("/").split("/")
            node = self._tree
            for folder in folders:
                node = node.setdefault(folder, {})
            node[name] = _Object(info)
        top_files = [n for n, v in self._tree.items() if not self._is_folder(v)]
        if layout == "auto":
            layout = "idx" if any(IDX_IMAGES.match(n) for n in top_files) else \
                "csv" if labels_csv in top_files else "folders"
        if layout not in ("folders", "csv"):
            raise SourceError(f"ingest.source {url}: the {layout} layout is not read from a URL (only folders and "
                              "csv); copy the files to a local folder first (e.g. `dvc import-url`)")
        self.layout = layout
        self._tmp = None
        self._idx = {}
        self.skipped = dict.fromkeys(SKIPPED, 0)

    # -- listing -----------------------------------------------------------------------------

    @staticmethod
    def _is_folder(node) -> bool:
        return isinstance(node, dict)

    def _count(self, node: dict) -> int:
        return sum(self._count(c) if self._is_folder(c) else 1 for c in node.values())

    def _visible(self, node: dict) -> list[tuple[str, dict]]:
        """The entries of a folder whose names do not start with a dot, by name; the others counted."""
        out = []
        for name, child in sorted(node.items()):
            if not name.startswith("."):
                out.append((name, child))
            elif self._is_folder(child):
                self.skipped["in_hidden_folders"] += self._count(child)
            else:
                self.skipped["hidden"] += 1
        return out

    def _walk(self, node: dict, prefix: str) -> Iterator[tuple[str, dict]]:
        """Every file below `node` (relative path, entry): a folder's files, then its sub-folders, as
        Source._files lists them."""
        entries = self._visible(node)
        for name, child in entries:
            if not self._is_folder(child):
                yield f"{prefix}{name}", child
        for name, child in entries:
            if self._is_folder(child):
                yield from self._walk(child, f"{prefix}{name}/")

    def _record(self, path: str, entry: "_Object", label: str, split: str) -> Record:
        return Record(path, label, split, stamp=_stamp(entry.info))

    def _folder_records(self) -> Iterator[Record]:
        top = self._visible(self._tree)
        split_layout = bool(top) and all(self._is_folder(c) and n.lower() in SPLIT_FOLDERS for n, c in top)
        for name, child in top:
            if not self._is_folder(child):
                yield self._record(name, child, "", "")
            elif split_layout:
                split = SPLIT_FOLDERS[name.lower()]
                for class_name, class_node in self._visible(child):
                    prefix = f"{name}/{class_name}"
                    if self._is_folder(class_node):
                        yield from (self._record(p, i, class_name, split) for p, i in self._walk(class_node, prefix + "/"))
                    else:
                        yield self._record(prefix, class_node, "", split)
            else:
                yield from (self._record(p, i, name, "") for p, i in self._walk(child, name + "/"))

    def _csv_records(self) -> Iterator[Record]:
        url = f"{self.root}/{self.labels_csv}"
        try:
            text = self.fs.cat_file(f"{self._base}/{self.labels_csv}").decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise SourceError(f"{url}: not UTF-8 text (byte {exc.start}); save the labels file as UTF-8") from None
        except Exception as exc:
            raise SourceError(f"{url}: cannot read labels file: {exc}") from None
        labels, problems = parse_labels(
            text, url, lambda key: key.startswith("/") or posixpath.normpath(key).split("/")[0] == "..")
        files = {p: info for p, info in self._walk(self._tree, "") if p != self.labels_csv}
        resolved = resolve_labels(labels, problems, files, posixpath.normpath, url, self.root)
        for path, info in files.items():
            yield self._record(path, info, resolved.get(path, ("",))[0], "")

    # -- reading -----------------------------------------------------------------------------

    def read_bytes(self, path: str) -> bytes:
        return read_file(self.root, path)
