"""The saga promise at its edges, on Temporal (real dev server) and qwit.local.

Each test here failed before the fix it names: effects deduplicated away by
reused idempotency keys, a user's id colliding with a sub-flow's, an undo
running beside its own timed-out forward, a cancel that never reached a step,
payloads that left a flow running forever, failures that were not
``Exception`` s, errors that lost the forward failure, and ``qwit.local``
letting a step change its caller's args.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import defaultdict
from typing import Any

import pydantic
import pytest
import temporalio.client

import qwit
from tests.conftest import EngineEnv
from tests.test_temporal_reactions import wait_status


# -- a provider that dedups on the idempotency key, as a payment provider does --
class Provider:
    """Charges by idempotency key: a repeated key is a no-op, a refund names
    the charge's key. Every call is kept, with the time it happened."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.charges: dict[str, str] = {}  # key -> eid
        self.refunded: set[str] = set()
        self.log: list[tuple[float, str, str, str]] = []  # (time, action, key, eid)

    def note(self, action: str, key: str, eid: str) -> None:
        with self.lock:
            self.log.append((time.monotonic(), action, key, eid))

    def charge(self, key: str, eid: str) -> None:
        with self.lock:
            if key in self.charges:
                self.log.append((time.monotonic(), "dedup", key, eid))
                return
            self.charges[key] = eid
            self.log.append((time.monotonic(), "charge", key, eid))

    def refund(self, key: str) -> None:
        with self.lock:
            if key in self.charges and key not in self.refunded:
                self.refunded.add(key)
                self.log.append((time.monotonic(), "refund", key, self.charges[key]))

    def standing(self) -> list[str]:
        """Effects applied and not refunded, by eid, in the order applied."""
        with self.lock:
            return [eid for key, eid in self.charges.items() if key not in self.refunded]

    def actions(self, *kinds: str) -> list[tuple[str, str]]:
        with self.lock:
            return [(action, eid) for _, action, _, eid in self.log if action in kinds]

    def when(self, action: str, eid: str) -> float:
        with self.lock:
            return next(t for t, a, _, e in self.log if a == action and e == eid)


PROVIDERS: dict[str, Provider] = defaultdict(Provider)


def forward_key_of_undo() -> str:
    return qwit.context().idempotency_key.removesuffix("/step_back")


class Pay(qwit.Step, name="edges.pay"):
    """Charges ``eid``; fails (after charging, with ``fail_after``) while
    ``fail`` names it and ``fix`` is not set."""

    retry = qwit.Retry(max_attempts=1)
    back_retry = qwit.Retry(max_attempts=2, initial_interval=0.1)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        provider = PROVIDERS[args["run"]]
        eid = args["eid"]
        failing = args.get("fail") == eid and not args.get("fix")
        if failing and not args.get("fail_after"):
            raise qwit.StepError(f"{eid} declined", retry=False)
        provider.charge(qwit.context().idempotency_key, eid)
        if failing:
            raise qwit.StepError(f"{eid} failed after charging", retry=False)
        return {f"paid_{eid}": True}

    async def step_back(self, args: dict[str, Any]) -> None:
        PROVIDERS[args["run"]].refund(forward_key_of_undo())


class RetriedSub(qwit.Flow, name="edges.retried_sub"):
    def build_flow(self) -> None:
        self.step(Pay, {"eid": "P"})
        self.step(Pay, {"eid": "Q"})


class RetryTheSub(qwit.Flow, name="edges.retry_the_sub"):
    def build_flow(self) -> None:
        self.step(Pay, {"eid": "A"})
        self.step(RetriedSub, on_failure=qwit.WAIT)


class OnePay(qwit.Flow, name="edges.one_pay"):
    def build_flow(self) -> None:
        self.step(Pay, {"eid": "A"})


def new_run() -> str:
    return uuid.uuid4().hex


