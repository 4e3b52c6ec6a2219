"""QWIT's exceptions.

Everything QWIT raises derives from one root::

    QwitError
    ├── FlowDefinitionError      a Flow or Step is defined wrongly
    ├── ArgumentsError           a flow's args can't travel (not JSON, too big)
    ├── ReactionError            handle.react(...) was refused
    └── FlowFailed               .flow_id .step .reason .error_type
        ├── FlowRolledBack       .compensated
        │   └── FlowCancelled
        ├── CompensationFailed   .compensated .failed_compensations
        └── FlowAborted

``StepError`` is not part of the tree: a step raises it to fail on purpose.

A failed flow's outcome travels from the engine to the client as data (a
``FailureInfo``), never parsed out of a message string.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class QwitError(Exception):
    """Root of every error QWIT raises."""


class FlowDefinitionError(QwitError):
    """A Flow or Step is defined wrongly; raised no later than ``start``."""


class ArgumentsError(QwitError):
    """A flow's args can't be sent: not a JSON object, not serialisable, too big."""


class ReactionError(QwitError):
    """An operator's decision was refused: the flow isn't waiting, or the
    reaction or args are not valid for what it waits on."""


class StepError(Exception):
    """Raise from a step to fail it with a message.

    Args:
        message: What went wrong, as the flow's failure reason will say.
        retry: ``False`` fails the step at once, without the retries left in
            its policy (the input will not get better by retrying).
    """

    def __init__(self, message: str, *, retry: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.retry = retry


class ErrorInfo(BaseModel):
    """What a failed step raised, as it reaches the flow."""

    model_config = ConfigDict(frozen=True)

    type: str
    """Qualified class name of the exception (``module.QualName``)."""
    types: list[str] = Field(default_factory=list)
    """Qualified names of the exception's classes, most specific first."""
    message: str = ""
    retryable: bool = True
    started: bool = True
    """False when the step's method never ran (not registered, bad args), so
    there is nothing of it to undo."""
    attempt: int = 1

    def describe(self) -> str:
        """``Type: message``, with the bare class name."""
        name = self.type.rsplit(".", 1)[-1]
        return f"{name}: {self.message}" if self.message else name


FailureKind = Literal["rolled_back", "cancelled", "compensation_failed", "aborted"]


class FailureInfo(BaseModel):
    """How a flow failed, as the engine reports it to the client."""

    model_config = ConfigDict(frozen=True)

    kind: FailureKind
    flow_id: str
    step: str | None = None
    reason: str = ""
    error: ErrorInfo | None = None
    compensated: list[str] = Field(default_factory=list)
    failed_compensations: list[str] = Field(default_factory=list)


class FlowFailed(QwitError):
    """A flow did not complete.

    Attributes:
        flow_id: The id of the flow.
        step: Name of the step that failed (None when no step did, e.g. a
            cancel between steps).
        reason: Why, in words: the step's error type and message.
        error_type: Qualified class name of the step's error, if any.
        info: The whole outcome as the engine reported it.
    """

    kind: FailureKind = "rolled_back"

    def __init__(self, info: FailureInfo) -> None:
        self.info = info
        self.flow_id = info.flow_id
        self.step = info.step
        self.reason = info.reason
        self.error_type = info.error.type if info.error else None
        super().__init__(self._message())

    def _message(self) -> str:
        where = f" at step {self.step!r}" if self.step else ""
        return f"flow {self.flow_id!r} {self.kind.replace('_', ' ')}{where}: {self.reason}"

    @staticmethod
    def from_info(info: FailureInfo) -> FlowFailed:
        """Build the exception class that matches ``info.kind``."""
        cls: type[FlowFailed] = {
            "rolled_back": FlowRolledBack,
            "cancelled": FlowCancelled,
            "compensation_failed": CompensationFailed,
            "aborted": FlowAborted,
        }[info.kind]
        return cls(info)

    def __reduce__(self) -> tuple[Any, ...]:
        return (FlowFailed.from_info, (self.info,))


class FlowRolledBack(FlowFailed):
    """The flow failed and every effect was undone.

    Attributes:
        compensated: Names of the steps undone, in the order they were undone
            (a sub-flow contributes its own steps' names).
    """

    kind: FailureKind = "rolled_back"

    def __init__(self, info: FailureInfo) -> None:
        self.compensated = list(info.compensated)
        super().__init__(info)


class FlowCancelled(FlowRolledBack):
    """The flow was cancelled; the step in flight and every completed step were undone."""

    kind: FailureKind = "cancelled"


class CompensationFailed(FlowFailed):
    """The flow failed and some ``step_back`` failed too, after its retries.

    The other steps were still undone.

    Attributes:
        compensated: Names of the steps undone, in order.
        failed_compensations: Names of the steps that could not be undone.
    """

    kind: FailureKind = "compensation_failed"

    def __init__(self, info: FailureInfo) -> None:
        self.compensated = list(info.compensated)
        self.failed_compensations = list(info.failed_compensations)
        super().__init__(info)

    def _message(self) -> str:
        failed = ", ".join(self.failed_compensations)
        return f"{super()._message()} (could not undo: {failed})"


class FlowAborted(FlowFailed):
    """A step failed with the ABORT reaction: the flow stopped and undid nothing."""

    kind: FailureKind = "aborted"
