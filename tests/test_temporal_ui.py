"""What an operator sees of QWIT flows in Temporal's own UI and CLI: every flow
that does not complete is findable by its outcome, a waiting flow says what it
waits for and how to decide, activities and handlers are described, the input
opens on the args, and a failure names the flow and the step."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import temporalio.client
from temporalio.api.enums.v1 import EventType

import qwit
from tests.ledger import Effect
from tests.test_temporal_reactions import wait_status


class UiA(Effect, name="ui.a"):
    pass


class UiFails(Effect, name="ui.fails"):
    pass


class UiWaits(Effect, name="ui.waits"):
    on_failure = qwit.WAIT


class UiFlow(qwit.Flow, name="ui.flow"):
    def build_flow(self) -> None:
        self.step(UiA)
        self.step(UiFails)


class UiWaitingFlow(qwit.Flow, name="ui.waiting_flow"):
    def build_flow(self) -> None:
        self.step(UiA)
        self.step(UiWaits)


async def events(client: temporalio.client.Client, flow_id: str) -> list[Any]:
    history = await client.get_workflow_handle(flow_id).fetch_history()
    return list(history.events)


def upserts(evts: list[Any]) -> int:
    kind = EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES
    return sum(1 for e in evts if e.event_type == kind)


async def found(client: temporalio.client.Client, query: str) -> list[str]:
    for _ in range(100):  # visibility is eventually consistent
        ids = [w.id async for w in client.list_workflows(query)]
        if ids:
            return ids
        await asyncio.sleep(0.1)
    return []


async def test_every_flow_that_does_not_complete_is_found_by_its_outcome(
    client: qwit.Client, worker: Any, temporal_client: temporalio.client.Client
):
    async with worker(UiFlow):
        ok = await client.start(UiFlow, {"ledger": "ui"})
        await ok.result()
        bad = await client.start(UiFlow, {"ledger": "ui", "fail": "ui.fails"})
        with pytest.raises(qwit.FlowRolledBack):
            await bad.result()
    ids = await found(temporal_client, f'QwitStatus="rolled_back" AND WorkflowId="{bad.id}"')
    assert ids == [bad.id]
    # one event on the failed path, none on the completed one
    assert upserts(await events(temporal_client, bad.id)) == 1
    assert upserts(await events(temporal_client, ok.id)) == 0


async def test_a_waiting_flow_says_what_it_waits_for_and_how_to_decide(
    client: qwit.Client, worker: Any, temporal_client: temporalio.client.Client
):
    async with worker(UiWaitingFlow):
        handle = await client.start(UiWaitingFlow, {"ledger": "ui", "fail": "ui.waits"})
        await wait_status(handle, "waiting")
        wf = temporal_client.get_workflow_handle(handle.id)
        meta = await wf.query("__temporal_workflow_metadata")
        details = meta.current_details
        assert "Waiting for an operator" in details
        assert "ui.waits" in details
        assert f"qwit react {handle.id} retry|skip|skipback|rollback|abort" in details
        assert "temporal workflow update execute" in details
        assert "--name qwit.react" in details
        described = {q.name: q.description for q in meta.definition.query_definitions}
        assert "status" in described["qwit.state"]
        updates = {u.name: u.description for u in meta.definition.update_definitions}
        assert "reaction" in updates["qwit.react"]
        await handle.react(qwit.ABORT)
        with pytest.raises(qwit.FlowAborted):
            await handle.result()


async def test_activities_have_summaries_and_the_input_opens_on_the_args(
    client: qwit.Client, worker: Any, temporal_client: temporalio.client.Client
):
    async with worker(UiFlow):
        handle = await client.start(UiFlow, {"ledger": "ui", "fail": "ui.fails"})
        with pytest.raises(qwit.FlowRolledBack):
            await handle.result()
    evts = await events(temporal_client, handle.id)
    started = evts[0].workflow_execution_started_event_attributes
    first_key = next(iter(json.loads(started.input.payloads[0].data)))
    assert first_key == "args"
    summaries = [
        json.loads(e.user_metadata.summary.data)
        for e in evts
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    assert summaries == ["1 ui.a", "2 ui.fails", "2 ui.fails", "1 ui.a"]
    failed = next(
        e.workflow_execution_failed_event_attributes.failure
        for e in evts
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED
    )
    assert failed.message.startswith(f"ui.flow: flow {handle.id!r} rolled back at step 'ui.fails'")
