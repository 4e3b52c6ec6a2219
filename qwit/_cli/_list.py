"""``qwit list``: recent flows, from Temporal's visibility.

Flows are ``qwit.Flow`` workflows without a parent (a sub-flow is a child
workflow of its flow). Where the namespace has QWIT's search attributes
(``QwitFlow``, ``QwitStatus``: ``qwit dev`` and QWIT's dev servers register
them), the server filters by flow name, and finds waiting flows by
``QwitStatus`` (a flow publishes it from its first wait on). Otherwise the
server filters by Temporal's execution status, and a flow's name and outcome
are read from the flow itself.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass
from datetime import datetime

import click
import temporalio.client
from rich.table import Table
from rich.text import Text
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import WorkflowExecution, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from .._client import Client
from .._errors import FlowFailed
from .._plan import root_of
from .._state import FAILED_STATUSES
from ..temporal import (
    QWIT_FLOW,
    QWIT_STATUS,
    WORKFLOW_NAME,
    TemporalFlowHandle,
    create_engine,
    is_unavailable,
    unreachable,
)
from ._common import Failed, connection_options, console, run_async, sayer
from ._connect import temporal_for
from ._keys import missing_keys, missing_keys_text, own_key_ids
from ._postgres import backend_option
from ._render import status_text

#: What ``--status`` accepts: QWIT's flow statuses, and Temporal's outcomes
#: that skip QWIT (``failed`` is any of QWIT's failures).
STATUS_CHOICES = (
    "running",
    "waiting",
    "compensating",
    "completed",
    "rolled_back",
    "cancelled",
    "compensation_failed",
    "aborted",
    "failed",
    "terminated",
    "timed_out",
)
_EXECUTION = {
    "running": "Running",
    "waiting": "Running",
    "compensating": "Running",
    "completed": "Completed",
    "failed": "Failed",
    "terminated": "Terminated",
    "timed_out": "TimedOut",
    **{status: "Failed" for status in FAILED_STATUSES},
}
#: Rows looked at, at most, to find ``--limit`` matches without search attributes.
SCAN_LIMIT = 500
#: Seconds reading one flow may wait for a Temporal that does not answer.
LISTING_PATIENCE = 10.0


@dataclass
class Row:
    """One flow of the listing.

    ``note`` says what could not be read, e.g. a flow encrypted with a key
    this process lacks (its status is then Temporal's alone).
    """

    flow_id: str
    flow: str
    status: str
    started: str
    ended: str
    note: str = ""


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def roots_query(*clauses: str) -> str:
    """A visibility query for root flows (``qwit.Flow`` workflows without a
    parent: a sub-flow is a child workflow of its flow) that match every
    clause too."""
    return " AND ".join(
        [f"WorkflowType = {_quote(WORKFLOW_NAME)}", "ParentWorkflowId IS NULL", *clauses]
    )


def build_query(status: str | None, flow: str | None, searchable: bool) -> str:
    """The visibility query for ``qwit list``'s filters.

    Args:
        status: ``--status``.
        flow: ``--flow``.
        searchable: Whether the namespace has QwitFlow and QwitStatus.
    """
    parts: list[str] = []
    if flow and searchable:
        parts.append(f"{QWIT_FLOW.name} = {_quote(flow)}")
    if status:
        clause = f"ExecutionStatus = {_quote(_EXECUTION[status])}"
        if searchable and status in ("waiting", "compensating"):
            # Published from a flow's first wait on: the ones an operator needs.
            clause += f" AND {QWIT_STATUS.name} = {_quote(status)}"
        if status == "cancelled":
            # A flow cancelled before it ran ends cancelled in Temporal's own terms.
            clause = f"(({clause}) OR ExecutionStatus = 'Canceled')"
        parts.append(clause)
    return roots_query(*parts)


def row_status(execution: WorkflowExecutionStatus | None, published: str | None) -> str:
    """A flow's QWIT status from Temporal's status and the QwitStatus it published."""
    if execution == WorkflowExecutionStatus.COMPLETED:
        return "completed"
    if execution == WorkflowExecutionStatus.RUNNING:
        return published if published in ("running", "waiting", "compensating") else "running"
    if execution == WorkflowExecutionStatus.FAILED:
        return published if published in FAILED_STATUSES else "failed"
    if execution == WorkflowExecutionStatus.CANCELED:
        return "cancelled"
    return execution.name.lower() if execution else "unknown"


async def searchable(client: temporalio.client.Client) -> bool:
    """Whether flows here carry QWIT's search attributes.

    They must be registered in the namespace, and flows must set them (flows
    started by a QWIT without them, or before they were registered, don't).
    """
    try:
        response = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=client.namespace)
        )
    except RPCError:
        return False
    if not {QWIT_FLOW.name, QWIT_STATUS.name} <= set(response.custom_attributes):
        return False
    probe = f"WorkflowType = {_quote(WORKFLOW_NAME)} AND {QWIT_FLOW.name} IS NOT NULL"
    async for _ in client.list_workflows(query=probe, limit=1):
        return True
    return False


def _time(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else ""


async def _read_row(client: temporalio.client.Client, wf: WorkflowExecution, deep: bool) -> Row:
    """A listing row; ``deep`` reads name and outcome from the flow when unpublished.

    A flow whose payloads this process can't decode (encrypted with a key it
    lacks) is listed all the same, with a note that says so.
    """
    attrs = wf.typed_search_attributes
    name = attrs.get(QWIT_FLOW)
    status = row_status(wf.status, attrs.get(QWIT_STATUS))
    note = ""
    if deep:
        try:
            name, status = await _read_flow(client, wf, name, status)
        except RPCError:
            raise
        except Exception as exc:  # a payload this process can't decode
            missing = await missing_keys(client, wf.id, wf.run_id)
            if missing:
                note = f"undecryptable: {missing_keys_text(missing, own_key_ids(client))}"
            else:
                note = f"unreadable: {type(exc).__name__}: {exc}"
    return Row(wf.id, name or "?", status, _time(wf.start_time), _time(wf.close_time), note)


def _flow_handle(
    client: temporalio.client.Client, flow_id: str, run_id: str | None = None
) -> TemporalFlowHandle:
    """QWIT's handle of one run of a flow (its result is asked of an ended flow:
    when Temporal does not answer, the listing does not wait long)."""
    engine = create_engine(Client(temporal_client=client))
    engine.unavailable_timeout = LISTING_PATIENCE
    return TemporalFlowHandle(engine, flow_id, run_id)


async def _read_flow(
    client: temporalio.client.Client, wf: WorkflowExecution, name: str | None, status: str
) -> tuple[str | None, str]:
    """The flow's name and QWIT status, read from the flow where visibility lacks them."""
    handle = client.get_workflow_handle(wf.id, run_id=wf.run_id)
    if name is None:
        try:
            name = await (await handle.describe()).static_summary()
        except RPCError:
            name = None
    if status == "failed":
        try:
            await _flow_handle(client, wf.id, wf.run_id).result()
        except FlowFailed as failed:
            status = failed.kind
    return name, status


