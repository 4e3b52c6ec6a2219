"""Deploys: flows waiting mid-way while the worker is replaced by one whose Flow
code changed. Flows in flight finish on the plan they started with; new flows
use the new one; while two versions serve one task queue, every flow finds the
worker that serves each of its steps; a step no worker serves fails its flow in
bounded time instead of leaving it stuck."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowExecutionStatus
from temporalio.worker import Replayer

import qwit
from qwit._plan import PLAN_VERSION
from qwit.temporal import DevServer, QwitPlugin, _workflow
from qwit.testing import wait_for_status
from tests.conftest import NEWER_PLAN_PREFIX
from tests.reliability import deploy_v1, deploy_v2
from tests.reliability.crash import Worker


async def until_waiting(handle: qwit.FlowHandle) -> None:
    await wait_for_status(handle, "waiting")


def serve(module: str, server: DevServer, queue: str, tmp_path: Path) -> Worker:
    worker = Worker(
        server.address, queue, tmp_path / f"{module}.log", f"tests.reliability.{module}"
    )
    worker.mark()
    return worker


@pytest.mark.timeout(300)
async def test_flows_in_flight_keep_their_plan_across_a_deploy(dev_server, tmp_path):
    queue = f"deploy-{uuid.uuid4().hex[:8]}"
    client = await qwit.connect(target_host=dev_server.address, task_queue=queue)
    v1 = serve("deploy_v1", dev_server, queue, tmp_path)
    await v1.start()
    try:
        old = [await client.start(deploy_v1.Release, {"n": i}) for i in range(5)]
        for handle in old:
            await until_waiting(handle)
    finally:
        v1.stop()
    assert v1.proc is not None and v1.proc.returncode == 0

    v2 = serve("deploy_v2", dev_server, queue, tmp_path)
    await v2.start()
    try:
        new = await client.start(deploy_v2.Release, {"n": 99, "approved": True})
        for handle in old:
            await handle.react(qwit.RETRY, args={"approved": True})
        results = [await asyncio.wait_for(h.result(), 30) for h in old]
        new_result = await asyncio.wait_for(new.result(), 30)
        states = [await h.state() for h in old]
    finally:
        v2.stop()
    for result, state in zip(results, states, strict=True):
        # the plan of version 1: no completed/published, the old step ran (new code)
        assert result["finished_by"] == "v2"
        assert "completed_by" not in result
        assert "published" not in result
        assert [s.name for s in state.steps] == [
            "deploy.prepare",
            "deploy.approve",
            "deploy.finish",
        ]
    assert new_result["completed_by"] == "v2"
    assert new_result["published"] is True
    assert "finished_by" not in new_result


@pytest.mark.timeout(300)
async def test_a_worker_missing_an_old_step_fails_the_flow_in_bounded_time(dev_server, tmp_path):
    queue = f"deploy-{uuid.uuid4().hex[:8]}"
    client = await qwit.connect(
        target_host=dev_server.address, task_queue=queue, unserved_step_timeout=3
    )
    v1 = serve("deploy_v1", dev_server, queue, tmp_path)
    await v1.start()
    try:
        handle = await client.start(deploy_v1.Release, {})
        await until_waiting(handle)
    finally:
        v1.stop()
    v3 = serve("deploy_v3", dev_server, queue, tmp_path)
    await v3.start()
    try:
        await handle.react(qwit.RETRY, args={"approved": True})
        with pytest.raises(qwit.FlowRolledBack) as info:
            await asyncio.wait_for(handle.result(), 20)
    finally:
        v3.stop()
    assert info.value.step == "deploy.finish"
    assert "not registered" in info.value.reason
    assert repr(queue) in info.value.reason


class A(qwit.Step, name="mixed.a"):
    async def step_forward(self, args: dict) -> dict:
        return {"a": True}


class C(qwit.Step, name="mixed.c"):
    async def step_forward(self, args: dict) -> dict:
        return {"c": True}


class B(qwit.Step, name="mixed.b"):
    """Only version 2 of the workers has it."""

    async def step_forward(self, args: dict) -> dict:
        return {"b": True}


class MixedV2(qwit.Flow, name="mixed.flow"):
    def build_flow(self) -> None:
        self.step(A)
        self.step(B)
        self.step(C)


@pytest.mark.timeout(300)
async def test_two_worker_versions_at_once_run_every_new_flow(dev_server, temporal_client):
    # A rolling deploy: v1 (no step B) and v2 poll one task queue. Before, the
    # first worker to take B failed it for good: 11 of 20 new flows rolled back.
    from qwit.temporal import connect_temporal, create_worker

    queue = f"mixed-{uuid.uuid4().hex[:8]}"
    client = await qwit.connect(temporal_client=temporal_client, task_queue=queue)
    # two processes' worth of workers: each its own connection
    other = await connect_temporal(target_host=dev_server.address)
    v1 = create_worker(temporal_client, A, C, task_queue=queue)
    v2 = create_worker(other, A, B, C, task_queue=queue)
    async with v1, v2:
        handles = [await client.start(MixedV2, {"n": i}) for i in range(20)]
        results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 240)
    assert all(r == {"n": i, "a": True, "b": True, "c": True} for i, r in enumerate(results))


async def _task_failures(temporal_client: Any, flow_id: str) -> tuple[list[str], int]:
    """Messages of the workflow task failures in a flow's history (Temporal
    records the first of a series), and the attempt of its pending task."""
    handle = temporal_client.get_workflow_handle(flow_id)
    # (the attempt first: a failure it counts is in the history read after;
    # read the other way round, a failure between the two reads was counted
    # and not found, as once in CI)
    described = await handle.describe()
    history = await handle.fetch_history()
    messages = [
        event.workflow_task_failed_event_attributes.failure.message
        for event in history.events
        if event.HasField("workflow_task_failed_event_attributes")
    ]
    return messages, described.raw_description.pending_workflow_task.attempt


@pytest.mark.timeout(120)
async def test_a_flow_whose_plan_is_newer_than_the_worker_waits_for_one_that_reads_it(
    client, worker, temporal_client, monkeypatch
):
    # Clients upgraded before workers: a flow started with a newer plan than
    # the worker knows. Before, the old worker failed it (PlanVersionError):
    # a rolling deploy lost the flows started meanwhile.
    flow_id = f"{NEWER_PLAN_PREFIX}{uuid.uuid4().hex}"
    prepared = client.prepare(MixedV2, {"n": 1}, id=flow_id)
    newer = prepared.model_copy(update={"version": PLAN_VERSION + 1})
    async with worker(A, B, C):
        handle = await client.engine(MixedV2.backend).start(MixedV2, newer)
        deadline = time.monotonic() + 30
        # offered again and again (the attempt counts up), failing each time
        while (found := await _task_failures(temporal_client, handle.id))[1] < 2:
            assert time.monotonic() < deadline, f"not offered again: {found}"
            await asyncio.sleep(0.2)
        failures, _ = found
        assert failures and all("newer than this worker understands" in m for m in failures)
        described = await temporal_client.get_workflow_handle(handle.id).describe()
        assert described.status == WorkflowExecutionStatus.RUNNING
        # the worker is upgraded: the next offer of the flow runs it
        monkeypatch.setattr(_workflow, "PLAN_VERSION", PLAN_VERSION + 1)
        result = await asyncio.wait_for(handle.result(), 60)
        # and its history replays on such a worker (the session's replay, on
        # this QWIT's plan version, leaves it out)
        history = await temporal_client.get_workflow_handle(flow_id).fetch_history()
        await Replayer(workflows=[], plugins=[QwitPlugin()]).replay_workflow(history)
    assert result == {"n": 1, "a": True, "b": True, "c": True}


class Hold(qwit.Step, name="mixed.hold"):
    """Its first attempt runs until its worker stops, and fails then."""

    retry = qwit.Retry(max_attempts=3, initial_interval=0.1)
    back_retry = qwit.Retry(max_attempts=1)

    async def step_forward(self, args: dict) -> dict:
        HELD.set()
        await asyncio.sleep(3)
        raise RuntimeError("the service went away")

    async def step_back(self, args: dict) -> None:
        return None


HELD = asyncio.Event()


class HoldFlow(qwit.Flow, name="mixed.hold_flow"):
    def build_flow(self) -> None:
        self.step(A)
        self.step(Hold)


@pytest.mark.timeout(120)
async def test_a_step_its_worker_ran_before_going_away_is_undone(dev_server, temporal_client):
    # The worker serving mixed.hold runs its first attempt for 3 s (longer
    # than unserved_step_timeout), then goes away; the retry is taken by a
    # worker that lacks the step. The time unserved counts from that refusal
    # (not from the first offer: the step was served until then), and since
    # the step ran, the rollback tries its undo (no worker serves it either:
    # CompensationFailed names it). Before, it failed at the first refusal as
    # never started: FlowRolledBack, its effect left without a word.
    from qwit.temporal import connect_temporal, create_worker

    HELD.clear()
    queue = f"mixed-{uuid.uuid4().hex[:8]}"
    client = await qwit.connect(
        temporal_client=temporal_client, task_queue=queue, unserved_step_timeout=1
    )
    other = await connect_temporal(target_host=dev_server.address)
    lacking = create_worker(temporal_client, A, C, task_queue=queue)
    serving = create_worker(other, HoldFlow, task_queue=queue)
    async with serving:
        handle = await client.start(HoldFlow, {})
        await asyncio.wait_for(HELD.wait(), 30)
        await lacking.__aenter__()  # the other worker comes once it holds
    try:  # the serving worker is gone
        began = time.monotonic()
        with pytest.raises(qwit.CompensationFailed) as info:
            await asyncio.wait_for(handle.result(), 60)
    finally:
        await lacking.__aexit__(None, None, None)
    err = info.value
    assert err.step == "mixed.hold" and err.error_type == "qwit.StepNotRegistered"
    assert err.failed_compensations == ["mixed.hold"]
    assert err.compensated == ["mixed.a"]
    assert time.monotonic() - began >= 1
