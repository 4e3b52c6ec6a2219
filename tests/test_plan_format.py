"""The plan format on the wire: compact (version 2) and whole (version 1).

Every flow's history holds its plan and every step's call and return, so they
are written compactly; what is left out is pinned by the plan's version, so a
flow in flight keeps its settings whatever later QWIT changes.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

import qwit
from qwit._flow import compile_flow
from qwit._plan import (
    PINNED_DEFAULTS,
    PLAN_VERSION,
    WIRE_GRACE,
    FlowInput,
    StepCall,
    StepNode,
    StepReturn,
    WireCall,
    forward_key,
    path_of,
    walk,
)


class Plain(qwit.Step, name="format.plain"):
    async def step_forward(self, args: dict[str, Any]) -> None:
        return None

    async def step_back(self, args: dict[str, Any]) -> None:
        return None


class Size(BaseModel):
    size: int = 0


class Typed(qwit.Step, name="format.typed"):
    async def step_forward(self, args: Size) -> None:
        return None

    async def step_back(self, args: Size) -> None:
        return None


class ForwardTyped(qwit.Step, name="format.forward_typed"):
    """Typed forward only: its step_back reads every arg."""

    async def step_forward(self, args: Size) -> None:
        return None

    async def step_back(self, args: dict[str, Any]) -> None:
        return None


class Tuned(qwit.Step, name="format.tuned"):
    retry = qwit.Retry(max_attempts=5)
    timeout = 12.5
    timeout_grace = 3

    async def step_forward(self, args: dict[str, Any]) -> None:
        return None


class Inner(qwit.Flow, name="format.inner"):
    def build_flow(self) -> None:
        self.step(Plain)
        self.step(Tuned, {"s": 1}, local=True)


class Outer(qwit.Flow, name="format.outer"):
    def build_flow(self) -> None:
        self.step(Plain)
        self.step(Typed)
        self.step(ForwardTyped)
        self.step(Inner, on_failure="wait")
        self.step(Tuned)


def outer_input(version: int = PLAN_VERSION) -> FlowInput:
    return FlowInput(
        flow=compile_flow(Outer),
        args={"order": 7},
        root_id="order-7",
        execution="kCxUVvCRSCmj3Z-rESyozQ",
        payload_limit=2 * 1024 * 1024,
        unserved_step_timeout=60.0,
        version=version,
    )


@pytest.mark.parametrize("version", [1, PLAN_VERSION])
def test_an_input_reads_back_as_it_was_written(version: int) -> None:
    original = outer_input(version)
    assert FlowInput.model_validate_json(original.model_dump_json()) == original
    assert FlowInput.model_validate(original.model_dump(mode="json")) == original


def test_a_compact_plan_leaves_out_what_its_version_pins() -> None:
    data = json.loads(outer_input().model_dump_json())
    assert set(data) == {"args", "root_id", "version", "execution", "flow"}
    plain, typed, forward_typed, inner, tuned = data["flow"]["steps"]
    assert plain == {"name": "format.plain"}
    # back_fields left out when equal to fields, written when not
    assert typed == {"name": "format.typed", "fields": ["size"]}
    assert forward_typed == {
        "name": "format.forward_typed",
        "fields": ["size"],
        "back_fields": None,
    }
    assert inner["kind"] == "flow"
    assert inner["on_failure"] == {"rules": [], "default": "wait"}
    assert inner["steps"][0] == {"name": "format.plain"}
    assert tuned == {
        "name": "format.tuned",
        "retry": {"max_attempts": 5, "initial_interval": 1.0, "backoff": 2.0, "max_interval": 60.0},
        "timeout": 12.5,
        "timeout_grace": 3.0,
        "has_back": False,
    }
    # the whole plan of version 1: every field of every node
    whole = json.loads(outer_input(1).model_dump_json())
    assert set(whole["flow"]["steps"][0]) == set(StepNode.model_fields)
    assert len(json.dumps(data)) * 2.5 < len(json.dumps(whole))


def test_what_a_compact_plan_leaves_out_is_read_from_its_versions_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pinned: a later QWIT whose defaults differ reads the flow's own settings.
    text = outer_input().model_dump_json()
    table = PINNED_DEFAULTS[PLAN_VERSION]
    monkeypatch.setitem(table["step"], "timeout", 99.0)
    monkeypatch.setitem(table["input"], "unserved_step_timeout", 5.0)
    read = FlowInput.model_validate_json(text)
    assert read.unserved_step_timeout == 5.0
    steps = [node for _, node, _ in walk(read.flow) if isinstance(node, StepNode)]
    assert [s.timeout for s in steps] == [99.0, 99.0, 99.0, 99.0, 12.5, 12.5]


def test_the_policies_a_compact_plan_leaves_out_are_one_instance_for_every_flow() -> None:
    # A flow's plan is read on every workflow task of its replays: the policies
    # it leaves out are shared (frozen) instances, not parsed anew per node.
    text = outer_input().model_dump_json()
    first, second = FlowInput.model_validate_json(text), FlowInput.model_validate_json(text)
    steps = [
        node
        for read in (first, second)
        for _, node, _ in walk(read.flow)
        if isinstance(node, StepNode)
    ]
    plain = [s for s in steps if s.name != "format.tuned"]
    assert len({id(s.retry) for s in plain}) == 1
    assert len({id(s.back_retry) for s in plain}) == 1
    assert len({id(s.on_failure) for s in steps if not s.on_failure.rules}) == 1
    assert plain[0].retry == qwit.Retry() and plain[0].back_retry == steps[0].back_retry
    # what a node says itself is its own
    tuned = [s for s in steps if s.name == "format.tuned"]
    assert {s.retry.max_attempts for s in tuned} == {5}
    assert tuned[0].retry is not tuned[1].retry
    # and the whole plan reads back as it was written
    assert first == outer_input() and first.model_dump_json() == text


def test_the_pinned_table_is_what_qwit_compiles_today() -> None:
    # Otherwise every plan would write out what the table should have left out.
    plain = compile_flow(Outer).steps[0]
    assert isinstance(plain, StepNode)
    whole = plain.model_dump(mode="json")
    for key, value in PINNED_DEFAULTS[PLAN_VERSION]["step"].items():
        assert whole[key] == value, key
    assert outer_input().model_dump(mode="json")["flow"]["steps"][0] == {"name": "format.plain"}


def test_a_call_is_sent_without_what_the_worker_learns_from_its_task() -> None:
    call = StepCall(
        flow_id="order-7",
        path="4.2",
        step="format.tuned",
        direction="step_forward",
        args={"s": 1},
        key=forward_key("kCxUVvCRSCmj3Z-rESyozQ/4#2", "4.2", 3),
        timeout=300.0,
    )
    sent = WireCall.of(call, WIRE_GRACE)
    assert json.loads(sent.model_dump_json()) == {"args": {"s": 1}, "key": call.key}
    read = WireCall.model_validate_json(sent.model_dump_json())
    assert (
        read.call(
            flow_id="order-7/~4#2", step="format.tuned", direction="step_forward", limit=330.0
        )
        == call
    )
    # a grace other than the pinned one: the timeout is sent
    other = WireCall.of(call, 3.0)
    assert json.loads(other.model_dump_json())["timeout"] == 300.0
    assert (
        other.call(flow_id="order-7", step="format.tuned", direction="step_forward", limit=303.0)
        == call
    )
    # no args: nothing of them is sent
    assert "args" not in json.loads(
        WireCall.of(call.model_copy(update={"args": {}}), 30.0).model_dump_json()
    )


def test_a_whole_call_of_an_older_plan_is_read_as_it_was() -> None:
    old = StepCall(
        flow_id="order-7", path="2", step="format.plain", direction="step_back", args={"a": 1}
    )
    read = WireCall.model_validate_json(old.model_dump_json())
    assert read.call(flow_id="order-7/2", step="x", direction="step_forward", limit=None) == old


@pytest.mark.parametrize(
    ("key", "path"),
    [
        ("kCxUVvCRSCmj3Z-rESyozQ/1", "1"),
        ("kCxUVvCRSCmj3Z-rESyozQ/12~3", "12"),
        ("kCxUVvCRSCmj3Z-rESyozQ/2#2/2.1", "2.1"),
        ("kCxUVvCRSCmj3Z-rESyozQ/2#2/2.3#4/2.3.1~2", "2.3.1"),
        ("0123456789abcdef0123456789abcdef/3", "3"),
    ],
)
def test_a_key_ends_in_its_steps_path(key: str, path: str) -> None:
    assert path_of(key) == path


def test_a_call_whose_key_does_not_end_in_its_path_sends_its_path() -> None:
    """The undo of what a fallback did is keyed ``<forward key>/step_fallback``:
    its path travels with it; a call without a key is refused."""
    call = StepCall(
        flow_id="f", path="2", step="s", direction="step_back", args={}, key="e/2/step_fallback"
    )
    wire = WireCall.of(call, WIRE_GRACE)
    assert wire.model_dump() == {"key": "e/2/step_fallback", "path": "2"}
    back = wire.call(flow_id="f", step="s", direction="step_back", limit=330.0)
    assert (back.path, back.idempotency_key) == ("2", "e/2/step_fallback/step_back")
    plain = call.model_copy(update={"key": "e/2"})
    assert "path" not in WireCall.of(plain, WIRE_GRACE).model_dump()
    with pytest.raises(ValueError, match="has no key"):
        WireCall.of(call.model_copy(update={"key": None}), WIRE_GRACE)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (StepReturn(), "[{}]"),
        (StepReturn(output={"a": 1}), '[{"a":1}]'),
        (StepReturn(output={"a": 1}, attempt=3), '[{"a":1},3]'),
    ],
)
def test_a_return_is_written_as_a_list(value: StepReturn, text: str) -> None:
    assert value.model_dump_json() == text
    assert StepReturn.model_validate_json(text) == value


def test_a_return_of_an_older_worker_is_read() -> None:
    read = StepReturn.model_validate_json('{"output": {"a": 1}, "attempt": 2}')
    assert read == StepReturn(output={"a": 1}, attempt=2)
