"""Operating flows: ``qwit status``, ``qwit react``, ``qwit cancel``, ``qwit redrive``."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import click
import temporalio.client
from temporalio.client import WorkflowExecutionStatus, WorkflowQueryFailedError
from temporalio.service import RPCError, RPCStatusCode

from .._client import Client
from .._engine import FlowHandle
from .._errors import EngineUnavailable, FlowNotFound, ReactionError
from .._options import FAILURE_REACTIONS, RETRY
from .._state import FlowState
from ..temporal import QWIT_STATUS, TemporalFlowHandle, is_unavailable, unreachable
from . import _postgres as pg
from ._bulk import FlowAction, bulk_from, bulk_options, run_bulk
from ._common import (
    Failed,
    args_option,
    connection_options,
    console,
    dump_json,
    run_async,
    sayer,
)
from ._connect import temporal_for
from ._keys import key_ids, missing_keys, missing_keys_text, own_key_ids
from ._list import list_flows, row_status
from ._postgres import backend_option
from ._progress import Follower, caught_up, follow_to_end
from ._render import state_view

#: Seconds a state query may take: without a worker on its task queue, none answers.
STATE_TIMEOUT = 10.0

#: Reactions an operator may send, by their command-line names.
REACTIONS = sorted(
    {r.value for r in FAILURE_REACTIONS if r.value not in ("wait", "fallback")} | {RETRY.value},
    key=["retry", "skip", "skipback", "rollback", "abort"].index,
)

WAIT_OPTION = click.option(
    "--wait",
    is_flag=True,
    help="Then follow the flow to its end, as qwit run does (exit 0 completed, 1 failed).",
)


@asynccontextmanager
async def _handle(
    address: str | None,
    namespace: str | None,
    flow_id: str,
    say: Callable[[str], None],
    *,
    may_start: bool = True,
) -> AsyncIterator[tuple[temporalio.client.Client, FlowHandle]]:
    """The Temporal client and the handle of ``flow_id``, for as long as the block runs."""
    async with temporal_for(address, namespace, say, may_start=may_start) as temporal:
        yield temporal, Client(temporal_client=temporal).get_handle(flow_id)


async def _undecryptable(temporal: temporalio.client.Client, flow_id: str) -> Failed | None:
    """A Failed naming the keys the flow needs and this process lacks, if any."""
    missing = await missing_keys(temporal, flow_id)
    if not missing:
        return None
    return Failed(
        f"can't read flow {flow_id!r}: {missing_keys_text(missing, own_key_ids(temporal))}"
    )


async def _no_answer(temporal: temporalio.client.Client, flow_id: str) -> Failed:
    """Why a flow's state did not come, in words."""
    try:
        desc = await temporal.get_workflow_handle(flow_id).describe()
    except RPCError as exc:
        return _rpc_failure(temporal, exc, flow_id)
    undecryptable = await _undecryptable(temporal, flow_id)
    if undecryptable is not None:
        return undecryptable
    status = desc.status.name.lower() if desc.status else "unknown"
    return Failed(
        f"flow {flow_id!r} did not answer in {STATE_TIMEOUT:.0f}s (Temporal status: {status}): "
        f"is a worker serving its task queue {desc.task_queue!r}?"
    )


def _rpc_failure(temporal: temporalio.client.Client, exc: RPCError, flow_id: str) -> Failed:
    """A one-line Failed for an RPC error about ``flow_id``: for a Temporal
    that does not answer, it names the address and what to check."""
    if exc.status == RPCStatusCode.NOT_FOUND:
        if exc.message.lower().startswith("namespace"):  # not the flow: where it was looked for
            return Failed(f"{exc.message} (--namespace, TEMPORAL_NAMESPACE)")
        return Failed(f"no flow with id {flow_id!r}: {exc.message}")
    if is_unavailable(exc):
        return Failed(str(unreachable(temporal, exc, f"for flow {flow_id!r}")))
    return Failed(f"flow {flow_id!r}: {exc.message}")


async def fetch_state(temporal: temporalio.client.Client, handle: FlowHandle) -> FlowState:
    """The flow's state, or a Failed saying why there is none.

    A flow encrypted with a key this process lacks is told as such: before
    asking for the state of an ended flow (Temporal's description of it
    shows the keys of its input), and when the state can't be read.
    """
    try:
        desc = await temporal.get_workflow_handle(handle.id).describe()
    except RPCError as exc:
        raise _rpc_failure(temporal, exc, handle.id) from None
    missing = key_ids(desc.raw_description) - set(own_key_ids(temporal))
    if missing and desc.status != WorkflowExecutionStatus.RUNNING:
        text = missing_keys_text(missing, own_key_ids(temporal))
        raise Failed(f"can't read flow {handle.id!r}: {text}")
    try:
        return await asyncio.wait_for(handle.state(), STATE_TIMEOUT)
    except asyncio.TimeoutError:
        raise await _no_answer(temporal, handle.id) from None
    except (FlowNotFound, EngineUnavailable) as exc:
        raise Failed(str(exc)) from None
    except RPCError as exc:
        raise _rpc_failure(temporal, exc, handle.id) from None
    except WorkflowQueryFailedError as exc:
        raise Failed(f"{handle.id!r} is not a QWIT flow, or can't tell its state: {exc}") from None
    except Exception as exc:  # the state came, and this process can't decode it
        undecryptable = await _undecryptable(temporal, handle.id)
        if undecryptable is not None:
            raise undecryptable from None
        raise Failed(
            f"can't read the state of flow {handle.id!r}: {type(exc).__name__}: {exc}"
        ) from None


