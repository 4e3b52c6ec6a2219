"""One suite, every engine: the same scenarios with the same expectations on
Temporal (real dev server), qwit.local, and a custom thread-pool engine
written in the tests from qwit.engine alone."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pydantic
import pytest

import qwit
from qwit.testing import wait_for_status as wait_status
from tests import ledger, thread_engine
from tests.ledger import Effect
from tests.test_temporal_core import FlakyFlow, RefusesFlow, SyncTypedFlow
from tests.test_temporal_reactions import A, Approval, ApprovalFlow, C, FixableFlow, failing_flow
from tests.test_temporal_subflows import BadBackFlow, CancelMe, Level1, Outer


@dataclass
class Env:
    client: qwit.Client
    serve: Callable[..., contextlib.AbstractAsyncContextManager[Any]]


@contextlib.asynccontextmanager
async def _nothing_to_serve(*members: Any) -> AsyncIterator[None]:
    yield None


@pytest.fixture(params=["temporal", "local", "threads", "postgres"])
async def env(
    request: pytest.FixtureRequest, temporal_client: Any, task_queue: str, worker: Any
) -> AsyncIterator[Env]:
    if request.param == "postgres":
        dsn = request.getfixturevalue("postgres_dsn")
        await qwit.postgres.prepare(dsn)
        client = await qwit.connect(
            backend=qwit.postgres, settings=[qwit.postgres.PostgresSettings(dsn)]
        )

        @contextlib.asynccontextmanager
        async def serve(*members: Any) -> AsyncIterator[Any]:
            async with qwit.postgres.PostgresWorker(
                dsn,
                *members,
                heartbeat=0.5,
                stalled_after=3,
                poll_interval=0.2,
                graceful_shutdown_timeout=0,
            ) as w:
                yield w

        yield Env(client, serve)
        await client.close()
        return
    if request.param == "temporal":
        client = await qwit.connect(
            temporal_client=temporal_client, task_queue=task_queue, backend=qwit.temporal
        )
        async with client:
            yield Env(client, worker)
        return
    backend = qwit.local if request.param == "local" else thread_engine
    client = await qwit.connect(backend=backend)
    yield Env(client, _nothing_to_serve)
    await client.close()


def new_ledger() -> str:
    return uuid.uuid4().hex


async def cancelled_at(
    env: Env,
    flow: type[qwit.Flow],
    run: str,
    mark: tuple[str, str],
    after: float = 0.0,
) -> tuple[str, qwit.FlowHandle]:
    """Start ``flow`` on ledger ``run``, cancel it ``after`` seconds past the
    ledger ``mark`` (action, eid); how it ended, and its handle."""
    handle = await env.client.start(flow, {"ledger": run})
    await ledger.wait_for_mark(run, *mark)
    await asyncio.sleep(after)
    await handle.cancel()
    kind, _ = await outcome(handle)
    return kind, handle


async def outcome(handle: qwit.FlowHandle) -> tuple[str, Any]:
    try:
        return "completed", await asyncio.wait_for(handle.result(), 60)
    except qwit.FlowFailed as failed:
        return failed.kind, failed


async def test_args_and_sub_flow_scoping(env: Env):
    run = new_ledger()
    async with env.serve(Outer):
        result = await env.client.run(Outer, {"ledger": run})
    assert result == {
        "ledger": run,
        "out_O1": "-",
        "out_I1": "inner-only",
        "out_I2": "inner-only",
        "out_O2": "-",
    }


@pytest.mark.parametrize(
    ("reaction", "kind", "undone", "statuses"),
    [
        ("rollback", "rolled_back", ["react.F", "react.A"], ["compensated"] * 2 + ["pending"]),
        ("skipback", "rolled_back", ["react.A"], ["compensated", "failed", "pending"]),
        ("skip", "completed", [], ["done", "skipped", "done"]),
        ("abort", "aborted", [], ["done", "failed", "pending"]),
    ],
)
async def test_each_reaction(env: Env, reaction, kind, undone, statuses):
    run = new_ledger()
    flow = failing_flow(reaction)
    async with env.serve(flow):
        handle = await env.client.start(
            flow, {"ledger": run, "fail": "react.F", "fail_after": True}
        )
        got, _ = await outcome(handle)
        state = await handle.state()
    assert got == kind
    assert ledger.undone(run) == undone
    assert [s.status for s in state.steps] == statuses
    assert state.status == kind


@pytest.mark.parametrize(
    ("fail", "compensated"),
    [("O2", ["O2", "I2", "I1", "O1"]), ("I2", ["I2", "I1", "O1"])],
)
async def test_sub_flow_failures(env: Env, fail, compensated):
    run = new_ledger()
    async with env.serve(Outer):
        handle = await env.client.start(Outer, {"ledger": run, "fail": fail, "fail_after": True})
        kind, err = await outcome(handle)
        state = await handle.state()
    assert kind == "rolled_back"
    assert err.step == fail
    assert err.compensated == compensated
    ledger.assert_fully_undone(run)
    assert state.steps[1].kind == "flow"
    assert [s.status for s in state.steps[1].steps] == ["compensated", "compensated"]


async def test_three_levels(env: Env):
    run = new_ledger()
    async with env.serve(Level1):
        handle = await env.client.start(Level1, {"ledger": run, "fail": "D", "fail_after": True})
        kind, err = await outcome(handle)
    assert (kind, err.compensated) == ("rolled_back", ["D", "C", "B", "A"])
    ledger.assert_fully_undone(run)


async def test_cancel_during_a_step(env: Env):
    run = new_ledger()
    async with env.serve(CancelMe):
        handle = await env.client.start(CancelMe, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "Slow")
        running = await handle.state()
        await handle.cancel()
        await handle.cancel()
        kind, err = await outcome(handle)
        state = await handle.state()
    assert kind == "cancelled"
    assert err.compensated == ["Slow", "A"]
    ledger.assert_fully_undone(run)
    assert state.status == "cancelled"
    # attempts counts those that ended: the one a cancel stopped too
    assert [(s.status, s.attempts) for s in running.steps][:2] == [("done", 1), ("running", 0)]
    assert [s.attempts for s in state.steps][:2] == [1, 1]


async def test_a_cancel_right_after_the_start_cancels_the_flow(env: Env):
    # Before, on qwit.local, the flow's task was cancelled before it ran:
    # result() raised a bare CancelledError and state() said running forever.
    run = new_ledger()
    async with env.serve(CancelMe):
        handle = await env.client.start(CancelMe, {"ledger": run})
        await handle.cancel()
        kind, err = await outcome(handle)
        state = await handle.state()
    assert (kind, state.status) == ("cancelled", "cancelled")
    assert isinstance(err, qwit.FlowCancelled) and err.rolled_back
    ledger.assert_fully_undone(run)


@pytest.mark.parametrize("rollback", [True, False])
async def test_a_cancel_before_any_step_ran_runs_no_step(env: Env, rollback: bool):
    # Cancelled before a worker began it (or, in-process, before it ran): no
    # step runs, neither forward nor undo. (On PostgreSQL the first step ran,
    # then was stopped, and undone.)
    run = new_ledger()
    handle = await env.client.start(CancelMe, {"ledger": run})
    await handle.cancel(rollback=rollback)
    async with env.serve(CancelMe):
        kind, err = await outcome(handle)
        state = await handle.state()
    assert (kind, state.status) == ("cancelled", "cancelled")
    assert isinstance(err, qwit.FlowCancelled) and err.rolled_back == rollback
    assert err.compensated == [] and err.step is None
    assert {s.status for s in state.steps} == {"pending"}
    assert ledger.entries(run) == []


#: The client a step of ``CancelsItsFlow`` cancels its flow through, by ledger.
_CANCEL_THROUGH: dict[str, qwit.Client] = {}


class CancelsItsFlow(Effect, name="conf.cancels_its_flow"):
    """Applies its effect, cancels its own flow, and returns at once."""

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:
        out = await super().step_forward(args)
        client = _CANCEL_THROUGH[args["ledger"]]
        await client.get_handle(qwit.context().flow_id).cancel(rollback=False)
        return out


class NextAfterCancel(Effect, name="conf.next_after_cancel"):
    pass


class CancelledInItsStep(qwit.Flow, name="conf.cancelled_in_its_step"):
    def build_flow(self) -> None:
        self.step(CancelsItsFlow)
        self.step(NextAfterCancel)


async def test_a_cancel_sent_while_a_step_runs_starts_no_later_step(env: Env):
    # The cancel is committed before the step ends: the flow takes it before
    # the step's end, so the next step never starts. (On PostgreSQL the end of
    # a step its driver's own worker ran was taken first, and with a quick
    # step the next one started, its effect kept by cancel(rollback=False).)
    async with env.serve(CancelledInItsStep):
        for _ in range(3):
            run = new_ledger()
            _CANCEL_THROUGH[run] = env.client
            handle = await env.client.start(CancelledInItsStep, {"ledger": run})
            kind, err = await outcome(handle)
            assert kind == "cancelled", err
            assert isinstance(err, qwit.FlowCancelled) and not err.rolled_back
            assert ledger.applied(run) == ["conf.cancels_its_flow"]
            assert ledger.undone(run) == []
            assert [s.status for s in (await handle.state()).steps][1] == "pending"


class Settled(Effect, name="conf.settled"):
    pass


class SettledSub(qwit.Flow, name="conf.settled_sub"):
    def build_flow(self) -> None:
        self.step(Settled, {"eid": "inner"})


class SettledFlow(qwit.Flow, name="conf.settled_flow"):
    def build_flow(self) -> None:
        self.step(Settled, {"eid": "outer"})
        self.step(SettledSub)


async def test_a_cancel_as_the_flow_tells_its_sub_flows_to_keep_their_effects(env: Env):
    # Once every step has run, the flow tells its sub-flows to keep their
    # effects; a cancel then is too late and the flow completes. Before, it
    # ended neither completed nor rolled back (local: a bare CancelledError;
    # Temporal: "cancelled before it started", nothing undone), state()
    # running forever. Cancels are swept over the window; on qwit.local (one
    # event loop, no timing) some land in it for sure.
    landed = 0
    async with env.serve(SettledFlow):
        for tick in range(1, 40):
            run = new_ledger()
            handle = await env.client.start(SettledFlow, {"ledger": run})
            if env.client.backend is qwit.local:
                for _ in range(tick):
                    await asyncio.sleep(0)
            else:
                await asyncio.sleep(0.005 * tick)
            before = await handle.state()
            if before.status == "running" and all(s.status == "done" for s in before.steps):
                landed += 1
            with contextlib.suppress(qwit.ReactionError):  # it ended already
                await handle.cancel()
            kind, _ = await outcome(handle)
            state = await handle.state()
            assert state.status == kind, (tick, kind, state.status)
            if kind == "completed":
                assert ledger.undone(run) == []
                assert sorted(ledger.applied(run)) == ["inner", "outer"]
            else:
                assert kind == "cancelled", (tick, kind)
                ledger.assert_fully_undone(run)
            if kind == "completed" and before.status in ("completed",):
                break  # past the window
    if env.client.backend is qwit.local:
        assert landed > 0


class RaisesCancelled(Effect, name="conf.raises_cancelled"):
    """Its first attempt awaits a task that was cancelled: the step's own
    ``CancelledError``, not a cancel of the attempt."""

    retry = qwit.Retry(max_attempts=2, initial_interval=0.05)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:
        if qwit.context().attempt == 1:
            inner = asyncio.ensure_future(asyncio.sleep(10))
            await asyncio.sleep(0)
            inner.cancel()
            await inner
        return await super().step_forward(args)


class RaisesCancelledFlow(qwit.Flow, name="conf.raises_cancelled_flow"):
    def build_flow(self) -> None:
        self.step(RaisesCancelled)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Python 3.10 can't tell the two apart")
async def test_a_cancelled_error_raised_by_a_step_is_its_failure(env: Env):
    # Before, on qwit.local, it ended the flow's task (a bare CancelledError,
    # state() running forever); on Temporal its message was lost.
    run = new_ledger()
    async with env.serve(RaisesCancelledFlow):
        handle = await env.client.start(RaisesCancelledFlow, {"ledger": run})
        kind, _ = await outcome(handle)
        state = await handle.state()
    assert kind == "completed"
    assert (state.steps[0].status, state.steps[0].attempts) == ("done", 2)
    assert ledger.applied(run) == ["conf.raises_cancelled"]


class ReturnsTuples(qwit.Step, name="conf.returns_tuples"):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"pair": (1, 2), "nested": {"t": ("a", ("b",))}}


class SeesLists(qwit.Step, name="conf.sees_lists"):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"seen": [type(args["pair"]).__name__, type(args["nested"]["t"][1]).__name__]}


class TuplesFlow(qwit.Flow, name="conf.tuples_flow"):
    def build_flow(self) -> None:
        self.step(ReturnsTuples)
        self.step(SeesLists)


async def test_outputs_read_as_json_reads_them_on_every_engine(env: Env):
    # Before, qwit.local passed a tuple on as a tuple (Temporal: a list).
    async with env.serve(TuplesFlow):
        result = await env.client.run(TuplesFlow, {})
    assert result == {"pair": [1, 2], "nested": {"t": ["a", ["b"]]}, "seen": ["list", "list"]}


async def test_a_cancel_of_an_ended_flow_is_refused(env: Env):
    run = new_ledger()
    async with env.serve(CancelMe):
        handle = await env.client.start(CancelMe, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "Slow")
        await handle.cancel()
        kind, _ = await outcome(handle)
        assert kind == "cancelled"
        # ended: the contract's ReactionError ("a cancel the flow can't take")
        for rollback in (True, False):
            with pytest.raises(qwit.ReactionError, match="already ended"):
                await handle.cancel(rollback=rollback)
    with pytest.raises(qwit.FlowNotFound):
        await env.client.get_handle(f"no-such-{run}").cancel()


class Quiet(Effect, name="conf.quiet"):
    """Its first attempt goes quiet (no qwit.heartbeat()); the next one beats."""

    heartbeat_timeout = 0.5
    retry = qwit.Retry(max_attempts=2, initial_interval=0.1, max_interval=0.1)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:
        attempt = qwit.context().attempt
        ledger.record(args["ledger"], "attempt", str(attempt))
        if attempt == 1:
            try:
                await asyncio.sleep(30)
            finally:
                ledger.record(args["ledger"], "stopped", str(attempt))
        for i in range(4):  # 0.8 s in all: past the timeout, but beating
            qwit.heartbeat(i)
            await asyncio.sleep(0.2)
        return await super().step_forward(args)


class QuietPlain(Effect, name="conf.quiet_plain"):
    """A plain step: its quiet first attempt learns through ``cancelled``."""

    heartbeat_timeout = 0.5
    retry = qwit.Retry(max_attempts=2, initial_interval=0.1, max_interval=0.1)

    def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:  # type: ignore[override]
        import time

        attempt = qwit.context().attempt
        ledger.record(args["ledger"], "attempt", str(attempt))
        if attempt == 1:
            while not qwit.context().cancelled:
                time.sleep(0.02)
            ledger.record(args["ledger"], "stopped", str(attempt))
            raise RuntimeError("stopped")
        for i in range(4):
            qwit.heartbeat(i)
            time.sleep(0.2)
        ledger.record(args["ledger"], "do", "conf.quiet_plain")
        return {"out_conf.quiet_plain": "-"}


class QuietFlow(qwit.Flow, name="conf.quiet_flow"):
    def build_flow(self) -> None:
        self.step(Quiet)
        self.step(QuietPlain)


async def test_an_attempt_that_goes_quiet_past_its_heartbeat_timeout_is_stopped_and_retried(
    env: Env,
):
    run = new_ledger()
    async with env.serve(QuietFlow):
        handle = await env.client.start(QuietFlow, {"ledger": run})
        result = await asyncio.wait_for(handle.result(), 30)
        state = await handle.state()
    assert result["out_conf.quiet"] == "-" and result["out_conf.quiet_plain"] == "-"
    assert [s.attempts for s in state.steps] == [2, 2]
    # each quiet attempt stopped before the next one started
    entries = [e for e in ledger.entries(run) if e[0] in ("attempt", "stopped")]
    assert entries == [("attempt", "1"), ("stopped", "1"), ("attempt", "2")] * 2
    assert ledger.applied(run) == ["conf.quiet", "conf.quiet_plain"]


class Swallows(Effect, name="conf.swallows"):
    """Its first attempt goes quiet, then swallows the cancel that stops it
    and returns: it still went quiet, and is retried."""

    heartbeat_timeout = 0.4
    retry = qwit.Retry(max_attempts=2, initial_interval=0.1, max_interval=0.1)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:
        attempt = qwit.context().attempt
        ledger.record(args["ledger"], "attempt", str(attempt))
        if attempt == 1:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(30)
            return {"out_conf.swallows": "first"}
        return await super().step_forward(args)


class SwallowsFlow(qwit.Flow, name="conf.swallows_flow"):
    def build_flow(self) -> None:
        self.step(Swallows)


async def test_an_attempt_that_swallows_the_heartbeat_stop_still_went_quiet(env: Env):
    run = new_ledger()
    async with env.serve(SwallowsFlow):
        result = await asyncio.wait_for(env.client.run(SwallowsFlow, {"ledger": run}), 30)
    assert result["out_conf.swallows"] == "-"  # the second attempt's
    assert ledger.marks(run, "attempt") == ["1", "2"]


class QuietThenCancelled(Effect, name="conf.quiet_cancelled"):
    """A plain step, quiet, that notices ``cancelled`` only after a second."""

    heartbeat_timeout = 0.3
    retry = qwit.Retry(max_attempts=3, initial_interval=0.1, max_interval=0.1)

    def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:  # type: ignore[override]
        import time

        ledger.record(args["ledger"], "attempt", str(qwit.context().attempt))
        ledger.record(args["ledger"], "do", "conf.quiet_cancelled")
        time.sleep(1.0)
        return {}


class Before(Effect, name="conf.before"):
    pass


class QuietThenCancelledFlow(qwit.Flow, name="conf.quiet_cancelled_flow"):
    def build_flow(self) -> None:
        self.step(Before)
        self.step(QuietThenCancelled)


async def test_a_cancel_while_a_quiet_attempt_stops_is_not_lost(env: Env):
    run = new_ledger()
    async with env.serve(QuietThenCancelledFlow):
        # 0.5 s in: the watchdog has fired; the thread still runs
        kind, _ = await cancelled_at(env, QuietThenCancelledFlow, run, ("attempt", "1"), 0.5)
    assert kind == "cancelled"
    assert ledger.marks(run, "attempt") == ["1"]  # no attempt after the cancel
    ledger.assert_fully_undone(run)


class SlowToStop(Effect, name="conf.slow_to_stop"):
    """Quiet, and slow to stop: 0.8 s whatever it is told (plain or async)."""

    heartbeat_timeout = 0.3
    retry = qwit.Retry(max_attempts=3, initial_interval=0.4, max_interval=0.4)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:
        attempt = str(qwit.context().attempt)
        ledger.record(args["ledger"], "attempt", attempt)
        ledger.record(args["ledger"], "do", "conf.slow_to_stop")
        try:
            await asyncio.sleep(0.8 if attempt == "1" else 0)
        finally:
            if attempt == "1":
                await asyncio.shield(asyncio.sleep(0.3))  # a slow cleanup
            ledger.record(args["ledger"], "ended", attempt)
        return None


class SlowToStopPlain(Effect, name="conf.slow_to_stop_plain"):
    heartbeat_timeout = 0.3
    retry = qwit.Retry(max_attempts=3, initial_interval=0.4, max_interval=0.4)

    def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:  # type: ignore[override]
        attempt = str(qwit.context().attempt)
        ledger.record(args["ledger"], "attempt", attempt)
        ledger.record(args["ledger"], "do", "conf.slow_to_stop_plain")
        if attempt == "1":
            time.sleep(0.8)  # deaf to cancelled
        ledger.record(args["ledger"], "ended", attempt)
        return None


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("cancel_at", [0.1, 0.45])
async def test_a_quiet_attempt_is_undone_only_once_it_stopped(
    env: Env, plain: bool, cancel_at: float
):
    """Cancelled before its watchdog fires, or while it stops after it: the
    flow ends cancelled, no attempt starts after the cancel, and its undo
    starts only once it has ended."""
    step = SlowToStopPlain if plain else SlowToStop

    class Flow(qwit.Flow, name=f"conf.slow_to_stop_flow.{int(plain)}"):
        def build_flow(self) -> None:
            self.step(step)

    run = new_ledger()
    async with env.serve(Flow):
        kind, _ = await cancelled_at(env, Flow, run, ("attempt", "1"), cancel_at)
    assert kind == "cancelled"
    assert ledger.marks(run, "attempt") == ["1"]
    entries = [e for e in ledger.entries(run) if e[0] in ("ended", "undo")]
    assert entries == [("ended", "1"), ("undo", step.name)]


class QuietUndo(Effect, name="conf.quiet_undo"):
    """Its undo's first attempt goes quiet."""

    heartbeat_timeout = 0.4
    back_retry = qwit.Retry(max_attempts=2, initial_interval=0.1, max_interval=0.1)

    async def step_back(self, args: dict[str, Any]) -> None:
        if qwit.context().attempt == 1:
            await asyncio.sleep(30)
        await super().step_back(args)