async def ended(handle: qwit.FlowHandle, timeout: float = 60) -> tuple[str, Any]:
    try:
        return "completed", await asyncio.wait_for(handle.result(), timeout)
    except qwit.FlowFailed as failed:
        return failed.kind, failed


# -- idempotency keys ---------------------------------------------------------


async def test_an_operator_retry_of_a_sub_flow_applies_its_effects_again(engine_env: EngineEnv):
    # The sub-flow fails at Q after charging P and undoes itself (P refunded);
    # the operator's RETRY runs it again: P and Q must be charged for real,
    # not deduplicated away under the keys of the undone attempt.
    run = new_run()
    async with engine_env.serve(RetryTheSub):
        handle = await engine_env.client.start(
            RetryTheSub, {"run": run, "fail": "Q", "fail_after": True}
        )
        await wait_status(handle, "waiting")
        await handle.react(qwit.RETRY, args={"fix": True})
        kind, _ = await ended(handle)
    provider = PROVIDERS[run]
    assert kind == "completed"
    assert provider.actions("dedup") == []
    assert provider.standing() == ["A", "P", "Q"]
    assert provider.actions("charge", "refund") == [
        ("charge", "A"),
        ("charge", "P"),
        ("charge", "Q"),
        ("refund", "Q"),
        ("refund", "P"),
        ("charge", "P"),
        ("charge", "Q"),
    ]


async def test_a_flow_that_reuses_an_ended_flows_id_gets_fresh_keys(engine_env: EngineEnv):
    run = new_run()
    flow_id = f"reused-{run}"
    async with engine_env.serve(OnePay):
        await engine_env.client.run(OnePay, {"run": run}, id=flow_id)
        await engine_env.client.run(OnePay, {"run": run}, id=flow_id)
    provider = PROVIDERS[run]
    assert provider.actions("charge", "dedup") == [("charge", "A"), ("charge", "A")]
    assert len(provider.charges) == 2


async def test_a_retried_step_keeps_its_key_and_an_undo_names_its_forward(engine_env: EngineEnv):
    run = new_run()
    async with engine_env.serve(Flaky2):
        kind, err = await ended(await engine_env.client.start(Flaky2, {"run": run}))
    assert kind == "rolled_back"
    keys = KEYS[run]
    forward = [k for d, k in keys if d == "step_forward"]
    back = [k for d, k in keys if d == "step_back"]
    assert len(forward) == 2 and forward[0] == forward[1]  # two attempts, one key
    assert back == [forward[0] + "/step_back"]
    assert err.compensations[0].path == "1"


KEYS: dict[str, list[tuple[str, str]]] = defaultdict(list)
TRIES: dict[str, int] = defaultdict(int)


class KeyedFlaky(qwit.Step, name="edges.keyed_flaky"):
    retry = qwit.Retry(max_attempts=2, initial_interval=0.1)

    async def step_forward(self, args: dict[str, Any]) -> None:
        KEYS[args["run"]].append(("step_forward", qwit.context().idempotency_key))
        raise RuntimeError("always")

    async def step_back(self, args: dict[str, Any]) -> None:
        KEYS[args["run"]].append(("step_back", qwit.context().idempotency_key))


class Flaky2(qwit.Flow, name="edges.flaky2"):
    def build_flow(self) -> None:
        self.step(KeyedFlaky)


# -- ids ------------------------------------------------------------------------


class Waits(qwit.Step, name="edges.waits"):
    async def step_forward(self, args: dict[str, Any]) -> None:
        if not args.get("go"):
            raise qwit.StepError("not yet", retry=False)


class SubOfWaits(qwit.Flow, name="edges.sub_of_waits"):
    def build_flow(self) -> None:
        self.step(Waits, on_failure=qwit.WAIT)


class ParentOfSub(qwit.Flow, name="edges.parent_of_sub"):
    def build_flow(self) -> None:
        self.step(Pay, {"eid": "A"})
        self.step(SubOfWaits)


