"""Random flows with recovery beyond rollback keep the saga promise, on every
engine: failing steps that fall back (their fallback working or failing),
abort or roll back; retried segments (sub-flows that fail a drawn number of
times under a drawn ``retry``); a final step; and redrives of the flows that
aborted (fixed, from where they stopped or from an earlier step), some of
which then roll back.

The oracle is ``strict_ledger`` (a provider that dedups on the idempotency
key): each execution's effect applied once under a key of its own, undone at
most once, only after its forward ended, newest first. An execution is
numbered by the test itself (its ``epoch``: how many executions of that step
started before it, counted from the ledger's first attempts, not from QWIT's
keys), so a key reused by a new execution (a segment's next attempt, a
redrive) shows. A model written here says what each effect's net count (done
less undone) must be once the flow (and its redrive) ended, and the outcome;
the final step runs once, after every undo.

``QWIT_PROPERTY_EXAMPLES`` sets the flows per engine (default 24; Temporal
runs a third of them); ``QWIT_PROPERTY_SEED`` replays a seed a failure printed.
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

import qwit
from tests import strict_ledger
from tests.test_conformance import Env, env, outcome

__all__ = ["env"]

EXAMPLES = int(os.environ.get("QWIT_PROPERTY_EXAMPLES", "24"))
LEDGER = strict_ledger.Ledger()


def _epoch(args: dict[str, Any], eid: str) -> int:
    """How many executions of this step (this run, path, effect) started
    before this attempt's, from the ledger alone."""
    ctx = qwit.context()
    firsts = [
        e
        for e in LEDGER.entries(args["run"])
        if e.kind == strict_ledger.START
        and e.direction == "forward"
        and e.path == ctx.path
        and e.eid == eid
        and e.attempt == 1
    ]
    return len(firsts) - (0 if ctx.attempt == 1 else 1)


def _epoch_of(run: str, key: str) -> int:
    """The epoch of the forward execution whose key is ``key``."""
    for e in LEDGER.entries(run):
        if e.kind == strict_ledger.START and e.key == key:
            return e.epoch
    return 0


class Unit(qwit.Step, name="prec.unit"):
    """Static args: ``eid``, ``mode`` (ok, before, after: fails before or
    after its effect; ``segment``: fails while its segment has run fewer
    than ``succeed_on`` times), ``fallback`` (ok, fails). Flow args: ``run``,
    ``fixed`` (every step works), ``fail_late`` (an eid that fails before its
    effect, with ROLLBACK)."""

    retry = qwit.Retry(max_attempts=1)
    back_retry = qwit.Retry(max_attempts=3, initial_interval=0.05)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        eid = args["eid"]
        epoch = _epoch(args, eid)
        mode = "ok" if args.get("fixed") else args["mode"]
        with LEDGER.attempt({**args, "epoch": epoch}) as effect:
            if args.get("fail_late") == eid:
                raise qwit.StepError(f"{eid} fails late", retry=False)
            if mode == "segment":
                mode = "before" if epoch + 1 < args["succeed_on"] else "ok"
            if mode == "before":
                raise qwit.StepError(f"{eid} failed", retry=False)
            effect.do()
            if mode == "after":
                raise qwit.StepError(f"{eid} failed after its effect", retry=False)
        return {f"epoch_{eid}": epoch}

    async def step_fallback(self, args: dict[str, Any], error: Any) -> dict[str, Any]:
        eid = f"{args['eid']}.fb"
        epoch = _epoch(args, eid)
        with LEDGER.attempt({**args, "eid": eid, "epoch": epoch}) as effect:
            if args.get("fallback") == "fails":
                raise RuntimeError("no fallback either")
            effect.do()
        return {f"fell_back_{args['eid']}": epoch}

    async def step_back(self, args: dict[str, Any]) -> None:
        eid, run = args["eid"], args["run"]
        key = qwit.context().idempotency_key
        forward = key.removesuffix(strict_ledger.BACK)
        if f"fell_back_{eid}" in args:  # what stands in for the step is the fallback's:
            # its undo is keyed on the fallback's key (``.../step_fallback``)
            assert forward.endswith("/step_fallback"), key
            with LEDGER.attempt(
                {**args, "eid": f"{eid}.fb", "epoch": _epoch_of(run, forward)}
            ) as effect:
                effect.undo()
            return
        with LEDGER.attempt({**args, "epoch": _epoch_of(run, forward)}) as effect:
            effect.undo()


