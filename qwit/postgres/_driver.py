"""How a flow runs on PostgreSQL: the saga interpreter, replayed from the
flow's journal, on a loop of its own.

A driver holds one run of one flow (root or sub-flow) on a worker. It runs
the shared ``Interpreter`` on a ``FlowLoop`` and feeds it, one at a time, the
rows of the run's inbox (``qwit.events``): a step's result, a timer, an
operator's decision, a cancel, a sub-flow's report. Before it hands a row
over it numbers it (``delivered``) and commits; after the interpreter has
run as far as it can, it writes what the interpreter asked for (step jobs,
sub-flows, timers, words to other flows) as ``qwit.commands``, each once,
with its job or event in the same transaction, and the flow's ``state()``.

A driver that dies (its worker killed, PostgreSQL restarted) is run again by
another worker: it replays the numbered rows in their order (the interpreter
is deterministic: same rows, same decisions, same commands; commands already
written are not written again), and goes on from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import psycopg
from psycopg.rows import dict_row

from .._errors import (
    ArgumentsError,
    ErrorInfo,
    FailureInfo,
    ReactionError,
    StepFailure,
    error_info,
)
from .._metrics import Metrics
from .._plan import FlowInput, FlowNode, StepCall, StepNode, StepReturn, child_flow_id
from .._runtime import Decision, FlowFailure, FlowRuntime, SubflowRun, SubflowStartCancelled
from .._saga import Interpreter
from .._tracing import continued, current_context
from ._loop import FlowLoop
from ._store import CHANNEL

logger = logging.getLogger("qwit.postgres")

Conn = psycopg.AsyncConnection[Any]
Action = Callable[[Conn], Awaitable[None]]
#: A step's end handed to its driver: (key, payload, job id).
Handed = tuple[str, dict[str, Any], int]

#: Insert a step job taken by worker ``%(worker)s`` at once (``doing``: no
#: other worker fetches it; if that worker dies, procrastinate's stalled-job
#: sweep puts it back in the queue), keep its id with its command and count
#: its first attempt, in one statement.
TAKE_STEP_JOB = """
WITH job AS (
    INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, worker_id)
    VALUES (%(queue)s, %(task)s, %(args)s, 'doing', %(worker)s) RETURNING id
), kept AS (
    UPDATE qwit.commands SET job_id = (SELECT id FROM job), inline = NULL
    WHERE run_id = %(run_id)s AND key = %(key)s
)
INSERT INTO qwit.attempts (run_id, key, attempt) VALUES (%(run_id)s, %(key)s, 1)
ON CONFLICT (run_id, key) DO UPDATE SET attempt = qwit.attempts.attempt + 1
RETURNING attempt, (SELECT id FROM job)
"""

#: Finish a step job that worker ``%(worker)s`` took (procrastinate's finish
#: of a succeeded job: it is deleted) and record the step's end in its run's
#: inbox, in one statement: the record and the job's end are one, and a job
#: the worker no longer holds (taken for dead, its job swept back into the
#: queue) records nothing: whoever runs it now will.
FINISH_STEP_JOB = """
WITH finished AS (
    DELETE FROM procrastinate_jobs
    WHERE id = %(job)s AND status = 'doing' AND worker_id = %(worker)s RETURNING id
)
INSERT INTO qwit.events (run_id, key, kind, payload{columns})
SELECT %(run_id)s, %(key)s, 'step', %(payload)s{values} FROM finished{joined}
ON CONFLICT (run_id, key) DO NOTHING
RETURNING key, kind, payload, delivered_at
"""

#: Joined to ``FINISH_STEP_JOB`` by a driver: whether a row of the run's
#: inbox, due and not delivered, is waiting (``older.waits``), asked once: it
#: came before the step's end the statement puts there.
_OLDER_ROW = (
    ", (SELECT EXISTS (SELECT 1 FROM qwit.events WHERE run_id = %(run_id)s "
    "AND delivered IS NULL AND (due_at IS NULL OR due_at <= clock_timestamp())) AS waits) older"
)

#: procrastinate task names (and queues) of QWIT's jobs.
FLOW_TASK = "qwit.flow"
STEP_TASK = "qwit.step"


#: The kind an inbox row of kind ``decision`` takes once its flow has
#: refused it (it no longer waited for it): delivered again on recovery, it
#: does nothing, and the client that sent it raises ``ReactionError``.
REFUSED = "refused"


async def add_event(
    conn: Conn,
    run_id: str,
    key: str,
    kind: str,
    payload: Any,
    *,
    delay: float | None = None,
) -> None:
    """Put a row in ``run_id``'s inbox (once per key) and announce it."""
    await conn.execute(
        "INSERT INTO qwit.events (run_id, key, kind, payload, due_at) VALUES "
        "(%s, %s, %s, %s, CASE WHEN %s::float8 IS NULL THEN NULL "
        "ELSE clock_timestamp() + make_interval(secs => %s::float8) END) "
        "ON CONFLICT (run_id, key) DO NOTHING",
        [run_id, key, kind, json.dumps(payload), delay, delay],
    )
    await conn.execute("SELECT pg_notify(%s, %s)", [CHANNEL, run_id])