async def test_ids_with_the_sub_flow_mark_are_refused(engine_env: EngineEnv):
    with pytest.raises(qwit.ArgumentsError, match="/~"):
        await engine_env.client.start(OnePay, {"run": "x"}, id="order-7/~2")


async def test_a_user_id_shaped_like_a_path_does_not_collide(engine_env: EngineEnv):
    run = new_run()
    parent_id = f"order-{run}"
    async with engine_env.serve(ParentOfSub, OnePay):
        parent = await engine_env.client.start(ParentOfSub, {"run": run}, id=parent_id)
        await wait_status(parent, "waiting")
        # the id the first version gave the sub-flow at path 2
        await engine_env.client.run(OnePay, {"run": run}, id=f"{parent_id}/2")
        await parent.react(qwit.RETRY, args={"go": True})
        kind, _ = await ended(parent)
    assert kind == "completed"


async def test_a_sub_flow_that_cannot_start_fails_its_step_and_rolls_back(
    client: qwit.Client, worker: Any, temporal_client: temporalio.client.Client
):
    # Someone took the sub-flow's id outside QWIT: the parent must roll back
    # its completed step, not end aborted with nothing undone.
    run = new_run()
    parent_id = f"taken-{run}"
    squatter = await temporal_client.start_workflow(
        "edges.nobody", id=f"{parent_id}/~2", task_queue=f"nobody-{run}"
    )
    try:
        async with worker(ParentOfSub):
            kind, err = await ended(
                await client.start(ParentOfSub, {"run": run, "go": True}, id=parent_id)
            )
    finally:
        await squatter.terminate()
    assert kind == "rolled_back"
    assert err.step == "edges.sub_of_waits"
    assert "already running" in err.reason
    assert err.compensated == ["edges.pay"]
    assert PROVIDERS[run].standing() == []


# -- timeouts: never an undo beside its own forward ------------------------------


class SlowAsync(qwit.Step, name="edges.slow_async"):
    """Sleeps past its timeout; notes when its forward really ended."""

    timeout = 1
    timeout_grace = 5
    retry = qwit.Retry(max_attempts=1)

    async def step_forward(self, args: dict[str, Any]) -> None:
        provider = PROVIDERS[args["run"]]
        try:
            await asyncio.sleep(args.get("sleep", 10))
            provider.charge(qwit.context().idempotency_key, "slow")
        finally:
            provider.note("forward-ended", "", "slow")

    async def step_back(self, args: dict[str, Any]) -> None:
        provider = PROVIDERS[args["run"]]
        provider.note("undo-started", "", "slow")
        provider.refund(forward_key_of_undo())


class SlowPlain(qwit.Step, name="edges.slow_plain"):
    """A plain step: stops when told (``cancelled``), unless ``stubborn``."""

    timeout = 1
    timeout_grace = 5
    retry = qwit.Retry(max_attempts=1)

    def step_forward(self, args: dict[str, Any]) -> None:
        provider = PROVIDERS[args["run"]]
        try:
            deadline = time.monotonic() + args.get("sleep", 10)
            while time.monotonic() < deadline:
                if qwit.context().cancelled and not args.get("stubborn"):
                    raise RuntimeError("stopped: cancelled")
                time.sleep(0.02)
            provider.charge(qwit.context().idempotency_key, "slow")
        finally:
            provider.note("forward-ended", "", "slow")

    def step_back(self, args: dict[str, Any]) -> None:
        provider = PROVIDERS[args["run"]]
        provider.note("undo-started", "", "slow")
        provider.refund(forward_key_of_undo())


class TimesOutAsync(qwit.Flow, name="edges.times_out_async"):
    def build_flow(self) -> None:
        self.step(Pay, {"eid": "A"})
        self.step(SlowAsync)