@click.command("status")
@click.argument("flow_id")
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON.")
@click.option(
    "-v", "--verbose", is_flag=True, help="Show where each step's error was raised (tracebacks)."
)
@connection_options
@backend_option
def status(
    flow_id: str,
    as_json: bool,
    verbose: bool,
    address: str | None,
    namespace: str | None,
    backend: str,
) -> None:
    """Show the steps of flow FLOW_ID: status, attempts, errors.

    Steps are in plan order, a sub-flow's steps indented under it. A waiting
    flow shows what it waits for, the commands that decide it, and what a
    rollback would undo. With no Temporal address configured, the flows are
    those of qwit run ($QWIT_DATA_DIR/run.db).
    """
    if backend != "temporal":
        if backend == "local":
            pg.refuse_local("status")
        pg.status(flow_id, as_json, verbose)
        return

    async def go() -> None:
        async with _handle(address, namespace, flow_id, sayer(console())) as (temporal, handle):
            state = await fetch_state(temporal, handle)
        if as_json:
            click.echo(dump_json(state.model_dump(mode="json")))
            return
        console(stderr=False).print(state_view(state, verbose=verbose))

    run_async(go())


@click.command("react")
@click.argument("flow_ids", nargs=-1, metavar="[FLOW_ID]")
@click.argument("reaction", metavar="REACTION", type=click.Choice(REACTIONS, case_sensitive=False))
@args_option("With retry: args merged in before the step runs again (a JSON object).")
@click.option(
    "--path",
    default=None,
    metavar="PATH",
    help="The path of the waiting step this decides (qwit status lists them); "
    "needed when several wait, e.g. branches of a parallel block.",
)
@WAIT_OPTION
@bulk_options
@connection_options
@backend_option
def react(
    flow_ids: tuple[str, ...],
    reaction: str,
    args: dict[str, Any],
    path: str | None,
    wait: bool,
    query: str | None,
    dry_run: bool,
    yes: bool,
    rate: float | None,
    address: str | None,
    namespace: str | None,
    backend: str,
) -> None:
    """Decide flow FLOW_ID, which waits for an operator, with REACTION
    (retry, skip, skipback, rollback or abort).

    retry runs the failed step again (--args merged in); skip goes on without
    it; rollback undoes the failed step and the completed ones; skipback
    undoes the completed ones only; abort stops and undoes nothing.

    With --query QUERY in place of FLOW_ID, every root flow that the Temporal
    visibility query finds is decided alike, e.g.

    \b
        qwit react --query "QwitStatus = 'waiting' AND QwitFlow = 'orders.place'" rollback

    It lists the flows and asks first (--yes: don't ask; off a terminal it
    acts only with --yes), decides at most --rate flows a second, and ends
    with a summary: how many were decided, and each flow that refused (one
    not waiting, say) with why. Exit 1 if any refused. --dry-run prints the
    ids of the flows it would decide, and decides none.
    """
    if len(flow_ids) > 1:
        raise click.UsageError(f"Got unexpected extra argument ({flow_ids[1]})")
    flow_id = flow_ids[0] if flow_ids else None
    bulk = bulk_from(query, dry_run, yes, rate, flow_id=flow_id is not None, wait=wait)
    if args and reaction != RETRY.value:
        raise click.UsageError(f"--args goes only with retry, not with {reaction}")
    if backend != "temporal":
        pg.react(pg.one_flow("react", backend, flow_id, bulk), reaction, args or None, path, wait)
        return

    err = console()
    say = sayer(err)

    if bulk is not None:

        def make_action(temporal: temporalio.client.Client) -> FlowAction:
            client = Client(temporal_client=temporal)

            async def decide(flow_id: str) -> str:
                await client.get_handle(flow_id).react(reaction, args, path=path)
                return f"{reaction} accepted"

            return decide

        sys.exit(run_async(run_bulk(address, namespace, bulk, f"react {reaction}", make_action)))
    assert flow_id is not None

    async def go() -> int:
        async with _handle(address, namespace, flow_id, say, may_start=False) as (
            temporal,
            handle,
        ):
            # Caught up before the decision: what it leads to is all shown.
            following = (
                await caught_up(err, handle, await fetch_state(temporal, handle)) if wait else None
            )
            try:
                await handle.react(reaction, args, path=path)
            except (ReactionError, FlowNotFound, EngineUnavailable) as exc:
                raise Failed(str(exc)) from None
            except RPCError as exc:
                raise _rpc_failure(temporal, exc, flow_id) from None
            say(f"flow {flow_id}: {reaction} accepted")
            if following is None:
                return 0
            return await follow_to_end(err, handle, *following)

    sys.exit(run_async(go()))


