"""The public surface is a decision: renaming or dropping a name fails here."""

from __future__ import annotations

import qwit


def test_exported_members():
    assert qwit.__all__ == [
        "ABORT",
        "FALLBACK",
        "RETRY",
        "ROLLBACK",
        "SKIP",
        "SKIPBACK",
        "WAIT",
        "ArgumentsError",
        "Client",
        "Compensation",
        "CompensationFailed",
        "EngineUnavailable",
        "Flow",
        "FlowAborted",
        "FlowCancelled",
        "FlowDefinitionError",
        "FlowFailed",
        "FlowHandle",
        "FlowNotFound",
        "FlowRolledBack",
        "FlowState",
        "HistoryTooLarge",
        "PayloadTooLarge",
        "QwitError",
        "Reaction",
        "ReactionError",
        "Retry",
        "Step",
        "StepContext",
        "StepError",
        "StepNotRegistered",
        "StepState",
        "WaitInfo",
        "connect",
        "context",
        "engine",
        "heartbeat",
        "local",
        "postgres",
        "temporal",
    ]
    assert qwit.__all__ == sorted(qwit.__all__, key=lambda n: (not n.isupper(), n[0].islower(), n))
    for name in qwit.__all__:
        assert hasattr(qwit, name), name


def test_public_classes_read_as_qwit():
    for name in qwit.__all__:
        member = getattr(qwit, name)
        if isinstance(member, type):
            assert member.__module__ == "qwit", name


def test_engine_parts_are_exported_by_qwit_engine_alone():
    import qwit.engine

    for name in ("Backend", "Engine", "EngineHost"):
        assert name in qwit.engine.__all__
        assert name not in qwit.__all__
    # the names a custom engine used before still resolve
    assert qwit.Engine is qwit.engine.Engine
    assert qwit.Backend is qwit.engine.Backend


def test_error_tree():
    assert issubclass(qwit.FlowDefinitionError, qwit.QwitError)
    assert issubclass(qwit.ArgumentsError, qwit.QwitError)
    assert issubclass(qwit.FlowRolledBack, qwit.FlowFailed)
    assert issubclass(qwit.FlowCancelled, qwit.FlowRolledBack)
    assert issubclass(qwit.CompensationFailed, qwit.FlowFailed)
    assert issubclass(qwit.FlowAborted, qwit.FlowFailed)
    assert issubclass(qwit.FlowFailed, qwit.QwitError)
    assert not issubclass(qwit.StepError, qwit.QwitError)


def test_contexts_outside_a_step():
    import pytest

    with pytest.raises(RuntimeError, match="only available while a step runs"):
        qwit.context()
    qwit.heartbeat("nothing happens outside a step")


def test_reactions_and_their_names():
    assert [r.value for r in qwit.Reaction] == [
        "rollback",
        "skipback",
        "skip",
        "abort",
        "wait",
        "retry",
        "fallback",
    ]
    assert qwit.ROLLBACK == "rollback"
