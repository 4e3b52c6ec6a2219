"""QWIT's exceptions.

Everything QWIT raises derives from one root::

    QwitError
    ├── FlowDefinitionError      a Flow or Step is defined wrongly
    ├── ArgumentsError           a flow's args can't travel (not JSON, too big)
    │   └── PayloadTooLarge      args or an output over the payload limit
    ├── ReactionError            handle.react(...) was refused
    ├── FlowNotFound             no flow with that id
    ├── EngineUnavailable        the engine can't be reached (says what to check)
    ├── StepNotRegistered        no worker serves a step of the plan
    ├── HistoryTooLarge          a flow's history is near its engine's limit
    └── FlowFailed               .flow_id .step .reason .error_type .compensations
        ├── FlowRolledBack       .compensated
        │   └── FlowCancelled
        ├── CompensationFailed   .compensated .failed_compensations
        └── FlowAborted

``StepError`` is not part of the tree: a step raises it to fail on purpose.

A failed flow's outcome travels from the engine to the client as data (a
``FailureInfo``), never parsed out of a message string.
"""

from __future__ import annotations

import re
import traceback
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Longest error message or reason QWIT carries, in characters. A failure is
#: repeated in a flow's end (the error, its reason, the exception's message):
#: an unbounded message from a step could push that over the payload limit and
#: leave the flow unable to end.
MAX_MESSAGE = 4096


#: The note ``bounded`` ends a cut text with.
_CUT_NOTE = re.compile(r"\.\.\. \[(\d+) more characters cut\]\Z")