class Final(qwit.Step, name="prec.final"):
    async def step_forward(self, args: dict[str, Any]) -> None:
        with LEDGER.attempt({**args, "eid": "final", "epoch": _epoch(args, "final")}) as effect:
            effect.do()
            effect.mark(args["qwit_outcome"])


# -- drawing -------------------------------------------------------------------------


@dataclass
class Node:
    """A step (``eid``, ``mode``, ``reaction``, ``fallback``), or a retried
    segment (``inner`` steps, the last failing until ``succeed_on``)."""

    eid: str
    mode: str = "ok"
    reaction: qwit.Reaction = qwit.ROLLBACK
    fallback: str = "ok"
    inner: list[str] = field(default_factory=list)
    succeed_on: int = 1
    attempts: int = 1


@dataclass
class Case:
    nodes: list[Node]
    final: bool
    redrive: bool = False
    from_index: int | None = None
    """Redrive from this node (0-based), before the one it stopped at."""
    fail_late: str | None = None
    """After the redrive, this step (after the one it stopped at) fails."""


def random_case(rng: random.Random, i: int) -> Case:
    nodes: list[Node] = []
    failing = rng.random() < 0.8
    fail_at = rng.randrange(4) if failing else -1
    for n in range(rng.randint(2, 4)):
        eid = f"u{n}"
        if rng.random() < 0.3:
            attempts = rng.randint(1, 3)
            nodes.append(
                Node(
                    eid=eid,
                    inner=[f"{eid}a", f"{eid}b"],
                    succeed_on=rng.randint(1, attempts + 1),
                    attempts=attempts,
                )
            )
            continue
        node = Node(eid=eid)
        if n == fail_at:
            node.mode = rng.choice(["before", "after"])
            node.reaction = rng.choice(
                [qwit.ROLLBACK, qwit.ABORT, qwit.ABORT, qwit.FALLBACK, qwit.FALLBACK]
            )
            node.fallback = rng.choice(["ok", "ok", "fails"])
        nodes.append(node)
    case = Case(nodes=nodes, final=rng.random() < 0.5)
    stop = next(
        (k for k, n in enumerate(nodes) if n.mode != "ok" and n.reaction == qwit.ABORT), None
    )
    if stop is not None and rng.random() < 0.85:
        case.redrive = True
        if stop > 0 and rng.random() < 0.4:
            case.from_index = rng.randrange(stop)
        later = [n.eid for n in nodes[stop + 1 :] if not n.inner]
        if later and rng.random() < 0.4:
            case.fail_late = rng.choice(later)
    return case


def flow_of(case: Case, name: str) -> type[qwit.Flow]:
    segments = {}
    for node in case.nodes:
        if node.inner:
            steps = [(eid, "ok") for eid in node.inner[:-1]] + [(node.inner[-1], "segment")]

            class Segment(qwit.Flow, name=f"{name}.{node.eid}"):
                def build_flow(self, steps: list[tuple[str, str]] = steps) -> None:
                    for eid, mode in steps:
                        self.step(Unit, {"eid": eid, "mode": mode})

            segments[node.eid] = Segment

    class Drawn(qwit.Flow, name=name):
        def build_flow(self) -> None:
            for node in case.nodes:
                if node.inner:
                    self.step(
                        segments[node.eid],
                        {"succeed_on": node.succeed_on},
                        retry=qwit.Retry(max_attempts=node.attempts, initial_interval=0.05),
                    )
                    continue
                self.step(
                    Unit,
                    {"eid": node.eid, "mode": node.mode, "fallback": node.fallback},
                    on_failure=node.reaction,
                )
            if case.final:
                self.finally_step(Final)

    return Drawn


# -- the model -------------------------------------------------------------------------


