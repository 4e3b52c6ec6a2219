"""What is the PostgreSQL engine's own: its schema and migrations, its
fenced drivers, a worker or a database that stops mid-flow, and one client
running flows of two engines. (The shared suites run on it as well: see the
``postgres`` cases of tests/test_conformance.py and the tests using its ``env``.)"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import sys
import time
import types
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import procrastinate.worker
import psycopg
import pytest

import qwit
from qwit.postgres import (
    SCHEMA_VERSION,
    PostgresSettings,
    PostgresWorker,
    SchemaTooNew,
    prepare,
)
from qwit.postgres._driver import Driver, Superseded
from qwit.postgres._store import fetch_flow
from tests import ledger
from tests.ledger import Effect


def new_ledger() -> str:
    return uuid.uuid4().hex


class PgA(Effect, name="pg.A"):
    pass


class PgB(Effect, name="pg.B"):
    pass


#: Ledgers whose PgGate waits for the test to open its gate.
GATES: dict[str, asyncio.Event] = {}


class PgGate(Effect, name="pg.Gate"):
    """Applies its effect once the test opens the gate of its ledger."""

    retry = qwit.Retry(max_attempts=3, initial_interval=0.1, max_interval=0.1)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:
        ledger.record(args["ledger"], "started", "pg.Gate")
        await GATES[args["ledger"]].wait()
        return await super().step_forward(args)


class PgOrder(qwit.Flow, name="pg.order", backend=qwit.postgres):
    def build_flow(self) -> None:
        self.step(PgA)
        self.step(PgGate)
        self.step(PgB)


class PgInner(qwit.Flow, name="pg.inner", backend=qwit.postgres):
    def build_flow(self) -> None:
        self.step(PgA, {"eid": "inner"})


class PgOuter(qwit.Flow, name="pg.outer", backend=qwit.postgres):
    def build_flow(self) -> None:
        self.step(PgInner)
        self.step(PgB)


class TemporalOrder(qwit.Flow, name="pg.on_temporal"):
    def build_flow(self) -> None:
        self.step(PgA, {"eid": "temporal"})


async def flow_row(dsn: str, flow_id: str) -> dict[str, Any]:
    """The flow's row in ``qwit.flows``."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        row = await fetch_flow(conn, flow_id)
    assert row is not None
    return row


def worker(dsn: str, *members: Any, **options: Any) -> PostgresWorker:
    """A worker that beats fast; leaving its block stops it at once (steps in
    flight cut off, as by a crash) unless ``graceful_shutdown_timeout`` says."""
    options.setdefault("graceful_shutdown_timeout", 0)
    return PostgresWorker(
        dsn, *members, heartbeat=0.5, stalled_after=2, poll_interval=0.2, **options
    )


async def client_for(dsn: str) -> qwit.Client:
    return await qwit.connect(backend=qwit.postgres, settings=[PostgresSettings(dsn)])


# -- schema ----------------------------------------------------------------------


async def test_migrations_are_idempotent_and_recorded(postgres_dsn: str):
    await asyncio.gather(prepare(postgres_dsn), prepare(postgres_dsn))
    await prepare(postgres_dsn)
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        cur = await conn.execute("SELECT version FROM qwit.schema_version ORDER BY version")
        assert [row[0] for row in await cur.fetchall()] == list(range(1, SCHEMA_VERSION + 1))
        cur = await conn.execute("SELECT to_regclass('qwit.serving') IS NOT NULL")
        assert (await cur.fetchone()) == (True,)
        cur = await conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")
        assert (await cur.fetchone()) == (True,)


async def test_a_database_of_an_earlier_schema_is_upgraded(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
):
    from qwit.postgres import _store

    monkeypatch.setattr(_store, "SCHEMA_VERSION", 1)  # (a QWIT of schema 1: no additions)
    monkeypatch.setattr(_store, "ADDITIONS", {})
    await prepare(postgres_dsn)
    monkeypatch.undo()
    await prepare(postgres_dsn)
    rows = await sql(postgres_dsn, "SELECT version FROM qwit.schema_version ORDER BY version")
    assert [row[0] for row in rows] == [1, 2, 3, 4]
    # (a table an earlier QWIT ignores, made without a version of its own)
    assert await sql(postgres_dsn, "SELECT to_regclass('qwit.serving') IS NOT NULL") == [(True,)]
    assert await sql(
        postgres_dsn,
        "SELECT 1 FROM information_schema.columns WHERE table_schema = 'qwit' "
        "AND table_name = 'flows' AND column_name = 'trace'",
    ) == [(1,)]
    assert await sql(postgres_dsn, "SELECT to_regclass('qwit.runs') IS NOT NULL") == [(True,)]
    assert await sql(
        postgres_dsn,
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'qwit' "
        "AND table_name = 'attempts' AND column_name IN ('failed', 'error') ORDER BY 1",
    ) == [("error",), ("failed",)]


class PgBacksOff(qwit.Flow, name="pg.backs_off", backend=qwit.postgres):
    def build_flow(self) -> None:
        from tests.test_conformance import Backs3

        self.step(Backs3)


async def test_a_client_reads_a_database_its_workers_have_not_migrated_yet(postgres_dsn: str):
    # A client upgraded before the workers reads a database of schema 3:
    # the attempts of a step being retried, counted as they start (its
    # ended attempts and last error are kept from schema 4 on).
    await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    engine = client.engine(qwit.postgres)
    run = new_ledger()
    async with worker(postgres_dsn, PgBacksOff):
        handle = await client.start(PgBacksOff, {"run": run})
        assert engine.schema == 4  # type: ignore[attr-defined]
        engine.schema = 3  # type: ignore[attr-defined]
        seen = set()
        while not (state := await handle.state()).done:
            seen.add(state.steps[0].attempts)
            await asyncio.sleep(0.05)
    assert state.status == "completed"
    assert 1 in seen  # (once attempt 2 has started)
    await client.close()


async def test_a_schema_newer_than_this_qwit_is_refused(postgres_dsn: str):
    await prepare(postgres_dsn)
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await conn.execute("INSERT INTO qwit.schema_version (version) VALUES (%s)", [99])
    with pytest.raises(SchemaTooNew, match="version 99"):
        await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    with pytest.raises(SchemaTooNew, match="version 99"):
        await client.start(PgOuter, {"ledger": new_ledger()})
    await client.close()


