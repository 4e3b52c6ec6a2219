"""Bad input is refused before a server sees it, with a typed error naming the
step and the field (hypothesis; QWIT_RELIABILITY=full generates 10,000+).

Every generated case goes through `Client.prepare` (what `start` runs before
it talks to an engine). A sample of the valid ones, and of flows naming steps
no worker has, then runs on the real dev server: each must end, none stuck
retrying or terminated.
"""

from __future__ import annotations

import asyncio
import math
import os
import string
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
import temporalio.client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qwit
from tests.ledger import Effect

FULL = os.environ.get("QWIT_RELIABILITY") == "full"
GENERATED = {"cases": 0, "refused": 0}


class Alpha(Effect, name="bad.alpha"):
    pass


class Beta(Effect, name="bad.beta"):
    pass


class Gamma(Effect, name="bad.gamma"):
    pass


class Impostor(Effect, name="bad.alpha"):
    """Another class under Alpha's name."""


class Unserved(Effect, name="bad.unserved"):
    """Never registered on the worker."""


STEPS = [Alpha, Beta, Gamma]

keys = st.text(alphabet=string.ascii_letters + "_", min_size=1, max_size=6)
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=8,
)
json_objects = st.dictionaries(keys, json_values, max_size=4)
BAD_LEAVES = [
    (float("nan"), "finite"),
    (float("inf"), "finite"),
    (-math.inf, "finite"),
    ({1, 2}, "set"),
    (b"bytes", "bytes"),
    (object(), "object"),
    (1 + 2j, "complex"),
]


@st.composite
def args_and_defect(draw: st.DrawFn) -> tuple[dict[str, Any], str | None, str | None]:
    """JSON args, maybe with one bad value buried in them: (args, field, problem)."""
    args = draw(json_objects)
    if draw(st.booleans()):
        return args, None, None
    bad, problem = draw(st.sampled_from(BAD_LEAVES))
    value: Any = bad
    path = ""
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            key = draw(keys)
            value, path = {key: value}, f".{key}{path}"
        else:
            index = draw(st.integers(0, 2))
            value, path = [0] * index + [value], f"[{index}]{path}"
    top = draw(keys)
    args[top] = value
    return args, f"{top}{path}", problem


@dataclass
class Case:
    flow: type[qwit.Flow]
    args: dict[str, Any]
    error: type[Exception] | None = None
    fragments: list[str] = field(default_factory=list)


def make_flow(entries: list[tuple[Any, Any, dict[str, Any]]], name: str) -> type[qwit.Flow]:
    class Generated(qwit.Flow, name=name):
        def build_flow(self) -> None:
            for target, static, options in entries:
                self.step(target, static, **options)

    return Generated


DEFECTS = [
    "none",
    "no_steps",
    "not_a_step",
    "recursion",
    "duplicate_name",
    "bad_static",
    "bad_args",
    "unknown_option",
    "bad_option_value",
]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    defect = draw(st.sampled_from(DEFECTS))
    name = f"bad.flow.{uuid.uuid4().hex[:6]}"
    steps = draw(st.lists(st.sampled_from(STEPS), min_size=1, max_size=5))
    entries: list[tuple[Any, Any, dict[str, Any]]] = [(s, None, {}) for s in steps]
    args, field_path, problem = draw(args_and_defect())
    if defect != "bad_args":
        args, field_path = draw(json_objects), None
    position = draw(st.integers(0, len(entries)))
    label = f"step {position + 1}"
    case = Case(flow=qwit.Flow, args=args)
    if defect == "none":
        pass
    elif defect == "no_steps":
        entries = []
        case.error, case.fragments = qwit.FlowDefinitionError, [repr(name), "no steps"]
    elif defect == "not_a_step":
        thing = draw(st.sampled_from([42, "Alpha", Alpha(), dict, None]))
        entries.insert(position, (thing, None, {}))
        case.error, case.fragments = qwit.FlowDefinitionError, [label, "qwit.Step or qwit.Flow"]
    elif defect == "duplicate_name":
        entries.insert(position, (Impostor, None, {}))
        entries.insert(0, (Alpha, None, {}))
        case.error, case.fragments = qwit.FlowDefinitionError, ["'bad.alpha'", "two different"]
    elif defect == "bad_static":
        static, static_field, static_problem = draw(args_and_defect())
        if static_field is None:
            static, static_field, static_problem = {"x": {1}}, "x", "set"
        target = draw(st.sampled_from(STEPS))
        entries.insert(position, (target, static, {}))
        case.error = qwit.FlowDefinitionError
        assert static_problem is not None
        case.fragments = [
            f"{label} ({target.name!r})",
            f"field {static_field!r}",
            static_problem,
        ]
    elif defect == "bad_args":
        if field_path is None:
            args, field_path, problem = {"y": float("nan")}, "y", "finite"
        assert problem is not None
        case.error, case.fragments = qwit.ArgumentsError, [f"field {field_path!r}", problem]
    elif defect == "unknown_option":
        option = draw(st.sampled_from(["retries", "timeout_s", "rollback", "on_fail"]))
        entries.insert(position, (Beta, None, {option: 1}))
        case.error, case.fragments = qwit.FlowDefinitionError, [label, "unknown option", option]
    elif defect == "bad_option_value":
        option, value, words = draw(
            st.sampled_from(
                [
                    ("retry", 3, "qwit.Retry"),
                    ("timeout", -1, "positive"),
                    ("timeout", "soon", "seconds"),
                    ("on_failure", "explode", "unknown reaction"),
                    ("on_failure", qwit.RETRY, "not allowed"),
                    ("back_on_failure", qwit.SKIP, "not allowed"),
                    ("local", "yes", "True or False"),
                ]
            )
        )
        entries.insert(position, (Gamma, None, {option: value}))
        case.error, case.fragments = qwit.FlowDefinitionError, [label, words]
    flow = make_flow(entries, name)
    if defect == "recursion":

        class Loop(qwit.Flow, name=name):
            def build_flow(self) -> None:
                for target, static, options in entries:
                    self.step(target, static, **options)
                self.step(Loop)

        flow = Loop
        case.error, case.fragments = qwit.FlowDefinitionError, ["contains itself"]
    case.flow = flow
    case.args = args
    return case


