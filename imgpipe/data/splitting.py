"""Split: assign every accepted image to train, val or test, once, and never move it.

Two columns, so that nothing has to move. `assigned` is an image's split, decided the first time
the image is seen and kept for as long as the split state remembers it (see "The state").
`split` is what the downstream stages use: train, val, test or unused, and it is always either
`assigned` or `unused`. `reason` says why an image is unused. So an image assigned to val or
test is never trained on, and one assigned to train is never evaluated.

How a new image is assigned:

- `hash`: by the bucket (the last byte of the sha1, 0-255) of its near-duplicate group's name,
  which for an image without near-duplicates is its own id; `split.test_buckets` and
  `split.val_buckets` say which buckets go where. The bucket depends on the bytes alone.
- `source`: the split the source came with (IDX train/t10k, train/ val/ test/ folders), so
  results compare with published figures. A source without a validation split, or without a
  test split (train/ and val/ folders only, as in the PyTorch transfer-learning tutorial), has
  it carved from its train split by hash, with the same bucket ranges, and the log says so.
- Near-duplicates (validate's `group` column: a group is named by its smallest id) stay in one
  split, or a near-copy of a test image would be trained on: a new image whose group holds
  assigned images takes their assignment. One whose group holds images assigned to different
  splits (it links two groups) gets none: it is unused, reason `conflict`, and a new
  assignment is tried on every run. With `source`, groups are kept together only within each
  source split (validate reports groups that cross the source's split).

What is set aside (`split` unused), never moved:

- `balance` (`split.balance`): in a split chosen by hash (hash: val and test; source: a carved
  one), each class keeps as many images as the smallest class has there, first arrived first
  (see `arrival` below; on a first run, lowest ids first), so per-class metrics are not skewed by
  class sizes, and an image evaluated once stays evaluated while the data grows. A split the
  source gave is never trimmed.
- `cap` (`split.max_train_per_class` / `max_val_per_class`): a split's images beyond the cap, per
  class, first arrived first.
- `near_duplicate`: a train image in a near-duplicate group that also holds images used in val
  or test (groups merged by a new linking image, or by a larger `validate.near_duplicate_distance`
  after the images were assigned): its near-copies are evaluated, so it is not trained on.
- `source_split` (`source` only): the source now lists the image in another split than the one
  it was assigned (a file moved between folders); it is used for neither.

The state (`paths.split_state`, a persist output of the split stage: DVC versions it but never
deletes it before a run) holds `id,assigned,arrival` for every image ever assigned, under a first
line naming the split's definition (split.method, test_buckets, val_buckets) it was made with.
`arrival` is the image's place in its split's order of arrival (0, 1, 2, ...; new images of a
run take the next numbers in id order; a number is never reused), kept like `assigned`:
preprocess lays the shards out by it, so images that arrive later land in new shards and
the existing shards keep their bytes (imgpipe/model/shards.py). A state without the column (made
before it existed) numbers its images in id order.
Removed images stay in it, so an image that comes back keeps its split. When the definition
changes the state no longer applies: the stage logs that and starts afresh. To start afresh by
hand, delete the file and run `dvc repro split`.

The rules run as SQL over the accepted list and the state in DuckDB (imgpipe/data/tables.py), so
the memory the stage takes does not grow with the number of images; `assign`, `next_state` and
`read_state` give the same on pandas frames, for tests and notebooks.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from imgpipe.core.atomic_write import atomic_path
from imgpipe.core.errors import StageError
from imgpipe.core.params import Split
from imgpipe.data import tables

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
STATE_COLUMNS = ["id", "assigned", "arrival"]
# the state's first line; the rest is a CSV of STATE_COLUMNS
STATE_HEADER = "# imgpipe split state, made with "
# what a split table adds to the accepted list, in order
ADDED = ["bucket", "assigned", "arrival", "split", "reason"]
RESET = "delete it and run `dvc repro split` to assign every image afresh"


def bucket(image_id: str) -> int:
    """The hash bucket of an image: the last byte of its sha1."""
    return int(image_id[-2:], 16)


def _bucket_sql(column: str) -> str:
    return f"CAST('0x' || right({column}, 2) AS INTEGER)"


def _between(column: str, bounds) -> str:
    return f"({column} BETWEEN {int(bounds[0])} AND {int(bounds[1])})"


def _list(values) -> str:
    return "(" + ", ".join(tables.quote(v) for v in values) + ")"


def definition(p: Split) -> dict:
    """What decides a new image's assignment; a state made under another definition is void."""
    return {"method": p.method, "test_buckets": list(p.test_buckets), "val_buckets": list(p.val_buckets)}


