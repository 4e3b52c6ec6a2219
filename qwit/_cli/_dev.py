"""``qwit dev``: a local Temporal (server and UI) and a worker, until Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import sys
from contextlib import AsyncExitStack, suppress
from types import ModuleType

import click

from .._signals import stop_on_signals
from ..temporal import DevServer, connect_temporal, create_worker
from ._common import (
    EXIT_FAILED,
    Failed,
    import_modules,
    queue_name,
    run_async,
    task_queue_option,
    worker_registry,
)
from ._connect import DEV_DB, data_dir, exclusive, port_free, private_db, start_server
from ._postgres import backend_option

DEFAULT_PORT = 7233
DEFAULT_UI_PORT = 8233
#: Seconds between two checks that the server is still alive.
WATCH_INTERVAL = 0.5


def _check_port(port: int, option: str) -> None:
    if not port_free(port):
        raise click.UsageError(
            f"port {port} on 127.0.0.1 is in use (another Temporal?): pass another with {option}"
        )


def _say(text: str = "") -> None:
    click.echo(text)
    sys.stdout.flush()


@click.command("dev")
@click.argument("modules", nargs=-1)
@click.option(
    "--port",
    default=DEFAULT_PORT,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="gRPC port of the Temporal frontend.",
)
@click.option(
    "--ui-port",
    default=DEFAULT_UI_PORT,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Port of the Temporal web UI.",
)
@click.option("--headless", is_flag=True, help="No web UI.")
@task_queue_option
@backend_option
def dev(
    modules: tuple[str, ...],
    port: int,
    ui_port: int,
    headless: bool,
    task_queue: str | None,
    backend: str,
) -> None:
    """Run a local Temporal (server and web UI) and a worker for MODULES.

    The server listens on 127.0.0.1 and keeps its state in
    $QWIT_DATA_DIR/dev.db (default ~/.local/share/qwit), so flows survive a
    restart. With MODULES, a worker serves their steps on the task queue.
    Ctrl-C (or SIGTERM) stops the worker, letting steps in flight finish,
    then the server.

    With --backend postgres: an embedded PostgreSQL (its data in
    $QWIT_DATA_DIR/postgres) and a worker of the PostgreSQL engine for
    MODULES; it prints the QWIT_POSTGRES_DSN clients and workers use.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    imported = import_modules(modules) if modules else []
    if imported:
        worker_registry(imported)
    if backend == "local":
        raise click.UsageError("qwit dev: --backend local has no server; use qwit run")
    if backend == "postgres":
        sys.exit(run_async(_dev_postgres(imported)))
    _check_port(port, "--port")
    if not headless:
        if ui_port == port:
            raise click.UsageError("--ui-port must differ from --port")
        _check_port(ui_port, "--ui-port")
    db = private_db(DEV_DB)
    with exclusive(db.with_name(db.name + ".lock")) as owned:
        if not owned:
            raise Failed(f"another qwit dev is using {db}; stop it, or set QWIT_DATA_DIR")
        try:
            server = DevServer(port=port, ui_port=None if headless else ui_port, db_filename=db)
        except FileNotFoundError as exc:
            raise Failed(str(exc)) from None
        sys.exit(run_async(_dev(server, imported, queue_name(task_queue))))


async def _dev(server: DevServer, modules: list[ModuleType], queue: str) -> int:
    with stop_on_signals() as stop:
        _say(f"starting Temporal on 127.0.0.1:{server.port} (state in {server.db_filename})...")
        async with AsyncExitStack() as stack:
            try:
                await start_server(server)
            except RuntimeError as exc:
                raise Failed(str(exc)) from None
            stack.callback(server.stop)
            if modules:
                client = await connect_temporal(target_host=server.address, tls=False, api_key=None)
                await stack.enter_async_context(create_worker(client, *modules, task_queue=queue))
            _banner(server, modules, queue)
            code = await _watch(server, stop)
            _say("stopping...")
        _say("stopped")
        return code


async def _dev_postgres(modules: list[ModuleType]) -> int:
    """``qwit dev --backend postgres``: an embedded PostgreSQL and a worker."""
    from .. import postgres

    data = data_dir() / "postgres"
    _say(f"starting PostgreSQL (data in {data})...")
    async with postgres.EmbeddedPostgres(data_dir=data) as server:
        await postgres.prepare(server.dsn)
        async with AsyncExitStack() as stack:
            if modules:
                await stack.enter_async_context(postgres.PostgresWorker(server.dsn, *modules))
            _say()
            _say(f"  PostgreSQL    {server.dsn}")
            if modules:
                _say(f"  Worker        {', '.join(m.__name__ for m in modules)}")
            _say(f"  Data          {data}")
            _say()
            _say("Point clients and workers at it (qwit run, qwit worker, qwit.connect()):")
            _say(f"  export QWIT_BACKEND=postgres QWIT_POSTGRES_DSN={server.dsn}")
            _say()
            _say("Ctrl-C stops.")
            with stop_on_signals() as stop:
                await stop.wait()
            _say("stopping...")
    _say("stopped")
    return 0


def _banner(server: DevServer, modules: list[ModuleType], queue: str) -> None:
    _say()
    _say(f"  Temporal      {server.address}")
    _say(f"  Web UI        {server.ui_address or '(headless)'}")
    if modules:
        names = ", ".join(m.__name__ for m in modules)
        _say(f"  Worker        {names} on task queue {queue!r}")
    _say(f"  State         {server.db_filename}")
    _say()
    _say("Point clients and workers at it (qwit run, qwit worker, qwit.connect()):")
    _say(f"  export TEMPORAL_ADDRESS={server.address}")
    _say()
    _say("Ctrl-C stops.")


async def _watch(server: DevServer, stop: asyncio.Event) -> int:
    """Wait for a signal; 1 if the server died first."""
    while not stop.is_set():
        process = server.process
        if process is None or process.poll() is not None:
            click.echo(f"qwit: the Temporal dev server stopped: {server.log()}", err=True)
            return EXIT_FAILED
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), WATCH_INTERVAL)
    return 0
