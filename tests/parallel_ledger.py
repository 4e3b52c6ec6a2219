"""An oracle for parallel work: what ran where and when, and the undo order
the plan's dependencies demand.

Steps record each forward attempt's effect (``do``) and each undo, with the
step's path and a monotonic start and end time. ``check`` then verifies,
from the record and the plan's shape (which paths are parallel blocks or
maps) alone:

- every applied effect was undone exactly once (when ``undone`` is all), and
  nothing that was not applied was undone;
- no undo started before its own forward had ended;
- dependency order: when step ``q`` depends on step ``p`` (``q`` comes after
  ``p`` in a sequence: the same flow, or a branch's sub-flow), ``p``'s undo
  starts only after ``q``'s undo has ended. Siblings of one parallel block or
  map depend on nothing of each other: their undos may overlap.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import qwit

_lock = threading.Lock()
_entries: dict[str, list[Entry]] = defaultdict(list)
_running: dict[str, int] = defaultdict(int)
_peak: dict[str, int] = defaultdict(int)


@dataclass(frozen=True)
class Entry:
    action: str
    """``do`` (a forward applied its effect) or ``undo``."""
    eid: str
    path: str
    start: float
    end: float


def entries(ledger: str) -> list[Entry]:
    with _lock:
        return list(_entries[ledger])


def applied(ledger: str) -> list[str]:
    return [e.eid for e in entries(ledger) if e.action == "do"]


def undone(ledger: str) -> list[str]:
    """Effects undone, in the order their undos ended."""
    return [e.eid for e in sorted(entries(ledger), key=lambda e: e.end) if e.action == "undo"]


def peak(ledger: str, what: str) -> int:
    """Most forwards (``do``) or undos (``undo``) that ran at once."""
    with _lock:
        return _peak[f"{ledger}/{what}"]


class _Running:
    def __init__(self, ledger: str, what: str) -> None:
        self.key = f"{ledger}/{what}"

    def __enter__(self) -> None:
        with _lock:
            _running[self.key] += 1
            _peak[self.key] = max(_peak[self.key], _running[self.key])

    def __exit__(self, *exc: object) -> None:
        with _lock:
            _running[self.key] -= 1


def _record(ledger: str, action: str, eid: str, path: str, start: float) -> None:
    with _lock:
        _entries[ledger].append(Entry(action, eid, path, start, time.monotonic()))


class Work(qwit.Step, name="par.work"):
    """A step steered by its args: ``eid`` (default: its path), ``delay``
    (seconds it takes), ``fail`` (an eid, or a list of them, that fails after
    applying its effect, or before with ``fail_before``). Returns
    ``{"out_<eid>": [the out_ keys it was given]}`` (``out`` may name another
    key for an eid), so a test sees which outputs each step saw."""

    retry = qwit.Retry(max_attempts=1)
    back_retry = qwit.Retry(max_attempts=3, initial_interval=0.05, max_interval=0.05)

    @staticmethod
    def eid(args: dict[str, Any]) -> str:
        if "user" in args:
            return f"user-{args['user']}"
        return str(args.get("eid") or qwit.context().path)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        eid = self.eid(args)
        fail = args.get("fail")
        failing = eid == fail or (isinstance(fail, list) and eid in fail)
        start = time.monotonic()
        with _Running(args["ledger"], "do"):
            if failing and args.get("fail_before"):
                raise qwit.StepError(f"{eid} failed", retry=False)
            await asyncio.sleep(float(args.get("delay", {}).get(eid, 0.05)))
            _record(args["ledger"], "do", eid, qwit.context().path, start)
        if failing:
            raise qwit.StepError(f"{eid} failed after its effect", retry=False)
        key = args.get("out", {}).get(eid, f"out_{eid}")
        output: dict[str, Any] = {key: sorted(k for k in args if k.startswith("out_"))}
        if qwit.context().index is not None:  # an element of a map
            output["index"] = qwit.context().index
        return output

    async def step_back(self, args: dict[str, Any]) -> None:
        eid = self.eid(args)
        start = time.monotonic()
        with _Running(args["ledger"], "undo"):
            await asyncio.sleep(0.05)
            if eid in applied(args["ledger"]):
                _record(args["ledger"], "undo", eid, qwit.context().path, start)


def _parts(path: str) -> list[int]:
    return [int(p) for p in path.split(".")]


def depends(later: str, earlier: str, groups: set[str]) -> bool:
    """Whether the step at ``later`` depends on the one at ``earlier``: after
    their common prefix, both sit in a sequence (not a block or map in
    ``groups``), ``later`` after ``earlier``."""
    a, b = _parts(later), _parts(earlier)
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    if common == min(len(a), len(b)):
        return False  # one inside the other (a sub-flow and its own steps)
    prefix = ".".join(str(p) for p in a[:common])
    if prefix in groups:
        return False  # siblings of one block or map
    return a[common] > b[common]


def check(ledger: str, groups: set[str], all_undone: bool = True) -> list[str]:
    """Violations of the rules above (none: an empty list)."""
    problems: list[str] = []
    record = entries(ledger)
    dos = {e.eid: e for e in record if e.action == "do"}
    undos: dict[str, list[Entry]] = defaultdict(list)
    for e in record:
        if e.action == "undo":
            undos[e.eid].append(e)
    for eid, list_ in undos.items():
        if len(list_) > 1:
            problems.append(f"{eid} undone {len(list_)} times")
        if eid not in dos:
            problems.append(f"{eid} undone but never applied")
        elif list_[0].start < dos[eid].end:
            problems.append(f"{eid} undone before its forward ended")
    if all_undone:
        problems += [f"{eid} applied, never undone" for eid in dos if eid not in undos]
    done = [u[0] for u in undos.values()]
    for p in done:
        for q in done:
            if p is not q and depends(q.path, p.path, groups) and p.start < q.end:
                problems.append(
                    f"undo of {p.eid} ({p.path}) started before the undo of {q.eid} "
                    f"({q.path}), which depends on it, ended"
                )
    return problems