class QuietUndoFlow(qwit.Flow, name="conf.quiet_undo_flow"):
    def build_flow(self) -> None:
        self.step(QuietUndo)
        self.step(CancelMe)


async def test_a_quiet_undo_after_a_cancel_is_retried(env: Env):
    """The undo runs after the flow's cancel: that cancel is not its own."""
    run = new_ledger()
    async with env.serve(QuietUndoFlow):
        kind, handle = await cancelled_at(env, QuietUndoFlow, run, ("started", "Slow"))
        state = await handle.state()
    assert kind == "cancelled"
    assert state.steps[0].back_attempts == 2
    ledger.assert_fully_undone(run)


async def test_failing_compensation(env: Env):
    run = new_ledger()
    async with env.serve(BadBackFlow):
        handle = await env.client.start(BadBackFlow, {"ledger": run, "fail": "C"})
        kind, err = await outcome(handle)
    assert kind == "compensation_failed"
    assert err.compensated == ["C", "I2", "I1", "A"]
    assert err.failed_compensations == ["BadBack"]
    assert ledger.marks(run, "undo-attempt") == ["BadBack", "BadBack"]


async def test_retries(env: Env):
    from tests.test_temporal_core import ATTEMPTS

    run = new_ledger()
    async with env.serve(FlakyFlow, RefusesFlow):
        handle = await env.client.start(FlakyFlow, {"run": run, "succeed_on": 3})
        kind, result = await outcome(handle)
        state = await handle.state()
        assert (kind, result["attempt"], state.steps[0].attempts) == ("completed", 3, 3)
        # the execution's id (fixed at start), then the step's path
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}/1", result["key"]), result["key"]
        refused = new_ledger()
        kind, err = await outcome(await env.client.start(RefusesFlow, {"run": refused}))
    assert ATTEMPTS[run] == [1, 2, 3]
    assert (kind, ATTEMPTS[refused]) == ("rolled_back", [1])
    assert err.reason == "StepError: card declined"


