"""Acting on every flow a Temporal visibility query finds: ``--query``.

``qwit react --query Q REACTION`` and ``qwit cancel --query Q`` share it, and
any command that acts on one flow at a time gets ``--query`` the same way:
``@bulk_options`` on the command, ``bulk_from`` to check its options, then
one call, ``run_bulk`` (or ``act_on_query`` with a Temporal client at hand),
given the query and an async action per flow id. It does the rest, the same
for every command:

- Only root flows are acted on: ``qwit.Flow`` workflows without a parent
  (``qwit list`` finds them the same way). A sub-flow is a child workflow
  of its flow, which acts for it.
- ``--dry-run`` prints the ids of the flows it would act on, one a line on
  stdout, and touches nothing.
- Unless ``--yes``, it says how many flows match and asks before it acts; it
  acts on nothing when the answer is no, or when there is no terminal to
  ask on.
- ``--rate N``: at most N operations start each second (``DEFAULT_RATE``
  unless given); they run one after another.
- At the end, a summary on stderr: how many were done, and each refused one
  with why. The exit code is 1 if any was refused (or the operator said no),
  else 0.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click
import temporalio.client
from rich.console import Console
from temporalio.client import WorkflowExecution
from temporalio.service import RPCError, RPCStatusCode

from .._errors import EngineUnavailable, FlowNotAnswering, QwitError
from .._plan import SUBFLOW_MARK
from ..temporal import QWIT_FLOW, QWIT_STATUS, is_unavailable, unreachable
from ._common import EXIT_FAILED, Failed, console, sayer
from ._connect import temporal_for
from ._list import is_latest_run, roots_query, row_status

F = TypeVar("F", bound=Callable[..., Any])

#: Operations started per second, at most, unless ``--rate`` says otherwise:
#: each one is a few calls to Temporal and wakes a flow, whose steps may call
#: other systems in turn; a thousand flows still take only about two minutes.
DEFAULT_RATE = 10.0
#: Seconds one flow may take to answer before it is reported refused (a flow
#: that no worker serves never answers a query or an update).
ACTION_TIMEOUT = 30.0
#: Flows named one by one in the confirmation prompt; the rest are counted.
PROMPT_LISTED = 20

#: What acts on one flow, by its id: it returns what to say of it when done
#: (e.g. ``"retry accepted"``) and raises when the flow refuses (a QWIT error,
#: ``Failed``, or Temporal's ``RPCError``: the message says why).
FlowAction = Callable[[str], Awaitable[str | None]]


@dataclass(frozen=True)
class Bulk:
    """What ``--query``, ``--dry-run``, ``--yes`` and ``--rate`` ask for.

    Attributes:
        query: A Temporal visibility query, e.g.
            ``QwitStatus = "waiting" AND QwitFlow = "orders.place"``.
        dry_run: List the flows, act on none.
        yes: Act without asking.
        rate: Operations started per second, at most.
    """

    query: str
    dry_run: bool = False
    yes: bool = False
    rate: float = DEFAULT_RATE


@dataclass(frozen=True)
class Target:
    """A flow the query found: its id, its name and its status, as
    visibility has them (``?`` for a name the flow did not publish)."""

    flow_id: str
    flow: str
    status: str


@dataclass
class BulkReport:
    """What became of each flow an operation was meant for.

    Attributes:
        done: Ids of the flows the operation was done on, in order.
        refused: Why each refused flow refused, by id.
        not_attempted: Ids left alone: Temporal could not be reached any
            more, or the operator stopped the run.
    """

    done: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    not_attempted: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every flow was done, else 1."""
        return 0 if not self.refused and not self.not_attempted else EXIT_FAILED


class Pacer:
    """Spaces operations so that at most ``rate`` start in any second.

    Each start waits until ``1 / rate`` seconds after the previous one; an
    operation that took longer than that is followed at once, never by a
    burst that catches up.

    Args:
        rate: Starts per second, at most (above 0).
        clock: Monotonic seconds (tests give their own).
        sleep: Waits that many seconds (tests give their own).
    """

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be above 0, not {rate}")
        self.interval = 1.0 / rate
        self._clock = clock
        self._sleep = sleep
        self._last: float | None = None

    async def wait(self) -> None:
        """Return when the next operation may start."""
        now = self._clock()
        if self._last is not None:
            due = self._last + self.interval
            if due > now:
                await self._sleep(due - now)
                now = max(self._clock(), due)
        self._last = now


