"""Running one method of a registered step: args in, output or error info out.

Every engine runs steps through ``run_step_method``, so a step sees the same
args, context and error handling whichever engine runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import threading
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

from pydantic import ValidationError

from ._context import StepContext, reset_context, set_context
from ._errors import (
    ArgumentsError,
    FlowDefinitionError,
    StepFailure,
    error_info,
    qualified_name,
)
from ._flow import Flow, step_classes
from ._jsonargs import NotJSON, as_args
from ._options import DEFAULT_TIMEOUT_GRACE
from ._plan import StepCall
from ._step import Step, args_model, defines, is_abstract, validate_args


def _validation_message(step: str, exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(args)"
        problems.append(f"field {loc!r}: {err['msg']}")
    return f"step {step!r} got invalid args: " + "; ".join(problems)


class Refusals:
    """The steps a worker has refused (it does not serve them), so that the
    first refusal of each is logged at WARNING and later ones at DEBUG:
    beside workers of other modules a refusal is routine, and a worker whose
    log nobody reads must not fill it. At most ``limit`` are remembered; past
    that, each refusal of another step logs its line."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[Any] = set()

    def first(self, key: Any) -> bool:
        """Whether this is the first refusal of ``key`` (and remember it)."""
        if key in self._seen:
            return False
        if len(self._seen) < self.limit:
            self._seen.add(key)
        return True


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
                if is_abstract(member):
                    raise FlowDefinitionError(
                        f"{member.__qualname__} is abstract (abstract=True): register its "
                        "subclasses, not the base"
                    )
                self._add_step(member)
            else:
                raise FlowDefinitionError(
                    f"can only register Step or Flow classes or modules, not {member!r}"
                )
        return self

    def _add_step(self, cls: type[Step]) -> None:
        for method in ("step_forward", "step_back", "step_fallback"):
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
        if not isinstance(value, type) or value in (Step, Flow) or is_abstract(value):
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


class _Deadline:
    """A step attempt's own deadline, enforced where the step runs.

    At ``timeout`` an ``async`` step is cancelled (at its next ``await``) and a
    plain one sees ``context().cancelled``; either then gets ``grace`` seconds
    to stop. However it ends after its deadline, the attempt has timed out.
    The engine's own limit for the attempt is ``timeout + grace``, so the next
    attempt, or the undo, starts only once this one has ended (or, for a plain
    step that ignores ``cancelled``, once the grace is over).
    """

    def __init__(
        self,
        timeout: float | None,
        grace: float,
        attempt: int,
        keep_late: Callable[[], bool] | None = None,
    ) -> None:
        self.timeout = timeout
        self.grace = grace
        self.attempt = attempt
        self.keep_late = keep_late
        self.keep_asked = False
        """Whether ``keep_late`` said so when the cancel from outside came
        (asked again once the thread ends: both must say so)."""
        self.fired = False
        self.outside = False
        """A cancel from outside reached a plain step's attempt."""
        self.late: asyncio.Future[Any] | None = None
        """A plain step's thread that a cancel from outside waited for."""

    def error(self) -> StepFailure:
        message = f"step timed out after {self.timeout:g}s"
        return StepFailure(error_info(TimeoutError(message), attempt=self.attempt))

    async def run_async(self, awaitable: Any) -> Any:
        """Await the step's coroutine in this task, cancelling it at the deadline."""
        if self.timeout is None:
            return await awaitable
        task = asyncio.current_task()
        assert task is not None

        def fire() -> None:
            self.fired = True
            task.cancel()

        timer = asyncio.get_running_loop().call_later(self.timeout, fire)
        try:
            result = await awaitable
        except asyncio.CancelledError:
            if not self.fired or _cancelling(task) > 1:
                raise  # a cancel from outside (the flow's): pass it on
            _uncancel(task)
            raise self.error() from None
        finally:
            timer.cancel()
        if self.fired:  # it swallowed the cancel and finished late: still a timeout
            _uncancel(task)
            raise self.error()
        return result

    async def run_thread(self, method: Callable[[Any], Any], arg: Any) -> Any:
        """Run a plain step method in a thread, flagging it at the deadline.

        A thread can't be stopped: when the step is cancelled from outside,
        wait for it to end before passing the cancel on, so its ``step_back``
        never runs beside it.
        """
        ctx = contextvars.copy_context()
        future = asyncio.get_running_loop().run_in_executor(None, ctx.run, method, arg)
        try:
            done, _ = await asyncio.wait({future}, timeout=self.timeout)
            if not done:
                self.fired = True
                # Whatever it does now, the attempt has timed out; wait (a
                # while) for it to stop, so nothing else of it runs beside
                # what comes next.
                await asyncio.wait({future}, timeout=self.grace)
                # Its own ending (a result, or the error it stopped with) is
                # superseded by the timeout: read it, now or when it comes, so
                # asyncio does not log it as never retrieved.
                future.add_done_callback(_read)
                raise self.error()
            return future.result()
        except asyncio.CancelledError:
            # Cancelled from outside (the flow, or this step alone: a sibling
            # branch stopped the block): the step sees ``cancelled`` now, and
            # is waited for (through any further cancel) before it goes on.
            self.outside = True
            # (asked now: why the step was stopped can be overwritten while
            # it runs on, a flow's cancel by its worker's stop)
            self.keep_asked = self.keep_late is not None and self.keep_late()
            await _until_done(future)
            self.late = future
            raise


