"""The nightly deployment (`imgpipe flow deploy`) against a real Prefect server.

The deploy command runs as a user would start it, in its own process: it registers the
deployment with its schedule, the server's scheduler creates the upcoming runs, and the same
process executes a run started from the server.
"""

import contextlib
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import ConcurrencyLimitStrategy, StateType
from prefect.exceptions import ObjectNotFound

from tests.e2e.helpers import QUIET_ENV, eventually, git_dvc_repo, sh

# starts a server or a cluster, or runs the pipeline: `make test-fast` leaves it out
pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]
DEPLOYMENT = "pipeline/nightly"


def make_repo(path: Path) -> Path:
    """One stage that writes `hello <greeting.name>`."""
    stage = {
        "cmd": "echo hello ${greeting.name} > hello.txt",
        "params": ["greeting.name"],
        "outs": ["hello.txt"],
    }
    return git_dvc_repo(path, {"hello": stage}, {"greeting": {"name": "night"}})


@contextlib.contextmanager
def serve_deployment(prefect_api: str, repo: Path, log_path: Path, *args: str, env: dict | None = None):
    """`imgpipe flow deploy --repo REPO ARGS...` in its own process; yields it; stops it."""
    env = {
        **os.environ,
        **QUIET_ENV,
        "PREFECT_API_URL": prefect_api,
        # the runner asks the server for runs to execute every 10 s by default
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        **(env or {}),
    }
    log = open(log_path, "w+")
    # A shell starts a background job (`make test &`, nohup) with SIGINT ignored, and a child
    # inherits an ignored signal: the served process would then ignore Ctrl-C for good. Start
    # it as from a terminal, whatever started the tests: a handled signal is reset on exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(
            [Path(sys.executable).with_name("imgpipe"), "flow", "deploy", "--repo", str(repo), *args],
            cwd=PROJECT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.seek(0)
        print(log.read())  # shown by pytest when the test failed
        log.close()


@pytest.fixture
def serving(prefect_api, tmp_path):
    """`imgpipe flow deploy` serving a fresh repository; yields (repo, process); stops it."""
    repo = make_repo(tmp_path / "repo")
    with serve_deployment(prefect_api, repo, tmp_path / "serve.log") as process:
        yield repo, process


def read_deployment(client):
    try:
        return client.read_deployment_by_name(DEPLOYMENT)
    except ObjectNotFound:
        return None


def scheduled_runs(client, deployment_id):
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
        ),
    )


def test_nightly_deployment_is_scheduled_and_serves_its_runs(client, serving):
    repo, process = serving

    deployment = eventually(lambda: read_deployment(client), timeout=60)
    assert deployment, "the deployment was never registered"
    assert deployment.parameters == {
        "repo": str(repo),
        "retries": 2,
        "retry_delay_seconds": 60.0,
        "version_data": True,
        "lock_timeout_seconds": 3600.0,
    }
    # one run at a time; a late one waits its turn
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    (schedule,) = deployment.schedules
    assert schedule.active
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "UTC")

    # the server's scheduler has created the next nights' runs: 02:00 UTC on consecutive days
    runs = eventually(lambda: scheduled_runs(client, deployment.id))
    starts = sorted(run.expected_start_time.astimezone(timezone.utc) for run in runs)
    assert len(starts) >= 3
    assert all((start.hour, start.minute, start.second) == (2, 0, 0) for start in starts)
    gaps = {(later - earlier).total_seconds() for earlier, later in zip(starts, starts[1:])}
    assert gaps == {timedelta(days=1).total_seconds()}
    assert starts[0] > datetime.now(timezone.utc)
    assert starts[0] - datetime.now(timezone.utc) <= timedelta(days=1)

    # a run started now (as from the UI) is picked up and run by the serving process
    run = client.create_flow_run_from_deployment(deployment.id)
    finished = eventually(
        lambda: (r := client.read_flow_run(run.id)).state.is_final() and r, timeout=90
    )
    assert finished, f"the run never finished: {client.read_flow_run(run.id).state}"
    assert finished.state_type == StateType.COMPLETED
    assert finished.parameters["repo"] == str(repo)
    assert (repo / "hello.txt").read_text() == "hello night\n"
    # and committed what it wrote that git keeps: the work tree is clean
    assert sh("git", "status", "--porcelain", cwd=repo).stdout == ""
    assert "hello" in yaml.safe_load(sh("git", "show", "HEAD:dvc.lock", cwd=repo).stdout)["stages"]

    # stopping the process pauses the schedule: no runs pile up for a server nobody serves
    process.send_signal(signal.SIGINT)
    process.wait(timeout=30)
    assert client.read_deployment(deployment.id).paused


def test_sigterm_pauses_the_schedule_too(client, serving):
    """A service manager (systemd, docker stop) stops the process with SIGTERM, not Ctrl-C."""
    _, process = serving
    # registered and active (the server may still hold it paused by an earlier test's process)
    deployment = eventually(lambda: (d := read_deployment(client)) and not d.paused and d, timeout=60)
    assert deployment, "the deployment was never registered as active"
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    assert client.read_deployment(deployment.id).paused
