"""Running the `dvc` command line from a Prefect task: its environment, its output in the logs,
and waiting while another DVC process works in the repository.

The flows drive DVC through its command line, as a user would, so that what a flow does is what
`dvc repro` / `dvc exp run` do at a desk, with nothing re-implemented.

DVC guards a repository with two locks, both under `.dvc/tmp/`: `lock`, held by a command except
while a stage's own command runs, and `rwlock`, which names the process reading or writing each
stage's deps and outs while its command runs. A second DVC command that meets either one fails
after 3 s ("Unable to acquire lock", "'<path>' is busy"). So `run_dvc(..., lock_timeout=S)` first
waits, up to S seconds, until no other process holds either lock, and runs the command again if
another process took the lock in between.
"""

import collections
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import zc.lockfile

# How many of a command's last output lines are kept for its error message.
ERROR_TAIL_LINES = 20
# How often a waiting command looks at DVC's locks again, and says it is still waiting.
LOCK_POLL_SECONDS = 1.0
LOCK_REPORT_SECONDS = 60.0
# How DVC words its refusals (dvc/lock.py, dvc/rwlock.py), up to where its messages carry
# colour codes: "ERROR: Unable to acquire lock. ...", "ERROR: ... '<path>' is busy, it is being
# blocked by:".
_LOCK_REFUSALS = ("Unable to acquire lock.", "is busy, it is being blocked by:")


class RepositoryBusy(RuntimeError):
    """Another process kept working in the DVC repository for longer than the run would wait."""


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


def dvc_holders(repo: str) -> list[str]:
    """The other processes at work in the DVC repository at `repo` right now, each as
    `PID n (command line)`; [] when DVC is free.

    Read from DVC's own locks, so a `dvc repro` started at a desk counts as well as a flow's.
    """
    tmp = Path(repo) / ".dvc" / "tmp"
    holders: dict[int, str] = {}
    pid = _repo_lock_pid(tmp / "lock")
    if pid is not None:
        holders[pid] = _command_line(pid) if pid > 0 else "a DVC process taking the repository lock"
    entries = _rwlock_entries(tmp / "rwlock")
    if entries is None:
        holders[-1] = "a DVC process rewriting .dvc/tmp/rwlock"
    for info in entries or []:
        pid = info.get("pid")
        # a dead process's entry is stale: DVC itself removes it on its next edit
        if isinstance(pid, int) and pid > 0 and pid != os.getpid() and psutil.pid_exists(pid):
            holders.setdefault(pid, str(info.get("cmd", "?")))
    return [f"PID {pid} ({command})" if pid > 0 else command for pid, command in sorted(holders.items())]


def _repo_lock_pid(path: Path) -> int | None:
    """The process holding DVC's repository lock (zc.lockfile: an flock on the file, which holds
    the pid of the last process that took it), or None when it is free."""
    if not path.exists():
        return None
    try:
        # taking it for an instant: DVC retries for 3 s before it gives up on a held lock
        zc.lockfile.SimpleLockFile(str(path)).close()
        return None
    except zc.lockfile.LockError:
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return -1  # held, by a process that has not written its pid yet


def _rwlock_entries(path: Path) -> list[dict] | None:
    """Who DVC's rwlock file names as reading or writing a path; None when it cannot be read
    (DVC is rewriting it at this very moment: someone is at work)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, json.JSONDecodeError):
        return None
    readers = [info for infos in data.get("read", {}).values() for info in infos]
    return [*data.get("write", {}).values(), *readers]


def _command_line(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline()) or "?"
    except (psutil.Error, ValueError):
        return "?"


def _lost_the_lock(returncode: int, tail: list[str]) -> bool:
    """Whether DVC refused to start because another process held one of its locks: DVC takes
    them before it changes anything, so the same command can simply run again."""
    return returncode != 0 and any(
        line.startswith("ERROR:") and any(refusal in line for refusal in _LOCK_REFUSALS)
        for line in tail
    )


def wait_until_free(repo: str, deadline: float, what: str, on_wait: Callable[[str], None]) -> None:
    """Return once no other process works in the repository; raise RepositoryBusy at `deadline`
    (a time.monotonic() value). `what` names the command that waits, for the messages."""
    holders = dvc_holders(repo)
    if not holders:
        return
    started = last_report = time.monotonic()
    on_wait(
        f"DVC is busy in {repo}: {', '.join(holders)}. Waiting for it to finish before {what} "
        f"(up to {max(deadline - started, 0):.0f} s)"
    )
    while holders:
        now = time.monotonic()
        if now >= deadline:
            raise RepositoryBusy(
                f"DVC was still busy in {repo} after {now - started:.0f} s of waiting: "
                f"{', '.join(holders)}; {what} was not run."
            )
        time.sleep(min(LOCK_POLL_SECONDS, deadline - now))
        holders = dvc_holders(repo)
        if holders and time.monotonic() - last_report >= LOCK_REPORT_SECONDS:
            last_report = time.monotonic()
            on_wait(f"still waiting for {', '.join(holders)} ({last_report - started:.0f} s so far)")
    on_wait(f"DVC is free after {time.monotonic() - started:.1f} s of waiting: running {what}")


def run_dvc_when_free(
    repo: str, args: list[str], on_line: Callable[[str], None], lock_timeout: float
) -> tuple[int, list[str]]:
    """`run_dvc`, after waiting (at most `lock_timeout` seconds in all) until no other process
    works in the repository; run again when another process took DVC's lock first.

    Messages about waiting go to `on_line` too. Raises RepositoryBusy when the time is up.
    """
    deadline = time.monotonic() + lock_timeout
    what = f"`dvc {' '.join(args)}`"
    while True:
        wait_until_free(repo, deadline, what, on_line)
        returncode, tail = run_dvc(repo, args, on_line)
        if not _lost_the_lock(returncode, tail):
            return returncode, tail
        on_line(f"another process took DVC's lock before {what} did: waiting for it")
        # with core.hardlink_lock the lock is no flock and dvc_holders() cannot see it: pause
        # before each new try rather than spin
        if time.monotonic() + LOCK_POLL_SECONDS >= deadline:
            raise RepositoryBusy(
                f"DVC's lock in {repo} stayed taken for {lock_timeout:.0f} s: {what} never ran. "
                + "\n".join(tail)
            )
        time.sleep(LOCK_POLL_SECONDS)
