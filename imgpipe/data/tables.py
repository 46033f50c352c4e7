"""The pipeline's tables in bounded memory, through DuckDB: millions of rows read from their CSV
files as a stream, sorted, grouped and joined out of core.

pandas holds a whole table, at about 1 KB a row with its strings as Python objects (bench/RESULTS.md:
preprocess's table work took 1.3 GB at 1M rows), so a stage's memory grew with the data set.
DuckDB reads a CSV in chunks, runs the query over them, and past `MEMORY_LIMIT` spills what a
sort or a join holds to a temporary folder, which this module creates and deletes; results come
back in batches. Chosen over Polars (its streaming engine runs only part of its operations out of
core) and pyarrow alone (no out-of-core sort or join): one wheel, no other dependency, SQL that
reads like the rules it applies. The files stay CSV, readable by people and by pandas.

A table is read with every column as text (a class called "0" or "NA" stays a class); the columns
manifest.DTYPES types as integers or floats are cast, so the stages agree on what a field holds.
Only an empty field is missing (NULL).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from imgpipe.core.atomic_write import atomic_path
from imgpipe.core.errors import StageError
from imgpipe.data.manifest import DTYPES

# What DuckDB may hold before it spills to disk: the stage's memory stays under about this plus
# the Python process (~100-400 MB with its imports), whatever the number of rows (bench/RESULTS.md).
MEMORY_LIMIT = "384MB"
# rows per batch fetched from a query's result
FETCH_ROWS = 65_536
_SQL_TYPES = {"Int64": "BIGINT", "float64": "DOUBLE"}


@contextlib.contextmanager
def connect(in_memory: bool = False) -> Iterator:
    """A DuckDB connection with the memory limit, its database file and spill folder in a folder of
    its own (deleted after). A file, not an in-memory database, and the stages' big tables plain
    tables in it, not TEMP ones: their blocks can then leave memory for the file, which leaves
    the memory to the joins and sorts (at 10M rows, TEMP tables filled the limit by themselves
    and the stages' joins ran out of memory). `in_memory`: no database file, for tables that fit
    in memory (frames()): each table made then costs no write to the file and its log."""
    import duckdb

    spill = tempfile.mkdtemp(prefix="imgpipe-duckdb-")
    database = ":memory:" if in_memory else str(Path(spill) / "tables.duckdb")
    con = duckdb.connect(database, config={"memory_limit": MEMORY_LIMIT, "temp_directory": spill})
    # DuckDB's own progress bar on a long query, in a terminal only (not in DVC's or Prefect's logs)
    con.execute(f"SET enable_progress_bar = {str(sys.stderr.isatty()).lower()}")
    try:
        yield con
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)


# the connection frames() hands out cursors of (opening one costs ~15 ms); in memory: the frames'
# tables are small, and each table made in a database file costs a write (the splitting property
# test: 63 s with a file, 43 s in memory)
_shared = []


@contextlib.contextmanager
def frames() -> Iterator:
    """A cursor of one connection shared by the calls on pandas frames (tests, notebooks) that run
    a stage's SQL: its own TEMP views; the stages' plain tables are shared by the cursors, and
    each call replaces the ones it makes (so two such calls must not overlap)."""
    if not _shared:
        _shared.append(connect(in_memory=True))
        _shared.append(_shared[0].__enter__())
    cursor = _shared[1].cursor()
    try:
        yield cursor
    finally:
        cursor.close()


def quote(path: str | Path) -> str:
    """A path as an SQL string literal."""
    return "'" + str(path).replace("'", "''") + "'"


def read(con, path: str | Path, what: str, made_by: str, name: str, typed: bool = True) -> list[str]:
    """Make the CSV table at `path` the view `name`, its columns typed by manifest.DTYPES (`typed`)
    or all text as the file has them (to be written out again as they were); its column names. A
    StageError naming `what` it is and the stage that writes it when it is missing or not a
    readable CSV."""
    import duckdb

    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: {what} not found (run the {made_by} stage first)")
    source = (f"read_csv({quote(path)}, header = true, delim = ',', quote = '\"', escape = '\"', "
              "all_varchar = true, nullstr = '')")
    try:
        columns = [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()]
    except duckdb.Error as exc:
        raise StageError(f"{path}: not a readable {what}: {exc}") from None
    selected = typed_columns(columns) if typed else ", ".join(map(ident, columns))
    con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT {selected} FROM {source}")
    return columns


def typed_columns(columns: list[str]) -> str:
    """A select list of text `columns`, those manifest.DTYPES types as numbers cast to them."""
    return ", ".join(f"CAST({ident(c)} AS {_SQL_TYPES[DTYPES[c]]}) AS {ident(c)}" if DTYPES.get(c) in _SQL_TYPES
                     else ident(c) for c in columns)


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def write_csv(con, query: str, path: str | Path) -> None:
    """The rows of `query` as a CSV file at `path`, atomically: a header, fields quoted only when
    they must be, a missing value as an empty field (the layout pandas writes)."""
    with atomic_path(path) as tmp:
        con.execute(f"COPY ({query}) TO {quote(tmp)} (HEADER, DELIMITER ',')")


def batches(con, query: str, params=None) -> Iterator[list[tuple]]:
    """The rows of `query`, FETCH_ROWS at a time."""
    result = con.execute(query, params or [])
    while rows := result.fetchmany(FETCH_ROWS):
        yield rows


def guarded(work, what: str):
    """work(), with DuckDB's errors (a field that is not a number, say) as a StageError starting with `what`."""
    import duckdb

    try:
        return work()
    except duckdb.Error as exc:
        raise StageError(f"{what}: {exc}") from None
