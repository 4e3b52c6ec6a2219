"""A strict oracle for effects: a provider that dedups on the idempotency key,
and one function, ``violations``, that checks a flow's record against the
saga rules.

Steps call it the way they would call a payment provider:

- ``do``: applies the effect of a forward key, once. A second ``do`` with an
  applied key is a no-op recorded as ``dedup``.
- ``undo``: applies the undo of a forward key (the undo's key minus
  ``/step_back``) only if that key was applied and not yet undone; otherwise a
  no-op recorded as ``undo-noop`` (never applied) or ``undo-dedup`` (undone
  already).

Every call is recorded with what made it: the run (one flow started by a test),
the flow id, the step's path and effect id (``eid``), the ``epoch`` (which
operator RETRY the step's args came from: the test's own count of executions,
independent of QWIT's keys), the attempt, the direction and a monotonic time.
Each attempt also records its ``start`` and ``end``.

``violations(entries, ...)`` then checks, strictly (no violation is forgiven):

- a key is only ever used by one execution of one step (same run, path,
  epoch, direction), its attempts numbered upwards: a dedup that hid a new
  execution's effect, or a second undo of an effect, is a violation (the one
  exception: an undo that failed may be run again by an operator RETRY, as
  the contract says, under the same key);
- one execution uses one forward key (stable across its retries);
- attempts of one key never overlap in time;
- each undo (every attempt of a ``step_back``) starts after every forward
  attempt of its key has ended, and only for a key whose forward ran, of the
  same execution;
- undos are applied newest first: each undoes the newest effect still applied
  among those the run ends up undoing;
- nothing is recorded after the flow reported its end, and no attempt is
  still running then;
- with ``expected`` (a model's prediction): the outcome, the effects applied
  (by execution, in order) and the effects undone (in order) are exactly those.

The same rules check the crash suite, whose SQLite ledger produces the same
entries from worker subprocesses (``tests/reliability/crash_flows.py``).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import qwit

BACK = "/step_back"

#: Kinds of entries.
START, END = "start", "end"
DO, DEDUP = "do", "dedup"
UNDO, UNDO_NOOP, UNDO_DEDUP = "undo", "undo-noop", "undo-dedup"
MARK = "mark"

Execution = tuple[str, int]
"""An execution of a step, as a test names it: (effect id, epoch)."""


@dataclass(frozen=True)
class Entry:
    seq: int
    at: float
    kind: str
    run: str
    key: str
    direction: str  # "forward" or "back"
    eid: str
    path: str
    epoch: int
    attempt: int
    flow_id: str = ""
    pid: int = 0
    note: str = ""

    @property
    def execution(self) -> Execution:
        return (self.eid, self.epoch)

    @property
    def identity(self) -> tuple[str, str, str, str, int, str]:
        """Which execution of which step made this call."""
        return (self.run, self.flow_id, self.path, self.eid, self.epoch, self.direction)

    def describe(self) -> str:
        return (
            f"#{self.seq} {self.kind} {self.direction} {self.eid}@{self.epoch} "
            f"path={self.path} attempt={self.attempt} key={self.key} at={self.at:.3f}"
            + (f" pid={self.pid}" if self.pid else "")
            + (f" ({self.note})" if self.note else "")
        )


@dataclass
class Expected:
    """What a model predicts for one run."""

    outcome: str
    applied: list[Execution] = field(default_factory=list)
    undone: list[Execution] = field(default_factory=list)


def forward_of(key: str) -> str:
    """The forward key an undo's key undoes."""
    return key.removesuffix(BACK)


