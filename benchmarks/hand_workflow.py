"""The hand-written saga, written the way Temporal's Python samples write one:
a list of compensations, run in reverse in ``except``.

Its activities get only what they need (the step's index and the payload
size), and it uses the same timeouts and retry policies as QWIT's defaults.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

WORKFLOW_NAME = "bench.Saga"

TIMEOUT = timedelta(seconds=300)
FORWARD_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=60),
    maximum_attempts=3,
)
BACK_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=120),
    maximum_attempts=25,
)


@dataclass
class SagaInput:
    steps: int
    size: int = 0
    fail_last: bool = False
    local: bool = False


@workflow.defn(name=WORKFLOW_NAME)
class Saga:
    @workflow.run
    async def run(self, input: SagaInput) -> dict[str, Any]:
        results: dict[str, Any] = {}
        compensations: list[dict[str, Any]] = []
        try:
            for i in range(1, input.steps + 1):
                name = "fail" if input.fail_last and i == input.steps else "work"
                output = await self._call(
                    f"{name}.step_forward", {"i": i, "size": input.size}, input.local, FORWARD_RETRY
                )
                # Registered after success: the failing step has nothing to undo,
                # as QWIT's Fail step has no step_back.
                compensations.append({"i": i, **output})
                results.update(output)
        # A failed local activity arrives as a bare ApplicationError.
        except (ActivityError, ApplicationError) as err:
            for args in reversed(compensations):
                await self._call("work.step_back", args, input.local, BACK_RETRY)
            raise ApplicationError(
                f"rolled back: {err}", type="SagaRolledBack", non_retryable=True
            ) from err
        return results

    @staticmethod
    async def _call(
        activity: str, args: dict[str, Any], local: bool, retry: RetryPolicy
    ) -> dict[str, Any]:
        if local:
            result: dict[str, Any] | None = await workflow.execute_local_activity(
                activity,
                args,
                result_type=dict,
                start_to_close_timeout=TIMEOUT,
                retry_policy=retry,
            )
        else:
            result = await workflow.execute_activity(
                activity,
                args,
                result_type=dict,
                start_to_close_timeout=TIMEOUT,
                retry_policy=retry,
            )
        return result or {}


PARALLEL_WORKFLOW = "bench.Parallel"


@dataclass
class ParallelInput:
    count: int
    concurrency: int | None
    fail: int | None


@workflow.defn(name=PARALLEL_WORKFLOW)
class Parallel:
    """``count`` activities side by side (at most ``concurrency`` at once);
    on a failure, the others cancelled and awaited, then the completed ones
    undone side by side."""

    @workflow.run
    async def run(self, input: ParallelInput) -> dict[str, Any]:
        gate = asyncio.Semaphore(input.concurrency or input.count)
        completed: list[int] = []

        async def forward(i: int) -> dict[str, Any]:
            async with gate:
                result: dict[str, Any] = await workflow.execute_activity(
                    "item.step_forward",
                    {"i": i, "fail": i == input.fail},
                    result_type=dict,
                    start_to_close_timeout=TIMEOUT,
                    retry_policy=FORWARD_RETRY,
                    cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                )
                completed.append(i)
                return result

        async def back(i: int) -> None:
            async with gate:
                await workflow.execute_activity(
                    "item.step_back",
                    {"i": i},
                    start_to_close_timeout=TIMEOUT,
                    retry_policy=BACK_RETRY,
                )

        tasks = [asyncio.ensure_future(forward(i)) for i in range(input.count)]
        try:
            results = await asyncio.gather(*tasks)
        except ActivityError as err:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # As QWIT's ROLLBACK does, the failed item is undone too: it may
            # have done something before it failed.
            failed = [input.fail] if input.fail is not None else []
            await asyncio.gather(*(back(i) for i in completed + failed))
            raise ApplicationError(
                f"rolled back: {err}", type="SagaRolledBack", non_retryable=True
            ) from err
        return {"out": results}
