"""Parallel blocks and maps, the same on every engine (Temporal, qwit.local
and the thread engine of the tests): args, outputs, failures, undo in
dependency order (checked by tests/parallel_ledger.py), decisions, cancels."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from pydantic import BaseModel

import qwit
from qwit._flow import compile_flow
from qwit.testing import wait_for_status
from tests import parallel_ledger as pl
from tests.parallel_ledger import Work
from tests.test_conformance import Env, env, outcome

__all__ = ["env"]


class Ship(qwit.Flow, name="par.ship"):
    def build_flow(self) -> None:
        self.step(Work, {"eid": "pack"})
        self.step(Work, {"eid": "ship"})


class Checkout(qwit.Flow, name="par.checkout"):
    def build_flow(self) -> None:
        self.step(Work, {"eid": "reserve"})
        with self.parallel():
            self.step(Work, {"eid": "charge"})
            self.step(Ship)
            self.step(Work, {"eid": "points"})
        self.step(Work, {"eid": "confirm"})


#: The paths of Checkout's parallel block.
CHECKOUT_GROUPS = {"2"}


class Notify(qwit.Flow, name="par.notify"):
    def build_flow(self) -> None:
        self.step(Work, {"eid": "first"})
        self.map(Work, over="users", item="user", into="notified", max_concurrency=3)
        self.step(Work, {"eid": "last"})


class WaitingBranches(qwit.Flow, name="par.waiting"):
    def build_flow(self) -> None:
        with self.parallel():
            self.step(Work, {"eid": "a"}, on_failure="wait")
            self.step(Work, {"eid": "b"}, on_failure="wait")
            self.step(Work, {"eid": "c"})


class SkippingBranch(qwit.Flow, name="par.skipping"):
    def build_flow(self) -> None:
        with self.parallel():
            self.step(Work, {"eid": "a"}, on_failure="skip")
            self.step(Work, {"eid": "b"})
        self.step(Work, {"eid": "after"})


class AbortingBranch(qwit.Flow, name="par.aborting"):
    def build_flow(self) -> None:
        self.step(Work, {"eid": "before"})
        with self.parallel():
            self.step(Work, {"eid": "a"}, on_failure="abort")
            self.step(Work, {"eid": "b"})


class SkipbackBranch(qwit.Flow, name="par.skipback"):
    def build_flow(self) -> None:
        self.step(Work, {"eid": "before"})
        with self.parallel():
            self.step(Work, {"eid": "a"}, on_failure="skipback")
            self.step(Work, {"eid": "b"})


FLOWS = (Checkout, Notify, WaitingBranches, SkippingBranch, AbortingBranch, SkipbackBranch)


def new_ledger() -> str:
    return uuid.uuid4().hex


async def test_branches_see_the_args_of_the_start_and_merge_in_plan_order(env: Env):
    run = new_ledger()
    # the last branch ends first: the merge still follows the plan
    delay = {"charge": 0.3, "pack": 0.2, "points": 0.01}
    async with env.serve(*FLOWS):
        result = await env.client.run(Checkout, {"ledger": run, "delay": delay})
    assert result["out_reserve"] == []
    # each branch saw what ran before the block, nothing of its siblings
    assert result["out_charge"] == ["out_reserve"]
    assert result["out_pack"] == ["out_reserve"]
    assert result["out_ship"] == ["out_pack", "out_reserve"]
    assert result["out_points"] == ["out_reserve"]
    assert result["out_confirm"] == [
        "out_charge",
        "out_pack",
        "out_points",
        "out_reserve",
        "out_ship",
    ]
    assert list(result)[-5:] == ["out_charge", "out_pack", "out_ship", "out_points", "out_confirm"]
    # they ran side by side
    assert pl.peak(run, "do") >= 2


async def test_state_shows_the_block_and_its_branches(env: Env):
    run = new_ledger()
    async with env.serve(*FLOWS):
        handle = await env.client.start(Checkout, {"ledger": run})
        await handle.result()
        state = await handle.state()
    block = state.steps[1]
    assert (block.kind, block.path, block.status) == ("parallel", "2", "done")
    assert [(s.path, s.kind, s.status) for s in block.steps] == [
        ("2.1", "step", "done"),
        ("2.2", "flow", "done"),
        ("2.3", "step", "done"),
    ]
    assert [s.path for s in block.steps[1].steps] == ["2.2.1", "2.2.2"]


@pytest.mark.parametrize("fail", ["charge", "ship", "confirm", "points"])
async def test_a_failure_undoes_in_reverse_dependency_order(env: Env, fail: str):
    run = new_ledger()
    # charge is slow: a failure elsewhere in the block cancels it mid-run
    delay = {"charge": 0.5 if fail in ("ship", "points") else 0.05}
    async with env.serve(*FLOWS):
        handle = await env.client.start(Checkout, {"ledger": run, "fail": fail, "delay": delay})
        kind, err = await outcome(handle)
        state = await handle.state()
    assert kind == "rolled_back"
    assert err.step == "par.work"
    assert pl.check(run, CHECKOUT_GROUPS) == []
    assert sorted(pl.undone(run)) == sorted(pl.applied(run))
    assert pl.undone(run)[-1] == "reserve"
    if fail == "confirm":
        assert pl.undone(run)[0] == "confirm"
        assert pl.peak(run, "undo") >= 2  # the branches are undone side by side
    assert set(err.compensated) == {"par.work"}
    assert state.steps[1].status in ("compensated", "compensation_failed")
    assert state.status == "rolled_back"


async def test_two_branches_returning_the_same_key_fail_the_block(env: Env):
    run = new_ledger()
    out = {"charge": "out_same", "points": "out_same"}
    async with env.serve(*FLOWS):
        handle = await env.client.start(Checkout, {"ledger": run, "out": out})
        kind, err = await outcome(handle)
    assert kind == "rolled_back"
    assert "'out_same'" in err.reason
    assert err.step == "parallel"
    assert pl.check(run, CHECKOUT_GROUPS) == []
    assert "confirm" not in pl.applied(run)


class Same(BaseModel):
    total: int = 0


class TypedA(qwit.Step, name="par.typed_a"):
    async def step_forward(self, args: dict[str, Any]) -> Same:
        return Same()


class TypedB(qwit.Step, name="par.typed_b"):
    async def step_forward(self, args: dict[str, Any]) -> Same:
        return Same()


class TypedClash(qwit.Flow, name="par.clash"):
    def build_flow(self) -> None:
        with self.parallel():
            self.step(TypedA)
            self.step(TypedB)


async def test_typed_outputs_that_clash_fail_the_block_as_any_clash(env: Env):
    # The contract's rule, whatever the outputs' types (before, typed ones
    # were refused at definition, against it).
    async with env.serve(TypedClash):
        handle = await env.client.start(TypedClash, {})
        kind, err = await outcome(handle)
    assert kind == "rolled_back"
    assert "'total'" in err.reason and err.step == "parallel"


def test_blocks_and_maps_are_checked_at_definition():
    class Empty(qwit.Flow, name="par.empty"):
        def build_flow(self) -> None:
            with self.parallel():
                pass

    class Nested(qwit.Flow, name="par.nested"):
        def build_flow(self) -> None:
            with self.parallel(), self.parallel():
                self.step(Work)

    class BadMap(qwit.Flow, name="par.bad_map"):
        def build_flow(self) -> None:
            self.map(Work, over="users", item="user", into="out", max_concurrency=0)

    class NoOver(qwit.Flow, name="par.no_over"):
        def build_flow(self) -> None:
            self.map(Work, over="", item="user", into="out")

    for flow, message in [
        (Empty, "has no branches"),
        (Nested, "can't hold another"),
        (BadMap, "max_concurrency must be a whole number >= 1"),
        (NoOver, "over= must be the name of an arg"),
    ]:
        with pytest.raises(qwit.FlowDefinitionError, match=message):
            compile_flow(flow)


async def test_a_map_collects_outputs_in_element_order(env: Env):
    run = new_ledger()
    users = [5, 3, 9, 1, 7, 2, 8]
    # the first elements are the slowest: they end last
    delay = {f"user-{u}": 0.3 - 0.04 * i for i, u in enumerate(users)}
    async with env.serve(*FLOWS):
        result = await env.client.run(Notify, {"ledger": run, "users": users, "delay": delay})
    assert [next(iter(o)) for o in result["notified"]] == [f"out_user-{u}" for u in users]
    assert [o["index"] for o in result["notified"]] == list(range(len(users)))
    # an element saw the map's starting args without the list, plus its item
    assert result["notified"][0] == {"out_user-5": ["out_first"], "index": 0}
    assert "out_last" in result
    assert pl.peak(run, "do") == 3


async def test_an_empty_map_is_fine(env: Env):
    run = new_ledger()
    async with env.serve(*FLOWS):
        result = await env.client.run(Notify, {"ledger": run, "users": []})
    assert result["notified"] == []
    assert pl.applied(run) == ["first", "last"]


@pytest.mark.parametrize("users", [None, "not a list"])
async def test_a_map_without_its_list_fails_naming_it(env: Env, users: Any):
    run = new_ledger()
    args: dict[str, Any] = {"ledger": run}
    if users is not None:
        args["users"] = users
    async with env.serve(*FLOWS):
        handle = await env.client.start(Notify, args)
        kind, err = await outcome(handle)
    assert kind == "rolled_back"
    assert "args['users'] must be a list" in err.reason
    assert pl.undone(run) == ["first"]


async def test_a_failed_element_undoes_the_map_at_most_max_concurrency_at_once(env: Env):
    run = new_ledger()
    users = list(range(10))
    delay = {"user-9": 0.4}
    async with env.serve(*FLOWS):
        handle = await env.client.start(
            Notify, {"ledger": run, "users": users, "fail": "user-9", "delay": delay}
        )
        kind, _ = await outcome(handle)
        state = await handle.state()
    assert kind == "rolled_back"
    assert pl.check(run, {"2"}) == []
    assert sorted(pl.undone(run)) == sorted(pl.applied(run))
    assert pl.undone(run)[-1] == "first"
    assert pl.peak(run, "undo") <= 3
    assert pl.peak(run, "do") <= 3
    elements = state.steps[1].steps
    assert [e.index for e in elements] == users
    assert [e.path for e in elements][:2] == ["2.1", "2.2"]


async def test_a_skipped_branch_lets_the_others_go_on(env: Env):
    run = new_ledger()
    async with env.serve(*FLOWS):
        result = await env.client.run(
            SkippingBranch, {"ledger": run, "fail": "a", "fail_before": True}
        )
    assert "out_a" not in result
    assert result["out_after"] == ["out_b"]


async def test_abort_in_a_branch_stops_its_siblings_and_undoes_nothing(env: Env):
    run = new_ledger()
    async with env.serve(*FLOWS):
        handle = await env.client.start(
            # b runs long enough for the cancel to reach it (on Temporal, in
            # the response to its heartbeat, every second)
            AbortingBranch,
            {"ledger": run, "fail": "a", "delay": {"b": 3.0}},
        )
        kind, _ = await outcome(handle)
        state = await handle.state()
    assert kind == "aborted"
    assert pl.undone(run) == []
    assert [s.status for s in state.steps[1].steps] == ["failed", "failed"]


async def test_skipback_in_a_branch_undoes_all_but_the_failed_step(env: Env):
    run = new_ledger()
    async with env.serve(*FLOWS):
        handle = await env.client.start(
            SkipbackBranch, {"ledger": run, "fail": "a", "delay": {"b": 0.01}}
        )
        kind, _ = await outcome(handle)
    assert kind == "rolled_back"
    assert sorted(pl.undone(run)) == ["b", "before"]
    assert pl.undone(run)[-1] == "before"
    assert pl.check(run, {"2"}, all_undone=False) == []


async def test_waiting_branches_are_decided_by_path(env: Env):
    run = new_ledger()
    async with env.serve(*FLOWS):
        handle = await env.client.start(
            WaitingBranches, {"ledger": run, "fail": ["a", "b"], "fail_before": True}
        )
        for _ in range(400):
            state = await handle.state()
            if len(state.waits) == 2 and "c" in pl.applied(run):
                break
            await asyncio.sleep(0.05)
        assert [w.path for w in state.waits] == ["1.1", "1.2"]
        assert state.status == "waiting"
        # c ran on beside them
        assert "c" in pl.applied(run)
        with pytest.raises(qwit.ReactionError, match="name the one"):
            await handle.react(qwit.SKIP)
        with pytest.raises(qwit.ReactionError, match=r"no step waits at path '1\.3'"):
            await handle.react(qwit.SKIP, path="1.3")
        await handle.react(qwit.RETRY, args={"fail": []}, path="1.2")
        await handle.react(qwit.SKIP, path="1.1")
        result = await asyncio.wait_for(handle.result(), 60)
    assert "out_a" not in result
    assert result["out_b"] == []
    assert result["out_c"] == []


async def test_a_cancel_during_a_block_undoes_what_started(env: Env):
    run = new_ledger()
    async with env.serve(*FLOWS):
        handle = await env.client.start(
            Checkout, {"ledger": run, "delay": {"charge": 5.0, "pack": 0.01, "points": 0.01}}
        )
        for _ in range(400):
            if "points" in pl.applied(run) and "ship" in pl.applied(run):
                break
            await asyncio.sleep(0.02)
        await handle.cancel()
        kind, _ = await outcome(handle)
    assert kind == "cancelled"
    assert pl.check(run, CHECKOUT_GROUPS) == []
    assert "reserve" in pl.undone(run)
    assert "confirm" not in pl.applied(run)


async def test_a_waiting_branch_is_shown_and_others_complete(env: Env):
    run = new_ledger()
    async with env.serve(*FLOWS):
        handle = await env.client.start(
            WaitingBranches, {"ledger": run, "fail": "a", "fail_before": True}
        )
        await wait_for_status(handle, "waiting", timeout=30)
        for _ in range(400):  # the others run on, and complete
            if {"b", "c"} <= set(pl.applied(run)):
                break
            await asyncio.sleep(0.02)
        state = await handle.state()
        assert [w.path for w in state.waits] == ["1.1"]
        await handle.react(qwit.ROLLBACK)
        kind, _ = await outcome(handle)
    assert kind == "rolled_back"
    assert sorted(pl.undone(run)) == ["b", "c"]


class WaitingNotify(qwit.Flow, name="par.waiting_notify"):
    def build_flow(self) -> None:
        self.map(
            Work, over="users", item="user", into="notified", max_concurrency=2, on_failure="wait"
        )


async def test_waiting_elements_give_their_place_under_max_concurrency_to_the_others(env: Env):
    # Two elements of a map of at most 2 at once wait for an operator: the
    # others run on meanwhile, and the retried ones take places again (still
    # at most 2 at once). Before, the waiting elements kept their places:
    # nothing ran until the operator decided.
    run = new_ledger()
    users = list(range(6))
    delay = {f"user-{u}": 0.4 for u in users[2:]}
    args = {"ledger": run, "users": users, "delay": delay}
    async with env.serve(WaitingNotify):
        handle = await env.client.start(
            WaitingNotify, {**args, "fail": ["user-0", "user-1"], "fail_before": True}
        )
        for _ in range(500):
            state = await handle.state()
            if len(state.waits) == 2 and "user-2" in pl.applied(run):
                break
            await asyncio.sleep(0.02)
        assert sorted(w.path for w in state.waits) == ["1.1", "1.2"]
        assert "user-2" in pl.applied(run), "the others did not run on"
        # decided while the others still run: the retried ones wait for places
        await handle.react(qwit.RETRY, args={"fail": None}, path="1.1")
        await handle.react(qwit.RETRY, args={"fail": None}, path="1.2")
        kind, result = await outcome(handle)
    assert kind == "completed"
    assert [next(iter(o)) for o in result["notified"]] == [f"out_user-{u}" for u in users]
    assert pl.peak(run, "do") <= 2


class NotifyOne(qwit.Flow, name="par.notify_one"):
    def build_flow(self) -> None:
        self.step(Work, on_failure="wait")


class WaitingSubNotify(qwit.Flow, name="par.waiting_sub_notify"):
    def build_flow(self) -> None:
        self.map(NotifyOne, over="users", item="user", into="notified", max_concurrency=2)


class NotifyOneInside(qwit.Flow, name="par.notify_one_inside"):
    def build_flow(self) -> None:
        self.step(NotifyOne)


class WaitingDeepNotify(qwit.Flow, name="par.waiting_deep_notify"):
    def build_flow(self) -> None:
        self.map(NotifyOneInside, over="users", item="user", into="notified", max_concurrency=2)


@pytest.mark.parametrize(
    ("flow", "inside"), [(WaitingSubNotify, ".1"), (WaitingDeepNotify, ".1.1")], ids=["1", "2"]
)
async def test_sub_flow_elements_whose_steps_wait_give_their_place_to_the_others(
    env: Env, flow: type[qwit.Flow], inside: str
):
    # As above, with elements that are sub-flows whose step waits (in the
    # element, or in a sub-flow of it): the element gives its place back
    # while it waits, and asks for one before it goes on. Before, it kept its
    # place: with two waiting, nothing ran.
    run = new_ledger()
    users = list(range(6))
    delay = {f"user-{u}": 0.4 for u in users[2:]}
    args = {"ledger": run, "users": users, "delay": delay}
    first, second = f"1.1{inside}", f"1.2{inside}"
    async with env.serve(flow):
        handle = await env.client.start(
            flow, {**args, "fail": ["user-0", "user-1"], "fail_before": True}
        )
        for _ in range(500):
            state = await handle.state()
            if len(state.waits) == 2 and "user-2" in pl.applied(run):
                break
            await asyncio.sleep(0.02)
        assert sorted(w.path for w in state.waits) == [first, second]
        assert "user-2" in pl.applied(run), "the others did not run on"
        # decided while the others still run: the sub-flows wait for places
        await handle.react(qwit.RETRY, args={"fail": None}, path=first)
        await handle.react(qwit.SKIP, path=second)
        kind, result = await outcome(handle)
    assert kind == "completed", result
    assert sorted(pl.applied(run)) == sorted(f"user-{u}" for u in users if u != 1)
    assert len(result["notified"]) == len(users)
    assert pl.peak(run, "do") <= 2


#: Per ledger: how many steps of each map element run now, the most
#: elements that ran at once, and the effects in order.
_ELEMENT_STEPS: dict[str, dict[str, int]] = {}
_ELEMENTS_PEAK: dict[str, int] = {}
_ELEMENT_LOG: dict[str, list[str]] = {}


class ElementJob(qwit.Step, name="par.element_job"):
    """Counts the map elements that have a step running at once."""

    retry = qwit.Retry(max_attempts=1)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        run, element = args["ledger"], str(args["user"])
        eid = f"{element}-{args['eid']}"
        steps = _ELEMENT_STEPS.setdefault(run, {})
        steps[element] = steps.get(element, 0) + 1
        now = sum(1 for n in steps.values() if n > 0)
        _ELEMENTS_PEAK[run] = max(_ELEMENTS_PEAK.get(run, 0), now)
        _ELEMENT_LOG.setdefault(run, []).append(eid)
        try:
            if eid in args.get("fail", []):
                raise qwit.StepError(f"{eid} failed", retry=False)
            await asyncio.sleep(float(args.get("delay", {}).get(eid, 0.05)))
        finally:
            steps[element] -= 1
        return {f"out_{args['eid']}": eid}

    async def step_back(self, args: dict[str, Any]) -> None:
        run, element = args["ledger"], str(args["user"])
        steps = _ELEMENT_STEPS.setdefault(run, {})
        steps[element] = steps.get(element, 0) + 1
        now = sum(1 for n in steps.values() if n > 0)
        _ELEMENTS_PEAK[run] = max(_ELEMENTS_PEAK.get(run, 0), now)
        try:
            await asyncio.sleep(
                float(args.get("back_delay", {}).get(f"{element}-{args['eid']}", 0))
            )
        finally:
            steps[element] -= 1


class WaitBesideBranch(qwit.Flow, name="par.wait_beside_branch"):
    def build_flow(self) -> None:
        with self.parallel():
            self.step(ElementJob, {"eid": "w"}, on_failure="wait")
            self.step(ElementJob, {"eid": "s"})


class WaitBesideBranchMap(qwit.Flow, name="par.wait_beside_branch_map"):
    def build_flow(self) -> None:
        self.map(WaitBesideBranch, over="users", item="user", into="out", max_concurrency=1)


async def test_a_sub_flow_element_gives_its_place_once_its_waiting_branch_runs_alone(
    env: Env,
):
    # A waiting branch of a block inside a sub-flow element waits beside a
    # branch that runs: the element keeps its place (else max_concurrency=1
    # would let a second element run beside it). Once that branch has ended,
    # nothing of the element runs: it gives its place to element 1, and the
    # retried branch waits for it again. Before, the element kept its place
    # until the operator decided: element 1 did not run on.
    run = new_ledger()
    args = {
        "ledger": run,
        "users": [0, 1],
        "fail": ["0-w"],
        "delay": {"0-s": 1.0, "1-s": 1.0},
    }
    async with env.serve(WaitBesideBranchMap):
        handle = await env.client.start(WaitBesideBranchMap, args)
        await wait_for_status(handle, "waiting", timeout=30)
        await asyncio.sleep(0.3)  # element 0's other branch still runs
        assert not [e for e in _ELEMENT_LOG[run] if e.startswith("1-")]
        for _ in range(500):  # once it has ended, element 1 runs on
            if "1-s" in _ELEMENT_LOG[run]:
                break
            await asyncio.sleep(0.02)
        assert "1-s" in _ELEMENT_LOG[run], "element 1 did not run on"
        # decided while element 1 runs: element 0's branch waits for the place
        await handle.react(qwit.RETRY, args={"fail": []}, path="1.1.1.1")
        kind, result = await outcome(handle)
    assert kind == "completed", result
    assert _ELEMENTS_PEAK[run] == 1
    log = _ELEMENT_LOG[run]
    retried = max(i for i, eid in enumerate(log) if eid == "0-w")
    assert retried > log.index("1-s"), log  # it waited for element 1's place


class WaitingPart(qwit.Flow, name="par.waiting_part"):
    def build_flow(self) -> None:
        self.step(ElementJob, on_failure="wait")


class PartsOneAtATime(qwit.Flow, name="par.parts_one_at_a_time"):
    def build_flow(self) -> None:
        self.map(WaitingPart, over="parts", item="eid", into="po", max_concurrency=1)


class ElementsOfParts(qwit.Flow, name="par.elements_of_parts"):
    def build_flow(self) -> None:
        self.map(PartsOneAtATime, over="users", item="user", into="out", max_concurrency=1)


async def _waits(handle: qwit.FlowHandle, n: int) -> list[str]:
    for _ in range(600):
        state = await handle.state()
        if len(state.waits) >= n:
            return sorted(w.path for w in state.waits)
        await asyncio.sleep(0.05)
    raise AssertionError(f"not {n} waits: {state.waits}")


async def _until(done: Any) -> bool:
    for _ in range(200):
        if done():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_an_element_gives_its_place_again_once_its_retried_part_has_run(env: Env):
    # Elements whose parts are sub-flows that wait: once element 0's retried
    # part has completed and its other part still waits, nothing of element
    # 0 runs: element 1's retried part gets the place. Before, element 0
    # kept it until its other part was decided.
    run = new_ledger()
    args = {"ledger": run, "users": [0, 1], "parts": ["a", "b"]}
    async with env.serve(ElementsOfParts):
        handle = await env.client.start(
            ElementsOfParts, {**args, "fail": ["0-a", "0-b", "1-a", "1-b"]}
        )
        paths = await _waits(handle, 4)
        await handle.react(qwit.RETRY, args={"fail": []}, path=paths[0])
        assert await _until(lambda: _ELEMENT_LOG[run].count("0-a") == 2)
        await handle.react(qwit.RETRY, args={"fail": []}, path=paths[2])
        ran = await _until(lambda: _ELEMENT_LOG[run].count("1-a") == 2)
        for path in (paths[1], paths[3]):
            await handle.react(qwit.RETRY, args={"fail": []}, path=path)
        kind, result = await outcome(handle)
    assert ran, f"element 1's retried part did not get the place: {_ELEMENT_LOG[run]}"
    assert kind == "completed", result
    assert _ELEMENTS_PEAK[run] == 1


class PreThenWaits(qwit.Flow, name="par.pre_then_waits"):
    def build_flow(self) -> None:
        self.step(ElementJob, {"eid": "pre"})
        with self.parallel():
            self.step(ElementJob, {"eid": "a"}, on_failure="wait")
            self.step(ElementJob, {"eid": "b"}, on_failure="wait")


class PreThenWaitsMap(qwit.Flow, name="par.pre_then_waits_map"):
    def build_flow(self) -> None:
        self.map(PreThenWaits, over="users", item="user", into="out", max_concurrency=1)


@pytest.mark.parametrize("decision", [qwit.ROLLBACK, qwit.SKIPBACK, "cancel"])
async def test_an_element_that_gave_its_place_takes_it_again_to_undo(env: Env, decision: Any):
    # Element 0 waits (its place given to element 1); an operator decides
    # ROLLBACK while element 1 runs: element 0's undos wait for the place
    # (the map undoes at most max_concurrency elements at once, and runs
    # none beside them). Before, they ran beside element 1's step.
    # Or the flow is cancelled then: element 1, in the place, is stopped and
    # undone first, then element 0. Before, the elements were cancelled in
    # plan order, and element 0's undo ran beside element 1's step, still
    # stopping.
    run = new_ledger()
    args = {
        "ledger": run,
        "users": [0, 1],
        "fail": ["0-a", "0-b"],
        "delay": {"1-pre": 1.5},
        "back_delay": {"0-pre": 0.5},
    }
    async with env.serve(PreThenWaitsMap):
        handle = await env.client.start(PreThenWaitsMap, args)
        paths = await _waits(handle, 2)
        assert await _until(lambda: "1-pre" in _ELEMENT_LOG[run])
        if decision == "cancel":
            await handle.cancel()
        else:
            await handle.react(decision, path=paths[0])
        kind, failed = await outcome(handle)
    assert kind == ("cancelled" if decision == "cancel" else "rolled_back")
    if decision == "cancel":
        assert failed.compensated.count("par.element_job") == 4  # 0-pre, 0-a, 0-b, 1-pre
    assert _ELEMENTS_PEAK[run] == 1


class WaitingP(qwit.Flow, name="par.waiting_p"):
    def build_flow(self) -> None:
        self.step(ElementJob, {"eid": "p"}, on_failure="wait")


class WaitsBesideASubFlow(qwit.Flow, name="par.waits_beside_a_sub_flow"):
    def build_flow(self) -> None:
        self.step(ElementJob, {"eid": "pre"})
        with self.parallel():
            self.step(WaitingP)
            self.step(ElementJob, {"eid": "a"}, on_failure="wait")
            self.step(ElementJob, {"eid": "b"}, on_failure="wait")


async def test_a_decision_sent_while_a_cancel_is_under_way_is_refused(env: Env):
    # The cancel stops the waiting sub-flow branch first (its undo takes a
    # while); the other waits are still listed meanwhile. A decision for one
    # of them is refused, as one sent after the cancel. Before, Temporal and
    # PostgreSQL accepted it (the cancelled flow then dropped it).
    run = new_ledger()
    args = {"ledger": run, "user": 0, "fail": ["0-p", "0-a", "0-b"], "back_delay": {"0-p": 1.5}}
    async with env.serve(WaitsBesideASubFlow):
        handle = await env.client.start(WaitsBesideASubFlow, args)
        await _waits(handle, 3)
        await handle.cancel()
        await asyncio.sleep(0.3)
        with pytest.raises(qwit.ReactionError):
            await handle.react(qwit.RETRY, args={"fail": []}, path="2.2")
        kind, _ = await outcome(handle)
    assert kind == "cancelled"
    assert _ELEMENT_LOG[run].count("0-a") == 1  # not run again


#: Ledgers whose UndoWaits undo fails; what it undid, by ledger.
_UNDO_BROKEN: set[str] = set()
_UNDONE: dict[str, list[str]] = {}


class UndoWaits(qwit.Step, name="par.undo_waits"):
    back_retry = qwit.Retry(max_attempts=1)
    back_on_failure = qwit.WAIT

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"did": True}

    async def step_back(self, args: dict[str, Any]) -> None:
        if args["ledger"] in _UNDO_BROKEN:
            raise RuntimeError("the refund service is down")
        _UNDONE.setdefault(args["ledger"], []).append("undo_waits")


class UndoWaitsThenLong(qwit.Flow, name="par.undo_waits_then_long"):
    def build_flow(self) -> None:
        self.step(UndoWaits)
        self.step(Work, {"eid": "long", "delay": {"long": 30.0}})


class SiblingStopsIt(qwit.Flow, name="par.sibling_stops_it"):
    def build_flow(self) -> None:
        with self.parallel():
            self.step(UndoWaitsThenLong)
            self.step(Work, {"eid": "fails", "delay": {"fails": 0.5}})


async def test_a_failed_undo_that_a_cancel_meets_is_still_decided(env: Env):
    # A sibling's failure stops the sub-flow branch (a cancel of it), whose
    # rollback meets an undo that fails and waits (back_on_failure=WAIT):
    # that wait is decided as any, though a cancel is under way. Refusing
    # every decision during a cancel left such a flow waiting forever.
    run = new_ledger()
    _UNDO_BROKEN.add(run)
    async with env.serve(SiblingStopsIt):
        handle = await env.client.start(SiblingStopsIt, {"ledger": run, "fail": "fails"})
        paths = await _waits(handle, 1)
        _UNDO_BROKEN.discard(run)
        await handle.react(qwit.RETRY, path=paths[0])
        kind, _ = await outcome(handle)
    assert paths == ["1.1.1"]
    assert kind == "rolled_back"
    assert _UNDONE[run] == ["undo_waits"]


def test_the_graph_forks_and_joins_around_a_block_and_draws_a_map_once():
    from qwit._cli._graph import dot, mermaid

    text = mermaid(compile_flow(Checkout))
    for edge in ("s1 --> s2_1", "s1 --> s2_2_1", "s1 --> s2_3", "s2_2_1 --> s2_2_2"):
        assert edge in text
    for edge in ("s2_1 --> s3", "s2_2_2 --> s3", "s2_3 --> s3"):
        assert edge in text
    assert "s2_1 --> s2_2_1" not in text  # branches are not a sequence
    # an undo after the join leads to every branch's undo
    assert "s3 -. undo .-> s2_1" in text and "s3 -. undo .-> s2_3" in text
    mapped = mermaid(compile_flow(Notify))
    assert "map par.work over users (as user, into notified; 3 at once)" in mapped
    assert mapped.count('["2.* par.work"]') == 1
    assert "subgraph cluster_2 {" in dot(compile_flow(Checkout))


class ShardedNotify(qwit.Flow, name="par.sharded_notify"):
    """Compiled with QWIT_MAP_SHARD_SIZE=3: its map runs as shards of 3."""

    def build_flow(self) -> None:
        self.step(Work, {"eid": "first"})
        self.map(Work, over="users", item="user", into="notified", max_concurrency=2)
        self.step(Work, {"eid": "last"})


class Where(qwit.Step, name="par.where"):
    """Returns where it ran: ``{"at_<path>": context().index}``."""

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {f"at_{qwit.context().path}": qwit.context().index}


class WhereInside(qwit.Flow, name="par.where_inside"):
    def build_flow(self) -> None:
        self.step(Where)


class WhereElement(qwit.Flow, name="par.where_element"):
    def build_flow(self) -> None:
        self.step(Where)
        with self.parallel():
            self.step(Where)
            self.step(WhereInside)
        self.map(Where, over="pairs", item="pair", into="inner")


class WhereMap(qwit.Flow, name="par.where_map"):
    def build_flow(self) -> None:
        self.step(Where)
        self.map(WhereElement, over="users", item="user", into="out", max_concurrency=2)


async def test_the_steps_of_a_sub_flow_element_see_its_index(env: Env):
    # Contract 5: context().index is a map element's 0-based index. Every
    # step of an element that is a sub-flow (in its sequence, in a block, in
    # a sub-flow of it) is part of that element; a map inside the element
    # gives its own elements their own index. Before, they all saw None.
    async with env.serve(WhereMap):
        result = await env.client.run(WhereMap, {"users": [10, 11, 12], "pairs": ["x", "y"]})
    assert result["at_1"] is None
    for i, element in enumerate(result["out"]):
        at = f"at_2.{i + 1}"
        assert element[f"{at}.1"] == i
        assert element[f"{at}.2.1"] == i
        assert element[f"{at}.2.2.1"] == i
        assert [list(e.values()) for e in element["inner"]] == [[0], [1]]


@pytest.fixture
def shards_of_3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWIT_MAP_SHARD_SIZE", "3")
    assert compile_flow(ShardedNotify).steps[1].shard_size == 3  # type: ignore[union-attr]


async def test_a_long_map_runs_as_shards_and_reads_as_one(env: Env, shards_of_3: None):
    run = new_ledger()
    users = list(range(10))
    async with env.serve(ShardedNotify):
        handle = await env.client.start(ShardedNotify, {"ledger": run, "users": users})
        result = await asyncio.wait_for(handle.result(), 60)
        state = await handle.state()
    assert [o["index"] for o in result["notified"]] == users
    assert [next(iter(o)) for o in result["notified"]] == [f"out_user-{u}" for u in users]
    # each element ran once, at its own path, at most 2 at once
    records = [e for e in pl.entries(run) if e.action == "do" and e.eid.startswith("user-")]
    assert sorted(e.path for e in records) == sorted(f"2.{u + 1}" for u in users)
    assert pl.peak(run, "do") <= 2
    shards = state.steps[1].steps
    assert [s.path for s in shards] == ["2@1", "2@2", "2@3", "2@4"]
    assert [s.kind for s in shards] == ["flow"] * 4
    assert [len(s.steps[0].steps) for s in shards] == [3, 3, 3, 1]
    assert shards[3].steps[0].steps[0].path == "2.10"


async def test_a_failed_element_of_a_shard_undoes_every_shard_once(env: Env, shards_of_3: None):
    run = new_ledger()
    users = list(range(10))
    async with env.serve(ShardedNotify):
        handle = await env.client.start(
            ShardedNotify, {"ledger": run, "users": users, "fail": "user-8"}
        )
        kind, err = await outcome(handle)
    assert kind == "rolled_back"
    assert pl.check(run, {"2"}) == []
    assert sorted(pl.undone(run)) == sorted(pl.applied(run))
    assert pl.undone(run)[-1] == "first"
    assert "last" not in pl.applied(run)
    assert pl.peak(run, "undo") <= 2
    assert err.step == "par.work"


class ShardedThenAborts(qwit.Flow, name="par.sharded_then_aborts"):
    def build_flow(self) -> None:
        self.map(Work, over="users", item="user", into="notified", max_concurrency=2)
        self.step(Work, {"eid": "last"}, on_failure=qwit.ABORT)


async def test_a_redrive_of_a_flow_whose_map_ran_in_shards_is_refused_at_once(
    env: Env, shards_of_3: None
):
    # Refused by redrive() on every engine. Before, on Temporal, the redrive
    # started a run whose first workflow task failed, again and again: the
    # flow's id held by a run that never ended.
    run = new_ledger()
    async with env.serve(ShardedThenAborts):
        handle = await env.client.start(
            ShardedThenAborts, {"ledger": run, "users": list(range(4)), "fail": "last"}
        )
        assert (await outcome(handle))[0] == "aborted"
        with pytest.raises(qwit.ReactionError, match="the map at 1 ran in shards"):
            await env.client.redrive(handle.id, args={"fail": None})
        assert (await env.client.get_handle(handle.id).state()).status == "aborted"


class QuickSub(qwit.Flow, name="par.quick_sub"):
    def build_flow(self) -> None:
        self.step(Work, {"eid": "q1"})
        self.step(Work, {"eid": "q2"})
        self.step(Work, {"eid": "q3"})


class FailingSub(qwit.Flow, name="par.failing_sub"):
    def build_flow(self) -> None:
        self.step(Work, {"eid": "f1"})
        self.step(Work, {"eid": "f2"})


class SubflowSiblings(qwit.Flow, name="par.subflow_siblings"):
    def build_flow(self) -> None:
        with self.parallel():
            self.step(FailingSub)
            self.step(QuickSub)


async def test_a_sub_flow_sibling_stopped_as_it_completes_still_rolls_back(env: Env):
    # The failing branch stops its sibling about when the sibling's last step
    # completes: on Temporal that step's completion could swallow the cancel,
    # and the sibling waited for its parent's word forever (hit now and then
    # here; tests/test_saga_unit.py reproduces it every time).
    async with env.serve(SubflowSiblings):
        for _ in range(15):
            run = new_ledger()
            delay = {"f1": 0.01, "q1": 0.01, "q2": 0.01, "q3": 0.01}
            handle = await env.client.start(
                SubflowSiblings, {"ledger": run, "fail": "f1", "fail_before": True, "delay": delay}
            )
            kind, _ = await asyncio.wait_for(outcome(handle), 30)
            assert kind == "rolled_back"
            assert sorted(pl.undone(run)) == sorted(pl.applied(run))


def test_qwit_status_summarises_a_large_map_and_lists_its_failed_elements():
    from rich.console import Console

    from qwit._cli._render import state_view
    from qwit.engine import FlowState

    def element(i: int, status: str) -> dict[str, Any]:
        return {"name": "par.work", "path": f"2.{i + 1}", "status": status, "index": i}

    statuses = ["compensated"] * 28 + ["failed", "compensated"]
    shard = {
        "name": "par.work [0:30]",
        "path": "2@1",
        "kind": "flow",
        "status": "compensated",
        "steps": [
            {
                "name": "par.work",
                "path": "2",
                "kind": "map",
                "status": "compensated",
                "steps": [element(i, s) for i, s in enumerate(statuses)],
            }
        ],
    }
    state = FlowState.model_validate(
        {
            "flow": "par.notify",
            "flow_id": "n-1",
            "status": "rolled_back",
            "steps": [
                {"name": "par.work", "path": "1", "status": "compensated"},
                {
                    "name": "par.work",
                    "path": "2",
                    "kind": "map",
                    "status": "compensated",
                    "steps": [shard],
                },
            ],
        }
    )
    console = Console(width=200, record=True)
    console.print(state_view(state))
    text = console.export_text()
    assert "30 elements: 29 compensated, 1 failed" in text
    assert "2.29" in text  # the failed element, listed
    assert "2.5 " not in text  # the others, summarised
