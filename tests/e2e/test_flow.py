"""The Prefect flow against a real `prefect server start`, on real temporary git + DVC repositories.

Each repository has three shell stages on a real file (the MNIST test set's SHA256SUMS):
a counts its lines (with a label from params.yaml), b upper-cases a's output, c repeats b's output
`c.repeat` times. What each test checks is read back from the server: run states, task runs, logs.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest
import yaml
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import StateType, TaskRun
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.dag import stage_order
from flows.pipeline import pipeline
from tests.e2e.prefect_server import prefect_server

PROJECT = Path(__file__).resolve().parents[2]
INPUT = PROJECT.parent / "shared" / "datasets" / "mnist-t10k" / "SHA256SUMS"
INPUT_LINES = len(INPUT.read_text().splitlines())

# Declared downstream first: the flow must order stages by the graph, not by the file.
STAGES = {
    "c": {
        "cmd": 'echo "c repeats ${c.repeat} times"; '
        "for i in $(seq ${c.repeat}); do cat b.txt; done > c.txt",
        "deps": ["b.txt"],
        "params": ["c.repeat"],
        "outs": ["c.txt"],
    },
    "b": {"cmd": "tr a-z A-Z < a.txt > b.txt", "deps": ["a.txt"], "outs": ["b.txt"]},
    "a": {
        "cmd": 'echo "${a.label}: $(wc -l < input.txt)" > a.txt',
        "deps": ["input.txt"],
        "params": ["a.label"],
        "outs": ["a.txt"],
    },
}
PARAMS = {"a": {"label": "lines"}, "c": {"repeat": 2}}
FAILING_CMD = """python -c "raise SystemExit('boom: bad input')\""""

# No telemetry from anything these tests start (DVC has its own switch).
QUIET_ENV = {"DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false"}


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """The API URL of a Prefect server shared by this module's tests; flows here report to it."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in QUIET_ENV.items():
            env.setenv(name, value)
        with prefect_server(tmp_path_factory.mktemp("prefect")) as url:
            # Prefect reads its settings at import: a PREFECT_API_URL set in the environment now
            # would not reach the flows run in this process.
            with temporary_settings(updates={PREFECT_API_URL: url}):
                yield url
                # Send the events and logs still queued here before the server goes away, or
                # Prefect tries at exit and prints connection errors (prefect_test_harness
                # drains the same two workers).
                APILogWorker.drain_all(timeout=10)
                EventsWorker.drain_all(timeout=10)


@pytest.fixture(scope="module")
def client(prefect_api) -> SyncPrefectClient:
    with get_client(sync_client=True) as client:
        yield client


def sh(*args: str, cwd: Path) -> None:
    subprocess.run(args, cwd=cwd, check=True, capture_output=True, env={**os.environ, **QUIET_ENV})


def make_repo(path: Path, stages: dict = STAGES) -> Path:
    """A committed git + DVC repository at `path` with the given dvc.yaml stages."""
    path.mkdir()
    shutil.copy(INPUT, path / "input.txt")
    (path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    sh("git", "init", "-q", cwd=path)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=path)
    sh("git", "add", "-A", cwd=path)
    author = ["-c", "user.name=test", "-c", "user.email=test@example.com"]
    sh("git", *author, "commit", "-qm", "init", cwd=path)
    return path


def with_stage(name: str, **changes) -> dict:
    return {**STAGES, name: {**STAGES[name], **changes}}


def eventually(check, timeout: float = 20):
    """Poll `check` until it returns something truthy, and return that (or the last falsy value).

    The server records task runs from events and receives logs in batches, so both arrive a
    moment after the flow run has finished.
    """
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.25)
    return value


def task_runs(client: SyncPrefectClient, flow_run_id: UUID) -> dict[str, TaskRun]:
    flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    return {run.name: run for run in client.read_task_runs(flow_run_filter=flow_run)}


def task_run_states(client, flow_run_id, expected: dict[str, StateType]) -> dict[str, StateType]:
    """The flow run's task run states by name, once the server shows `expected` (or time is up)."""

    def read() -> dict[str, StateType]:
        return {name: run.state_type for name, run in task_runs(client, flow_run_id).items()}

    eventually(lambda: read() == expected)
    return read()


def logs_containing(client: SyncPrefectClient, flow_run_id: UUID, *texts: str) -> str:
    """The flow run's logs on the server, once they contain every one of `texts`."""

    def read() -> str:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        return "\n".join(log.message for log in logs)

    eventually(lambda: all(text in read() for text in texts))
    return read()


def run_flow(repo: Path, **params):
    """Run the flow in this process; return its final state and the flow run's id."""
    state = pipeline(repo=str(repo), return_state=True, **params)
    return state, state.state_details.flow_run_id


def statuses(results: dict) -> dict[str, str]:
    return {stage: result["status"] for stage, result in results.items()}