#: The attempts each run of Backs3 made so far, by run.
BACKOFF_TRIES: dict[str, int] = {}


class Backs3(qwit.Step, name="conf.backs3"):
    """Fails its first two attempts, each after a one-second backoff."""

    retry = qwit.Retry(max_attempts=3, initial_interval=1.0, backoff=1.0)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        tries = BACKOFF_TRIES[args["run"]] = BACKOFF_TRIES.get(args["run"], 0) + 1
        if tries < 3:
            raise RuntimeError(f"attempt {tries} failed")
        return {"tries": tries}


class BacksOff(qwit.Flow, name="conf.backs_off"):
    def build_flow(self) -> None:
        self.step(Backs3)


async def test_a_step_waiting_out_its_backoff_shows_its_attempts_and_last_error(env: Env):
    # As on Temporal: while a step waits to be retried, state() counts the
    # attempts that ended and shows how the last one failed. PostgreSQL
    # counted attempts as they started, and showed no error: 0 attempts
    # during the first backoff.
    run = new_ledger()
    seen: list[tuple[int, str | None]] = []
    async with env.serve(BacksOff):
        handle = await env.client.start(BacksOff, {"run": run})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = await handle.state()
            step = state.steps[0]
            if step.status == "running" and step.attempts > 0:
                seen.append((step.attempts, step.error.message if step.error else None))
            if state.status != "running":
                break
            await asyncio.sleep(0.02)
        result = await asyncio.wait_for(handle.result(), 30)
        state = await handle.state()
    assert (1, "attempt 1 failed") in seen
    assert (2, "attempt 2 failed") in seen
    assert result["tries"] == 3
    assert state.steps[0].attempts == 3


async def test_typed_step_missing_a_field(env: Env):
    async with env.serve(SyncTypedFlow):
        ok = await env.client.run(SyncTypedFlow, {"order_id": 1, "amount": 2.0})
        handle = await env.client.start(SyncTypedFlow, {"order_id": 1, "ledger": new_ledger()})
        kind, err = await outcome(handle)
    assert ok["receipt"] == "r-1-2.00"
    assert kind == "rolled_back"
    assert "'amount'" in err.reason


async def test_wait_retry_with_args_and_state(env: Env):
    run = new_ledger()
    async with env.serve(ApprovalFlow):
        handle = await env.client.start(ApprovalFlow, {"ledger": run})
        state = await wait_status(handle, "waiting")
        assert state.waiting is not None
        assert (state.waiting.step, state.waiting.direction) == ("react.approval", "step_forward")
        assert [p.name for p in state.waiting.rollback_preview] == ["react.approval", "react.A"]
        assert [s.status for s in state.steps] == ["done", "failed", "pending"]
        with pytest.raises(qwit.ReactionError):
            await handle.react("explode")
        await handle.react("retry", args={"approved": True, "approver": "carol"})
        kind, result = await outcome(handle)
        state = await handle.state()
        with pytest.raises(qwit.ReactionError, match="not waiting"):
            await handle.react("retry")
    assert kind == "completed"
    assert result["approved_by"] == "carol"
    assert state.status == "completed"
    assert [s.status for s in state.steps] == ["done", "done", "done"]
    assert [s.attempts for s in state.steps] == [1, 3, 1]


