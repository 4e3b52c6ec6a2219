"""Random flows of steps, parallel blocks (step and sub-flow branches) and
maps, with at most one failing step and its reaction, on every engine.

What each run must show, from rules written here and checked against the
record of ``tests/parallel_ledger.py`` (not from QWIT's own account):

- the outcome its failure (or none) calls for: completed (none, SKIP),
  aborted (ABORT), rolled back (ROLLBACK, SKIPBACK);
- a completed flow applied every effect of its plan (a skipped step's only if
  it failed after applying it), none undone; an aborted one undid nothing
  (but what a sub-flow branch cancelled mid-run undid of itself); a
  rolled-back one undid every effect it applied exactly once (under SKIPBACK,
  all but the failed step's), and nothing after the failed node ran;
- undos in reverse dependency order: a step's undo starts only after the
  undos of everything that depends on it (after it in a sequence) have ended;
  siblings of a block or map depend on nothing of each other;
- no undo before its forward ended, none of an effect never applied.

``QWIT_PROPERTY_EXAMPLES`` sets the flows per engine (default 24; Temporal
runs a third of them); ``QWIT_PROPERTY_SEED`` replays the draws of a seed a
failure printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

import qwit
from qwit._plan import SUBFLOW_MARK
from tests import parallel_ledger as pl
from tests.parallel_ledger import Work
from tests.test_conformance import Env, env, outcome

__all__ = ["env"]

EXAMPLES = int(os.environ.get("QWIT_PROPERTY_EXAMPLES", "24"))


@dataclass
class Node:
    """A step (``eids`` one), a block (``branches``: each a step's eid or a
    sub-flow's eids) or a map (``items`` elements)."""

    kind: str
    eids: list[str] = field(default_factory=list)
    branches: list[list[str]] = field(default_factory=list)
    items: int = 0


@dataclass
class Case:
    nodes: list[Node]
    fail: str | None
    after: bool
    reaction: qwit.Reaction
    delays: dict[str, float]
    users: list[int]
    decision: qwit.Reaction | None = None
    """With reaction WAIT: the operator's answer, sent to the waiting step's
    path (RETRY comes with args that let the step pass)."""
    cancel_after: float | None = None
    """Cancel the flow this many seconds after it started."""

    @property
    def effective(self) -> qwit.Reaction:
        """The reaction that decides the outcome (a WAIT's decision)."""
        if self.reaction == qwit.WAIT:
            assert self.decision is not None
            return self.decision
        return self.reaction

    def position(self, eid: str) -> int:
        for i, node in enumerate(self.nodes):
            if eid in self.eids_of(node):
                return i
        raise KeyError(eid)

    def eids_of(self, node: Node) -> list[str]:
        if node.kind == "step":
            return node.eids
        if node.kind == "map":
            return [f"user-{u}" for u in self.users]
        return [eid for branch in node.branches for eid in branch]

    @property
    def all_eids(self) -> list[str]:
        return [eid for node in self.nodes for eid in self.eids_of(node)]

    @property
    def groups(self) -> set[str]:
        return {str(i + 1) for i, node in enumerate(self.nodes) if node.kind != "step"}


def random_case(rng: random.Random, index: int) -> Case:
    nodes: list[Node] = []
    counter = iter(range(1000))

    def eid() -> str:
        return f"s{next(counter)}"

    users = list(range(rng.randint(0, 6)))
    has_map = False
    for _ in range(rng.randint(2, 4)):
        kind = rng.choice(["step", "block", "block", "map"])
        if kind == "map" and has_map:
            kind = "step"
        if kind == "step":
            nodes.append(Node("step", eids=[eid()]))
        elif kind == "map":
            has_map = True
            nodes.append(Node("map", items=len(users)))
        else:
            branches = [
                [eid()] if rng.random() < 0.6 else [eid() for _ in range(rng.randint(1, 3))]
                for _ in range(rng.randint(2, 4))
            ]
            nodes.append(Node("block", branches=branches))
    case = Case(nodes, None, False, qwit.ROLLBACK, {}, users)
    everything = case.all_eids
    if everything and rng.random() < 0.85:
        case.fail = rng.choice(everything)
        case.after = rng.random() < 0.5
        case.reaction = rng.choice(
            [qwit.ROLLBACK, qwit.ROLLBACK, qwit.SKIPBACK, qwit.SKIP, qwit.ABORT, qwit.WAIT]
        )
        if case.reaction == qwit.WAIT:
            # A RETRY runs the step again as a new execution: drawn only for a
            # step that failed before its effect, so each effect stays once.
            choices = [qwit.SKIP, qwit.ROLLBACK, qwit.SKIPBACK, qwit.ABORT]
            case.decision = rng.choice(choices + ([qwit.RETRY] if not case.after else []))
    case.delays = {e: rng.choice([0.0, 0.01, 0.05, 0.15]) for e in everything}
    if rng.random() < 0.15:
        case.cancel_after = rng.choice([0.02, 0.1, 0.3])
    return case


def flow_of(case: Case, name: str) -> type[qwit.Flow]:
    """The case as Flow classes (its sub-flows too), the failing step's
    reaction set where it is used."""

    def options(eid: str) -> dict[str, Any]:
        return {"on_failure": case.reaction} if eid == case.fail else {}

    subflows: list[type[qwit.Flow]] = []

    def subflow(eids: list[str]) -> type[qwit.Flow]:
        class Sub(qwit.Flow, name=f"{name}.sub{len(subflows)}"):
            def build_flow(self) -> None:
                for e in eids:
                    self.step(Work, {"eid": e}, **options(e))

        subflows.append(Sub)
        return Sub

    plan: list[Any] = []
    for node in case.nodes:
        if node.kind == "block":
            plan.append(("block", [b[0] if len(b) == 1 else subflow(b) for b in node.branches]))
        else:
            plan.append((node.kind, node.eids))
    map_fails = case.fail is not None and case.fail.startswith("user-")

    class Random(qwit.Flow, name=name):
        def build_flow(self) -> None:
            for kind, what in plan:
                if kind == "step":
                    self.step(Work, {"eid": what[0]}, **options(what[0]))
                elif kind == "map":
                    extra = {"on_failure": case.reaction} if map_fails else {}
                    self.map(
                        Work, over="users", item="user", into="mapped", max_concurrency=2, **extra
                    )
                else:
                    with self.parallel():
                        for branch in what:
                            if isinstance(branch, str):
                                self.step(Work, {"eid": branch}, **options(branch))
                            else:
                                self.step(branch)

    return Random


#: When the test asked to cancel each flow (time.monotonic(), by flow id).
CANCELLED_AT: dict[str, float] = {}


async def operate(case: Case, handle: qwit.FlowHandle) -> None:
    """What the operator does: cancel the flow at its time, and decide the
    waiting step (by its path) once it waits."""
    if case.cancel_after is not None:
        await asyncio.sleep(case.cancel_after)
        CANCELLED_AT[handle.id] = time.monotonic()
        with contextlib.suppress(qwit.QwitError):
            await handle.cancel()
        return
    if case.decision is None:
        return
    while True:
        state = await handle.state()
        if state.done:
            return
        if state.waits:
            args = {"fail": "nothing"} if case.decision == qwit.RETRY else None
            await handle.react(case.decision, args=args, path=state.waits[0].path)
            return
        await asyncio.sleep(0.05)


def skipped_eids(run: str, state: qwit.engine.FlowState, kept: str = "skipped") -> set[str]:
    """The effects (by eid) of steps that ended skipped (or in status ``kept``)."""
    statuses: dict[str, str] = {}

    def walk(steps: list[Any]) -> None:
        for step in steps:
            statuses[step.path] = step.status
            walk(step.steps)

    walk(state.steps)
    return {e.eid for e in pl.entries(run) if e.action == "do" and statuses.get(e.path) == kept}


async def skipback_stood(
    env: Env, flow_id: str, run: str, state: qwit.engine.FlowState, case: Case
) -> bool:
    """Whether the failed step of ``case`` ran in a sub-flow branch that ended
    rolled back (its own SKIPBACK decided before a cancel reached it), not
    cancelled. A cancel reaches a sub-flow one hop after its root: a step
    that fails in between is the sub-flow's to react to."""
    if case.fail is None or case.effective != qwit.SKIPBACK:
        return False
    paths = {e.path for e in pl.entries(run) if e.eid == case.fail}
    parents = {path.rpartition(".")[0] for path in paths}
    subflows: set[str] = set()

    def walk(steps: list[Any]) -> None:
        for step in steps:
            if step.kind == "flow":
                subflows.add(step.path)
            walk(step.steps)

    walk(state.steps)
    for parent in sorted(parents & subflows):
        child = await env.client.get_handle(f"{flow_id}{SUBFLOW_MARK}{parent}").state()
        if child.status == "rolled_back":
            return True
    return False


def check(
    case: Case,
    run: str,
    kind: str,
    skipped: set[str],
    kept_by_skipback: frozenset[str] = frozenset(),
    cancelled_at: float | None = None,
    skipback_stood: bool = False,
) -> list[str]:
    problems = []
    applied, undone = pl.applied(run), pl.undone(run)
    expected_kind = "completed"
    if case.fail is not None:
        expected_kind = {
            qwit.SKIP: "completed",
            qwit.RETRY: "completed",
            qwit.ABORT: "aborted",
            qwit.ROLLBACK: "rolled_back",
            qwit.SKIPBACK: "rolled_back",
        }[case.effective]
    if kind == "cancelled" and case.cancel_after is not None:
        # Cancelled in flight: whatever it had applied is undone, once, in
        # order; but a step skipped after its effect (its SKIP taken before
        # the cancel came), which did not complete, keeps it, as in any
        # rollback, and so does a failed step whose SKIPBACK was taken before
        # the cancel came (a sub-flow that rolled back around it, keeping it,
        # has ended: its reaction stands). A failed step still in flight when
        # the cancel came is the cancel's to undo (it ends compensated).
        kept = {case.fail} if case.fail in skipped else set()
        failed_at = [e.end for e in pl.entries(run) if e.action == "do" and e.eid == case.fail]
        if (
            case.effective == qwit.SKIPBACK
            and case.fail in kept_by_skipback
            and failed_at
            and cancelled_at is not None
            # it failed before the cancel was asked for, or its sub-flow took
            # the SKIPBACK before the cancel reached it (and ended rolled back)
            and (failed_at[0] < cancelled_at or skipback_stood)
        ):
            kept = {case.fail}
        if sorted(undone) != sorted(e for e in applied if e not in kept):
            problems.append(f"cancelled: applied {sorted(applied)}, undid {sorted(undone)}")
        return problems + pl.check(run, case.groups, all_undone=False)
    if kind != expected_kind:
        return [f"ended {kind}, not {expected_kind}"]
    if len(set(applied)) != len(applied):
        problems.append(f"an effect applied twice: {applied}")
    if kind == "completed":
        retried = case.effective == qwit.RETRY
        expected = [e for e in case.all_eids if e != case.fail or case.after or retried]
        if sorted(applied) != sorted(expected):
            problems.append(f"applied {sorted(applied)}, not {sorted(expected)}")
        if undone:
            problems.append(f"undid {undone} in a completed flow")
    elif kind == "aborted":
        # Nothing of the flow's own is undone; a sub-flow branch still running
        # when its block stops is cancelled, and rolls itself back.
        block = case.nodes[case.position(case.fail)] if case.fail else None
        own = {
            e
            for branch in (block.branches if block and block.kind == "block" else [])
            if len(branch) > 1 and case.fail not in branch
            for e in branch
        }
        if [e for e in undone if e not in own]:
            problems.append(f"undid {undone} in an aborted flow")
    else:
        kept = {case.fail} if case.effective == qwit.SKIPBACK else set()
        if sorted(undone) != sorted(e for e in applied if e not in kept):
            problems.append(f"applied {sorted(applied)}, undid {sorted(undone)}")
    if kind != "completed" and case.fail is not None:
        stop = case.position(case.fail)
        later = [e for i, n in enumerate(case.nodes) if i > stop for e in case.eids_of(n)]
        ran = [e for e in later if e in applied]
        if ran:
            problems.append(f"{ran} ran after the failed node")
    problems += pl.check(run, case.groups, all_undone=False)
    return problems


async def test_random_parallel_flows_keep_the_rules(env: Env, request: pytest.FixtureRequest):
    engine = request.node.callspec.params["env"]
    examples = max(EXAMPLES // 3, 2) if engine == "temporal" else EXAMPLES
    seed = int(os.environ.get("QWIT_PROPERTY_SEED") or random.randrange(1_000_000))
    rng = random.Random(seed)
    cases = [random_case(rng, i) for i in range(examples)]
    tag = uuid.uuid4().hex[:6]
    flows = [flow_of(case, f"prop_par.{tag}.{i}") for i, case in enumerate(cases)]
    failures = []
    seen: Counter[str] = Counter()
    async with env.serve(*flows):

        async def one(i: int) -> None:
            case, flow = cases[i], flows[i]
            run = uuid.uuid4().hex
            args: dict[str, Any] = {"ledger": run, "delay": case.delays, "users": case.users}
            if case.fail is not None:
                args["fail"] = case.fail
                args["fail_before"] = not case.after
            handle = await env.client.start(flow, args)
            steer = asyncio.ensure_future(operate(case, handle))
            try:
                kind, _ = await outcome(handle)
                steer.cancel()
            except TimeoutError:
                state = await handle.state()
                failures.append(
                    f"seed {seed}, case {i} {case}: did not end in 60 s; its state: "
                    f"{state.model_dump_json(exclude={'events'})}"
                )
                return
            seen[kind] += 1
            seen[f"decision.{case.decision.value}" if case.decision else "no decision"] += 1
            seen["cancel" if case.cancel_after is not None else "no cancel"] += 1
            state = await handle.state()
            skipped = skipped_eids(run, state)
            failed = frozenset(skipped_eids(run, state, kept="failed"))
            stood = await skipback_stood(env, handle.id, run, state, case)
            cancelled_at = CANCELLED_AT.get(handle.id)
            for problem in check(case, run, kind, skipped, failed, cancelled_at, stood):
                failures.append(f"seed {seed}, case {i} {case}: {problem}")

        await asyncio.gather(*(one(i) for i in range(examples)))
    print(f"\nparallel property, {engine}, seed {seed}: {dict(sorted(seen.items()))}")
    assert not failures, "\n".join(failures[:5])