async def defer(
    conn: Conn,
    task: str,
    args: dict[str, Any],
    *,
    queue: str,
    lock: str | None = None,
) -> int:
    """Enqueue a procrastinate job in ``conn``'s transaction; its id."""
    cur = await conn.execute(
        "SELECT unnest(procrastinate_defer_jobs_v1(ARRAY[ROW(%s, %s, %s, NULL, %s, %s, "
        "NULL)::procrastinate_job_to_defer_v1]))",
        [queue, task, 0, lock, json.dumps(args)],
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


def new_run(flow_id: str) -> str:
    """A fresh run id of ``flow_id`` (its start, a sub-flow's, a redrive's)."""
    return f"{flow_id}@{uuid.uuid4().hex[:12]}"


def flow_of_run(run_id: str) -> str:
    """The flow id of a run id (``new_run``'s)."""
    return run_id.rpartition("@")[0]


async def drive(conn: Conn, flow_id: str, run_id: str, queue: str) -> None:
    """Enqueue the driver job of a flow's run, in ``conn``'s transaction
    (locked on the run: no two drivers hold it at once)."""
    await defer(conn, FLOW_TASK, {"flow_id": flow_id, "run_id": run_id}, queue=queue, lock=run_id)


class _Evicted(BaseException):
    """The driver lets go of a flow it had not finished (its worker stops):
    every call of the interpreter raises it, so that its tasks end without
    doing anything (another driver replays the flow)."""


class _Superseded(Exception):
    """Another driver has taken this flow's run (this one was taken for dead)."""


class _Child:
    """A sub-flow as its parent's driver knows it, from its reports."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.done: dict[str, Any] | None = None
        self.aborted: FailureInfo | None = None
        self.ended = False
        self.failure: FailureInfo | None = None


class _Subflow(SubflowRun):
    def __init__(self, driver: Driver, flow_id: str, child: _Child) -> None:
        self.driver = driver
        self.flow_id = flow_id
        self.child = child

    async def forward(self) -> dict[str, Any]:
        child = self.child
        await self.driver.wait_until(
            lambda: child.done is not None or child.aborted is not None or child.ended
        )
        if child.done is not None:
            return child.done
        if child.aborted is not None:
            self.held = True
            raise FlowFailure(child.aborted)
        if child.failure is not None:
            raise FlowFailure(child.failure)
        raise AssertionError("a sub-flow ended without reporting its steps")  # pragma: no cover

    async def _end(self) -> FailureInfo | None:
        await self.driver.wait_until(lambda: self.child.ended)
        return self.child.failure

    async def settle(self, commit: bool) -> FailureInfo | None:
        self.driver.tell(self.child.run_id, "settle", {"commit": commit})
        return await self._end()

    async def grant_place(self) -> None:
        self.driver.tell(self.child.run_id, "place", {})

    async def cancel(self, rollback: bool = True) -> FailureInfo:
        self.driver.tell(self.child.run_id, "cancel", {"rollback": rollback})
        info = await self._end()
        return info or FailureInfo(kind="cancelled", flow_id=self.flow_id, reason="cancelled")


class _Runtime(FlowRuntime):
    engine = "postgres"

    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    def now(self) -> float:
        return self.driver.loop.clock

    async def sleep(self, seconds: float) -> None:
        driver = self.driver
        driver.check()
        key = driver.next_key("timer")
        future = driver.expect(key)
        run_id = driver.run_id

        async def action(conn: Conn) -> None:
            await add_event(conn, run_id, key, "timer", {}, delay=max(seconds, 0.0))

        driver.command(key, action)
        try:
            await future
        finally:
            driver.expected.pop(key, None)

    async def run_step(self, node: StepNode, call: StepCall) -> StepReturn:
        driver = self.driver
        driver.check()
        key = driver.next_key(f"step:{call.path}/{call.direction}")
        future = driver.expect(key)
        args: dict[str, Any] = {
            "run_id": driver.run_id,
            "key": key,
            "node": node.model_dump(mode="json"),
            "call": call.model_dump(mode="json"),
        }
        if self.tracing:  # the spans of the step's own code nest in its span
            args["trace"] = current_context()

        async def action(conn: Conn) -> None:
            await driver.issue_step(conn, key, args)

        driver.command(key, action)
        cancelled = False
        try:
            payload = await asyncio.shield(future)
        except asyncio.CancelledError:
            # Stop the job, and wait until the step has ended: an undo never
            # runs beside its own forward.
            cancelled = True
            driver.command(f"abort:{key}", driver.abort_action(key))
            payload = await self.shield(future)
        finally:
            driver.expected.pop(key, None)
        if "ok" in payload:
            return StepReturn.model_validate(payload["ok"])
        if "cancelled" in payload or cancelled:
            raise asyncio.CancelledError
        raise StepFailure(ErrorInfo.model_validate(payload["error"]))

    async def start_subflow(self, node: FlowNode, input: FlowInput, attempt: int) -> SubflowRun:
        driver = self.driver
        driver.check()
        child_id = child_flow_id(input, input.path, attempt)
        key = f"start:{child_id}"
        future = driver.expect(key)
        trace = current_context() if self.tracing else None  # the sub-flow's span nests here
        driver.command(key, driver.start_action(key, child_id, node, input, trace))
        try:
            payload = await asyncio.shield(future)
        except asyncio.CancelledError:
            payload = await self.shield(future)
            raise SubflowStartCancelled(driver.subflow(child_id, payload)) from None
        finally:
            driver.expected.pop(key, None)
        sub = driver.subflow(child_id, payload)
        if sub is None:
            raise StepFailure(ErrorInfo.model_validate(payload["error"]))
        return sub

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        await self.driver.wait_until(predicate)

    def cancel_requested(self) -> bool:
        return self.driver.cancelling

    @property
    def tracing(self) -> bool:  # type: ignore[override]
        # a replay emits no span again (nor one opened while it replays)
        return self.driver.worker.tracing and not self.driver.replaying

    def record(self, metric: str, value: float, **labels: str) -> None:
        # recorded once: not while replaying, and only once the transaction
        # that delivered what it measures has committed
        if self.driver.worker.metrics is not None and not self.driver.replaying:
            self.driver.measured.append((metric, value, labels))

    async def report_forward_done(self, outputs: dict[str, Any]) -> None:
        self.driver.tell_parent("child_done", outputs)

    async def report_aborted(self, info: FailureInfo) -> None:
        self.driver.tell_parent("child_aborted", info.model_dump(mode="json"))

    gives_places = True

    async def report_place(self, wanted: bool) -> None:
        parent = self.driver.parent_run_id
        assert parent is not None
        self.driver.tell(
            parent, "place_of_child", {"flow_id": self.driver.flow_id, "wanted": wanted}
        )


class DriverHost(Protocol):
    """What a driver uses of the worker it runs on (``PostgresWorker``)."""

    worker_id: int | None
    flow_queue: str
    step_queue: str
    poll_interval: float
    tracing: bool
    metrics: Metrics | None

    def connection(self) -> contextlib.AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        """A connection of the worker's pool, for one transaction or query."""
        ...

    def wakeup(self, run_id: str) -> asyncio.Event:
        """The event that wakes the driver of ``run_id``."""
        ...

    def takes(self, step: str, driver: object) -> bool:
        """Whether the worker takes the job of ``step`` that ``driver`` is
        writing itself (then a place of its ``concurrency`` is the job's)."""
        ...

    def holds(self, run_id: str, key: str, job: int | None) -> bool:
        """Whether the worker runs the step job ``job`` (or keeps its end)."""
        ...

    def run_inline(
        self, args: dict[str, Any], attempt: int, job: int, driver: object | None = None
    ) -> None:
        """Run a step job in this process (in the place ``driver`` took)."""
        ...

    def cancel_inline(self, run_id: str, key: str) -> None:
        """Cancel a step job run in this process."""
        ...

    async def count_attempt(self, conn: psycopg.AsyncConnection[Any], run_id: str, key: str) -> int:
        """Count an attempt of the step ``key`` of ``run_id``; its number."""
        ...


class Driver:
    """One run of one flow, on a worker (see the module's docstring)."""

    def __init__(self, worker: DriverHost, row: dict[str, Any]) -> None:
        self.worker = worker
        self.flow_id: str = row["id"]
        self.run_id: str = row["run_id"]
        self.parent_run_id: str | None = row["parent_run_id"]
        self.input = FlowInput.model_validate(row["input"])
        self.started_at: float = row["created_at"].timestamp()
        #: The trace context its flow's span continues (``qwit._tracing``).
        self.trace: dict[str, str] | None = row.get("trace")
        #: Whether it replays its journal (no span, no metric: they were
        #: emitted when the rows were first delivered).
        self.replaying = False
        self.loop = FlowLoop()  # type: ignore[abstract]
        self.loop.clock = self.started_at
        self.expected: dict[str, asyncio.Future[Any]] = {}
        self.counters: dict[str, int] = defaultdict(int)
        self.commands: list[tuple[str, Action]] = []
        self.after_commit: list[Callable[[], None]] = []
        #: Metrics recorded by the interpreter, kept until the transaction
        #: that delivered what they measure has committed.
        self.measured: list[tuple[str, float, dict[str, str]]] = []
        self.handed: list[Handed] = []
        #: Keys of the decisions it refused while delivering the row in hand
        #: (stale since the client checked them): marked ``REFUSED``.
        self.refused: list[str] = []
        self.waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self.children: dict[str, _Child] = {}
        self.cancelling = False
        #: Whether the interpreter has run yet (a cancel before it has is
        #: seen at its first step).
        self.activated = False
        self.evicted = False
        self.epoch = 0
        self.delivered = 0
        self.words = 0
        self.interpreter = Interpreter(self.input, _Runtime(self), self.flow_id)
        self.task: asyncio.Task[dict[str, Any]] | None = None

    # -- what the runtime asks of the driver --------------------------------

    def next_key(self, prefix: str) -> str:
        """``prefix`` numbered by how often this run asked for it (the same
        on every replay: the interpreter asks in the same order)."""
        self.counters[prefix] += 1
        return f"{prefix}#{self.counters[prefix]}"

    def expect(self, key: str) -> asyncio.Future[Any]:
        self.check()
        future = self.loop.create_future()
        self.expected[key] = future
        return future

    def command(self, key: str, action: Action) -> None:
        self.commands.append((key, action))

    def check(self) -> None:
        """Raise ``_Evicted`` once the driver has let go of the flow."""
        if self.evicted:
            raise _Evicted

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        self.check()
        if predicate():
            return
        future: asyncio.Future[None] = self.loop.create_future()
        self.waiters.append((predicate, future))
        await future

    def tell(self, run_id: str, kind: str, payload: Any) -> None:
        """Put a row in another run's inbox (once, even on replay)."""
        self.words += 1
        key = f"{kind}:{self.run_id}#{self.words}"

        async def action(conn: Conn) -> None:
            await add_event(conn, run_id, key, kind, payload)

        self.command(f"tell:{key}", action)

    def tell_parent(self, kind: str, payload: Any) -> None:
        parent = self.parent_run_id
        if parent is None:  # pragma: no cover - only sub-flows report
            return
        key = f"{kind}:{self.flow_id}"

        async def action(conn: Conn) -> None:
            await add_event(conn, parent, key, kind, payload)

        self.command(f"tell:{key}", action)

    async def issue_step(self, conn: Conn, key: str, args: dict[str, Any]) -> None:
        """A step call is a job of the step queue. When this worker serves
        the step, the job is taken by it in the same transaction and run
        here once the transaction commits (``inline``: no trip through the
        queue); else any worker serving the step takes it."""
        worker = self.worker
        if worker.takes(args["call"]["step"], self):
            cur = await conn.execute(
                TAKE_STEP_JOB,
                {
                    "queue": worker.step_queue,
                    "task": STEP_TASK,
                    "args": json.dumps(args),
                    "worker": worker.worker_id,
                    "run_id": self.run_id,
                    "key": key,
                },
            )
            taken = await cur.fetchone()
            assert taken is not None
            attempt, job = int(taken[0]), int(taken[1])
            self.after_commit.append(lambda: worker.run_inline(args, attempt, job, self))
            return
        job = await defer(conn, STEP_TASK, args, queue=worker.step_queue)
        await conn.execute(
            "UPDATE qwit.commands SET job_id = %s, inline = NULL WHERE run_id = %s AND key = %s",
            [job, self.run_id, key],
        )

    async def _resume_steps(self) -> None:
        """Start again the steps of this run that this worker holds but no
        longer runs or keeps a result of (and those a QWIT before step jobs
        ran without a job), when their results are not recorded."""
        worker = self.worker
        async with worker.connection() as conn, conn.transaction():
            await self._fence(conn)
            cur = await conn.execute(
                "SELECT c.key, coalesce(c.inline, j.args::json), j.id FROM qwit.commands c "
                "LEFT JOIN procrastinate_jobs j ON j.id = c.job_id "
                "WHERE c.run_id = %s AND (c.inline IS NOT NULL OR "
                "(j.status = 'doing' AND j.worker_id = %s)) AND NOT EXISTS "
                "(SELECT 1 FROM qwit.events e WHERE e.run_id = c.run_id AND e.key = c.key)",
                [self.run_id, worker.worker_id],
            )
            for key, args, job in await cur.fetchall():
                if job is None:
                    await self.issue_step(conn, key, args)
                elif worker.holds(self.run_id, key, job):
                    continue
                else:
                    attempt = await worker.count_attempt(conn, self.run_id, key)
                    self.after_commit.append(
                        functools.partial(worker.run_inline, args, attempt, job)
                    )
        self._after_commit()

    def _after_commit(self) -> None:
        metrics = self.worker.metrics
        measured, self.measured = self.measured, []
        if metrics is not None:
            for metric, value, labels in measured:
                metrics.record(metric, value, **labels)
        hooks, self.after_commit = self.after_commit, []
        for hook in hooks:
            hook()

    def abort_action(self, key: str) -> Action:
        run_id = self.run_id
        worker = self.worker

        async def action(conn: Conn) -> None:
            cur = await conn.execute(
                "SELECT c.job_id, c.inline IS NOT NULL, j.status = 'doing' AND j.worker_id = %s "
                "FROM qwit.commands c LEFT JOIN procrastinate_jobs j ON j.id = c.job_id "
                "WHERE c.run_id = %s AND c.key = %s",
                [worker.worker_id, run_id, key],
            )
            row = await cur.fetchone()
            if row is None:
                return
            job, legacy, ours = row
            held = legacy or worker.holds(run_id, key, job)
            if held:
                # run here: stopped here, and it says so (if the job is still
                # this worker's; else whoever holds it now is stopped below)
                self.after_commit.append(lambda: worker.cancel_inline(run_id, key))
            if job is None or (ours and held):
                return
            # (one this worker holds but no longer runs is asked to stop too:
            # when it is released, it ends as stopped)
            # procrastinate's own cancel: a job still waiting is cancelled, a
            # running one is asked to abort (its task is cancelled, it reports)
            await conn.execute("SELECT procrastinate_cancel_job_v1(%s, true, false)", [job])
            # a job cancelled before it ran reports nothing itself
            await conn.execute(
                "INSERT INTO qwit.events (run_id, key, kind, payload) "
                "SELECT %s, %s, 'step', %s FROM procrastinate_jobs "
                "WHERE id = %s AND status = 'cancelled' ON CONFLICT (run_id, key) DO NOTHING",
                [run_id, key, json.dumps({"cancelled": True}), job],
            )
            await conn.execute("SELECT pg_notify(%s, %s)", [CHANNEL, run_id])

        return action

    def start_action(
        self,
        key: str,
        child_id: str,
        node: FlowNode,
        input: FlowInput,
        trace: dict[str, str] | None = None,
    ) -> Action:
        run_id, flow_id = self.run_id, self.flow_id
        worker = self.worker

        async def action(conn: Conn) -> None:
            child_run = new_run(child_id)
            cur = await conn.execute(
                "INSERT INTO qwit.flows (id, run_id, root_id, parent_id, parent_run_id, name, "
                "input, trace, status) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'running') "
                # an ended flow's id is taken again (a redrive's sub-flows), a
                # running one's is not
                "ON CONFLICT (id) DO UPDATE SET run_id = EXCLUDED.run_id, "
                "parent_run_id = EXCLUDED.parent_run_id, input = EXCLUDED.input, "
                "trace = EXCLUDED.trace, "
                "status = 'running', state = NULL, outcome = NULL, records = NULL, "
                "ended = false, updated_at = now() WHERE qwit.flows.ended RETURNING id",
                [
                    child_id,
                    child_run,
                    input.root_id,
                    flow_id,
                    run_id,
                    node.name,
                    json.dumps(input.model_dump(mode="json")),
                    None if trace is None else json.dumps(trace),
                ],
            )
            if await cur.fetchone() is None:
                refused = ArgumentsError(
                    f"sub-flow {node.name!r} could not start: a flow with its "
                    f"id {child_id!r} is running"
                )
                info = error_info(refused, started=False, with_traceback=False)
                payload: dict[str, Any] = {"error": info.model_dump(mode="json")}
            else:
                await drive(conn, child_id, child_run, worker.flow_queue)
                payload = {"ok": True, "run_id": child_run}
            await add_event(conn, run_id, key, "started", payload)

        return action

    def subflow(self, child_id: str, payload: dict[str, Any]) -> _Subflow | None:
        if "ok" not in payload:
            return None
        child = self.children.setdefault(child_id, _Child(payload["run_id"]))
        return _Subflow(self, child_id, child)

    # -- running ---------------------------------------------------------------

    def _activate(self) -> None:
        """Run the interpreter until it waits, waking what waits on a
        predicate that has become true."""
        self.activated = True
        while True:
            self.loop.activate()
            woke = False
            for entry in list(self.waiters):
                predicate, future = entry
                if future.done():
                    self.waiters.remove(entry)
                elif predicate():
                    self.waiters.remove(entry)
                    future.set_result(None)
                    woke = True
            if not woke:
                return

    def _deliver(self, kind: str, key: str, payload: Any) -> None:
        interpreter = self.interpreter
        if kind in ("step", "timer", "started"):
            future = self.expected.get(key)
            if future is not None and not future.done():
                future.set_result(payload)
        elif kind == "decision":
            try:
                interpreter.decide(Decision.model_validate(payload))
            except ReactionError as exc:  # checked by the client, stale since
                logger.warning("flow %s: a decision was refused: %s", self.flow_id, exc)
                self.refused.append(key)
        elif kind == "cancel":
            if not self.cancelling and self.task is not None and not self.task.done():
                interpreter.request_cancel(bool(payload.get("rollback", True)))
                self.cancelling = True
                # A task cancelled before it ran would never run the flow's
                # cancel path: a flow not begun sees the request at its first
                # step instead.
                if self.activated:
                    self.task.cancel()
        elif kind == "settle":
            interpreter.settle(bool(payload["commit"]))
        elif kind == "place_of_child":
            interpreter.subflow_place(str(payload["flow_id"]), bool(payload["wanted"]))
        elif kind == "place":
            interpreter.grant_place()
        elif kind.startswith("child_"):
            child_id = key.partition(":")[2]
            child = self.children.get(child_id)
            if child is None:
                return
            if kind == "child_done":
                child.done = payload
            elif kind == "child_aborted":
                child.aborted = FailureInfo.model_validate(payload)
            elif kind == "child_ended":
                child.ended = True
                failure = payload.get("failure")
                child.failure = None if failure is None else FailureInfo.model_validate(failure)
        else:  # pragma: no cover - a row of a newer QWIT
            logger.warning("flow %s: ignored an event of kind %r", self.flow_id, kind)

    async def run(self) -> None:
        """Replay the run's numbered rows, then go on until the flow ends."""
        self.task = self.loop.create_task(self._interpret(), name=f"qwit {self.flow_id}")
        try:
            await self._run()
        finally:
            if not self.task.done():
                self._evict()

    async def _interpret(self) -> dict[str, Any]:
        """The interpreter's run, under the span context its flow continues."""
        with continued(self.trace if self.worker.tracing else None):
            return await self.interpreter.run()

    def _evict(self) -> None:
        """End the interpreter's tasks without effect (nothing is written)."""
        assert self.task is not None
        self.evicted = True
        for future in self.expected.values():
            future.cancel()
        for _, future in self.waiters:
            future.cancel()
        self.task.cancel()
        for _ in range(1000):
            self.loop.activate()
            if self.task.done():
                break
        self.commands.clear()
        self.loop.close()

    async def _fence(self, conn: Conn) -> None:
        """Hold the flow's row for this transaction; raise ``_Superseded`` if
        another driver has taken the run since this one did."""
        cur = await conn.execute(
            "SELECT driver FROM qwit.flows WHERE id = %s AND run_id = %s FOR UPDATE",
            [self.flow_id, self.run_id],
        )
        row = await cur.fetchone()
        if row is None or row[0] != self.epoch:
            raise _Superseded

    async def _cancel_before_begin(self) -> list[dict[str, Any]]:
        """The cancel waiting in the inbox of a flow no driver has begun, if
        any, numbered 0: delivered before the flow's first step."""
        async with (
            self.worker.connection() as conn,
            conn.transaction(),
            conn.cursor(row_factory=dict_row) as cur,
        ):
            await self._fence(conn)
            await cur.execute(
                "UPDATE qwit.events SET delivered = 0, "
                "delivered_at = extract(epoch FROM clock_timestamp()) "
                "WHERE id = (SELECT id FROM qwit.events WHERE run_id = %s AND kind = 'cancel' "
                "AND delivered IS NULL ORDER BY id LIMIT 1) "
                "RETURNING key, kind, payload, delivered, delivered_at",
                [self.run_id],
            )
            row = await cur.fetchone()
        return [dict(row)] if row is not None else []

    async def _run(self) -> None:
        assert self.task is not None
        async with self.worker.connection() as conn:
            cur = await conn.execute(
                "UPDATE qwit.flows SET driver = driver + 1 WHERE id = %s AND run_id = %s "
                "RETURNING driver, state IS NOT NULL",
                [self.flow_id, self.run_id],
            )
            taken = await cur.fetchone()
            if taken is None:
                raise _Superseded
            self.epoch = int(taken[0])
            # an earlier driver wrote the run's state: it began the flow (and
            # emitted what its start emits) before this one
            begun = bool(taken[1])
            async with conn.cursor(row_factory=dict_row) as dcur:
                await dcur.execute(
                    "SELECT key, kind, payload, delivered, delivered_at FROM qwit.events "
                    "WHERE run_id = %s AND delivered IS NOT NULL ORDER BY delivered",
                    [self.run_id],
                )
                journal = await dcur.fetchall()
        # A cancel that came before the flow began is taken first (numbered
        # 0): no step of the flow runs (on replay, it is taken first again).
        early: list[dict[str, Any]] = []
        if journal and journal[0]["delivered"] == 0:
            early, journal = journal[:1], journal[1:]
        elif not begun and not journal:
            early = await self._cancel_before_begin()
        self.replaying = begun or bool(journal)
        for row in early:
            self.loop.clock = row["delivered_at"]
            self._deliver(row["kind"], row["key"], row["payload"])
        self._activate()
        for row in journal:
            self.loop.clock = row["delivered_at"]
            self.delivered = row["delivered"]
            self._deliver(row["kind"], row["key"], row["payload"])
            self._activate()
        self.replaying = False
        self.refused = []  # (marked when they were first delivered)
        await self._resume_steps()
        await self._flush(self._outcome())
        while not self.task.done():
            await self._advance()
        self.loop.close()

    def hand_over(self, key: str, payload: dict[str, Any], job: int) -> None:
        """A step this worker ran for this driver ended: its result, handed
        over here rather than written by the step. The driver finishes the
        step's job, records its end with its number, delivers it and writes
        what follows, in one transaction (if the driver goes first, its
        worker records it)."""
        self.handed.append((key, payload, job))
        self.worker.wakeup(self.run_id).set()

    async def _advance(self) -> None:
        """Take the next row of the inbox (or a result handed over), number
        it, deliver it, and write what the interpreter then asked for, in one
        transaction; wait for one if there is none (holding no connection)."""
        wake = self.worker.wakeup(self.run_id)
        while True:
            wake.clear()
            handed = list(self.handed)
            try:
                row, due = await self._advance_once()
            except BaseException:
                # what was handed over stays to be recorded (by this driver's
                # worker, if this driver goes)
                self.handed = handed + [h for h in self.handed if h not in handed]
                raise
            if row is not None:
                self._after_commit()
                return
            timeout = self.worker.poll_interval
            if due is not None and due["due"] is not None:
                timeout = max(0.0, min(timeout, float(due["due"])))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout)

    async def _advance_once(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """One transaction: the row delivered (None: none was due) and, when
        none was, how long until the next timer is due."""
        due = None
        async with (
            self.worker.connection() as conn,
            conn.transaction(),
            conn.cursor(row_factory=dict_row) as cur,
        ):
            # Fenced first, under the flow's row lock, which a client's cancel
            # (or decision) takes to check the flow and put its row in the
            # inbox: a row it put there is seen here, and a flow this ends is
            # seen ended there. (And by _write, at the end: a driver taken for
            # dead rolls back whatever it did in the transaction.)
            await self._fence(conn)
            row = await self._claim(cur)
            if row is not None:
                self._deliver(row["kind"], row["key"], row["payload"])
                self._activate()
                if self.refused:  # (the client that sent it learns it)
                    await cur.execute(
                        "UPDATE qwit.events SET kind = %s WHERE run_id = %s AND key = ANY(%s)",
                        [REFUSED, self.run_id, self.refused],
                    )
                    self.refused = []
                await self._write(conn, self._outcome())
            else:
                await cur.execute(
                    "SELECT extract(epoch FROM min(due_at) - clock_timestamp()) AS due "
                    "FROM qwit.events WHERE run_id = %s AND delivered IS NULL",
                    [self.run_id],
                )
                due = await cur.fetchone()
        return row, due

    async def _claim(self, cur: Any) -> dict[str, Any] | None:
        """The next row to deliver, numbered (None: nothing is due)."""
        number = self.delivered + 1
        stamp = "extract(epoch FROM clock_timestamp())"
        row = None
        while self.handed and row is None:
            key, payload, job = self.handed.pop(0)
            # numbered now only if no older row waits in the inbox (a cancel
            # or decision committed while the step ran): else it waits its
            # turn there, and is delivered after them, in order
            await cur.execute(
                FINISH_STEP_JOB.format(
                    columns=", delivered, delivered_at",
                    values=", CASE WHEN older.waits THEN NULL ELSE %(number)s END"
                    f", CASE WHEN older.waits THEN NULL ELSE {stamp} END",
                    joined=_OLDER_ROW,
                ),
                {
                    "job": job,
                    "worker": self.worker.worker_id,
                    "run_id": self.run_id,
                    "key": key,
                    "payload": json.dumps(payload),
                    "number": number,
                },
            )
            # None: the job is no longer this worker's (whoever runs it now
            # records it), or its end was recorded (it comes from the table);
            # not numbered: it was put in the inbox behind older rows
            row = await cur.fetchone()
            if row is not None and row["delivered_at"] is None:
                row = None
        if row is None:
            # A cancel goes first: a step's end that came before it must not
            # let the flow end with the cancel (which its caller was told the
            # flow took) left unread.
            await cur.execute(
                "SELECT id, key, kind, payload FROM qwit.events WHERE run_id = %s "
                "AND delivered IS NULL AND (due_at IS NULL OR due_at <= clock_timestamp()) "
                "ORDER BY kind = 'cancel' DESC, id LIMIT 1 FOR UPDATE",
                [self.run_id],
            )
            row = await cur.fetchone()
            if row is None:
                return None
            await cur.execute(
                f"UPDATE qwit.events SET delivered = %s, delivered_at = {stamp} WHERE id = %s "
                "RETURNING delivered_at",
                [number, row["id"]],
            )
            stamped = await cur.fetchone()
            assert stamped is not None
            row["delivered_at"] = stamped["delivered_at"]
        self.delivered = number
        self.loop.clock = row["delivered_at"]
        return dict(row)

    def _outcome(self) -> dict[str, Any] | None:
        """How the flow ended (None: it runs); on its end, tell the parent."""
        assert self.task is not None
        if not self.task.done():
            return None
        failure: FailureInfo | None = None
        outcome: dict[str, Any]
        try:
            outcome = {"result": self.task.result()}
        except FlowFailure as failed:
            failure = failed.info
            outcome = {"failure": failed.info.model_dump(mode="json")}
        except asyncio.CancelledError:  # pragma: no cover - the interpreter absorbs cancels
            failure = FailureInfo(kind="cancelled", flow_id=self.flow_id, reason="cancelled")
            outcome = {"failure": failure.model_dump(mode="json")}
        if self.parent_run_id is not None:
            self.tell_parent(
                "child_ended",
                {"failure": None if failure is None else failure.model_dump(mode="json")},
            )
        return outcome

    async def _flush(self, outcome: dict[str, Any] | None = None) -> None:
        """``_write`` in a transaction of its own."""
        async with self.worker.connection() as conn, conn.transaction():
            await self._write(conn, outcome)
        self._after_commit()

    async def _write(self, conn: Conn, outcome: dict[str, Any] | None) -> None:
        """Write what the interpreter asked for (each command once) and the
        flow's state (and, once it has ended, its ``outcome``), in the
        caller's transaction."""
        commands, self.commands = self.commands, []
        state = self.interpreter.state()
        for key, action in commands:
            cur = await conn.execute(
                "INSERT INTO qwit.commands (run_id, key) VALUES (%s, %s) "
                "ON CONFLICT DO NOTHING RETURNING key",
                [self.run_id, key],
            )
            if await cur.fetchone() is not None:
                await action(conn)
        records = None
        if outcome is not None:  # what a redrive starts from
            records = json.dumps([r.model_dump(mode="json") for r in self.interpreter.records()])
        # The fence: only while the row carries this driver's number (else
        # the caller's transaction is rolled back, with all it wrote).
        cur = await conn.execute(
            "UPDATE qwit.flows SET status = %s, state = %s, updated_at = now(), "
            "outcome = coalesce(%s::json, outcome), records = coalesce(%s::json, records), "
            "ended = ended OR %s WHERE id = %s AND run_id = %s AND driver = %s",
            [
                state.status,
                state.model_dump_json(),
                None if outcome is None else json.dumps(outcome),
                records,
                outcome is not None,
                self.flow_id,
                self.run_id,
                self.epoch,
            ],
        )
        if cur.rowcount != 1:
            raise _Superseded
        if outcome is not None:
            await conn.execute("SELECT pg_notify(%s, %s)", [CHANNEL, "ended:" + self.flow_id])


__all__ = [
    "FLOW_TASK",
    "REFUSED",
    "STEP_TASK",
    "Driver",
    "Superseded",
    "add_event",
    "defer",
    "drive",
    "flow_of_run",
    "new_run",
]

Superseded = _Superseded
