"""The manifest and the tables made from it: their columns, each column's type, and their reader.

- the manifest (`paths.manifest`, written by ingest): one row per input file, COLUMNS. `id` is
  the sha1 of the bytes; label, path and source_split are what the source lists; format to
  error what the bytes are (`error` says why a file could not be decoded, and its sizes are then
  empty); the last five, FACTS, describe the pixels (imgpipe/images/facts.py), empty when the
  image was not decoded.
- the accepted list (`paths.accepted`, written by validate): the accepted rows, plus `group`,
  the image's near-duplicate group (named by its smallest id).
- the split table (`paths.split`, written by split): the accepted list, plus `bucket` (of the
  image's id), `assigned` (train, val or test, for good; empty for a near-duplicate `conflict`),
  `arrival` (the image's place in its split's order of arrival, which lays out the shards),
  `split` (what the later stages use: `assigned`, or `unused`) and `reason` (why unused).
  imgpipe/data/splitting.py says what they mean, and writes and reads its state.

Each is read here, typed column by column, so that the stages agree on what a field holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from imgpipe.core.errors import StageError

if TYPE_CHECKING:
    import pandas as pd

# what the source's listing says of a file (the others depend on the file's bytes alone)
RECORD_COLUMNS = ["label", "path", "source_split"]
FACTS = ["sharpness", "brightness", "contrast", "phash", "phash_mirror"]
COLUMNS = ["id", *RECORD_COLUMNS, "format", "width", "height", "channels", "bit_depth", "bytes", "error", *FACTS]
BYTE_COLUMNS = [c for c in COLUMNS if c not in RECORD_COLUMNS]
# Text stays text: a class called "0" is not a number, nor is a hash of decimal digits. A column a
# file lacks is not read (pandas passes over those names).
DTYPES = {**{c: str for c in ("id", "label", "path", "source_split", "format", "error", "phash", "phash_mirror",
                              "group", "assigned", "split", "reason")},
          **{c: "Int64" for c in ("width", "height", "channels", "bit_depth", "bytes", "bucket", "arrival")},
          **{c: "float64" for c in ("sharpness", "brightness", "contrast")}}


def read_table(path: str | Path, what: str, made_by: str, columns: list[str] | None = None) -> pd.DataFrame:
    """The table at `path` (all its columns, or only `columns`), typed by DTYPES; a StageError naming
    `what` it is and the stage that writes it when it is missing or not a readable CSV."""
    import pandas as pd  # here: ingest (and its forked workers) needs the column names only

    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: {what} not found (run the {made_by} stage first)")
    try:
        # only empty fields are missing: a class called "NA" or "None" stays a class
        return pd.read_csv(path, dtype=DTYPES, keep_default_na=False, na_values=[""], usecols=columns)
    except (ValueError, pd.errors.ParserError) as exc:
        raise StageError(f"{path}: not a readable {what}: {exc}") from None


def read_manifest(path: str | Path) -> pd.DataFrame:
    """The manifest, in COLUMNS order; a StageError when a column is missing or there is no row."""
    frame = read_table(path, "manifest", "ingest")
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise StageError(f"{path}: manifest lacks column(s) {', '.join(missing)}; expected {','.join(COLUMNS)} "
                         "(re-run the ingest stage)")
    if frame.empty:
        raise StageError(f"{path}: the manifest has no rows; nothing to validate")
    return frame if list(frame.columns) == COLUMNS else frame[COLUMNS]  # a copy only to reorder


def read_accepted(path: str | Path) -> pd.DataFrame:
    """The accepted list."""
    return read_table(path, "accepted list", "validate")


def read_split(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """The split table, or only its `columns`."""
    return read_table(path, "split table", "split", columns)