async def test_a_client_needs_a_dsn(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("QWIT_POSTGRES_DSN", raising=False)
    client = await qwit.connect(backend=qwit.postgres)
    # (the engine can't be reached: not a fault of the flow's args)
    with pytest.raises(qwit.EngineUnavailable, match="set QWIT_POSTGRES_DSN"):
        await client.start(PgOuter, {"ledger": new_ledger()})


# -- flow ids --------------------------------------------------------------------------

#: The idempotency keys each ledger's PgKeyed ran under.
KEYS: dict[str, list[str]] = {}


class PgKeyed(Effect, name="pg.Keyed"):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:
        KEYS.setdefault(args["ledger"], []).append(qwit.context().idempotency_key)
        return await super().step_forward(args)


class PgReused(qwit.Flow, name="pg.reused", backend=qwit.postgres):
    def build_flow(self) -> None:
        self.step(PgKeyed)
        self.step(PgGate)


async def test_a_flow_may_take_an_ended_flows_id_as_a_new_execution(postgres_dsn: str):
    # Before, a start with the id of an ended flow was refused ("a flow with
    # id ... exists"), where Temporal and qwit.local start a new execution.
    await prepare(postgres_dsn)
    client, other = await client_for(postgres_dsn), await client_for(postgres_dsn)
    flow_id = f"reused-{new_ledger()}"
    first_run, runs = new_ledger(), [new_ledger(), new_ledger()]
    for run in (first_run, *runs):
        GATES[run] = asyncio.Event()
    async with worker(postgres_dsn, PgReused):
        first = await client.start(PgReused, {"ledger": first_run}, id=flow_id)
        await ledger.wait_for_mark(first_run, "started", "pg.Gate")
        with pytest.raises(qwit.ArgumentsError, match="is already running"):
            await client.start(PgReused, {"ledger": runs[0]}, id=flow_id)
        await first.cancel()
        with pytest.raises(qwit.FlowCancelled):
            await asyncio.wait_for(first.result(), 30)
        # two clients start the ended id at once: one starts a new execution
        started = await asyncio.gather(
            client.start(PgReused, {"ledger": runs[0]}, id=flow_id),
            other.start(PgReused, {"ledger": runs[1]}, id=flow_id),
            return_exceptions=True,
        )
        refused = [s for s in started if isinstance(s, BaseException)]
        assert len(refused) == 1 and "is already running" in str(refused[0]), started
        (second,) = [s for s in started if isinstance(s, qwit.FlowHandle)]
        won = runs[0] if started[0] is second else runs[1]
        for run in runs:
            GATES[run].set()
        result = await asyncio.wait_for(second.result(), 30)
        state = await second.state()
        latest = await client.get_handle(flow_id).result()
        # the first run's handle keeps to its run, as on Temporal
        with pytest.raises(qwit.FlowCancelled):
            await first.result()
        old_state = await first.state()
        with pytest.raises(qwit.ReactionError, match="already ended"):
            await first.cancel()
        # what a redrive reads is the new run's (completed), not the first's
        with pytest.raises(qwit.ReactionError, match="completed"):
            await client.redrive(flow_id)
    assert result["ledger"] == won and latest == result
    assert state.status == "completed"
    assert [(s.status, s.attempts) for s in state.steps] == [("done", 1), ("done", 1)]
    assert old_state.status == "cancelled" and old_state.args["ledger"] == first_run
    assert ledger.entries(first_run) == [
        ("do", "pg.Keyed"),
        ("started", "pg.Gate"),
        ("undo", "pg.Keyed"),
    ]
    assert ledger.applied(won) == ["pg.Keyed", "pg.Gate"]
    assert ledger.entries(runs[1] if won == runs[0] else runs[0]) == []
    # fresh keys: the new execution's are not the first's
    (old_key,), (new_key,) = KEYS[first_run], KEYS[won]
    assert old_key != new_key and old_key.split("/")[0] != new_key.split("/")[0]
    await client.close()
    await other.close()


# -- two engines, one client --------------------------------------------------------


async def test_one_client_runs_flows_of_two_engines(
    postgres_dsn: str, temporal_client: Any, task_queue: str
):
    from qwit.temporal import create_worker

    await prepare(postgres_dsn)
    client = await qwit.connect(
        temporal_client=temporal_client,
        task_queue=task_queue,
        settings=[PostgresSettings(postgres_dsn)],
    )
    run = new_ledger()
    async with (
        worker(postgres_dsn, PgOuter),
        create_worker(temporal_client, TemporalOrder, task_queue=task_queue),
    ):
        on_postgres = await client.start(PgOuter, {"ledger": run})
        on_temporal = await client.start(TemporalOrder, {"ledger": run})
        assert (on_postgres.engine, on_temporal.engine) == ("postgres", "temporal")
        results = await asyncio.wait_for(
            asyncio.gather(on_postgres.result(), on_temporal.result()), 60
        )
    assert results[0]["out_inner"] == "-"
    assert results[1]["out_temporal"] == "-"
    assert sorted(ledger.applied(run)) == ["inner", "pg.B", "temporal"]
    await client.close()


# -- crashes -------------------------------------------------------------------------


async def test_a_flow_goes_on_after_its_worker_stops_and_postgres_restarts(
    postgres_server: Any, postgres_dsn: str
):
    """The worker stops while a step runs; PostgreSQL is killed and started
    again; a new worker replays the flow from its journal and finishes it:
    each effect once."""
    await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    run = new_ledger()
    GATES[run] = asyncio.Event()
    first = worker(postgres_dsn, PgOrder)
    async with first:
        handle = await client.start(PgOrder, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "pg.Gate")
    # the worker is gone; its step was cut off before its effect. (A checkpoint
    # first: the session's server has made a database per test, whose WAL a
    # crash recovery would otherwise replay, minutes of it on a busy machine.)
    await sql(postgres_server.dsn, "CHECKPOINT")
    await asyncio.to_thread(postgres_server.stop, signal.SIGKILL)
    await asyncio.to_thread(postgres_server.start)
    GATES[run].set()
    async with worker(postgres_dsn, PgOrder):
        result = await asyncio.wait_for(handle.result(), 60)
        state = await handle.state()
    assert result["out_pg.B"] == "-"
    assert ledger.applied(run) == ["pg.A", "pg.Gate", "pg.B"]
    assert ledger.undone(run) == []
    assert [s.status for s in state.steps] == ["done"] * 3
    # the cut attempt counts: the step ran twice, as attempts 1 and 2
    assert state.steps[1].attempts == 2
    await client.close()


async def test_a_driver_taken_for_dead_writes_nothing(postgres_dsn: str):
    """Two drivers on one run (the first was taken for dead, but runs): the
    second fences the first off; the flow ends once, each effect once."""
    await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    run = new_ledger()
    GATES[run] = asyncio.Event()
    async with worker(postgres_dsn, PgOrder) as serving:
        handle = await client.start(PgOrder, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "pg.Gate")
        row = await flow_row(postgres_dsn, handle.id)
        second = Driver(serving, row)
        taking_over = asyncio.ensure_future(second.run())
        await asyncio.sleep(0.5)  # it has replayed, and holds the run
        GATES[run].set()
        result = await asyncio.wait_for(handle.result(), 60)
        await asyncio.wait_for(taking_over, 10)
        async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
            cur = await conn.execute(
                "SELECT count(*), count(DISTINCT delivered), max(delivered) FROM qwit.events "
                "WHERE run_id = %s",
                [row["run_id"]],
            )
            counts = await cur.fetchone()
    assert result["out_pg.B"] == "-"
    assert ledger.applied(run) == ["pg.A", "pg.Gate", "pg.B"]
    # every row of the journal numbered once, by one driver, without gaps
    assert counts is not None and counts[0] == counts[1] == counts[2]
    await client.close()


async def test_a_superseded_driver_refuses_to_write(postgres_dsn: str):
    await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    run = new_ledger()
    GATES[run] = asyncio.Event()
    async with worker(postgres_dsn, PgOrder) as serving:
        handle = await client.start(PgOrder, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "pg.Gate")
        row = await flow_row(postgres_dsn, handle.id)
        stale = Driver(serving, row)
        stale.epoch = 0  # a number an older driver held
        with pytest.raises(Superseded):
            await stale._flush()
        GATES[run].set()
        await asyncio.wait_for(handle.result(), 60)
    await client.close()


class PgSilent(Effect, name="pg.Silent"):
    """Its first attempt goes quiet (no heartbeat); the next one heartbeats."""

    heartbeat_timeout = 0.5
    retry = qwit.Retry(max_attempts=2, initial_interval=0.1, max_interval=0.1)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:
        ledger.record(args["ledger"], "attempt", str(qwit.context().attempt))
        if qwit.context().attempt == 1:
            await asyncio.sleep(30)  # hangs without a heartbeat
        for _ in range(4):
            qwit.heartbeat({"done": _})
            await asyncio.sleep(0.2)  # 0.8 s in all: over the limit, but heartbeating
        return await super().step_forward(args)


class PgSilentFlow(qwit.Flow, name="pg.silent", backend=qwit.postgres):
    def build_flow(self) -> None:
        self.step(PgSilent)


async def test_a_step_without_heartbeats_past_its_heartbeat_timeout_is_retried(
    postgres_dsn: str,
):
    await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    run = new_ledger()
    async with worker(postgres_dsn, PgSilentFlow):
        handle = await client.start(PgSilentFlow, {"ledger": run})
        result = await asyncio.wait_for(handle.result(), 30)
        state = await handle.state()
    assert result["out_pg.Silent"] == "-"
    assert ledger.marks(run, "attempt") == ["1", "2"]
    assert ledger.applied(run) == ["pg.Silent"]
    assert state.steps[0].attempts == 2
    await client.close()


# -- step jobs: a step's record and its job's end are one ---------------------


async def gate_job(dsn: str, run_id: str) -> tuple[int, str]:
    """The id of the job of ``pg.Gate``'s call in ``run_id`` (once written),
    and the call's key."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(200):
            cur = await conn.execute(
                "SELECT c.job_id, c.key FROM qwit.commands c JOIN procrastinate_jobs j "
                "ON j.id = c.job_id WHERE c.run_id = %s AND j.args->'call'->>'step' = 'pg.Gate'",
                [run_id],
            )
            row = await cur.fetchone()
            if row is not None:
                return int(row[0]), str(row[1])
            await asyncio.sleep(0.05)
    raise AssertionError("no job for pg.Gate")


async def sql(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, list(params))
        return await cur.fetchall() if cur.description else []


async def recorded(dsn: str, run_id: str, key: str) -> list[Any]:
    """The recorded ends of the call ``key`` in ``run_id``."""
    rows = await sql(
        dsn, "SELECT payload FROM qwit.events WHERE run_id = %s AND key = %s", run_id, key
    )
    return [row[0] for row in rows]


@pytest.mark.parametrize("inline", [True, False], ids=["taken", "queued"])
async def test_every_step_is_a_job_finished_with_its_record(postgres_dsn: str, inline: bool):
    """Each step call is a procrastinate job; once its end is recorded, its
    job is finished (deleted, as procrastinate does with succeeded jobs)."""
    await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    run = new_ledger()
    async with PostgresWorker(postgres_dsn, PgOuter, inline=inline, poll_interval=0.2):
        handle = await client.start(PgOuter, {"ledger": run})
        await asyncio.wait_for(handle.result(), 30)
    rows = await sql(
        postgres_dsn,
        "SELECT c.job_id, e.kind, j.id FROM qwit.commands c "
        "JOIN qwit.flows f ON f.run_id = c.run_id "
        "LEFT JOIN qwit.events e ON e.run_id = c.run_id AND e.key = c.key "
        "LEFT JOIN procrastinate_jobs j ON j.id = c.job_id "
        "WHERE f.root_id = %s AND c.key LIKE 'step:%%'",
        handle.id,
    )
    assert len(rows) == 2, rows  # pg.A in the sub-flow, pg.B in the outer flow
    for job, kind, left in rows:
        assert job is not None  # a job
        assert kind == "step"  # its end recorded
        assert left is None  # and the job finished
    await client.close()


@dataclass
class HeldElsewhere:
    """A PgOrder whose pg.Gate started on this test's worker, and whose job
    was then given to another worker (``other``, registered for it)."""

    client: qwit.Client
    run: str
    handle: qwit.FlowHandle
    run_id: str
    job: int
    key: str
    other: int


@contextlib.asynccontextmanager
async def gate_held_elsewhere(
    dsn: str, serving: PostgresWorker | None = None
) -> AsyncIterator[HeldElsewhere]:
    await prepare(dsn)
    client = await client_for(dsn)
    run = new_ledger()
    GATES[run] = asyncio.Event()
    async with serving or worker(dsn, PgOrder):
        handle = await client.start(PgOrder, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "pg.Gate")
        row = await flow_row(dsn, handle.id)
        job, key = await gate_job(dsn, row["run_id"])
        [(other,)] = await sql(dsn, "SELECT * FROM procrastinate_register_worker_v1()")
        await sql(dsn, "UPDATE procrastinate_jobs SET worker_id = %s WHERE id = %s", other, job)
        yield HeldElsewhere(client, run, handle, row["run_id"], job, key, other)
    await client.close()


async def take_for_dead(dsn: str, worker_id: int) -> None:
    """Age a worker's heartbeat: sweeps take it for dead."""
    await sql(
        dsn,
        "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour' WHERE id = %s",
        worker_id,
    )


async def test_a_step_job_taken_from_its_worker_records_nothing_from_it(postgres_dsn: str):
    """A worker whose step job was given to another (it was taken for dead)
    records nothing when its run of the step ends: whoever holds the job
    records it, once."""
    async with gate_held_elsewhere(postgres_dsn) as held:
        GATES[held.run].set()  # this worker's run of the step ends
        await ledger.wait_for_mark(held.run, "do", "pg.Gate")
        await asyncio.sleep(1.0)
        assert await recorded(postgres_dsn, held.run_id, held.key) == []
        assert await sql(
            postgres_dsn, "SELECT status FROM procrastinate_jobs WHERE id = %s", held.job
        ) == [("doing",)]
        # the other worker is gone: the job goes back to the queue, and runs again
        await take_for_dead(postgres_dsn, held.other)
        result = await asyncio.wait_for(held.handle.result(), 30)
        state = await held.handle.state()
    assert result["out_pg.B"] == "-"
    assert len(await recorded(postgres_dsn, held.run_id, held.key)) == 1
    assert state.steps[1].attempts == 2


async def test_a_step_job_whose_finish_fails_records_nothing(postgres_dsn: str):
    """A job of the queue: its end is recorded in the transaction that
    finishes it; a finish that fails (the job is gone) records nothing."""
    await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    run = new_ledger()
    GATES[run] = asyncio.Event()
    serving = PostgresWorker(postgres_dsn, PgOrder, inline=False, poll_interval=0.2)
    async with serving:
        handle = await client.start(PgOrder, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "pg.Gate")
        row = await flow_row(postgres_dsn, handle.id)
        job, key = await gate_job(postgres_dsn, row["run_id"])
        await sql(postgres_dsn, "DELETE FROM procrastinate_jobs WHERE id = %s", job)
        GATES[run].set()
        await ledger.wait_for_mark(run, "do", "pg.Gate")
        await asyncio.sleep(1.0)
        assert await recorded(postgres_dsn, row["run_id"], key) == []
    await client.close()


async def test_a_stopped_step_job_of_a_dead_worker_ends_as_stopped(postgres_dsn: str):
    """The flow is cancelled while its step's job is held by a worker that
    then dies: the sweep ends the job as stopped (procrastinate alone would
    fail it, and the flow would wait for its end forever), and the flow
    rolls back."""
    async with gate_held_elsewhere(postgres_dsn) as held:
        await held.handle.cancel()
        for _ in range(100):  # the cancel reached the job's holder
            if await sql(
                postgres_dsn,
                "SELECT 1 FROM procrastinate_jobs WHERE id = %s AND abort_requested",
                held.job,
            ):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the job was never asked to stop")
        await take_for_dead(postgres_dsn, held.other)
        with pytest.raises(qwit.FlowCancelled):
            await asyncio.wait_for(held.handle.result(), 20)
    assert await recorded(postgres_dsn, held.run_id, held.key) == [{"cancelled": True}]
    assert ledger.applied(held.run) == ["pg.A"]
    assert ledger.undone(held.run) == ["pg.A"]


# -- step jobs that stop without an end ------------------------------------------


async def job_status(dsn: str, job: int) -> list[tuple[Any, ...]]:
    return await sql(
        dsn, "SELECT status, abort_requested FROM procrastinate_jobs WHERE id = %s", job
    )


async def asked_to_stop(dsn: str, job: int) -> None:
    for _ in range(100):
        if (await job_status(dsn, job))[0][1]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job} was never asked to stop")


