"""QWIT's tables in PostgreSQL, and the migrations that make them.

- ``qwit.schema_version``: the versions applied. A worker or client refuses
  a database whose schema is newer than it understands.
Documents are ``json``, not ``jsonb``: a flow's args keep their keys' order.

- ``qwit.flows``: one row per flow (root or sub-flow): its input (the plan,
  pinned at start), its current run, status, last ``state()`` and outcome.
  ``driver`` fences its drivers: each driver that takes the run numbers
  itself one higher, and writes only while the row still carries its
  number, so a driver taken for dead (and replaced) that still runs writes
  nothing.
  ``trace`` keeps the span context its flow's span continues (the caller's,
  or its parent flow's), when tracing is on.
- ``qwit.events``: each flow run's inbox and journal. Whatever reaches a flow
  (a step's result, a timer, an operator's decision, a cancel, a sub-flow's
  report) is a row, unique per ``(run_id, key)``, so a result recorded twice
  (a step job retried after a crash) is recorded once. The driver numbers a
  row (``delivered``) before it hands it to the interpreter: on recovery it
  replays the rows in that order.
- ``qwit.attempts``: the attempts of each step call so far, counted across
  the jobs that ran it: a job run again after its worker died goes on
  counting (attempt 2, not 1 again), and the step's retry policy counts the
  attempt the crash cut off. ``failed`` and ``error``: the last attempt that
  failed and was to be retried, and how (what ``state()`` shows while the
  step waits out its backoff).
- ``qwit.commands``: what a run has asked for (a step job, whose id is in
  ``job_id``; a sub-flow, a timer, a word to another flow), unique per
  ``(run_id, key)``: a replay asks again, and what was done is not done
  twice. A command and its job or event are written in one transaction.
  (``inline`` holds the call of a step that an earlier QWIT ran without a
  job; a driver that finds one runs it again as a job.) ``unserved_since``:
  since when a step job has been refused by workers that lack its step
  (cleared when a worker that serves it starts an attempt, and at each
  heartbeat of a live worker that serves it).
- ``qwit.serving``: the steps each worker serves, by its procrastinate
  worker id and step queue (a worker deletes its rows as it stops; those of
  a worker procrastinate no longer knows, one that died and was pruned, are
  ignored, and deleted as the next worker registers). A worker that takes
  a step job it lacks puts it back rather than fail it while a live worker
  serves the step. (One of ``ADDITIONS``: no schema version of its own.)

Procrastinate's own schema (its jobs, locks, workers) is applied beside it.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from .._jsonargs import nul_at

#: The schema version this QWIT writes and understands.
SCHEMA_VERSION = 4

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE IF NOT EXISTS qwit.flows (
        id text PRIMARY KEY,
        run_id text NOT NULL,
        root_id text NOT NULL,
        parent_id text,
        parent_run_id text,
        name text NOT NULL,
        input json NOT NULL,
        status text NOT NULL,
        state json,
        outcome json,
        records json,
        ended boolean NOT NULL DEFAULT false,
        driver integer NOT NULL DEFAULT 0,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX IF NOT EXISTS flows_parent ON qwit.flows (parent_id);
    CREATE TABLE IF NOT EXISTS qwit.events (
        id bigserial PRIMARY KEY,
        run_id text NOT NULL,
        key text NOT NULL,
        kind text NOT NULL,
        payload json NOT NULL,
        due_at timestamptz,
        delivered integer,
        delivered_at double precision,
        created_at timestamptz NOT NULL DEFAULT now(),
        UNIQUE (run_id, key)
    );
    CREATE INDEX IF NOT EXISTS events_waiting ON qwit.events (run_id, id)
        WHERE delivered IS NULL;
    CREATE TABLE IF NOT EXISTS qwit.attempts (
        run_id text NOT NULL,
        key text NOT NULL,
        attempt integer NOT NULL,
        PRIMARY KEY (run_id, key)
    );
    CREATE TABLE IF NOT EXISTS qwit.commands (
        run_id text NOT NULL,
        key text NOT NULL,
        job_id bigint,
        inline json,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (run_id, key)
    );
    """,
    # the trace context (W3C ``traceparent``) a flow's span continues: the
    # caller's span for a root flow, its parent's for a sub-flow
    2: """
    ALTER TABLE qwit.flows ADD COLUMN IF NOT EXISTS trace json;
    """,
    # the ended runs of flows whose id a later run took (a new flow that
    # reuses the id, a redrive), for the handles that keep to those runs
    3: """
    CREATE TABLE IF NOT EXISTS qwit.runs (
        run_id text PRIMARY KEY,
        flow_id text NOT NULL,
        name text NOT NULL,
        status text NOT NULL,
        state json,
        outcome json,
        created_at timestamptz NOT NULL,
        ended_at timestamptz NOT NULL
    );
    CREATE INDEX IF NOT EXISTS runs_flow ON qwit.runs (flow_id);
    ALTER TABLE qwit.commands ADD COLUMN IF NOT EXISTS unserved_since timestamptz;
    """,
    # the last failed attempt of a step being retried, and its error
    4: """
    ALTER TABLE qwit.attempts ADD COLUMN IF NOT EXISTS failed integer;
    ALTER TABLE qwit.attempts ADD COLUMN IF NOT EXISTS error json;
    """,
}

