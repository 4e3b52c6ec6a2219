"""The strict ledger's rules, on hand-written records: each rule catches what
it is for, and a clean record passes. No engine runs here."""

from __future__ import annotations

from typing import Any

import pytest

from tests.strict_ledger import Entry, Expected, violations

EXEC = "e" * 32


class Record:
    """Builds a run's entries: one call per method, times given or counted up."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.clock = 0.0

    def add(
        self,
        kind: str,
        eid: str,
        *,
        back: bool = False,
        epoch: int = 0,
        attempt: int = 1,
        key: str | None = None,
        at: float | None = None,
        note: str = "",
        pid: int = 0,
    ) -> Record:
        path = eid.removeprefix("s")
        key = key or f"{EXEC}/{path}" + (f"~{epoch + 1}" if epoch else "")
        if back:
            key += "/step_back"
        self.clock = at if at is not None else self.clock + 1
        self.entries.append(
            Entry(
                seq=len(self.entries),
                at=self.clock,
                kind=kind,
                run="r",
                key=key,
                direction="back" if back else "forward",
                eid=eid,
                path=path,
                epoch=epoch,
                attempt=attempt,
                flow_id="f",
                pid=pid,
                note=note or ("ok" if kind == "end" else ""),
            )
        )
        return self

    def forward(self, eid: str, kind: str = "do", **kw: Any) -> Record:
        return self.add("start", eid, **kw).add(kind, eid, **kw).add("end", eid, **kw)

    def back(self, eid: str, kind: str = "undo", **kw: Any) -> Record:
        return self.forward(eid, kind, back=True, **kw)


def rolled_back() -> Record:
    return Record().forward("s1").forward("s2").back("s2").back("s1")


def test_a_clean_rollback_passes():
    expected = Expected("rolled_back", [("s1", 0), ("s2", 0)], [("s2", 0), ("s1", 0)])
    entries = rolled_back().entries
    assert violations(entries, expected=expected, outcome="rolled_back", ended_at=99) == []


def test_a_retried_undo_of_one_execution_is_a_dedup_not_a_violation():
    r = Record().forward("s1").back("s1").back("s1", "undo-dedup", attempt=2)
    assert violations(r.entries) == []


def test_a_second_undo_execution_is_never_forgiven():
    r = rolled_back().back("s1", "undo-dedup")  # attempt 1 again: a new execution
    assert violations(r.entries)[0].startswith(f"key {EXEC}/1/step_back undone twice")


def test_an_operator_retry_of_a_failed_undo_may_reuse_its_key():
    r = Record().forward("s1").add("start", "s1", back=True).add("end", "s1", back=True, note="E")
    r.back("s1")
    assert violations(r.entries) == []


def test_a_dedup_that_hid_a_new_execution_is_a_violation():
    # a RETRY (epoch 1) under the key of the first execution: its effect is dropped
    r = Record().forward("s1", kind="do").forward("s1", kind="dedup", epoch=1, key=f"{EXEC}/1")
    found = violations(r.entries)
    assert any(v.startswith(f"key {EXEC}/1 reused by another execution") for v in found)
    assert any(v.startswith("dedup hid a new execution's effect") for v in found)


def test_a_dedup_of_a_retried_attempt_of_one_execution_is_fine():
    r = Record().forward("s1", note="Timeout").forward("s1", kind="dedup", attempt=2)
    assert violations(r.entries) == []


def test_keys_must_be_stable_across_attempts():
    r = Record().forward("s1", kind="do").forward("s1", kind="do", attempt=2, key=f"{EXEC}/1x")
    assert any("used several forward keys" in v for v in violations(r.entries))


def test_an_undo_that_starts_before_its_forward_ended():
    r = Record().add("start", "s1", at=1).add("start", "s1", back=True, at=2)
    r.add("undo-noop", "s1", back=True, at=2.1).add("end", "s1", back=True, at=2.2)
    r.add("do", "s1", at=3).add("end", "s1", at=3)
    found = violations(r.entries, ended_at=10)
    assert found[0].startswith("undo started before its forward ended")


def test_overlapping_attempts_and_an_attempt_past_the_flows_end():
    r = Record().add("start", "s1", at=1).add("start", "s1", attempt=2, at=2)
    r.add("end", "s1", attempt=2, at=3)
    found = violations(r.entries, ended_at=4)
    assert found[0].startswith(f"attempts of key {EXEC}/1 overlap")
    assert "attempt still running when the flow ended" in found[1]


def test_an_attempt_of_a_killed_worker_ends_when_it_was_killed():
    r = Record().add("start", "s1", at=1, pid=7).add("do", "s1", at=1.5, pid=7)
    r.forward("s1", kind="dedup", attempt=2, pid=8, at=5)
    assert violations(r.entries, ended_at=10, died={7: 2.0}) == []
    assert violations(r.entries, ended_at=10, died={7: 5.5})  # died after the retry began


def test_undos_out_of_order_and_effects_recorded_after_the_end():
    r = Record().forward("s1").forward("s2").back("s1").back("s2")
    found = violations(r.entries, ended_at=9)
    assert found[0].startswith("undo out of order")
    assert any(v.startswith("recorded after the flow ended") for v in found)


def test_an_undo_of_a_step_that_never_ran():
    assert violations(Record().back("s1", "undo-noop").entries)[0].startswith(
        "undo of a step that never ran"
    )


@pytest.mark.parametrize(
    ("expected", "first"),
    [
        (Expected("completed", [("s1", 0), ("s2", 0)], [("s2", 0), ("s1", 0)]), "outcome"),
        (Expected("rolled_back", [("s1", 0)], [("s2", 0), ("s1", 0)]), "applied"),
        (Expected("rolled_back", [("s1", 0), ("s2", 0)], [("s2", 0)]), "undone"),
    ],
)
def test_the_models_prediction_is_checked_exactly(expected: Expected, first: str):
    found = violations(rolled_back().entries, expected=expected, outcome="rolled_back")
    assert found[0].startswith(first)
