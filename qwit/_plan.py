"""The plan: a Flow compiled into data.

A client compiles a Flow class into a ``FlowNode`` tree once, when the flow
starts, and hands it to the engine with the flow's args. The engine interprets
only this data, so it never imports user code, and a flow in flight keeps the
plan it started with whatever is deployed later.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Annotated, Any, Literal, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from ._errors import ErrorInfo, FailureInfo, PayloadTooLarge
from ._jsonargs import json_size
from ._options import (
    DEFAULT_BACK_RETRY,
    DEFAULT_RETRY,
    DEFAULT_TIMEOUT,
    DEFAULT_TIMEOUT_GRACE,
    Direction,
    FailurePolicy,
    Reaction,
    Retry,
)
from ._state import FlowStatus, StepStatus

#: Version of the plan format. An engine refuses plans newer than it knows.
#: 1: every field of every node written out. 2: fields equal to their value
#: in ``PINNED_DEFAULTS[2]`` left out (see ``FlowInput``).
PLAN_VERSION = 2


class PlanTooNew(RuntimeError):
    """A flow's plan is newer than this QWIT reads: a client was upgraded
    before the workers. Not the flow's failure: an engine leaves the flow for
    a worker that reads its plan (an upgraded one) instead of failing it."""

    def __init__(self, version: int) -> None:
        super().__init__(
            f"plan version {version} is newer than this worker understands "
            f"({PLAN_VERSION}); upgrade qwit on the workers: the flow waits for a worker "
            "that does"
        )
        self.version = version


#: What a plan of each compact version leaves out: a field missing from a
#: node or from the input means the value here (and a step's missing
#: ``back_fields``, the same as its ``fields``). A version's table never
#: changes, so a flow in flight keeps the settings it started with when QWIT's
#: defaults change: new defaults come with a new plan version and its own
#: table (a value that differs from the table is always written out).
PINNED_DEFAULTS: dict[int, dict[str, dict[str, Any]]] = {
    2: {
        "input": {
            "args": {},
            "path": "",
            "parent_id": None,
            "payload_limit": 2 * 1024 * 1024,
            "unserved_step_timeout": 60.0,
            "shard_of": None,
            "abort_held": False,
            "redrive": None,
            "gives_place": False,
            "index": None,
        },
        "flow": {
            "static_args": {},
            "finally_steps": [],
            "retry": None,
            "on_failure": {"rules": [], "default": "rollback"},
            "backend": None,
        },
        "parallel": {"name": "parallel"},
        "map": {"shard_size": 1000, "offset": 0},
        "step": {
            "static_args": {},
            "retry": {
                "max_attempts": 3,
                "initial_interval": 1.0,
                "backoff": 2.0,
                "max_interval": 60.0,
            },
            "back_retry": {
                "max_attempts": 25,
                "initial_interval": 1.0,
                "backoff": 2.0,
                "max_interval": 120.0,
            },
            "timeout": 300.0,
            "back_timeout": None,
            "timeout_grace": 30.0,
            "heartbeat_timeout": None,
            "on_failure": {"rules": [], "default": "rollback"},
            "back_on_failure": "rollback",
            "local": False,
            "has_back": True,
            "fields": None,
            "backend": None,
        },
    }
}


#: ``PINNED_DEFAULTS`` with its policies (``Retry``, ``FailurePolicy``) as
#: model instances, by version, beside the table they were made from.
_PINNED_MODELS: dict[Any, tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]] = {}
_POLICY_FIELDS: dict[str, type[BaseModel]] = {
    "retry": Retry,
    "back_retry": Retry,
    "on_failure": FailurePolicy,
}


def _pinned_models(version: Any) -> dict[str, dict[str, Any]] | None:
    """What a plan of ``version`` leaves out, its policies as instances that
    every node missing them shares (they are frozen): a flow's plan is read on
    every workflow task of its replays, and a policy parsed anew per node is
    objects for the garbage collector to go through, per flow in flight."""
    pinned = PINNED_DEFAULTS.get(version)
    if pinned is None:
        return None
    made = _PINNED_MODELS.get(version)
    if made is None or made[0] != pinned:  # (made anew if the table was changed)
        table = {
            kind: {
                key: _POLICY_FIELDS[key].model_validate(value)
                if key in _POLICY_FIELDS and isinstance(value, dict)
                else value
                for key, value in values.items()
            }
            for kind, values in pinned.items()
        }
        made = _PINNED_MODELS[version] = (copy.deepcopy(pinned), table)
    return made[1]


#: Where each kind of node holds the nodes inside it: a list, or one node.
_CHILDREN = {"flow": "steps", "parallel": "branches", "map": "node"}


def _compact_node(node: dict[str, Any], pinned: dict[str, dict[str, Any]]) -> dict[str, Any]:
    kind = node.get("kind", "step")
    defaults = pinned.get(kind, {})
    out = {k: v for k, v in node.items() if k not in defaults or defaults[k] != v}
    if kind == "step":
        del out["kind"]  # a node without a kind is a step
        if node.get("back_fields") == node.get("fields"):
            out.pop("back_fields", None)  # missing: the same as fields
    else:
        key = _CHILDREN[kind]
        inner = node[key]
        out[key] = (
            _compact_node(inner, pinned)
            if isinstance(inner, dict)
            else [_compact_node(child, pinned) for child in inner]
        )
        if out.get("finally_steps"):
            out["finally_steps"] = [_compact_node(s, pinned) for s in out["finally_steps"]]
    return out


def _expand_node(node: Any, pinned: dict[str, dict[str, Any]]) -> Any:
    if not isinstance(node, dict):
        return node  # a node object, or bad input pydantic reports
    kind = node.get("kind", "step")
    if kind != "step" and kind not in _CHILDREN:
        return node  # not a kind of node: pydantic says so
    out = {**pinned.get(kind, {}), **node, "kind": kind}
    if kind == "step" and "back_fields" not in node:
        out["back_fields"] = out.get("fields")
    inner = out.get(_CHILDREN.get(kind, ""))
    if isinstance(inner, dict):
        out[_CHILDREN[kind]] = _expand_node(inner, pinned)
    elif isinstance(inner, list | tuple):
        out[_CHILDREN[kind]] = [_expand_node(child, pinned) for child in inner]
    if kind == "flow" and isinstance(out.get("finally_steps"), list | tuple):
        out["finally_steps"] = [_expand_node(s, pinned) for s in out["finally_steps"]]
    return out


class StepNode(BaseModel):
    """One step of a plan."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["step"] = "step"
    name: str
    static_args: dict[str, Any] = Field(default_factory=dict)
    retry: Retry = DEFAULT_RETRY
    back_retry: Retry = DEFAULT_BACK_RETRY
    timeout: float = DEFAULT_TIMEOUT
    back_timeout: float | None = None
    """One ``step_back`` attempt's limit (None: ``timeout``)."""
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

    def limit(self, direction: str) -> float:
        """One attempt's time limit in seconds, for ``step_forward`` or ``step_back``."""
        if direction == "step_back" and self.back_timeout is not None:
            return self.back_timeout
        return self.timeout

    def grace(self) -> float:
        """Seconds a timed-out attempt gets to stop, where the step runs
        (``run_watched_step_method``'s ``grace``)."""
        return DEFAULT_TIMEOUT_GRACE if self.timeout_grace is None else self.timeout_grace