def violations(
    entries: Sequence[Entry],
    *,
    expected: Expected | None = None,
    outcome: str | None = None,
    ended_at: float | None = None,
    died: Mapping[int, float] | None = None,
) -> list[str]:
    """Every rule ``entries`` (one run's, in ``seq`` order) break; [] if none.

    Args:
        expected: the model's prediction, checked exactly.
        outcome: how the flow ended ("completed", "rolled_back", ...).
        ended_at: when ``result()`` returned or raised (``time.monotonic()``).
        died: pid -> time a worker process was killed: its attempts that
            recorded no end ended then.
    """
    entries = sorted(entries, key=lambda e: e.seq)
    died = died or {}
    found: list[str] = []

    # -- one key, one execution; attempts numbered upwards -----------------------
    calls: dict[str, list[Entry]] = defaultdict(list)
    end_of: dict[int, Entry] = {}  # a start's seq -> its end
    open_starts: dict[tuple[str, int, int], list[Entry]] = defaultdict(list)
    for e in entries:
        if e.kind == START:
            calls[e.key].append(e)
            open_starts[(e.key, e.attempt, e.pid)].append(e)
        elif e.kind == END:
            pending = open_starts.get((e.key, e.attempt, e.pid))
            if pending:
                end_of[pending.pop(0).seq] = e
    for key, starts in calls.items():
        first = starts[0]
        for prev, cur in itertools.pairwise(starts):
            if cur.identity != first.identity:
                found.append(
                    f"key {key} reused by another execution: {cur.describe()} "
                    f"after {first.describe()}"
                )
            elif cur.attempt <= prev.attempt:
                prev_end = end_of.get(prev.seq)
                retried_failed_undo = (
                    cur.direction == "back" and prev_end is not None and prev_end.note != "ok"
                )
                if not retried_failed_undo:
                    what = "undone twice" if cur.direction == "back" else "run again"
                    found.append(
                        f"key {key} {what} by a new execution (attempt {cur.attempt} after "
                        f"attempt {prev.attempt}): {cur.describe()}"
                    )
    for e in entries:
        if e.kind == DEDUP:
            applier = next(
                (a for a in entries if a.kind == DO and a.key == e.key and a.seq < e.seq), None
            )
            if applier is None or applier.identity != e.identity:
                found.append(
                    f"dedup hid a new execution's effect: {e.describe()}, key applied by "
                    f"{applier.describe() if applier else 'another run'}"
                )
    keys_of: dict[tuple[Any, ...], set[str]] = defaultdict(set)
    for e in entries:
        if e.kind == START and e.direction == "forward":
            keys_of[e.identity].add(e.key)
    for identity, keys in keys_of.items():
        if len(keys) > 1:
            found.append(f"execution {identity} used several forward keys: {sorted(keys)}")

    # -- attempts: when they ran ------------------------------------------------------
    def span(start: Entry) -> tuple[float, float | None]:
        end = end_of.get(start.seq)
        if end is not None:
            return start.at, end.at
        return start.at, died.get(start.pid)

    for key, starts in calls.items():
        for prev, cur in itertools.pairwise(starts):
            _, prev_end = span(prev)
            if prev_end is None or cur.at < prev_end:
                found.append(
                    f"attempts of key {key} overlap: {cur.describe()} started before "
                    f"attempt {prev.attempt} ended"
                    + ("" if prev_end is None else f" (at {prev_end:.3f})")
                )
    forward_starts: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        if e.kind == START and e.direction == "forward":
            forward_starts[e.key].append(e)
    for e in entries:
        if e.kind != START or e.direction != "back":
            continue
        fkey = forward_of(e.key)
        forwards = forward_starts.get(fkey, [])
        if not forwards:
            found.append(f"undo of a step that never ran: {e.describe()}")
            continue
        same = [f for f in forwards if f.identity[:-1] == e.identity[:-1]]
        if not same:
            found.append(f"undo key {e.key} names another execution: {forwards[0].describe()}")
        for f in same:
            _, f_end = span(f)
            if f_end is None or e.at < f_end:
                found.append(
                    f"undo started before its forward ended: {e.describe()}; forward "
                    f"attempt {f.attempt} "
                    + ("never ended" if f_end is None else f"ended at {f_end:.3f}")
                )

    # -- undos newest first, of applied effects ------------------------------------------
    applied_at: dict[str, Entry] = {}
    undone_keys: set[str] = set()
    for e in entries:
        if e.kind == DO:
            applied_at[e.key] = e
        elif e.kind == UNDO:
            undone_keys.add(forward_of(e.key))
    live: list[str] = []  # applied, not yet undone, and undone later: in order applied
    for e in entries:
        if e.kind == DO and e.key in undone_keys:
            live.append(e.key)
        elif e.kind == UNDO:
            fkey = forward_of(e.key)
            if fkey not in applied_at:
                found.append(f"undo applied for an effect never applied: {e.describe()}")
                continue
            if live and live[-1] != fkey:
                newer = applied_at[live[-1]]
                found.append(
                    f"undo out of order: {e.describe()} while the newer "
                    f"{newer.eid}@{newer.epoch} ({newer.key}) was still applied"
                )
            if fkey in live:
                live.remove(fkey)

    # -- the flow's end ---------------------------------------------------------------
    if ended_at is not None:
        for e in entries:
            if e.at > ended_at:
                found.append(f"recorded after the flow ended (at {ended_at:.3f}): {e.describe()}")
        for starts in calls.values():
            for s in starts:
                _, end = span(s)
                if end is None:
                    found.append(f"attempt still running when the flow ended: {s.describe()}")
    # -- the model ---------------------------------------------------------------------
    if expected is not None:
        got_applied = [e.execution for e in entries if e.kind == DO]
        got_undone = [e.execution for e in entries if e.kind == UNDO]
        if outcome is not None and outcome != expected.outcome:
            found.append(f"outcome {outcome}, expected {expected.outcome}")
        if got_applied != expected.applied:
            found.append(f"applied {_fmt(got_applied)}, expected {_fmt(expected.applied)}")
        if got_undone != expected.undone:
            found.append(f"undone {_fmt(got_undone)}, expected {_fmt(expected.undone)}")
    return found


def _fmt(executions: Sequence[Execution]) -> str:
    return "[" + ", ".join(f"{eid}@{epoch}" for eid, epoch in executions) + "]"