# --- the state ---------------------------------------------------------------------------------

def load_state(con, path: str | Path) -> dict | None:
    """The temp table `state` (id, assigned, arrival) from the state at `path`, checked; the
    definition it was made with. None, and an empty `state`, when there is no state."""
    con.execute("CREATE OR REPLACE TABLE state (id VARCHAR, assigned VARCHAR, arrival BIGINT)")
    path = Path(path)
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as fh:
        first = fh.readline()
    try:
        made_with = json.loads(first[len(STATE_HEADER):]) if first.startswith(STATE_HEADER) else None
    except ValueError:
        made_with = None
    if not isinstance(made_with, dict):
        raise StageError(f"{path}: not a split state (its first line should start with {STATE_HEADER.strip()!r}); "
                         f"{RESET}")
    # (DuckDB's sniffer refuses the first line, a JSON object, when told the quote character: it
    # finds the standard one itself; a state's fields need no quoting)
    source = f"read_csv({tables.quote(path)}, skip = 1, header = true, delim = ',', all_varchar = true, nullstr = '')"
    import duckdb

    try:
        columns = [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()]
        if columns not in (STATE_COLUMNS, STATE_COLUMNS[:2]):
            raise StageError(f"{path}: a split state has columns {','.join(STATE_COLUMNS)}, this one "
                             f"{','.join(map(str, columns))}; {RESET}")
        # a table's rowid is its rows' place in the file (DuckDB keeps the insertion order): a
        # window over the whole table would hold it in memory at once
        con.execute(f"CREATE OR REPLACE TABLE state_file AS SELECT * FROM {source}")
        con.execute("CREATE OR REPLACE TABLE state_rows AS SELECT *, rowid + 1 AS line FROM state_file")
        if columns == STATE_COLUMNS[:2]:  # made before arrivals were kept: each split numbered in id order
            con.execute("""CREATE OR REPLACE TABLE state_rows AS SELECT id, assigned, CAST(row_number() OVER (
                           PARTITION BY assigned ORDER BY id, line) - 1 AS VARCHAR) AS arrival, line FROM state_rows""")
    except duckdb.Error as exc:
        raise StageError(f"{path}: not a readable split state: {exc}; {RESET}") from None
    bad = con.execute(f"""
        SELECT count(*), arg_min(line, line), arg_min(id, line), arg_min(assigned, line), arg_min(arrival, line)
        FROM (SELECT *, TRY_CAST(arrival AS DOUBLE) AS n,
                     row_number() OVER (PARTITION BY id ORDER BY line) AS nth_id,
                     row_number() OVER (PARTITION BY assigned, TRY_CAST(arrival AS DOUBLE) ORDER BY line) AS nth_number
              FROM state_rows)
        WHERE assigned IS NULL OR assigned NOT IN {_list(SPLITS)} OR id IS NULL OR (id IS NOT NULL AND nth_id > 1)
              OR nth_number > 1 OR n IS NULL OR n < 0 OR n <> floor(n)""").fetchone()
    if bad[0]:
        count, line, image_id, assigned, arrival = bad
        raise StageError(f"{path}: {count} rows are not one image id with train, val or test and its own arrival "
                         f"number (e.g. line {line + 2}: {image_id or ''!r},{assigned or ''!r},{arrival or ''!r}); "
                         f"{RESET}")
    con.execute("INSERT INTO state SELECT id, assigned, CAST(CAST(arrival AS DOUBLE) AS BIGINT) FROM state_rows")
    return made_with


def previous_state(con, path: str | Path, p: Split) -> bool:
    """Load the state at `path` into the temp table `state` if it was made with the split's current
    definition (else `state` is empty); whether it applies."""
    made_with = load_state(con, path)
    if made_with is None:
        log.info("no split state at %s: every image is assigned afresh", path)
        return False
    if made_with != definition(p):
        log.warning("%s was made with split %s, the split is now defined as %s: the state no longer applies, "
                    "every image is assigned afresh (images may change split)", path,
                    json.dumps(made_with, sort_keys=True), json.dumps(definition(p), sort_keys=True))
        con.execute("DELETE FROM state")
        return False
    return True


