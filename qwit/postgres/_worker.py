"""A worker of the PostgreSQL engine: procrastinate workers that drive flows
and run steps, with what keeps them going.

Two procrastinate queues: ``qwit.flows`` (a job per flow run: its driver,
long-lived, locked on the run so that two drivers never hold one run) and
``qwit.steps`` (a job per step call). A step job ends in one transaction
with its result's record: procrastinate's finish of the job and the row in
the flow's inbox are written together, so a crash between the two can
neither lose the record of an effect nor record it twice.

A step job of a step this worker serves, called by a flow it drives, is
taken by the worker as it is written (in the driver's transaction: status
``doing``, under the worker's own procrastinate worker id) and run here at
once, without a trip through the queue; the driver finishes it when it
delivers its result. If the worker dies, procrastinate's stalled-job sweep
puts the job back in the queue, for any worker serving the step.

Each worker records the steps it serves in ``qwit.serving``, and leaves the
step jobs of steps it lacks to a live worker that serves them
(``FETCH_SERVED``). When none lives (workers of one database serving
different modules, a rolling deploy), a worker lacking the step takes its
job and puts it back for another worker, offered again with a backoff, as
on Temporal; the step fails with ``StepNotRegistered`` only once it has been
refused for the plan's ``unserved_step_timeout`` with no live worker serving
it (the heartbeats of one that does stop the clock: ``STILL_SERVED``).

Besides procrastinate's workers, a worker listens on ``qwit_events`` to wake
the drivers whose inbox got a row, and sweeps for jobs of dead workers
(procrastinate's stalled jobs: a worker that stopped heartbeating) and runs
them again: a flow's driver replays its journal; a step's job runs the step
again (its attempts counted on).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import json
import logging
from collections.abc import Callable
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any

import procrastinate
import procrastinate.worker
import psycopg
from procrastinate.job_context import AbortReason

from .._errors import ArgumentsError, ErrorInfo, StepFailure, StepNotRegistered, error_info
from .._memory import Heartbeats
from .._metrics import WAITING_EVERY, Metrics
from .._plan import PLAN_VERSION, FlowInput, PlanTooNew, StepCall, StepNode, StepReturn
from .._runner import Refusals, Registry, run_watched_step_method
from .._signals import stop_on_signals
from .._tracing import continued, require_opentelemetry, tracer_provider, tracing_from_env
from ._driver import (
    FINISH_STEP_JOB,
    FLOW_TASK,
    STEP_TASK,
    Driver,
    Superseded,
    add_event,
    flow_of_run,
)
from ._pool import Connections
from ._store import CHANNEL, fetch_flow, migrate, unstorable

if TYPE_CHECKING:
    from .._flow import Flow
    from .._step import Step

logger = logging.getLogger("qwit.postgres")

FLOW_QUEUE = "qwit.flows"
STEP_QUEUE = "qwit.steps"

#: Seconds the steps in flight get to finish when a worker stops (SIGINT,
#: SIGTERM, or the end of its ``async with`` block), as a Temporal worker's.
DEFAULT_GRACEFUL_SHUTDOWN = 30.0
#: Seconds, as it stops, that its drivers get to let go of their flows.
ABORT_WAIT = 5.0
#: Seconds a forced stop (a second signal) waits for what stops quickly.
FORCED_WAIT = 1.0


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


#: Seconds before a flow job whose plan is newer than this QWIT is offered
#: again (to a worker that may read it).
PLAN_TOO_NEW_RETRY = 5.0

#: A step job taken by a worker that does not serve its step goes back to the
#: queue for this many seconds, doubled at each offer up to the max (as on
#: Temporal), for the plan's ``unserved_step_timeout``.
UNSERVED_RETRY_FIRST = 0.2
UNSERVED_RETRY_MAX = 2.0
#: Steps a worker remembers logging the first refusal of (see ``Refusals``).
MAX_REFUSED_LOGGED = 100

#: Whether a live worker (one that heartbeat within ``%(stalled)s``
#: seconds) serves the step ``{step}`` of the queue ``{queue}`` (SQL
#: expressions), for ``UNSERVED`` and ``FETCH_SERVED``.
LIVE_SERVER = """EXISTS (
    SELECT 1 FROM qwit.serving s JOIN procrastinate_workers w ON w.id = s.worker_id
    WHERE s.queue = {queue} AND s.step = {step}
    AND w.last_heartbeat > now() - make_interval(secs => %(stalled)s)
)"""

#: For a step job a worker does not serve: the database's name, its flow's
#: input (NULL: the run is over), for how long its step has gone unserved
#: (the clock starts at its first refusal, and again at each refusal while a
#: live worker, one that heartbeat within ``stalled``, serves the step: the
#: time it waits for a busy or starting worker is not unserved; an attempt
#: a serving worker starts stops it, see ``count_attempt``), its attempts so
#: far, and whether a live worker serves its step.
UNSERVED = f"""
WITH served AS (
    SELECT {LIVE_SERVER.format(queue="%(queue)s", step="%(step)s")} AS live
), marked AS (
    UPDATE qwit.commands c SET unserved_since = CASE
        WHEN (SELECT live FROM served) THEN clock_timestamp()
        ELSE coalesce(c.unserved_since, clock_timestamp()) END
    WHERE c.run_id = %(run_id)s AND c.key = %(key)s
    RETURNING c.unserved_since
)
SELECT current_database(),
    (SELECT f.input FROM qwit.flows f WHERE f.id = %(flow_id)s AND f.run_id = %(run_id)s),
    (SELECT extract(epoch FROM clock_timestamp() - unserved_since)::float8 FROM marked),
    (SELECT attempt FROM qwit.attempts a WHERE a.run_id = %(run_id)s AND a.key = %(key)s),
    (SELECT live FROM served)
