"""split: every accepted image (`paths.accepted`) assigned to train, val or test once, and kept
there while the data grows or shrinks (the rules: imgpipe/data/splitting.py). Reads the split
state (`paths.split_state`, the previous assignment; absent on a first run) and writes the
split table (`paths.split`, imgpipe/data/manifest.py) and the new state. Fails, before anything
is trained, when no image would be left to train on or to test on.
"""

from __future__ import annotations

import logging
import sys

from imgpipe.core.atomic_write import write_csv
from imgpipe.core.errors import StageError
from imgpipe.core.params import Paths, Split
from imgpipe.core.runner import stage_main
from imgpipe.data.manifest import read_accepted
from imgpipe.data.splitting import assign, check_splits, next_state, previous_assignment, write_state

# the params sections `run` takes, in order (imgpipe/core/runner.py)
SECTIONS = ("split", "paths")
log = logging.getLogger(__name__)


def run(p: Split, paths: Paths) -> None:
    frame = read_accepted(paths.accepted)
    if frame.empty:
        raise StageError(f"{paths.accepted} lists no accepted images")
    previous = previous_assignment(paths.split_state, p)
    out = assign(frame, p, previous)
    check_splits(out)
    write_csv(paths.split, out)
    write_state(paths.split_state, next_state(previous, out), p)
    table = out.groupby(["split", "label"]).size().unstack(fill_value=0)
    log.info("images per split and class:\n%s", table.to_string())


def main(argv=None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
