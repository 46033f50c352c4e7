"""What the end-to-end tests share: temporary git + DVC repositories, and reading a real server."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import yaml
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

# No telemetry from anything these tests start (DVC has its own switch).
QUIET_ENV = {
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}
GIT_AUTHOR = ["-c", "user.name=test", "-c", "user.email=test@example.com"]


def sh(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command; on failure, raise with its output (a bare exit code explains nothing)."""
    env = {**os.environ, **QUIET_ENV, **(env or {})}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({done.returncode}):\n"
                             f"{done.stdout}\n{done.stderr}")
    return done


def dvc(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "dvc", *args, cwd=cwd, env=env)


def commit(repo: Path, message: str = "change") -> None:
    sh("git", "add", "-A", cwd=repo)
    sh("git", *GIT_AUTHOR, "commit", "-qm", message, cwd=repo)


def git_dvc_repo(path: Path, stages: dict, params: dict, extra: dict | None = None) -> Path:
    """A committed git + DVC repository at `path`: dvc.yaml with `stages` (and `extra` top-level
    entries such as `vars`), params.yaml with `params`; the caller may have put files there."""
    path.mkdir(exist_ok=True)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc_yaml = {**(extra or {}), "stages": stages}
    (path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    sh("git", "init", "-q", cwd=path)
    dvc("init", "-q", cwd=path)
    commit(path, "init")
    return path


def eventually(check, timeout: float = 20):
    """Poll `check` until it returns something truthy, and return that (or the last falsy value).

    The server records task runs from events and receives logs in batches, so both arrive a
    moment after the flow run has finished.
    """
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.25)
    return value


def artifacts(client: SyncPrefectClient, flow_run_id: UUID) -> dict[str, list]:
    """The flow run's artifacts on the server by key, oldest first; table data decoded."""
    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    )
    by_key: dict[str, list] = {}
    for artifact in sorted(found, key=lambda a: a.created):
        if artifact.type == "table":
            artifact.data = json.loads(artifact.data)
        by_key.setdefault(artifact.key, []).append(artifact)
    return by_key