async def _still_running(temporal: temporalio.client.Client, flow_id: str) -> None:
    """Return if the flow runs; else raise Failed, saying how it ended.

    Raises:
        Failed: The flow has ended.
        RPCError: Temporal could not describe it (an unknown id, say).
    """
    desc = await temporal.get_workflow_handle(flow_id).describe()
    if desc.status != WorkflowExecutionStatus.RUNNING:
        ended = row_status(desc.status, desc.typed_search_attributes.get(QWIT_STATUS))
        raise Failed(f"flow {flow_id!r} has already ended ({ended.replace('_', ' ')})")


def _cancel_requested(rollback: bool) -> str:
    if rollback:
        return "cancel requested, it rolls back"
    return "cancel requested without rollback: it stops where it is, nothing is undone"


@click.command("cancel")
@click.argument("flow_id", required=False)
@click.option(
    "--no-rollback",
    is_flag=True,
    help="Stop the flow where it is and undo nothing; it ends cancelled all the same.",
)
@WAIT_OPTION
@bulk_options
@connection_options
@backend_option
def cancel(
    flow_id: str | None,
    no_rollback: bool,
    wait: bool,
    query: str | None,
    dry_run: bool,
    yes: bool,
    rate: float | None,
    address: str | None,
    namespace: str | None,
    backend: str,
) -> None:
    """Cancel flow FLOW_ID: the step in flight and the completed ones are undone.

    With --no-rollback the flow stops where it is instead, undoing nothing
    (the step in flight is cancelled, and what it did stays).

    With --query QUERY in place of FLOW_ID, every root flow that the Temporal
    visibility query finds is cancelled alike, e.g.

    \b
        qwit cancel --query "QwitStatus = 'waiting' AND QwitFlow = 'orders.place'"

    It lists the flows and asks first (--yes: don't ask; off a terminal it
    acts only with --yes), cancels at most --rate flows a second, and ends
    with a summary: how many were cancelled, and each flow that refused (one
    that has already ended, say) with why. Exit 1 if any refused. --dry-run
    prints the ids of the flows it would cancel, and cancels none.
    """
    bulk = bulk_from(query, dry_run, yes, rate, flow_id=flow_id is not None, wait=wait)
    rollback = not no_rollback
    if backend != "temporal":
        pg.cancel(pg.one_flow("cancel", backend, flow_id, bulk), rollback, wait)
        return
    err = console()
    say = sayer(err)

    if bulk is not None:

        def make_action(temporal: temporalio.client.Client) -> FlowAction:
            client = Client(temporal_client=temporal)

            async def stop(flow_id: str) -> str:
                await _still_running(temporal, flow_id)
                await client.get_handle(flow_id).cancel(rollback=rollback)
                return _cancel_requested(rollback)

            return stop

        what = "cancel" if rollback else "cancel --no-rollback"
        sys.exit(run_async(run_bulk(address, namespace, bulk, what, make_action)))
    assert flow_id is not None
    one_flow: str = flow_id

    async def go() -> int:
        async with _handle(address, namespace, one_flow, say, may_start=False) as (
            temporal,
            handle,
        ):
            try:
                await _still_running(temporal, one_flow)
            except RPCError as exc:
                raise _rpc_failure(temporal, exc, one_flow) from None
            following = (
                await caught_up(err, handle, await fetch_state(temporal, handle)) if wait else None
            )
            try:
                await handle.cancel(rollback=rollback)
            except (FlowNotFound, EngineUnavailable, ReactionError) as exc:
                # (ReactionError: it ended since _still_running looked)
                raise Failed(str(exc)) from None
            except RPCError as exc:
                raise _rpc_failure(temporal, exc, one_flow) from None
            say(f"flow {one_flow}: {_cancel_requested(rollback)}")
            if following is None:
                return 0
            return await follow_to_end(err, handle, *following)

    sys.exit(run_async(go()))