async def test_a_decision_the_flow_cant_take_is_refused_and_nothing_changes(env: Env):
    run, back = new_ledger(), new_ledger()
    async with env.serve(ApprovalFlow, FixableFlow):
        forward = await env.client.start(ApprovalFlow, {"ledger": run})
        undo = await env.client.start(FixableFlow, {"ledger": back, "fail": "react.C"})
        await wait_status(forward, "waiting")
        state = await wait_status(undo, "waiting")
        assert state.waiting is not None and state.waiting.direction == "step_back"
        with pytest.raises(qwit.ReactionError, match="args only go with"):
            await forward.react(qwit.SKIP, args={"approved": True})
        with pytest.raises(qwit.ReactionError, match="not allowed"):
            await undo.react(qwit.ROLLBACK)  # a failed undo: retry, skip or abort
        with pytest.raises(qwit.ReactionError, match="args only go with"):
            await undo.react(qwit.SKIP, args={"x": 1})
        await asyncio.sleep(0.5)  # (a decision sent anyway would be taken by now)
        forward_state, undo_state = await forward.state(), await undo.state()
        await forward.react(qwit.ROLLBACK)
        await undo.react(qwit.ABORT)
        forward_kind, _ = await outcome(forward)
        undo_kind, _ = await outcome(undo)
    assert (forward_state.status, undo_state.status) == ("waiting", "waiting")
    assert (forward_kind, undo_kind) == ("rolled_back", "compensation_failed")


async def test_a_step_decided_already_takes_no_second_decision(env: Env):
    # The first decision stands: a second one, sent before the flow has
    # acted on the first, is refused (it would silently replace it).
    run = new_ledger()
    async with env.serve(ApprovalFlow):
        handle = await env.client.start(ApprovalFlow, {"ledger": run})
        await wait_status(handle, "waiting")
        await handle.react(qwit.RETRY, args={"approved": True, "approver": "carol"})
        with pytest.raises(qwit.ReactionError, match=r"not waiting|no step waits"):
            await handle.react(qwit.ABORT)
        kind, result = await outcome(handle)
    assert kind == "completed"
    assert result["approved_by"] == "carol"


class TwoApprovals(qwit.Flow, name="conf.two_approvals"):
    def build_flow(self) -> None:
        self.step(A)
        self.step(Approval)
        self.step(Approval)
        self.step(C)


async def test_a_decision_has_taken_effect_when_react_returns(env: Env):
    # As on Temporal (an update): once react() returns, the flow has taken
    # the decision in, so state() shows it decided and the next wait is a
    # new one. On PostgreSQL react() returned once the decision was written:
    # state() still showed the old wait, and a react() meant for the next
    # wait came while the flow ran (refused), or decided the old one.
    run = new_ledger()
    async with env.serve(TwoApprovals):
        handle = await env.client.start(TwoApprovals, {"ledger": run})
        await wait_status(handle, "waiting")
        await handle.react(qwit.SKIP)
        decided = await handle.state()
        state = await wait_status(handle, "waiting")
        waiting = state.waiting
        await handle.react(qwit.SKIP)
        kind, result = await outcome(handle)
    assert [w.path for w in decided.waits] == []
    assert decided.steps[1].status == "skipped"
    assert waiting is not None and waiting.path == "3"
    assert kind == "completed"
    assert "approved_by" not in result
    assert ledger.entries(run) == [("do", "react.A"), ("do", "react.C")]


async def _tried(call: Any) -> str:
    """``ok`` if ``call`` (awaitable) returned, else its exception's class name."""
    try:
        await call
    except Exception as exc:
        return type(exc).__name__
    return "ok"


async def test_of_two_decisions_sent_at_once_the_first_stands_and_the_other_is_refused(
    env: Env,
):
    # README: a second decision for a step decided already is refused (the
    # first stands). Sent at once, both passed the checks on Temporal (the
    # second replaced the first, and the flow's end aborted the first's call:
    # FlowNotFound) and on PostgreSQL (both returned; the flow dropped one).
    reactions = {"skip": "completed", "abort": "aborted"}
    async with env.serve(ApprovalFlow):
        for _ in range(5):
            handle = await env.client.start(ApprovalFlow, {"ledger": new_ledger()})
            await wait_status(handle, "waiting")
            tried = await asyncio.gather(*(_tried(handle.react(r)) for r in reactions))
            kind, _ = await outcome(handle)
            assert sorted(tried) == ["ReactionError", "ok"], tried
            assert kind == reactions[list(reactions)[tried.index("ok")]]


async def test_a_decision_that_reaches_a_flow_after_it_ended_is_refused(env: Env):
    # The flow ended between the caller's look at its state and the
    # decision's arrival (another decision, or a cancel, came first): on
    # Temporal the update found no running workflow, and the caller was told
    # no flow had the id (FlowNotFound) of a flow that exists.
    async with env.serve(ApprovalFlow):
        handle = await env.client.start(ApprovalFlow, {"ledger": new_ledger()})
        state = await wait_status(handle, "waiting")
        assert state.waiting is not None
        await handle.react(qwit.ABORT)
        kind, _ = await outcome(handle)
        with pytest.raises(qwit.ReactionError, match=r"not waiting \(it is aborted\)"):
            await handle.send_decision(
                handle.id, qwit.engine.Decision(reaction=qwit.SKIP, path=state.waiting.path)
            )
    assert kind == "aborted"


@pytest.mark.parametrize("rollback", [True, False])
async def test_a_decision_sent_after_a_cancel_is_refused(env: Env, rollback: bool):
    # As on Temporal (an update comes after the signals before it, and the
    # cancelled flow waits no more): elsewhere a decision sent right after
    # cancel() was accepted, and then dropped by the cancelled flow.
    run = new_ledger()
    async with env.serve(ApprovalFlow):
        handle = await env.client.start(ApprovalFlow, {"ledger": run})
        await wait_status(handle, "waiting")
        await handle.cancel(rollback=rollback)
        with pytest.raises(qwit.ReactionError):
            await handle.react(qwit.RETRY, args={"approved": True})
        kind, err = await outcome(handle)
    assert kind == "cancelled"
    assert isinstance(err, qwit.FlowCancelled) and err.rolled_back is rollback
    assert "approval" not in ledger.applied(run)


async def test_a_new_flow_may_take_an_ended_flows_id_not_a_running_ones(env: Env):
    run, again = new_ledger(), new_ledger()
    flow_id = f"reused-{run}"
    async with env.serve(ApprovalFlow):
        first = await env.client.start(ApprovalFlow, {"ledger": run}, id=flow_id)
        await wait_status(first, "waiting")
        with pytest.raises(qwit.ArgumentsError, match="is already running"):
            await env.client.start(ApprovalFlow, {"ledger": again}, id=flow_id)
        await first.react(qwit.ROLLBACK)
        kind, _ = await outcome(first)
        second = await env.client.start(
            ApprovalFlow, {"ledger": again, "approved": True}, id=flow_id
        )
        result = await asyncio.wait_for(second.result(), 60)
        state = await second.state()
        # the handle of the first run keeps to it (as Temporal's do)
        kind_again, _ = await outcome(first)
        first_state = await first.state()
        # the new run's records are what a redrive reads (it completed)
        with pytest.raises(qwit.ReactionError, match="completed"):
            await env.client.redrive(flow_id)
    assert kind == kind_again == first_state.status == "rolled_back"
    assert result["ledger"] == again and result["approved_by"] == "operator"
    assert state.status == "completed"
    assert [(s.status, s.attempts) for s in state.steps] == [("done", 1)] * 3
    assert ledger.entries(again) == [("do", "react.A"), ("do", "approval"), ("do", "react.C")]


async def test_wait_then_rollback(env: Env):
    run = new_ledger()
    async with env.serve(ApprovalFlow):
        handle = await env.client.start(ApprovalFlow, {"ledger": run})
        await wait_status(handle, "waiting")
        await handle.react(qwit.ROLLBACK)
        kind, err = await outcome(handle)
    assert kind == "rolled_back"
    assert err.compensated == ["react.approval", "react.A"]
    assert ledger.undone(run) == ["react.A"]