def bounded(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to at most ``limit`` characters, its note included,
    saying how many characters were cut. A text cut already (a message in a
    reason) is cut again counting them all: the note says what is missing of
    the original."""
    if len(text) <= limit:
        return text
    missing = 0
    note = _CUT_NOTE.search(text)
    if note is not None:
        missing = int(note.group(1))
        text = text[: note.start()]
    # (the note's length with as many digits as the cut can have, at most)
    kept = max(limit - len(f"... [{len(text) + missing} more characters cut]"), 0)
    return f"{text[:kept]}... [{len(text) - kept + missing} more characters cut]"


class QwitError(Exception):
    """Root of every error QWIT raises."""


class FlowDefinitionError(QwitError):
    """A Flow or Step is defined wrongly; raised no later than ``start``."""


class ArgumentsError(QwitError):
    """A flow's args can't be sent: not a JSON object, not serialisable, too big."""


class PayloadTooLarge(ArgumentsError):
    """Args or a step's output are over the engine's payload limit.

    When a step's output pushes a flow's accumulated args over the limit, that
    step fails with this error (never retried) and the flow rolls back.
    """


class FlowIdInUse(ArgumentsError):
    """The flow's id is taken: a flow with that id is running.

    Not part of the public tree: it lets the command line tell a request
    that failed (exit 1) from args that are wrong (a usage error).
    """


class ReactionError(QwitError):
    """An operator's decision was refused: the flow isn't waiting, or the
    reaction or args are not valid for what it waits on."""


class FlowNotFound(QwitError):
    """No flow with that id is known to the engine."""


class EngineUnavailable(QwitError):
    """The engine can't be reached; the message says what to check."""


class FlowNotAnswering(EngineUnavailable):
    """The engine answers, but not the flow: nothing runs it now (on
    Temporal, no worker serves its task queue). The message says which."""


class StepNotRegistered(QwitError):
    """A plan names a step that no worker of its task queue serves."""


class HistoryTooLarge(QwitError):
    """A flow's history is so near its engine's limit that a step can't start
    and still leave room to undo everything."""


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
    """The error's message, at most ``MAX_MESSAGE`` characters."""
    retryable: bool = True
    started: bool = True
    """False when the step's method never ran (not registered, bad args), so
    there is nothing of it to undo."""
    attempt: int = 1
    traceback: str = ""
    """Where the step raised it: the formatted traceback, innermost frames
    last (the last ``MAX_MESSAGE`` characters of it)."""

    @field_validator("message")
    @classmethod
    def _bounded(cls, message: str) -> str:
        return bounded(message)

    @field_validator("traceback")
    @classmethod
    def _bounded_tail(cls, text: str) -> str:
        if len(text) <= MAX_MESSAGE:
            return text
        return f"[{len(text) - MAX_MESSAGE} characters cut]...{text[-MAX_MESSAGE:]}"

    def describe(self) -> str:
        """``Type: message``, with the bare class name."""
        name = self.type.rsplit(".", 1)[-1]
        return f"{name}: {self.message}" if self.message else name


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class, as failures name it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _message_of(exc: BaseException) -> str:
    if isinstance(exc, StepError):
        return exc.message
    try:
        return str(exc)
    except Exception:  # a user's __str__ that raises must not hide the error
        return f"<{type(exc).__name__}: its message could not be read>"


def _formatted(exc: BaseException) -> str:
    if exc.__traceback__ is None:
        return ""
    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:  # a __str__ that raises, somewhere in the chain
        return "".join(traceback.format_tb(exc.__traceback__))


def error_info(
    exc: BaseException,
    *,
    attempt: int = 1,
    started: bool = True,
    retryable: bool | None = None,
    with_traceback: bool = True,
) -> ErrorInfo:
    """Describe an exception as data that crosses engines.

    The one place an ``ErrorInfo`` is made from an exception: its type and
    ``types`` are the qualified names of the exception's classes (most
    specific first), so an ``on_failure`` mapping on any of them matches on
    every engine.

    Args:
        exc: What was raised.
        attempt: The attempt that raised it.
        started: False when the step's method never ran (nothing to undo).
        retryable: Override; by default every error is retryable except
            ``StepError(retry=False)`` and QWIT's own refusals.
        with_traceback: Keep where it was raised (False in workflow code,
            which must not depend on file paths).
    """
    mro = [qualified_name(c) for c in type(exc).__mro__ if c not in (BaseException, object)]
    if retryable is None:
        retryable = not (
            (isinstance(exc, StepError) and not exc.retry) or isinstance(exc, QwitError)
        )
    return _described(
        mro,
        _message_of(exc),
        retryable=retryable,
        started=started,
        attempt=attempt,
        traceback=_formatted(exc) if with_traceback else "",
    )


def named_error_info(
    type_name: str, message: str, *, retryable: bool = True, attempt: int = 1
) -> ErrorInfo:
    """Describe a failure that reached QWIT as a type name alone (an engine's
    own error, e.g. Temporal's), not as an exception QWIT raised or caught.

    With ``error_info``, the only places an ``ErrorInfo`` is made.
    """
    bare = type_name.rsplit(".", 1)[-1]
    # an engine may have put "Type: " before the message already
    message = message.removeprefix(f"{bare}: ")
    return _described([type_name], message, retryable=retryable, attempt=attempt)


def _described(
    types: list[str],
    message: str,
    *,
    retryable: bool,
    attempt: int,
    started: bool = True,
    traceback: str = "",
) -> ErrorInfo:
    # The one place an ErrorInfo is made (models read from the wire aside):
    # ``type`` is always the first of ``types``, which is never empty.
    return ErrorInfo(
        type=types[0],
        types=types,
        message=_storable(message),
        retryable=retryable,
        started=started,
        attempt=attempt,
        traceback=_storable(traceback),
    )


def _storable(text: str) -> str:
    """``text`` as every engine can keep it: a NUL character (which
    PostgreSQL's ``jsonb``, where a fallback's job carries the error, can't
    keep) or a lone surrogate (which has no UTF-8 form) written out as its
    escape."""
    if "\x00" in text or not text.isascii():
        text = text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode()
    return text


class StepFailure(Exception):
    """A step's method failed; ``info`` says how, as data that crosses engines.

    Engines raise it from ``FlowRuntime.run_step`` once a step's retries are
    spent (or its error is not retryable); it is not part of the user-facing
    tree above.
    """

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.describe())
        self.info = info


