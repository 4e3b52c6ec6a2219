"""Command line: ``qwit-worker`` and ``qwit``."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
from types import ModuleType

import click

from ._client import TASK_QUEUE_ENV, default_task_queue
from ._errors import FlowDefinitionError
from ._runner import Registry

log = logging.getLogger("qwit.worker")


def import_modules(names: tuple[str, ...]) -> list[ModuleType]:
    """Import the modules named on the command line (from the current directory too).

    Raises:
        click.UsageError: a module can't be imported.
    """
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except Exception as exc:
            raise click.UsageError(
                f"can't import module {name!r}: {type(exc).__name__}: {exc}"
            ) from None
    return modules


def worker_registry(modules: list[ModuleType]) -> Registry:
    """The steps the modules define.

    Raises:
        click.UsageError: a module defines something wrong, or nothing to serve.
    """
    try:
        registry = Registry(*modules)
    except FlowDefinitionError as exc:
        raise click.UsageError(str(exc)) from None
    if not len(registry):
        names = ", ".join(m.__name__ for m in modules)
        raise click.UsageError(f"no qwit Step or Flow is defined in {names}: nothing to serve")
    return registry


async def _serve(modules: list[ModuleType], task_queue: str) -> None:
    from .temporal import connect_temporal, serve

    client = await connect_temporal()
    log.info("serving %s on task queue %r", ", ".join(m.__name__ for m in modules), task_queue)
    await serve(client, *modules, task_queue=task_queue)
    log.info("worker stopped")


TASK_QUEUE_OPTION = click.option(
    "--task-queue",
    envvar=TASK_QUEUE_ENV,
    default=None,
    help=f"Temporal task queue [env {TASK_QUEUE_ENV}; default: qwit].",
)


@click.command("worker")
@click.argument("modules", nargs=-1, required=True)
@TASK_QUEUE_OPTION
def worker(modules: tuple[str, ...], task_queue: str | None) -> None:
    """Serve the Steps and Flows that MODULES define, until SIGINT or SIGTERM.

    Temporal connection settings come from Temporal's environment config
    (TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_API_KEY, TLS variables,
    TEMPORAL_PROFILE).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    imported = import_modules(modules)
    registry = worker_registry(imported)
    queue = task_queue or default_task_queue()
    log.info("steps: %s", ", ".join(sorted(registry.steps)))
    try:
        asyncio.run(_serve(imported, queue))
    except RuntimeError as exc:
        click.echo(f"qwit-worker: {exc}", err=True)
        sys.exit(1)


@click.group()
def cli() -> None:
    """QWIT: Queued Workflows In Transactions."""


cli.add_command(worker)


def worker_main() -> None:
    """Entry point of ``qwit-worker``."""
    worker(prog_name="qwit-worker")


def main() -> None:
    """Entry point of ``qwit``."""
    cli(prog_name="qwit")