class TimesOutPlain(qwit.Flow, name="edges.times_out_plain"):
    def build_flow(self) -> None:
        self.step(Pay, {"eid": "A"})
        self.step(SlowPlain)


@pytest.mark.parametrize("flow", [TimesOutAsync, TimesOutPlain])
async def test_a_step_is_stopped_at_its_timeout_and_undone_after_it_ended(
    engine_env: EngineEnv, flow: Any
):
    run = new_run()
    async with engine_env.serve(flow):
        began = time.monotonic()
        kind, err = await ended(await engine_env.client.start(flow, {"run": run}))
        took = time.monotonic() - began
    provider = PROVIDERS[run]
    assert kind == "rolled_back"
    assert err.error_type == "builtins.TimeoutError"
    assert took < 8  # stopped at its 1 s deadline, not after its 10 s sleep
    assert provider.standing() == []
    assert ("charge", "slow") not in provider.actions("charge")
    assert provider.when("forward-ended", "slow") < provider.when("undo-started", "slow")


async def test_a_plain_step_that_ignores_cancelled_is_undone_after_it_ended(engine_env: EngineEnv):
    # It runs 2.5 s past its 1 s timeout; the grace (5 s) covers it: its undo
    # comes after its effect, and so refunds it.
    run = new_run()
    async with engine_env.serve(TimesOutPlain):
        kind, _ = await ended(
            await engine_env.client.start(
                TimesOutPlain, {"run": run, "sleep": 2.5, "stubborn": True}
            )
        )
    provider = PROVIDERS[run]
    assert kind == "rolled_back"
    assert provider.actions("charge", "refund") == [
        ("charge", "A"),
        ("charge", "slow"),
        ("refund", "slow"),
        ("refund", "A"),
    ]
    assert provider.when("forward-ended", "slow") < provider.when("undo-started", "slow")


# -- cancel reaches steps that never heartbeat ------------------------------------


class Sleeper(qwit.Step, name="edges.sleeper"):
    """Runs long without heartbeats (async sleep, or a plain loop on cancelled)."""

    async def step_forward(self, args: dict[str, Any]) -> None:
        PROVIDERS[args["run"]].note("started", "", "sleeper")
        try:
            await asyncio.sleep(120)
        finally:
            PROVIDERS[args["run"]].note("forward-ended", "", "sleeper")


class PlainSleeper(qwit.Step, name="edges.plain_sleeper"):
    def step_forward(self, args: dict[str, Any]) -> None:
        PROVIDERS[args["run"]].note("started", "", "sleeper")
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not qwit.context().cancelled:
                time.sleep(0.02)
        finally:
            PROVIDERS[args["run"]].note("forward-ended", "", "sleeper")


class LocalSleeper(Sleeper, name="edges.local_sleeper"):
    local = True


def _sleeping(step: type[qwit.Step]) -> type[qwit.Flow]:
    class SleepFlow(qwit.Flow, name=f"edges.sleep.{step.name}"):
        def build_flow(self) -> None:
            self.step(Pay, {"eid": "A"})
            self.step(step)

    return SleepFlow


SLEEP_FLOWS = {s: _sleeping(s) for s in (Sleeper, PlainSleeper, LocalSleeper)}
CANCEL_DELAYS: dict[str, list[float]] = defaultdict(list)


async def _wait_note(run: str, action: str) -> None:
    async def poll() -> None:
        while (action, "sleeper") not in PROVIDERS[run].actions(action):
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), 30)


