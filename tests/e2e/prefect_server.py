"""A real `prefect server start` for tests: its own home and database, bound to 127.0.0.1 only."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

HOST = "127.0.0.1"
# A fresh server migrates its SQLite database first: about 12 s on a 2-core machine.
START_TIMEOUT_SECONDS = 90


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """Start a Prefect server with PREFECT_HOME=`home`; yield its API URL; always stop it."""
    port = _free_port()
    api_url = f"http://{HOST}:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # the tests need the API only
        "PREFECT_SERVER_UI_ENABLED": "false",
        # The scheduler creates a deployment's scheduled runs every 60 s by default; a test
        # that waits for them should not wait a minute.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
        # A run waiting for the deployment's concurrency slot is offered it again after 30 s by
        # default; the overlap test should not wait that long.
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
    }
    log_path = home / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start"]
            + [f"--host={HOST}", f"--port={port}"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            # its own process group, so that stopping it also stops anything it started
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not _healthy(api_url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Prefect server did not start:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield api_url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
