"""Recorded histories replay without nondeterminism: a change to the workflow
that would break flows in flight fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from qwit.temporal import QwitPlugin

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_there_are_histories_to_replay():
    names = {path.stem for path in HISTORIES}
    assert {
        "completed",
        "rolled_back",
        "subflow_completed",
        "subflow_completed.child1",
        "subflow_rolled_back",
        "subflow_rolled_back.child1",
        "cancelled",
        "cancelled.child1",
        "waited_retry",
        "waited_rollback",
        "waited_compensation",
    } <= names


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays(path: Path):
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    replayer = Replayer(workflows=[], plugins=[QwitPlugin()])
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, result.replay_failure


async def test_an_injected_nondeterministic_change_is_caught(monkeypatch: pytest.MonkeyPatch):
    """Running the steps in another order than recorded must fail the replay."""
    from qwit import _saga

    async def reversed_forward(self: _saga.Interpreter) -> None:
        for run in reversed(self.saga.runs):
            await self._forward(run)

    monkeypatch.setattr(_saga.Interpreter, "_forward_all", reversed_forward)
    path = next(p for p in HISTORIES if p.stem == "completed")
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    replayer = Replayer(workflows=[], plugins=[QwitPlugin()])
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is not None
    assert "nondetermin" in str(result.replay_failure).lower()
