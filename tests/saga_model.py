"""A small model of the saga rules, independent of QWIT, for random flows.

Flow specs (sub-flows, one failing step, reactions) predict the exact ledger
of effects (`do` and `undo`, in order) and the outcome. The property test and
the crash suite compare real runs with it.

``predict`` is the richer model the property test uses: failing steps of
several kinds (before or after their effect, or timing out), operator
decisions on WAIT (RETRY with or without a fix, SKIP, SKIPBACK, ROLLBACK,
ABORT) on steps and sub-flows, and a cancel after a given effect or at a
given wait. An operator RETRY of a step first undoes the failed execution's
effect, if it applied one (the retry is a new execution, under a new key).
It names each effect by its execution: (effect id, epoch), the
epoch being the number of the operator RETRY whose args the step saw (0
before any). Its rules are the contract's (sections 4 and 5), written here
from scratch.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import qwit

REACTIONS = [qwit.ROLLBACK, qwit.SKIPBACK, qwit.SKIP, qwit.ABORT]


#: What a step does (``StepSpec.mode``):
#: ok: applies its effect; before / after: fails (not retried) before or after
#: applying it; timeout: every attempt outlives its timeout; slow: the first
#: attempt outlives its timeout, the retry is quick.
MODES = ("ok", "before", "after", "timeout", "slow")
#: What an attempt that outlived its timeout does (``StepSpec.late``): drop:
#: stops without applying its effect; effect: applies it late, then stops
#: (fails); finish: applies it late and returns, but too late: the attempt
#: still timed out (fails).
LATE = ("drop", "effect", "finish")
#: An operator's answers to a WAIT: "retry" runs the node again unchanged (it
#: fails again), "retry_fix" runs it again with args that make it succeed.
DECISIONS = ("retry", "retry_fix", "skip", "skipback", "rollback", "abort")


@dataclass
class StepSpec:
    eid: str
    fails: bool = False
    after: bool = False
    reaction: qwit.Reaction = qwit.ROLLBACK
    mode: str = ""
    """One of MODES; empty: from ``fails`` and ``after``."""
    late: str = "drop"
    sync: bool = False
    """A plain ``def`` step (else ``async``)."""
    decisions: list[str] = field(default_factory=list)
    """With reaction WAIT: the operator's answers, in order (the last repeats)."""

    @property
    def kind(self) -> str:
        if self.mode:
            return self.mode
        return ("after" if self.after else "before") if self.fails else "ok"


@dataclass
class FlowSpec:
    children: list[StepSpec | FlowSpec] = field(default_factory=list)
    reaction: qwit.Reaction = qwit.ROLLBACK
    decisions: list[str] = field(default_factory=list)


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


# -- the richer model ------------------------------------------------------------------

Execution = tuple[str, int]


@dataclass
class Wait:
    """A wait the flow reaches, and what the operator does."""

    path: str
    decision: str  # one of DECISIONS, or "cancel"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Cancel:
    """When the test cancels the flow: once the step of execution ``hold``
    holds (after its effect, or before it with ``before``), or at wait
    number ``wait`` (1-based) instead of deciding."""

    hold: Execution | None = None
    before: bool = False
    wait: int = 0


@dataclass
class Prediction:
    outcome: str
    log: list[tuple[str, Execution]]
    waits: list[Wait]
    ok_runs: list[Execution]
    """Executions of steps that simply apply their effect, in order (where a
    cancel can hold)."""

    @property
    def applied(self) -> list[Execution]:
        return [x for action, x in self.log if action == "do"]

    @property
    def undone(self) -> list[Execution]:
        return [x for action, x in self.log if action == "undo"]


class _RolledBack(Exception):
    """A sub-flow failed and undid itself."""


class _Aborted(Exception):
    pass


class _Cancelled(Exception):
    def __init__(self, in_flight: Execution | None = None) -> None:
        self.in_flight = in_flight


class _StepFailed(Exception):
    def __init__(self, effect: Execution | None) -> None:
        self.effect = effect


