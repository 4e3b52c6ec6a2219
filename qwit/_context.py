"""What a running step can know about itself: ``qwit.context()`` and ``qwit.heartbeat()``."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._options import Direction


@dataclass(frozen=True)
class StepContext:
    """The step being run, as ``qwit.context()`` returns it.

    Attributes:
        flow_id: Id of the flow the user started (sub-flows share it).
        step: The step's name.
        path: Its position in the flow, 1-based, dotted through sub-flows
            (``"3.1"`` is the first step of the sub-flow at position 3).
        direction: ``"step_forward"``, ``"step_back"`` or ``"step_fallback"``.
        attempt: 1 on the first try, then 2, 3...
        idempotency_key: Stable for this step of this flow and direction
            across retries and worker restarts, and different between
            ``step_forward``, ``step_back`` and ``step_fallback``. Pass it to the systems you call
            so that a retried step does not apply its effect twice.
        heartbeat_details: What the previous attempt last passed to
            ``qwit.heartbeat()``, or None: where to resume.
        engine: Name of the engine running the step.
        index: For an element of a map, its 0-based index in the list; else
            None.
    """

    flow_id: str
    step: str
    path: str
    direction: Direction
    attempt: int
    idempotency_key: str
    heartbeat_details: Any = None
    engine: str = ""
    index: int | None = None
    _heartbeat: Callable[[Any], None] = field(default=lambda details: None, repr=False)
    _is_cancelled: Callable[[], bool] = field(default=lambda: False, repr=False)

    @property
    def cancelled(self) -> bool:
        """True once the step was cancelled: the flow was, a sibling branch
        stopped its block, or the attempt's deadline passed (on Temporal,
        learned through a heartbeat)."""
        return self._is_cancelled()


_current: contextvars.ContextVar[StepContext] = contextvars.ContextVar("qwit_step_context")


def context() -> StepContext:
    """The step being run.

    Raises:
        RuntimeError: called outside a step.
    """
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("qwit.context() is only available while a step runs") from None


def heartbeat(details: Any = None) -> None:
    """Tell the engine a long step is alive, and where it is.

    ``details`` (JSON) reaches the next attempt as
    ``qwit.context().heartbeat_details`` if this one dies. On Temporal, a step
    with ``heartbeat_timeout`` must call this more often than that timeout, and
    it is through heartbeats that a step learns its flow was cancelled (an
    ``async`` step is then cancelled; a plain one sees ``context().cancelled``).
    Outside a step this does nothing.
    """
    current = _current.get(None)
    if current is not None:
        current._heartbeat(details)


def set_context(ctx: StepContext) -> contextvars.Token[StepContext]:
    """Make ``ctx`` the current step context (engines call this)."""
    return _current.set(ctx)


def reset_context(token: contextvars.Token[StepContext]) -> None:
    """Undo ``set_context``."""
    _current.reset(token)
