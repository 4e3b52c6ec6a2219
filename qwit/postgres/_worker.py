"""A worker of the PostgreSQL engine: procrastinate workers that drive flows
and run steps, with what keeps them going.

Two procrastinate queues: ``qwit.flows`` (a job per flow run: its driver,
long-lived, locked on the run so that two drivers never hold one run) and
``qwit.steps`` (a job per step call). Besides procrastinate's workers, a
worker listens on ``qwit_events`` to wake the drivers whose inbox got a row,
and sweeps for jobs of dead workers (procrastinate's stalled jobs: a worker
that stopped heartbeating) and runs them again: a flow's driver replays its
journal; a step's job runs the step again unless its result is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import Callable
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any

import procrastinate
import psycopg
from procrastinate.job_context import AbortReason

from .._errors import StepFailure, StepNotRegistered, error_info
from .._memory import Heartbeats
from .._options import DEFAULT_TIMEOUT_GRACE
from .._plan import StepCall, StepNode, StepReturn
from .._runner import Registry, run_step_method
from ._driver import FLOW_TASK, STEP_TASK, Driver, Superseded, add_event
from ._pool import Connections
from ._store import CHANNEL, fetch_flow, migrate

if TYPE_CHECKING:
    from .._flow import Flow
    from .._step import Step

logger = logging.getLogger("qwit.postgres")

FLOW_QUEUE = "qwit.flows"
STEP_QUEUE = "qwit.steps"


#: Environment variables a ``qwit-worker --backend postgres`` reads (seconds).
HEARTBEAT_ENV = "QWIT_POSTGRES_HEARTBEAT"
STALLED_AFTER_ENV = "QWIT_POSTGRES_STALLED_AFTER"


def worker_options_from_env() -> dict[str, float]:
    """``PostgresWorker`` options set in the environment
    (``QWIT_POSTGRES_HEARTBEAT``, ``QWIT_POSTGRES_STALLED_AFTER``)."""
    import os

    options: dict[str, float] = {}
    for env, option in ((HEARTBEAT_ENV, "heartbeat"), (STALLED_AFTER_ENV, "stalled_after")):
        raw = os.environ.get(env)
        if raw:
            options[option] = float(raw)
    return options


async def prepare(dsn: str) -> None:
    """Create or upgrade QWIT's tables and procrastinate's (idempotent)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('qwit.procrastinate'))")
            cur = await conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")
            row = await cur.fetchone()
            if not (row and row[0]):
                await conn.execute(procrastinate.schema.SchemaManager.get_schema())
        await migrate(conn)


