"""Random flows keep the saga promise (hypothesis), on Temporal and on qwit.local.

Each example draws a flow (``saga_model.random_scenario``): sub-flows up to 3
levels, up to 8 steps, plain and ``async`` steps, 0 to 2 failing steps that
fail before or after applying their effect or outlive their timeout, a step
whose first attempt outlives its timeout, and random reactions, WAIT among
them. The test plays the operator: at each wait it answers with the drawn
decision (RETRY, unchanged or with args that fix the failure, SKIP, SKIPBACK,
ROLLBACK, ABORT), on steps and on sub-flows. Some examples are cancelled:
once a drawn step holds after (or before) applying its effect, or at a drawn
wait instead of deciding. Some reuse the id of a flow that ended before.

Steps apply their effects through ``strict_ledger``, a provider that dedups on
the idempotency key; an independent model (``saga_model.predict``) says which
effects the run must apply and undo, in which order, and how it ends; the
strict ledger's rules (``strict_ledger.violations``) are the oracle of every
example: keys fresh per execution and stable across retries, undo once, only
after the forward ended, newest first, nothing after the flow's end.

Timeouts: a timing-out step has ``timeout=1`` and ``timeout_grace=5``; its
attempt sleeps past the timeout, is cancelled there (``async``: at its
``await``; plain: through ``context().cancelled``, which it reads only after a
while), takes 0.6 s more to stop, and may apply its effect late.

Examples: ``QWIT_PROPERTY_EXAMPLES`` (default 20) on Temporal and as many on
qwit.local, e.g. ``QWIT_PROPERTY_EXAMPLES=1000 pytest tests/test_property_saga.py``.
A summary of what ran (flows, outcomes, decisions, cancels, timeouts) is
printed at the end of the module, and written as JSON to the file named by
``QWIT_PROPERTY_SUMMARY`` if set. ``QWIT_PROPERTY_EXPLICIT=0`` leaves out the
fixed examples that every run plays first (to see what the drawn ones find).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import qwit
from tests import strict_ledger
from tests.saga_model import (
    Cancel,
    FlowSpec,
    Prediction,
    StepSpec,
    model,
    predict,
    random_scenario,
    scenario_flow_class,
    steps_of,
)
from tests.strict_ledger import MARK, Expected

EXAMPLES = int(os.environ.get("QWIT_PROPERTY_EXAMPLES") or 20)
TIMEOUT = 1.0  # a timing-out step's timeout
GRACE = 5.0  # its timeout_grace
LINGER = 0.6  # how long a timed-out attempt takes to stop once told
LONG = 30.0  # what a step that waits to be stopped would wait, at most
EXAMPLE_LIMIT = 120.0  # one example must end within this

LEDGER = strict_ledger.Ledger()


def _plan(args: dict[str, Any]) -> tuple[str, bool]:
    """The step's mode (``ok`` once an operator fixed it) and whether it holds."""
    eid = args["eid"]
    mode = "ok" if args.get(f"fix_{eid}") else args["mode"]
    holding = mode == "ok" and args.get("hold") == f"{eid}@{args.get('epoch', 0)}"
    return mode, holding


def _times_out(mode: str, attempt: int) -> bool:
    return mode == "timeout" or (mode == "slow" and attempt == 1)


def _output(args: dict[str, Any]) -> dict[str, Any]:
    return {f"out_{args['eid']}": args.get("epoch", 0)}


class PropAsync(qwit.Step, name="prop.async"):
    """Static args: ``eid``, ``mode``, ``late`` (saga_model.MODES and LATE).
    Flow args: ``run``, ``epoch``, ``fix_<eid>``, ``hold`` (``eid@epoch``),
    ``hold_before``."""

    retry = qwit.Retry(max_attempts=1)
    back_retry = qwit.Retry(max_attempts=3, initial_interval=0.1, max_interval=0.1)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        mode, holding = _plan(args)
        with LEDGER.attempt(args) as effect:
            if _times_out(mode, qwit.context().attempt):
                try:
                    await asyncio.sleep(LONG)
                except asyncio.CancelledError:
                    await asyncio.sleep(LINGER)  # stopping takes a while
                    if args["late"] == "drop":
                        raise
                    effect.do()  # the request had gone out: its effect lands late
                    if args["late"] == "effect":
                        raise
                    return _output(args)  # swallowed the cancel: too late all the same
                raise AssertionError("not cancelled at its deadline")
            if holding and args.get("hold_before"):
                effect.mark("hold")
                await asyncio.sleep(LONG)
                raise AssertionError("not cancelled while holding")
            if mode == "before":
                raise qwit.StepError(f"{args['eid']} failed", retry=False)
            effect.do()
            if holding:
                effect.mark("hold")
                await asyncio.sleep(LONG)
                raise AssertionError("not cancelled while holding")
            if mode == "after":
                raise qwit.StepError(f"{args['eid']} failed after its effect", retry=False)
            return _output(args)

    async def step_back(self, args: dict[str, Any]) -> None:
        with LEDGER.attempt(args) as effect:
            effect.undo()