async def test_a_step_job_asked_to_stop_whose_worker_stops_first_ends_as_stopped(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
):
    """The flow is cancelled while a job of the queue runs its step, and the
    job's worker stops before it has seen the request: the job, cut off,
    ends as stopped (procrastinate, retrying a job asked to stop, would
    fail it, and the flow would wait for its end forever)."""
    # the window: the request does not reach the job's worker
    monkeypatch.setattr(
        procrastinate.worker.Worker, "_handle_abort_jobs_requested", lambda self, ids: None
    )
    await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    run = new_ledger()
    GATES[run] = asyncio.Event()
    async with worker(postgres_dsn, PgOrder, inline=False):
        handle = await client.start(PgOrder, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "pg.Gate")
        row = await flow_row(postgres_dsn, handle.id)
        job, key = await gate_job(postgres_dsn, row["run_id"])
        await handle.cancel()
        await asked_to_stop(postgres_dsn, job)
    monkeypatch.undo()
    assert await recorded(postgres_dsn, row["run_id"], key) == [{"cancelled": True}]
    async with worker(postgres_dsn, PgOrder):
        with pytest.raises(qwit.FlowCancelled):
            await asyncio.wait_for(handle.result(), 15)
    assert ledger.undone(run) == ["pg.A"]
    await client.close()


async def test_a_stalled_step_job_asked_to_stop_as_it_is_swept_ends_as_stopped(
    postgres_dsn: str,
):
    """The sweep takes a step job of a dead worker; the flow's cancel lands
    just before the sweep puts it back in the queue: it ends as stopped."""
    serving = worker(postgres_dsn, PgOrder)
    original = serving.release
    cancelled: list[int] = []

    async def release(
        job: int, run_id: str, key: str, holder: int | None, delay: float = 0.0
    ) -> None:
        if not cancelled:
            cancelled.append(job)
            await held.handle.cancel()  # the cancel lands here
            await asked_to_stop(postgres_dsn, job)
        await original(job, run_id, key, holder, delay)

    serving.release = release  # type: ignore[method-assign]
    async with gate_held_elsewhere(postgres_dsn, serving) as held:
        await take_for_dead(postgres_dsn, held.other)
        with pytest.raises(qwit.FlowCancelled):
            await asyncio.wait_for(held.handle.result(), 20)
    assert cancelled == [held.job]
    assert await recorded(postgres_dsn, held.run_id, held.key) == [{"cancelled": True}]
    assert ledger.undone(held.run) == ["pg.A"]