@pytest.mark.parametrize("step", [Sleeper, PlainSleeper, LocalSleeper])
async def test_a_cancel_reaches_a_step_that_never_heartbeats(engine_env: EngineEnv, step: Any):
    run = new_run()
    flow = SLEEP_FLOWS[step]
    async with engine_env.serve(flow):
        handle = await engine_env.client.start(flow, {"run": run})
        await _wait_note(run, "started")
        await asyncio.sleep(1.5)  # past the first automatic heartbeat
        asked = time.monotonic()
        await handle.cancel()
        kind, err = await ended(handle, timeout=30)
        stopped = PROVIDERS[run].when("forward-ended", "sleeper") - asked
    CANCEL_DELAYS[f"{engine_env.name}:{step.name}"].append(stopped)
    print(f"cancel reached {step.name} on {engine_env.name} after {stopped:.2f}s")
    assert kind == "cancelled"
    assert err.compensated[-1] == "edges.pay"
    # A Temporal local activity hears of the cancel when the flow's workflow
    # task is next renewed (at 80% of its 10 s timeout); others within seconds.
    assert stopped < (9 if step.local and engine_env.name == "temporal" else 6)
    assert PROVIDERS[run].standing() == []


# -- failures that aren't Exceptions ---------------------------------------------


class Thrown(BaseException):
    """A BaseException of a user's own (like pytest's outcomes)."""


class Throws(qwit.Step, name="edges.throws"):
    retry = qwit.Retry(max_attempts=2, initial_interval=0.1)

    async def step_forward(self, args: dict[str, Any]) -> None:
        raise Thrown("thrown")


class PlainExits(qwit.Step, name="edges.plain_exits"):
    retry = qwit.Retry(max_attempts=1)

    def step_forward(self, args: dict[str, Any]) -> None:
        raise SystemExit(3)


class ThrowsFlow(qwit.Flow, name="edges.throws_flow"):
    def build_flow(self) -> None:
        self.step(Pay, {"eid": "A"})
        self.step(Throws)


class ExitsFlow(qwit.Flow, name="edges.exits_flow"):
    def build_flow(self) -> None:
        self.step(Pay, {"eid": "A"})
        self.step(PlainExits)


class SkipsThrown(qwit.Flow, name="edges.skips_thrown"):
    def build_flow(self) -> None:
        self.step(Pay, {"eid": "A"})
        self.step(Throws, on_failure={Thrown: qwit.SKIP})


@pytest.mark.parametrize(
    ("flow", "error_type"),
    [(ThrowsFlow, f"{__name__}.Thrown"), (ExitsFlow, "builtins.SystemExit")],
)
async def test_a_base_exception_is_a_step_failure(
    engine_env: EngineEnv, flow: Any, error_type: str
):
    run = new_run()
    async with engine_env.serve(flow):
        handle = await engine_env.client.start(flow, {"run": run})
        kind, err = await ended(handle)
        state = await handle.state()
    assert kind == "rolled_back"
    assert err.error_type == error_type
    assert state.status == "rolled_back"
    assert PROVIDERS[run].standing() == []


async def test_on_failure_matches_a_base_exception_by_class(engine_env: EngineEnv):
    run = new_run()
    async with engine_env.serve(SkipsThrown):
        kind, _ = await ended(await engine_env.client.start(SkipsThrown, {"run": run}))
    assert kind == "completed"
    assert PROVIDERS[run].standing() == ["A"]


# -- errors that keep what happened ---------------------------------------------


class BadBack(qwit.Step, name="edges.bad_back"):
    """Fails forward after its effect; its undo fails too."""

    retry = qwit.Retry(max_attempts=1)
    back_retry = qwit.Retry(max_attempts=2, initial_interval=0.1)

    async def step_forward(self, args: dict[str, Any]) -> None:
        PROVIDERS[args["run"]].charge(qwit.context().idempotency_key, "bad")
        raise qwit.StepError("forward broke", retry=False)

    async def step_back(self, args: dict[str, Any]) -> None:
        raise RuntimeError("undo broke")


class BadBackFlow(qwit.Flow, name="edges.bad_back_flow"):
    def build_flow(self) -> None:
        self.step(Pay, {"eid": "A"})
        self.step(BadBack)


