"""An oracle for effects: steps record what they did, tests check what was undone.

A step records `do` when it applies its effect, and its `step_back` records
`undo` only for an effect that was applied (as a real system refunds only what
it charged), every time it is asked: an effect undone twice shows twice.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from typing import Any

import qwit

_lock = threading.Lock()
_entries: dict[str, list[tuple[str, str]]] = defaultdict(list)


def record(ledger: str, action: str, eid: str) -> None:
    with _lock:
        _entries[ledger].append((action, eid))


def entries(ledger: str) -> list[tuple[str, str]]:
    with _lock:
        return list(_entries[ledger])


def applied(ledger: str) -> list[str]:
    return [eid for action, eid in entries(ledger) if action == "do"]


def undone(ledger: str) -> list[str]:
    return [eid for action, eid in entries(ledger) if action == "undo"]


def marks(ledger: str, action: str) -> list[str]:
    return [eid for a, eid in entries(ledger) if a == action]


def assert_fully_undone(ledger: str) -> None:
    """Every applied effect was undone exactly once, newest first, and nothing else."""
    done = applied(ledger)
    assert undone(ledger) == list(reversed(done)), entries(ledger)


async def wait_for_mark(ledger: str, action: str, eid: str, timeout: float = 20) -> None:
    async def poll() -> None:
        while eid not in marks(ledger, action):
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


class Effect(qwit.Step):
    """Base for test steps. Its effect id is the step name (or args['eid']).

    Flow args steer it: `fail` names the effect that raises (before applying
    it, or after with `fail_after`); it then fails at once (no retries).
    """

    retry = qwit.Retry(max_attempts=1)
    back_retry = qwit.Retry(max_attempts=3, initial_interval=0.1, max_interval=0.1)

    def eid(self, args: dict[str, Any]) -> str:
        return str(args.get("eid") or type(self).name)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:
        eid = self.eid(args)
        failing = args.get("fail") == eid
        if failing and not args.get("fail_after"):
            raise qwit.StepError(f"{eid} failed", retry=False)
        record(args["ledger"], "do", eid)
        if failing:
            raise qwit.StepError(f"{eid} failed after its effect", retry=False)
        return {f"out_{eid}": args.get("scope", "-")}

    async def step_back(self, args: dict[str, Any]) -> None:
        eid = self.eid(args)
        if eid in applied(args["ledger"]):
            record(args["ledger"], "undo", eid)
