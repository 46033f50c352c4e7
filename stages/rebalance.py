"""rebalance: how often each training image of the split table (`paths.split`) is used per epoch
(the methods: imgpipe/data/rebalancing.py).

Output folder `paths.rebalance`: `copies.csv` (id, label, copies) read by `train`, and
`plan.json` (method, counts before and after, class weights) for people and `dvc diff`.
Only metadata is read: no pixels, and shards are not rewritten. The table is read and written
through DuckDB (imgpipe/data/tables.py): flat memory, whatever the number of rows.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from imgpipe.core.atomic_write import atomic_dir, write_json
from imgpipe.core.errors import StageError
from imgpipe.core.params import Paths, Rebalance
from imgpipe.core.runner import stage_main
from imgpipe.data import tables
from imgpipe.data.rebalancing import class_weights, copies_query

# the params sections `run` takes, in order (imgpipe/core/runner.py)
SECTIONS = ("rebalance", "paths")
log = logging.getLogger(__name__)


def run(p: Rebalance, paths: Paths) -> None:
    method = p.method
    query = copies_query(method)
    with tables.connect() as con:
        tables.read(con, paths.split, "split table", "split", "split")

        def plan(out: Path) -> tuple[dict, dict]:
            before = dict(con.execute("SELECT label, count(*) FROM split WHERE split = 'train' "
                                      "GROUP BY label ORDER BY label").fetchall())
            if not before:
                raise StageError(f"{paths.split} has no training images")
            tables.write_csv(con, query, out / 'copies.csv')
            after = dict(con.execute(f"SELECT label, sum(copies) FROM ({query}) GROUP BY label ORDER BY label").fetchall())
            return before, after

        with atomic_dir(paths.rebalance) as out:
            before, after = tables.guarded(lambda: plan(Path(out)), f"{paths.split}: not a readable split table")
            write_json(Path(out) / "plan.json", {
                "method": method,
                "counts_before": {k: int(v) for k, v in before.items()},
                "counts_after": {k: int(v) for k, v in after.items()},
                "class_weight": class_weights(before) if method == "class_weight" else None,
            })
    log.info("%s: %d training images per epoch (was %d)", method, sum(after.values()), sum(before.values()))


def main(argv=None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
