"""The plan: a Flow compiled into data.

A client compiles a Flow class into a ``FlowNode`` tree once, when the flow
starts, and hands it to the engine with the flow's args. The engine interprets
only this data, so it never imports user code, and a flow in flight keeps the
plan it started with whatever is deployed later.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ._options import (
    DEFAULT_BACK_RETRY,
    DEFAULT_RETRY,
    DEFAULT_TIMEOUT,
    FailurePolicy,
    Reaction,
    Retry,
)

#: Version of the plan format. An engine refuses plans newer than it knows.
PLAN_VERSION = 1


class StepNode(BaseModel):
    """One step of a plan."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["step"] = "step"
    name: str
    static_args: dict[str, Any] = Field(default_factory=dict)
    retry: Retry = DEFAULT_RETRY
    back_retry: Retry = DEFAULT_BACK_RETRY
    timeout: float = DEFAULT_TIMEOUT
    timeout_grace: float | None = None
    """How long past ``timeout`` QWIT waits for a timed-out attempt to stop
    before the next attempt or the undo starts. None (plans of older QWIT):
    the engine's limit is ``timeout`` alone."""
    heartbeat_timeout: float | None = None
    on_failure: FailurePolicy = FailurePolicy()
    back_on_failure: Reaction = Reaction.ROLLBACK
    local: bool = False
    has_back: bool = True
    """False when the Step does not override ``step_back``: nothing to run on undo."""
    fields: tuple[str, ...] | None = None
    """Arg names ``step_forward`` reads (a typed step); None means all of them."""
    back_fields: tuple[str, ...] | None = None
    """Arg names ``step_back`` reads (typed); None means all of them."""
    backend: str | None = None


class FlowNode(BaseModel):
    """A flow of a plan: the root, or a sub-flow used as a step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["flow"] = "flow"
    name: str
    static_args: dict[str, Any] = Field(default_factory=dict)
    steps: tuple[Node, ...]
    on_failure: FailurePolicy = FailurePolicy()
    backend: str | None = None

    def step_names(self) -> list[str]:
        """Names of every step of this flow, sub-flows flattened, in plan order."""
        return [node.name for _, node, _ in walk(self) if isinstance(node, StepNode)]


Node = Annotated[StepNode | FlowNode, Field(discriminator="kind")]
FlowNode.model_rebuild()


class FlowInput(BaseModel):
    """What an engine runs: a plan, its args, and where it sits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The order is what Temporal's UI shows of a flow's input: what an operator
    # looks for first (the args, the ids), the compiled plan last.
    args: dict[str, Any] = Field(default_factory=dict)
    root_id: str
    """Id of the flow the user started; sub-flows share it."""
    path: str = ""
    """Position of this flow inside the root ('' for the root, '3' or '3.1')."""
    parent_id: str | None = None
    """Set for a sub-flow: the id of the flow that runs it."""
    version: int = PLAN_VERSION
    payload_limit: int | None = None
    """Largest payload the engine accepts, in bytes (None: no limit known)."""
    unserved_step_timeout: float | None = None
    """How long, in seconds, a step no worker that took it serves is offered
    to the task queue again (another worker may serve it: a rolling deploy,
    workers of different modules) before it fails. None in plans of older
    QWIT: it fails at once."""
    execution: str | None = None
    """What makes this execution's idempotency keys its own: the root's
    execution id (fixed when the flow starts), extended by each sub-flow
    attempt past the first. None in plans of older QWIT, whose keys were
    ``flow_id/path/direction`` and whose sub-flow ids were ``flow_id/path``."""
    flow: FlowNode
    """The compiled plan."""


class StepCall(BaseModel):
    """One run of a step's method, as an engine hands it to a worker."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    flow_id: str
    path: str
    step: str
    direction: Literal["step_forward", "step_back"]
    args: dict[str, Any]
    key: str | None = None
    """The forward execution's key (``forward_key``); None in older plans."""
    timeout: float | None = None
    """The attempt's deadline, which the worker enforces itself (the engine's
    limit is this plus the step's ``timeout_grace``); None in older plans."""

    @property
    def idempotency_key(self) -> str:
        """Stable for this execution of the step across its retries; an undo's
        key is its forward's key plus the direction."""
        if self.key is None:
            return f"{self.flow_id}/{self.path}/{self.direction}"
        return self.key if self.direction == "step_forward" else f"{self.key}/{self.direction}"


class StepReturn(BaseModel):
    """What a step's method returned, normalised to a dict."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    output: dict[str, Any] = Field(default_factory=dict)
    attempt: int = 1


#: Room kept under a payload limit for what the engine's encoding adds.
PAYLOAD_MARGIN = 1024

#: What separates a root flow's id from its sub-flows' paths in their ids.
#: User ids may not contain it, so a user's id never collides with a sub-flow's.
SUBFLOW_MARK = "/~"


def forward_key(execution: str, path: str, run: int) -> str:
    """The idempotency key of a step's forward execution.

    ``execution`` is the flow's (``FlowInput.execution``), ``run`` counts the
    step's executions in it (1, then +1 for each operator RETRY).
    """
    return f"{execution}/{path}" + (f"~{run}" if run > 1 else "")


def child_execution(execution: str, path: str, attempt: int) -> str:
    """The ``execution`` of attempt ``attempt`` of the sub-flow at ``path``."""
    return execution if attempt <= 1 else f"{execution}/{path}#{attempt}"


def child_flow_id(input: FlowInput, path: str, attempt: int) -> str:
    """The id of attempt ``attempt`` of the sub-flow at ``path``, whose own
    input is ``input`` (one place for every engine).

    Ids are ``<root id>/~<path>``, plus ``#N`` for its N-th attempt; a
    sub-flow inside a retried one keeps the retried one's ``#N`` in its id
    (``order-7/~2#2/2.1``), so that every execution has an id of its own.
    """
    if input.execution is None:  # flows started by older QWIT keep their ids
        return f"{input.root_id}/{path}" + (f"#{attempt}" if attempt > 1 else "")
    # the attempts of enclosing sub-flows (and of this one) are in its execution
    _, _, scope = input.execution.partition("/")
    if attempt > 1:  # the execution ends with this sub-flow's own "/path#N"
        return f"{input.root_id}{SUBFLOW_MARK}{scope}"
    return f"{input.root_id}{SUBFLOW_MARK}{scope + '/' if scope else ''}{path}"


def walk(flow: FlowNode, path: str = "", depth: int = 0) -> Iterator[tuple[str, Node, int]]:
    """Every node under ``flow``, depth first in plan order, with its path and
    depth (0 for ``flow``'s own steps): the one way to walk a plan."""
    for i, node in enumerate(flow.steps):
        node_path = child_path(path, i)
        yield node_path, node, depth
        if isinstance(node, FlowNode):
            yield from walk(node, node_path, depth + 1)


def child_path(parent: str, index: int) -> str:
    """Path of step ``index`` (0-based) of the flow at ``parent``: 1-based, dotted."""
    return f"{parent}.{index + 1}" if parent else str(index + 1)