def bulk_options(fn: F) -> F:
    """``--query``, ``--dry-run``, ``--yes`` and ``--rate``, given to the
    command as ``query``, ``dry_run``, ``yes`` and ``rate`` (None when not
    given); ``bulk_from`` checks them and makes them a ``Bulk``."""
    for option in reversed(
        [
            click.option(
                "--query",
                default=None,
                metavar="QUERY",
                help="Act on every flow this Temporal visibility query finds, in place of "
                "FLOW_ID, e.g. \"QwitStatus = 'waiting' AND QwitFlow = 'orders.place'\". "
                "Only root flows are acted on (a sub-flow's flow acts for it).",
            ),
            click.option(
                "--dry-run",
                is_flag=True,
                help="With --query: print the ids of the flows it would act on; touch none.",
            ),
            click.option(
                "--yes", "-y", is_flag=True, help="With --query: act without asking first."
            ),
            click.option(
                "--rate",
                default=None,
                metavar="N",
                type=click.FloatRange(min=0, min_open=True),
                help="With --query: at most N operations a second, one after another "
                f"[default: {DEFAULT_RATE:g}].",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def bulk_from(
    query: str | None, dry_run: bool, yes: bool, rate: float | None, *, flow_id: bool, wait: bool
) -> Bulk | None:
    """The ``Bulk`` the options ask for, or None for a command on one flow.

    Args:
        query: ``--query``.
        dry_run: ``--dry-run``.
        yes: ``--yes``.
        rate: ``--rate`` (None when not given).
        flow_id: Whether a FLOW_ID was given.
        wait: ``--wait``, which follows one flow.

    Raises:
        click.UsageError: both FLOW_ID and ``--query``, or neither; an empty
            query; ``--wait`` with ``--query``; ``--dry-run``, ``--yes`` or
            ``--rate`` without it.
    """
    if query is None:
        if not flow_id:
            raise click.UsageError("Missing argument 'FLOW_ID' (or --query QUERY).")
        given = [name for name, on in (("--dry-run", dry_run), ("--yes", yes)) if on]
        given += ["--rate"] if rate is not None else []
        if given:
            verb = "goes" if len(given) == 1 else "go"
            raise click.UsageError(f"{', '.join(given)} {verb} only with --query")
        return None
    if flow_id:
        raise click.UsageError("--query goes in place of FLOW_ID: give one or the other")
    if not query.strip():
        raise click.BadParameter("is empty", param_hint="--query")
    if wait:
        raise click.UsageError("--wait follows one flow: it does not go with --query")
    return Bulk(query, dry_run=dry_run, yes=yes, rate=DEFAULT_RATE if rate is None else rate)


#: Flows whose latest run is looked up at once, when a query found ended runs.
LATEST_RUN_LOOKUPS = 20


async def find_targets(temporal: temporalio.client.Client, query: str) -> list[Target]:
    """The root flows that ``query`` finds, newest first, each id once.

    A flow is its latest run: a redrive starts a new run of the same flow id,
    and the earlier runs it leaves in visibility are not matched (an aborted
    run redriven since matches no ``QwitStatus = 'aborted'``).

    Raises:
        click.BadParameter: Temporal refused the query (its reason is told).
        Failed: Temporal could not be reached.
    """
    found: dict[str, WorkflowExecution] = {}
    runs: list[WorkflowExecution] = []
    try:
        async for wf in temporal.list_workflows(query=roots_query(f"({query})"), page_size=1000):
            # A sub-flow has a parent; its id tells it too, should visibility lag.
            if SUBFLOW_MARK not in wf.id:
                runs.append(wf)
        for start in range(0, len(runs), LATEST_RUN_LOOKUPS):
            batch = runs[start : start + LATEST_RUN_LOOKUPS]
            latest = await asyncio.gather(*(is_latest_run(temporal, wf) for wf in batch))
            for wf, is_latest in zip(batch, latest, strict=True):
                if is_latest:
                    found.setdefault(wf.id, wf)
    except RPCError as exc:
        if is_unavailable(exc):
            raise Failed(str(unreachable(temporal, exc, "to find flows"))) from None
        if exc.status == RPCStatusCode.INVALID_ARGUMENT:
            raise click.BadParameter(exc.message, param_hint="--query") from None
        raise Failed(f"finding flows failed: {exc.message}") from None
    return [_target(wf) for wf in found.values()]


def _target(wf: WorkflowExecution) -> Target:
    attrs = wf.typed_search_attributes
    status = row_status(wf.status, attrs.get(QWIT_STATUS))
    return Target(wf.id, attrs.get(QWIT_FLOW) or "?", status)


def _flows(count: int) -> str:
    return f"{count} flow" + ("" if count == 1 else "s")


def _reason(flow_id: str, text: str) -> str:
    """A refusal's reason, naming the flow once."""
    return text if flow_id in text else f"flow {flow_id!r}: {text}"


async def act_on_flows(
    flow_ids: list[str],
    action: FlowAction,
    *,
    pacer: Pacer,
    say: Callable[[str], None],
    timeout: float = ACTION_TIMEOUT,
    report: BulkReport | None = None,
) -> BulkReport:
    """Act on each flow in turn, as fast as ``pacer`` allows.

    A flow that refuses (its action raises a QWIT error, ``Failed`` or an
    ``RPCError``, or takes longer than ``timeout``) is reported and the
    others go on. When Temporal can't be reached any more, the rest are not
    attempted. Each outcome is said as it comes.

    Args:
        flow_ids: The flows, in the order to act on them.
        action: Acts on one flow (see ``FlowAction``).
        pacer: Spaces the operations (``--rate``).
        say: Prints a line of qwit's own on stderr.
        timeout: Seconds one flow's action may take.
        report: Filled in as the flows are acted on (default: a new one),
            so that a caller interrupted meanwhile knows what was done.

    Returns:
        What became of each flow.
    """
    report = BulkReport() if report is None else report
    for index, flow_id in enumerate(flow_ids):
        await pacer.wait()
        unreachable_now: str | None = None
        try:
            note = await asyncio.wait_for(action(flow_id), timeout)
        except asyncio.TimeoutError:
            report.refused[flow_id] = (
                f"flow {flow_id!r} did not answer in {timeout:g}s (is a worker serving its "
                "task queue?); what was asked may yet be done"
            )
        except FlowNotAnswering as exc:  # its engine answers: the others may
            report.refused[flow_id] = _reason(flow_id, str(exc))
        except EngineUnavailable as exc:
            unreachable_now = str(exc)
        except RPCError as exc:
            if is_unavailable(exc):
                unreachable_now = f"Temporal can't be reached: {exc.message}"
            else:
                report.refused[flow_id] = _reason(flow_id, exc.message)
        except click.ClickException as exc:
            report.refused[flow_id] = _reason(flow_id, exc.format_message())
        except QwitError as exc:
            report.refused[flow_id] = _reason(flow_id, str(exc))
        else:
            report.done.append(flow_id)
            say(f"flow {flow_id}: {note or 'done'}")
            continue
        if unreachable_now is not None:
            report.refused[flow_id] = _reason(flow_id, unreachable_now)
            report.not_attempted = flow_ids[index + 1 :]
            say(f"refused: {report.refused[flow_id]}")
            say(f"stopping: {_flows(len(report.not_attempted))} not attempted")
            break
        say(f"refused: {report.refused[flow_id]}")
    return report


def ask_on_terminal(question: str) -> bool | None:
    """Ask ``question`` on the terminal: the answer, or None without a terminal."""
    if not sys.stdin.isatty():
        return None
    try:
        return click.confirm(question, default=False, err=True)
    except click.Abort:  # Ctrl-C or end of input: no
        click.echo(err=True)
        return False


def _summary(what: str, report: BulkReport, total: int, err: Console) -> None:
    say = sayer(err)
    parts = [f"{len(report.done)} done", f"{len(report.refused)} refused"]
    if report.not_attempted:
        parts.append(f"{len(report.not_attempted)} not attempted")
    say(f"{what}: {', '.join(parts)} (of {_flows(total)})")
    for reason in report.refused.values():
        err.print(f"  refused: {reason}", markup=False, highlight=False)


async def act_on_query(
    temporal: temporalio.client.Client,
    bulk: Bulk,
    what: str,
    action: FlowAction,
    *,
    err: Console | None = None,
    ask: Callable[[str], bool | None] = ask_on_terminal,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    timeout: float = ACTION_TIMEOUT,
) -> int:
    """Do ``action`` on every root flow ``bulk.query`` finds, as ``bulk`` says.

    The one call a command needs for ``--query``: it finds the flows, lists
    them (``--dry-run``), asks (unless ``--yes``), acts at ``--rate`` and
    sums up on stderr.

    Args:
        temporal: The Temporal client to query.
        bulk: The query and the options.
        what: What is done to each flow, for the operator (e.g.
            ``"react retry"``, ``"cancel --no-rollback"``).
        action: Acts on one flow, by its id (see ``FlowAction``).
        err: Where to tell the operator (default: stderr).
        ask: Asks a yes/no question: the answer, or None when there is no
            one to ask.
        clock: Monotonic seconds, for ``--rate``.
        sleep: Waits, for ``--rate``.
        timeout: Seconds one flow's action may take before it counts as refused.

    Returns:
        The exit code: 0 when every flow was done (or none matched, or a
        dry run), 1 when any was refused or nothing was done for want of a yes.

    Raises:
        click.BadParameter: Temporal refused the query.
        Failed: Temporal could not be reached.
    """
    err = err or console()
    say = sayer(err)
    targets = await find_targets(temporal, bulk.query)
    if not targets:
        say("no flow matches the query: nothing done")
        return 0
    count = _flows(len(targets))
    if bulk.dry_run:
        for target in targets:
            click.echo(target.flow_id)
        say(f"dry run: {what} would act on these {count}; nothing done")
        return 0
    if not bulk.yes:
        say(f"{count} match the query:")
        listed = targets[:PROMPT_LISTED]
        id_width = max(len(target.flow_id) for target in listed)
        flow_width = max(len(target.flow) for target in listed)
        for target in listed:
            status = target.status.replace("_", " ")
            line = f"  {target.flow_id:<{id_width}}  {target.flow:<{flow_width}}  {status}"
            err.print(line, markup=False, highlight=False)
        if len(targets) > PROMPT_LISTED:
            err.print(f"  ... and {len(targets) - PROMPT_LISTED} more", markup=False)
        answer = ask(f"{what}: act on these {count}, at most {bulk.rate:g} a second?")
        if answer is None:
            say(f"nothing done: no terminal to ask on; pass --yes to act on these {count}")
            return EXIT_FAILED
        if not answer:
            say("nothing done")
            return EXIT_FAILED
    flow_ids = [target.flow_id for target in targets]
    report = BulkReport()
    pacer = Pacer(bulk.rate, clock, sleep)
    try:
        await act_on_flows(flow_ids, action, pacer=pacer, say=say, timeout=timeout, report=report)
    except (asyncio.CancelledError, KeyboardInterrupt):
        seen = {*report.done, *report.refused}
        report.not_attempted = [flow_id for flow_id in flow_ids if flow_id not in seen]
        say(f"{what}: interrupted (the flow in hand may have been acted on)")
        _summary(what, report, len(targets), err)
        raise
    _summary(what, report, len(targets), err)
    return report.exit_code


async def run_bulk(
    address: str | None,
    namespace: str | None,
    bulk: Bulk,
    what: str,
    make_action: Callable[[temporalio.client.Client], FlowAction],
) -> int:
    """Connect to Temporal as the commands do, then ``act_on_query``.

    Args:
        address: ``--address``.
        namespace: ``--namespace``.
        bulk: The query and the options.
        what: What is done to each flow, for the operator.
        make_action: Makes the action for one flow, given the Temporal client.

    Returns:
        The exit code (see ``act_on_query``).
    """
    err = console()
    async with temporal_for(address, namespace, sayer(err), may_start=False) as temporal:
        return await act_on_query(temporal, bulk, what, make_action(temporal), err=err)


__all__ = [
    "ACTION_TIMEOUT",
    "DEFAULT_RATE",
    "LATEST_RUN_LOOKUPS",
    "Bulk",
    "BulkReport",
    "FlowAction",
    "Pacer",
    "Target",
    "act_on_flows",
    "act_on_query",
    "bulk_from",
    "bulk_options",
    "find_targets",
    "run_bulk",
]