def _until_cancelled(ctx: qwit.StepContext) -> None:
    stop = time.monotonic() + LONG
    while not ctx.cancelled:
        if time.monotonic() > stop:
            raise AssertionError("not cancelled while holding")
        time.sleep(0.02)
    raise RuntimeError("stopped: cancelled")


class PropSync(qwit.Step, name="prop.sync"):
    """The same as PropAsync, as plain methods (run in a thread): it can't be
    interrupted, it only reads ``context().cancelled``."""

    retry = qwit.Retry(max_attempts=1)
    back_retry = qwit.Retry(max_attempts=3, initial_interval=0.1, max_interval=0.1)

    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        mode, holding = _plan(args)
        ctx = qwit.context()
        with LEDGER.attempt(args) as effect:
            if _times_out(mode, ctx.attempt):
                time.sleep(TIMEOUT + LINGER)  # past the deadline: reads `cancelled` late
                if not ctx.cancelled:
                    raise AssertionError("not told to stop at its deadline")
                if args["late"] == "drop":
                    raise RuntimeError("stopped: timed out")
                effect.do()
                if args["late"] == "effect":
                    raise RuntimeError("stopped after its effect: timed out")
                return _output(args)
            if holding and args.get("hold_before"):
                effect.mark("hold")
                _until_cancelled(ctx)
            if mode == "before":
                raise qwit.StepError(f"{args['eid']} failed", retry=False)
            effect.do()
            if holding:
                effect.mark("hold")
                _until_cancelled(ctx)
            if mode == "after":
                raise qwit.StepError(f"{args['eid']} failed after its effect", retry=False)
            return _output(args)

    def step_back(self, args: dict[str, Any]) -> None:
        with LEDGER.attempt(args) as effect:
            effect.undo()


STEPS: dict[bool, type[qwit.Step]] = {False: PropAsync, True: PropSync}


# -- drawing ---------------------------------------------------------------------------


@dataclass
class Scenario:
    spec: FlowSpec
    cancel: Cancel = field(default_factory=Cancel)
    reuse_id: bool = False


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    # Choices come from a seeded Random: the model's odds hold, where
    # hypothesis's own draws lean to the first option. A failing example is
    # printed whole (the spec), and replays from hypothesis's database.
    rng = random.Random(draw(st.integers(0, 2**64 - 1)))
    # a quarter of the flows have a step that outlives its timeout (it takes seconds)
    spec = random_scenario(rng, timeouts=rng.random() < 0.25)
    base = predict(spec)
    cancel = Cancel()
    how = rng.choice(["none", "none", "none", "hold", "hold", "wait"])
    if how == "hold" and base.ok_runs:
        cancel = Cancel(hold=rng.choice(base.ok_runs), before=rng.random() < 0.5)
    elif how == "wait" and base.waits:
        cancel = Cancel(wait=rng.randint(1, len(base.waits)))
    return Scenario(spec, cancel, reuse_id=rng.random() < 0.5)


# -- running -----------------------------------------------------------------------


@dataclass
class Env:
    name: str
    client: qwit.Client
    ended_ids: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)


ENVS: dict[str, Env] = {}


@pytest.fixture(scope="module", autouse=True)
def summary(request: pytest.FixtureRequest) -> Any:
    """Print (and with QWIT_PROPERTY_SUMMARY, write) what the module ran."""
    began = time.monotonic()
    yield
    report = {name: dict(sorted(env.counts.items())) for name, env in ENVS.items()}
    report["seconds"] = round(time.monotonic() - began, 1)  # type: ignore[assignment]
    text = json.dumps(report, indent=1)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\nproperty summary:", text)
    if os.environ.get("QWIT_PROPERTY_SUMMARY"):
        with open(os.environ["QWIT_PROPERTY_SUMMARY"], "w") as out:
            out.write(text + "\n")


@pytest.fixture(scope="module")
async def temporal_env(temporal_client: Any) -> Any:
    from qwit.temporal import create_worker

    queue = f"prop-{uuid.uuid4().hex[:8]}"
    client = await qwit.connect(temporal_client=temporal_client, task_queue=queue)
    async with create_worker(temporal_client, PropAsync, PropSync, task_queue=queue):
        yield ENVS.setdefault("temporal", Env("temporal", client))


@pytest.fixture(scope="module")
async def local_env() -> Any:
    client = await qwit.connect(backend=qwit.local)
    yield ENVS.setdefault("local", Env("local", client))
    await client.close()


def _find(steps: Sequence[qwit.StepState], path: str) -> qwit.StepState | None:
    for step in steps:
        if step.path == path:
            return step
        found = _find(step.steps, path)
        if found is not None:
            return found
    return None