def predict(case: Case) -> tuple[str, str | None, Counter[str]]:
    """The first run's outcome, the redrive's (or None), and each effect's
    net count (done less undone) once both have ended."""
    net: Counter[str] = Counter()
    done: list[str] = []  # effects kept so far, in order

    def run(nodes: list[Node], fixed: bool, fail_late: str | None) -> str:
        for node in nodes:
            if node.inner:
                if node.succeed_on > node.attempts and not fixed:
                    return "rolled_back"  # each attempt undid itself; then ROLLBACK
                done.extend(node.inner)
                continue
            if fail_late == node.eid:
                return "rolled_back"
            if node.mode == "ok" or fixed:
                done.append(node.eid)
                continue
            if node.reaction == qwit.ABORT:
                if node.mode == "after":
                    net[node.eid] += 1  # kept, as ABORT leaves it (a redrive undoes it)
                return "aborted"
            if node.reaction == qwit.FALLBACK and node.fallback == "ok":
                done.append(f"{node.eid}.fb")
                continue
            return "rolled_back"
        return "completed"

    first = run(case.nodes, fixed=False, fail_late=None)
    second = None
    if first == "aborted" and case.redrive:
        stop = next(k for k, n in enumerate(case.nodes) if n.mode != "ok")
        start = case.from_index if case.from_index is not None else stop
        net.clear()  # what the redrive undoes first ends at 0; the rest is kept
        kept = [e for n in case.nodes[:start] for e in _effects_kept(n)]
        done[:] = kept
        second = run(case.nodes[start:], fixed=True, fail_late=case.fail_late)
        outcome = second
    else:
        outcome = first
    if outcome in ("completed", "aborted"):
        for eid in done:
            net[eid] += 1
    else:
        net = Counter({eid: 0 for eid in net})
    return first, second, +net


def _effects_kept(node: Node) -> list[str]:
    """What a node that ran before the failure kept (it completed)."""
    if node.inner:
        return list(node.inner)
    if node.mode != "ok" and node.reaction == qwit.FALLBACK:
        return [f"{node.eid}.fb"]
    return [node.eid]


def net_of(run: str) -> Counter[str]:
    net: Counter[str] = Counter()
    for e in LEDGER.entries(run):
        if e.kind == strict_ledger.DO:
            net[e.eid] += 1
        elif e.kind == strict_ledger.UNDO:
            net[e.eid] -= 1
    return +net


async def test_random_recovery_flows_keep_the_rules(env: Env, request: pytest.FixtureRequest):
    engine = request.node.callspec.params["env"]
    examples = max(EXAMPLES // 3, 2) if engine == "temporal" else EXAMPLES
    seed = int(os.environ.get("QWIT_PROPERTY_SEED") or random.randrange(1_000_000))
    rng = random.Random(seed)
    cases = [random_case(rng, i) for i in range(examples)]
    tag = uuid.uuid4().hex[:6]
    flows = [flow_of(case, f"prop_rec.{tag}.{i}") for i, case in enumerate(cases)]
    failures: list[str] = []
    seen: Counter[str] = Counter()
    async with env.serve(*flows):

        async def one(i: int) -> None:
            case, flow = cases[i], flows[i]
            run = uuid.uuid4().hex
            first, second, net = predict(case)
            handle = await env.client.start(flow, {"run": run})
            kind, _ = await outcome(handle)
            got = [kind]
            if case.redrive and kind == "aborted":
                from_step = None if case.from_index is None else str(case.from_index + 1)
                fixes: dict[str, Any] = {"fixed": True}
                if case.fail_late:
                    fixes["fail_late"] = case.fail_late
                again = await env.client.redrive(handle.id, from_step=from_step, args=fixes)
                got.append((await outcome(again))[0])
            LEDGER.ended(run)
            seen.update(got)
            seen["redriven" if len(got) > 1 else "not redriven"] += 1
            seen["redriven from earlier"] += case.redrive and case.from_index is not None
            seen["fails after redrive"] += case.redrive and case.fail_late is not None
            seen["fallback"] += any(
                n.reaction == qwit.FALLBACK and n.mode != "ok" for n in case.nodes
            )
            seen["segment rerun"] += any(n.inner and n.succeed_on > 1 for n in case.nodes)
            problems = LEDGER.violations(run)
            if got != [first] + ([second] if second else []):
                problems.append(f"ended {got}, the model says {[first, second]}")
            final = net_of(run).pop("final", 0)
            if net_of(run) - Counter({"final": final}) != net:
                problems.append(f"net effects {dict(net_of(run))}, the model says {dict(net)}")
            if case.final:
                runs = 2 if len(got) > 1 else 1
                marks = [e.note for e in LEDGER.entries(run) if e.kind == strict_ledger.MARK]
                if marks != got[:runs] or final != runs:
                    problems.append(f"final step ran with {marks}, for outcomes {got}")
            for problem in problems:
                failures.append(f"seed {seed}, case {i} {case}: {problem}")

        await asyncio.gather(*(one(i) for i in range(examples)))
    print(f"\nrecovery property, {engine}, seed {seed}: {dict(sorted(seen.items()))}")
    assert not failures, "\n".join(failures[:5])
