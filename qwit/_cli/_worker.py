"""``qwit worker`` (also ``qwit-worker``): serve the steps of some modules."""

from __future__ import annotations

import logging
import sys
from types import ModuleType

import click

from ..temporal import connect_temporal, serve
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
    modules: list[ModuleType], task_queue: str, address: str | None, namespace: str | None
) -> None:
    client = await connect_temporal(**overrides(address, namespace))
    log.info("serving %s on task queue %r", ", ".join(m.__name__ for m in modules), task_queue)
    await serve(client, *modules, task_queue=task_queue)
    log.info("worker stopped")


@click.command("worker")
@click.argument("modules", nargs=-1, required=True)
@task_queue_option
@connection_options
def worker(
    modules: tuple[str, ...], task_queue: str | None, address: str | None, namespace: str | None
) -> None:
    """Serve the Steps and Flows that MODULES define, until SIGINT or SIGTERM.

    Temporal connection settings come from Temporal's environment config
    (TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_API_KEY, TLS variables,
    TEMPORAL_PROFILE), or --address and --namespace.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    imported = import_modules(modules)
    registry = worker_registry(imported)
    queue = queue_name(task_queue)
    env_config()  # a broken config is a usage error
    log.info("steps: %s", ", ".join(sorted(registry.steps)))
    try:
        run_async(_serve(imported, queue, address, namespace))
    except (RuntimeError, Failed) as exc:  # TemporalConnectionError too: it says what to check
        text = exc.format_message() if isinstance(exc, Failed) else str(exc)
        click.echo(f"{click.get_current_context().command_path}: {text}", err=True)
        sys.exit(1)
