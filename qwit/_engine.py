"""The engine interface: what a queue engine implements to run QWIT flows.

An engine is small. It starts a compiled plan, finds a flow by id, and gives
a ``FlowHandle`` for it. To run the plan it drives ``qwit.engine.Interpreter``
(the saga rules, shared by every engine) with a ``FlowRuntime`` of its own:
how one step runs, how a sub-flow runs, how the flow waits for a signal.

``qwit.engine`` gathers what an engine author needs. A *backend* is what
``Flow``'s ``backend=`` names: any object with a ``name``
and a ``create_engine(client)`` method. The modules ``qwit.temporal`` and
``qwit.local`` are backends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Protocol

from ._errors import ReactionError
from ._jsonargs import NotJSON, as_args
from ._options import Reaction, parse_reaction
from ._plan import FlowInput, FlowRecords
from ._saga import Decision
from ._state import FlowState, StepState, choose_wait, path_key

if TYPE_CHECKING:
    from ._flow import Flow


class FlowHandle(ABC):
    """A flow that was started: wait for it, watch it, steer it.

    An engine implements ``result``, ``cancel``, ``flow_state`` (one flow's own
    state) and ``send_decision`` (deliver an operator's decision to one flow);
    ``state`` and ``react``, which see through sub-flows, are built on those.

    Attributes:
        id: The flow's id (on Temporal, its workflow id).
        engine: Name of the engine that runs it.
    """

    id: str
    engine: str

    @abstractmethod
    async def result(self) -> dict[str, Any]:
        """Wait for the flow to end.

        Returns:
            The flow's final args: its input updated by every step's output.

        Raises:
            FlowRolledBack: a step failed and every effect was undone.
            FlowCancelled: the flow was cancelled and rolled back.
            CompensationFailed: some step could not be undone.
            FlowAborted: a step failed with ABORT; nothing was undone.
            FlowNotFound: no flow has this id.
            EngineUnavailable: the engine can't be reached (on Temporal, once
                it has not answered for the engine's ``unavailable_timeout``:
                a server that restarts meanwhile is waited for).
        """

    @abstractmethod
    async def cancel(self, rollback: bool = True) -> None:
        """Ask the flow to stop; it rolls back the step in flight and every
        completed step, then ends with FlowCancelled. A waiting flow is
        cancelled too.

        Args:
            rollback: False to stop the flow where it is, undoing nothing
                (the step in flight is cancelled and its effect, if any,
                stays); it ends with FlowCancelled whose ``rolled_back`` is
                False. The first cancel of a flow decides.

        Raises:
            FlowNotFound: no flow has this id.
            ReactionError: the flow has already ended.
            EngineUnavailable: the engine can't be reached.
        """

    @abstractmethod
    async def flow_state(self, flow_id: str) -> FlowState:
        """The state of one flow of this run (the root or a sub-flow, by the
        id its engine gave it), without its sub-flows' steps filled in."""

    @abstractmethod
    async def send_decision(self, flow_id: str, decision: Decision) -> None:
        """Deliver an operator's decision to the waiting flow ``flow_id``.

        Raises:
            ReactionError: the flow refused it.
        """

    async def state(self) -> FlowState:
        """The flow's progress: status, and each step's status and attempts,
        sub-flows' steps included; a wait anywhere inside shows as ``waiting``.

        Raises:
            FlowNotFound: no flow has this id.
            EngineUnavailable: the engine can't be reached.
        """
        return await self._with_subflows(await self.flow_state(self.id))

    async def _with_subflows(self, state: FlowState) -> FlowState:
        # (a flow of an older worker reports its one wait as ``waiting`` only)
        waits = list(state.waits) or ([state.waiting] if state.waiting else [])

        async def fill(steps: list[StepState]) -> list[StepState]:
            filled = []
            for step in steps:
                if step.kind == "flow" and step.flow_id is not None:
                    child = await self._with_subflows(await self.flow_state(step.flow_id))
                    step = step.model_copy(update={"steps": child.steps})
                    # a ROLLBACK decided inside goes on in this flow
                    waits.extend(
                        wait.model_copy(
                            update={"rollback_preview": wait.rollback_preview + step.rollback_after}
                        )
                        if wait.direction == "step_forward" and step.rollback_after
                        else wait
                        for wait in child.waits
                    )
                elif step.steps:  # a parallel block's branches, a map's elements
                    step = step.model_copy(update={"steps": await fill(step.steps)})
                filled.append(step)
            return filled

        steps = await fill(list(state.steps))
        waits.sort(key=lambda w: path_key(w.path))
        waiting = waits[0] if waits else None
        status = "waiting" if waiting is not None and not state.done else state.status
        return state.model_copy(
            update={"steps": steps, "waiting": waiting, "waits": waits, "status": status}
        )

    async def react(
        self,
        reaction: Reaction | str,
        args: dict[str, Any] | None = None,
        path: str | None = None,
    ) -> None:
        """Decide for a flow that is waiting (a step with ``on_failure=WAIT``).

        Args:
            reaction: ``RETRY`` (run the step again), ``SKIP``, ``SKIPBACK``,
                ``ROLLBACK`` or ``ABORT``; while a ``step_back`` waits,
                ``RETRY`` or ``SKIP``. Lowercase names are accepted.
            args: With RETRY, args merged into the waiting step's args first,
                to fix bad input.
            path: The path of the waiting step this decides (``state().waits``
                lists them); required when several wait (branches of a
                parallel block, elements of a map), else optional.

        Raises:
            ReactionError: the flow is not waiting (or not at ``path``, or at
                several paths and none was named), or the decision is not
                one it can take; nothing changes.
            FlowNotFound: no flow has this id.
            EngineUnavailable: the engine can't be reached.
        """
        try:
            decision = Decision(reaction=parse_reaction(reaction), args=as_args(args, "args"))
        except NotJSON as exc:
            raise ReactionError(f"flow {self.id!r}: args {exc}") from None
        except ValueError as exc:
            raise ReactionError(f"flow {self.id!r}: {exc}") from None
        state = await self.state()
        if not state.waits:
            raise ReactionError(f"flow {self.id!r} is not waiting (it is {state.status})")
        waiting = choose_wait(self.id, state.waits, path)
        await self.send_decision(
            waiting.flow_id, decision.model_copy(update={"path": waiting.path})
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r} on {self.engine}>"


