"""Steps of the crash suite. Each applies its effect through a SQLite ledger
that dedups on the idempotency key, as a real provider would: however often
Temporal runs a step (at-least-once), its effect is applied once per key and
undone once per key; every call, dedup and attempt is recorded, with the
process, so the suite can check the strict rules (``tests.strict_ledger``).

Run by `qwit-worker tests.reliability.crash_flows` subprocesses that the suite
kills with SIGKILL at random moments.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from typing import Any

import qwit
from tests.strict_ledger import (
    DEDUP,
    DO,
    END,
    START,
    UNDO,
    UNDO_DEDUP,
    UNDO_NOOP,
    Entry,
    forward_of,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL, kind TEXT, run TEXT, key TEXT,
    direction TEXT, eid TEXT, path TEXT, epoch INTEGER, attempt INTEGER, flow_id TEXT,
    pid INTEGER, note TEXT
);
CREATE INDEX IF NOT EXISTS entries_run ON entries (run);
CREATE INDEX IF NOT EXISTS entries_key ON entries (key);
CREATE TABLE IF NOT EXISTS applied (key TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS undone (key TEXT PRIMARY KEY);
"""
COLUMNS = "seq, at, kind, run, key, direction, eid, path, epoch, attempt, flow_id, pid, note"


def connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    return db


def _record(path: str, kind: str, base: dict[str, Any], note: str = "") -> str:
    """Record one call; for do/undo, apply it as the provider would (in one
    transaction, so concurrent workers see one order) and return what it was."""
    db = connect(path)
    try:
        db.execute("BEGIN IMMEDIATE")
        key = base["key"]
        if kind == DO:
            if db.execute("SELECT 1 FROM applied WHERE key = ?", (key,)).fetchone():
                kind = DEDUP
            else:
                db.execute("INSERT INTO applied VALUES (?)", (key,))
        elif kind == UNDO:
            fkey = forward_of(key)
            if not db.execute("SELECT 1 FROM applied WHERE key = ?", (fkey,)).fetchone():
                kind = UNDO_NOOP
            elif db.execute("SELECT 1 FROM undone WHERE key = ?", (fkey,)).fetchone():
                kind = UNDO_DEDUP
            else:
                db.execute("INSERT INTO undone VALUES (?)", (fkey,))
        db.execute(
            f"INSERT INTO entries ({COLUMNS}) VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                time.monotonic(),  # CLOCK_MONOTONIC: one clock for every process
                kind,
                base["run"],
                key,
                base["direction"],
                base["eid"],
                base["path"],
                base["epoch"],
                base["attempt"],
                base["flow_id"],
                os.getpid(),
                note,
            ),
        )
        db.execute("COMMIT")
        return kind
    finally:
        db.close()


def entries(db: sqlite3.Connection, run: str) -> list[Entry]:
    """One run's entries, and those of other runs that used one of its keys."""
    rows = db.execute(f"SELECT {COLUMNS} FROM entries WHERE run = ? ORDER BY seq", (run,))
    return [Entry(*row) for row in rows]


def foreign_uses(db: sqlite3.Connection, run: str, keys: set[str]) -> list[Entry]:
    """Entries of other runs with one of ``keys`` (forward keys, or their undos)."""
    found = []
    for key in keys:
        rows = db.execute(
            f"SELECT {COLUMNS} FROM entries WHERE key IN (?, ?) AND run != ? AND kind = ?",
            (key, key + "/step_back", run, START),
        )
        found.extend(Entry(*row) for row in rows)
    return found


class _Attempt:
    def __init__(self, db: str, base: dict[str, Any]) -> None:
        self.db = db
        self.base = base

    async def do(self) -> str:
        return await asyncio.to_thread(_record, self.db, DO, self.base)

    async def undo(self) -> str:
        return await asyncio.to_thread(_record, self.db, UNDO, self.base)


@contextlib.asynccontextmanager
async def attempt(args: dict[str, Any]) -> AsyncIterator[_Attempt]:
    """Record the running step's attempt from start to end (a killed worker's
    attempt has no end: the suite knows when it died)."""
    ctx = qwit.context()
    base = {
        "run": args["run"],
        "key": ctx.idempotency_key,
        "direction": "forward" if ctx.direction == "step_forward" else "back",
        "eid": args["eid"],
        "path": ctx.path,
        "epoch": 0,
        "attempt": ctx.attempt,
        "flow_id": ctx.flow_id,
    }
    await asyncio.to_thread(_record, args["db"], START, base)
    note = "ok"
    try:
        yield _Attempt(args["db"], base)
    except BaseException as exc:
        note = type(exc).__name__
        raise
    finally:
        await asyncio.shield(asyncio.to_thread(_record, args["db"], END, base, note))


class CrashStep(qwit.Step, name="crash.step"):
    """Static args: `eid`. Flow args: `db`, `run` (the flow's own id in the
    ledger), `fail` (an eid), `fail_after`, and `delay` / `back_delay`, seconds
    each direction spends around its effect (so kills land mid-step)."""

    timeout = 3
    # The server retries an attempt whose worker was killed once timeout +
    # grace are over: keep it short, the steps stop well within it.
    timeout_grace = 2
    retry = qwit.Retry(max_attempts=20, initial_interval=0.2, max_interval=1.0)
    back_retry = qwit.Retry(max_attempts=50, initial_interval=0.2, max_interval=1.0)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        eid = args["eid"]
        async with attempt(args) as effect:
            await asyncio.sleep(args.get("delay", 0.0))
            failing = args.get("fail") == eid
            if failing and not args.get("fail_after"):
                raise qwit.StepError(f"{eid} failed", retry=False)
            await effect.do()
            await asyncio.sleep(args.get("delay", 0.0))
            if failing:
                raise qwit.StepError(f"{eid} failed after its effect", retry=False)
            return {f"out_{eid}": qwit.context().path}

    async def step_back(self, args: dict[str, Any]) -> None:
        async with attempt(args) as effect:
            await asyncio.sleep(args.get("back_delay", 0.0))
            # Undoes the effect of its forward's key (the undo's key minus
            # "/step_back"), once, and only if it was applied.
            await effect.undo()