#: Tables an earlier QWIT neither reads nor needs, created whatever the
#: version (no new version: workers and clients of earlier releases go on
#: with the database beside this one, as in a rolling deploy).
#: (Each runs only while its table or index is missing: it takes no lock,
#: and needs no ownership, on a database that has it.)
ADDITIONS = {
    "qwit.serving": """
    CREATE TABLE qwit.serving (
        worker_id bigint NOT NULL,
        queue text NOT NULL,
        step text NOT NULL,
        PRIMARY KEY (queue, step, worker_id)
    );
    CREATE INDEX serving_worker ON qwit.serving (worker_id);
    """,
    # the step jobs being refused (few), which a serving worker's
    # heartbeats look for
    "qwit.commands_unserved": """
    CREATE INDEX commands_unserved ON qwit.commands (job_id) WHERE unserved_since IS NOT NULL;
    """,
}

#: The channel a new event is announced on (payload: its run id).
CHANNEL = "qwit_events"


class SchemaTooNew(RuntimeError):
    """The database's QWIT schema is newer than this QWIT understands."""


async def migrate(conn: psycopg.AsyncConnection[Any]) -> int:
    """Create or upgrade QWIT's tables (idempotent; safe from many processes
    at once: an advisory lock serialises them). Returns the version.

    Raises:
        SchemaTooNew: the database was migrated by a newer QWIT.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('qwit.migrate'))")
        await conn.execute("CREATE SCHEMA IF NOT EXISTS qwit")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS qwit.schema_version ("
            "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur = await conn.execute("SELECT coalesce(max(version), 0) FROM qwit.schema_version")
        row = await cur.fetchone()
        current = int(row[0]) if row else 0
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the database's QWIT schema is version {current}; this QWIT understands "
                f"up to {SCHEMA_VERSION}: upgrade QWIT on this worker"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            await conn.execute(MIGRATIONS[version])
            await conn.execute("INSERT INTO qwit.schema_version (version) VALUES (%s)", [version])
        for relation, statements in ADDITIONS.items():
            cur = await conn.execute("SELECT to_regclass(%s) IS NULL", [relation])
            missing = await cur.fetchone()
            if missing and missing[0]:
                await conn.execute(statements)
    return SCHEMA_VERSION


async def check_schema(conn: psycopg.AsyncConnection[Any]) -> int:
    """Refuse a database QWIT has not migrated, or one migrated by a newer
    QWIT; its schema's version.

    Raises:
        SchemaTooNew: as ``migrate``.
        RuntimeError: QWIT's tables are missing.
    """
    cur = await conn.execute("SELECT to_regclass('qwit.schema_version') IS NOT NULL")
    row = await cur.fetchone()
    if not row or not row[0]:
        raise RuntimeError("QWIT's tables are missing: run a worker (it migrates) first")
    cur = await conn.execute("SELECT max(version) FROM qwit.schema_version")
    row = await cur.fetchone()
    version = int(row[0] or 0) if row else 0
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the database's QWIT schema is version {version}; this QWIT understands up "
            f"to {SCHEMA_VERSION}"
        )
    return version


async def fetch_flow(conn: psycopg.AsyncConnection[Any], flow_id: str) -> dict[str, Any] | None:
    """The row of ``flow_id`` (None: no such flow)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute("SELECT * FROM qwit.flows WHERE id = %s", [flow_id])
        return await cur.fetchone()


__all__ = ["CHANNEL", "SCHEMA_VERSION", "SchemaTooNew", "check_schema", "fetch_flow", "migrate"]


def unstorable(value: Any, what: str) -> str | None:
    """Why the flow's jobs can't carry the JSON ``value`` (``what``, in
    words): it holds a NUL character, which a job's args (``jsonb``, in
    procrastinate's table) can't. None if they can."""
    where = nul_at(value)
    if where is None:
        return None
    at = f" (at {where!r})" if where else ""
    return f"{what} hold a NUL character, U+0000{at}, which PostgreSQL's jsonb can't keep"
