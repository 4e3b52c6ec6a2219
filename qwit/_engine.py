"""The engine interface: what a queue engine implements to run QWIT flows.

An engine is small. It starts a compiled plan, finds a flow by id, and gives
a ``FlowHandle`` for it. To run the plan it drives ``qwit.engine.Interpreter``
(the saga rules, shared by every engine) with a ``FlowRuntime`` of its own:
how one step runs, how a sub-flow runs, how the flow waits for a signal.

A *backend* is what ``Flow``'s ``backend=`` names: any object with a ``name``
and a ``create_engine(client)`` method. The modules ``qwit.temporal`` and
``qwit.local`` are backends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Protocol

from ._options import Reaction
from ._plan import FlowInput
from ._state import FlowState

if TYPE_CHECKING:
    from ._client import Client


class FlowHandle(ABC):
    """A flow that was started: wait for it, watch it, steer it.

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
        """

    @abstractmethod
    async def cancel(self) -> None:
        """Ask the flow to stop; it rolls back the step in flight and every
        completed step, then ends with FlowCancelled."""

    @abstractmethod
    async def state(self) -> FlowState:
        """The flow's progress: status, and each step's status and attempts."""

    @abstractmethod
    async def react(self, reaction: Reaction | str, args: dict[str, Any] | None = None) -> None:
        """Decide for a flow that is waiting (a step with ``on_failure=WAIT``).

        Args:
            reaction: ``RETRY`` (run the step again), ``SKIP``, ``SKIPBACK``,
                ``ROLLBACK`` or ``ABORT``; while a ``step_back`` waits,
                ``RETRY`` or ``SKIP``.
            args: With RETRY, args merged into the flow's args first, to fix
                bad input.

        Raises:
            ReactionError: the flow is not waiting, or the decision is not
                one it can take; nothing changes.
        """

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r} on {self.engine}>"


class Engine(ABC):
    """Runs plans on one queue engine, for one client."""

    name: str

    @abstractmethod
    async def start(self, input: FlowInput) -> FlowHandle:
        """Start the flow ``input`` describes, under the id ``input.root_id``."""

    @abstractmethod
    def get_handle(self, flow_id: str) -> FlowHandle:
        """A handle for a flow started earlier."""

    async def close(self) -> None:  # noqa: B027
        """Release what the engine holds (connections, tasks)."""


class Backend(Protocol):
    """What ``backend=`` names: an engine factory with a stable name."""

    @property
    def name(self) -> str:
        """The engine's name, as plans record it."""
        ...

    def create_engine(self, client: Client) -> Engine:
        """A new engine for ``client``."""
        ...
