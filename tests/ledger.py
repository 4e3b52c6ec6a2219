"""An oracle for effects: steps record what they did, tests check what was undone."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

import qwit

_lock = threading.Lock()
_entries: dict[str, list[tuple[str, str]]] = defaultdict(list)


def record(ledger: str, action: str, step: str) -> None:
    with _lock:
        _entries[ledger].append((action, step))


def entries(ledger: str) -> list[tuple[str, str]]:
    with _lock:
        return list(_entries[ledger])


def applied(ledger: str) -> list[str]:
    return [step for action, step in entries(ledger) if action == "do"]


def undone(ledger: str) -> list[str]:
    return [step for action, step in entries(ledger) if action == "undo"]


def assert_fully_undone(ledger: str) -> None:
    """Every applied effect was undone exactly once, newest first, and nothing else."""
    done = applied(ledger)
    assert undone(ledger) == list(reversed(done)), entries(ledger)


class Effect(qwit.Step):
    """Base for test steps: records `do`/`undo` in the ledger named by args['ledger']."""

    def effect(self, args: dict[str, Any]) -> dict[str, Any] | None:
        return None

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:
        out = self.effect(args)
        record(args["ledger"], "do", type(self).name)
        return out

    async def step_back(self, args: dict[str, Any]) -> None:
        record(args["ledger"], "undo", type(self).name)
