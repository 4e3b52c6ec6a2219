"""Command line: ``qwit`` and ``qwit-worker``.

Exit codes, for every command: 0 done; 1 the flow (or the request) failed;
2 usage error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import click
from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    Runtime,
    TelemetryConfig,
    TelemetryFilter,
)

from .._tracing import TracingUnavailable
from ._common import Failed, import_modules, worker_registry
from ._dev import dev
from ._graph import graph
from ._ops import cancel, list_flows, react, redrive, status
from ._run import run
from ._worker import worker


class _Commands(click.Group):
    """QWIT's commands: a missing extra asked for by the environment
    (``QWIT_TRACING=1`` without ``qwit[tracing]``) is a one-line failure,
    whichever command meets it first."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except TracingUnavailable as exc:
            raise Failed(str(exc)) from None


@click.group(cls=_Commands)
@click.version_option(package_name="qwit", message="qwit %(version)s")
def cli() -> None:
    """QWIT: Queued Workflows In Transactions.

    Temporal connection settings come from Temporal's environment config
    (TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_API_KEY, TLS variables,
    TEMPORAL_PROFILE); the task queue from QWIT_TASK_QUEUE (default: qwit).
    """


for _command in (run, dev, status, list_flows, react, cancel, redrive, graph, worker):
    cli.add_command(_command)
del _command


def _core_logs_to_stderr() -> None:
    """Send the Temporal SDK core's own log lines through Python logging.

    Left alone, the core writes its warnings to stdout, where ``qwit run``
    prints the flow's result as JSON for other programs to read.
    """
    logging_config = LoggingConfig(
        filter=TelemetryFilter(core_level="WARN", other_level="ERROR"),
        forwarding=LogForwardingConfig(logger=logging.getLogger("temporalio.core")),
    )
    Runtime.set_default(
        Runtime(telemetry=TelemetryConfig(logging=logging_config)), error_if_already_set=False
    )


def _exit(command: click.Command, prog_name: str) -> None:
    """Run ``command``, then end the process without finalizing the interpreter.

    The Temporal client's Rust threads may still call into Python while the
    interpreter finalizes, which aborts the process (SIGABRT) after the
    command has done its work (temporalio/sdk-python#300); skipping
    finalization, once output is flushed, avoids it.
    """
    _core_logs_to_stderr()
    try:
        command.main(prog_name=prog_name)
    except SystemExit as exc:
        code = exc.code
    else:  # pragma: no cover - standalone mode always exits
        code = 0
    if not isinstance(code, int):
        if code is not None:
            click.echo(code, err=True)
        code = 0 if code is None else 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def worker_main() -> None:
    """Entry point of ``qwit-worker``."""
    _exit(worker, "qwit-worker")


def main() -> None:
    """Entry point of ``qwit``."""
    _exit(cli, "qwit")


__all__ = ["cli", "import_modules", "main", "worker_main", "worker_registry"]