def test_runs_stale_stages_and_skips_the_rest(prefect_api, client, tmp_path):
    repo = make_repo(tmp_path / "repo")

    state, flow_run_id = run_flow(repo)
    results = state.result()
    assert list(results) == ["a", "b", "c"]
    assert statuses(results) == {"a": "ran", "b": "ran", "c": "ran"}
    assert all(result["seconds"] > 0 for result in results.values())
    assert (repo / "a.txt").read_text() == f"lines: {INPUT_LINES}\n"
    assert (repo / "c.txt").read_text() == f"LINES: {INPUT_LINES}\n" * 2
    assert client.read_flow_run(flow_run_id).state_type == StateType.COMPLETED
    completed = dict.fromkeys(["a", "b", "c"], StateType.COMPLETED)
    assert task_run_states(client, flow_run_id, completed) == completed
    # the stage's own stdout, streamed into the run's logs on the server
    assert "c repeats 2 times" in logs_containing(client, flow_run_id, "c repeats 2 times")

    state, _ = run_flow(repo)
    assert statuses(state.result()) == {"a": "skipped", "b": "skipped", "c": "skipped"}

    (repo / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "c": {"repeat": 3}}))
    state, _ = run_flow(repo)
    assert statuses(state.result()) == {"a": "skipped", "b": "skipped", "c": "ran"}
    assert (repo / "c.txt").read_text() == f"LINES: {INPUT_LINES}\n" * 3


def test_failing_stage_fails_the_run_and_stops_downstream(prefect_api, client, tmp_path):
    repo = make_repo(tmp_path / "repo", with_stage("b", cmd=FAILING_CMD))

    state, flow_run_id = run_flow(repo)

    assert state.is_failed()
    flow_run = client.read_flow_run(flow_run_id)
    assert flow_run.state_type == StateType.FAILED
    assert "boom: bad input" in flow_run.state.message
    # c, downstream of b, never started: no task run, no output
    expected = {"a": StateType.COMPLETED, "b": StateType.FAILED}
    assert task_run_states(client, flow_run_id, expected) == expected
    assert not (repo / "c.txt").exists()
    assert "boom: bad input" in logs_containing(client, flow_run_id, "boom: bad input")


def test_retries_rerun_a_failed_stage(prefect_api, client, tmp_path):
    # b fails on its first try only: the marker lives outside the repository, so DVC ignores it
    marker = tmp_path / "b-tried"
    flaky = f"test -e {marker} || {{ touch {marker}; echo 'flaky: first try' >&2; exit 1; }}; "
    repo = make_repo(tmp_path / "repo", with_stage("b", cmd=flaky + STAGES["b"]["cmd"]))

    state, flow_run_id = run_flow(repo, retries=1, retry_delay_seconds=0)

    assert statuses(state.result()) == {"a": "ran", "b": "ran", "c": "ran"}
    completed = dict.fromkeys(["a", "b", "c"], StateType.COMPLETED)
    assert task_run_states(client, flow_run_id, completed) == completed
    assert task_runs(client, flow_run_id)["b"].run_count == 2
    assert "flaky: first try" in logs_containing(client, flow_run_id, "flaky: first try")


def test_command_line_prints_the_summary_or_the_error(prefect_api, tmp_path):
    env = {**os.environ, **QUIET_ENV, "PREFECT_API_URL": prefect_api}

    def cli(repo: Path) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "flows.pipeline", "--repo", str(repo)]
        return subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True)

    done = cli(make_repo(tmp_path / "good"))
    assert done.returncode == 0, done.stderr
    summary = [line.split() for line in done.stdout.splitlines()]
    assert [row[:2] for row in summary] == [["a", "ran"], ["b", "ran"], ["c", "ran"]]
    assert all(float(seconds) > 0 and unit == "s" for *_, seconds, unit in summary)

    failed = cli(make_repo(tmp_path / "bad", with_stage("b", cmd=FAILING_CMD)))
    assert failed.returncode == 1
    assert failed.stdout == ""
    assert "pipeline failed: stage 'b' failed" in failed.stderr
    assert "boom: bad input" in failed.stderr.split("pipeline failed:")[-1]


def test_stage_order_names_stages_as_dvc_repro_takes_them(tmp_path):
    repo = make_repo(tmp_path / "repo")
    # a nested dvc.yaml downstream of c, and a `dvc add`-ed data source, as in the real project
    (repo / "report").mkdir()
    summary = {"cmd": "wc -l < ../c.txt > n.txt", "deps": ["../c.txt"], "outs": ["n.txt"]}
    nested = {"stages": {"summary": summary}}
    (repo / "report" / "dvc.yaml").write_text(yaml.safe_dump(nested))
    (repo / "extra.txt").write_text("more\n")
    sh(sys.executable, "-m", "dvc", "add", "-q", "extra.txt", cwd=repo)

    assert stage_order(repo) == ["extra.txt.dvc", "a", "b", "c", "report/dvc.yaml:summary"]
