"""split: every accepted image (`paths.accepted`) assigned to train, val or test once, and kept
there while the data grows or shrinks (the rules: imgpipe/data/splitting.py). Reads the split
state (`paths.split_state`, the previous assignment; absent on a first run) and writes the
split table (`paths.split`, imgpipe/data/manifest.py) and the new state. Fails, before anything
is trained, when no image would be left to train on or to test on. The tables are read and
written through DuckDB (imgpipe/data/tables.py): flat memory, whatever the number of images.
"""

from __future__ import annotations

import logging
import sys

from imgpipe.core.errors import StageError
from imgpipe.core.params import Paths, Split
from imgpipe.core.runner import stage_main
from imgpipe.data import tables
from imgpipe.data.splitting import (SPLITS, assign_tables, check_split_table, previous_state, split_table_query,
                                    write_state_table)

# the params sections `run` takes, in order (imgpipe/core/runner.py)
SECTIONS = ("split", "paths")
log = logging.getLogger(__name__)


def run(p: Split, paths: Paths) -> None:
    with tables.connect() as con:
        columns = tables.read(con, paths.accepted, "accepted list", "validate", "accepted_text", typed=False)
        # ord: each row's place in the file (a table's rowid: DuckDB keeps the insertion order), so
        # that the split table keeps the accepted list's order
        tables.guarded(lambda: con.execute("CREATE TABLE accepted_rows AS SELECT * FROM accepted_text"),
                       f"{paths.accepted}: not a readable accepted list")
        con.execute("CREATE TEMP VIEW accepted AS SELECT *, rowid AS ord FROM accepted_rows")
        if not con.execute("SELECT count(*) FROM accepted").fetchone()[0]:
            raise StageError(f"{paths.accepted} lists no accepted images")
        previous_state(con, paths.split_state, p)
        tables.guarded(lambda: assign_tables(con, p, columns), f"{paths.accepted}: not a readable accepted list")
        check_split_table(con)
        tables.write_csv(con, split_table_query(columns, for_file=True), paths.split)
        write_state_table(con, paths.split_state, p)
        counts = con.execute("SELECT split, label, count(*) FROM out GROUP BY ALL ORDER BY split, label").fetchall()
    labels = sorted({label for _, label, _ in counts})
    table = {s: dict.fromkeys(labels, 0) for s in sorted({s for s, _, _ in counts})}
    for split, label, n in counts:
        table[split][label] = n
    width = max(len(s) for s in [*SPLITS, "unused", "split"])
    lines = [" ".join([f"{'split':{width}}", *(f"{label:>8}" for label in labels)])]
    lines += [" ".join([f"{s:{width}}", *(f"{row[label]:>8}" for label in labels)]) for s, row in table.items()]
    log.info("images per split and class:\n%s", "\n".join(lines))


def main(argv=None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
