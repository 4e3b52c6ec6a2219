"""A small pool of PostgreSQL connections that recovers at once.

psycopg_pool backs off (exponentially, for minutes) once connecting fails,
so after a PostgreSQL restart its users wait long after the server is back.
QWIT's clients and workers want the opposite: a connection for a moment (a
transaction), a fresh one when the last broke, and the error at once when
PostgreSQL is down, so that the caller's own retry decides.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict


class Connections:
    """At most ``size`` connections to ``dsn`` (autocommit), reused while healthy."""

    def __init__(self, dsn: str, size: int = 10) -> None:
        self.dsn = dsn
        self.size = size
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._gate = asyncio.Semaphore(size)
        self.closed = False

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection for one transaction or query.

        Raises:
            psycopg.OperationalError: PostgreSQL can't be reached.
        """
        if self.closed:
            raise psycopg.OperationalError("the pool is closed: its worker or client stopped")
        async with self._gate:
            conn = None
            while self._idle and conn is None:
                candidate = self._idle.pop()
                if candidate.closed or candidate.broken:
                    continue
                conn = candidate
            if conn is None:
                conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
            try:
                yield conn
            except BaseException:
                await _discard(conn)
                raise
            if conn.closed or conn.broken or self.closed:
                await _discard(conn)
            elif conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                await _discard(conn)  # left inside a transaction: not reusable
            else:
                self._idle.append(conn)

    async def close(self) -> None:
        """Close the idle connections (those in use close when given back)."""
        self.closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await _discard(conn)


def where(dsn: str) -> str:
    """The server and database ``dsn`` names, without its password."""
    try:
        info = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "the server QWIT_POSTGRES_DSN names (it does not parse as a DSN)"
    host = str(info.get("host") or "localhost")
    port = str(info.get("port") or "5432")
    place = f"{host} (socket)" if host.startswith("/") else f"{host}:{port}"
    details = [f"database {info['dbname']!r}" if info.get("dbname") else ""]
    details.append(f"user {info['user']!r}" if info.get("user") else "")
    named = ", ".join(d for d in details if d)
    return f"{place} ({named})" if named else place


def unreachable_text(dsn: str, exc: BaseException) -> str:
    """One line for a PostgreSQL that can't be reached: where, why, what to check."""
    # psycopg's first line says why; the lines after it, a hint of its own
    reason = " ".join(str(exc).strip().split("\n", 1)[0].split()) or type(exc).__name__
    return (
        f"can't reach PostgreSQL at {where(dsn)}: {reason}: is a PostgreSQL server running "
        "there and reachable from here, with these credentials? (check QWIT_POSTGRES_DSN)"
    )


async def _discard(conn: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(Exception):
        await conn.close()


__all__ = ["Connections", "unreachable_text", "where"]