async def _live_status(client: temporalio.client.Client, flow_id: str) -> str | None:
    try:
        state = await asyncio.wait_for(_flow_handle(client, flow_id).state(), 2.0)
    except Exception:  # no worker to answer: Temporal's word is all there is
        return None
    return state.status


async def is_latest_run(client: temporalio.client.Client, wf: WorkflowExecution) -> bool:
    """Whether ``wf`` is the latest run of its flow id.

    A redrive starts a new run of the same workflow id; visibility keeps the
    runs before it, which are the flow's history, not the flow. A running
    run is the latest (an id has one running run at most); of an ended one,
    Temporal's description of the id, which is its latest run, tells.

    Raises:
        RPCError: Temporal could not describe the flow (not for one gone since).
    """
    if wf.status == WorkflowExecutionStatus.RUNNING:
        return True
    try:
        latest = await client.get_workflow_handle(wf.id).describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return False  # gone since (retention)
        raise
    return latest.run_id == wf.run_id


async def find_flows(
    client: temporalio.client.Client, limit: int, status: str | None, flow: str | None
) -> list[Row]:
    """The most recent flows that match the filters, newest first: each flow
    id once, as its latest run (a redriven flow's earlier runs are not listed,
    nor matched)."""
    has_attributes = await searchable(client)
    query = build_query(status, flow, has_attributes)
    found: list[Row] = []
    scanned = 0
    page = limit if has_attributes else min(SCAN_LIMIT, max(limit * 5, 50))
    listed: set[str] = set()
    async for wf in client.list_workflows(query=query, page_size=page):
        scanned += 1
        if wf.id in listed or not await is_latest_run(client, wf):
            # an earlier run of a redriven flow: only the latest run is the flow
            if scanned >= SCAN_LIMIT:
                break
            continue
        listed.add(wf.id)
        published = wf.typed_search_attributes.get(QWIT_STATUS) is not None
        row = await _read_row(client, wf, deep=not published)
        if not published and status in ("waiting", "compensating", "running"):
            row.status = await _live_status(client, wf.id) or row.status
        if (status is None or _matches(row.status, status)) and (flow is None or row.flow == flow):
            found.append(row)
        if len(found) >= limit or scanned >= SCAN_LIMIT:
            break
    if status == "waiting" and has_attributes and len(found) < limit:
        found += await _waiting_inside(client, limit - len(found), flow, listed)
        found.sort(key=lambda row: row.started, reverse=True)
    return found


