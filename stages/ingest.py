"""Ingest: list every raw input once, with its content id and what its bytes really are.

Output: the manifest CSV (`paths.manifest`), one row per input file (for IDX: per image):

    id, label, path, source_split, format, width, height, channels, bit_depth, bytes, error

`id` is the sha1 of the bytes, so the same image always has the same id wherever it lives.
A file that cannot be decoded is still listed, with `error` saying why; `validate` decides
what to quarantine. Images are read one at a time: memory does not grow with the dataset.
"""

from __future__ import annotations

import csv
import hashlib
import logging

from tqdm import tqdm

from stages import imagefile
from stages.atomic import atomic_path
from stages.cli import StageError, stage_main
from stages.params import Params
from stages.sources import Record, Source, SourceError

COLUMNS = ["id", "label", "path", "source_split", "format", "width", "height", "channels", "bit_depth", "bytes", "error"]
log = logging.getLogger(__name__)


def describe(record: Record, data: bytes, pixels_shape: tuple[int, int] | None = None) -> dict:
    """The manifest row of one input: pure, from its record and bytes.

    `pixels_shape` is given for raw pixels (IDX), which need no decoding.
    """
    row = {"id": hashlib.sha1(data).hexdigest(), "label": record.label, "path": record.path,
           "source_split": record.source_split, "bytes": len(data)}
    if pixels_shape is not None:
        height, width = pixels_shape
        return row | {"format": "idx", "width": width, "height": height, "channels": 1, "bit_depth": 8, "error": ""}
    decoded = imagefile.decode(data)
    row |= {"format": imagefile.detect_format(data), "error": decoded.error}
    if decoded.ok:
        width, height, channels, bit_depth = imagefile.shape_of(decoded.image)
        row |= {"width": width, "height": height, "channels": channels, "bit_depth": bit_depth}
    return row


def unreadable(record: Record, reason: str) -> dict:
    return {"label": record.label, "path": record.path, "source_split": record.source_split,
            "format": "unknown", "error": reason}


def ingest(source: Source, writer: csv.DictWriter) -> int:
    count = 0
    for record in tqdm(source.records(), desc="ingest", unit="img", mininterval=2, disable=None):
        count += 1
        if record.problem:
            writer.writerow(unreadable(record, record.problem))
        elif source.layout == "idx":
            pixels = source.read_idx_pixels(record.path)
            writer.writerow(describe(record, pixels.tobytes(), pixels.shape))
        else:
            try:
                data = source.read_bytes(record.path)
            except OSError as exc:
                writer.writerow(unreadable(record, f"cannot read file: {exc.strerror}"))
                continue
            writer.writerow(describe(record, data))
    return count


def run(params: Params) -> None:
    p = params.ingest
    try:
        with Source(p.source, p.layout, p.labels_csv) as source, atomic_path(params.paths.manifest) as tmp:
            log.info("reading %s (layout: %s)", p.source, source.layout)
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
                writer.writeheader()
                count = ingest(source, writer)
            if count == 0:
                raise StageError(f"ingest.source {p.source} holds no files")
    except SourceError as exc:
        raise StageError(str(exc)) from None
    log.info("%d inputs listed in %s", count, params.paths.manifest)


def main(argv=None) -> int:
    return stage_main("ingest", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
