"""The thin `main()` every stage shares: load params, run, turn known errors into one line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from stages.params import Params, ParamsError, load_params


class StageError(RuntimeError):
    """A problem with the user's data or setup, reported as one clear line (no traceback)."""


def stage_main(name: str, run: Callable[[Params], None], argv: list[str] | None = None) -> int:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"{name}: %(message)s")
    try:
        run(load_params(args.params))
    except (ParamsError, StageError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
    return 0