class FlowNode(BaseModel):
    """A flow of a plan: the root, or a sub-flow used as a step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["flow"] = "flow"
    name: str
    static_args: dict[str, Any] = Field(default_factory=dict)
    steps: tuple[Node, ...]
    finally_steps: tuple[StepNode, ...] = ()
    """Steps run once the flow has ended, whatever the outcome; never undone."""
    retry: Retry | None = None
    """For a sub-flow: run it again from its start when it fails (having
    undone itself), per this policy, before its ``on_failure`` applies (a
    retried segment). None: one attempt."""
    on_failure: FailurePolicy = FailurePolicy()
    backend: str | None = None

    def step_names(self) -> list[str]:
        """Names of every step of this flow, sub-flows flattened, in plan order."""
        return [node.name for _, node, _ in walk(self) if isinstance(node, StepNode)]


#: What a branch or a map's element runs: a step or a sub-flow.
UnitNode = Annotated[StepNode | FlowNode, Field(discriminator="kind")]


class ParallelNode(BaseModel):
    """A parallel block: its branches (steps or sub-flows) run side by side."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["parallel"] = "parallel"
    name: str = "parallel"
    branches: tuple[UnitNode, ...]
    """Each a step or a sub-flow; their outputs are merged in this order."""


class MapNode(BaseModel):
    """A map: one step (or sub-flow) run once per element of a list arg."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["map"] = "map"
    name: str
    """The name of the step or sub-flow each element runs."""
    over: str
    """The arg holding the list."""
    item: str
    """The arg each element gets its element as."""
    into: str
    """The arg the outputs are collected into, as a list in element order."""
    max_concurrency: int = Field(ge=1)
    """At most this many elements run (or are undone) at once."""
    node: UnitNode
    """What each element runs: a step or a sub-flow."""
    shard_size: int = Field(default=1000, ge=1)
    """A list longer than this runs as shards of this many elements, each a
    sub-flow of its own, one at a time: an engine's limits (Temporal's 51,200
    events per workflow) then bound a shard, not the map."""
    offset: int = Field(default=0, ge=0)
    """In a shard: the index of its first element in the whole list."""


Node = Annotated[StepNode | FlowNode | ParallelNode | MapNode, Field(discriminator="kind")]
FlowNode.model_rebuild()
ParallelNode.model_rebuild()
MapNode.model_rebuild()

#: The nodes a flow runs as one step of its own: their own step, or a sub-flow.
Unit = StepNode | FlowNode


class StepRecord(BaseModel):
    """What one step (a sub-flow, a block, a map) of a flow had done when
    the flow ended: what a redrive reuses, or undoes."""

    model_config = ConfigDict(frozen=True)

    path: str
    status: StepStatus
    """Its status when the flow ended."""
    args: dict[str, Any] | None = None
    """The args its ``step_forward`` received (None: it never ran)."""
    output: dict[str, Any] | None = None
    key: str | None = None
    """Its forward's idempotency key; its undo's derives from it."""
    attempts: int = 0
    effect: bool = False
    """A step that failed may have done something (its forward started)."""
    held: bool = False
    """A sub-flow that aborted, keeping its effects."""
    members: list[StepRecord] = Field(default_factory=list)
    """A block's branches, a map's elements."""
    sub_id: str | None = None
    """A sub-flow's execution id (whose own records hold its steps')."""
    sub: list[StepRecord] | None = None
    """A sub-flow's own steps' records, once read."""
    sharded: bool = False


class Redrive(BaseModel):
    """How a redriven flow starts from what an earlier run of it did."""

    model_config = ConfigDict(frozen=True)

    of_run: str | None = None
    """The run this one redrives (its engine's run id)."""
    mode: Literal["resume", "rollback"] = "resume"
    """Resume from ``resume`` (the steps before it reused, those at and after
    it undone first), or finish the rollback the earlier run left."""
    records: list[StepRecord] = Field(default_factory=list)
    resume: str | None = None
    corrections: dict[str, Any] = Field(default_factory=dict)
    """Args merged in over the reused outputs."""
    failure: FailureInfo | None = None
    """How the earlier run failed (a finished rollback reports it)."""
    keep_members: bool = False
    """``resume`` is the parallel block (or map) the earlier run stopped in:
    its members that completed are kept, their outputs reused, and only the
    others are undone (if they did something) and run again. (Redrives of
    older QWIT, and those from a given path, run the block again whole.)"""


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
    redrive: Redrive | None = None
    """Set for a flow redriven from an earlier run (see ``Redrive``)."""
    shard_of: str | None = None
    """Set for a shard of a large map: the path of the map, which the shard's
    plan (a map over its part of the list) runs at."""
    abort_held: bool = False
    """Set for a sub-flow whose parent holds it when it aborts: it keeps its
    effects and waits for the parent's word (keep them, or undo them), as a
    sub-flow whose steps have all run does. False in plans of older QWIT: an
    aborted sub-flow ended at once, and its parent could not undo it."""
    gives_place: bool = False
    """Set for a sub-flow that is a member of a block or map under
    ``max_concurrency`` (or a sub-flow in the sequence of one, whose place
    is the member's): while a step of its sequence waits for an operator it
    gives its place to the others, and asks for it back before it goes on.
    False in plans of older QWIT: such a sub-flow kept its place while it
    waited."""
    index: int | None = None
    """Set for a sub-flow that is an element of a map (or a sub-flow inside
    one): the element's 0-based index, which ``qwit.context().index`` gives
    its steps (those of a map inside it get their own element's). None in
    plans of older QWIT."""
    execution: str | None = None
    """What makes this execution's idempotency keys its own: the root's
    execution id (fixed when the flow starts), extended by each sub-flow
    attempt past the first. None in plans of older QWIT, whose keys were
    ``flow_id/path/direction`` and whose sub-flow ids were ``flow_id/path``."""
    flow: FlowNode
    """The compiled plan."""

    # Plans of version 2 on are written compactly: the history of every flow
    # holds its plan, so its size is paid on every flow (what a hand-written
    # workflow's input does not carry).
    @model_serializer(mode="wrap")
    def _compact(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        pinned = PINNED_DEFAULTS.get(self.version)
        if pinned is None:
            # (as older QWIT wrote it)
            for newer in ("abort_held", "redrive", "gives_place", "index"):
                if data[newer] is None or data[newer] is False:
                    del data[newer]
            return data
        top = pinned["input"]
        out = {k: v for k, v in data.items() if k not in top or top[k] != v}
        out["flow"] = _compact_node(data["flow"], pinned)
        return out

    @model_validator(mode="before")
    @classmethod
    def _expand(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        pinned = _pinned_models(data.get("version", 1))
        if pinned is None:
            return data
        return {**pinned["input"], **data, "flow": _expand_node(data.get("flow"), pinned)}


class FlowRecords(BaseModel):
    """What an ended flow's run did, step by step: what a redrive starts from."""

    model_config = ConfigDict(frozen=True)

    flow_id: str
    run_id: str | None = None
    input: FlowInput
    status: FlowStatus
    failure: FailureInfo | None = None
    steps: list[StepRecord]


class StepCall(BaseModel):
    """One run of a step's method, as an engine hands it to a worker."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    flow_id: str
    path: str
    step: str
    direction: Direction
    args: dict[str, Any]
    key: str | None = None
    """The forward execution's key (``forward_key``); None in older plans."""
    timeout: float | None = None
    """The attempt's deadline, which the worker enforces itself (the engine's
    limit is this plus the step's ``timeout_grace``); None in older plans."""
    index: int | None = None
    """For an element of a map: its 0-based index."""
    error: ErrorInfo | None = None
    """For ``step_fallback``: how the step failed."""

    # Left out when None: workers of older QWIT, which serve the flows of
    # older plans, are sent whole StepCalls and know no ``index``.
    @model_serializer(mode="wrap")
    def _without_index(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for optional in ("index", "error"):
            if data.get(optional) is None:
                data.pop(optional, None)
        return data

    @property
    def idempotency_key(self) -> str:
        """Stable for this execution of the step across its retries; an undo's
        key is its forward's key plus the direction."""
        if self.key is None:
            return f"{self.flow_id}/{self.path}/{self.direction}"
        return self.key if self.direction == "step_forward" else f"{self.key}/{self.direction}"


class WireCall(BaseModel):
    """A ``StepCall`` as a durable engine sends it to a worker, since every
    call is kept in the flow's history: without what the worker learns from
    the task itself. The step and direction are the task's name, the root
    flow's id starts the flow's id, the path ends the key, and the timeout is
    the task's time limit less ``WIRE_GRACE`` unless given. Flows of plans
    older than version 2 send the whole ``StepCall``, which this reads too.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    args: dict[str, Any] = Field(default_factory=dict)
    key: str | None = None
    timeout: float | None = None
    path: str | None = None
    index: int | None = None
    flow_id: str | None = None
    step: str | None = None
    direction: Direction | None = None
    error: ErrorInfo | None = None

    @model_serializer(mode="wrap")
    def _compact(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None and v != {}}

    @classmethod
    def of(cls, call: StepCall, grace: float | None) -> WireCall:
        """What to send for ``call`` (of a plan of version 2 or later), run
        with a time limit of ``call.timeout`` plus ``grace``."""
        if call.key is None:
            raise ValueError(f"call of {call.path!r} has no key")
        timeout = None if grace == WIRE_GRACE else call.timeout
        # The path is the key's last part, but for the undo of what a
        # fallback did (keyed ``<forward key>/step_fallback``): then it is sent.
        path = None if path_of(call.key) == call.path else call.path
        return cls(
            args=call.args,
            key=call.key,
            timeout=timeout,
            index=call.index,
            error=call.error,
            path=path,
        )

    def call(self, *, flow_id: str, step: str, direction: str, limit: float | None) -> StepCall:
        """The ``StepCall`` this stands for, given what the worker learnt from
        the task: its flow's id, step, direction and time limit in seconds."""
        if self.step is not None:  # a whole StepCall: a flow of an older plan
            return StepCall.model_validate(self.model_dump())
        if self.key is None:
            raise ValueError("a call without its step needs its key")
        timeout = self.timeout
        if timeout is None and limit is not None:
            timeout = limit - WIRE_GRACE
        return StepCall(
            flow_id=root_of(flow_id),
            path=self.path if self.path is not None else path_of(self.key),
            step=step,
            direction=cast(Direction, direction),
            args=self.args,
            key=self.key,
            timeout=timeout,
            index=self.index,
            error=self.error,
        )


#: The ``timeout_grace`` a ``WireCall`` leaves unsaid (the pinned default).
WIRE_GRACE = 30.0


def root_of(flow_id: str) -> str:
    """The id of the root flow of the flow whose id is ``flow_id``."""
    return flow_id.partition(SUBFLOW_MARK)[0]


class StepReturn(BaseModel):
    """What a step's method returned, normalised to a dict."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    output: dict[str, Any] = Field(default_factory=dict)
    attempt: int = 1

    # Written as ``[output]``, or ``[output, attempt]`` past the first
    # attempt: every step's return is kept in its flow's history. Read from
    # that, or from the ``{"output": ..., "attempt": ...}`` of older workers.
    @model_serializer(mode="wrap")
    def _compact(self, handler: SerializerFunctionWrapHandler) -> list[Any]:
        data: dict[str, Any] = handler(self)
        return [data["output"]] if self.attempt == 1 else [data["output"], data["attempt"]]

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, data: Any) -> Any:
        if isinstance(data, list | tuple) and 1 <= len(data) <= 2:
            return dict(zip(("output", "attempt"), data, strict=False))
        return data


def wire_return(output: dict[str, Any], attempt: int) -> list[Any]:
    """``StepReturn(output=output, attempt=attempt)`` as it is written, for a
    worker to send without building the model; ``output`` is JSON already."""
    return [output] if attempt == 1 else [output, attempt]


#: Room kept under a payload limit for what the engine's encoding adds.
PAYLOAD_MARGIN = 1024
#: Temporal's default payload limit (``limit.blobSize.error``), for servers
#: that don't say, and the limit of the in-memory engines.
DEFAULT_PAYLOAD_LIMIT = 2 * 1024 * 1024


def check_input_fits(input: FlowInput, whose: str) -> None:
    """Refuse to start ``input`` if it is over its payload limit (``whose``
    says whose limit that is, as in "of the namespace").

    Raises:
        PayloadTooLarge: its args and plan, as the engine sends them, take
            more than ``input.payload_limit`` less ``PAYLOAD_MARGIN``.
    """
    limit = input.payload_limit
    if not limit:
        return
    size = json_size(input.model_dump(mode="json"))
    if size > limit - PAYLOAD_MARGIN:
        raise PayloadTooLarge(
            f"flow {input.flow.name!r}: its args and plan take {size} bytes, over the "
            f"{limit}-byte payload limit {whose}; pass references (ids, URLs) instead of "
            "large values"
        )


#: What separates a root flow's id from its sub-flows' paths in their ids.
#: User ids may not contain it, so a user's id never collides with a sub-flow's.
SUBFLOW_MARK = "/~"


def forward_key(execution: str, path: str, run: int) -> str:
    """The idempotency key of a step's forward execution.

    ``execution`` is the flow's (``FlowInput.execution``), ``run`` counts the
    step's executions in it (1, then +1 for each operator RETRY).
    """
    return f"{execution}/{path}" + (f"~{run}" if run > 1 else "")


def path_of(key: str) -> str:
    """The path of the step whose forward key (``forward_key``) is ``key``.

    Execution ids hold no ``/`` or ``~`` (the root's is URL-safe base64; a
    sub-flow attempt's adds ``/<path>#N``), so the path is the key's last part.
    """
    return key.rpartition("/")[2].partition("~")[0]


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


#: The path segment of a map's element in a plan (its elements are known
#: only at run time: element i has the segment i + 1).
ELEMENT = "*"


def walk(flow: Node, path: str = "", depth: int = 0) -> Iterator[tuple[str, Node, int]]:
    """Every node under ``flow`` (a flow, a parallel block or a map), depth
    first in plan order, with its path and depth (0 for ``flow``'s own
    nodes): the one way to walk a plan. A map's element node has the path
    ``<map's path>.*``."""
    for i, node in enumerate(inner_nodes(flow)):
        node_path = f"{path}.{ELEMENT}" if isinstance(flow, MapNode) else child_path(path, i)
        yield node_path, node, depth
        yield from walk(node, node_path, depth + 1)


def node_at(flow: FlowNode, path: str, base: str = "") -> Node | None:
    """The node of ``flow`` (whose own path is ``base``) that runs the step
    at ``path``, a map's element paths included; None if there is none."""
    parts = path.split(".")
    for node_path, node, _ in walk(flow, base):
        mine = node_path.split(".")
        if len(mine) == len(parts) and all(
            a in (b, ELEMENT) for a, b in zip(mine, parts, strict=True)
        ):
            return node
    return None


def inner_nodes(node: Node) -> tuple[Node, ...]:
    """The nodes directly inside ``node`` (none inside a step)."""
    if isinstance(node, FlowNode):
        return (*node.steps, *node.finally_steps)
    if isinstance(node, ParallelNode):
        return node.branches
    if isinstance(node, MapNode):
        return (node.node,)
    return ()


def relative_place(path: str, other: str) -> Literal["before", "inside", "at", "after"]:
    """Where the step at ``path`` lies from the step at ``other``, in plan
    order (``inside``: ``other`` is inside it)."""
    mine, theirs = path.split("."), other.split(".")
    if theirs[: len(mine)] == mine:
        return "inside" if len(theirs) > len(mine) else "at"
    for a, b in zip(mine, theirs, strict=False):
        if a != b:
            return "before" if int(a) < int(b) else "after"
    return "after"  # pragma: no cover - a prefix is handled above


def child_path(parent: str, index: int) -> str:
    """Path of step ``index`` (0-based) of the flow at ``parent``: 1-based, dotted."""
    return f"{parent}.{index + 1}" if parent else str(index + 1)
