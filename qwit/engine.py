"""Everything needed to write a QWIT engine.

An engine runs compiled plans on some queue engine. It does not implement the
saga rules: ``Interpreter`` does (args, reactions, undo order, waiting for an
operator, what ``state()`` reports), driven by a ``FlowRuntime`` the engine
supplies:

- ``run_step(node, call)``: run one direction of a step, retries included,
  with ``run_step_method`` (``run_watched_step_method`` to enforce a
  ``heartbeat_timeout`` itself) and a ``Registry`` of the steps it may run;
- ``start_subflow(node, input, attempt)``: run a sub-flow (another
  Interpreter), returning a ``SubflowRun``;
- ``wait_until(predicate)``: wait until a signal (an operator's decision, a
  parent's word) makes ``predicate()`` true;
- ``cancel_requested()``.

On the client side an engine is an ``Engine`` (``start``, ``get_handle``)
handing out ``FlowHandle`` s (``result``, ``cancel``, ``flow_state``,
``send_decision``). A backend, what ``backend=`` names, is any object with a
``name`` and ``create_engine(client)``: a module will do.

An engine that keeps its flows in this process subclasses ``InMemoryEngine``
and ``InMemoryRuntime``, which hold the run table, sub-flows, waiting, the
handles and the retry rule (``run_with_retries``): it writes only how one
attempt of a step runs (``run_attempt``). ``qwit.local`` is such an engine, in
a few lines; read it first.

Parallel blocks and maps need nothing more of an engine: the interpreter runs
their branches and elements side by side as concurrent ``run_step`` (or
``start_subflow``) calls, and stops one alone by cancelling its task; a
runtime must let such a cancel reach that call only, and raise
``asyncio.CancelledError`` once the step has stopped. ``walk`` visits every
node of a plan (``FlowNode``, ``StepNode``, ``ParallelNode``, ``MapNode``);
``WireCall`` is the compact form of a ``StepCall`` for a durable engine's
task queue.

Recovery asks a little more. A runtime's ``report_aborted`` tells a parent
that its sub-flow (started with ``FlowInput.abort_held``) aborted and waits
for ``settle``, as ``report_forward_done`` does for one whose steps all ran;
``sleep`` waits between a retried segment's attempts (durably, where the
engine can); ``patched`` gates what a change records (always true without
recorded histories); a ``SubflowRun.cancel(rollback=False)`` stops a sub-flow
where it is. An engine that redrives implements ``Engine.flow_records`` (an
ended flow's ``FlowRecords``: ``Interpreter.records()`` with its input and
outcome) and ``Engine.restart`` (start a new run of the same id from an
input whose ``redrive`` the client filled in); ``InMemoryEngine`` does both.
"""

from __future__ import annotations

from ._engine import Backend, Engine, EngineHost, FlowHandle
from ._errors import ErrorInfo, FailureInfo, StepFailure
from ._memory import (
    Heartbeats,
    InMemoryEngine,
    InMemoryHandle,
    InMemoryRun,
    InMemoryRuntime,
    run_with_retries,
)
from ._plan import (
    FlowInput,
    FlowNode,
    FlowRecords,
    MapNode,
    ParallelNode,
    Redrive,
    StepCall,
    StepNode,
    StepRecord,
    StepReturn,
    WireCall,
    walk,
)
from ._runner import Registry, run_step_method, run_watched_step_method
from ._saga import Decision, FlowFailure, FlowRuntime, Interpreter, SubflowRun
from ._state import FlowState, StepState, WaitInfo

__all__ = [
    "Backend",
    "Decision",
    "Engine",
    "EngineHost",
    "ErrorInfo",
    "FailureInfo",
    "FlowFailure",
    "FlowHandle",
    "FlowInput",
    "FlowNode",
    "FlowRecords",
    "FlowRuntime",
    "FlowState",
    "Heartbeats",
    "InMemoryEngine",
    "InMemoryHandle",
    "InMemoryRun",
    "InMemoryRuntime",
    "Interpreter",
    "MapNode",
    "ParallelNode",
    "Redrive",
    "Registry",
    "StepCall",
    "StepFailure",
    "StepNode",
    "StepRecord",
    "StepReturn",
    "StepState",
    "SubflowRun",
    "WaitInfo",
    "WireCall",
    "run_step_method",
    "run_watched_step_method",
    "run_with_retries",
    "walk",
]