def _read(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _cancelling(task: asyncio.Task[Any]) -> int:
    count = getattr(task, "cancelling", None)  # Python 3.11+
    return int(count()) if count is not None else 1


def _kept(late: asyncio.Future[Any] | None, keep_late: Callable[[], bool] | None) -> bool:
    """Whether the result of a plain step's thread that ended after a cancel
    from outside is kept (see ``run_step_method``'s ``keep_late``)."""
    return (
        late is not None
        and keep_late is not None
        and late.done()
        and not late.cancelled()
        and late.exception() is None
        and keep_late()
    )


def _uncancel_all(task: asyncio.Task[Any]) -> None:
    """Take back every cancel asked of ``task`` (Python 3.11+; on 3.10, the
    one caught was the only one)."""
    for _ in range(_cancelling(task) if hasattr(task, "cancelling") else 0):
        _uncancel(task)


def _uncancel(task: asyncio.Task[Any]) -> None:
    uncancel = getattr(task, "uncancel", None)  # Python 3.11+
    if uncancel is not None:
        uncancel()


async def run_step_method(
    cls: type[Step],
    call: StepCall,
    *,
    attempt: int = 1,
    engine: str = "",
    heartbeat: Callable[[Any], None] | None = None,
    heartbeat_details: Any = None,
    is_cancelled: Callable[[], bool] | None = None,
    timeout: float | None = None,
    grace: float = DEFAULT_TIMEOUT_GRACE,
    keep_late: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Run ``call.direction`` of ``cls`` with ``call.args``; return its output.

    Args:
        timeout: The attempt's deadline in seconds (None: none here): an
            ``async`` step is cancelled then, a plain one sees
            ``context().cancelled``, and the attempt fails with a
            ``TimeoutError`` once the step has stopped or ``grace`` is over.
        keep_late: Asked when a cancel from outside stopped the attempt of a
            plain step whose thread then returned all the same: True keeps
            what it returned (its worker stops: the step's work is done, and
            would otherwise run again elsewhere), False passes the cancel on.

    Raises:
        StepFailure: the method raised (any ``BaseException`` but the
            ``CancelledError`` of a cancel), timed out, got args its model
            refused, or returned something that is not a dict, a pydantic
            model or None.
        asyncio.CancelledError: the attempt was cancelled from outside; the
            step has stopped (or, plain, ended) by then.
    """
    method_name = call.direction
    model = args_model(cls, method_name)
    arg: Any = call.args
    if model is not None:
        try:
            arg = validate_args(model, call.args)
        except ValidationError as exc:
            raise StepFailure(
                error_info(
                    ArgumentsError(_validation_message(call.step, exc)),
                    attempt=attempt,
                    started=False,
                )
            ) from None
        except Exception as exc:  # a validator of the model raised: the step's failure
            raise StepFailure(error_info(exc, attempt=attempt, started=False)) from exc
    deadline = _Deadline(timeout, grace, attempt, keep_late)
    outer_cancelled = is_cancelled or (lambda: False)
    ctx = StepContext(
        flow_id=call.flow_id,
        step=call.step,
        path=call.path,
        direction=call.direction,
        attempt=attempt,
        idempotency_key=call.idempotency_key,
        index=call.index,
        heartbeat_details=heartbeat_details,
        engine=engine,
        _heartbeat=_thread_safe(heartbeat) if heartbeat else (lambda details: None),
        _is_cancelled=lambda: deadline.fired or deadline.outside or outer_cancelled(),
    )
    token = set_context(ctx)
    try:
        method = getattr(cls(), method_name)
        if method_name == "step_fallback":  # (args, error): how the step failed
            method = functools.partial(method, error=call.error)
        if inspect.iscoroutinefunction(method) or _is_async_partial(method):
            result = await deadline.run_async(method(arg))
        else:
            result = await deadline.run_thread(method, arg)
            if inspect.isawaitable(result):
                result = await deadline.run_async(result)
    except StepFailure:
        raise
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if (
            task is not None
            and deadline.late is not None
            and deadline.keep_asked
            and _kept(deadline.late, keep_late)
        ):
            _uncancel_all(task)
            result = deadline.late.result()
        elif task is None or _cancelling(task) > 0 or outer_cancelled():
            raise  # the attempt was cancelled: pass it on
        else:
            # Raised by the step's own code (it awaited something cancelled),
            # not a cancel of the attempt: its failure. (Python 3.10 can't
            # tell them apart, and passes it on.)
            raise StepFailure(error_info(exc, attempt=attempt)) from exc
    except BaseException as exc:  # any raise is the step's failure
        if deadline.fired:
            raise deadline.error() from exc
        raise StepFailure(error_info(exc, attempt=attempt)) from exc
    finally:
        reset_context(token)
    if method_name == "step_back":
        return {}
    return normalise_output(call.step, result, attempt)


async def run_watched_step_method(
    cls: type[Step],
    call: StepCall,
    *,
    heartbeat_timeout: float | None,
    attempt: int = 1,
    heartbeat: Callable[[Any], None] | None = None,
    is_cancelled: Callable[[], bool] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """``run_step_method``, with a watchdog when ``heartbeat_timeout`` is set:
    an attempt that goes that long without ``qwit.heartbeat()`` is stopped
    (an ``async`` step cancelled, a plain one told through
    ``context().cancelled``) and fails with a retryable ``TimeoutError``, as
    on Temporal. For engines that run steps in their own process.

    Raises:
        StepFailure: as ``run_step_method``, or the attempt went quiet.
        asyncio.CancelledError: the attempt was cancelled from outside.
    """
    if heartbeat_timeout is None:
        return await run_step_method(
            cls, call, attempt=attempt, heartbeat=heartbeat, is_cancelled=is_cancelled, **options
        )
    limit = heartbeat_timeout
    starved: list[bool] = []
    loop = asyncio.get_running_loop()
    last = [loop.time()]
    outside = is_cancelled or (lambda: False)

    def beat(details: Any) -> None:
        last[0] = loop.time()  # (in the loop: run_step_method hands a thread's beats to it)
        if heartbeat is not None:
            heartbeat(details)

    running = asyncio.ensure_future(
        run_step_method(
            cls,
            call,
            attempt=attempt,
            heartbeat=beat,
            is_cancelled=lambda: bool(starved) or outside(),
            **options,
        )
    )

    grace = float(options.get("grace", DEFAULT_TIMEOUT_GRACE))

    async def watch() -> None:
        while not running.done():
            left = last[0] + limit - loop.time()
            if left <= 0:
                starved.append(True)
                running.cancel()
                # A plain step that ignores ``cancelled`` is waited for at
                # most its grace, as after its timeout.
                await asyncio.wait({running}, timeout=grace)
                return
            await asyncio.sleep(min(left, 1.0))

    watchdog = asyncio.ensure_future(watch())
    try:
        # (asyncio.wait raises CancelledError only for a cancel of this task:
        # the watchdog's cancel of the attempt is told apart on every Python)
        await asyncio.wait({running, watchdog}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # Stopped from outside (the flow, or a sibling that stopped its
        # block): the attempt is stopped once (not again by the watchdog),
        # waited for through any further cancel, and the cancel goes on: it
        # wins over the watchdog's timeout.
        watchdog.cancel()
        if not starved:
            running.cancel()
        await _until_done(running)
        task = asyncio.current_task()
        keep_late = options.get("keep_late")
        if not starved and task is not None and _kept(running, keep_late):
            _uncancel_all(task)  # (a plain step's result, kept: see run_step_method)
            return running.result()
        raise
    finally:
        watchdog.cancel()
    if starved:  # however it then ended (a swallowed cancel, a late result)
        if running.done():
            _read(running)
        else:  # a plain step still running past its grace: read it when it ends
            running.add_done_callback(_read)
        raise StepFailure(
            error_info(
                TimeoutError(f"step {call.step!r} sent no heartbeat for {limit:g}s"),
                attempt=attempt,
                retryable=True,
                with_traceback=False,
            )
        )
    return running.result()


async def _until_done(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` is done, whatever it ends with, through any
    cancel of this task (held back: the caller raises it once it is done)."""
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({future})
    _read(future)


def _is_async_partial(method: Any) -> bool:
    return isinstance(method, functools.partial) and inspect.iscoroutinefunction(method.func)


def normalise_output(step: str, result: Any, attempt: int = 1) -> dict[str, Any]:
    """A step's return value as the dict merged into later steps' args.

    Raises:
        StepFailure: not a dict, a pydantic model or None, or not JSON.
    """
    if result is None:
        return {}
    try:
        return as_args(result, "output")
    except NotJSON as exc:
        field = f" field {exc.field!r}:" if exc.field else ""
        raise StepFailure(
            error_info(
                ArgumentsError(
                    f"step {step!r} returned an output that can't be sent:{field} {exc.problem}"
                ),
                attempt=attempt,
            )
        ) from None