NEXT_STATE = """SELECT id, assigned, arrival FROM state
                UNION ALL
                SELECT id, assigned, arrival FROM out WHERE assigned IN ('train', 'val', 'test')
                       AND id NOT IN (SELECT id FROM state)
                ORDER BY id"""


def write_state_table(con, path: str | Path, p: Split, query: str = NEXT_STATE) -> None:
    """The state at `path`: its first line, then `query`'s rows (default: the previous state plus
    the images `assign_tables` assigned this time, by id; removed images stay)."""
    with atomic_path(path) as tmp:
        body = Path(f"{tmp}.rows")
        try:
            con.execute(f"COPY ({query}) TO {tables.quote(body)} (HEADER, DELIMITER ',')")
            with open(tmp, "w", encoding="utf-8", newline="") as out, open(body, encoding="utf-8", newline="") as rows:
                out.write(STATE_HEADER + json.dumps(definition(p), sort_keys=True) + "\n")
                shutil.copyfileobj(rows, out, 1 << 20)
        finally:
            body.unlink(missing_ok=True)


# --- the assignment ----------------------------------------------------------------------------

def _set_aside(con, where: str, reason: str, what: str) -> None:
    (n,) = con.execute(f"UPDATE out SET split = 'unused', reason = ? WHERE split <> 'unused' AND ({where})",
                       [reason]).fetchone()
    if n:
        log.info("%d images set aside (split unused, reason %s): %s", n, reason, what)


def _beyond_first(name: str, per_class: int) -> str:
    """Rows of split `name` beyond the first `per_class` of their class to arrive (by arrival
    number, which is id order within a run): images in use stay in use as the data grows, and
    new ones wait for room."""
    return f"""ord IN (SELECT ord FROM (SELECT ord, row_number() OVER (PARTITION BY label ORDER BY arrival, id, ord) AS rank
                                      FROM out WHERE split = '{name}') WHERE rank > {int(per_class)})"""


def _balance(con, name: str, classes: list[str]) -> None:
    """Trim split `name` to the same count per class; the surplus is set aside."""
    counts = dict(con.execute(f"SELECT label, count(*) FROM out WHERE split = '{name}' GROUP BY label").fetchall())
    missing = [c for c in classes if not counts.get(c)]
    if not classes or missing:
        log.warning("not balancing %s: classes %s have no image there", name, missing)
        return
    least = min(counts[c] for c in classes)
    _set_aside(con, _beyond_first(name, least), "balance", f"{name} balanced to {least} images per class")


def _cap(con, name: str, limit: int) -> None:
    if limit > 0:
        _set_aside(con, _beyond_first(name, limit), "cap", f"{name} capped at {limit} images per class")


