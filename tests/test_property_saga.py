"""Random flows keep the saga promise (hypothesis, on the real dev server).

Flows of random shape (sub-flows up to 3 levels, up to 8 steps), one failing
step that fails before or after applying its effect, random reactions on the
failing step and on the sub-flows. Every step records its effect in a ledger.
A small independent model of the rules predicts the exact ledger (every `do`
and `undo`, in order) and the outcome; the run must match it. With ROLLBACK
everywhere this is: each applied effect undone exactly once, newest first,
nothing else undone.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qwit
from tests import ledger
from tests.ledger import Effect
from tests.saga_model import (
    FlowSpec,
    StepSpec,
    fail_args,
    flow_class,
    model,
    random_flow,
)


class Eff(Effect, name="prop.eff"):
    """One step class for every node: its effect id comes from static args."""


class _Draws:
    """``random_flow``'s source of choices, drawn with hypothesis (so it shrinks)."""

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw

    def randint(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))

    def choice(self, options: Sequence[Any]) -> Any:
        return self.draw(st.sampled_from(options))


@st.composite
def flows(draw: st.DrawFn) -> FlowSpec:
    return random_flow(_Draws(draw))


@pytest.fixture(scope="module")
async def prop_env(temporal_client: Any) -> Any:
    from qwit.temporal import create_worker

    queue = f"prop-{uuid.uuid4().hex[:8]}"
    client = await qwit.connect(temporal_client=temporal_client, task_queue=queue)
    async with create_worker(temporal_client, Eff, task_queue=queue):
        yield client


KIND = {
    qwit.FlowRolledBack: "rolled_back",
    qwit.FlowAborted: "aborted",
}


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=flows())
async def test_random_flows_match_the_model(prop_env: qwit.Client, spec: FlowSpec) -> None:
    run = uuid.uuid4().hex
    expected_kind, expected_log = model(spec)
    failed_step: str | None = "-"
    try:
        await prop_env.run(flow_class(spec, Eff), {"ledger": run, **fail_args(spec)})
        kind = "completed"
    except qwit.FlowFailed as failed:
        kind = KIND[type(failed)]
        failed_step = failed.step
    assert failed_step is not None
    assert (kind, ledger.entries(run)) == (expected_kind, expected_log)
    # each applied effect is undone at most once, and only applied ones are undone
    undone = ledger.undone(run)
    assert len(undone) == len(set(undone))
    assert set(undone) <= set(ledger.applied(run))


def test_the_model_with_rollback_everywhere_undoes_everything_newest_first():
    spec = FlowSpec(
        children=[
            StepSpec("a"),
            FlowSpec(children=[StepSpec("b"), FlowSpec(children=[StepSpec("c")])]),
            StepSpec("d", fails=True, after=True),
        ]
    )
    kind, log = model(spec)
    assert kind == "rolled_back"
    assert log == [
        ("do", "a"),
        ("do", "b"),
        ("do", "c"),
        ("do", "d"),
        ("undo", "d"),
        ("undo", "c"),
        ("undo", "b"),
        ("undo", "a"),
    ]