def check(
    entries: Sequence[Entry],
    *,
    expected: Expected | None = None,
    outcome: str | None = None,
    ended_at: float | None = None,
    died: Mapping[int, float] | None = None,
) -> None:
    """Raise AssertionError listing every violation (the first one first)."""
    found = violations(entries, expected=expected, outcome=outcome, ended_at=ended_at, died=died)
    if found:
        log = "\n".join("    " + e.describe() for e in sorted(entries, key=lambda e: e.seq))
        raise AssertionError("\n".join(found) + "\n  ledger:\n" + log)


# -- the in-process provider -----------------------------------------------------------


class Attempt:
    """One attempt of a step's method, recording into a ``Ledger``."""

    def __init__(self, ledger: Ledger, base: dict[str, Any]) -> None:
        self.ledger = ledger
        self.base = base

    def do(self) -> bool:
        """Apply the effect of this (forward) key; False if it was a dedup."""
        return self.ledger._apply(self.base, undo=False)

    def undo(self) -> bool:
        """Undo the effect of this undo key's forward; False if a no-op."""
        return self.ledger._apply(self.base, undo=True)

    def mark(self, note: str) -> None:
        self.ledger._add(MARK, self.base, note)


class Ledger:
    """A provider shared by every flow of a test module, thread-safe.

    Keys are global (as a real provider's are): a key reused by another run
    or another execution dedups, and ``violations`` reports it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[Entry] = []
        self._applied: dict[str, Entry] = {}
        self._undone: set[str] = set()
        self._ended: dict[str, float] = {}

    def _add(self, kind: str, base: dict[str, Any], note: str = "") -> Entry:
        entry = Entry(seq=len(self._entries), at=time.monotonic(), kind=kind, note=note, **base)
        self._entries.append(entry)
        return entry

    def _apply(self, base: dict[str, Any], undo: bool) -> bool:
        with self._lock:
            key = base["key"]
            if not undo:
                if key in self._applied:
                    self._add(DEDUP, base)
                    return False
                self._applied[key] = self._add(DO, base)
                return True
            fkey = forward_of(key)
            if fkey not in self._applied:
                self._add(UNDO_NOOP, base)
                return False
            if fkey in self._undone:
                self._add(UNDO_DEDUP, base)
                return False
            self._undone.add(fkey)
            self._add(UNDO, base)
            return True

    @contextlib.contextmanager
    def attempt(self, args: Any, key: str | None = None) -> Iterator[Attempt]:
        """Record an attempt of the running step (``qwit.context()``) from start
        to end. ``args`` must carry ``run`` and ``eid`` (``epoch`` optional);
        ``key`` stands for the context's idempotency key (the undo of what a
        ``step_fallback`` did is keyed on the fallback's key). A fallback is a
        forward execution of an effect of its own."""
        ctx = qwit.context()
        get = args.get if isinstance(args, dict) else (lambda k, d=None: getattr(args, k, d))
        base = {
            "run": str(get("run")),
            "key": key or ctx.idempotency_key,
            "direction": "back" if ctx.direction == "step_back" else "forward",
            "eid": str(get("eid")),
            "path": ctx.path,
            "epoch": int(get("epoch", 0) or 0),
            "attempt": ctx.attempt,
            "flow_id": ctx.flow_id,
        }
        with self._lock:
            self._add(START, base)
        note = "ok"
        try:
            yield Attempt(self, base)
        except BaseException as exc:
            note = type(exc).__name__
            raise
        finally:
            with self._lock:
                self._add(END, base, note)

    def ended(self, run: str) -> float:
        """The flow of ``run`` reported its end (result() returned or raised): now."""
        at = time.monotonic()
        with self._lock:
            self._ended.setdefault(run, at)
        return at

    def ended_at(self, run: str) -> float | None:
        with self._lock:
            return self._ended.get(run)

    def entries(self, run: str | None = None) -> list[Entry]:
        with self._lock:
            return [e for e in self._entries if run is None or e.run == run]

    def has(self, run: str, kind: str, note: str | None = None) -> bool:
        with self._lock:
            return any(
                e.run == run and e.kind == kind and (note is None or e.note == note)
                for e in self._entries
            )

    def violations(
        self, run: str, expected: Expected | None = None, outcome: str | None = None
    ) -> list[str]:
        """``violations`` of one run, and any key of it that another run used."""
        own = self.entries(run)
        found = violations(own, expected=expected, outcome=outcome, ended_at=self.ended_at(run))
        keys = {forward_of(e.key) for e in own}
        for e in self.entries():
            if e.run != run and e.kind == START and forward_of(e.key) in keys:
                found.append(f"key {e.key} of run {run} also used by run {e.run}: {e.describe()}")
        return found

    def check(self, run: str, expected: Expected | None = None, outcome: str | None = None) -> None:
        """Raise AssertionError listing every violation of ``run`` (the first one first)."""
        found = self.violations(run, expected, outcome)
        if found:
            log = "\n".join("    " + e.describe() for e in self.entries(run))
            raise AssertionError("\n".join(found) + "\n  ledger:\n" + log)
