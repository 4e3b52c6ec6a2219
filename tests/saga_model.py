"""A small model of the saga rules, independent of QWIT, for random flows.

Flow specs (sub-flows, one failing step, reactions) predict the exact ledger
of effects (`do` and `undo`, in order) and the outcome. The property test and
the crash suite compare real runs with it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import qwit

REACTIONS = [qwit.ROLLBACK, qwit.SKIPBACK, qwit.SKIP, qwit.ABORT]


@dataclass
class StepSpec:
    eid: str
    fails: bool = False
    after: bool = False
    reaction: qwit.Reaction = qwit.ROLLBACK


@dataclass
class FlowSpec:
    children: list[StepSpec | FlowSpec] = field(default_factory=list)
    reaction: qwit.Reaction = qwit.ROLLBACK


def steps_of(flow: FlowSpec) -> list[StepSpec]:
    out: list[StepSpec] = []
    for child in flow.children:
        out.extend(steps_of(child) if isinstance(child, FlowSpec) else [child])
    return out


class Outcome(Exception):
    def __init__(self, kind: str) -> None:
        self.kind = kind


def model(root: FlowSpec) -> tuple[str, list[tuple[str, str]]]:
    """The ledger and outcome the rules predict, computed without QWIT."""
    log: list[tuple[str, str]] = []
    applied: set[str] = set()

    def undo(effects: list[str]) -> None:
        for eid in reversed(effects):
            if eid in applied:
                log.append(("undo", eid))

    def run(flow: FlowSpec) -> list[str]:
        """Run a flow; return the effects it applied (in order) if it completed."""
        done: list[str] = []  # effects of completed children, in order
        for child in flow.children:
            if isinstance(child, FlowSpec):
                try:
                    done.extend(run(child))
                    continue
                except Outcome as failed:
                    if failed.kind == "aborted":
                        raise
                    reaction = child.reaction  # the sub-flow undid itself already
                    failed_effects: list[str] = []
            else:
                if not child.fails:
                    log.append(("do", child.eid))
                    applied.add(child.eid)
                    done.append(child.eid)
                    continue
                failed_effects = []
                if child.after:
                    log.append(("do", child.eid))
                    applied.add(child.eid)
                    failed_effects = [child.eid]
                reaction = child.reaction
            if reaction == qwit.SKIP:
                continue
            if reaction == qwit.ABORT:
                raise Outcome("aborted")
            if reaction == qwit.ROLLBACK:
                undo(failed_effects)
            undo(done)
            raise Outcome("rolled_back")
        return done

    try:
        run(root)
    except Outcome as outcome:
        return outcome.kind, log
    return "completed", log


def flow_class(spec: FlowSpec, step: type[qwit.Step]) -> type[qwit.Flow]:
    """A Flow class for ``spec``, using ``step`` (given ``eid`` static args) everywhere."""
    entries: list[tuple[Any, dict[str, Any], dict[str, Any]]] = []
    for child in spec.children:
        if isinstance(child, FlowSpec):
            entries.append((flow_class(child, step), {}, {"on_failure": child.reaction}))
        else:
            options = {"on_failure": child.reaction} if child.fails else {}
            entries.append((step, {"eid": child.eid}, options))

    class Generated(qwit.Flow, name=f"prop.flow.{uuid.uuid4().hex[:8]}"):
        def build_flow(self) -> None:
            for target, args, options in entries:
                self.step(target, args, **options)

    return Generated


def random_flow(rng: Any, max_steps: int = 8, max_depth: int = 3) -> FlowSpec:
    """A random spec drawn from ``rng``: a ``random.Random``, or anything with
    its ``randint`` and ``choice`` (the property test draws with hypothesis)."""
    counter = iter(range(1, 10_000))
    budget = [rng.randint(1, max_steps)]

    def build(depth: int) -> FlowSpec:
        flow = FlowSpec(reaction=rng.choice(REACTIONS))
        for _ in range(rng.randint(1, 3)):
            if budget[0] <= 0:
                break
            if depth < max_depth and budget[0] >= 2 and rng.randint(0, 1):
                sub = build(depth + 1)
                if sub.children:
                    flow.children.append(sub)
            else:
                budget[0] -= 1
                flow.children.append(StepSpec(eid=f"s{next(counter)}"))
        return flow

    root = build(1)
    if not root.children:
        root.children.append(StepSpec(eid=f"s{next(counter)}"))
    failing = rng.choice(steps_of(root))
    failing.fails = True
    failing.after = bool(rng.randint(0, 1))
    failing.reaction = rng.choice(REACTIONS)
    return root


def fail_args(root: FlowSpec) -> dict[str, Any]:
    failing = next(s for s in steps_of(root) if s.fails)
    return {"fail": failing.eid, "fail_after": failing.after}