@pytest.fixture(scope="module")
def offline_client() -> qwit.Client:
    return qwit.Client(task_queue="never-used")


@settings(
    max_examples=10_000 if FULL else 300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
def test_bad_definitions_and_args_are_refused_naming_step_and_field(
    offline_client: qwit.Client, case: Case
) -> None:
    GENERATED["cases"] += 1
    if case.error is None:
        input = offline_client.prepare(case.flow, case.args)
        assert input.args == case.args
        return
    with pytest.raises(case.error) as info:
        offline_client.prepare(case.flow, case.args)
    GENERATED["refused"] += 1
    message = str(info.value)
    for fragment in case.fragments:
        assert fragment in message, (fragment, message)


def test_generated_enough() -> None:
    """The property above really ran (its count, for the report)."""
    print(f"bad input: {GENERATED}")
    assert GENERATED["cases"] >= (10_000 if FULL else 300)
    assert GENERATED["refused"] > GENERATED["cases"] // 2


@settings(
    max_examples=200 if FULL else 25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    steps=st.lists(st.sampled_from([*STEPS, Unserved]), min_size=1, max_size=5),
    args=json_objects,
)
async def test_started_flows_end_even_naming_unserved_steps(
    steps: list[type[qwit.Step]], args: dict[str, Any], served: Any
) -> None:
    client, started = served
    flow = make_flow([(s, None, {}) for s in steps], f"bad.run.{uuid.uuid4().hex[:6]}")
    handle = await client.start(flow, {**args, "ledger": uuid.uuid4().hex})
    started.append(handle.id)
    if Unserved not in steps:
        await asyncio.wait_for(handle.result(), 30)
        return
    with pytest.raises(qwit.FlowRolledBack) as info:
        await asyncio.wait_for(handle.result(), 30)
    assert info.value.step == "bad.unserved"
    assert "not registered" in info.value.reason


@pytest.fixture(scope="module")
async def served(temporal_client: temporalio.client.Client) -> Any:
    from qwit.temporal import create_worker

    queue = f"bad-{uuid.uuid4().hex[:8]}"
    # Unserved steps are offered again for a short while only, to keep this quick.
    client = qwit.Client(temporal_client=temporal_client, task_queue=queue, unserved_step_timeout=1)
    started: list[str] = []
    async with create_worker(temporal_client, *STEPS, task_queue=queue):
        yield client, started
    # Every flow started ended, completed or failed (a QWIT failure): none is
    # still running (stuck) or was terminated by the server.
    statuses = [
        (await temporal_client.get_workflow_handle(flow_id).describe()).status
        for flow_id in started
    ]
    ended = {
        temporalio.client.WorkflowExecutionStatus.COMPLETED,
        temporalio.client.WorkflowExecutionStatus.FAILED,
    }
    stuck = [f for f, status in zip(started, statuses, strict=True) if status not in ended]
    assert started
    assert stuck == [], f"flows stuck or terminated: {stuck}"
