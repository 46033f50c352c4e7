"""Running the `dvc` command line from a Prefect task: its environment, its output in the logs.

The flows drive DVC through its command line, as a user would, so that what a flow does is what
`dvc repro` / `dvc exp run` do at a desk, with nothing re-implemented.
"""

import collections
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

# How many of a command's last output lines are kept for its error message.
ERROR_TAIL_LINES = 20


def dvc_env() -> dict[str, str]:
    """This process's environment, fixed up for DVC and the stage commands it starts."""
    env = dict(os.environ)
    # dvc.yaml's `python -m stages.x` must find this environment's python, as `dvc` itself does.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Stage output reaches the logs line by line, not whenever the child's buffer fills up.
    env["PYTHONUNBUFFERED"] = "1"
    # The project's no-telemetry defaults (the Makefile exports the same) for runs started
    # outside make, e.g. by a Prefect worker. DVC ignores DO_NOT_TRACK and needs its own.
    telemetry_off = {"DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false"}
    for name, value in telemetry_off.items():
        env.setdefault(name, value)
    return env


def run_dvc(repo: str, args: list[str], on_line: Callable[[str], None]) -> tuple[int, list[str]]:
    """Run `dvc <args>` in `repo`, handing each non-empty output line to `on_line` as it comes.

    Returns the exit code and the last ERROR_TAIL_LINES lines (for an error message).
    stderr is merged into stdout so that the lines keep the order in which they were printed.
    """
    tail: collections.deque[str] = collections.deque(maxlen=ERROR_TAIL_LINES)
    with subprocess.Popen(
        [sys.executable, "-m", "dvc", *args],
        cwd=repo,
        env=dvc_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as proc:
        for raw in proc.stdout:
            line = raw.rstrip()
            if line:
                on_line(line)
                tail.append(line)
    return proc.returncode, list(tail)
