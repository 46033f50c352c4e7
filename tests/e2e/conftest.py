"""One real Prefect server for the whole test session, shared by every end-to-end test module.

A server takes about 12 s to start on a 2-core machine; one per module would cost that each time.
"""

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.e2e.helpers import QUIET_ENV
from tests.e2e.prefect_server import prefect_server


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """The API URL of the session's Prefect server; flows run in this process report to it."""
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


@pytest.fixture(scope="session")
def client(prefect_api) -> SyncPrefectClient:
    with get_client(sync_client=True) as client:
        yield client