async def test_wait_on_compensation_then_retry(env: Env):
    from tests.test_temporal_reactions import ALLOWED

    run = new_ledger()
    async with env.serve(FixableFlow):
        handle = await env.client.start(FixableFlow, {"ledger": run, "fail": "react.C"})
        state = await wait_status(handle, "waiting")
        assert state.waiting is not None
        assert state.waiting.direction == "step_back"
        ALLOWED.add(run)
        await handle.react("retry")
        kind, err = await outcome(handle)
    assert (kind, err.compensated) == (
        "rolled_back",
        ["react.C", "react.fixable_back", "react.A"],
    )
    ledger.assert_fully_undone(run)


async def test_wait_on_compensation_then_abort_stops_the_rollback_there(env: Env):
    # The contract's WAIT takes "one of the above": ABORT at a failed undo
    # stops the rollback there, as back_on_failure=ABORT does.
    run = new_ledger()
    async with env.serve(FixableFlow):
        handle = await env.client.start(FixableFlow, {"ledger": run, "fail": "react.C"})
        state = await wait_status(handle, "waiting")
        assert state.waiting is not None and "abort" in state.waiting.allowed
        await handle.react(qwit.ABORT)
        kind, err = await outcome(handle)
    assert kind == "compensation_failed"
    assert err.compensated == ["react.C"]
    assert err.failed_compensations == ["react.fixable_back"]
    assert err.not_compensated == ["react.A"]
    # (react.C failed before its effect: its undo had nothing to do)
    assert ledger.undone(run) == []  # react.A left as it is


class Local(Effect, name="conformance.local"):
    pass


class LocalFlow(qwit.Flow, backend=qwit.local):
    def build_flow(self) -> None:
        self.step(Local)


class TemporalFlow(qwit.Flow):
    def build_flow(self) -> None:
        self.step(Local)


async def test_one_client_runs_local_and_temporal_flows(temporal_client, task_queue, worker):
    client = await qwit.connect(temporal_client=temporal_client, task_queue=task_queue)
    run = new_ledger()
    async with worker(TemporalFlow):
        on_temporal = await client.start(TemporalFlow, {"ledger": run})
        in_process = await client.start(LocalFlow, {"ledger": run})
        assert (on_temporal.engine, in_process.engine) == ("temporal", "local")
        results = await asyncio.gather(on_temporal.result(), in_process.result())
    assert results[0] == results[1] == {"ledger": run, "out_conformance.local": "-"}
    assert ledger.applied(run) == ["conformance.local", "conformance.local"]
    await client.close()


async def test_a_local_only_client_never_connects_to_temporal():
    # nothing listens on this address: starting a local flow must not try it
    client = await qwit.connect(target_host="127.0.0.1:1")
    run = new_ledger()
    assert await client.run(LocalFlow, {"ledger": run}) == {
        "ledger": run,
        "out_conformance.local": "-",
    }
    await client.close()


class Stops(qwit.Step, name="conformance.stops"):
    """Fails until the flow's args say ``"fixed"``, and the flow aborts."""

    retry = qwit.Retry(max_attempts=1)
    on_failure = qwit.ABORT

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        if not args.get("fixed"):
            raise RuntimeError("not yet")
        return {"stopped": False}


class LocalStops(qwit.Flow, backend=qwit.local):
    def build_flow(self) -> None:
        self.step(Local)
        self.step(Stops)


async def test_a_client_finds_the_flows_it_started_on_their_own_engine():
    """``get_handle`` and ``redrive`` by id alone reach the engine the client
    started that flow on (here, the Flow's ``backend=qwit.local``), not the
    default engine: nothing listens on the Temporal address."""
    client = await qwit.connect(target_host="127.0.0.1:1")
    run = new_ledger()
    handle = await client.start(LocalStops, {"ledger": run}, id="stops-here")
    with pytest.raises(qwit.FlowAborted):
        await handle.result()
    again = client.get_handle("stops-here")
    assert again.engine == "local"
    assert (await again.state()).status == "aborted"
    redriven = await client.redrive("stops-here", args={"fixed": True})
    assert redriven.engine == "local"
    assert (await redriven.result())["stopped"] is False
    assert ledger.applied(run) == ["conformance.local"]  # reused, not run again
    assert client.get_handle("stops-here").engine == "local"
    assert client.get_handle("stops-here/~2").engine == "local"  # (a sub-flow's id)
    # An id this client did not start goes where it always did: the
    # client's backend, or a given one, else Temporal (read without making
    # the Temporal engine, which would try the address nothing listens on).
    assert client._backend_for("started-elsewhere", None).name == "temporal"
    assert client.get_handle("started-elsewhere", backend=qwit.local).engine == "local"
    await client.close()


class Retried(qwit.Step, name="conformance.retried"):
    """Fails its first two attempts at ``args["slow"]``'s path, then waits in
    its third until the test releases it; elsewhere it just completes."""

    retry = qwit.Retry(max_attempts=5, initial_interval=0.1, max_interval=0.1)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        here = qwit.context()
        if args["slow"] != here.path:
            return {}
        if here.attempt < 3:
            raise RuntimeError(f"attempt {here.attempt} failed")
        ledger.record(args["ledger"], "blocked", here.path)
        while "go" not in ledger.marks(args["ledger"], "release"):
            await asyncio.sleep(0.05)
        return {}


class RetriedAlone(qwit.Flow):
    def build_flow(self) -> None:
        self.step(Retried)


class RetriedBranches(qwit.Flow):
    def build_flow(self) -> None:
        with self.parallel():
            self.step(Retried)
            self.step(Retried)


class RetriedElements(qwit.Flow):
    def build_flow(self) -> None:
        self.map(Retried, over="items", item="item", into="outs", max_concurrency=3)


class RetriedInside(qwit.Flow):
    def build_flow(self) -> None:
        self.step(RetriedAlone)


def _step_at(steps: list[qwit.StepState], path: str) -> qwit.StepState:
    for step in steps:
        if step.path == path:
            return step
        if path.startswith(f"{step.path}."):
            return _step_at(step.steps, path)
    raise AssertionError(f"no step at {path}")


@pytest.mark.parametrize(
    ("flow", "slow"),
    [
        (RetriedAlone, "1"),
        (RetriedBranches, "1.2"),
        (RetriedElements, "1.2"),
        (RetriedInside, "1.1"),
    ],
)
async def test_state_counts_the_attempts_of_a_step_being_retried(env: Env, flow, slow):
    # StepState.attempts: the attempts of step_forward that have ended, also
    # while the step is still being retried, wherever it is in the flow.
    run = new_ledger()
    async with env.serve(flow):
        handle = await env.client.start(flow, {"ledger": run, "slow": slow, "items": [1, 2, 3]})
        await ledger.wait_for_mark(run, "blocked", slow, timeout=30)
        state = await handle.state()
        ledger.record(run, "release", "go")
        result = await asyncio.wait_for(handle.result(), 60)
    step = _step_at(state.steps, slow)
    assert (step.status, step.attempts) == ("running", 2)
    assert step.error is not None and "attempt 2 failed" in step.error.message
    # described alike on every engine: its class and bases, where it was
    # raised (on Temporal it was rebuilt from the error's name alone)
    assert step.error.types == ["builtins.RuntimeError", "builtins.Exception"]
    assert "raise RuntimeError" in step.error.traceback
    assert result["ledger"] == run


class PreviewFirst(qwit.Step, name="conformance.preview_first"):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"first": 1}

    async def step_back(self, args: dict[str, Any]) -> None:
        ledger.record(args["ledger"], "undo", qwit.context().path)


class PreviewWaits(qwit.Step, name="conformance.preview_waits"):
    retry = qwit.Retry(max_attempts=1)
    on_failure = qwit.WAIT

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("needs an operator")

    async def step_back(self, args: dict[str, Any]) -> None:
        ledger.record(args["ledger"], "undo", qwit.context().path)


class PreviewBlock(qwit.Flow):
    def build_flow(self) -> None:
        self.step(PreviewFirst)
        with self.parallel():
            self.step(PreviewWaits)
            self.step(PreviewWaits)


class PreviewOuter(Effect, name="conf.preview_outer"):
    pass


class PreviewInner(Effect, name="conf.preview_inner"):
    pass


class PreviewInnerWaits(Effect, name="conf.preview_inner_waits"):
    pass


class PreviewSub(qwit.Flow, name="conf.preview_sub"):
    def build_flow(self) -> None:
        self.step(PreviewInner)
        self.step(PreviewInnerWaits, on_failure=qwit.WAIT)


class PreviewThroughSub(qwit.Flow, name="conf.preview_through_sub"):
    def build_flow(self) -> None:
        self.step(PreviewOuter)
        self.step(PreviewSub)