def assign_tables(con, p: Split, columns: list[str]) -> None:
    """From the view `accepted` (the accepted list's `columns` as text, and `ord`, its row order)
    and the temp table `state` (the previous assignment; empty: none): the temp table `out`, one
    row per accepted row (`ord`) with the columns the rules read (id, label, source_split), `key`
    (the near-duplicate key) and ADDED; split_table_query joins the other columns back. The pure
    core of the stage."""
    group = '"group"' if "group" in columns else "id"  # an accepted list without groups splits image by image
    source = p.method == "source"
    if source:
        if "source_split" not in columns:
            columns_missing = con.execute("SELECT count(*), arg_min(path, ord) FROM accepted").fetchone()
        else:
            columns_missing = con.execute("SELECT count(*), arg_min(path, ord) FROM accepted "
                                          "WHERE coalesce(source_split, '') = ''").fetchone()
        if columns_missing[0]:
            raise StageError(
                f"split.method source needs the split each image came with, but {columns_missing[0]} images have none "
                f"(e.g. {columns_missing[1]}); use split.method: hash for this source")
        unknown = con.execute(f"SELECT count(*), arg_min(path, ord), arg_min(source_split, ord) FROM accepted "
                              f"WHERE source_split NOT IN {_list(SPLITS)}").fetchone()
        if unknown[0]:
            raise StageError(f"split.method source: {unknown[0]} images have a source split other than "
                             f"{', '.join(SPLITS)} (e.g. {unknown[1]}: {unknown[2]!r})")
        given = {r[0] for r in con.execute("SELECT DISTINCT source_split FROM accepted").fetchall()}
        carved = [name for name in ("val", "test") if name not in given]
        for name in carved:
            bounds = getattr(p, f"{name}_buckets")
            log.info("the source has no %s split: %s carved from its train split by hash (split.%s_buckets %s)",
                     name, name, name, list(bounds))
        cases = "".join(f"WHEN source_split = 'train' AND {_between('gb', getattr(p, f'{name}_buckets'))} THEN '{name}' "
                        for name in ("test", "val") if name in carved)
        wanted = f"CASE {cases}ELSE source_split END" if cases else "source_split"
        key = "grp || '/' || source_split"
    else:
        carved = ["val", "test"]
        wanted = (f"CASE WHEN {_between('gb', p.test_buckets)} THEN 'test' "
                  f"WHEN {_between('gb', p.val_buckets)} THEN 'val' ELSE 'train' END")
        key = "grp"
    # Narrow tables from here on (the columns the rules read): sorts and windows over every
    # column of millions of rows would not fit DuckDB's memory limit; the others join back at the end.
    extra = ", a.source_split" if "source_split" in columns else ""
    # grp: the image's near-duplicate group; gb: the group's bucket, which decides a new group's split
    con.execute(f"""
        CREATE OR REPLACE TABLE base AS
        WITH a AS (SELECT *, {group} AS grp, {_bucket_sql(group)} AS gb FROM accepted)
        SELECT a.ord, a.id, a.label{extra}, {_bucket_sql('a.id')} AS bucket, s.assigned AS prior,
               s.arrival AS known_arrival, {key} AS key, {wanted} AS wanted
        FROM a LEFT JOIN state s ON s.id = a.id""")
    # a new image takes the assignment of the assigned images sharing its key, "" if they disagree
    con.execute("""
        CREATE OR REPLACE TABLE inherited AS
        SELECT b.*, CASE WHEN prior IS NOT NULL THEN prior WHEN k.kinds > 1 THEN '' WHEN k.kinds = 1 THEN k.agreed
                         ELSE wanted END AS assigned
        FROM base b LEFT JOIN (SELECT key, count(DISTINCT prior) AS kinds, min(prior) AS agreed FROM base
                               WHERE prior IS NOT NULL GROUP BY key) k USING (key)""")
    # each assigned image's arrival: the state's, or for a new image the next free numbers of its
    # split, in id order; NULL where `assigned` is empty
    con.execute(f"""
        CREATE OR REPLACE TABLE arrivals AS
        SELECT ord, coalesce(t.top, -1) + row_number() OVER (PARTITION BY i.assigned ORDER BY i.id, i.ord) AS arrival
        FROM (SELECT ord, id, assigned FROM inherited WHERE known_arrival IS NULL AND assigned IN {_list(SPLITS)}) i
             LEFT JOIN (SELECT assigned, max(arrival) AS top FROM state GROUP BY assigned) t USING (assigned)""")
    con.execute("""
        CREATE OR REPLACE TABLE out AS
        SELECT i.* EXCLUDE (prior, known_arrival, wanted), coalesce(i.known_arrival, n.arrival) AS arrival,
               assigned AS split, '' AS reason
        FROM inherited i LEFT JOIN arrivals n USING (ord)""")

    _set_aside(con, "assigned = ''", "conflict", "new near-duplicates of images already in different splits")
    (mixed,) = con.execute("SELECT count(*) FROM (SELECT key FROM out WHERE assigned <> '' GROUP BY key "
                           "HAVING count(DISTINCT assigned) > 1)").fetchone()
    if mixed:
        log.warning("%d near-duplicate groups hold images assigned to different splits (a new image links them, or "
                    "validate.near_duplicate_distance grew since they were assigned); they keep their splits", mixed)
    if source:
        agrees = f"assigned = source_split OR (source_split = 'train' AND assigned IN {_list(carved or [''])})"
        _set_aside(con, f"NOT ({agrees})", "source_split",
                   "the source now lists them in another split than they were assigned")

    classes = [r[0] for r in con.execute("SELECT DISTINCT label FROM out ORDER BY label").fetchall()]
    if p.balance:
        for name in carved:
            _balance(con, name, classes)
    _cap(con, "val", p.max_val_per_class)
    # Before the train cap, so that it counts only the images that can be trained on.
    _set_aside(con, "split = 'train' AND key IN (SELECT key FROM out WHERE split IN ('val', 'test'))",
               "near_duplicate", "training images whose near-duplicates are in val or test")
    _cap(con, "train", p.max_train_per_class)