def failing_eids(spec: StepSpec | FlowSpec) -> list[str]:
    """Effect ids of the steps in ``spec`` that fail unless fixed."""
    if isinstance(spec, StepSpec):
        return [spec.eid] if spec.kind in ("before", "after", "timeout") else []
    return [eid for child in spec.children for eid in failing_eids(child)]


def predict(root: FlowSpec, cancel: Cancel | None = None) -> Prediction:
    """The outcome, the effects done and undone (in order), and the waits of a
    run of ``root``, computed from the saga rules without QWIT."""
    cancel = cancel or Cancel()
    log: list[tuple[str, Execution]] = []
    applied: set[Execution] = set()
    undone: set[Execution] = set()
    waits: list[Wait] = []
    ok_runs: list[Execution] = []
    epochs = [0]
    answers: dict[int, list[str]] = {}

    def do(x: Execution) -> None:
        if x not in applied:
            applied.add(x)
            log.append(("do", x))

    def undo(effects: list[Execution | None]) -> None:
        for x in reversed(effects):
            if x is not None and x in applied and x not in undone:
                undone.add(x)
                log.append(("undo", x))

    def decide(node: StepSpec | FlowSpec, path: str) -> str:
        if cancel.wait == len(waits) + 1:
            waits.append(Wait(path, "cancel"))
            return "cancel"
        queue = answers.setdefault(id(node), list(node.decisions))
        decision = queue.pop(0) if len(queue) > 1 else queue[0]
        args: dict[str, Any] = {}
        if decision in ("retry", "retry_fix"):
            epochs[0] += 1
            args["epoch"] = epochs[0]
            if decision == "retry_fix":
                args.update({f"fix_{eid}": True for eid in failing_eids(node)})
        waits.append(Wait(path, decision, args))
        return decision

    def step(spec: StepSpec, epoch: int, fixed: bool) -> Execution:
        x = (spec.eid, epoch)
        kind = "ok" if fixed else spec.kind
        if kind == "ok":
            ok_runs.append(x)
            if cancel.hold == x:
                if not cancel.before:
                    do(x)
                raise _Cancelled(x)
            do(x)
            return x
        if kind == "before":
            raise _StepFailed(None)
        if kind == "after":
            do(x)
            raise _StepFailed(x)
        if kind == "slow":
            do(x)  # once, late or by the retry, under one key
            return x
        if spec.late in ("effect", "finish"):
            do(x)
            raise _StepFailed(x)
        raise _StepFailed(None)

    def flow(spec: FlowSpec, path: str, epoch: int, fixes: frozenset[str]) -> list[Execution]:
        done: list[Execution] = []
        for i, child in enumerate(spec.children):
            child_path = f"{path}.{i + 1}" if path else str(i + 1)
            while True:
                failed: Execution | None = None
                try:
                    if isinstance(child, FlowSpec):
                        done.extend(flow(child, child_path, epoch, fixes))
                    else:
                        done.append(step(child, epoch, child.eid in fixes))
                    break
                except _Cancelled as cancelled:
                    undo([*done, cancelled.in_flight])
                    raise _Cancelled() from None
                except _Aborted:
                    raise
                except _RolledBack:
                    pass
                except _StepFailed as failure:
                    failed = failure.effect
                reaction = child.reaction.value
                if reaction == "wait":
                    reaction = decide(child, child_path)
                    if reaction == "cancel":
                        undo([*done, failed])
                        raise _Cancelled()
                    if reaction in ("retry", "retry_fix"):
                        # the failed execution's effect goes first: the retry
                        # is a new execution, under a new key
                        undo([failed])
                        epoch = waits[-1].args["epoch"]
                        fixes = fixes | {
                            k.removeprefix("fix_") for k in waits[-1].args if k.startswith("fix_")
                        }
                        continue
                if reaction == "skip":
                    break
                if reaction == "abort":
                    raise _Aborted()
                undo([*done, failed] if reaction == "rollback" else done)
                raise _RolledBack()
        return done

    outcome = "completed"
    try:
        flow(root, "", 0, frozenset())
    except _RolledBack:
        outcome = "rolled_back"
    except _Aborted:
        outcome = "aborted"
    except _Cancelled:
        outcome = "cancelled"
    return Prediction(outcome, log, waits, ok_runs)