async def test_the_rollback_preview_of_a_wait_in_a_sub_flow_goes_on_in_its_parent(env: Env):
    # A ROLLBACK decided inside a sub-flow undoes the sub-flow, then (its
    # failure rolling the parent back) the parent's completed steps: the
    # preview lists them all, in order. Before, it ended at the sub-flow.
    run = new_ledger()
    async with env.serve(PreviewThroughSub):
        handle = await env.client.start(
            PreviewThroughSub, {"ledger": run, "fail": "conf.preview_inner_waits"}
        )
        state = await wait_status(handle, "waiting", timeout=30)
        assert state.waiting is not None
        preview = [(item.name, item.path) for item in state.waiting.rollback_preview]
        await handle.react(qwit.ROLLBACK)
        kind, err = await outcome(handle)
    assert kind == "rolled_back"
    assert preview == [
        ("conf.preview_inner_waits", "2.2"),
        ("conf.preview_inner", "2.1"),
        ("conf.preview_outer", "1"),
    ]
    assert [name for name, _ in preview] == err.compensated
    assert state.waiting.rollback_preview[-1].args["ledger"] == run


async def test_a_waiting_branchs_rollback_preview_is_what_the_rollback_undoes(env: Env):
    # Both branches wait: a ROLLBACK decided for one stops the block, undoes
    # both branches (side by side, newest first), then what ran before it.
    run = new_ledger()
    async with env.serve(PreviewBlock):
        handle = await env.client.start(PreviewBlock, {"ledger": run})
        for _ in range(200):
            state = await handle.state()
            if len(state.waits) == 2:
                break
            await asyncio.sleep(0.05)
        await handle.react(qwit.ROLLBACK, path="2.1")
        kind, err = await outcome(handle)
    previews = {w.path: [p.path for p in w.rollback_preview] for w in state.waits}
    assert kind == "rolled_back"
    undone = [c.path for c in err.compensations]
    assert undone == ["2.2", "2.1", "1"] or sorted(undone[:2]) == ["2.1", "2.2"]
    assert previews == {"2.1": ["2.2", "2.1", "1"], "2.2": ["2.2", "2.1", "1"]}
    assert sorted(ledger.undone(run)) == ["1", "2.1", "2.2"]


#: Ledgers whose IgnoresItsDeadline thread has ended.
THREAD_ENDED: set[str] = set()


class IgnoresItsDeadline(qwit.Step, name="conformance.ignores_deadline"):
    """A plain step that does not look at ``context().cancelled``: it outlives
    its timeout and its grace."""

    retry = qwit.Retry(max_attempts=1)
    timeout = 0.5
    timeout_grace = 0.3

    def step_forward(self, args: dict[str, Any]) -> None:
        time.sleep(3)
        THREAD_ENDED.add(args["ledger"])


class OutlivesItsGrace(qwit.Flow):
    def build_flow(self) -> None:
        self.step(IgnoresItsDeadline)


async def test_a_step_that_outlives_its_grace_fails_as_timed_out_after_its_timeout(env: Env):
    # However the engine ends such an attempt, its failure reads the same.
    # And it ends once the grace is over, not when the step's thread does
    # (an engine that left the grace at its 30 s default waited for it).
    run = new_ledger()
    async with env.serve(OutlivesItsGrace):
        handle = await env.client.start(OutlivesItsGrace, {"ledger": run})
        kind, err = await outcome(handle)
        assert run not in THREAD_ENDED
    assert kind == "rolled_back"
    assert err.reason == "TimeoutError: step timed out after 0.5s"


class ReturnsTooMuch(qwit.Step, name="conformance.returns_too_much"):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        ledger.record(args["ledger"], "do", "big")
        return {"big": "x" * (3 * 1024 * 1024)}

    async def step_back(self, args: dict[str, Any]) -> None:
        ledger.record(args["ledger"], "undo", "big")


class TooMuchFlow(qwit.Flow):
    def build_flow(self) -> None:
        self.step(Local)
        self.step(ReturnsTooMuch)


async def test_payloads_over_the_limit_fail_alike_on_every_engine_that_has_one(env: Env):
    # qwit.local (and the engines built on qwit.engine's in-memory parts)
    # keeps Temporal's default payload limit, so that a flow too big for
    # Temporal fails the same way where it is tested. (PostgreSQL has none.)
    if env.client.engine(env.client.backend).name == "postgres":
        pytest.skip("the PostgreSQL engine has no payload limit")
    run = new_ledger()
    async with env.serve(TooMuchFlow):
        with pytest.raises(qwit.PayloadTooLarge, match="payload limit"):
            await env.client.start(TooMuchFlow, {"ledger": run, "blob": "x" * (3 * 1024 * 1024)})
        handle = await env.client.start(TooMuchFlow, {"ledger": run})
        kind, err = await outcome(handle)
    assert kind == "rolled_back"
    assert err.reason.startswith("PayloadTooLarge:")
    assert err.compensated == ["conformance.returns_too_much", "conformance.local"]
    assert ledger.undone(run) == ["big", "conformance.local"]


#: Per ledger: the calls of the text steps' methods, in order.
_TEXT_CALLS: dict[str, list[str]] = {}


def _nested(levels: int) -> dict[str, Any]:
    """A dict of ``levels`` dicts, each in the one before."""
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


#: What TextOut returns, by ``args["text"]``.
_TEXTS: dict[str, Any] = {
    "ok": "ok",
    "surrogate": "x\ud800",
    "nul": "a\x00b",
    "deep": _nested(99),  # (in the output: 100 levels)
    "too deep": _nested(100),
    "long": "x" * 10_000,
    "object": object(),
}


class TextModel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)
    out: Any


class RawBytes(pydantic.BaseModel):
    raw: bytes


class TextFirst(qwit.Step, name="conformance.text_first"):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        _TEXT_CALLS.setdefault(args["ledger"], []).append("first.forward")
        return {"first": True}

    async def step_back(self, args: dict[str, Any]) -> None:
        _TEXT_CALLS.setdefault(args["ledger"], []).append("first.back")


class NotYet(Exception):
    pass


class TextOut(qwit.Step, name="conformance.text_out"):
    """Returns ``_TEXTS[args["text"]]``, fails with ``_TEXTS[args["raise"]]``, or waits
    for an operator until ``args["fixed"]``."""

    retry = qwit.Retry(max_attempts=2, initial_interval=0.1)
    on_failure = {"NotYet": qwit.WAIT}

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        _TEXT_CALLS.setdefault(args["ledger"], []).append("out.forward")
        if "raise" in args:
            raise qwit.StepError(f"bad {_TEXTS[args['raise']]}", retry=False)
        if args.get("hold") and not args.get("fixed"):
            raise NotYet("not yet")
        model = args.get("model")
        if model == "root":
            return pydantic.RootModel[list[int]]([1, 2])
        if model == "bytes":
            return RawBytes(raw=b"\xff")
        if model:
            return TextModel(out=_TEXTS[args["text"]])
        return {"out": _TEXTS[args["text"]]}

    async def step_back(self, args: dict[str, Any]) -> None:
        _TEXT_CALLS.setdefault(args["ledger"], []).append("out.back")


class TextFlow(qwit.Flow, name="conformance.text"):
    def build_flow(self) -> None:
        self.step(TextFirst)
        self.step(TextOut)


def _is_postgres(env: Env) -> bool:
    return env.client.engine(env.client.backend).name == "postgres"


async def test_a_string_with_no_utf8_form_is_refused_as_args_and_fails_its_step_as_output(
    env: Env,
):
    # A lone surrogate: a Python string that has no UTF-8 form, so no JSON
    # payload. Before, start() raised pydantic's error (qwit.postgres took it
    # and never ended the flow), and as an output it crashed the in-memory
    # engines' flow, leaving it running.
    run = new_ledger()
    async with env.serve(TextFlow):
        with pytest.raises(qwit.ArgumentsError, match="surrogate"):
            await env.client.start(TextFlow, {"ledger": run, "text": "ok", "s": "x\ud800"})
        with pytest.raises(qwit.ArgumentsError, match="surrogate"):
            await env.client.start(TextFlow, {"ledger": run, "text": "ok", "x\ud800": 1})
        for id in ("x\ud800", "a\x00b", "two\nlines"):  # (no engine keeps all)
            with pytest.raises(qwit.ArgumentsError, match="control character or a lone"):
                await env.client.start(TextFlow, {"ledger": run, "text": "ok"}, id=id)
        # ordinary text, not ASCII: a no-break space, a zero-width non-joiner
        # (Persian spelling), emoji joined by zero-width joiners
        for id in (
            "order\xa012",
            "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
            "\U0001f468\u200d\U0001f469",
        ):
            handle = await env.client.start(TextFlow, {"ledger": new_ledger(), "text": "ok"}, id=id)
            assert (await handle.result())["out"] == "ok"
        handle = await env.client.start(TextFlow, {"ledger": run, "text": "surrogate"})
        kind, failed = await outcome(handle)
    assert kind == "rolled_back"
    assert failed.step == "conformance.text_out"
    assert "surrogate" in failed.reason
    # not retried (it would return the same); it ran, so it is undone
    assert _TEXT_CALLS[run] == ["first.forward", "out.forward", "out.back", "first.back"]