async def _redrive(
    temporal: temporalio.client.Client,
    flow_id: str,
    from_step: str | None,
    args: dict[str, Any],
    clients: dict[str, Client] | None = None,
) -> tuple[FlowHandle, str]:
    """Redrive ``flow_id`` on the task queue its last run ran on, where its
    workers are.

    Args:
        temporal: The Temporal client.
        flow_id: The flow to redrive.
        from_step: ``--from``.
        args: ``--args``.
        clients: QWIT clients by task queue, made as needed and kept there
            for the next flow (when acting on many).

    Returns:
        The new run's handle, and the id of the run it redrives.

    Raises:
        ReactionError: The flow can't be redriven (see ``Client.redrive``).
        FlowNotFound: No flow has this id.
        RPCError: Temporal could not describe it (an unknown id, say).
    """
    desc = await temporal.get_workflow_handle(flow_id).describe()
    clients = {} if clients is None else clients
    client = clients.get(desc.task_queue)
    if client is None:
        client = Client(temporal_client=temporal, task_queue=desc.task_queue)
        clients[desc.task_queue] = client
    handle = await client.redrive(flow_id, from_step, args or None)
    return handle, desc.run_id


def _redriven(handle: FlowHandle, of_run: str) -> str:
    """What to say of a flow just redriven: its new run, and the one it redrives."""
    run_id = handle.run_id if isinstance(handle, TemporalFlowHandle) else None
    new_run = f" as run {run_id}" if run_id else ""
    return f"redriven{new_run} (redrive of run {of_run})"


@click.command("redrive")
@click.argument("flow_id", required=False)
@click.option(
    "--from",
    "from_step",
    default=None,
    metavar="PATH",
    help="Resume from the step at PATH (qwit status lists the paths), at or before the "
    "step the flow stopped at [default: that step].",
)
@args_option("Args merged into the flow's args before it runs again (a JSON object).")
@WAIT_OPTION
@bulk_options
@connection_options
@backend_option
def redrive(
    flow_id: str | None,
    from_step: str | None,
    args: dict[str, Any],
    wait: bool,
    query: str | None,
    dry_run: bool,
    yes: bool,
    rate: float | None,
    address: str | None,
    namespace: str | None,
    backend: str,
) -> None:
    """Run flow FLOW_ID, which ended without completing, again: a new run of
    the same flow id, linked to the run it redrives.

    An aborted flow (or one cancelled with --no-rollback) resumes from the
    step it stopped at, or from --from PATH, reusing the outputs of the steps
    before it; what the earlier run did from there on is undone first. A flow
    whose rollback failed finishes its rollback. A rolled-back (or cancelled)
    flow starts again from its start. --args are merged into the flow's args.
    The new run goes to the task queue the flow ran on.

    It returns once the new run has started; --wait follows it to its end
    (exit 0 completed, 1 failed). A flow that is running, waiting or
    completed is refused (exit 1), as is a PATH that does not exist.

    With --query QUERY in place of FLOW_ID, every root flow that the Temporal
    visibility query finds is redriven alike, e.g.

    \b
        qwit redrive --query "QwitStatus = 'aborted' AND QwitFlow = 'orders.place'"

    It lists the flows and asks first (--yes: don't ask; off a terminal it
    acts only with --yes), redrives at most --rate flows a second, and ends
    with a summary: how many were redriven, and each flow that refused (one
    still running, say) with why. Exit 1 if any refused. --dry-run prints the
    ids of the flows it would redrive, and redrives none.
    """
    bulk = bulk_from(query, dry_run, yes, rate, flow_id=flow_id is not None, wait=wait)
    err = console()
    say = sayer(err)
    if backend != "temporal":
        pg.redrive(pg.one_flow("redrive", backend, flow_id, bulk), from_step, args or None, wait)
        return

    if bulk is not None:

        def make_action(temporal: temporalio.client.Client) -> FlowAction:
            clients: dict[str, Client] = {}

            async def again(flow_id: str) -> str:
                handle, of_run = await _redrive(temporal, flow_id, from_step, args, clients)
                return _redriven(handle, of_run)

            return again

        what = "redrive" if from_step is None else f"redrive --from {from_step}"
        sys.exit(run_async(run_bulk(address, namespace, bulk, what, make_action)))
    assert flow_id is not None
    one_flow: str = flow_id

    async def go() -> int:
        async with temporal_for(address, namespace, say, may_start=False) as temporal:
            try:
                handle, of_run = await _redrive(temporal, one_flow, from_step, args)
            except (ReactionError, FlowNotFound, EngineUnavailable) as exc:
                raise Failed(str(exc)) from None
            except RPCError as exc:
                raise _rpc_failure(temporal, exc, one_flow) from None
            say(f"flow {one_flow}: {_redriven(handle, of_run)}")
            if not wait:
                return 0
            code = await follow_to_end(err, handle, Follower(err))
            if code == 0:
                say(f"flow {one_flow}: completed")
            return code

    sys.exit(run_async(go()))


__all__ = ["cancel", "list_flows", "react", "redrive", "status"]
