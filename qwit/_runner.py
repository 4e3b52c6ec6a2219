"""Running one method of a registered step: args in, output or error info out.

Every engine runs steps through ``run_step_method``, so a step sees the same
args, context and error handling whichever engine runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import threading
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ValidationError

from ._context import StepContext, reset_context, set_context
from ._errors import ErrorInfo, FlowDefinitionError, StepError
from ._flow import Flow, step_classes
from ._jsonargs import NotJSON, as_args
from ._options import qualified_name
from ._plan import StepCall
from ._step import Step, args_model, defines


class StepFailure(Exception):
    """A step's method failed; ``info`` says how, as data that crosses engines."""

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.describe())
        self.info = info


def error_info(exc: BaseException, *, attempt: int = 1) -> ErrorInfo:
    """Describe an exception raised by a step."""
    mro = [qualified_name(c) for c in type(exc).__mro__ if c not in (BaseException, object)]
    retryable = not (isinstance(exc, StepError) and not exc.retry)
    message = exc.message if isinstance(exc, StepError) else str(exc)
    return ErrorInfo(
        type=qualified_name(type(exc)),
        types=mro,
        message=message,
        retryable=retryable,
        attempt=attempt,
    )


def _validation_message(step: str, exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(args)"
        problems.append(f"field {loc!r}: {err['msg']}")
    return f"step {step!r} got invalid args: " + "; ".join(problems)


class Registry:
    """The steps a worker (or an in-process engine) will run, by name.

    A worker only ever runs steps found here: a plan that names another step
    fails that step at once, and nothing is imported on a plan's say-so.
    """

    def __init__(self, *members: type[Step] | type[Flow] | ModuleType) -> None:
        self._steps: dict[str, type[Step]] = {}
        self.add(*members)

    def add(self, *members: type[Step] | type[Flow] | ModuleType) -> Registry:
        """Register Step classes, Flow classes (and all their steps), or
        every Step and Flow a module defines.

        Raises:
            FlowDefinitionError: two different steps share a name, or a
                member is not a Step, Flow or module.
        """
        for member in members:
            if isinstance(member, ModuleType):
                self.add(*_module_members(member))
            elif isinstance(member, type) and issubclass(member, Flow):
                for cls in step_classes(member):
                    self._add_step(cls)
            elif isinstance(member, type) and issubclass(member, Step):
                self._add_step(member)
            else:
                raise FlowDefinitionError(
                    f"can only register Step or Flow classes or modules, not {member!r}"
                )
        return self

    def _add_step(self, cls: type[Step]) -> None:
        for method in ("step_forward", "step_back"):
            try:
                args_model(cls, method)
            except TypeError as exc:
                raise FlowDefinitionError(f"step {cls.name!r}: {exc}") from None
        other = self._steps.setdefault(cls.name, cls)
        if other is not cls:
            raise FlowDefinitionError(
                f"two different steps are named {cls.name!r}: "
                f"{qualified_name(other)} and {qualified_name(cls)}"
            )

    def get(self, name: str) -> type[Step] | None:
        """The step registered under ``name``."""
        return self._steps.get(name)

    @property
    def steps(self) -> dict[str, type[Step]]:
        """Registered steps by name."""
        return dict(self._steps)

    def __len__(self) -> int:
        return len(self._steps)


def _module_members(module: ModuleType) -> Iterable[type[Step] | type[Flow]]:
    for value in list(vars(module).values()):
        if not isinstance(value, type) or value in (Step, Flow):
            continue
        is_flow = issubclass(value, Flow) and value.build_flow is not Flow.build_flow
        is_step = issubclass(value, Step) and defines(value, "step_forward")
        if is_flow or is_step:
            yield value


def _thread_safe(fn: Callable[[Any], None]) -> Callable[[Any], None]:
    """Let a plain step (run in a thread) call an engine callback of the loop."""
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    ctx = contextvars.copy_context()

    def call(details: Any) -> None:
        if threading.get_ident() == loop_thread:
            fn(details)
        else:
            loop.call_soon_threadsafe(fn, details, context=ctx)

    return call


async def _in_thread(method: Callable[[Any], Any], arg: Any) -> Any:
    """Run a plain step method in a thread.

    A thread can't be stopped: when the step is cancelled, wait for it to end
    before passing the cancel on, so its ``step_back`` never runs beside it.
    """
    ctx = contextvars.copy_context()
    future = asyncio.get_running_loop().run_in_executor(None, ctx.run, method, arg)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await future
        raise


async def run_step_method(
    cls: type[Step],
    call: StepCall,
    *,
    attempt: int = 1,
    engine: str = "",
    heartbeat: Callable[[Any], None] | None = None,
    heartbeat_details: Any = None,
    is_cancelled: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Run ``call.direction`` of ``cls`` with ``call.args``; return its output.

    Raises:
        StepFailure: the method raised, got args its model refused, or
            returned something that is not a dict, a pydantic model or None.
    """
    method_name = call.direction
    model = args_model(cls, method_name)
    arg: Any = call.args
    if model is not None:
        try:
            arg = model.model_validate(call.args)
        except ValidationError as exc:
            raise StepFailure(
                ErrorInfo(
                    type="qwit.ArgumentsError",
                    types=["qwit.ArgumentsError", "qwit.QwitError", "builtins.Exception"],
                    message=_validation_message(call.step, exc),
                    retryable=False,
                    started=False,
                    attempt=attempt,
                )
            ) from None
    ctx = StepContext(
        flow_id=call.flow_id,
        step=call.step,
        path=call.path,
        direction=call.direction,
        attempt=attempt,
        idempotency_key=call.idempotency_key,
        heartbeat_details=heartbeat_details,
        engine=engine,
        _heartbeat=_thread_safe(heartbeat) if heartbeat else (lambda details: None),
        _is_cancelled=is_cancelled or (lambda: False),
    )
    token = set_context(ctx)
    try:
        method = getattr(cls(), method_name)
        if inspect.iscoroutinefunction(method):
            result = await method(arg)
        else:
            result = await _in_thread(method, arg)
            if inspect.isawaitable(result):
                result = await result
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise StepFailure(error_info(exc, attempt=attempt)) from exc
    finally:
        reset_context(token)
    if method_name == "step_back":
        return {}
    return normalise_output(call.step, result, attempt)


def normalise_output(step: str, result: Any, attempt: int = 1) -> dict[str, Any]:
    """A step's return value as the dict merged into later steps' args.

    Raises:
        StepFailure: not a dict, a pydantic model or None, or not JSON.
    """
    if result is None:
        return {}
    if isinstance(result, BaseModel):
        return as_args(result, "output")
    try:
        return as_args(result, "output")
    except NotJSON as exc:
        field = f" field {exc.field!r}:" if exc.field else ""
        raise StepFailure(
            ErrorInfo(
                type="qwit.ArgumentsError",
                types=["qwit.ArgumentsError", "qwit.QwitError", "builtins.Exception"],
                message=f"step {step!r} returned an output that can't be sent:"
                f"{field} {exc.problem}",
                retryable=False,
                attempt=attempt,
            )
        ) from None