async def test_compensation_failed_keeps_the_forward_failure(engine_env: EngineEnv):
    run = new_run()
    async with engine_env.serve(BadBackFlow):
        handle = await engine_env.client.start(BadBackFlow, {"run": run})
        kind, err = await ended(handle)
        state = await handle.state()
    assert kind == "compensation_failed"
    assert err.reason == "StepError: forward broke"
    assert err.error_type == "qwit.StepError"
    assert err.step == "edges.bad_back"
    assert (err.compensated, err.failed_compensations) == (["edges.pay"], ["edges.bad_back"])
    assert [(c.name, c.path, c.status) for c in err.compensations] == [
        ("edges.bad_back", "2", "compensation_failed"),
        ("edges.pay", "1", "compensated"),
    ]
    failed = err.compensations[0].error
    assert failed is not None and failed.message == "undo broke"
    assert state.failure is not None and state.failure.reason == "StepError: forward broke"
    assert state.steps[1].error is not None and state.steps[1].error.message == "forward broke"
    assert state.steps[1].back_error is not None
    assert state.steps[1].back_error.message == "undo broke"
    assert state.steps[1].back_attempts == 2


async def test_an_unknown_flow_id_raises_flow_not_found(engine_env: EngineEnv):
    handle = engine_env.client.get_handle(f"nobody-{new_run()}")
    with pytest.raises(qwit.FlowNotFound):
        await handle.result()
    with pytest.raises(qwit.FlowNotFound):
        await handle.state()
    with pytest.raises(qwit.FlowNotFound):
        await handle.cancel()
    with pytest.raises(qwit.FlowNotFound):
        await handle.react(qwit.RETRY)


BACK_TRIES: dict[str, int] = defaultdict(int)


class SlowlyUndone(qwit.Step, name="edges.slowly_undone"):
    """Its undo fails twice, then waits long before its third attempt."""

    back_retry = qwit.Retry(max_attempts=4, initial_interval=0.2, backoff=20, max_interval=20)

    async def step_forward(self, args: dict[str, Any]) -> None:
        return None

    async def step_back(self, args: dict[str, Any]) -> None:
        BACK_TRIES[args["run"]] += 1
        if BACK_TRIES[args["run"]] < 3:
            raise RuntimeError(f"undo attempt {BACK_TRIES[args['run']]} failed")


class SlowlyUndoneFlow(qwit.Flow, name="edges.slowly_undone_flow"):
    def build_flow(self) -> None:
        self.step(SlowlyUndone)
        self.step(Pay, {"eid": "X"})


async def test_state_shows_the_attempts_and_error_of_an_undo_being_retried(
    client: qwit.Client, worker: Any
):
    run = new_run()
    async with worker(SlowlyUndoneFlow):
        handle = await client.start(SlowlyUndoneFlow, {"run": run, "fail": "X"})

        async def second_try_failed() -> qwit.FlowState:
            while True:
                state = await handle.state()
                if state.steps[0].back_attempts >= 2:
                    return state
                await asyncio.sleep(0.05)

        state = await asyncio.wait_for(second_try_failed(), 30)
        await handle.cancel()
    step = state.steps[0]
    assert state.status == "compensating"
    assert step.status == "compensating"
    assert step.back_error is not None
    assert "undo attempt 2 failed" in step.back_error.message


# -- qwit.local isolates args as a wire would -------------------------------------


class Mutator(qwit.Step, name="edges.mutator"):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        args["items"].append("mutated")
        args["nested"]["x"] = "mutated"
        out = {"made": {"list": [1]}}
        SEEN[args["run"]] = out
        return out

    async def step_back(self, args: dict[str, Any]) -> None:
        BACK_ARGS[args["run"]] = args


class Reader(qwit.Step, name="edges.reader"):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        SEEN[args["run"]]["made"]["list"].append("late")  # the output, changed afterwards
        return {"read": [list(args["items"]), dict(args["nested"]), args["made"]]}


