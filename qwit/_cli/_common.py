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
from importlib.machinery import PathFinder
from types import ModuleType
from typing import IO, Any, TypeVar

import click
from rich.console import Console
from rich.text import Text

from .._client import TASK_QUEUE_ENV, default_task_queue
from .._errors import EngineUnavailable, FlowDefinitionError, FlowNotFound
from .._flow import Flow
from .._runner import Registry
from .._tracing import TracingUnavailable

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


class Unservable(click.UsageError):
    """The modules named can't be served (one can't be imported, defines
    something wrong or nothing): exit 2, a usage error, with a one-line
    reason on stderr (not the usage text: the command was typed right)."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"qwit: {self.format_message()}", err=True)


class Interrupted(Exception):
    """The user stopped following a flow (Ctrl-C); the flow goes on as it is."""


def console(*, stderr: bool = True) -> Console:
    """A rich console; off a terminal, wide enough that lines are not folded."""
    out = Console(stderr=stderr, highlight=False)
    if not out.is_terminal:
        out.width = 200
        out.soft_wrap = True
    return out


def sayer(err: Console) -> Callable[[str], None]:
    """``say(text)``: a dim ``qwit: text`` line on ``err``, what qwit itself has to say."""

    def say(text: str) -> None:
        err.print(Text(f"qwit: {text}", style="dim"))

    return say


def symbols_ok(out: Console) -> bool:
    """Whether the console can print the progress symbols."""
    return (out.encoding or "").lower().replace("-", "").startswith("utf")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; its own signal handlers decide about Ctrl-C.

    Raises:
        Failed: Temporal could not be reached, or the flow is unknown, or
            tracing is asked for without OpenTelemetry (the error's own
            message says what to check).
    """
    try:
        return asyncio.run(coro)
    except (EngineUnavailable, FlowNotFound, TracingUnavailable) as exc:
        raise Failed(str(exc)) from None


def _local_modules(directory: str) -> dict[str, str]:
    """Top-level modules of ``directory``: name to file or package name."""
    found: dict[str, str] = {}
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return found
    for entry in entries:
        name = entry.name
        if name.endswith(".py") and name[:-3].isidentifier():
            found.setdefault(name[:-3], name)
        elif name.isidentifier() and os.path.isfile(os.path.join(entry.path, "__init__.py")):
            found[name] = name
    return found


def _inside(path: str | None, directory: str) -> bool:
    if not path:
        return False
    return os.path.realpath(path).startswith(os.path.realpath(directory) + os.sep)


def _searched_before(directory: str) -> list[str]:
    """The entries of ``sys.path`` that imports search before ``directory``."""
    real = os.path.realpath(directory)
    before = []
    for entry in sys.path:
        if os.path.realpath(entry or os.curdir) == real:
            break
        before.append(entry)
    return before


def _taken_by(name: str, directory: str) -> str | None:
    """Whose the top-level module ``name`` is, if not ``directory``'s own."""
    if name in sys.stdlib_module_names:
        return "Python's standard library"
    loaded = sys.modules.get(name)
    if loaded is not None:
        where = getattr(loaded, "__file__", None)
        return None if _inside(where, directory) else f"the module at {where}"
    spec = PathFinder.find_spec(name, _searched_before(directory))
    if spec is None:
        return None
    where = spec.origin or next(iter(spec.submodule_search_locations or []), None)
    if where is None or _inside(where, directory):
        return None
    return f"the module at {where}"


def ensure_cwd_importable(names: tuple[str, ...] | list[str] = ()) -> None:
    """Let modules of the current directory be named, after every other module.

    The current directory goes last on ``sys.path``: a file there named like
    a module of Python's or of an installed package (``fcntl.py``,
    ``json.py``, ``cryptography/``) can't take that module's place in QWIT or
    in the libraries it uses, even those imported later (``cryptography``
    is, once encryption is on). Such files are ignored, with a warning on
    stderr.

    Args:
        names: The modules named on the command line.

    Raises:
        Unservable: A module named on the command line is the current
            directory's, but its name belongs to another module.
    """
    cwd = os.getcwd()
    local = _local_modules(cwd)
    named = {name.split(".", 1)[0] for name in names}
    for name in sorted(local):
        taken = _taken_by(name, cwd)
        if taken is None:
            continue
        if name in named:
            raise Unservable(
                f"the current directory's {local[name]} can't be imported as {name!r}: "
                f"that name belongs to {taken}; rename it"
            )
        click.echo(
            f"qwit: ignoring {local[name]} in the current directory: {name!r} belongs to {taken}",
            err=True,
        )
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def import_modules(names: tuple[str, ...] | list[str]) -> list[ModuleType]:
    """Import the modules named on the command line (from the current directory too).

    Only modules the user names on the command line are ever imported; never
    one a flow's input names.

    Raises:
        Unservable: a module can't be imported.
    """
    ensure_cwd_importable(names)
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except Exception as exc:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise Unservable(f"can't import module {name!r}: {reason}") from None
    return modules


def worker_registry(modules: list[ModuleType]) -> Registry:
    """The steps the modules define.

    Raises:
        Unservable: a module defines something wrong, or nothing to serve.
    """
    try:
        registry = Registry(*modules)
    except FlowDefinitionError as exc:
        raise Unservable(" ".join(str(exc).split())) from None
    if not len(registry):
        names = ", ".join(m.__name__ for m in modules)
        raise Unservable(f"no qwit Step or Flow is defined in {names}: nothing to serve")
    return registry


def resolve_flow(spec: str) -> tuple[type[Flow], ModuleType]:
    """The Flow class that ``MODULE:FLOW`` names, and the module it was found in.

    Raises:
        click.BadParameter: the name does not resolve, or not to a Flow.
    """
    module_name = spec.split(":", 1)[0] if ":" in spec else spec.rpartition(".")[0]
    ensure_cwd_importable([module_name] if module_name else [])
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


def args_option(help: str) -> Callable[[F], F]:
    """``--args JSON``, given to the command as ``args``: a dict (``{}`` when not given)."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any]:
        return parse_args_json(value, param_hint="--args")

    return click.option("--args", "args", metavar="JSON", callback=parse, help=help)


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