async def test_a_queued_step_job_whose_finish_fails_is_finished_later(postgres_dsn: str):
    """The transaction that finishes a job of the queue and records its
    step's end fails (PostgreSQL closed the connection): the worker keeps the
    end, and finishes the job and records it at its next heartbeat."""
    await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    run = new_ledger()
    GATES[run] = asyncio.Event()
    serving = worker(postgres_dsn, PgOrder, inline=False)
    original = serving.connection
    armed = [False]

    def connection() -> Any:
        if armed[0] and sys._getframe(1).f_code.co_name == "finish_job":
            armed[0] = False
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return original()

    serving.connection = connection  # type: ignore[method-assign]
    async with serving:
        handle = await client.start(PgOrder, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "pg.Gate")
        row = await flow_row(postgres_dsn, handle.id)
        _, key = await gate_job(postgres_dsn, row["run_id"])
        armed[0] = True  # the next finish of a step job fails: pg.Gate's
        GATES[run].set()
        result = await asyncio.wait_for(handle.result(), 20)
    assert armed == [False]
    assert result["out_pg.B"] == "-"
    assert len(await recorded(postgres_dsn, row["run_id"], key)) == 1
    assert ledger.applied(run) == ["pg.A", "pg.Gate", "pg.B"]
    await client.close()


class PgFlaky(Effect, name="pg.Flaky"):
    """Fails its first attempt (retryably), succeeds on the next."""

    retry = qwit.Retry(max_attempts=3, initial_interval=0.1, max_interval=0.1)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:
        ledger.record(args["ledger"], "attempt", str(qwit.context().attempt))
        if qwit.context().attempt == 1:
            raise qwit.StepError("flaky", retry=True)
        return await super().step_forward(args)


class PgFlakyFlow(qwit.Flow, name="pg.flaky", backend=qwit.postgres):
    def build_flow(self) -> None:
        self.step(PgFlaky)


async def test_a_taken_step_whose_run_fails_under_it_goes_back_to_the_queue(
    postgres_dsn: str,
):
    """A step the worker took for its own driver stops on a PostgreSQL error
    (counting its next attempt): its job goes back to the queue, and runs
    again there, its attempts counted on."""
    await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    run = new_ledger()
    serving = worker(postgres_dsn, PgFlakyFlow)
    original = serving._next_attempt
    armed = [True]

    async def next_attempt(run_id: str, key: str) -> int:
        if armed[0]:
            armed[0] = False
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return await original(run_id, key)

    serving._next_attempt = next_attempt  # type: ignore[method-assign]
    async with serving:
        handle = await client.start(PgFlakyFlow, {"ledger": run})
        result = await asyncio.wait_for(handle.result(), 20)
        state = await handle.state()
    assert armed == [False]
    assert result["out_pg.Flaky"] == "-"
    assert ledger.marks(run, "attempt") == ["1", "2"]
    assert ledger.applied(run) == ["pg.Flaky"]
    # the count of attempt 2 failed (it never ran): the job's run is attempt 2
    assert state.steps[0].attempts == 2
    await client.close()


class PgRetried(Effect, name="pg.Retried"):
    retry = qwit.Retry(max_attempts=3, initial_interval=0.1, max_interval=0.1)


class PgRetriedFlow(qwit.Flow, name="pg.retried", backend=qwit.postgres):
    def build_flow(self) -> None:
        self.step(PgRetried)


async def test_a_taken_step_job_whose_run_never_started_is_released(postgres_dsn: str):
    """The driver's transaction that took a step job committed, but its run
    never started here (the commit's answer was lost): the worker finds the
    job held under its id with nothing running it, at two heartbeats in a
    row, and puts it back in the queue. The lost run counts as an attempt
    (as a crashed worker's does)."""
    await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    run = new_ledger()
    serving = worker(postgres_dsn, PgRetriedFlow)
    original = serving.run_inline
    lost: list[int] = []

    def run_inline(args: dict[str, Any], attempt: int, job: int, driver: object = None) -> None:
        if not lost:
            lost.append(job)  # as if the hook had never run
            return
        original(args, attempt, job, driver)

    serving.run_inline = run_inline  # type: ignore[method-assign]
    async with serving:
        handle = await client.start(PgRetriedFlow, {"ledger": run})
        result = await asyncio.wait_for(handle.result(), 20)
        state = await handle.state()
    assert len(lost) == 1
    assert result["out_pg.Retried"] == "-"
    assert ledger.applied(run) == ["pg.Retried"]
    assert state.steps[0].attempts == 2
    await client.close()


async def test_a_cancel_stops_a_taken_step_job_that_never_started(postgres_dsn: str):
    """As above, and the flow is cancelled before the job is released: the
    job is asked to stop, so that its release ends it as stopped (it does
    not run, to be undone at once)."""
    await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    run = new_ledger()
    serving = worker(postgres_dsn, PgRetriedFlow)
    lost: list[int] = []
    serving.run_inline = lambda args, attempt, job, driver=None: lost.append(job)  # type: ignore[method-assign]
    async with serving:
        handle = await client.start(PgRetriedFlow, {"ledger": run})
        while not lost:
            await asyncio.sleep(0.02)
        await handle.cancel()
        with pytest.raises(qwit.FlowCancelled):
            await asyncio.wait_for(handle.result(), 20)
    assert ledger.applied(run) == []
    await client.close()


# -- deploys -------------------------------------------------------------------------


async def test_a_flow_whose_plan_is_newer_than_the_worker_waits_for_one_that_reads_it(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
):
    # Clients upgraded before workers. Before, the worker ran a plan it could
    # not read as if it were its own (or, when it failed to read it, offered
    # the flow again and again without pause).
    from qwit._plan import PLAN_VERSION
    from qwit.postgres import _worker

    monkeypatch.setattr(_worker, "PLAN_TOO_NEW_RETRY", 0.5)
    await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    run = new_ledger()
    prepared = client.prepare(PgOuter, {"ledger": run})
    newer = prepared.model_copy(update={"version": PLAN_VERSION + 1})
    async with worker(postgres_dsn, PgOuter):
        handle = await client.engine(PgOuter.backend).start(PgOuter, newer)
        await asyncio.sleep(2.5)
        state = await handle.state()
        assert state.status == "running" and all(s.status == "pending" for s in state.steps)
        assert ledger.applied(run) == []
        rows = await sql(
            postgres_dsn,
            "SELECT attempts FROM procrastinate_jobs "
            "WHERE task_name = %s AND args->>'flow_id' = %s",
            _worker.FLOW_TASK,
            handle.id,
        )
        # offered again, with a pause between offers
        assert rows and 2 <= rows[0][0] <= 8, rows
        # the worker is upgraded: the next offer runs the flow
        monkeypatch.setattr(_worker, "PLAN_VERSION", PLAN_VERSION + 1)
        result = await asyncio.wait_for(handle.result(), 30)
    assert result["out_inner"] == "-"
    assert sorted(ledger.applied(run)) == ["inner", "pg.B"]
    await client.close()


class PgX1(Effect, name="pg.X1"):
    pass


class PgX2(Effect, name="pg.X2"):
    pass


class PgServedApart(qwit.Flow, name="pg.served_apart", backend=qwit.postgres):
    def build_flow(self) -> None:
        self.step(PgX1)
        self.step(PgX2)


class PgNobody(Effect, name="pg.Nobody"):
    pass


class PgPartlyServed(qwit.Flow, name="pg.partly_served", backend=qwit.postgres):
    def build_flow(self) -> None:
        self.step(PgA)
        self.step(PgNobody)


@pytest.mark.parametrize("inline", [True, False])
async def test_workers_serving_different_flows_run_every_flow(postgres_dsn: str, inline: bool):
    # Two workers of one database serve different modules: the driver of a
    # flow may run on either, and either may take its step jobs. Before, a
    # worker that took a step it does not serve failed the flow at once
    # (StepNotRegistered), though the other worker serves it.
    await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    runs = [new_ledger() for _ in range(10)]
    async with (
        worker(postgres_dsn, PgServedApart, inline=inline),
        worker(postgres_dsn, PgOuter, inline=inline),
    ):
        handles = [await client.start(PgServedApart, {"ledger": run}) for run in runs]
        handles.append(await client.start(PgOuter, {"ledger": new_ledger()}))
        # (a step offered to the worker that lacks it goes back to the queue
        # with backoff: on a loaded machine the last flows take a while)
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(h.result() for h in handles), return_exceptions=True), 100
        )
    assert [o for o in outcomes if isinstance(o, BaseException)] == []
    assert all(ledger.applied(run) == ["pg.X1", "pg.X2"] for run in runs)
    await client.close()