async def _drive(handle: qwit.FlowHandle, run: str, pred: Prediction, cancel: Cancel) -> str:
    """Play the operator until the flow ends; return its outcome."""

    async def finish() -> str:
        try:
            await handle.result()
            kind = "completed"
        except qwit.FlowFailed as failed:
            kind = failed.kind
        LEDGER.ended(run)  # at once: nothing may be recorded after this
        return kind

    ending = asyncio.create_task(finish())
    waits = list(pred.waits)
    last: tuple[Any, ...] | None = None
    cancelled = False
    stop = time.monotonic() + EXAMPLE_LIMIT
    try:
        while not ending.done():
            if cancel.hold and not cancelled and LEDGER.has(run, MARK, "hold"):
                await handle.cancel()
                cancelled = True
            elif waits:
                state = await handle.state()
                waiting = state.waiting
                if waiting is not None:
                    rec = _find(state.steps, waiting.path)
                    seen = (waiting.flow_id, waiting.path, rec.attempts if rec else None)
                    if seen != last:
                        last = seen
                        wait = waits.pop(0)
                        assert waiting.path == wait.path, (
                            f"waits at {waiting.path}, the model at {wait.path}"
                        )
                        if wait.decision == "cancel":
                            await handle.cancel()
                        else:
                            reaction = wait.decision.removesuffix("_fix")
                            await handle.react(reaction, args=wait.args or None)
            await asyncio.wait({ending}, timeout=0.05)
            assert time.monotonic() < stop, (
                f"the flow did not end within {EXAMPLE_LIMIT}s; "
                f"state: {(await handle.state()).model_dump_json()}"
            )
    finally:
        if not ending.done():
            ending.cancel()
    assert not waits, f"the flow never waited at {[w.path for w in waits]}"
    return ending.result()


def _count(env: Env, scenario: Scenario, pred: Prediction, run: str, outcome: str) -> None:
    c = env.counts
    c["flows"] += 1
    c[f"outcome.{outcome}"] += 1
    for wait in pred.waits:
        where = "subflow" if _is_flow(scenario.spec, wait.path) else "step"
        c[f"decision.{wait.decision}.{where}"] += 1
        c["decisions"] += wait.decision != "cancel"
    if scenario.cancel.hold:
        c["cancel.hold_before" if scenario.cancel.before else "cancel.hold_after"] += 1
    if scenario.cancel.wait:
        c["cancel.at_wait"] += 1
    for step in steps_of(scenario.spec):
        if step.kind in ("timeout", "slow"):
            c[f"timeout.{step.kind}.{step.late}.{'sync' if step.sync else 'async'}"] += 1
    c["reused_flow_id"] += scenario.reuse_id
    entries = LEDGER.entries(run)
    for kind in ("do", "dedup", "undo", "undo-noop", "undo-dedup"):
        c[f"ledger.{kind}"] += sum(1 for e in entries if e.kind == kind)
    c["timed_out_attempts"] += sum(
        1
        for e in entries
        if e.kind == "end"
        and e.direction == "forward"
        and e.note != "ok"
        and any(s.kind in ("timeout", "slow") and s.eid == e.eid for s in steps_of(scenario.spec))
    )


def _is_flow(spec: FlowSpec, path: str) -> bool:
    node: StepSpec | FlowSpec = spec
    for part in path.split("."):
        assert isinstance(node, FlowSpec)
        node = node.children[int(part) - 1]
    return isinstance(node, FlowSpec)


async def check_example(env: Env, scenario: Scenario) -> None:
    run = uuid.uuid4().hex
    pred = predict(scenario.spec, scenario.cancel)
    flow = scenario_flow_class(scenario.spec, STEPS, TIMEOUT, GRACE)
    args: dict[str, Any] = {"run": run, "epoch": 0}
    if scenario.cancel.hold:
        eid, epoch = scenario.cancel.hold
        args.update(hold=f"{eid}@{epoch}", hold_before=scenario.cancel.before)
    reuse = scenario.reuse_id and env.ended_ids
    flow_id = env.ended_ids[-1] if reuse else f"prop-{env.name}-{run[:12]}"
    handle = await env.client.start(flow, args, id=flow_id)
    outcome = await _drive(handle, run, pred, scenario.cancel)
    env.ended_ids.append(flow_id)
    _count(env, scenario, pred, run, outcome)
    LEDGER.check(run, Expected(pred.outcome, pred.applied, pred.undone), outcome)


