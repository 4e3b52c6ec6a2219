"""What the commands share: options, argument parsing, connections and exit codes.

Exit codes: 0 done; 1 the flow (or the request) failed; 2 usage error.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import pkgutil
import sys
from collections.abc import Callable, Coroutine
from types import ModuleType
from typing import IO, Any, TypeVar

import click
from rich.console import Console

from .._client import TASK_QUEUE_ENV, default_task_queue
from .._errors import FlowDefinitionError
from .._flow import Flow
from .._runner import Registry

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

#: Exit code of a flow (or a request) that failed.
EXIT_FAILED = 1
#: Exit code of a run the user interrupted, as shells report SIGINT.
EXIT_INTERRUPTED = 130


class Failed(click.ClickException):
    """The flow or the request failed: exit 1 with a one-line reason on stderr."""

    exit_code = EXIT_FAILED

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"qwit: {self.format_message()}", err=True)


class Interrupted(Exception):
    """The user stopped following a flow (Ctrl-C); the flow goes on as it is."""


def console(*, stderr: bool = True) -> Console:
    """A rich console; off a terminal, wide enough that lines are not folded."""
    probe = Console(stderr=stderr)
    width = None if probe.is_terminal else 200
    return Console(stderr=stderr, width=width, highlight=False, soft_wrap=not probe.is_terminal)


def symbols_ok(out: Console) -> bool:
    """Whether the console can print the progress symbols."""
    return (out.encoding or "").lower().replace("-", "").startswith("utf")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; its own signal handlers decide about Ctrl-C."""
    return asyncio.run(coro)


def ensure_cwd_importable() -> None:
    """Let modules of the current directory be named, as ``python -m`` does."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


def import_modules(names: tuple[str, ...] | list[str]) -> list[ModuleType]:
    """Import the modules named on the command line (from the current directory too).

    Only modules the user names on the command line are ever imported; never
    one a flow's input names.

    Raises:
        click.UsageError: a module can't be imported.
    """
    ensure_cwd_importable()
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


def resolve_flow(spec: str) -> tuple[type[Flow], ModuleType]:
    """The Flow class that ``MODULE:FLOW`` names, and the module it was found in.

    Raises:
        click.BadParameter: the name does not resolve, or not to a Flow.
    """
    ensure_cwd_importable()
    module_name = spec.split(":", 1)[0] if ":" in spec else spec.rpartition(".")[0]
    if ":" not in spec or not module_name or not spec.split(":", 1)[1]:
        raise click.BadParameter(
            f"{spec!r} is not MODULE:FLOW (e.g. samples.order.flows:PlaceOrder)",
            param_hint="MODULE:FLOW",
        )
    try:
        value = pkgutil.resolve_name(spec)
    except (ImportError, AttributeError, ValueError) as exc:
        raise click.BadParameter(
            f"{spec!r} does not resolve: {type(exc).__name__}: {exc}", param_hint="MODULE:FLOW"
        ) from None
    except Exception as exc:
        # The module itself raised while being imported.
        raise click.BadParameter(
            f"{spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}",
            param_hint="MODULE:FLOW",
        ) from None
    if not (isinstance(value, type) and issubclass(value, Flow)) or value is Flow:
        raise click.BadParameter(
            f"{spec!r} is {value!r}, not a qwit.Flow subclass", param_hint="MODULE:FLOW"
        )
    return value, sys.modules[module_name]


def parse_args_json(value: str | None, param_hint: str = "--args") -> dict[str, Any]:
    """The JSON object given with ``--args`` (``{}`` when not given).

    Raises:
        click.BadParameter: not JSON, or not an object.
    """
    if value is None:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint=param_hint) from None
    if not isinstance(parsed, dict):
        raise click.BadParameter(
            f"must be a JSON object, not {type(parsed).__name__}", param_hint=param_hint
        )
    return parsed


def dump_json(value: Any) -> str:
    """JSON for stdout: indented for a person, one line for a pipe."""
    indent = 2 if sys.stdout.isatty() else None
    return json.dumps(value, indent=indent, ensure_ascii=False)


def task_queue_option(fn: F) -> F:
    """``--task-queue``, from ``$QWIT_TASK_QUEUE``, default ``qwit``."""
    return click.option(
        "--task-queue",
        envvar=TASK_QUEUE_ENV,
        default=None,
        metavar="QUEUE",
        help=f"Temporal task queue [env {TASK_QUEUE_ENV}; default: qwit].",
    )(fn)


def connection_options(fn: F) -> F:
    """``--address`` and ``--namespace``, over Temporal's environment config."""
    fn = click.option(
        "--namespace",
        default=None,
        metavar="NAME",
        help="Temporal namespace [default: from Temporal's env config, else 'default'].",
    )(fn)
    return click.option(
        "--address",
        default=None,
        metavar="HOST:PORT",
        help="Temporal frontend [default: from Temporal's env config "
        "(TEMPORAL_ADDRESS, TEMPORAL_PROFILE...), else localhost:7233].",
    )(fn)


def queue_name(task_queue: str | None) -> str:
    """The task queue to use: the option, ``$QWIT_TASK_QUEUE``, or ``qwit``."""
    return task_queue or default_task_queue()