class Compensation(BaseModel):
    """One undo a flow ran (or tried), as the failure's ``.compensations`` list
    it; also a final step that failed (``.final_failures``, status ``failed``)."""

    model_config = ConfigDict(frozen=True)

    name: str
    path: str
    status: Literal["compensated", "compensation_failed", "failed"]
    error: ErrorInfo | None = None
    """The undo's (or final step's) own error, when it failed."""
    ended_at: float | None = None
    """When the undo ended, on its engine's clock (seconds): how undos that
    ran side by side in different sub-flows are put in order."""


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
    compensations: list[Compensation] = Field(default_factory=list)
    """Every undo, in the order they ended, with its path and error."""
    not_compensated: list[str] = Field(default_factory=list)
    """Steps a rollback left as they were: it stopped at an undo that failed
    with ``back_on_failure=ABORT``."""
    final_failures: list[Compensation] = Field(default_factory=list)
    """Final steps (``finally_step``) that failed, with their errors (their
    ``status`` is ``failed``); they do not change the outcome."""
    rollback_stopped: bool = False
    """The rollback stopped at an undo that failed with
    ``back_on_failure=ABORT`` (a parent stops its own rollback there too)."""
    rolled_back: bool = True
    """False for a flow cancelled with ``cancel(rollback=False)``: it stopped
    where it was and undid nothing."""

    @field_validator("reason")
    @classmethod
    def _bounded(cls, reason: str) -> str:
        return bounded(reason)


class FlowFailed(QwitError):
    """A flow did not complete.

    Attributes:
        flow_id: The id of the flow.
        step: Name of the step that failed (None when no step did, e.g. a
            cancel between steps).
        reason: Why, in words: the forward failure's error type and message
            (never an undo's error: see ``compensations``).
        error_type: Qualified class name of the step's error, if any.
        compensations: Each undo that ran, in the order they ended, with its
            ``name``, ``path``, ``status`` and ``error``.
        final_failures: The flow's final steps (``finally_step``) that
            failed, with ``name``, ``path`` and ``error``; they do not change
            the outcome.
        info: The whole outcome as the engine reported it.
    """

    kind: FailureKind = "rolled_back"

    def __init__(self, info: FailureInfo) -> None:
        self.info = info
        self.flow_id = info.flow_id
        self.step = info.step
        self.reason = info.reason
        self.error_type = info.error.type if info.error else None
        self.compensations = list(info.compensations)
        self.final_failures = list(info.final_failures)
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
    """The flow was cancelled; the step in flight and every completed step
    were undone, unless it was cancelled with ``rollback=False``.

    Attributes:
        rolled_back: False when the flow was cancelled with
            ``cancel(rollback=False)``: it stopped where it was, undoing
            nothing (``compensated`` is empty).
    """

    kind: FailureKind = "cancelled"

    def __init__(self, info: FailureInfo) -> None:
        self.rolled_back = info.rolled_back
        super().__init__(info)


class CompensationFailed(FlowFailed):
    """The flow failed and some ``step_back`` failed too, after its retries.

    The other steps were still undone.

    Attributes:
        compensated: Names of the steps undone, in order.
        failed_compensations: Names of the steps that could not be undone.
        not_compensated: Names of the steps the rollback did not get to: it
            stopped at an undo that failed with ``back_on_failure=ABORT``,
            leaving them as they were (empty otherwise).
    """

    kind: FailureKind = "compensation_failed"

    def __init__(self, info: FailureInfo) -> None:
        self.compensated = list(info.compensated)
        self.failed_compensations = list(info.failed_compensations)
        self.not_compensated = list(info.not_compensated)
        super().__init__(info)

    def _message(self) -> str:
        failed = ", ".join(self.failed_compensations)
        left = ", ".join(self.not_compensated)
        more = f"; left as they were: {left}" if left else ""
        return f"{super()._message()} (could not undo: {failed}{more})"


class FlowAborted(FlowFailed):
    """A step failed with the ABORT reaction: the flow stopped and undid nothing."""

    kind: FailureKind = "aborted"