def _examples() -> list[Scenario]:
    """Cases every run plays, whatever hypothesis draws."""
    S, F = StepSpec, FlowSpec
    wait = qwit.WAIT
    return [
        # a sub-flow run three times (RETRY unchanged, then fixed), then a rollback
        Scenario(
            F(
                [
                    S("s1", mode="ok"),
                    F(
                        [S("s2", mode="ok", sync=True), S("s3", mode="before", fails=True)],
                        reaction=wait,
                        decisions=["retry", "retry_fix"],
                    ),
                    S("s4", mode="after", fails=True),
                ]
            )
        ),
        # a step run three times by operator RETRY, in a sub-flow, then cancelled
        Scenario(
            F(
                [
                    F(
                        [
                            S("s1", mode="ok"),
                            S("s2", mode="before", reaction=wait, decisions=["retry", "retry_fix"]),
                            S("s3", mode="ok"),
                        ]
                    )
                ]
            ),
            Cancel(hold=("s3", 2)),
        ),
        # a step that failed after its effect, run again twice by the operator
        Scenario(
            F(
                [
                    S(
                        "s1",
                        mode="after",
                        reaction=wait,
                        decisions=["retry", "retry_fix"],
                        sync=True,
                    ),
                    S("s2", mode="before"),
                ]
            )
        ),
        # timeouts: async, applied late, then rolled back; plain, first attempt only
        Scenario(
            F(
                [
                    S("s1", mode="slow", late="effect", sync=True),
                    S("s2", mode="ok"),
                    S("s3", mode="timeout", late="effect"),
                ]
            )
        ),
        Scenario(
            F(
                [
                    S("s1", mode="ok", sync=True),
                    S("s2", mode="timeout", late="finish", sync=True),
                ]
            )
        ),
        # cancelled while a sub-flow step waits
        Scenario(
            F(
                [
                    S("s1", mode="ok"),
                    F(
                        [
                            S("s2", mode="ok"),
                            S("s3", mode="after", reaction=wait, decisions=["skip"]),
                        ]
                    ),
                ]
            ),
            Cancel(wait=1),
        ),
    ]


SETTINGS: dict[str, Any] = {
    "deadline": None,
    # No shrinking: a flow comes from a seed, which shrinks to nothing useful,
    # and a failing example is printed whole (its spec) anyway.
    # QWIT_PROPERTY_EXPLICIT=0: only drawn flows (not the fixed examples).
    "phases": [Phase.explicit, Phase.reuse, Phase.generate][
        os.environ.get("QWIT_PROPERTY_EXPLICIT") == "0" :
    ],
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}


def _with_examples(test: Any) -> Any:
    for case in reversed(_examples()):
        test = example(scenario=case)(test)
    return test


@pytest.mark.timeout(3600)
@settings(max_examples=EXAMPLES, **SETTINGS)
@given(scenario=scenarios())
@_with_examples
async def test_random_flows_on_temporal(temporal_env: Env, scenario: Scenario) -> None:
    await check_example(temporal_env, scenario)


@pytest.mark.timeout(3600)
@settings(max_examples=EXAMPLES, **SETTINGS)
@given(scenario=scenarios())
@_with_examples
async def test_random_flows_on_local(local_env: Env, scenario: Scenario) -> None:
    await check_example(local_env, scenario)


# -- the model itself --------------------------------------------------------------


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
    pred = predict(spec)
    assert pred.outcome == "rolled_back"
    assert [(a, eid) for a, (eid, _) in pred.log] == log


def test_the_model_retries_a_sub_flow_under_a_new_epoch():
    inner = FlowSpec(
        children=[StepSpec("b", mode="ok"), StepSpec("c", mode="before")],
        reaction=qwit.WAIT,
        decisions=["retry", "retry_fix"],
    )
    spec = FlowSpec(children=[StepSpec("a", mode="ok"), inner])
    pred = predict(spec)
    assert pred.outcome == "completed"
    assert [(w.path, w.decision, w.args) for w in pred.waits] == [
        ("2", "retry", {"epoch": 1}),
        ("2", "retry_fix", {"epoch": 2, "fix_c": True}),
    ]
    assert pred.log == [
        ("do", ("a", 0)),
        ("do", ("b", 0)),
        ("undo", ("b", 0)),
        ("do", ("b", 1)),
        ("undo", ("b", 1)),
        ("do", ("b", 2)),
        ("do", ("c", 2)),
    ]


def test_the_model_cancels_a_holding_step_and_undoes_it_first():
    spec = FlowSpec(
        children=[
            StepSpec("a", mode="after", reaction=qwit.SKIP),
            FlowSpec(children=[StepSpec("b", mode="ok"), StepSpec("c", mode="ok")]),
            StepSpec("d", mode="ok"),
        ]
    )
    pred = predict(spec, Cancel(hold=("c", 0)))
    assert pred.outcome == "cancelled"
    assert pred.undone == [("c", 0), ("b", 0)]  # a was skipped: its effect stays
    pred = predict(spec, Cancel(hold=("c", 0), before=True))
    assert pred.undone == [("b", 0)]
