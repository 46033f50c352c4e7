"""The scheduled deployment of the pipeline flow: nightly by default, served by this process.

    imgpipe flow deploy [--repo PATH] [--name nightly] [--cron "0 2 * * *"] [--timezone UTC]
                        [--retries 2] [--retry-delay 60] [--version-data/--no-version-data]
                        [--lock-timeout 3600]

registers the deployment `pipeline/<name>` with the Prefect server that PREFECT_API_URL names,
with its schedule and parameters, then runs its flow runs (scheduled, or started from the UI or
with `prefect deployment run pipeline/<name>`) until stopped. Stopping it (Ctrl-C, or SIGTERM
as a service manager sends) pauses the schedule, so that no runs pile up for a server that
nobody serves.

A nightly run versions the new raw data and commits its results (version_data, on by default).
One run at a time: a run due while another is going waits for it in the server's queue
(concurrency limit 1, collision strategy ENQUEUE; the state is "AwaitingConcurrencySlot"), since
two runs in one repository would meet on DVC's lock, and the late run finds only what changed
since to do. A `dvc repro` at a desk is outside Prefect: the run waits for it (flows/dvc_cli.py).

`flow.serve` needs no work pool and no worker: the flow's code is on this machine already.
"""

import logging
import signal
import sys
from pathlib import Path

from prefect import get_client
from prefect.client.schemas.objects import (
    ConcurrencyLimitConfig,
    ConcurrencyLimitStrategy,
)
from prefect.schedules import Cron, Schedule

from flows.pipeline import LOCK_TIMEOUT_SECONDS, pipeline

NAME = "nightly"
# 02:00 UTC: after a working day's new images have landed, before the next one starts.
CRON = "0 2 * * *"
TIMEZONE = "UTC"
# A nightly run has nobody watching it: retry a failed stage twice, after 1 then 2 minutes.
RETRIES = 2
RETRY_DELAY_SECONDS = 60.0
# The nightly run picks up new raw images by itself: `dvc add`, then a commit per run.
VERSION_DATA = True
# One run of the deployment at a time; a late one waits its turn rather than being dropped.
CONCURRENCY = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
log = logging.getLogger(__name__)


def schedule(cron: str = CRON, timezone: str = TIMEZONE) -> Schedule:
    return Cron(cron, timezone=timezone)


def parameters(
    repo: str,
    retries: int = RETRIES,
    retry_delay: float = RETRY_DELAY_SECONDS,
    version_data: bool = VERSION_DATA,
    lock_timeout: float = LOCK_TIMEOUT_SECONDS,
) -> dict:
    """The deployment's flow parameters; the repository as an absolute path, because a flow run
    does not run in the directory `imgpipe flow deploy` was started from."""
    return {
        "repo": str(Path(repo).resolve()),
        "retries": retries,
        "retry_delay_seconds": retry_delay,
        "version_data": version_data,
        "lock_timeout_seconds": lock_timeout,
    }


def serve(
    repo: str,
    name: str = NAME,
    cron: str = CRON,
    timezone: str = TIMEZONE,
    retries: int = RETRIES,
    retry_delay: float = RETRY_DELAY_SECONDS,
    version_data: bool = VERSION_DATA,
    lock_timeout: float = LOCK_TIMEOUT_SECONDS,
) -> None:
    """Register the deployment `pipeline/<name>` and run its flow runs until stopped; then pause
    its schedule."""
    # SIGTERM before Prefect's runner has set its own handler would end the process on the spot;
    # as an exception it goes through the `finally` below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        pipeline.serve(
            name=name,
            schedule=schedule(cron, timezone),
            parameters=parameters(repo, retries, retry_delay, version_data, lock_timeout),
            # the server's limit, across every process serving this deployment
            global_limit=CONCURRENCY,
        )
    finally:
        # Prefect pauses the schedule on Ctrl-C only; its SIGTERM handler exits without it
        pause(f"{pipeline.name}/{name}")


def pause(deployment: str) -> None:
    """Pause the deployment's schedule (again, if Prefect did): nobody serves its runs any more."""
    try:
        with get_client(sync_client=True) as client:
            client.pause_deployment(client.read_deployment_by_name(deployment).id)
    except Exception as exc:  # on the way out: say why, do not hide the error that ended serving
        log.warning("could not pause the schedule of %s: %s", deployment, exc)