def random_scenario(
    rng: Any, max_steps: int = 8, max_depth: int = 3, timeouts: bool = True
) -> FlowSpec:
    """A random spec for ``predict``: sub-flows, sync and async steps, 0 to 2
    steps failing before or after their effect, reactions with WAIT and
    operator decisions, and (with ``timeouts``) one step that outlives its
    timeout, on every attempt (failing) or on its first."""
    counter = iter(range(1, 10_000))
    budget = [rng.randint(1, max_steps)]

    def decisions() -> list[str]:
        final = [d for d in DECISIONS if d != "retry"]
        first = rng.choice([*final, "retry", "retry", "retry_fix"])
        return [first, rng.choice(final)] if first == "retry" else [first]

    def build(depth: int) -> FlowSpec:
        flow = FlowSpec(reaction=rng.choice([qwit.WAIT] * 3 + REACTIONS))
        for _ in range(rng.randint(1, 3)):
            if budget[0] <= 0:
                break
            if depth < max_depth and budget[0] >= 2 and rng.randint(0, 1):
                sub = build(depth + 1)
                if sub.children:
                    if sub.reaction == qwit.WAIT:
                        sub.decisions = decisions()
                    flow.children.append(sub)
            else:
                budget[0] -= 1
                flow.children.append(
                    StepSpec(eid=f"s{next(counter)}", mode="ok", sync=bool(rng.randint(0, 1)))
                )
        return flow

    root = build(1)
    if not root.children:
        root.children.append(StepSpec(eid=f"s{next(counter)}", mode="ok"))
    root.reaction = qwit.ROLLBACK  # the root's own reaction means nothing
    steps = steps_of(root)

    def fail(spec: StepSpec, mode: str) -> None:
        spec.mode = mode
        spec.fails = True
        spec.reaction = rng.choice([qwit.WAIT] * 4 + REACTIONS)
        if spec.reaction == qwit.WAIT:
            spec.decisions = decisions()

    for _ in range(rng.choice([0, 1, 1, 1, 2, 2])):
        fail(rng.choice(steps), rng.choice(["before", "after"]))
    if timeouts:
        spec = rng.choice(steps)
        late = rng.choice(LATE)
        if rng.randint(0, 1):
            spec.late = late
            fail(spec, "timeout")
        else:
            spec.mode, spec.fails, spec.late = "slow", False, late
    return root


def scenario_flow_class(
    spec: FlowSpec,
    steps: dict[bool, type[qwit.Step]],
    timeout: float = 1.0,
    grace: float = 5.0,
) -> type[qwit.Flow]:
    """A Flow class for a ``random_scenario`` spec: ``steps[sync]`` for each
    step, given static args ``eid``, ``mode``, ``late``."""
    entries: list[tuple[Any, dict[str, Any], dict[str, Any]]] = []
    for child in spec.children:
        if isinstance(child, FlowSpec):
            target: Any = scenario_flow_class(child, steps, timeout, grace)
            entries.append((target, {}, {"on_failure": child.reaction}))
            continue
        options: dict[str, Any] = {"on_failure": child.reaction}
        if child.kind in ("timeout", "slow"):
            options.update(timeout=timeout, timeout_grace=grace)
            attempts = 2 if child.kind == "slow" else 1
            options["retry"] = qwit.Retry(
                max_attempts=attempts, initial_interval=0.1, max_interval=0.1
            )
        static = {"eid": child.eid, "mode": child.kind, "late": child.late}
        entries.append((steps[child.sync], static, options))

    class Generated(qwit.Flow, name=f"prop.flow.{uuid.uuid4().hex[:8]}"):
        def build_flow(self) -> None:
            for target, args, options in entries:
                self.step(target, args, **options)

    return Generated
