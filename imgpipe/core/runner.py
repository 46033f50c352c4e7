"""The thin `main()` every stage shares: load params, run, turn known errors into one line.

A stage module declares `SECTIONS`, the params sections its `run` takes, in order: its own,
then `paths`/`base`/`runtime` or another stage's section where it really needs one (dvc.yaml
lists what it reads of those key by key). It never sees the whole config.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from types import ModuleType

import psutil

from imgpipe.core.errors import StageError
from imgpipe.core.params import PARAMS_FILE, Params, ParamsError, load_params


def run_stage(stage: ModuleType, params: Params) -> None:
    """Call `stage.run` with the sections it declares in `stage.SECTIONS`."""
    stage.run(*(getattr(params, section) for section in stage.SECTIONS))


def stage_main(stage: ModuleType, argv: list[str] | None = None) -> int:
    # `python -m stages.split` runs the module as __main__; its spec keeps the real name
    name = (stage.__spec__.name if stage.__spec__ else stage.__name__).rsplit(".", 1)[-1]
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}")
    parser.add_argument("--params", default=PARAMS_FILE, help=f"params file (default: {PARAMS_FILE})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"{name}: %(message)s")
    started, cpu = time.perf_counter(), time.process_time()
    try:
        run_stage(stage, load_params(args.params))
    except (ParamsError, StageError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
    # the stage's own work, then the whole process: start-up and imports too (seconds for Great
    # Expectations or TensorFlow), so that a caller's wall time less it is the caller's (DVC's) own;
    # then the CPU this process (its threads, not its workers) spent on the work: the part that
    # does not spread over a Dask cluster's machines
    process = time.time() - psutil.Process().create_time()
    logging.getLogger(name).info("done in %.2f s (process %.2f s); CPU of this process in it %.2f s",
                                 time.perf_counter() - started, process, time.process_time() - cpu)
    return 0