async def test_a_step_no_worker_serves_fails_the_flow_in_bounded_time(postgres_dsn: str):
    await prepare(postgres_dsn)
    client = await qwit.connect(
        backend=qwit.postgres,
        settings=[PostgresSettings(postgres_dsn)],
        unserved_step_timeout=2,
    )
    run = new_ledger()
    async with worker(postgres_dsn, PgA), worker(postgres_dsn, PgB):
        # a worker that served pg.Nobody and died (its heartbeat stopped): its
        # registration keeps no flow waiting for it
        await sql(
            postgres_dsn,
            "WITH dead AS (INSERT INTO procrastinate_workers (last_heartbeat) "
            "VALUES (now() - interval '1 hour') RETURNING id) "
            "INSERT INTO qwit.serving SELECT id, 'qwit.steps', 'pg.Nobody' FROM dead",
        )
        began = time.monotonic()
        with pytest.raises(qwit.FlowRolledBack) as info:
            await asyncio.wait_for(client.run(PgPartlyServed, {"ledger": run}), 30)
        took = time.monotonic() - began
        rows = await sql(
            postgres_dsn,
            "SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'qwit.step'",
        )
    err = info.value
    assert 2 <= took < 10, took
    assert err.step == "pg.Nobody"
    assert err.error_type == "qwit.StepNotRegistered"
    assert "'pg.Nobody'" in err.reason and "'qwit.steps'" in err.reason
    assert repr(postgres_dsn.rsplit("/", 1)[1]) in err.reason  # the database
    assert "no worker served it for 2s" in err.reason
    assert err.compensated == ["pg.A"]
    assert ledger.entries(run) == [("do", "pg.A"), ("undo", "pg.A")]
    assert rows == [(0,)]  # every step job finished with its record
    await client.close()


class PgAfterGate(qwit.Flow, name="pg.after_gate", backend=qwit.postgres):
    def build_flow(self) -> None:
        self.step(PgB)


async def test_a_step_a_live_worker_serves_is_not_failed_while_that_worker_is_busy_or_restarts(
    postgres_dsn: str,
):
    # The only worker serving pg.B runs one step at a time, and is busy with
    # a gated step. pg.B's job had been refused long ago, before any worker
    # served it (its clock says so). While a live worker serves pg.B, the
    # worker lacking it leaves its job alone, and the clock stops. Then the
    # serving worker restarts (a deploy), gone for longer than a refusal's
    # backoff: the other worker takes the job and puts it back meanwhile,
    # its time unserved counted from then, and the flow completes on the new
    # worker. Before, the worker lacking pg.B took the job, put it back, and
    # failed the step at the limit (StepNotRegistered); it won the race for
    # each offer against an idle serving worker (its polls fell in step with
    # its own offers), so a restarted serving worker never got the job; and
    # (with the job left alone but the clock still running) its first
    # refusal after the restart failed the step at once.
    await prepare(postgres_dsn)
    client = await qwit.connect(
        backend=qwit.postgres,
        settings=[PostgresSettings(postgres_dsn)],
        unserved_step_timeout=4,
    )
    gated, after = new_ledger(), new_ledger()
    GATES[gated] = asyncio.Event()
    serving = (PgOrder, PgAfterGate)
    pg_b_job = (
        "FROM procrastinate_jobs j JOIN qwit.commands c ON c.job_id = j.id "
        "WHERE j.args->'call'->>'step' = 'pg.B' AND c.run_id LIKE 'pg.after_gate-%%'"
    )
    try:
        async with worker(postgres_dsn, PgServedApart):
            async with worker(postgres_dsn, *serving, inline=False, concurrency=1):
                first = await client.start(PgOrder, {"ledger": gated})
                await ledger.wait_for_mark(gated, "started", "pg.Gate")
                second = await client.start(PgAfterGate, {"ledger": after})
                while not await sql(postgres_dsn, "SELECT 1 " + pg_b_job):
                    await asyncio.sleep(0.05)
                # (refused an hour ago, before this worker served it)
                await sql(
                    postgres_dsn,
                    "UPDATE qwit.commands SET unserved_since = now() - interval '1 hour' "
                    "WHERE job_id = (SELECT j.id " + pg_b_job + ")",
                )
                offers = await sql(postgres_dsn, "SELECT j.attempts " + pg_b_job)
                await asyncio.sleep(2)
                assert (await second.state()).status == "running"
                # (left alone: not taken, refused and put back)
                assert await sql(postgres_dsn, "SELECT j.attempts " + pg_b_job) == offers
            GATES[gated].set()  # (its step, cut off, goes back to the queue)
            await asyncio.sleep(2.2)
            assert (await second.state()).status == "running"
            assert await sql(postgres_dsn, "SELECT j.attempts " + pg_b_job) != offers
            async with worker(postgres_dsn, *serving, inline=False, concurrency=1):
                results = await asyncio.wait_for(
                    asyncio.gather(first.result(), second.result()), 60
                )
    finally:
        GATES.pop(gated, None)
        await client.close()
    assert results[1]["out_pg.B"] == "-"
    assert ledger.applied(after) == ["pg.B"]
    assert ledger.applied(gated) == ["pg.A", "pg.Gate", "pg.B"]


async def test_a_worker_that_stops_serves_no_more_while_its_steps_finish(postgres_dsn: str):
    # As it stops it takes no new job: a step only it served is unserved
    # from then on (the time unserved counts), not waited for as long as
    # its last steps run.
    await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    run = new_ledger()
    GATES[run] = asyncio.Event()
    stopping = worker(postgres_dsn, PgOrder, graceful_shutdown_timeout=30)
    try:
        await stopping.__aenter__()
        handle = await client.start(PgOrder, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "pg.Gate")
        rows = await sql(postgres_dsn, "SELECT step FROM qwit.serving ORDER BY step")
        assert rows == [("pg.A",), ("pg.B",), ("pg.Gate",)]
        stop = asyncio.ensure_future(stopping.__aexit__(None, None, None))
        for _ in range(100):
            if not await sql(postgres_dsn, "SELECT 1 FROM qwit.serving"):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("a stopping worker still says it serves its steps")
        assert not stop.done()  # (its step in flight still runs)
        GATES[run].set()
        await asyncio.wait_for(stop, 30)
        assert ledger.applied(run) == ["pg.A", "pg.Gate"]
        async with worker(postgres_dsn, PgOrder):
            await asyncio.wait_for(handle.result(), 30)
    finally:
        GATES.pop(run, None)
        await client.close()


def test_a_step_refused_any_number_of_times_is_offered_again_within_the_backoff():
    from qwit.postgres._worker import unserved_delay

    assert [unserved_delay(n) for n in range(5)] == pytest.approx([0.2, 0.4, 0.8, 1.6, 2.0])
    # (a step a live worker serves may be refused as long as it is busy)
    assert unserved_delay(5000) == 2.0


#: Ledgers whose PgCutOff has had its first attempt cut off.
CUT_OFF: set[str] = set()


class PgCutOff(Effect, name="pg.cut_off"):
    """Its first attempt runs until its worker stops; the next is quick."""

    retry = qwit.Retry(max_attempts=3, initial_interval=0.1)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:
        if args["ledger"] not in CUT_OFF:
            CUT_OFF.add(args["ledger"])
            ledger.record(args["ledger"], "started", "pg.cut_off")
            await asyncio.sleep(30)
        return await super().step_forward(args)


class PgCutOffFlow(qwit.Flow, name="pg.cut_off_flow", backend=qwit.postgres):
    def build_flow(self) -> None:
        self.step(PgCutOff)


async def test_the_time_a_serving_worker_spent_on_a_step_is_not_time_unserved(
    postgres_dsn: str,
):
    # The worker serving pg.cut_off runs its first attempt for 6 s, longer
    # than unserved_step_timeout (5 s), and is stopped (a restart); a worker
    # lacking the step takes the job back; a new serving worker comes. The
    # clock of the time unserved starts at that refusal. Before, it ran from
    # when the flow asked for the step: the first refusal failed it.
    await prepare(postgres_dsn)
    client = await qwit.connect(
        backend=qwit.postgres, settings=[PostgresSettings(postgres_dsn)], unserved_step_timeout=5
    )
    run = new_ledger()
    try:
        async with worker(postgres_dsn, PgOuter, inline=False):
            async with worker(postgres_dsn, PgCutOffFlow, inline=False):
                handle = await client.start(PgCutOffFlow, {"ledger": run})
                await ledger.wait_for_mark(run, "started", "pg.cut_off")
                await asyncio.sleep(6)
            await asyncio.sleep(1)  # the job back in the queue: the other worker refuses it
            async with worker(postgres_dsn, PgCutOffFlow, inline=False):
                result = await asyncio.wait_for(handle.result(), 60)
    finally:
        await client.close()
    assert result["out_pg.cut_off"] == "-"
    assert ledger.applied(run) == ["pg.cut_off"]