def split_table_query(columns: list[str], for_file: bool = False) -> str:
    """The split table's rows from `out`: the accepted list's columns, then ADDED, in its row order.
    `for_file`: an empty `assigned` or `reason` as NULL, which a CSV writes as an empty field (as
    pandas does; DuckDB would write an empty string as "")."""
    empty = ("assigned", "reason") if for_file else ()
    selected = [f"a.{tables.ident(c)}" for c in columns]
    selected += [f"nullif(o.{c}, '') AS {c}" if c in empty else f"o.{c}" for c in ADDED]
    return f"SELECT {', '.join(selected)} FROM accepted a JOIN out o ON a.ord = o.ord ORDER BY a.ord"


def check_split_table(con) -> None:
    """A StageError, before any training, when `out` leaves no image to train on or to test on."""
    counts = dict(con.execute("SELECT split, count(*) FROM out GROUP BY split").fetchall())
    for name, what in (("train", "to train on"), ("test", "to test on")):
        if not counts.get(name, 0):
            split_counts = ", ".join(f"{s} {int(counts.get(s, 0))}" for s in (*SPLITS, "unused"))
            reasons = con.execute("SELECT reason, count(*) FROM out WHERE split = 'unused' GROUP BY reason "
                                  "ORDER BY count(*) DESC, reason").fetchall()
            why = f" (unused: {', '.join(f'{r} {n}' for r, n in reasons)})" if reasons else ""
            raise StageError(f"no image is left {what}: of {sum(counts.values())} accepted images, {split_counts}{why}; "
                             f"see the split params (split.method, split.test_buckets) and the source's folders")


# --- the same on pandas frames (tests, notebooks) ----------------------------------------------

def _state_frame(con):
    return con.execute("SELECT * FROM state ORDER BY id").df().set_index("id")


def _load_frames(con, frame, previous) -> list[str]:
    columns = [str(c) for c in frame.columns]
    con.register("accepted_frame", frame.reset_index(drop=True).assign(ord=range(len(frame))))
    con.execute("CREATE OR REPLACE TEMP VIEW accepted AS SELECT * FROM accepted_frame")
    con.execute("CREATE OR REPLACE TABLE state (id VARCHAR, assigned VARCHAR, arrival BIGINT)")
    if previous is not None and len(previous):
        rows = previous.rename_axis("id").reset_index()[STATE_COLUMNS]
        con.register("previous_frame", rows)
        con.execute("INSERT INTO state SELECT id, assigned, CAST(arrival AS BIGINT) FROM previous_frame")
    return columns


def assign(frame, p: Split, previous=None):
    """`frame` (the accepted list) with ADDED, given the `previous` state by id (None: none), as the
    stage computes it (assign_tables)."""
    with tables.frames() as con:
        columns = _load_frames(con, frame, previous)
        assign_tables(con, p, columns)
        out = con.execute(split_table_query(columns)).df()
    out["arrival"] = out["arrival"].astype("Int64")
    out["bucket"] = out["bucket"].astype("int64")
    return out


def next_state(previous, out):
    """The previous state (a frame by id, or None) plus the images `out` assigned, by id."""
    with tables.frames() as con:
        _load_frames(con, out, previous)
        con.execute("CREATE OR REPLACE TABLE out AS SELECT * FROM accepted")
        return con.execute(NEXT_STATE).df().astype({"arrival": "int64"}).set_index("id")


def read_state(path: str | Path):
    """The definition a state was made with and its `assigned` and `arrival` by id (a frame); None
    when there is no state."""
    with tables.frames() as con:
        made_with = load_state(con, path)
        return None if made_with is None else (made_with, _state_frame(con))


def previous_assignment(path: str | Path, p: Split):
    """The state at `path` by id, if it was made with the split's current definition; else None."""
    with tables.frames() as con:
        return _state_frame(con) if previous_state(con, path, p) else None


def check_splits(out) -> None:
    """check_split_table on a split table frame."""
    with tables.frames() as con:
        con.register("out_frame", out)
        con.execute("CREATE OR REPLACE TABLE out AS SELECT * FROM out_frame")
        check_split_table(con)


def write_state(path: str | Path, state, p: Split) -> None:
    """Write a state frame (by id) to `path`, as the stage does."""
    with tables.frames() as con:
        con.register("state_frame", state.rename_axis("id").reset_index()[STATE_COLUMNS])
        write_state_table(con, path, p, "SELECT * FROM state_frame ORDER BY id")