"""

#: The steps a worker serves, under its procrastinate worker id (and away
#: with the rows of workers procrastinate no longer knows: they stopped, or
#: were taken for dead and pruned).
SERVING = """
WITH gone AS (
    DELETE FROM qwit.serving s
    WHERE NOT EXISTS (SELECT 1 FROM procrastinate_workers w WHERE w.id = s.worker_id)
)
INSERT INTO qwit.serving (worker_id, queue, step)
SELECT %(worker_id)s, %(queue)s, unnest(%(steps)s::text[])
ON CONFLICT DO NOTHING
"""

#: A worker that stops serves nothing more: it takes no new job.
NOT_SERVING = "DELETE FROM qwit.serving WHERE worker_id = %s"

#: At each heartbeat of a worker, the step jobs of its queue waiting for a
#: step it serves are not unserved: the clock of their time unserved stops
#: (a refusal after it has gone starts it again). Other workers leave such
#: jobs alone (``FETCH_SERVED``), so none of them would restart it.
STILL_SERVED = """
UPDATE qwit.commands c SET unserved_since = NULL
FROM procrastinate_jobs j
WHERE c.unserved_since IS NOT NULL AND j.id = c.job_id AND j.queue_name = %(queue)s
AND j.args->'call'->>'step' = ANY(%(steps)s::text[])
"""

#: The next job of ``queues`` for the procrastinate worker ``worker_id``
#: (procrastinate's ``procrastinate_fetch_job_v2``: its locks, priorities
#: and order), leaving out the step jobs of steps it does not serve (``steps``)
#: while a live worker serves them: that worker takes them. A worker that
#: took them would only put them back, and, polling in step with its own
#: offers, would take them again first, each time.
FETCH_SERVED = f"""
WITH candidate AS (
    SELECT jobs.id
    FROM procrastinate_jobs AS jobs
    WHERE NOT EXISTS (
            SELECT 1 FROM procrastinate_jobs AS other_jobs
            WHERE jobs.lock IS NOT NULL AND other_jobs.lock = jobs.lock
            AND (other_jobs.status = 'doing' OR (other_jobs.status = 'todo' AND (
                other_jobs.priority > jobs.priority
                OR (other_jobs.priority = jobs.priority AND other_jobs.id < jobs.id))))
        )
        AND jobs.status = 'todo'
        AND (%(queues)s::varchar[] IS NULL OR jobs.queue_name = ANY(%(queues)s::varchar[]))
        AND (jobs.scheduled_at IS NULL OR jobs.scheduled_at <= now())
        AND (
            jobs.task_name <> %(task)s
            OR jobs.args->'call'->>'step' = ANY(%(steps)s::text[])
            OR NOT {LIVE_SERVER.format(queue="jobs.queue_name", step="jobs.args->'call'->>'step'")}
        )
    ORDER BY jobs.priority DESC, jobs.id ASC LIMIT 1
    FOR UPDATE OF jobs SKIP LOCKED
), taken AS (
    UPDATE procrastinate_jobs SET status = 'doing', worker_id = %(worker_id)s
    FROM candidate WHERE procrastinate_jobs.id = candidate.id
    RETURNING procrastinate_jobs.*
)
-- (one row, of NULLs if none was taken, as procrastinate's own query)
SELECT t.id, t.status, t.task_name, t.priority, t.lock, t.queueing_lock, t.args,
    t.scheduled_at, t.queue_name, t.attempts, t.worker_id
FROM (SELECT 1) AS one LEFT JOIN taken AS t ON true
"""


def unserved_delay(offers: int) -> float:
    """Seconds before a step job refused ``offers`` times is offered again:
    ``UNSERVED_RETRY_FIRST`` doubled at each offer, up to
    ``UNSERVED_RETRY_MAX`` (however many offers: a step a live worker serves
    may be refused for as long as that worker is busy)."""
    return min(UNSERVED_RETRY_FIRST * 2.0 ** min(offers, 16), UNSERVED_RETRY_MAX)


class _FlowJobRetry(procrastinate.BaseRetryStrategy):
    """Flow jobs run again when they stop: at once when their worker stopped
    under them (another worker takes the flow on), after
    ``PLAN_TOO_NEW_RETRY`` when the flow's plan is newer than the worker."""

    def get_retry_decision(
        self, *, exception: BaseException, job: procrastinate.jobs.Job
    ) -> procrastinate.RetryDecision:
        if isinstance(exception, PlanTooNew):
            return procrastinate.RetryDecision(
                retry_in={"milliseconds": int(PLAN_TOO_NEW_RETRY * 1000)}
            )
        return procrastinate.RetryDecision(retry_in={"seconds": 0})


class PostgresWorker:
    """Drives flows and runs the steps of ``members`` (Flows, Steps, modules).

    Use it as an async context manager (it runs until the block ends; a
    worker that stopped serving by an error raises it as the block ends) or
    ``await worker.run()``. It creates QWIT's tables (and procrastinate's) if
    they are missing, and refuses a database migrated by a newer QWIT.

    Args:
        dsn: The PostgreSQL connection string.
        *members: What it serves (recorded in ``qwit.serving`` while it
            lives). A step job of a step it did not register goes back to
            the queue, for a worker that serves it; the step fails with
            ``StepNotRegistered`` once none has for the flow's
            ``unserved_step_timeout`` and no live worker serves it.
        concurrency: Places for steps: the steps it runs at once, those it
            takes from the queue and those it takes itself for its own
            drivers (``inline``) alike, with its fetches under way and the
            steps its drivers are writing. A step waiting out a retry's
            backoff gives its place back until the backoff ends, then takes
            the next that frees before any step not yet started (a worker
            holds at most twice ``concurrency`` jobs of the queue, those
            resting included); one that waits for another flow keeps its
            place. With every place taken,
            a step its drivers issue goes to the queue, for any worker
            serving it, and it fetches none until a place frees. Apart
            from that bound: steps it already held when one of its drivers
            restarts run again at once (counted, not refused). 100 by
            default, as a Temporal worker's activity slots.
        flows: Flows driven at once (a driver is light: a flow that waits
            holds one).
        heartbeat: Seconds between the worker's heartbeats.
        stalled_after: Seconds without a heartbeat after which a worker is
            taken for dead, and its jobs run again elsewhere.
        poll_interval: Seconds a driver waits for its inbox before it looks
            again without being woken.
        pool_size: Connections its drivers and steps share (procrastinate
            and the listener have their own).
        inline: Take the step jobs of the steps it serves, for the flows it
            drives, as they are written, and run them here (as DBOS runs a
            workflow's steps in its process); they go back to the queue if it
            dies. False: every step job goes through the queue, to whichever
            worker serving the step takes it first.
        metrics: Where its drivers record QWIT's metrics (serve them with
            ``qwit.postgres.serve_metrics``, as ``qwit-worker
            --metrics-address`` does); it also keeps ``qwit_flows_waiting``
            there, counted every ``waiting_every`` seconds.
        tracing: Emit the spans of the flows it drives (default
            ``$QWIT_TRACING``; needs ``qwit[tracing]``); a flow's span
            continues its caller's, when the client traces too.
        waiting_every: Seconds between two counts of the waiting flows.
        graceful_shutdown_timeout: Seconds the steps in flight get to finish
            when the worker stops (``serve`` on SIGINT or SIGTERM, or the end
            of its ``async with`` block): it takes no new job, lets go of the
            flows it drives at once (other workers replay them), and records
            the end of each step that finishes in time. A step still running
            after that is stopped and goes back to the queue, as one of a
            worker that died (that attempt counts). 0: stop at once. A second
            signal to ``serve`` also stops at once.

    Raises:
        QwitError: tracing is asked for and OpenTelemetry is not installed.
        ValueError: ``concurrency`` is not a whole number of 1 or more, or
            ``graceful_shutdown_timeout`` is negative.
    """

    def __init__(
        self,
        dsn: str,
        *members: type[Step] | type[Flow] | ModuleType,
        concurrency: int = 100,
        flows: int = 500,
        heartbeat: float = 2.0,
        stalled_after: float = 10.0,
        poll_interval: float = 1.0,
        pool_size: int = 10,
        inline: bool = True,
        metrics: Metrics | None = None,
        tracing: bool | None = None,
        waiting_every: float = WAITING_EVERY,
        graceful_shutdown_timeout: float = DEFAULT_GRACEFUL_SHUTDOWN,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be a whole number, 1 or more, not {concurrency!r}")
        if not graceful_shutdown_timeout >= 0:  # (NaN too)
            raise ValueError(
                "graceful_shutdown_timeout must be 0 or more seconds, "
                f"not {graceful_shutdown_timeout!r}"
            )
        self.dsn = dsn
        self.graceful_shutdown_timeout = float(graceful_shutdown_timeout)
        #: The grace its current stop gives the steps in flight (None: none).
        self._grace: float | None = None
        self.metrics = metrics
        self.waiting_every = waiting_every
        self.tracing = tracing_from_env() if tracing is None else tracing
        if self.tracing:
            _install_tracing()
        self.registry = Registry(*members)
        #: The names of the steps it serves (``qwit.serving``, its fetches).
        self.serves = sorted(self.registry.steps)
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
        #: The procrastinate worker id under which it takes step jobs itself.
        self.worker_id: int | None = None
        self._inline: dict[tuple[str, str], tuple[asyncio.Task[None], list[bool], int]] = {}
        #: Ends of step jobs, kept until procrastinate's worker finishes the
        #: job (``_Jobs.finish_job`` records them in that transaction).
        self._ended: dict[int, tuple[str, str, dict[str, Any]]] = {}
        #: Ends of the steps it took, not recorded yet (PostgreSQL was away).
        self._unrecorded: dict[int, tuple[str, str, dict[str, Any]]] = {}
        #: Jobs of the queue whose finish (in ``_ended``) failed: (status, delete).
        self._unfinished: dict[int, tuple[str, bool]] = {}
        #: Jobs held under its id that it no longer ran at the last heartbeat.
        self._orphans: set[int] = set()
        #: Step jobs of steps it does not serve that it put back in the queue
        #: (procrastinate's worker must not finish them).
        self._offered: set[int] = set()
        #: Step jobs of the queue it runs: their task, and whether their flow
        #: stopped them (set when it stops: see ``_stop_aborted``).
        self._queue_runs: dict[int, tuple[asyncio.Task[Any], list[bool]]] = {}
        #: Places of ``concurrency`` held by step jobs fetched from the queue
        #: (from the fetch until the job ends), by job id.
        self._fetched: set[int] = set()
        #: Places held by fetches under way.
        self._fetching = 0
        #: Step jobs of the queue whose run has started here (and not ended:
        #: a step it runs, or one it does not serve that it puts back).
        self._started: set[int] = set()
        #: Jobs fetched whose run had not started at the last heartbeat.
        self._not_started: set[int] = set()
        #: Places its drivers took for steps they wrote in a transaction not
        #: yet committed (``takes``), by driver; given back as they start.
        self._taking: dict[object, int] = {}
        #: Steps waiting out a retry backoff, their places given back, until
        #: they have one again (``_rest``).
        self._resting = 0
        #: Steps whose backoff has ended, waiting for a place, in order: each
        #: takes the next that frees, before any fetch or driver does.
        self._returning: collections.deque[asyncio.Future[None]] = collections.deque()
        #: Whether a fetch or a step was refused for want of a place since
        #: a place last freed (a place that frees then wakes the fetches).
        self._starved = False
        #: Whether a wake waits for the fetch under way to end (procrastinate
        #: clears its wake as each fetch ends).
        self._wake_pending = False
        #: Whether it is stopping (it then reads the stops its flows ask of
        #: its steps itself: procrastinate no longer does).
        self._stopping = False
        #: Whether a forced stop left steps running (plain steps, in threads
        #: that can't be stopped): see ``serve``.
        self.abandoned = False
        #: Steps whose refusal it has logged.
        self._refused = Refusals(MAX_REFUSED_LOGGED)
        self._wakeups: dict[str, asyncio.Event] = {}
        self._drivers: dict[str, Driver] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        #: Its procrastinate worker of the step queue (its shutdown's grace
        #: is set when it stops).
        self._step_worker: procrastinate.worker.Worker | None = None
        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
        self.app.job_manager = _Jobs(self, self.app.connector)
        self.app.task(name=FLOW_TASK, pass_context=True, retry=_FlowJobRetry())(self._flow_job)
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
        version = row["input"].get("version", 1)
        if version > PLAN_VERSION:
            # a client upgraded before the workers: the job waits (see
            # _FlowJobRetry) for a worker that reads its plan
            logger.warning("qwit.postgres: flow %s: %s", flow_id, PlanTooNew(version))
            raise PlanTooNew(version)
        driver = Driver(self, row)
        self._drivers[run_id] = driver
        try:
            await driver.run()
        except Superseded:
            logger.info("flow %s: another driver took run %s", flow_id, run_id)
        finally:
            self.driver_ended(driver)
            # results of steps it ran, handed over but not yet journaled: for
            # the driver that replays the run
            for key, payload, job in driver.handed:
                await self._record(run_id, key, payload, job)
            if self._drivers.get(run_id) is driver:  # (not a driver that took over here)
                del self._drivers[run_id]
                self._wakeups.pop(run_id, None)

    async def _step_job(
        self,
        context: procrastinate.JobContext,
        run_id: str,
        key: str,
        node: dict[str, Any],
        call: dict[str, Any],
        trace: dict[str, str] | None = None,
    ) -> str | None:
        job = context.job
        assert job.id is not None
        step = str(call.get("step"))
        stopped: list[bool] = []
        task = asyncio.current_task()
        self._started.add(job.id)
        try:
            if self.registry.get(step) is None:
                return await self._unserved(job.id, job.attempts, job.worker_id, run_id, key, step)
            if task is not None:
                self._queue_runs[job.id] = (task, stopped)
            await self._step(
                run_id,
                key,
                node,
                call,
                job.id,
                lambda: bool(stopped) or context.abort_reason() == AbortReason.USER_REQUEST,
                trace=trace,
            )
        finally:
            self._queue_runs.pop(job.id, None)
            self._started.discard(job.id)
            self._job_ended(job.id)
        return None

    async def _unserved(
        self, job: int, offers: int, holder: int | None, run_id: str, key: str, step: str
    ) -> str:
        """A step job of a step this worker does not serve: back to the queue,
        where another worker may serve it (workers of different modules, a
        rolling deploy), after a backoff; once it has gone unserved for the
        plan's ``unserved_step_timeout`` since its first refusal (the time a
        serving worker spent on it does not count, nor the time a live worker
        that serves it was busy or starting: see ``UNSERVED``), its end
        instead: the step failed with ``StepNotRegistered`` (the job is
        finished with that record).
        What procrastinate logs of the job: the returned line."""
        delay = unserved_delay(offers)
        async with self.connection() as conn:
            cur = await conn.execute(
                UNSERVED,
                {
                    "flow_id": flow_of_run(run_id),
                    "run_id": run_id,
                    "key": key,
                    "queue": self.step_queue,
                    "step": step,
                    "stalled": self.stalled_after,
                },
            )
            row = await cur.fetchone()
        assert row is not None
        database, waited, attempts, served = str(row[0]), row[2], row[3], bool(row[4])
        # (the plan's own reading: a compact plan leaves out its defaults;
        # None in plans of older QWIT)
        limit = None if row[1] is None else FlowInput.model_validate(row[1]).unserved_step_timeout
        # (a live worker serves the step, busy or just started, and this one
        # took the job first: the clock started again, ``UNSERVED``)
        if limit is not None and waited is not None and (waited < limit or served):
            delay = max(min(delay, limit - waited), 0.0)  # (the last offer comes at the limit)
            self._log_refusal(step)
            self._offered.add(job)
            try:
                await self.release(job, run_id, key, holder, delay)
            except BaseException:
                self._offered.discard(job)
                raise
            return f"step {step!r} is not served here: offered again in {delay:.1f} s"
        reason = (
            f"step {step!r} is not registered on the workers of queue {self.step_queue!r} "
            f"of database {database!r}: start a worker for the module that defines it "
            "(qwit-worker --backend postgres MODULE)"
        )
        if limit is not None and waited is not None:
            reason += f" (no worker served it for {waited:.0f}s)"
        # (a plan of an older QWIT, without unserved_step_timeout: at once.)
        # A step a worker ran before (it is gone) may have done something:
        # a rollback undoes it.
        started = bool(attempts)
        info = error_info(StepNotRegistered(reason), started=started, retryable=False)
        self._ended[job] = (run_id, key, {"error": info.model_dump(mode="json")})
        return f"step {step!r} failed: no worker serves it"

    def _log_refusal(self, step: str) -> None:
        """Log the first refusal of ``step`` as one WARNING line: beside
        workers of other modules it is routine, and a worker whose log nobody
        reads must not fill it."""
        if not self._refused.first(step):
            logger.debug("qwit.postgres: step %r refused again", step)
            return
        logger.warning(
            "qwit.postgres: step %r is not served by this worker: its jobs go back to "
            "queue %r for the other workers of the database",
            step,
            self.step_queue,
        )

    def _busy(self) -> int:
        """Places of ``concurrency`` taken: steps running here (inline or of
        the queue), fetches under way, and places taken by drivers for steps
        they are writing; not those of steps waiting out a retry backoff."""
        return (
            len(self._inline)
            + len(self._fetched)
            + self._fetching
            + sum(self._taking.values())
            - self._resting
        )

    def _place_free(self) -> bool:
        """Whether a place is free; if none is, the next that frees wakes the
        fetches (``_freed``: or goes to a step back from its backoff)."""
        if self._busy() < self.concurrency:
            return True
        self._starved = True
        return False

    def takes(self, step: str, driver: object) -> bool:
        """Whether it takes the job of ``step`` its ``driver`` is writing,
        itself (it serves the step, and has a free place: the place is the
        job's from now, ``run_inline(..., driver)`` runs it, and places
        ``driver`` took but never ran come back as it ends)."""
        if not (
            self.inline
            and not self._stopping
            and self.worker_id is not None
            and self.registry.get(step) is not None
        ):
            return False
        if not self._place_free():
            return False
        self._taking[driver] = self._taking.get(driver, 0) + 1
        return True

    def _give_back(self, driver: object) -> None:
        """The place ``driver`` took for a step that now runs."""
        left = self._taking.get(driver, 0) - 1
        if left > 0:
            self._taking[driver] = left
        else:
            self._taking.pop(driver, None)

    def driver_ended(self, driver: object) -> None:
        """Give back the places ``driver`` took for steps it never ran (its
        transaction failed: the jobs were not written)."""
        if self._taking.pop(driver, None):
            self._freed()

    def _take_fetch(self) -> bool:
        """Take a place for a fetch from the step queue, if one is free."""
        if not self._place_free():
            return False
        self._fetching += 1
        return True

    def _fetch_ended(self, job: int | None) -> None:
        """A fetch ended: its place is ``job``'s (None: nothing fetched)."""
        self._fetching -= 1
        if job is not None:
            self._fetched.add(job)
        else:
            self._freed()
        if self._wake_pending:
            self._wake()

    def _job_ended(self, job: int | None) -> None:
        """A step job of the queue ended (or was put back): its place frees."""
        if job in self._fetched:
            self._fetched.discard(job)
            self._freed()

    def _freed(self) -> None:
        """A place freed: it is the next step's back from its backoff, if one
        waits; else, if a fetch or a step found none free since the last one
        did, wake procrastinate's step worker to fetch (else it would look
        again only at its next poll); once the fetch under way, if any, has
        ended."""
        while self._returning and self._busy() < self.concurrency:
            back = self._returning.popleft()
            if not back.done():  # (not cancelled as it waited)
                self._resting -= 1  # its place again, from now
                back.set_result(None)
        if not self._starved or self._returning:  # (none left to fetch in)
            return
        self._starved = False
        self._wake_pending = True
        if not self._fetching:
            self._wake()

    def _wake(self) -> None:
        self._wake_pending = False
        event = getattr(self._step_worker, "_new_job_event", None)
        if isinstance(event, asyncio.Event):
            # (on the loop's next turn: after procrastinate has cleared it at
            # the end of the fetch that may be returning now)
            asyncio.get_running_loop().call_soon(event.set)

    def holds(self, run_id: str, key: str, job: int | None) -> bool:
        """Whether it runs the step job ``job`` (or keeps its end)."""
        running = self._inline.get((run_id, key))
        return (running is not None and running[2] == job) or (
            job is not None and job in self._unrecorded
        )

    async def _step(
        self,
        run_id: str,
        key: str,
        node: dict[str, Any],
        call: dict[str, Any],
        job: int,
        stopped_by_flow: Callable[[], bool],
        first_attempt: int | None = None,
        trace: dict[str, str] | None = None,
    ) -> None:
        """Run a step job and record how it ended, with the job's end (a
        job of the queue, or one this worker took for its own driver)."""
        payload: dict[str, Any]
        taken = first_attempt is not None
        try:
            step, sent = StepNode.model_validate(node), StepCall.model_validate(call)
            try:
                with continued(trace if self.tracing else None):
                    done = await self._run(
                        run_id,
                        key,
                        step,
                        sent,
                        first_attempt,
                        # (a plain step's thread that ends after the worker
                        # stopped it, as it stops: what it returned is kept)
                        keep_late=lambda: self._stopping and not stopped_by_flow(),
                    )
                payload = {"ok": done.model_dump(mode="json")}
            except StepFailure as failure:
                payload = {"error": failure.info.model_dump(mode="json")}
        except asyncio.CancelledError:
            if not stopped_by_flow():
                raise  # the worker stops: the step runs again elsewhere
            # the flow stopped the step: it has ended, and says so
            payload = {"cancelled": True}
        except Exception as exc:
            if not taken:
                raise  # procrastinate retries the job
            # (PostgreSQL failed under it): back to the queue, or, if PostgreSQL
            # can't be reached, to the heartbeat, which finds it held by nobody
            logger.warning("qwit.postgres: step %s of %s stopped (%s)", key, run_id, exc)
            with contextlib.suppress(psycopg.Error, OSError):
                await self.release(job, run_id, key, self.worker_id)
            return
        if not taken:  # finished, and recorded, by procrastinate's worker
            self._ended[job] = (run_id, key, payload)
            return
        driver = self._drivers.get(run_id)
        if driver is not None and not driver.evicted:
            driver.hand_over(key, payload, job)
            return
        await self._record(run_id, key, payload, job)

    def run_inline(
        self, args: dict[str, Any], attempt: int, job: int, driver: object | None = None
    ) -> None:
        """Run a step job this worker took for one of its drivers, here (in
        the place ``driver`` took for it, if it took one)."""
        if driver is not None:
            self._give_back(driver)
        ident = (args["run_id"], args["key"])
        if ident in self._inline:
            self._freed()
            return
        stopped: list[bool] = []
        task = asyncio.ensure_future(
            self._step(
                args["run_id"],
                args["key"],
                args["node"],
                args["call"],
                job,
                lambda: bool(stopped),
                first_attempt=attempt,
                trace=args.get("trace"),
            )
        )
        self._inline[ident] = (task, stopped, job)

        def ended(_: object) -> None:
            self._inline.pop(ident, None)
            self._freed()

        task.add_done_callback(ended)

    def cancel_inline(self, run_id: str, key: str) -> None:
        """Stop a step this worker runs for a flow that stops it (it records
        that it was cancelled, once it has stopped)."""
        running = self._inline.get((run_id, key))
        if running is not None:
            task, stopped, _ = running
            stopped.append(True)
            task.cancel()

    async def count_attempt(self, conn: psycopg.AsyncConnection[Any], run_id: str, key: str) -> int:
        """The number of the attempt about to start, counted in PostgreSQL
        (in ``conn``'s transaction)."""
        # (and a serving worker has it: the clock of its time unserved stops)
        cur = await conn.execute(
            "WITH served AS (UPDATE qwit.commands SET unserved_since = NULL "
            "WHERE run_id = %(run_id)s AND key = %(key)s AND unserved_since IS NOT NULL) "
            "INSERT INTO qwit.attempts (run_id, key, attempt) VALUES (%(run_id)s, %(key)s, 1) "
            "ON CONFLICT (run_id, key) DO UPDATE SET attempt = qwit.attempts.attempt + 1 "
            "RETURNING attempt",
            {"run_id": run_id, "key": key},
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def _next_attempt(self, run_id: str, key: str) -> int:
        """The number of the attempt about to start."""
        async with self.connection() as conn:
            return await self.count_attempt(conn, run_id, key)

    async def _run(
        self,
        run_id: str,
        key: str,
        node: StepNode,
        call: StepCall,
        first_attempt: int | None = None,
        keep_late: Callable[[], bool] | None = None,
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
                output = await self._attempt(cls, node, call, number, beats, keep_late)
                return StepReturn(output=output, attempt=number)
            except StepFailure as failure:
                info = failure.info
            spent = retry.max_attempts is not None and number >= retry.max_attempts
            if spent or not info.retryable:
                raise StepFailure(info.model_copy(update={"attempt": number}))
            await self._failed_attempt(run_id, key, number, info)
            await self._rest(retry.delay(number))

    async def _rest(self, seconds: float) -> None:
        """Wait out a retry backoff of ``seconds`` with the step's place of
        ``concurrency`` given back (another step may run in it), then wait
        for a place again: the next that frees, before any step not yet
        started here takes it. (The step's job stays this worker's.)"""
        self._resting += 1
        back: asyncio.Future[None] | None = None
        try:
            self._freed()
            await asyncio.sleep(seconds)
            # (those that wait for a place wait because none is free: any
            # that frees goes to them, ``_freed``)
            if self._busy() < self.concurrency:
                self._resting -= 1
                return
            back = asyncio.get_running_loop().create_future()
            self._returning.append(back)
            await back
        except BaseException:
            if back is None or not back.done() or back.cancelled():
                self._resting -= 1  # (its place: until its job ends)
                if back is not None and back in self._returning:
                    self._returning.remove(back)
            raise

    async def _failed_attempt(self, run_id: str, key: str, number: int, info: ErrorInfo) -> None:
        """Keep how attempt ``number`` of a step to be retried failed: what
        ``state()`` shows while the step waits out its backoff, as on
        Temporal. (Only for show: if PostgreSQL can't be reached, the step
        goes on without it.)"""
        try:
            async with self.connection() as conn:
                await conn.execute(
                    "UPDATE qwit.attempts SET failed = %s, error = %s "
                    "WHERE run_id = %s AND key = %s AND attempt = %s",
                    [number, info.model_dump_json(), run_id, key, number],
                )
        except (psycopg.Error, OSError) as exc:
            logger.warning("qwit.postgres: attempt %s of %s not kept (%s)", number, key, exc)

    async def _attempt(
        self,
        cls: Any,
        node: StepNode,
        call: StepCall,
        number: int,
        beats: Heartbeats,
        keep_late: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """One attempt; with a ``heartbeat_timeout``, one that goes that long
        without ``qwit.heartbeat()`` is stopped and fails, to be retried, as
        on Temporal."""
        output = await run_watched_step_method(
            cls,
            call,
            heartbeat_timeout=node.heartbeat_timeout,
            attempt=number,
            engine="postgres",
            heartbeat=beats.beat,
            heartbeat_details=copy.deepcopy(beats.last),
            timeout=node.limit(call.direction),
            grace=node.grace(),
            keep_late=keep_late,
        )
        why = unstorable(output, f"the output of {call.step}.{call.direction}")
        if why is not None:
            # (not retried: the same step would return the same again)
            raise StepFailure(error_info(ArgumentsError(why), attempt=number))
        return output

    async def _record(self, run_id: str, key: str, payload: dict[str, Any], job: int) -> None:
        """Finish a step job this worker took and record its end in its
        flow's inbox, in one transaction, whatever cancel comes meanwhile;
        kept to be recorded later if PostgreSQL can't be reached."""

        async def record() -> None:
            try:
                async with self.connection() as conn, conn.transaction():
                    await conn.execute(
                        FINISH_STEP_JOB.format(columns="", values="", joined=""),
                        {
                            "job": job,
                            "worker": self.worker_id,
                            "run_id": run_id,
                            "key": key,
                            "payload": json.dumps(payload),
                        },
                    )
                    await conn.execute("SELECT pg_notify(%s, %s)", [CHANNEL, run_id])
            except (psycopg.Error, OSError) as exc:
                logger.warning(
                    "qwit.postgres: step %s of %s not recorded yet (%s)", key, run_id, exc
                )
                self._unrecorded[job] = (run_id, key, payload)
            else:
                self._unrecorded.pop(job, None)

        task = asyncio.ensure_future(record())
        while True:
            try:
                await asyncio.shield(task)
                return
            except asyncio.CancelledError:
                if task.done():
                    task.result()
                    return

    async def finish_job(self, job: int, status: str, delete: bool) -> None:
        """Finish a job of the queue as procrastinate's worker does; for a
        step job, record its end in the same transaction. If that fails
        (PostgreSQL away), the end is kept, and the heartbeat finishes the
        job and records it later."""
        run_id, key, payload = self._ended[job]
        try:
            async with self.connection() as conn, conn.transaction():
                cur = await conn.execute(
                    "SELECT 1 FROM procrastinate_jobs WHERE id = %s "
                    "AND status IN ('todo', 'doing') FOR UPDATE",
                    [job],
                )
                if await cur.fetchone() is not None:  # (else: ended by others; nothing to do)
                    await conn.execute(
                        "SELECT procrastinate_finish_job_v1(%s, %s, %s)", [job, status, delete]
                    )
                    await add_event(conn, run_id, key, "step", payload)
        except (psycopg.Error, OSError) as exc:
            logger.warning("qwit.postgres: step job %s not finished yet (%s)", job, exc)
            self._unfinished[job] = (status, delete)
            return
        self._ended.pop(job, None)
        self._unfinished.pop(job, None)

    async def release(
        self, job: int, run_id: str, key: str, holder: int | None, delay: float = 0.0
    ) -> None:
        """Put a step job back in the queue (its run here stopped without
        an end, or this worker does not serve its step, or its worker died),
        to be taken again in ``delay`` seconds, or, if its flow asked it to
        stop, end it as stopped: one transaction, so that a stop asked
        meanwhile is never lost (for procrastinate, a job asked to stop and
        retried has failed). Only while the procrastinate worker ``holder``
        (None: no live one) still holds it: once another has taken it, its
        run there is the step's."""
        async with self.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT abort_requested FROM procrastinate_jobs WHERE id = %s AND status = 'doing' "
                "AND worker_id IS NOT DISTINCT FROM %s FOR UPDATE",
                [job, holder],
            )
            row = await cur.fetchone()
            if row is None:
                return  # not running any more (ended, or put back already), or not there
            if row[0]:
                await conn.execute(
                    "SELECT procrastinate_finish_job_v1(%s, 'aborted', false)", [job]
                )
                await add_event(conn, run_id, key, "step", {"cancelled": True})
            else:
                await conn.execute(
                    "SELECT procrastinate_retry_job_v2(%s, clock_timestamp() + "
                    "make_interval(secs => %s), NULL, NULL, NULL)",
                    [job, delay],
                )

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

    async def _count_waiting(self) -> None:
        """Keep ``qwit_flows_waiting`` (flows and sub-flows waiting for an
        operator) in its metrics."""
        assert self.metrics is not None
        while True:
            try:
                async with self.connection() as conn:
                    cur = await conn.execute(
                        "SELECT count(*) FROM qwit.flows WHERE status = 'waiting' AND NOT ended"
                    )
                    row = await cur.fetchone()
                self.metrics.record("qwit_flows_waiting", row[0] if row else 0)
            except (psycopg.Error, OSError) as exc:
                logger.warning("qwit.postgres: can't count the waiting flows (%s)", exc)
            await asyncio.sleep(self.waiting_every)

    async def _register(self) -> None:
        """Take a procrastinate worker id for the step jobs it takes itself,
        and record the steps it serves under it (``qwit.serving``: they go
        with the id, when it stops or is taken for dead)."""
        async with self.connection() as conn, conn.transaction():
            cur = await conn.execute("SELECT worker_id FROM procrastinate_register_worker_v1()")
            row = await cur.fetchone()
            assert row is not None
            worker_id = int(row[0])
            if not self._stopping:  # (taken for dead as it stops: it serves no more)
                await conn.execute(
                    SERVING,
                    {
                        "worker_id": worker_id,
                        "queue": self.step_queue,
                        "steps": self.serves,
                    },
                )
        self.worker_id = worker_id

    async def _beat(self) -> None:
        """Heartbeat its worker id; take a new one if it was taken for dead
        (its step jobs went back to the queue; whoever runs them records
        them); record the ends it kept while PostgreSQL was away."""
        # (and that of its procrastinate worker of the step queue, which
        # stops its own heartbeats while its jobs finish as it stops)
        self._free_unstarted()
        step_worker = None if self._step_worker is None else self._step_worker.worker_id
        async with self.connection() as conn:
            cur = await conn.execute(
                "UPDATE procrastinate_workers SET last_heartbeat = now() "
                "WHERE id = ANY(%s) RETURNING id",
                [[self.worker_id, *([step_worker] if step_worker is not None else [])]],
            )
            beaten = {row[0] for row in await cur.fetchall()}
        if self.worker_id not in beaten:
            # its step jobs went back to the queue: their runs here stop
            # (unrecorded: whoever runs them now records them)
            logger.warning("qwit.postgres: worker %s was taken for dead", self.worker_id)
            for task, _, _ in list(self._inline.values()):
                task.cancel()
            await self._register()
        if self._stopping:
            await self._stop_aborted()
        elif self.serves:
            async with self.connection() as conn:
                await conn.execute(STILL_SERVED, {"queue": self.step_queue, "steps": self.serves})
        for job, (run_id, key, payload) in list(self._unrecorded.items()):
            await self._record(run_id, key, payload, job)
        for job, (status, delete) in list(self._unfinished.items()):
            await self.finish_job(job, status, delete)
        await self._release_orphans()

    def _free_unstarted(self) -> None:
        """Free the places of jobs fetched whose run has not started at two
        heartbeats in a row (a run starts as its job is fetched; one
        cancelled before its first step, as procrastinate's worker stops,
        neither runs nor ends: procrastinate's sweep runs the job again)."""
        not_started = self._fetched - self._started
        for job in not_started & self._not_started:
            logger.warning("qwit.postgres: step job %s fetched but never run here", job)
            self._job_ended(job)
        self._not_started = not_started - self._not_started

    async def _stop_aborted(self) -> None:
        """Stop the steps it runs whose flow asked them to stop (a cancel),
        as their drivers and procrastinate do while it serves: once it is
        stopping, they no longer do (its drivers let go of their flows, and
        procrastinate stops reading such asks as soon as it stops)."""
        inline = {job: ident for ident, (_, _, job) in self._inline.items()}
        jobs = [*inline, *self._queue_runs]
        if not jobs:
            return
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT id FROM procrastinate_jobs WHERE id = ANY(%s) AND abort_requested",
                [jobs],
            )
            asked = [int(row[0]) for row in await cur.fetchall()]
        for job in asked:
            if job in inline:
                self.cancel_inline(*inline[job])
            elif job in self._queue_runs:
                task, stopped = self._queue_runs[job]
                if not stopped:
                    stopped.append(True)
                    task.cancel()

    async def _release_orphans(self) -> None:
        """Release the step jobs held under its id that it has run nothing
        of, and kept no end of, at two heartbeats in a row (one whose
        start was lost with an unknown commit, or whose run stopped with
        PostgreSQL away)."""
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT id, args->>'run_id', args->>'key' FROM procrastinate_jobs "
                "WHERE worker_id = %s AND status = 'doing' AND task_name = %s",
                [self.worker_id, STEP_TASK],
            )
            held = {int(job): (run_id, key) for job, run_id, key in await cur.fetchall()}
        running = {job for _, _, job in self._inline.values()} | set(self._unrecorded)
        orphans = set(held) - running
        for job in orphans & self._orphans:
            logger.warning("qwit.postgres: step job %s held by nobody here; released", job)
            await self.release(job, *held[job], self.worker_id)
        self._orphans = orphans - self._orphans

    async def _sweep(self) -> None:
        """Run again the jobs of workers that stopped heartbeating (a step
        job that its flow asked to stop ends as stopped: its worker is
        gone, and the step with it; see ``release``)."""
        while True:
            await asyncio.sleep(max(self.heartbeat, 0.2))
            try:
                await self._beat()
                manager = self.app.job_manager
                await manager.prune_stalled_workers(self.stalled_after)
                for queue in (self.flow_queue, self.step_queue):
                    for job in await manager.get_stalled_jobs(
                        queue=queue, seconds_since_heartbeat=self.stalled_after
                    ):
                        await manager.retry_job(job)  # (a step job: ``release``)
            except Exception as exc:
                logger.warning("qwit.postgres: sweep failed (%s)", exc)

    async def _keep(self, steps: bool, **options: Any) -> None:
        """Run a procrastinate worker (of the step queue if ``steps``); start
        a new one if it stops (PostgreSQL went away): the old one's jobs are
        then those of a dead worker, run again once it is taken for dead."""
        while True:
            worker = procrastinate.worker.Worker(
                app=self.app, **{**self.app.worker_defaults, **options}
            )
            if steps:
                self._step_worker = worker
            try:
                await worker.run()  # type: ignore[no-untyped-call]
            except (psycopg.Error, OSError, procrastinate.exceptions.ProcrastinateException) as exc:
                logger.warning("qwit.postgres: a worker stopped (%s); a new one in 1 s", exc)
            await asyncio.sleep(1.0)

    async def run(self) -> None:
        """Serve until cancelled."""
        self._stopping = self.abandoned = False
        self._pool = Connections(self.dsn, self.pool_size)
        try:
            await self._prepared()
            await self._register()
        except BaseException:
            await self._pool.close()
            raise
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
            drive = asyncio.ensure_future(
                self._keep(False, queues=[self.flow_queue], concurrency=self.flows, **common)
            )
            # (procrastinate's own bound counts the jobs it holds, those
            # waiting out a retry backoff too: twice the places, so that as
            # many jobs may rest as run; QWIT's places bound what runs)
            work = asyncio.ensure_future(
                self._keep(
                    True, queues=[self.step_queue], concurrency=2 * self.concurrency, **common
                )
            )
            sweep = asyncio.ensure_future(self._sweep())
            tasks = [
                asyncio.ensure_future(self._listen()),
                *([asyncio.ensure_future(self._count_waiting())] if self.metrics else []),
                drive,
                work,
            ]
            try:
                # (not gather: cancelled, it would cancel them all, and the
                # steps in flight would get no grace)
                done, _ = await asyncio.wait([sweep, *tasks], return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()
            finally:
                self._stopping = True
                # it takes no new job: a step only it served is unserved now
                with contextlib.suppress(psycopg.Error, OSError):
                    async with self.connection() as conn:
                        await conn.execute(NOT_SERVING, [self.worker_id])
                stopped: set[asyncio.Future[None]] = set()
                if self._grace:
                    with contextlib.suppress(BaseException):  # (cancelled again: at once)
                        await self._drain(drive, work, self._grace, stopped)
                for task in tasks:
                    if task not in stopped:
                        task.cancel()  # (once: procrastinate's worker then stops its jobs)
                # The steps still running are stopped, and waited for: a plain
                # step's thread can't be stopped, and ends when it ends. Its
                # heartbeats go on meanwhile (``sweep``), so that no other
                # worker takes its job for one of a dead worker and runs the
                # step beside it.
                for task in tasks:
                    with contextlib.suppress(BaseException):
                        await task
                for task, _, _ in list(self._inline.values()):
                    task.cancel()  # not stopped by its flow: nothing recorded
                for task, _, _ in list(self._inline.values()):
                    with contextlib.suppress(BaseException):
                        await task
                sweep.cancel()
                with contextlib.suppress(BaseException):
                    await sweep
                # its step jobs go back to the queue at once, for other workers
                with contextlib.suppress(psycopg.Error, OSError):
                    async with self.connection() as conn:
                        await conn.execute(
                            "SELECT procrastinate_unregister_worker_v1(%s)", [self.worker_id]
                        )
                if self._pool is not None:
                    await self._pool.close()  # (kept: a late caller gets an error)

    async def _drain(
        self,
        drive: asyncio.Future[None],
        work: asyncio.Future[None],
        grace: float,
        stopped: set[asyncio.Future[None]],
    ) -> None:
        """Stop gracefully: let go of the flows it drives (other workers
        replay them), take no new job, and give the steps in flight ``grace``
        seconds to finish and record their ends; heartbeats go on meanwhile,
        so that nobody takes its steps for those of a dead worker."""
        drive.cancel()
        stopped.add(drive)
        await asyncio.wait([drive], timeout=ABORT_WAIT)
        if self._step_worker is not None:
            self._step_worker.shutdown_graceful_timeout = grace
        work.cancel()
        stopped.add(work)
        inline = [task for task, _, _ in self._inline.values()]
        running = len(inline) + len(self._queue_runs)
        if running:
            logger.info(
                "qwit.postgres: stopping; %d step(s) in flight get up to %g s to finish",
                running,
                grace,
            )
        await asyncio.wait([work, *inline], timeout=grace)
        # (then ``run`` stops what still runs: its jobs go back to the queue)

    async def serve(self) -> None:
        """Run until SIGINT or SIGTERM, then stop: steps in flight get
        ``graceful_shutdown_timeout`` seconds to finish (a second signal
        stops at once); the drivers it held are replayed by other workers;
        the step jobs still running go back to the queue."""
        with stop_on_signals() as stop:
            running = asyncio.ensure_future(self.run())
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not running.done():
                    stop.clear()
                    stopping = asyncio.ensure_future(stop.wait())
                    self._grace = self.graceful_shutdown_timeout
                    running.cancel()
                    await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (running, stopping):
                    task.cancel()
                # (at once: only what stops quickly is waited for)
                await asyncio.wait({running, stopping}, timeout=FORCED_WAIT)
                self._grace = None
        if not running.done():
            # plain steps still run in threads, which nothing can stop; the
            # worker heartbeats for them until they end (their jobs stay its
            # own), unless the process exits: then they run again elsewhere,
            # as those of a worker that died (``qwit-worker`` exits)
            self.abandoned = True
            logger.warning(
                "qwit.postgres: stopped at once; %d step(s) still run in threads",
                len(self._inline) + len(self._queue_runs),
            )
            return
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
        self._grace = self.graceful_shutdown_timeout
        # (a worker that stopped serving on its own, by an error, says so
        # as its block ends, rather than hide why its flows did not move)
        failed = [
            error
            for task in self._tasks
            if task.done() and not task.cancelled() and (error := task.exception()) is not None
        ]
        try:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(BaseException):
                    await task
        finally:
            self._grace = None
        if failed and kind is None:
            raise failed[0]
        for error in failed:  # (the block's own error goes on)
            logger.error("qwit.postgres: the worker had stopped serving", exc_info=error)


def _install_tracing() -> None:
    """Install a tracer provider (``qwit._tracing.tracer_provider``) unless
    the process has one: any provider does, a driver emits no span while it
    replays."""
    require_opentelemetry()
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        tracer_provider()


class _Jobs(procrastinate.manager.JobManager):
    """procrastinate's job manager, whose finish of a step job records the
    step's end in the same transaction (``PostgresWorker.finish_job``)."""

    def __init__(self, worker: PostgresWorker, connector: Any) -> None:
        super().__init__(connector)
        self.worker = worker

    async def fetch_job(self, queues: Any, worker_id: int) -> procrastinate.jobs.Job | None:
        # (the step jobs of steps it does not serve are left to a live worker
        # that does: ``FETCH_SERVED``)
        if queues is None or self.worker.step_queue not in queues:
            return await super().fetch_job(queues, worker_id)
        # (none while every place of its ``concurrency`` is taken: a place
        # that frees wakes procrastinate's worker to fetch again)
        if not self.worker._take_fetch():
            return None
        job: procrastinate.jobs.Job | None = None
        try:
            row = await self.connector.execute_query_one_async(
                query=FETCH_SERVED,
                queues=list(queues),
                worker_id=worker_id,
                task=STEP_TASK,
                steps=self.worker.serves,
                stalled=self.worker.stalled_after,
            )
            if row is not None and row.get("id") is not None:
                job = procrastinate.jobs.Job.from_row(row)
        finally:
            self.worker._fetch_ended(None if job is None else job.id)
        return job

    async def finish_job(
        self, job: procrastinate.jobs.Job, status: procrastinate.jobs.Status, delete_job: bool
    ) -> None:
        self.worker._job_ended(job.id)  # (if it never ran: its place frees)
        if job.id is not None and job.id in self.worker._offered:
            self.worker._offered.discard(job.id)  # back in the queue already
            return
        if job.id is None or job.id not in self.worker._ended:
            await super().finish_job(job, status, delete_job)
            return
        await self.worker.finish_job(job.id, status.value, delete_job)

    async def retry_job(
        self,
        job: procrastinate.jobs.Job,
        retry_at: Any = None,
        priority: int | None = None,
        queue: str | None = None,
        lock: str | None = None,
    ) -> None:
        # A step job cut off (its worker stopped, or died: the sweep) goes
        # back to the queue, unless its flow had asked it to stop: then it
        # ends as stopped (procrastinate would fail it, and the flow would
        # wait for its end forever).
        if job.task_name == STEP_TASK and job.id is not None:
            if job.id not in self.worker._started:  # (its sweep of itself: still running)
                self.worker._job_ended(job.id)
            args = job.task_kwargs
            await self.worker.release(job.id, str(args["run_id"]), str(args["key"]), job.worker_id)
            return
        await super().retry_job(job, retry_at, priority, queue, lock)


__all__ = [
    "FLOW_QUEUE",
    "HEARTBEAT_ENV",
    "STALLED_AFTER_ENV",
    "STEP_QUEUE",
    "PostgresWorker",
    "prepare",
    "worker_options_from_env",
]
