"""Steps of the crash suite. Each records its effect in a SQLite ledger, keyed
by its idempotency key, as a real system would: however often Temporal runs a
step (at-least-once), its effect is applied once and undone once.

Run by `qwit-worker tests.reliability.crash_flows` subprocesses that the suite
kills with SIGKILL at random moments.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from typing import Any

import qwit

SCHEMA = """
CREATE TABLE IF NOT EXISTS effects (key TEXT PRIMARY KEY, flow TEXT, eid TEXT);
CREATE TABLE IF NOT EXISTS undos (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT UNIQUE, flow TEXT, eid TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    key TEXT, direction TEXT, pid INTEGER, attempt INTEGER, at REAL
);
"""


def connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    return db


def _write(path: str, sql: str, params: tuple[Any, ...]) -> None:
    db = connect(path)
    try:
        db.execute(sql, params)
    finally:
        db.close()


class CrashStep(qwit.Step, name="crash.step"):
    """Static args: `eid`. Flow args: `db`, `fail` (an eid), `fail_after`, and
    `delay` / `back_delay`, seconds each direction spends around its effect (so
    kills land mid-step)."""

    timeout = 3
    retry = qwit.Retry(max_attempts=20, initial_interval=0.2, max_interval=1.0)
    back_retry = qwit.Retry(max_attempts=50, initial_interval=0.2, max_interval=1.0)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        ctx = qwit.context()
        db, eid = args["db"], args["eid"]
        await asyncio.to_thread(
            _write,
            db,
            "INSERT INTO runs VALUES (?, ?, ?, ?, ?)",
            (ctx.idempotency_key, "forward", os.getpid(), ctx.attempt, time.time()),
        )
        await asyncio.sleep(args.get("delay", 0.0))
        failing = args.get("fail") == eid
        if failing and not args.get("fail_after"):
            raise qwit.StepError(f"{eid} failed", retry=False)
        await asyncio.to_thread(
            _write,
            db,
            "INSERT OR IGNORE INTO effects VALUES (?, ?, ?)",
            (ctx.idempotency_key, ctx.flow_id, eid),
        )
        await asyncio.sleep(args.get("delay", 0.0))
        if failing:
            raise qwit.StepError(f"{eid} failed after its effect", retry=False)
        return {f"out_{eid}": ctx.path}

    async def step_back(self, args: dict[str, Any]) -> None:
        ctx = qwit.context()
        db = args["db"]
        forward_key = ctx.idempotency_key.removesuffix("/step_back")
        await asyncio.to_thread(
            _write,
            db,
            "INSERT INTO runs VALUES (?, ?, ?, ?, ?)",
            (ctx.idempotency_key, "back", os.getpid(), ctx.attempt, time.time()),
        )
        await asyncio.sleep(args.get("back_delay", 0.0))
        # Undo only what was applied, once: the undo's own key makes a retried
        # step_back a no-op.
        await asyncio.to_thread(
            _write,
            db,
            "INSERT OR IGNORE INTO undos (key, flow, eid) "
            "SELECT ?, flow, eid FROM effects WHERE key = ?",
            (ctx.idempotency_key, forward_key),
        )