class PgFinishes(Effect, name="pg.finishes"):
    """Runs longer than a worker takes to be seen dead (``stalled_after``); one
    attempt only: an attempt cut off, or run again, fails it."""

    retry = qwit.Retry(max_attempts=1)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:
        ledger.record(args["ledger"], "started", "pg.finishes")
        await asyncio.sleep(3)
        return await super().step_forward(args)


class PgFinishesFlow(qwit.Flow, name="pg.finishes_flow", backend=qwit.postgres):
    def build_flow(self) -> None:
        self.step(PgFinishes)
        self.step(PgB)


@pytest.mark.parametrize("inline", [True, False], ids=["taken_inline", "from_the_queue"])
async def test_a_worker_that_stops_lets_its_steps_in_flight_finish(postgres_dsn: str, inline: bool):
    # A rolling deploy: the next version's worker starts, then the old one
    # stops (the end of its block, as SIGTERM to qwit-worker) while a step
    # runs there. It takes no new job and lets go of the flow at once (the
    # new worker drives it on), but the step finishes where it runs, and its
    # end is recorded. Its job is not taken for one of a dead worker
    # meanwhile, though the step outlives stalled_after (2 s). Before, the
    # step was cut off: its one attempt spent, the flow failed and rolled back.
    await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    run = new_ledger()
    old = worker(postgres_dsn, PgFinishesFlow, inline=inline, graceful_shutdown_timeout=20)
    await old.__aenter__()
    try:
        handle = await client.start(PgFinishesFlow, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "pg.finishes")
    finally:
        async with worker(postgres_dsn, PgFinishesFlow):  # the next version
            await old.__aexit__(None, None, None)
            assert "pg.finishes" in ledger.applied(run)  # (before the old one stopped)
            result = await asyncio.wait_for(handle.result(), 60)
            state = await handle.state()
    assert result["out_pg.B"] == "-"
    assert ledger.applied(run) == ["pg.finishes", "pg.B"]
    assert ledger.undone(run) == []
    assert [s.attempts for s in state.steps] == [1, 1]
    await client.close()


class PgLong(qwit.Step, name="pg.long"):
    """Runs 12 s, then applies its effect; says when a cancel stops it."""

    retry = qwit.Retry(max_attempts=1)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:
        ledger.record(args["ledger"], "started", "pg.long")
        try:
            await asyncio.sleep(12)
        except asyncio.CancelledError:
            ledger.record(args["ledger"], "stopped", "pg.long")
            raise
        ledger.record(args["ledger"], "do", "pg.long")
        return None


class PgLongFlow(qwit.Flow, name="pg.long_flow", backend=qwit.postgres):
    def build_flow(self) -> None:
        self.step(PgLong)


#: Attempts of PgPlainSlow: (ledger, attempt) -> [start, end] (monotonic).
PLAIN_SPANS: dict[tuple[str, int], list[float]] = {}


class PgPlainSlow(Effect, name="pg.plain_slow"):
    """A plain step (its thread can't be stopped) that outlives the grace
    and stalled_after; it ignores ``cancelled``."""

    retry = qwit.Retry(max_attempts=3, initial_interval=0.1)

    def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:
        span = PLAIN_SPANS[(args["ledger"], qwit.context().attempt)] = [time.monotonic()]
        ledger.record(args["ledger"], "started", "pg.plain_slow")
        time.sleep(4)
        ledger.record(args["ledger"], "do", "pg.plain_slow")
        span.append(time.monotonic())
        return {"out_pg.plain_slow": "-"}


class PgPlainSlowFlow(qwit.Flow, name="pg.plain_slow_flow", backend=qwit.postgres):
    def build_flow(self) -> None:
        self.step(PgPlainSlow)


@pytest.mark.parametrize("inline", [True, False], ids=["taken_inline", "from_the_queue"])
async def test_a_cancel_reaches_a_step_on_a_worker_that_stops(postgres_dsn: str, inline: bool):
    # The step's worker stops (and lets go of the flow) while the step runs;
    # the cancel, written while the new worker drives the flow, reaches the
    # step on the old one all the same: with rollback=False, it never gets
    # to its effect. Before, nobody read the stop asked of the step while
    # its worker stopped: it ran on to its effect, the cancel's end late.
    await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    run = new_ledger()
    old = worker(postgres_dsn, PgLongFlow, inline=inline, graceful_shutdown_timeout=20)
    await old.__aenter__()
    try:
        handle = await client.start(PgLongFlow, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "pg.long")
    finally:
        async with worker(postgres_dsn, PgLongFlow):  # the next version
            stopping = asyncio.ensure_future(old.__aexit__(None, None, None))
            await asyncio.sleep(1)  # (the new worker drives the flow)
            await handle.cancel(rollback=False)
            with pytest.raises(qwit.FlowCancelled):
                await asyncio.wait_for(handle.result(), 60)
            await stopping
    assert ledger.marks(run, "stopped") == ["pg.long"]
    assert ledger.applied(run) == []
    await client.close()


@pytest.mark.parametrize("inline", [True, False], ids=["taken_inline", "from_the_queue"])
async def test_a_plain_step_that_outlives_the_grace_is_waited_for_and_kept(
    postgres_dsn: str, inline: bool
):
    # A thread can't be stopped: the worker waits for the step past the
    # grace (1 s), heartbeating all along, so that no other worker takes
    # its job for one of a dead worker and runs it beside it (its
    # heartbeats stopped with the grace: attempt 2 ran beside attempt 1);
    # and what the step returned is kept (it was run again).
    await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    run = new_ledger()
    old = worker(postgres_dsn, PgPlainSlowFlow, inline=inline, graceful_shutdown_timeout=1)
    await old.__aenter__()
    try:
        handle = await client.start(PgPlainSlowFlow, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "pg.plain_slow")
    finally:
        async with worker(postgres_dsn, PgPlainSlowFlow):
            await old.__aexit__(None, None, None)
            result = await asyncio.wait_for(handle.result(), 60)
            state = await handle.state()
    spans = sorted(span for (of, _), span in PLAIN_SPANS.items() if of == run)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans  # (none side by side)
    assert result["out_pg.plain_slow"] == "-"
    assert ledger.applied(run) == ["pg.plain_slow"]
    assert [s.attempts for s in state.steps] == [1]
    await client.close()


class PgPlainIgnores(qwit.Step, name="pg.plain_ignores"):
    """A plain step that ignores ``cancelled`` and returns all the same."""

    retry = qwit.Retry(max_attempts=1)

    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        ledger.record(args["ledger"], "started", "pg.plain_ignores")
        time.sleep(2.5)
        return {"out": "-"}


class PgPlainIgnoresFlow(qwit.Flow, name="pg.plain_ignores_flow", backend=qwit.postgres):
    def build_flow(self) -> None:
        self.step(PgPlainIgnores)


async def test_a_plain_step_its_flow_cancelled_stays_cancelled_when_its_worker_stops(
    postgres_dsn: str,
):
    # The flow cancels the step (procrastinate stops its job), then the
    # worker stops at once while the step's thread runs on, and the thread
    # returns: the step was cancelled, not done. (A worker's stop read over
    # the flow's cancel took its late result for its success.)
    await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    run = new_ledger()
    old = PostgresWorker(
        postgres_dsn,
        PgPlainIgnoresFlow,
        heartbeat=5,  # (no heartbeat of its own reads the cancel first)
        stalled_after=15,
        poll_interval=0.2,
        inline=False,
        graceful_shutdown_timeout=0,
    )
    await old.__aenter__()
    try:
        handle = await client.start(PgPlainIgnoresFlow, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "pg.plain_ignores")
        await handle.cancel(rollback=False)
        for _ in range(100):  # procrastinate has stopped the job for its flow
            if old._step_worker is not None and old._step_worker._job_ids_to_abort:
                break
            await asyncio.sleep(0.05)
    finally:
        await old.__aexit__(None, None, None)
    async with worker(postgres_dsn, PgPlainIgnoresFlow):
        with pytest.raises(qwit.FlowCancelled):
            await asyncio.wait_for(handle.result(), 30)
        state = await handle.state()
    assert state.steps[0].status == "failed"
    await client.close()


