"""A failing step's error reaches people whole: its own frames in Temporal's
history, the worker's log and the flow's error; expected failures are quiet;
an exception that can't even say what it is keeps its class."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
import temporalio.client
from temporalio.api.enums.v1 import EventType

import qwit
from tests.conftest import EngineEnv
from tests.test_edges import ended


def price_of(order: dict[str, Any]) -> int:
    return int(order["cents"])  # KeyError: 'cents'


class Priced(qwit.Step, name="errors.priced"):
    retry = qwit.Retry(max_attempts=1)

    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"price": price_of(args)}


class Declines(qwit.Step, name="errors.declines"):
    async def step_forward(self, args: dict[str, Any]) -> None:
        raise qwit.StepError("card declined", retry=False)


class Unspeakable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no words")


class Mute(qwit.Step, name="errors.mute"):
    retry = qwit.Retry(max_attempts=1)

    async def step_forward(self, args: dict[str, Any]) -> None:
        raise Unspeakable(object())  # args that can't be serialised, a __str__ that raises


def _flow(step: type[qwit.Step], **options: Any) -> type[qwit.Flow]:
    class OneStep(qwit.Flow, name=f"errors.flow.{step.name}.{len(options)}"):
        def build_flow(self) -> None:
            self.step(step, **options)

    return OneStep


PRICED = _flow(Priced)
DECLINES = _flow(Declines)
MUTE = _flow(Mute)
MUTE_SKIPPED = _flow(Mute, on_failure={Unspeakable: qwit.SKIP})


async def test_the_steps_own_frames_reach_the_flows_error(engine_env: EngineEnv):
    async with engine_env.serve(PRICED):
        kind, err = await ended(await engine_env.client.start(PRICED, {}))
    assert kind == "rolled_back"
    assert err.error_type == "builtins.KeyError"
    trace = err.info.error.traceback
    assert "in price_of" in trace
    assert 'return int(order["cents"])' in trace
    assert trace.rstrip().endswith("KeyError: 'cents'")


async def test_the_steps_own_frames_reach_temporals_history_and_the_log(
    client: qwit.Client,
    worker: Any,
    temporal_client: temporalio.client.Client,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO)
    async with worker(PRICED):
        handle = await client.start(PRICED, {})
        with pytest.raises(qwit.FlowRolledBack):
            await handle.result()
    history = await temporal_client.get_workflow_handle(handle.id).fetch_history()
    failed = [
        e.activity_task_failed_event_attributes.failure
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED
    ]
    assert len(failed) == 1
    assert "in price_of" in failed[0].cause.stack_trace
    assert __file__.rsplit("/", 1)[-1] in failed[0].cause.stack_trace
    logged = [
        r for r in caplog.records if r.getMessage().startswith("Completing activity as failed")
    ]
    assert logged, "the SDK logs the failed attempt"
    text = logging.Formatter().formatException(logged[-1].exc_info)  # type: ignore[arg-type]
    assert "in price_of" in text


async def test_an_expected_failure_is_one_info_line(
    client: qwit.Client, worker: Any, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    async with worker(DECLINES):
        with pytest.raises(qwit.FlowRolledBack):
            await client.run(DECLINES, {})
    mine = [r for r in caplog.records if r.name == "qwit.step"]
    assert [(r.levelno, "card declined (not retried)" in r.getMessage()) for r in mine] == [
        (logging.INFO, True)
    ]
    loud = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING
        and r.getMessage().startswith("Completing activity as failed")
    ]
    assert loud == []


async def test_an_error_that_cannot_say_what_it_is_keeps_its_class(engine_env: EngineEnv):
    async with engine_env.serve(MUTE, MUTE_SKIPPED):
        kind, err = await ended(await engine_env.client.start(MUTE, {}))
        skipped, _ = await ended(
            await engine_env.client.start(MUTE_SKIPPED, {"id": uuid.uuid4().hex})
        )
    assert kind == "rolled_back"
    assert err.error_type == f"{__name__}.Unspeakable"
    assert "could not be read" in err.reason
    assert skipped == "completed"
