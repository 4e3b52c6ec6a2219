"""The plan: a Flow compiled into data.

A client compiles a Flow class into a ``FlowNode`` tree once, when the flow
starts, and hands it to the engine with the flow's args. The engine interprets
only this data, so it never imports user code, and a flow in flight keeps the
plan it started with whatever is deployed later.
"""

from __future__ import annotations

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
    heartbeat_timeout: float | None = None
    on_failure: FailurePolicy = FailurePolicy()
    back_on_failure: Reaction = Reaction.ROLLBACK
    local: bool = False
    has_back: bool = True
    """False when the Step does not override ``step_back``: nothing to run on undo."""
    fields: tuple[str, ...] | None = None
    """Arg names the step reads (typed steps); None means all of them."""
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
        names: list[str] = []
        for node in self.steps:
            names.extend(node.step_names() if isinstance(node, FlowNode) else [node.name])
        return names


Node = Annotated[StepNode | FlowNode, Field(discriminator="kind")]
FlowNode.model_rebuild()


class FlowInput(BaseModel):
    """What an engine runs: a plan, its args, and where it sits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = PLAN_VERSION
    flow: FlowNode
    args: dict[str, Any] = Field(default_factory=dict)
    root_id: str
    """Id of the flow the user started; sub-flows share it."""
    path: str = ""
    """Position of this flow inside the root ('' for the root, '3' or '3.1')."""
    parent_id: str | None = None
    """Set for a sub-flow: the id of the flow that runs it."""
    payload_limit: int | None = None
    """Largest payload the engine accepts, in bytes (None: no limit known)."""


class StepCall(BaseModel):
    """One run of a step's method, as an engine hands it to a worker."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    flow_id: str
    path: str
    step: str
    direction: Literal["step_forward", "step_back"]
    args: dict[str, Any]

    @property
    def idempotency_key(self) -> str:
        """Stable for this step of this flow and direction, across retries."""
        return f"{self.flow_id}/{self.path}/{self.direction}"


class StepReturn(BaseModel):
    """What a step's method returned, normalised to a dict."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    output: dict[str, Any] = Field(default_factory=dict)
    attempt: int = 1


def child_path(parent: str, index: int) -> str:
    """Path of step ``index`` (0-based) of the flow at ``parent``: 1-based, dotted."""
    return f"{parent}.{index + 1}" if parent else str(index + 1)