async def test_a_nul_character_runs_where_the_engine_can_keep_it_and_is_refused_where_not(
    env: Env,
):
    # U+0000 is JSON ("\\u0000"): Temporal and the in-memory engines keep it.
    # PostgreSQL's jsonb can't: there it is refused in start(), and a step
    # that returns one fails (not retried) and is undone. Before, qwit.postgres
    # took it and left the flow running forever.
    run, out = new_ledger(), new_ledger()
    async with env.serve(TextFlow):
        if _is_postgres(env):
            with pytest.raises(qwit.ArgumentsError, match="NUL character"):
                await env.client.start(TextFlow, {"ledger": run, "text": "ok", "s": "a\x00b"})
        else:
            args = {"ledger": run, "text": "ok", "s": "a\x00b"}
            assert (await env.client.run(TextFlow, args))["s"] == "a\x00b"
        handle = await env.client.start(TextFlow, {"ledger": out, "text": "nul"})
        kind, result = await outcome(handle)
    if _is_postgres(env):
        assert kind == "rolled_back"
        assert "NUL character" in result.reason
        assert _TEXT_CALLS[out] == ["first.forward", "out.forward", "out.back", "first.back"]
    else:
        assert kind == "completed"
        assert result["out"] == "a\x00b"


async def test_a_nul_character_in_an_error_or_a_decision_leaves_no_flow_running(env: Env):
    # A step's error with U+0000 in its message ends the flow as any error
    # does (the message keeps it written out as an escape, on every engine).
    # Decision args with one: refused by qwit.postgres, like a start's.
    run, held = new_ledger(), new_ledger()
    async with env.serve(TextFlow):
        handle = await env.client.start(TextFlow, {"ledger": run, "raise": "nul"})
        kind, failed = await outcome(handle)
        assert kind == "rolled_back"
        assert "bad a\\x00b" in failed.reason
        handle = await env.client.start(TextFlow, {"ledger": held, "text": "nul", "hold": True})
        await wait_status(handle, "waiting")
        fixed = {"fixed": True, "text": "ok", "note": "a\x00b"}
        if _is_postgres(env):
            with pytest.raises(qwit.ArgumentsError, match="NUL character"):
                await handle.react(qwit.RETRY, args=fixed)
            await handle.react(qwit.RETRY, args={**fixed, "note": "ab"})
            assert (await handle.result())["note"] == "ab"
        else:
            await handle.react(qwit.RETRY, args=fixed)
            assert (await handle.result())["note"] == "a\x00b"


async def test_args_nested_too_deep_for_json_readers_are_refused_and_fail_their_step(env: Env):
    # Up to qwit's MAX_DEPTH (100) levels, the args object the first, args
    # and outputs run on every engine (inside QWIT's own envelopes, which
    # pydantic reads up to 200 levels); deeper, start() refuses them and
    # an output fails its step. Before: a RecursionError from start(), or a
    # payload Temporal's worker could not read back.
    run, out = new_ledger(), new_ledger()
    async with env.serve(TextFlow):
        with pytest.raises(qwit.ArgumentsError, match="nested more than 100 levels"):
            await env.client.start(TextFlow, {"ledger": run, "text": "ok", "d": _nested(100)})
        with pytest.raises(qwit.ArgumentsError, match="nested more than 100 levels"):
            await env.client.start(TextFlow, {"ledger": run, "text": "ok", "d": _nested(5000)})
        args = {"ledger": run, "text": "deep", "d": _nested(99)}
        result = await env.client.run(TextFlow, args)
        assert result["d"] == result["out"] == _nested(99)
        handle = await env.client.start(TextFlow, {"ledger": out, "text": "too deep"})
        kind, failed = await outcome(handle)
    assert kind == "rolled_back"
    assert "nested more than 100 levels" in failed.reason
    assert _TEXT_CALLS[out] == ["first.forward", "out.forward", "out.back", "first.back"]


def _said_cut(text: str) -> int:
    found = re.search(r"\.\.\. \[(\d+) more characters cut\]$", text)
    assert found is not None, text[-80:]
    return int(found.group(1))


async def test_a_long_error_message_is_cut_saying_how_much_of_it_is_missing(env: Env):
    # Error messages are kept up to 4,096 characters, the note included; the
    # note counts what is missing of the original, also in the reason, which
    # cuts "Type: message" again. Before, the reason's note counted only its
    # own second cut (28 or 44 characters), and the texts ran past 4,096.
    run = new_ledger()
    async with env.serve(TextFlow):
        handle = await env.client.start(TextFlow, {"ledger": run, "raise": "long"})
        kind, failed = await outcome(handle)
    assert kind == "rolled_back"
    message, reason = failed.info.error.message, failed.reason
    assert message.startswith("bad xxx") and reason.startswith("StepError: bad xxx")
    for text in (message, reason):
        assert len(text) <= 4096
        assert text.count("x") + _said_cut(text) == 10_000


@pytest.mark.parametrize(
    ("text", "model"),
    [("object", True), ("surrogate", True), ("too deep", True), ("ok", "root"), ("ok", "bytes")],
)
async def test_a_model_output_with_no_json_form_fails_its_step_as_a_dict_would(
    env: Env, text: str, model: Any
):
    # A field of any type, a lone surrogate, too deep, a RootModel of a list
    # (not an object), bytes that are not UTF-8. Before, the model's error
    # escaped: the in-memory engines' flow crashed (left running), Temporal
    # and PostgreSQL retried the step (Temporal's flow never ended on the
    # RootModel: its workflow could not read the step's return).
    # (A NaN is not among them: pydantic's JSON mode writes it as null.)
    run = new_ledger()
    async with env.serve(TextFlow):
        handle = await env.client.start(TextFlow, {"ledger": run, "text": text, "model": model})
        kind, failed = await outcome(handle)
    assert kind == "rolled_back"
    assert failed.error_type == "qwit.ArgumentsError", failed.reason
    assert _TEXT_CALLS[run] == ["first.forward", "out.forward", "out.back", "first.back"]


class AtTheLimits(qwit.Step, name="conformance.at_the_limits"):
    """Every duration and count at the most QWIT takes."""

    from qwit._options import MAX_ATTEMPTS, MAX_SECONDS

    retry = qwit.Retry(
        max_attempts=MAX_ATTEMPTS, initial_interval=MAX_SECONDS, max_interval=MAX_SECONDS
    )
    back_retry = qwit.Retry(max_attempts=MAX_ATTEMPTS, backoff=1e300)
    timeout = MAX_SECONDS
    back_timeout = MAX_SECONDS
    timeout_grace = MAX_SECONDS
    heartbeat_timeout = MAX_SECONDS

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"ran": True}

    async def step_back(self, args: dict[str, Any]) -> None:
        _TEXT_CALLS.setdefault(args["ledger"], []).append("limits.back")


class AtTheLimitsFlow(qwit.Flow, name="conformance.at_the_limits"):
    def build_flow(self) -> None:
        self.step(AtTheLimits)
        self.step(TextOut)


async def test_options_at_their_limits_run_on_every_engine(env: Env):
    # The bounds QWIT sets on options (100 years, 2**31 - 1 attempts) are
    # ones every engine holds. Past them, an engine overflowed (Temporal's
    # workflow task failed on every try, PostgreSQL could not read its plan)
    # and the flow never ended: now a FlowDefinitionError (test_definitions).
    run = new_ledger()
    async with env.serve(AtTheLimitsFlow):
        handle = await env.client.start(AtTheLimitsFlow, {"ledger": run, "raise": "nul"})
        kind, _ = await outcome(handle)
    assert kind == "rolled_back"
    assert _TEXT_CALLS[run] == ["out.forward", "out.back", "limits.back"]


class LongNamedStep(qwit.Step, name="s" * 200):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"named": True}


class LongNamedFlow(qwit.Flow, name="f" * 200):
    def build_flow(self) -> None:
        self.step(LongNamedStep)
        self.step(Outer)  # (a sub-flow: its id is the flow's, and more)


async def test_names_and_ids_as_long_as_qwit_takes_run_and_longer_are_refused(env: Env):
    # Temporal holds ids and activity names up to 1,000 bytes. Before, a
    # longer step name left the flow running forever (its activity could not
    # be scheduled), and a longer id raised temporalio's RPCError from start().
    with pytest.raises(qwit.FlowDefinitionError, match="longer than 200 bytes"):

        class TooLong(qwit.Step, name="s" * 201):
            pass

    run = new_ledger()
    async with env.serve(LongNamedFlow):
        with pytest.raises(qwit.ArgumentsError, match="longer than 500 bytes"):
            await env.client.start(LongNamedFlow, {"ledger": run}, id="é" * 251)
        result = await env.client.run(LongNamedFlow, {"ledger": run})  # its default id
        assert result["named"] and result["out_O2"] == "-"
        handle = await env.client.start(LongNamedFlow, {"ledger": run}, id="é" * 250)
        assert (await handle.result())["out_I2"] == "inner-only"


