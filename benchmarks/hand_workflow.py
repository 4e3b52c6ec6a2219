"""The hand-written saga, written the way Temporal's Python samples write one:
a list of compensations, run in reverse in ``except``.

Its activities get only what they need (the step's index and the payload
size), and it uses the same timeouts and retry policies as QWIT's defaults.
"""

from __future__ import annotations

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