async def test_a_step_still_running_after_the_grace_goes_back_to_the_queue(postgres_dsn: str):
    # The step outlives the grace: it is stopped, its job goes back to the
    # queue (that attempt counts), and the worker has stopped well before
    # the step would have ended (30 s).
    await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    run = new_ledger()
    async with worker(postgres_dsn, PgCutOffFlow, graceful_shutdown_timeout=1):
        handle = await client.start(PgCutOffFlow, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "pg.cut_off")
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 20
    async with worker(postgres_dsn, PgCutOffFlow):
        result = await asyncio.wait_for(handle.result(), 60)
        state = await handle.state()
    assert result["out_pg.cut_off"] == "-"
    assert ledger.applied(run) == ["pg.cut_off"]
    assert state.steps[0].attempts == 2
    await client.close()


def test_a_negative_grace_is_refused(postgres_dsn: str):
    for grace in (-1, float("nan")):
        with pytest.raises(ValueError, match="graceful_shutdown_timeout"):
            PostgresWorker(postgres_dsn, PgOrder, graceful_shutdown_timeout=grace)


class PgHangs(Effect, name="pg.hangs"):
    """Applies its effect, then runs until its worker goes away."""

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:
        ledger.record(args["ledger"], "do", "pg.hangs")
        await asyncio.Event().wait()
        return None


class PgLeftBehind(qwit.Flow, name="pg.left_behind", backend=qwit.postgres):
    def build_flow(self) -> None:
        self.step(PgA)
        self.step(PgHangs)


async def test_a_step_whose_only_worker_went_away_is_reported_undone_or_not(postgres_dsn: str):
    # The one worker serving pg.hangs stops while the step runs: its job goes
    # back to the queue, where only a worker lacking the step takes it. Once
    # no live worker has served it for unserved_step_timeout the step fails;
    # it had started (its effect applied), so the rollback must undo it: with
    # no worker for its undo either, the flow says it could not. Before, the
    # step was taken for never started: FlowRolledBack, its effect silently
    # left.
    await prepare(postgres_dsn)
    client = await qwit.connect(
        backend=qwit.postgres, settings=[PostgresSettings(postgres_dsn)], unserved_step_timeout=1
    )
    run = new_ledger()
    async with worker(postgres_dsn, PgOuter, inline=False):
        async with worker(postgres_dsn, PgLeftBehind, inline=False):
            handle = await client.start(PgLeftBehind, {"ledger": run})
            await ledger.wait_for_mark(run, "do", "pg.hangs")
        with pytest.raises(qwit.CompensationFailed) as info:
            await asyncio.wait_for(handle.result(), 60)
        assert info.value.error_type == "qwit.StepNotRegistered"
        assert info.value.failed_compensations == ["pg.hangs"]
    assert ledger.undone(run) == ["pg.A"]
    await client.close()


async def test_a_flow_no_worker_has_begun_shows_its_steps_pending(postgres_dsn: str):
    # As on every engine, state() lists the plan's steps before any has run
    # (it listed none until a worker began the flow).
    await prepare(postgres_dsn)
    client = await client_for(postgres_dsn)
    handle = await client.start(PgOuter, {"ledger": new_ledger(), "n": 1})
    state = await handle.state()
    await client.close()
    assert state.status == "running"
    assert [(s.path, s.name, s.status) for s in state.steps] == [
        (s.path, s.name, "pending") for s in state.steps
    ]
    assert len(state.steps) == 2 and state.steps[0].kind == "flow"
    assert state.args["n"] == 1


async def test_every_caller_waiting_for_a_result_wakes_when_the_flow_ends(postgres_dsn: str):
    # Many result() calls on one flow, from fresh handles, each start to wait
    # as the flow may be ending: each must wake on the flow's notification,
    # not on its fallback poll (here a minute away). Before, a caller that
    # read the flow just before it ended, and began to wait just after, (or
    # whose wait another caller's wake-up had taken away) slept until its poll.
    await prepare(postgres_dsn)
    client = await qwit.connect(
        backend=qwit.postgres, settings=[PostgresSettings(postgres_dsn, poll_interval=3.0)]
    )
    async with worker(postgres_dsn, PgOrder):
        for _ in range(3):
            run = new_ledger()
            GATES[run] = asyncio.Event()
            handle = await client.start(PgOrder, {"ledger": run})
            await ledger.wait_for_mark(run, "started", "pg.Gate")
            waiters = [
                asyncio.ensure_future(client.get_handle(handle.id).result()) for _ in range(40)
            ]
            await asyncio.sleep(0.05)
            GATES[run].set()
            results = await asyncio.wait_for(asyncio.gather(*waiters), 20)
            assert all(r["out_pg.B"] == "-" for r in results)
            # and callers that begin to wait as it ends
            late = [client.get_handle(handle.id).result() for _ in range(20)]
            await asyncio.wait_for(asyncio.gather(*late), 20)
    await client.close()


async def test_a_worker_that_stopped_serving_by_an_error_raises_it_as_its_block_ends(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
):
    # Before, its block ended quietly: the flows it was to run never moved,
    # and nothing said why.
    async def broken() -> None:
        raise RuntimeError("the worker broke")

    serving = worker(postgres_dsn, PgA)
    monkeypatch.setattr(serving, "_register", broken)
    with pytest.raises(RuntimeError, match="the worker broke"):
        async with serving:
            await asyncio.wait_for(asyncio.wait(serving._tasks), 30)


# -- a worker's concurrency --------------------------------------------------------


class Running:
    """How many attempts of the steps below run now, and the most at once."""

    now = 0
    most = 0


class PgCounted(qwit.Step, name="pg.counted"):
    """Runs a moment, counted in ``Running``."""

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        Running.now += 1
        Running.most = max(Running.most, Running.now)
        try:
            await asyncio.sleep(0.3)
        finally:
            Running.now -= 1
        return {}


class PgFanOut(qwit.Flow, name="pg.fan_out", backend=qwit.postgres):
    def build_flow(self) -> None:
        self.map(PgCounted, over="items", item="item", into="done", max_concurrency=10)


async def wait_for_free_places(serving: PostgresWorker, timeout: float = 5.0) -> None:
    """Until every place of ``serving``'s concurrency has come back."""
    deadline = asyncio.get_running_loop().time() + timeout
    while serving._busy():
        assert asyncio.get_running_loop().time() < deadline, serving._busy()
        await asyncio.sleep(0.05)


async def fan_out_on(
    dsn: str, *servings: PostgresWorker, timeout: float = 60
) -> tuple[int, dict[str, Any]]:
    """Run ``PgFanOut`` over 8 items on ``servings``, until every place of
    theirs has come back: the most steps that ran at once, and its result."""
    Running.now = Running.most = 0
    client = await client_for(dsn)
    try:
        async with contextlib.AsyncExitStack() as stack:
            for serving in servings:
                await stack.enter_async_context(serving)
            handle = await client.start(PgFanOut, {"items": list(range(8))})
            result = await asyncio.wait_for(handle.result(), timeout)
            for serving in servings:
                await wait_for_free_places(serving)
    finally:
        await client.close()
    return Running.most, result


async def test_a_worker_runs_at_most_its_concurrency_of_steps_inline_ones_too(postgres_dsn: str):
    # README: concurrency bounds the steps a worker runs at once, those it
    # takes for its own drivers as well as those of the queue (it ran every
    # element of the map at once: only queue jobs were counted)
    most, result = await fan_out_on(postgres_dsn, worker(postgres_dsn, PgFanOut, concurrency=2))
    assert most == 2
    assert len(result["done"]) == 8


async def test_a_place_that_frees_is_filled_at_once_not_at_the_next_poll(postgres_dsn: str):
    # The steps that found every place taken wait in the queue; a place that
    # frees wakes the worker to fetch one, which would otherwise look again
    # only at its next poll (here a minute away: 3 waits of it, past the
    # flow's timeout).
    serving = PostgresWorker(
        postgres_dsn,
        PgFanOut,
        concurrency=2,
        heartbeat=0.5,
        stalled_after=2,
        poll_interval=60,
        graceful_shutdown_timeout=0,
    )
    most, _ = await fan_out_on(postgres_dsn, serving, timeout=30)
    assert most == 2


async def test_places_a_driver_took_come_back_when_its_transaction_fails(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
):
    # A driver takes a place for each step it writes itself; when its
    # transaction fails (the driver ends, and a new one runs the flow on),
    # the places of the steps it never ran come back.
    from qwit.postgres import _driver

    issue_step = _driver.Driver.issue_step
    failed: list[int] = []

    async def failing(self: _driver.Driver, conn: Any, key: str, args: dict[str, Any]) -> None:
        await issue_step(self, conn, key, args)
        if not failed:
            failed.append(serving._taking.get(self, 0))  # (taken here: a place is held)
            raise RuntimeError("the transaction fails after the step was taken")

    monkeypatch.setattr(_driver.Driver, "issue_step", failing)
    client = await client_for(postgres_dsn)
    try:
        serving = worker(postgres_dsn, PgFanOut, concurrency=2)
        async with serving:
            handle = await client.start(PgFanOut, {"items": list(range(4))})
            result = await asyncio.wait_for(handle.result(), 60)
            await wait_for_free_places(serving)
        assert failed == [1] and len(result["done"]) == 4
    finally:
        await client.close()