async def _waiting_inside(
    client: temporalio.client.Client, limit: int, flow: str | None, listed: set[str]
) -> list[Row]:
    """Running flows (not in ``listed``) one of whose sub-flows waits for an
    operator: they wait, as their ``state()`` says, though only the sub-flow
    publishes it."""
    query = " AND ".join(
        [
            f"WorkflowType = {_quote(WORKFLOW_NAME)}",
            "ParentWorkflowId IS NOT NULL",
            "ExecutionStatus = 'Running'",
            f"{QWIT_STATUS.name} = 'waiting'",
        ]
    )
    rows: list[Row] = []
    async for wf in client.list_workflows(query=query, page_size=min(limit * 5, SCAN_LIMIT)):
        root = root_of(wf.id)
        if root in listed:
            continue
        listed.add(root)
        try:
            description = await client.get_workflow_handle(root).describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                continue
            raise
        if description.status != WorkflowExecutionStatus.RUNNING:
            continue
        row = await _read_row(client, description, deep=False)
        if flow is None or row.flow == flow:
            row.status = "waiting"
            rows.append(row)
        if len(rows) >= limit:
            break
    return rows


def _matches(row_status: str, wanted: str) -> bool:
    if wanted == "failed":
        return row_status in FAILED_STATUSES or row_status == "failed"
    return row_status == wanted


@click.command("list")
@click.option(
    "--limit",
    default=20,
    show_default=True,
    metavar="N",
    type=click.IntRange(1, 1000),
    help="At most N flows.",
)
@click.option(
    "--status",
    "status_filter",
    type=click.Choice(STATUS_CHOICES, case_sensitive=False),
    help="Only flows in this status.",
)
@click.option("--flow", "flow_name", metavar="NAME", help="Only flows of this name.")
@click.option("--json", "as_json", is_flag=True, help="Print the flows as JSON.")
@connection_options
@backend_option
def list_flows(
    limit: int,
    status_filter: str | None,
    flow_name: str | None,
    as_json: bool,
    address: str | None,
    namespace: str | None,
    backend: str,
) -> None:
    """List recent flows, newest first.

    With no Temporal address configured, the flows are those of qwit run
    ($QWIT_DATA_DIR/run.db). A flow this process can't read (encrypted with
    a key it lacks) is listed with a note that says which key; its status is
    then Temporal's.
    """

    if backend == "local":
        raise click.UsageError(
            "qwit list: flows of --backend local live in the process that ran them"
        )

    async def go() -> list[Row]:
        async with temporal_for(address, namespace, sayer(console())) as client:
            try:
                return await find_flows(client, limit, status_filter, flow_name)
            except RPCError as exc:
                if is_unavailable(exc):
                    raise Failed(str(unreachable(client, exc, "to list flows"))) from None
                raise Failed(f"listing flows failed: {exc.message}") from None

    if backend == "postgres":
        from . import _postgres

        found = [
            Row(
                flow_id=row["id"],
                flow=row["name"],
                status=row["status"],
                started=_time(row["created_at"]),
                ended=_time(row["updated_at"]) if row["ended"] else "",
            )
            for row in _postgres.list_flows(limit, status_filter, flow_name)
        ]
    else:
        found = run_async(go())
    if as_json:
        click.echo(json.dumps([asdict(row) for row in found], indent=None))
        return
    out = console(stderr=False)
    if not found:
        out.print("no flows found")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    columns = ["flow id", "flow", "status", "started", "ended"]
    noted = any(row.note for row in found)
    for column in [*columns, "note"] if noted else columns:
        table.add_column(column)
    for row in found:
        cells: list[str | Text] = [row.flow_id, row.flow, status_text(row.status)]
        cells += [row.started, row.ended, *([row.note] if noted else [])]
        table.add_row(*cells)
    out.print(table)