class PostgresWorker:
    """Drives flows and runs the steps of ``members`` (Flows, Steps, modules).

    Use it as an async context manager (it runs until the block ends) or
    ``await worker.run()``. It creates QWIT's tables (and procrastinate's) if
    they are missing, and refuses a database migrated by a newer QWIT.

    Args:
        dsn: The PostgreSQL connection string.
        *members: What it serves: a step job of a step it did not register
            fails with ``StepNotRegistered``.
        concurrency: Steps run at once.
        flows: Flows driven at once (a driver is light: a flow that waits
            holds one).
        heartbeat: Seconds between the worker's heartbeats.
        stalled_after: Seconds without a heartbeat after which a worker is
            taken for dead, and its jobs run again elsewhere.
        poll_interval: Seconds a driver waits for its inbox before it looks
            again without being woken.
        pool_size: Connections its drivers and steps share (procrastinate
            and the listener have their own).
        inline: Run the steps it serves itself, for the flows it drives,
            without a job (as DBOS does; its drivers record each call first,
            so a driver replayed elsewhere runs again what had not ended);
            False: every step is a job of the queue.
    """

    def __init__(
        self,
        dsn: str,
        *members: type[Step] | type[Flow] | ModuleType,
        concurrency: int = 20,
        flows: int = 500,
        heartbeat: float = 2.0,
        stalled_after: float = 10.0,
        poll_interval: float = 1.0,
        pool_size: int = 10,
        inline: bool = True,
    ) -> None:
        self.dsn = dsn
        self.registry = Registry(*members)
        self.concurrency = concurrency
        self.flows = flows
        self.heartbeat = heartbeat
        self.stalled_after = stalled_after
        self.poll_interval = poll_interval
        self.flow_queue = FLOW_QUEUE
        self.step_queue = STEP_QUEUE
        self.pool_size = pool_size
        self._pool: Connections | None = None
        self.inline = inline
        self._inline: dict[tuple[str, str], tuple[asyncio.Task[None], list[bool]]] = {}
        self._wakeups: dict[str, asyncio.Event] = {}
        self._drivers: dict[str, Driver] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
        self.app.task(name=FLOW_TASK, pass_context=True, retry=procrastinate.RetryStrategy())(
            self._flow_job
        )
        # A job cut off by its worker's shutdown runs again (elsewhere); one
        # of a worker that died is run again by the sweep.
        self.app.task(name=STEP_TASK, pass_context=True, retry=procrastinate.RetryStrategy())(
            self._step_job
        )

    async def connect(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)

    def connection(self) -> contextlib.AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        """A connection of the worker's pool, for one transaction or query."""
        if self._pool is None:
            self._pool = Connections(self.dsn, self.pool_size)
        return self._pool.connection()

    def wakeup(self, run_id: str) -> asyncio.Event:
        event = self._wakeups.get(run_id)
        if event is None:
            event = self._wakeups[run_id] = asyncio.Event()
        return event

    # -- jobs ------------------------------------------------------------------

    async def _flow_job(self, context: procrastinate.JobContext, flow_id: str, run_id: str) -> None:
        async with self.connection() as conn:
            row = await fetch_flow(conn, flow_id)
        if row is None or row["run_id"] != run_id or row["ended"]:
            return  # a later run replaced it, or it ended before a crash
        driver = Driver(self, row)
        self._drivers[run_id] = driver
        try:
            await driver.run()
        except Superseded:
            logger.info("flow %s: another driver took run %s", flow_id, run_id)
        finally:
            # results of steps it ran, handed over but not yet journaled: for
            # the driver that replays the run
            for key, payload in driver.handed:
                with contextlib.suppress(psycopg.Error, OSError):
                    await self._record(run_id, key, payload)
            self._wakeups.pop(run_id, None)
            if self._drivers.get(run_id) is driver:
                del self._drivers[run_id]

    async def _step_job(
        self,
        context: procrastinate.JobContext,
        run_id: str,
        key: str,
        node: dict[str, Any],
        call: dict[str, Any],
    ) -> None:
        await self._step(
            run_id, key, node, call, lambda: context.abort_reason() == AbortReason.USER_REQUEST
        )

    async def _step(
        self,
        run_id: str,
        key: str,
        node: dict[str, Any],
        call: dict[str, Any],
        stopped_by_flow: Callable[[], bool],
        first_attempt: int | None = None,
    ) -> None:
        """Run a step call and record how it ended, once (a job, or a step
        this worker runs for its own driver)."""
        payload: dict[str, Any]
        try:
            inline = first_attempt is not None
            if not inline:  # (a driver starts a step of its own only without a result)
                async with self.connection() as conn:
                    cur = await conn.execute(
                        "SELECT 1 FROM qwit.events WHERE run_id = %s AND key = %s", [run_id, key]
                    )
                    if await cur.fetchone() is not None:
                        return  # run again after a crash, but its result was recorded
            step, sent = StepNode.model_validate(node), StepCall.model_validate(call)
            try:
                done = await self._run(run_id, key, step, sent, first_attempt)
                payload = {"ok": done.model_dump(mode="json")}
            except StepFailure as failure:
                payload = {"error": failure.info.model_dump(mode="json")}
        except asyncio.CancelledError:
            if not stopped_by_flow():
                raise  # the worker stops: the step runs again elsewhere
            # the flow stopped the step: it has ended, and says so
            payload = {"cancelled": True}
        driver = self._drivers.get(run_id) if first_attempt is not None else None
        if driver is not None and not driver.evicted:
            driver.hand_over(key, payload)
            return
        await self._record(run_id, key, payload)

    def run_inline(self, args: dict[str, Any], attempt: int) -> None:
        """Run a step call for a driver of this worker, here (no job: its
        command, recorded, is what a later driver runs again if needed)."""
        ident = (args["run_id"], args["key"])
        if ident in self._inline:
            return
        stopped: list[bool] = []
        task = asyncio.ensure_future(
            self._step(
                args["run_id"],
                args["key"],
                args["node"],
                args["call"],
                lambda: bool(stopped),
                first_attempt=attempt,
            )
        )
        self._inline[ident] = (task, stopped)
        task.add_done_callback(lambda _: self._inline.pop(ident, None))

    def cancel_inline(self, run_id: str, key: str) -> None:
        """Stop a step this worker runs for a flow that stops it (it records
        that it was cancelled, once it has stopped)."""
        running = self._inline.get((run_id, key))
        if running is not None:
            task, stopped = running
            stopped.append(True)
            task.cancel()

    async def _next_attempt(self, run_id: str, key: str) -> int:
        """The number of the attempt about to start (counted in PostgreSQL)."""
        async with self.connection() as conn:
            cur = await conn.execute(
                "INSERT INTO qwit.attempts (run_id, key, attempt) VALUES (%s, %s, 1) "
                "ON CONFLICT (run_id, key) DO UPDATE SET attempt = qwit.attempts.attempt + 1 "
                "RETURNING attempt",
                [run_id, key],
            )
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

    async def _run(
        self,
        run_id: str,
        key: str,
        node: StepNode,
        call: StepCall,
        first_attempt: int | None = None,
    ) -> StepReturn:
        """Run a step's call, its retries included (``run_with_retries``'s
        rule, with attempts counted across crashed jobs)."""
        cls = self.registry.get(call.step)
        if cls is None:
            raise StepFailure(
                error_info(
                    StepNotRegistered(
                        f"step {call.step!r} is not registered with this worker",
                    ),
                    started=False,
                    retryable=False,
                )
            )
        retry = node.back_retry if call.direction == "step_back" else node.retry
        beats = Heartbeats()
        while True:
            if first_attempt is not None:  # counted by the driver, with the call
                number, first_attempt = first_attempt, None
            else:
                number = await self._next_attempt(run_id, key)
            if retry.max_attempts is not None and number > retry.max_attempts:
                raise StepFailure(
                    error_info(
                        RuntimeError(
                            f"the worker running attempt {number - 1} of step {call.step!r} "
                            "died, and that was its last attempt"
                        ),
                        attempt=number - 1,
                        retryable=False,
                    )
                )
            try:
                output = await self._attempt(cls, node, call, number, beats)
                return StepReturn(output=output, attempt=number)
            except StepFailure as failure:
                info = failure.info
            spent = retry.max_attempts is not None and number >= retry.max_attempts
            if spent or not info.retryable:
                raise StepFailure(info.model_copy(update={"attempt": number}))
            await asyncio.sleep(retry.delay(number))

    async def _attempt(
        self, cls: Any, node: StepNode, call: StepCall, number: int, beats: Heartbeats
    ) -> dict[str, Any]:
        """One attempt; with a ``heartbeat_timeout``, one that goes that long
        without ``qwit.heartbeat()`` is stopped (an ``async`` step cancelled,
        a plain one told through ``context().cancelled``) and fails, to be
        retried, as on Temporal."""
        limit = node.heartbeat_timeout
        starved: list[bool] = []
        last = [time.monotonic()]

        def beat(details: Any) -> None:
            last[0] = time.monotonic()
            beats.beat(details)

        attempt = asyncio.ensure_future(
            run_step_method(
                cls,
                call,
                attempt=number,
                engine="postgres",
                heartbeat=beat,
                heartbeat_details=copy.deepcopy(beats.last),
                is_cancelled=lambda: bool(starved),
                timeout=node.limit(call.direction),
                grace=DEFAULT_TIMEOUT_GRACE if node.timeout_grace is None else node.timeout_grace,
            )
        )

        async def watch() -> None:
            assert limit is not None
            while not attempt.done():
                left = last[0] + limit - time.monotonic()
                if left <= 0:
                    starved.append(True)
                    attempt.cancel()
                    return
                await asyncio.sleep(min(left, 1.0))

        watchdog = asyncio.ensure_future(watch()) if limit else None
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            if not starved:  # stopped from outside: the attempt stops too
                attempt.cancel()
                with contextlib.suppress(BaseException):
                    await attempt
                raise
            with contextlib.suppress(BaseException):
                await attempt
            raise StepFailure(
                error_info(
                    TimeoutError(f"step {call.step!r} sent no heartbeat for {limit:g}s"),
                    attempt=number,
                    retryable=True,
                    with_traceback=False,
                )
            ) from None
        finally:
            if watchdog is not None:
                watchdog.cancel()

    async def _record(self, run_id: str, key: str, payload: dict[str, Any]) -> None:
        """Record a step's end in its flow's inbox (once: a retried job's
        second record is dropped), whatever cancel comes meanwhile."""

        async def record() -> None:
            async with self.connection() as conn, conn.transaction():
                await add_event(conn, run_id, key, "step", payload)

        task = asyncio.ensure_future(record())
        while True:
            try:
                await asyncio.shield(task)
                return
            except asyncio.CancelledError:
                if task.done():
                    task.result()
                    return

    # -- running -----------------------------------------------------------------

    async def _listen(self) -> None:
        while True:
            try:
                async with await self.connect() as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    for event in self._wakeups.values():
                        event.set()  # rows may have come while nobody listened
                    async for note in conn.notifies():
                        woken = self._wakeups.get(note.payload)
                        if woken is not None:
                            woken.set()
            except (psycopg.Error, OSError) as exc:
                logger.warning("qwit.postgres: listening stopped (%s); again in 1 s", exc)
                await asyncio.sleep(1.0)

    async def _sweep(self) -> None:
        """Run again the jobs of workers that stopped heartbeating."""
        while True:
            await asyncio.sleep(max(self.heartbeat, 0.2))
            try:
                manager = self.app.job_manager
                await manager.prune_stalled_workers(self.stalled_after)
                for queue in (self.flow_queue, self.step_queue):
                    for job in await manager.get_stalled_jobs(
                        queue=queue, seconds_since_heartbeat=self.stalled_after
                    ):
                        await manager.retry_job(job)
            except Exception as exc:
                logger.warning("qwit.postgres: sweep failed (%s)", exc)

    async def _keep(self, **options: Any) -> None:
        """Run a procrastinate worker; start a new one if it stops (PostgreSQL
        went away): the old one's jobs are then those of a dead worker, run
        again once it is taken for dead."""
        while True:
            try:
                await self.app.run_worker_async(**options)
            except (psycopg.Error, OSError, procrastinate.exceptions.ProcrastinateException) as exc:
                logger.warning("qwit.postgres: a worker stopped (%s); a new one in 1 s", exc)
            await asyncio.sleep(1.0)

    async def run(self) -> None:
        """Serve until cancelled."""
        self._pool = Connections(self.dsn, self.pool_size)
        await self._prepared()
        async with self.app.open_async():
            common: dict[str, Any] = {
                "install_signal_handlers": False,
                "update_heartbeat_interval": self.heartbeat,
                "stalled_worker_timeout": self.stalled_after,
                "fetch_job_polling_interval": self.poll_interval,
                "abort_job_polling_interval": self.poll_interval,
                "shutdown_graceful_timeout": 0,
                "delete_jobs": "successful",
            }
            tasks = [
                asyncio.ensure_future(self._listen()),
                asyncio.ensure_future(self._sweep()),
                asyncio.ensure_future(
                    self._keep(queues=[self.flow_queue], concurrency=self.flows, **common)
                ),
                asyncio.ensure_future(
                    self._keep(queues=[self.step_queue], concurrency=self.concurrency, **common)
                ),
            ]
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(BaseException):
                        await task
                for task, _ in list(self._inline.values()):
                    task.cancel()  # not stopped by its flow: nothing recorded
                for task, _ in list(self._inline.values()):
                    with contextlib.suppress(BaseException):
                        await task
                if self._pool is not None:
                    await self._pool.close()  # (kept: a late caller gets an error)

    async def serve(self) -> None:
        """Run until SIGINT or SIGTERM, then stop (the drivers it held are
        replayed by other workers; its steps' jobs run again elsewhere unless
        their results were recorded)."""
        import signal

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        running = asyncio.ensure_future(self.run())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (running, stopping):
                task.cancel()
            for task in (running, stopping):
                with contextlib.suppress(BaseException):
                    await task
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
        if running.done() and not running.cancelled() and running.exception() is not None:
            raise running.exception()  # type: ignore[misc]

    async def _prepared(self) -> None:
        """``prepare`` the database, waiting for a PostgreSQL that is not up."""
        while True:
            try:
                await prepare(self.dsn)
                return
            except psycopg.OperationalError as exc:
                logger.warning("qwit.postgres: PostgreSQL can't be reached (%s); again in 1 s", exc)
                await asyncio.sleep(1.0)

    async def __aenter__(self) -> PostgresWorker:
        await prepare(self.dsn)
        self._tasks = [asyncio.ensure_future(self.run())]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task


__all__ = [
    "FLOW_QUEUE",
    "HEARTBEAT_ENV",
    "STALLED_AFTER_ENV",
    "STEP_QUEUE",
    "PostgresWorker",
    "prepare",
    "worker_options_from_env",
]
