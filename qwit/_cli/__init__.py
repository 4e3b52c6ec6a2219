"""Command line: ``qwit`` and ``qwit-worker``.

Exit codes, for every command: 0 done; 1 the flow (or the request) failed;
2 usage error.
"""

from __future__ import annotations

import click

from ._common import import_modules, worker_registry
from ._dev import dev
from ._graph import graph
from ._ops import cancel, list_flows, react, status
from ._run import run
from ._worker import worker


@click.group()
@click.version_option(package_name="qwit", message="qwit %(version)s")
def cli() -> None:
    """QWIT: Queued Workflows In Transactions.

    Temporal connection settings come from Temporal's environment config
    (TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_API_KEY, TLS variables,
    TEMPORAL_PROFILE); the task queue from QWIT_TASK_QUEUE (default: qwit).
    """


for _command in (run, dev, status, list_flows, react, cancel, graph, worker):
    cli.add_command(_command)
del _command


def worker_main() -> None:
    """Entry point of ``qwit-worker``."""
    worker(prog_name="qwit-worker")


def main() -> None:
    """Entry point of ``qwit``."""
    cli(prog_name="qwit")


__all__ = ["cli", "import_modules", "main", "worker_main", "worker_registry"]