class Engine(ABC):
    """Runs plans on one queue engine, for one client."""

    name: str

    @abstractmethod
    async def start(self, flow: type[Flow], input: FlowInput) -> FlowHandle:
        """Start ``flow``, compiled into ``input``, under the id ``input.root_id``.

        An engine runs the plan in ``input``; it may use the Flow class too
        (an in-process engine finds its steps there).
        """

    @abstractmethod
    def get_handle(self, flow_id: str) -> FlowHandle:
        """A handle for a flow started earlier."""

    async def flow_records(self, flow_id: str) -> FlowRecords:
        """What the last run of ``flow_id`` did, step by step (for a redrive).

        Raises:
            FlowNotFound: no flow has this id.
            ReactionError: the engine can't redrive flows.
        """
        raise ReactionError(f"the {self.name} engine can't redrive flows")

    async def restart(self, input: FlowInput) -> FlowHandle:
        """Start a new run of the flow ``input.root_id`` (whose earlier run
        has ended) from ``input``: a redrive.

        Raises:
            ReactionError: the engine can't redrive flows, or the flow runs.
        """
        raise ReactionError(f"the {self.name} engine can't redrive flows")

    async def close(self) -> None:  # noqa: B027
        """Release what the engine holds (connections, tasks)."""


class EngineHost(Protocol):
    """What an engine learns from the client that creates it (``qwit.Client``
    is one): the settings the client holds for it, and whether to trace."""

    tracing: bool
    """Whether flows are traced (OpenTelemetry)."""

    def settings(self, backend: str) -> Any:
        """The settings held for the engine named ``backend`` (None if none)."""
        ...


class Backend(Protocol):
    """What ``backend=`` names: an engine factory with a stable name."""

    @property
    def name(self) -> str:
        """The engine's name, as plans record it."""
        ...

    def create_engine(self, client: EngineHost) -> Engine:
        """A new engine for ``client`` (a ``qwit.Client``)."""
        ...