async def test_a_place_that_frees_wakes_the_fetches_only_if_one_was_refused():
    # A wake costs a query of the queue: only after a fetch (or a step) found
    # every place taken. procrastinate clears its wake as each fetch ends, so
    # a place that frees during a fetch wakes it once that fetch has ended.
    serving = PostgresWorker("postgresql://unused", PgCounted, concurrency=1)
    fetches = asyncio.Event()
    serving._step_worker = types.SimpleNamespace(_new_job_event=fetches)  # type: ignore[assignment]

    async def woken() -> bool:
        await asyncio.sleep(0)  # (a wake comes on the loop's next turn)
        was, _ = fetches.is_set(), fetches.clear()
        return was

    assert serving._take_fetch()
    serving._fetch_ended(1)
    serving._job_ended(1)  # (no fetch was refused)
    assert not await woken()
    assert serving._take_fetch()
    serving._fetch_ended(2)
    assert not serving._take_fetch()  # refused: every place is taken
    serving._job_ended(2)
    assert await woken()
    serving.worker_id = 1  # (as once registered: it takes steps for its drivers)
    assert serving.takes("pg.counted", "a driver")
    assert not serving.takes("pg.counted", "another driver")  # refused: no place
    serving.driver_ended("a driver")  # (its transaction failed: the place comes back)
    assert serving._busy() == 0
    assert await woken()
    serving.concurrency = 2
    assert serving._take_fetch()
    serving._fetch_ended(3)
    assert serving._take_fetch()  # a fetch under way (the last place)
    assert not serving._take_fetch()
    serving._job_ended(3)  # a place frees during that fetch...
    assert not await woken()
    serving._fetch_ended(None)  # ...and wakes them once it has ended
    fetches.clear()  # (as procrastinate does as each fetch ends)
    assert await woken()
    serving._stopping = True
    assert not serving.takes("pg.counted", "a driver")  # (a place is free: it is stopping)
    assert not await woken()
    serving._take_fetch()
    serving._fetch_ended(4)
    assert serving._take_fetch()
    assert not serving._take_fetch()
    serving._job_ended(4)  # frees during a fetch that then returns a job: woken after it
    serving._fetch_ended(5)
    fetches.clear()
    assert await woken()
    serving._job_ended(5)
    assert serving._busy() == 0


async def test_the_place_of_a_fetched_job_that_never_ran_comes_back_at_the_second_heartbeat():
    # (a job's run cancelled before its first step, as procrastinate's
    # worker stops, neither runs nor ends: its place would be lost for good)
    serving = PostgresWorker("postgresql://unused", PgCounted, concurrency=3)
    for job in (1, 2):
        assert serving._take_fetch()
        serving._fetch_ended(job)
    serving._started.add(2)  # (2 runs)
    serving._free_unstarted()
    assert serving._busy() == 2  # (1 may be about to start)
    serving._free_unstarted()
    assert serving._busy() == 1 and serving._fetched == {2}
    serving._free_unstarted()
    assert serving._fetched == {2}
    assert serving._take_fetch()
    serving._fetch_ended(3)
    serving._free_unstarted()  # 3 not started at this beat...
    serving._started.add(3)
    serving._free_unstarted()  # ...started by the next: it keeps its place
    assert serving._fetched == {2, 3}


async def test_a_step_in_its_retry_backoff_gives_its_place_back_and_has_it_again_first():
    serving = PostgresWorker("postgresql://unused", PgCounted, concurrency=1)
    fetches = asyncio.Event()
    serving._step_worker = types.SimpleNamespace(_new_job_event=fetches)  # type: ignore[assignment]
    assert serving._take_fetch()
    serving._fetch_ended(1)  # job 1 runs in the only place...
    assert not serving._take_fetch()
    resting = asyncio.ensure_future(serving._rest(0.2))  # ...and waits out a backoff
    await asyncio.sleep(0.01)
    assert serving._busy() == 0 and fetches.is_set()  # its place is free, the fetches woken
    assert serving._take_fetch()
    serving._fetch_ended(2)  # job 2 runs there meanwhile
    await asyncio.sleep(0.3)
    assert not resting.done()  # backoff over: it waits for a place...
    assert not serving._take_fetch()  # ...which no fetch takes before it
    serving._job_ended(2)
    await asyncio.sleep(0)
    assert resting.done() and serving._busy() == 1  # it has the place that freed
    # Cancelled as it waits out its backoff, or for a place: its place is its
    # job's again until the job ends.
    for backoff in (60, 0):
        stopped = asyncio.ensure_future(serving._rest(backoff))  # (job 1's)
        await asyncio.sleep(0)
        assert serving._take_fetch()
        serving._fetch_ended(3)  # job 3 takes its place
        await asyncio.sleep(0.01)
        assert serving._busy() == 1 and len(serving._returning) == (backoff == 0)
        stopped.cancel()
        await asyncio.gather(stopped, return_exceptions=True)
        assert serving._busy() == 2 and not serving._returning
        serving._job_ended(3)
    serving._job_ended(1)
    assert serving._busy() == 0


class PgRests(qwit.Step, name="pg.rests"):
    """Fails its first attempt, then waits out a backoff of 2 s."""

    retry = qwit.Retry(max_attempts=2, initial_interval=2, max_interval=2)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        attempt = qwit.context().attempt
        ledger.record(args["ledger"], "attempt", f"backs_off {attempt}")
        if attempt == 1:
            raise RuntimeError("not yet")
        return {}


class PgQuick(qwit.Step, name="pg.quick"):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        ledger.record(args["ledger"], "attempt", "quick")
        return {}


class PgRestsFlow(qwit.Flow, name="pg.rests_flow", backend=qwit.postgres):
    def build_flow(self) -> None:
        self.step(PgRests)


class PgQuickFlow(qwit.Flow, name="pg.quick_flow", backend=qwit.postgres):
    def build_flow(self) -> None:
        self.step(PgQuick)


@pytest.mark.parametrize("inline", [True, False])
async def test_a_step_waiting_out_its_backoff_leaves_its_place_to_another(
    postgres_dsn: str, inline: bool
):
    # Before, the step kept its place through the backoff: on a worker of
    # one place, the other flow's step waited for it (on Temporal the server
    # waits out the backoff, and the worker's slot is free). Steps of the
    # queue (inline=False) as well: procrastinate's own bound counts a job
    # that rests.
    run = new_ledger()
    serving = worker(postgres_dsn, PgRestsFlow, PgQuickFlow, concurrency=1, inline=inline)
    client = await client_for(postgres_dsn)
    try:
        async with serving:
            backs_off = await client.start(PgRestsFlow, {"ledger": run})
            deadline = asyncio.get_running_loop().time() + 30
            while "backs_off 1" not in ledger.marks(run, "attempt"):
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)
            await asyncio.wait_for(client.run(PgQuickFlow, {"ledger": run}), 30)
            await asyncio.wait_for(backs_off.result(), 30)
            await wait_for_free_places(serving)
    finally:
        await client.close()
    assert ledger.marks(run, "attempt") == ["backs_off 1", "quick", "backs_off 2"]


async def test_steps_a_busy_worker_leaves_in_the_queue_are_run_by_another(postgres_dsn: str):
    # Two workers of one place each: the driver's worker takes one step, the
    # others go to the queue, where both fetch them as their place frees.
    most, _ = await fan_out_on(
        postgres_dsn,
        worker(postgres_dsn, PgFanOut, concurrency=1),
        worker(postgres_dsn, PgFanOut, concurrency=1),
    )
    assert most == 2


async def test_a_worker_takes_at_most_its_concurrency_of_jobs_from_the_queue(postgres_dsn: str):
    most, _ = await fan_out_on(
        postgres_dsn, worker(postgres_dsn, PgFanOut, concurrency=2, inline=False)
    )
    assert most == 2


@pytest.mark.parametrize("concurrency", [0, -1, 1.5, True])
def test_a_worker_refuses_a_concurrency_that_is_not_a_whole_number_of_1_or_more(
    concurrency: Any,
):
    with pytest.raises(ValueError, match="concurrency must be a whole number, 1 or more"):
        PostgresWorker("postgresql://unused", PgA, concurrency=concurrency)
