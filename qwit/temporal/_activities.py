"""Activities that run registered steps on a Temporal worker."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from temporalio import activity
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.common import RawValue
from temporalio.exceptions import ApplicationError

from .._errors import ErrorInfo
from .._jsonargs import json_size
from .._plan import StepCall, StepReturn
from .._runner import Registry, StepFailure, run_step_method
from .._step import Step, defines

DIRECTIONS = ("step_forward", "step_back")
#: Temporal's default ``limit.blobSize.error``, for servers that don't say.
DEFAULT_PAYLOAD_LIMIT = 2 * 1024 * 1024
#: Room kept under a payload limit for what the data converter adds.
PAYLOAD_MARGIN = 1024


def activity_name(step: str, direction: str) -> str:
    """The Temporal activity type of one direction of a step."""
    return f"{step}.{direction}"


def _application_error(info: ErrorInfo) -> ApplicationError:
    return ApplicationError(
        info.describe(),
        info.model_dump(mode="json"),
        type=info.type,
        non_retryable=not info.retryable,
    )


def _first_detail(details: Sequence[Any]) -> Any:
    return details[0] if details else None


_payload_limits: dict[tuple[str, str], int] = {}


async def _payload_limit() -> int:
    """The namespace's payload limit, asked of its server once per process."""
    client = activity.client()
    namespace = activity.info().namespace
    key = (client.service_client.config.target_host, namespace)
    if key not in _payload_limits:
        described = await client.workflow_service.describe_namespace(
            DescribeNamespaceRequest(namespace=namespace)
        )
        _payload_limits[key] = (
            described.namespace_info.limits.blob_size_limit_error or DEFAULT_PAYLOAD_LIMIT
        )
    return _payload_limits[key]


async def _check_undo_fits(call: StepCall, output: dict[str, Any]) -> None:
    """Fail a step whose output, with its args, would be too big to undo it.

    ``step_back`` gets the step's args plus its output, in one payload. Failing
    now (the step is then undone with its args alone, which fit) beats a
    rollback that could never send the undo.
    """
    limit = await _payload_limit()
    args_size = json_size(call.model_dump(mode="json"))
    output_size = json_size(output)
    if args_size + output_size > limit - PAYLOAD_MARGIN:
        raise _application_error(
            ErrorInfo(
                type="qwit.PayloadTooLarge",
                types=["qwit.PayloadTooLarge", "qwit.QwitError", "builtins.Exception"],
                message=(
                    f"step {call.step!r} returned {output_size} bytes; with its args "
                    f"({args_size} bytes) its undo would not fit the {limit}-byte payload "
                    "limit: return references (ids, URLs) instead of large values"
                ),
                retryable=False,
                attempt=activity.info().attempt,
            )
        )


def step_activity(cls: type[Step], direction: str) -> Callable[[StepCall], Any]:
    """The activity that runs ``direction`` of the registered step ``cls``."""

    has_back = defines(cls, "step_back")

    async def run(call: StepCall) -> StepReturn:
        info = activity.info()
        if call.step != cls.name or call.direction != direction:
            raise _application_error(
                ErrorInfo(
                    type="qwit.StepNotRegistered",
                    message=f"activity {info.activity_type!r} got a call for "
                    f"{call.step}.{call.direction}",
                    retryable=False,
                    started=False,
                )
            )
        try:
            output = await run_step_method(
                cls,
                call,
                attempt=info.attempt,
                engine="temporal",
                heartbeat=activity.heartbeat,
                heartbeat_details=_first_detail(info.heartbeat_details),
                is_cancelled=activity.is_cancelled,
            )
        except StepFailure as failure:
            raise _application_error(failure.info) from None
        if output and has_back:
            await _check_undo_fits(call, output)
        return StepReturn(output=output, attempt=info.attempt)

    run.__name__ = run.__qualname__ = f"{cls.__name__}_{direction}"
    return activity.defn(name=activity_name(cls.name, direction))(run)


@activity.defn(dynamic=True)
async def unregistered_step(args: Sequence[RawValue]) -> NoReturn:
    """Fails at once any activity this worker has no step for.

    Without it, Temporal would retry the unknown activity until its timeout;
    with it, the flow learns promptly which step is missing, and where.
    """
    del args
    info = activity.info()
    step, _, direction = info.activity_type.rpartition(".")
    if direction not in DIRECTIONS:
        step = info.activity_type
    raise _application_error(
        ErrorInfo(
            type="qwit.StepNotRegistered",
            types=["qwit.StepNotRegistered", "qwit.QwitError", "builtins.Exception"],
            message=(
                f"step {step!r} is not registered on the workers of task queue "
                f"{info.task_queue!r}: start a worker for the module that defines it "
                "(qwit-worker MODULE)"
            ),
            retryable=False,
            started=False,
            attempt=info.attempt,
        )
    )


def step_activities(registry: Registry) -> list[Callable[..., Any]]:
    """Activities for every registered step, both directions."""
    return [
        step_activity(cls, direction) for cls in registry.steps.values() for direction in DIRECTIONS
    ]