@pytest.mark.parametrize("flow_id", ["", "x" * 2000, "a\x00b", "x\ud800"])
async def test_an_id_no_flow_can_have_is_not_found(env: Env, flow_id: str):
    # Before, Temporal answered the empty one with temporalio's RPCError,
    # PostgreSQL the NUL with psycopg's error, both the surrogate with a
    # UnicodeEncodeError.
    handle = env.client.get_handle(flow_id)
    with pytest.raises(qwit.FlowNotFound):
        await handle.state()
    with pytest.raises(qwit.FlowNotFound):
        await handle.result()
    with pytest.raises(qwit.FlowNotFound):
        await handle.cancel()
    with pytest.raises(qwit.FlowNotFound):
        await handle.react(qwit.RETRY)
    with pytest.raises(qwit.FlowNotFound):
        await env.client.redrive(flow_id)


class AliasOrder(pydantic.BaseModel):
    order_id: int = pydantic.Field(alias="orderId")


class ChoiceForbid(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    y: int = pydantic.Field(validation_alias=pydantic.AliasChoices("ya", "yb"))
    z: int = pydantic.Field(alias="za", validation_alias="zv")  # (reads zv, not za)


class Totals(pydantic.BaseModel):
    total: int = 0

    @pydantic.model_validator(mode="before")
    @classmethod
    def _sum(cls, data: Any) -> Any:
        return {"total": data.get("a", 0) + data.get("b", 0)}


class XForbid(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    x: int


class Picky(pydantic.BaseModel):
    n: int

    @pydantic.field_validator("n")
    @classmethod
    def _not_negative(cls, n: int) -> int:
        if n < 0:
            raise LookupError("negative n")  # (not a ValueError: pydantic lets it through)
        return n


class MakesOrder(qwit.Step, name="conformance.makes_order"):
    async def step_forward(self, args: dict[str, Any]) -> AliasOrder:
        return AliasOrder(orderId=7)


class ReadsOrder(qwit.Step, name="conformance.reads_order"):
    async def step_forward(self, args: AliasOrder) -> dict[str, Any]:
        return {"read": args.order_id}


class ReadsChoice(qwit.Step, name="conformance.reads_choice"):
    async def step_forward(self, args: ChoiceForbid) -> dict[str, Any]:
        return {"y": args.y, "z": args.z}


class ReadsTotal(qwit.Step, name="conformance.reads_total"):
    async def step_forward(self, args: Totals) -> dict[str, Any]:
        return {"total": args.total}


class FallsBack(qwit.Step, name="conformance.falls_back"):
    on_failure = qwit.FALLBACK

    async def step_forward(self, args: dict[str, Any]) -> None:
        raise qwit.StepError("no", retry=False)

    async def step_fallback(self, args: XForbid, error: qwit.engine.ErrorInfo) -> dict[str, Any]:
        return {"fell": args.x}


class TypedReads(qwit.Flow, name="conformance.typed_reads"):
    def build_flow(self) -> None:
        self.step(MakesOrder)
        self.step(ReadsOrder)
        self.step(ReadsChoice)
        self.step(ReadsTotal)
        self.step(FallsBack)


async def test_typed_steps_read_what_their_models_read(env: Env):
    # Each failed before, on every engine: a model with an alias returned by
    # one step and read by the next (merged by field name, read by alias); a
    # model that forbids extra keys with AliasChoices, or in step_fallback
    # (sent every arg); a model whose "before" validator reads keys that are
    # not its fields (it was sent only its fields).
    args = {"ledger": new_ledger(), "yb": 3, "zv": 4, "za": 0, "a": 1, "b": 2, "x": 5, "other": 9}
    async with env.serve(TypedReads):
        result = await env.client.run(TypedReads, args)
    assert result["order_id"] == 7 and result["read"] == 7
    assert (result["y"], result["z"], result["total"], result["fell"]) == (3, 4, 3, 5)


class PickyStep(qwit.Step, name="conformance.picky"):
    retry = qwit.Retry(max_attempts=2, initial_interval=0.1)

    async def step_forward(self, args: Picky) -> dict[str, Any]:
        raise AssertionError("never run: its args are refused")

    async def step_back(self, args: dict[str, Any]) -> None:
        _TEXT_CALLS.setdefault(args["ledger"], []).append("picky.back")


class PickyFlow(qwit.Flow, name="conformance.picky"):
    def build_flow(self) -> None:
        self.step(TextFirst)
        self.step(PickyStep)


async def test_a_model_validator_that_raises_fails_the_step_it_types(env: Env):
    # Before, on the in-memory engines the validator's LookupError crashed the
    # flow (left running, nothing undone); PostgreSQL said its worker died.
    # (And a RootModel of a list as a flow's args raised pydantic's error.)
    run = new_ledger()
    async with env.serve(PickyFlow):
        with pytest.raises(qwit.ArgumentsError, match="JSON object"):
            await env.client.start(PickyFlow, pydantic.RootModel[list[int]]([1, 2]))
        handle = await env.client.start(PickyFlow, {"ledger": run, "n": -1})
        kind, failed = await outcome(handle)
    assert kind == "rolled_back"
    assert failed.reason == "LookupError: negative n"
    assert _TEXT_CALLS[run] == ["first.forward", "first.back"]  # it never ran: no undo


class LastSlow(qwit.Step, name="conformance.last_slow"):
    """Sleeps ``args["sleep"]`` seconds, through a cancel if ``args["deaf"]``."""

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        _TEXT_CALLS.setdefault(args["ledger"], []).append("slow.forward")
        loop = asyncio.get_running_loop()
        end = loop.time() + args["sleep"]
        while (left := end - loop.time()) > 0:
            try:
                await asyncio.sleep(left)
            except asyncio.CancelledError:
                if not args.get("deaf"):
                    raise
        return {"slow": True}

    async def step_back(self, args: dict[str, Any]) -> None:
        _TEXT_CALLS.setdefault(args["ledger"], []).append("slow.back")


class EndsSlowly(qwit.Flow, name="conformance.ends_slowly"):
    def build_flow(self) -> None:
        self.step(TextFirst)
        self.step(LastSlow)


async def test_a_cancel_during_the_last_step_cancels_the_flow(env: Env):
    # The last step finishes anyway (it does not stop at the cancel): the
    # flow is cancelled all the same, and both steps are undone. Before, on
    # Temporal (and PostgreSQL), the cancel was spent on the step, and the
    # flow completed: cancel() had returned, and nothing was undone.
    run = new_ledger()
    async with env.serve(EndsSlowly):
        handle = await env.client.start(EndsSlowly, {"ledger": run, "sleep": 1.5, "deaf": True})
        assert await _until(lambda: "slow.forward" in _TEXT_CALLS.get(run, []))
        await asyncio.sleep(0.3)
        await handle.cancel()
        kind, failed = await outcome(handle)
    assert kind == "cancelled"
    assert failed.compensated == ["conformance.last_slow", "conformance.text_first"]
    assert _TEXT_CALLS[run] == ["first.forward", "slow.forward", "slow.back", "first.back"]


async def _until(done: Callable[[], bool], timeout: float = 10.0) -> bool:
    for _ in range(int(timeout / 0.02)):
        if done():
            return True
        await asyncio.sleep(0.02)
    return False


async def _taken_or_refused(call: Any) -> str:
    try:
        await call
    except qwit.ReactionError:
        return "refused"
    return "taken"


async def test_a_cancel_sent_beside_a_retry_of_the_last_step_is_never_dropped(env: Env):
    # An operator's RETRY of the waiting last step and a cancel, sent at once:
    # whichever the flow takes first, a cancel() that returned means the flow
    # ends cancelled. Before, on PostgreSQL, the step's end could be handed
    # over first and end the flow with the cancel's row left unread (and, on
    # Temporal and PostgreSQL, a cancel spent on the step completed the flow).
    ends = []
    async with env.serve(TextFlow):
        for _ in range(6):
            args = {"ledger": new_ledger(), "text": "ok", "hold": True}
            handle = await env.client.start(TextFlow, args)
            await wait_status(handle, "waiting")
            _, cancel = await asyncio.gather(
                _taken_or_refused(handle.react(qwit.RETRY, args={"fixed": True})),
                _taken_or_refused(handle.cancel()),
            )
            kind, _ = await outcome(handle)
            ends.append((cancel, kind))
    assert all(kind == "cancelled" for cancel, kind in ends if cancel == "taken"), ends
