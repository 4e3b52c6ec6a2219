"""``qwit worker`` (also ``qwit-worker``): serve the steps of some modules."""

from __future__ import annotations

import logging
import os
import sys
from types import ModuleType
from typing import Any

import click

from .._errors import QwitError
from .._signals import StoppedEarly, catching_early_signals
from ..temporal import (
    METRICS_ADDRESS_ENV,
    WAITING_EVERY,
    check_metrics_address,
    connect_temporal,
    metrics_runtime,
    serve,
)
from ._common import (
    Failed,
    connection_options,
    import_modules,
    queue_name,
    run_async,
    task_queue_option,
    worker_registry,
)
from ._connect import env_config, overrides

log = logging.getLogger("qwit.worker")


async def _serve(
    modules: list[ModuleType],
    task_queue: str,
    address: str | None,
    namespace: str | None,
    metrics_address: str | None = None,
) -> None:
    extra: dict[str, Any] = {}
    if metrics_address:
        extra["runtime"] = metrics_runtime(metrics_address)
    try:
        client = await connect_temporal(**overrides(address, namespace), **extra)
    except ValueError as exc:  # e.g. "invalid target URL: invalid port number"
        raise click.UsageError(f"the Temporal address is not HOST:PORT: {exc}") from None
    log.info("serving %s on task queue %r", ", ".join(m.__name__ for m in modules), task_queue)
    if metrics_address:
        log.info("metrics (Prometheus text) at http://%s/metrics", metrics_address)
    await serve(
        client,
        *modules,
        task_queue=task_queue,
        waiting_every=WAITING_EVERY if metrics_address else None,
    )
    log.info("worker stopped")


async def _serve_postgres(modules: list[ModuleType], metrics_address: str | None) -> None:
    from .. import postgres
    from .._metrics import Metrics, serve_metrics
    from ._postgres import configured_dsn, reaching

    if configured_dsn() is None:  # (a malformed one is a usage error)
        raise click.UsageError(
            f"qwit worker --backend postgres needs the database to serve: set {postgres.DSN_ENV}"
        )
    dsn = postgres.default_dsn()
    options = postgres.worker_options_from_env()
    metrics = Metrics() if metrics_address else None
    worker = postgres.PostgresWorker(
        dsn,
        *modules,
        heartbeat=options.get("heartbeat", 2.0),
        stalled_after=options.get("stalled_after", 10.0),
        metrics=metrics,
    )
    async with reaching(dsn):  # one line that names the server, not psycopg's traceback
        await postgres.prepare(dsn)
    server = None
    if metrics_address and metrics is not None:
        server = await serve_metrics(metrics_address, metrics)
        log.info("metrics (Prometheus text) at http://%s/metrics", metrics_address)
    log.info("serving %s on PostgreSQL", ", ".join(m.__name__ for m in modules))
    try:
        await worker.serve()
    finally:
        if server is not None:
            server.close()
    if worker.abandoned:
        # a second signal: at once, though plain steps still run in threads
        # (nothing can stop one); their jobs run again on other workers, as
        # those of a worker that died
        log.warning("worker stopped at once; steps left running run again elsewhere")
        logging.shutdown()
        os._exit(0)
    log.info("worker stopped")


@click.command("worker")
@click.argument("modules", nargs=-1, required=True)
@click.option(
    "--backend",
    type=click.Choice(["temporal", "postgres", "local"]),
    envvar="QWIT_BACKEND",
    default="temporal",
    show_default=True,
    help="The engine whose flows and steps it serves; postgres connects with "
    "$QWIT_POSTGRES_DSN [env: QWIT_BACKEND].",
)
@task_queue_option
@connection_options
@click.option(
    "--metrics-address",
    envvar=METRICS_ADDRESS_ENV,
    metavar="HOST:PORT",
    help="Serve Prometheus text at http://HOST:PORT/metrics: QWIT's metrics (flows, steps, "
    "compensations, waits), on Temporal beside the SDK's own [env: QWIT_METRICS_ADDRESS].",
)
def worker(
    modules: tuple[str, ...],
    backend: str,
    task_queue: str | None,
    address: str | None,
    namespace: str | None,
    metrics_address: str | None,
) -> None:
    """Serve the Steps and Flows that MODULES define, until SIGINT or SIGTERM.

    Temporal connection settings come from Temporal's environment config
    (TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_API_KEY, TLS variables,
    TEMPORAL_PROFILE), or --address and --namespace.
    """
    if backend == "local":  # (QWIT_BACKEND=local, set for qwit run, say)
        raise click.UsageError(
            "qwit worker: flows of --backend local run in the process that starts them; "
            "no worker serves them (serve --backend temporal or postgres)"
        )
    # A stop that comes before serve takes over (as modules import, as it
    # connects) stops it there, with exit 0: it served nothing.
    try:
        with catching_early_signals():
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
            imported = import_modules(modules)
            registry = worker_registry(imported)
            try:
                if metrics_address:
                    check_metrics_address(metrics_address)  # a bad address is a usage error
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--metrics-address") from None
            if backend == "postgres":
                log.info("steps: %s", ", ".join(sorted(registry.steps)))
                try:
                    run_async(_serve_postgres(imported, metrics_address))
                except (RuntimeError, Failed, QwitError, OSError) as exc:
                    text = exc.format_message() if isinstance(exc, Failed) else str(exc)
                    click.echo(f"{click.get_current_context().command_path}: {text}", err=True)
                    sys.exit(1)
                return
            queue = queue_name(task_queue)
            env_config()  # a broken config is a usage error
            log.info("steps: %s", ", ".join(sorted(registry.steps)))
            try:
                run_async(_serve(imported, queue, address, namespace, metrics_address))
            # (TemporalConnectionError too: it says what to check)
            except (RuntimeError, Failed) as exc:
                text = exc.format_message() if isinstance(exc, Failed) else str(exc)
                click.echo(f"{click.get_current_context().command_path}: {text}", err=True)
                sys.exit(1)
    except StoppedEarly:
        log.info("worker stopped before it served")
        sys.exit(0)