class Fails(qwit.Step, name="edges.fails"):
    async def step_forward(self, args: dict[str, Any]) -> None:
        if args.get("fail"):
            raise qwit.StepError("no", retry=False)


class MutatingFlow(qwit.Flow, name="edges.mutating"):
    def build_flow(self) -> None:
        self.step(Mutator)
        self.step(Reader)
        self.step(Fails)


SEEN: dict[str, Any] = {}
BACK_ARGS: dict[str, Any] = {}


@pytest.mark.parametrize("fail", [False, True])
async def test_a_step_that_mutates_its_args_changes_nothing_outside_it(
    engine_env: EngineEnv, fail: bool
):
    run = new_run()
    given = {"run": run, "items": ["a"], "nested": {"x": 1}, "fail": fail}
    async with engine_env.serve(MutatingFlow):
        kind, result = await ended(await engine_env.client.start(MutatingFlow, given))
    assert given == {"run": run, "items": ["a"], "nested": {"x": 1}, "fail": fail}
    if fail:
        assert kind == "rolled_back"
        assert BACK_ARGS[run]["items"] == ["a"]
        assert BACK_ARGS[run]["nested"] == {"x": 1}
        assert BACK_ARGS[run]["made"] == {"list": [1]}
    else:
        assert kind == "completed"
        assert result["items"] == ["a"]
        assert result["read"] == [["a"], {"x": 1}, {"list": [1]}]
        assert result["made"] == {"list": [1]}


# -- QWIT's own failures are classes an on_failure mapping can name ----------------


class BadOutput(qwit.Step, name="edges.bad_output"):
    retry = qwit.Retry(max_attempts=1)

    async def step_forward(self, args: dict[str, Any]) -> Any:
        return {"when": object()}  # not JSON: qwit.ArgumentsError


class TypedArgs(pydantic.BaseModel):
    cents: int


class NeedsCents(qwit.Step, name="edges.needs_cents"):
    async def step_forward(self, args: TypedArgs) -> None:
        return None


class Slow(qwit.Step, name="edges.slow"):
    timeout = 0.5
    timeout_grace = 1
    retry = qwit.Retry(max_attempts=1)

    async def step_forward(self, args: dict[str, Any]) -> None:
        await asyncio.sleep(10)


def _mapped(step: type[qwit.Step], key: Any) -> type[qwit.Flow]:
    class Mapped(qwit.Flow, name=f"edges.mapped.{step.name}.{getattr(key, '__name__', key)}"):
        def build_flow(self) -> None:
            self.step(Pay, {"eid": "A"})
            self.step(step, on_failure={key: qwit.SKIP})

    return Mapped


@pytest.mark.parametrize(
    ("step", "key"),
    [
        (BadOutput, qwit.ArgumentsError),
        (BadOutput, qwit.QwitError),
        (NeedsCents, qwit.ArgumentsError),
        (Slow, TimeoutError),
        (Slow, OSError),
    ],
)
async def test_every_failure_qwit_raises_is_matched_by_its_class(
    engine_env: EngineEnv, step: Any, key: Any
):
    flow = _mapped(step, key)
    run = new_run()
    async with engine_env.serve(flow):
        kind, _ = await ended(await engine_env.client.start(flow, {"run": run}))
    assert kind == "completed"
    assert PROVIDERS[run].standing() == ["A"]


@pytest.mark.parametrize("key", [qwit.StepNotRegistered, qwit.QwitError])
async def test_an_unserved_step_is_matched_by_its_class(
    temporal_client: Any, worker: Any, task_queue: str, key: Any
):
    client = await qwit.connect(
        temporal_client=temporal_client, task_queue=task_queue, unserved_step_timeout=0.5
    )
    flow = _mapped(Slow, key)
    run = new_run()
    async with worker(Pay):  # no worker serves edges.slow
        kind, _ = await ended(await client.start(flow, {"run": run}))
    assert kind == "completed"
    assert PROVIDERS[run].standing() == ["A"]
