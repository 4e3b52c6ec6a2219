"""Activities that run registered steps on a Temporal worker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from temporalio import activity
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.common import RawValue
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from .._errors import ErrorInfo, PayloadTooLarge, StepFailure, StepNotRegistered, error_info
from .._jsonargs import json_size
from .._plan import DEFAULT_PAYLOAD_LIMIT, PAYLOAD_MARGIN, StepCall, WireCall, wire_return
from .._runner import Refusals, Registry, run_watched_step_method
from .._step import Step, defines

DIRECTIONS = ("step_forward", "step_back", "step_fallback")
#: A step that has run this long heartbeats for itself, and again as often, so
#: that a cancel reaches it even if it never calls ``qwit.heartbeat()``
#: (Temporal tells an activity of a cancel only in a heartbeat's response).
AUTO_HEARTBEAT_EVERY = 1.0


def activity_name(step: str, direction: str) -> str:
    """The Temporal activity type of one direction of a step."""
    return f"{step}.{direction}"


log = logging.getLogger("qwit.step")


def _expected(info: ErrorInfo) -> bool:
    """A ``StepError(retry=False)``: an outcome the step chose, not a fault."""
    return info.type == "qwit.StepError" and not info.retryable


def _application_error(
    info: ErrorInfo, benign: bool = False, path: str | None = None
) -> ApplicationError:
    # The step's path, after the error, tells which step a retried
    # activity's last failure is of (``state()`` shows the attempts of
    # steps being retried; steps of one name may run side by side).
    where = ({"path": path},) if path is not None else ()
    return ApplicationError(
        info.describe(),
        info.model_dump(mode="json"),
        *where,
        type=info.type,
        non_retryable=not info.retryable,
        # The SDK logs a benign failure at DEBUG (with its traceback), others
        # at WARNING: an expected outcome is one INFO line of ours instead.
        category=(
            ApplicationErrorCategory.BENIGN
            if benign or _expected(info)
            else ApplicationErrorCategory.UNSPECIFIED
        ),
    )


#: Frames of a step's traceback that travel with its failure (the innermost).
MAX_FRAMES = 40


def _traceable(exc: BaseException | None) -> BaseException | None:
    """A stand-in for ``exc`` that Temporal can carry as a failure's cause: its
    class's qualified name, its message (bounded) and its innermost frames, so
    the step's own frames reach the history and the log, and no message or
    recursion makes the failure too big to send."""
    if exc is None:
        return None
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    info = error_info(exc, with_traceback=False)
    cause = ApplicationError(info.message, type=info.type, non_retryable=not info.retryable)
    return cause.with_traceback(frames[max(len(frames) - MAX_FRAMES, 0)] if frames else None)


def _failed(failure: StepFailure, call: StepCall) -> ApplicationError:
    """The activity's error for a failed step, its cause the step's own error."""
    info = failure.info
    if _expected(info):
        log.info(
            "step %s (%s) of flow %s failed: %s (not retried)",
            call.step,
            call.direction,
            call.flow_id,
            info.describe(),
        )
    error = _application_error(info, path=call.path)
    error.__cause__ = _traceable(failure.__cause__)
    return error


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


async def _check_output_fits(call: StepCall, output: dict[str, Any], undone: bool) -> None:
    """Fail a step whose output is too big to return, or to undo it with.

    The output alone must fit one payload, or the worker could not report it
    (the same on every attempt: the failure is final). An output that
    ``step_back`` will get must fit with the step's args, in one payload:
    failing now (the step is then undone with its args alone, which fit)
    beats a rollback that could never send the undo.
    """
    limit = await _payload_limit()
    output_size = json_size(output)
    if output_size > limit - PAYLOAD_MARGIN:
        problem = f"returned {output_size} bytes, over the {limit}-byte payload limit"
    elif undone:
        args_size = json_size(call.args)
        if args_size + output_size <= limit - PAYLOAD_MARGIN:
            return
        problem = (
            f"returned {output_size} bytes; with its args ({args_size} bytes) its undo "
            f"would not fit the {limit}-byte payload limit"
        )
    else:
        return
    raise _application_error(
        error_info(
            PayloadTooLarge(
                f"step {call.step!r} {problem}: return references (ids, URLs) instead of "
                "large values"
            ),
            attempt=activity.info().attempt,
        )
    )


class _Heartbeats:
    """A step's heartbeats: its own, and QWIT's while it runs.

    QWIT's repeat the details the step last gave (or those of the attempt
    before, until it gives any), since Temporal keeps only the last.
    """

    def __init__(self, details: Sequence[Any], every: float = AUTO_HEARTBEAT_EVERY) -> None:
        self.last: tuple[Any, ...] = tuple(details[:1])
        self.timer: asyncio.TimerHandle | None = None
        self.every = every

    def beat(self, details: Any) -> None:
        self.last = (details,)
        activity.heartbeat(details)

    def keep_alive(self) -> None:
        """Heartbeat every ``every`` seconds until ``stop`` (a timer, not a
        task: most steps end before the first beat)."""
        self.timer = asyncio.get_running_loop().call_later(self.every, self._auto)

    def _auto(self) -> None:
        activity.heartbeat(*self.last)
        self.keep_alive()

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()


def _grace(call: StepCall) -> float:
    """The grace the workflow gave this attempt: its limit past ``call.timeout``."""
    limit = activity.info().start_to_close_timeout
    if call.timeout is None or limit is None:
        return 0.0
    return max(limit.total_seconds() - call.timeout, 0.0)


def step_activity(cls: type[Step], direction: str) -> Callable[[WireCall], Any]:
    """The activity that runs ``direction`` of the registered step ``cls``."""

    has_back = defines(cls, "step_back")

    async def run(sent: WireCall) -> list[Any]:
        info = activity.info()
        limit = info.start_to_close_timeout
        call = sent.call(
            flow_id=info.workflow_id or "",
            step=cls.name,
            direction=direction,
            limit=limit.total_seconds() if limit else None,
        )
        if call.step != cls.name or call.direction != direction:
            raise _application_error(
                error_info(
                    StepNotRegistered(
                        f"activity {info.activity_type!r} got a call for "
                        f"{call.step}.{call.direction}"
                    ),
                    started=False,
                )
            )
        # The step's own heartbeat_timeout: this worker stops an attempt that
        # goes that long without qwit.heartbeat(). QWIT's beats, more often,
        # keep Temporal's from firing while the worker lives (and until the
        # attempt has stopped): Temporal's then only notices a dead worker.
        quiet = info.heartbeat_timeout.total_seconds() if info.heartbeat_timeout else None
        every = AUTO_HEARTBEAT_EVERY if quiet is None else min(AUTO_HEARTBEAT_EVERY, quiet / 4)
        beats = _Heartbeats(info.heartbeat_details, every)
        # A local activity can't heartbeat: its own worker tells it of a cancel.
        if not info.is_local:
            beats.keep_alive()
        try:
            output = await run_watched_step_method(
                cls,
                call,
                heartbeat_timeout=quiet,
                attempt=info.attempt,
                engine="temporal",
                heartbeat=beats.beat,
                heartbeat_details=_first_detail(info.heartbeat_details),
                is_cancelled=activity.is_cancelled,
                timeout=call.timeout,
                grace=_grace(call),
            )
        except StepFailure as failure:
            error = _failed(failure, call)
            raise error from error.__cause__
        finally:
            beats.stop()
        if output:
            # (the output of step_forward or step_fallback is what step_back gets)
            await _check_output_fits(call, output, undone=has_back and direction != "step_back")
        # A ``StepReturn`` as it is written (``output`` is normalised already),
        # without building the model on every step of every worker.
        return wire_return(output, info.attempt)

    run.__name__ = run.__qualname__ = f"{cls.__name__}_{direction}"
    return activity.defn(name=activity_name(cls.name, direction))(run)


#: At most this many refused steps are remembered (see ``Refusals``).
MAX_REFUSED_LOGGED = 1000
#: Steps this worker has said it does not serve, by task queue (logged once).
_REFUSED = Refusals(MAX_REFUSED_LOGGED)


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
    # Beside workers of other modules on the same queue this is routine (the
    # flow offers the step again), so one WARNING line per step, not a
    # traceback per offer: a worker whose log nobody reads must not fill it.
    if _REFUSED.first((info.task_queue, step)):
        log.warning(
            "step %r is not served by this worker (task queue %r): the flow offers "
            "it again to the queue's other workers",
            step,
            info.task_queue,
        )
    else:
        log.debug("step %r refused again (flow %s)", step, info.workflow_id)
    raise _application_error(
        error_info(
            StepNotRegistered(
                f"step {step!r} is not registered on the workers of task queue "
                f"{info.task_queue!r}: start a worker for the module that defines it "
                "(qwit-worker MODULE)"
            ),
            started=False,
            attempt=info.attempt,
        ),
        benign=True,
    )


def step_activities(registry: Registry) -> list[Callable[..., Any]]:
    """Activities for every registered step, both directions."""
    return [
        step_activity(cls, direction)
        for cls in registry.steps.values()
        for direction in DIRECTIONS
        if direction != "step_fallback" or defines(cls, "step_fallback")
    ]
