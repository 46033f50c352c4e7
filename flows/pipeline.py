"""The Prefect flow that drives the DVC pipeline: one task run per DVC stage.

DVC stays the only description of the DAG and the only judge of what is stale: the flow reads the
stage graph through DVC's API and runs each stage with `dvc repro --single-item`, which skips an
up-to-date stage. Prefect adds what DVC lacks: retries, logs, run history, schedules and artifacts
(the data-quality summary after `validate`, the test metrics after `evaluate`: flows/artifacts.py).

With `version_data` (the nightly deployment's default) a run first versions new raw data with
`dvc add` and git, then (on raw data new since the last recorded run, train.warm_start on) the
last blessed model as the next training's starting point (flows/warm_start.py), and commits
dvc.lock after its stages (flows/versioning.py): each run is a commit. Every DVC command waits
while another process works in the repository (a `dvc repro` at a desk), up to
`lock_timeout_seconds` (flows/dvc_cli.py), rather than failing half-way.

    imgpipe flow run [--repo PATH] [--retries N] [--retry-delay SECONDS] [--version-data]
                     [--lock-timeout SECONDS]
"""

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.artifacts import PUBLISHERS
from flows.dag import stage_order
from flows.dvc_cli import RepositoryBusy, run_dvc_when_free
from flows.versioning import check_worktree, commit_run, version_raw_data
from flows.warm_start import refresh_warm_start

# How long each DVC command waits for another process working in the repository: a whole
# pipeline run at a desk takes about 15 minutes with the defaults.
LOCK_TIMEOUT_SECONDS = 3600.0


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message ends with the stage's last output lines."""


def _skip_lines(stage: str) -> set[str]:
    # The exact lines `dvc repro` prints when it finds a stage up to date and returns without
    # reproducing it (Stage.reproduce in dvc/stage/__init__.py; the second form is for `.dvc`
    # data sources). Every other successful outcome means DVC reproduced the stage: ran its
    # command, restored its outputs from the run cache, or re-hashed a changed data source.
    # This reports what `dvc repro` did; asking `dvc status` first would cost a second DVC start
    # per stage and only predict it (another code path, and files can change in between).
    return {f"Stage '{stage}' didn't change, skipping", f"'{stage}' didn't change, skipping"}


def _not_busy(task, task_run, state) -> bool:
    # A retry after waiting out lock_timeout_seconds would wait as long again: the bound the
    # user chose is the whole wait.
    return not isinstance(state.data, RepositoryBusy)


# No Prefect cache: DVC decides what is up to date, and a cached task would hide a needed re-run.
@task(cache_policy=NO_CACHE, retry_condition_fn=_not_busy)
def run_stage(repo: str, stage: str, lock_timeout: float = LOCK_TIMEOUT_SECONDS) -> dict:
    """Run one stage through DVC; report whether DVC ran or skipped it, and how long it took."""
    logger = get_run_logger()
    skip_lines = _skip_lines(stage)
    skipped = False

    def log(line: str) -> None:
        nonlocal skipped
        logger.info(line)
        skipped = skipped or line in skip_lines

    started = time.monotonic()
    returncode, tail = run_dvc_when_free(repo, ["repro", "--single-item", stage], log, lock_timeout)
    seconds = time.monotonic() - started
    if returncode != 0:
        output = "\n".join(tail)
        raise StageFailed(f"stage {stage!r} failed (exit code {returncode}):\n{output}")
    status = "skipped" if skipped else "ran"
    logger.info("stage %r %s in %.2f s", stage, status, seconds)
    return {"status": status, "seconds": seconds}


@flow(name="pipeline")
def pipeline(
    repo: str = ".",
    retries: int = 0,
    retry_delay_seconds: float = 10.0,
    version_data: bool = False,
    lock_timeout_seconds: float = LOCK_TIMEOUT_SECONDS,
) -> dict[str, dict]:
    """Run every DVC stage of the repository at `repo` in dependency order.

    A failed stage is retried up to `retries` times, after `retry_delay_seconds`, then twice that,
    and so on (a transient cause, such as a full disk or a busy remote, gets time to clear).
    Returns {stage: {"status": "ran" | "skipped", "seconds": float}} in the order the stages ran.
    A failing stage fails its task run and the flow run; no later stage starts.

    `version_data`: first refuse uncommitted work, `dvc add` the raw data and commit its `.dvc`
    files; when raw data changed since the last commit of dvc.lock (just now, or by hand), seed
    the warm start with the last blessed model and commit it (flows/warm_start.py); after the
    stages, commit dvc.lock and the outputs git keeps
    (flows/versioning.py).
    Each DVC command waits up to `lock_timeout_seconds` while another process works in the
    repository; then the run fails, naming that process, before the command starts.
    """
    repo = str(Path(repo).resolve())
    if version_data:
        check_worktree(repo)
        version = version_raw_data.with_options(
            retries=retries,
            retry_delay_seconds=exponential_backoff(retry_delay_seconds),
            retry_condition_fn=_not_busy,
        )
        version(repo, lock_timeout_seconds)
        # when raw data changed since the last recorded run (versioned just now or committed by
        # hand), the training starts from the last blessed model (flows/warm_start.py)
        refresh_warm_start(repo, lock_timeout_seconds)
    # read after versioning, so that the .dvc files it added (the warm start's) are stages too
    stages = stage_order(repo)
    get_run_logger().info("stages in order: %s", ", ".join(stages))
    results = {}
    # One stage at a time: `dvc repro` locks the repository, so two stages cannot run side by
    # side, and calling the task directly raises at the first failure, so no later stage starts.
    for stage in stages:
        stage_task = run_stage.with_options(
            name=stage,
            task_run_name=stage,
            retries=retries,
            retry_delay_seconds=exponential_backoff(retry_delay_seconds),
        )
        results[stage] = stage_task(repo, stage, lock_timeout_seconds)
        # A skipped stage's outputs are still the current ones: publish them on every run, so
        # that each run in the UI shows the data quality and metrics it stands on.
        publish = PUBLISHERS.get(stage)
        if publish:
            publish(repo)
    if version_data:
        commit_run(repo, results)
    return results
