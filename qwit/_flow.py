"""``qwit.Flow``: steps in order, and their compilation into a plan."""

from __future__ import annotations

import contextlib
import os
import types
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._errors import FlowDefinitionError
from ._jsonargs import NotJSON, as_args
from ._options import (
    BACK_FAILURE_REACTIONS,
    DEFAULT_BACK_RETRY,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_RETRY,
    DEFAULT_SHARD_SIZE,
    DEFAULT_TIMEOUT,
    DEFAULT_TIMEOUT_GRACE,
    FALLBACK,
    MAX_CONCURRENCY,
    SHARD_SIZE_ENV,
    STEP_OPTIONS,
    FailurePolicy,
    OnFailure,
    Retry,
    out_of_bounds,
    parse_on_failure,
    parse_reaction,
    parse_seconds,
)
from ._plan import FlowNode, MapNode, Node, ParallelNode, StepNode, Unit
from ._step import Step, _own_name, args_model, defines, is_abstract, mark_abstract, model_fields


class Flow:
    """A business process: steps run in order, undone newest first on failure.

    Subclass it and define ``build_flow``, calling ``self.step(...)`` once per
    step. A Flow may be used as a step of another Flow (a sub-flow).

    Class keywords:
        name: The flow's stable name (default: the class name).
        backend: The engine that runs the flow (default: ``qwit.temporal``).

    Example:
        >>> class Order(qwit.Flow):
        ...     def build_flow(self) -> None:
        ...         self.step(Reserve, {"sku": "A-1"})
        ...         self.step(Charge)
    """

    name: ClassVar[str] = "Flow"
    backend: ClassVar[Any] = None
    on_failure: ClassVar[OnFailure | None] = None

    def __init_subclass__(
        cls,
        *,
        name: str | None = None,
        backend: Any = None,
        abstract: bool = False,
        **kwargs: Any,
    ):
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("name")
        cls.name = _own_name(cls, name if name is not None else declared)
        if backend is not None:
            cls.backend = backend
        mark_abstract(cls, abstract)

    def __init__(self) -> None:
        self._entries: list[_Entry] = []
        self._block: _ParallelEntry | None = None
        self._finals: list[tuple[Any, Any, dict[str, Any]]] = []

    def build_flow(self) -> None:
        """Declare the steps, in order, with ``self.step(...)``."""
        raise NotImplementedError

    def step(
        self, step: type[Step] | type[Flow], /, static_args: Any = None, **options: Any
    ) -> None:
        """Add a step (or a sub-flow) to this flow.

        Args:
            step: A Step or Flow class.
            static_args: Args for this step only (a sub-flow's are seen by all
                its steps); they override the flow's args of the same name.
            **options: Step options for this use: ``retry``, ``back_retry``,
                ``timeout``, ``back_timeout``, ``timeout_grace``, ``heartbeat_timeout``,
                ``on_failure``,
                ``back_on_failure``, ``local``. A sub-flow takes only
                ``on_failure`` and ``retry``: a ``qwit.Retry`` under which a
                sub-flow that failed (and undid itself) runs again from its
                start, with fresh idempotency keys, before its ``on_failure``
                applies (a retried segment; default: one attempt).
        """
        if getattr(self, "_finals", None):
            raise FlowDefinitionError(
                f"flow {self.name!r}: final steps come last; {_label(step)} is added after "
                "finally_step(...)"
            )
        block = getattr(self, "_block", None)
        (self._entries if block is None else block.entries).append((step, static_args, options))

    def finally_step(self, step: type[Step], static_args: Any = None, /, **options: Any) -> None:
        """Add a final step: it runs once the flow has ended, whatever the
        outcome (after any rollback), and is never undone.

        Its args are the flow's final args (its static args on top), plus
        ``qwit_outcome`` (``completed``, ``rolled_back``, ``aborted``,
        ``cancelled`` or ``compensation_failed``) and, when the flow failed,
        ``qwit_failure`` (``step``, ``reason``, ``compensated``,
        ``failed_compensations``). Its failure, once its retries are spent,
        is reported in ``state()`` and on the flow's error
        (``FlowFailed.final_failures``), and does not change the outcome;
        its ``on_failure`` is not used. Final steps run in the order added,
        after every ``self.step(...)``.

        Args:
            step: A Step class (not a Flow).
            static_args: Args for this step only.
            **options: Step options: ``retry``, ``timeout``,
                ``timeout_grace``, ``heartbeat_timeout``, ``local``.
        """
        if getattr(self, "_block", None) is not None:
            raise FlowDefinitionError(
                f"flow {self.name!r}: a final step can't be inside a parallel block"
            )
        self._finals.append((step, static_args, options))

    @contextlib.contextmanager
    def parallel(self) -> Iterator[None]:
        """A parallel block: each ``self.step(...)`` inside it is a branch.

        The branches run side by side, each with the args as they were when
        the block started (plus its own static args); once all have ended,
        their outputs are merged into the args in plan order. On a failure
        that rolls back, the branches still running are cancelled, and what
        completed is undone in reverse dependency order: the branches side by
        side, after what ran after the block and before what ran before it.

        Example:
            >>> with self.parallel():
            ...     self.step(Charge)
            ...     self.step(ShipFlow)  # a sub-flow branch runs its steps in order
        """
        if getattr(self, "_block", None) is not None:
            raise FlowDefinitionError(
                f"flow {self.name!r}: a parallel block can't hold another; put the inner "
                "one in a sub-flow and use that as a branch"
            )
        block = _ParallelEntry()
        self._entries.append(block)
        self._block = block
        try:
            yield
        finally:
            self._block = None

    def map(
        self,
        step: type[Step] | type[Flow],
        /,
        static_args: Any = None,
        *,
        over: str,
        item: str,
        into: str,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        **options: Any,
    ) -> None:
        """Run a step (or sub-flow) once per element of the list ``args[over]``.

        Each element runs with the map's starting args, without ``over``,
        plus the element as ``args[item]`` (and the static args); at most
        ``max_concurrency`` run at once. Their outputs are collected, in
        element order, into ``args[into]`` as a list (an element that was
        skipped: None). An empty list is fine; a missing or non-list
        ``args[over]`` fails the map step.

        Args:
            step: A Step or Flow class.
            static_args: Args for every element.
            over: The arg that holds the list.
            item: The arg each element gets its element as.
            into: The arg the outputs are collected into.
            max_concurrency: Most elements run (or undone) at once.
            **options: Step options for each element, as for ``step``.
        """
        if getattr(self, "_block", None) is not None:
            raise FlowDefinitionError(
                f"flow {self.name!r}: a map can't be a branch of a parallel block; put it in "
                "a sub-flow and use that as a branch"
            )
        self._entries.append(
            _MapEntry(step, static_args, options, over, item, into, max_concurrency)
        )


@dataclass
class _ParallelEntry:
    entries: list[tuple[Any, Any, dict[str, Any]]] = field(default_factory=list)


@dataclass
class _MapEntry:
    target: Any
    static_args: Any
    options: dict[str, Any]
    over: Any
    item: Any
    into: Any
    max_concurrency: Any


_Entry = tuple[Any, Any, dict[str, Any]] | _ParallelEntry | _MapEntry


def _backend_name(backend: Any, where: str) -> str | None:
    if backend is None:
        return None
    name = getattr(backend, "name", None)
    if isinstance(name, str) and name:
        return name
    raise FlowDefinitionError(f"{where}: backend= must be a qwit engine, not {backend!r}")


def _option(cls: type, options: dict[str, Any], key: str) -> Any:
    if key in options:
        return options[key]
    return getattr(cls, key, None)


class _Compiler:
    def __init__(self) -> None:
        self.names: dict[str, type] = {}
        #: Every Flow class it compiled (the root and its sub-flows).
        self.flows: list[type[Flow]] = []
        self.stack: list[type[Flow]] = []

    def flow(self, cls: type[Flow], static_args: dict[str, Any], on_failure: Any) -> FlowNode:
        if cls in self.stack:
            cycle = " -> ".join(c.name for c in [*self.stack, cls])
            raise FlowDefinitionError(f"flow {cls.name!r} contains itself: {cycle}")
        self.stack.append(cls)
        if cls not in self.flows:
            self.flows.append(cls)
        try:
            instance = cls()
            try:
                instance.build_flow()
            except FlowDefinitionError:
                raise
            except NotImplementedError:
                raise FlowDefinitionError(
                    f"flow {cls.name!r} does not define build_flow()"
                ) from None
            except Exception as exc:
                raise FlowDefinitionError(
                    f"flow {cls.name!r}: build_flow() raised {type(exc).__name__}: {exc}"
                ) from exc
            entries = getattr(instance, "_entries", None)
            if entries is None:
                raise FlowDefinitionError(
                    f"flow {cls.name!r}: __init__ must call super().__init__()"
                )
            if not entries:
                raise FlowDefinitionError(
                    f"flow {cls.name!r} has no steps: build_flow() must call self.step(...)"
                )
            nodes = [self.any_entry(cls, i, entry) for i, entry in enumerate(entries)]
            finals = [
                self.final(cls, len(entries) + i, entry)
                for i, entry in enumerate(getattr(instance, "_finals", []))
            ]
        finally:
            self.stack.pop()
        try:
            policy = parse_on_failure(on_failure) if on_failure is not None else FailurePolicy()
        except ValueError as exc:
            raise FlowDefinitionError(f"flow {cls.name!r}, option on_failure: {exc}") from None
        if FALLBACK in policy.reactions():
            raise FlowDefinitionError(
                f"flow {cls.name!r}, option on_failure: a sub-flow has no step_fallback to "
                "fall back on (FALLBACK is for steps)"
            )
        return FlowNode(
            name=cls.name,
            static_args=static_args,
            steps=tuple(nodes),
            finally_steps=tuple(finals),
            on_failure=policy,
            backend=_backend_name(cls.backend, f"flow {cls.name!r}"),
        )

    def final(
        self, parent: type[Flow], index: int, entry: tuple[Any, Any, dict[str, Any]]
    ) -> StepNode:
        target, raw_args, options = entry
        position = f"step {index + 1} (final)"
        if isinstance(target, type) and issubclass(target, Flow):
            raise FlowDefinitionError(
                f"flow {parent.name!r}, {position}: a final step is a Step, not a Flow "
                f"({target.name!r})"
            )
        misplaced = sorted(set(options) & {"on_failure", "back_on_failure", "back_retry"})
        if misplaced:
            raise FlowDefinitionError(
                f"flow {parent.name!r}, {position}: option(s) {', '.join(misplaced)} do not "
                "apply to a final step (it is never undone, and its failure changes nothing)"
            )
        node = self.entry(parent, position, target, raw_args, options)
        assert isinstance(node, StepNode)
        return node

    def any_entry(self, parent: type[Flow], index: int, entry: _Entry) -> Node:
        if isinstance(entry, _ParallelEntry):
            return self.parallel(parent, index, entry)
        if isinstance(entry, _MapEntry):
            return self.map(parent, index, entry)
        return self.entry(parent, f"step {index + 1}", *entry)

    def parallel(self, parent: type[Flow], index: int, block: _ParallelEntry) -> ParallelNode:
        where = f"flow {parent.name!r}, step {index + 1} (parallel block)"
        if not block.entries:
            raise FlowDefinitionError(f"{where} has no branches: call self.step(...) inside it")
        branches = [
            self.entry(parent, f"step {index + 1}.{i + 1} (a branch)", *entry)
            for i, entry in enumerate(block.entries)
        ]
        # (branches whose outputs share a key fail the block when it ends,
        # typed or not: the contract's ROLLBACK naming the key)
        return ParallelNode(branches=tuple(branches))

    def map(self, parent: type[Flow], index: int, entry: _MapEntry) -> MapNode:
        where = f"flow {parent.name!r}, step {index + 1} (map)"
        for option in ("over", "item", "into"):
            value = getattr(entry, option)
            if not isinstance(value, str) or not value:
                raise FlowDefinitionError(
                    f"{where}: {option}= must be the name of an arg, not {value!r}"
                )
        limit = entry.max_concurrency
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise FlowDefinitionError(
                f"{where}: max_concurrency must be a whole number >= 1, not {limit!r}"
            )
        if limit > MAX_CONCURRENCY:
            raise FlowDefinitionError(
                f"{where}: max_concurrency is at most {MAX_CONCURRENCY} (Temporal holds at most "
                f"2,000 activities or sub-flows in flight per workflow), not {limit}"
            )
        node = self.entry(
            parent, f"step {index + 1} (map)", entry.target, entry.static_args, entry.options
        )
        return MapNode(
            shard_size=_shard_size(where),
            name=node.name,
            over=entry.over,
            item=entry.item,
            into=entry.into,
            max_concurrency=limit,
            node=node,
        )

    def entry(
        self, parent: type[Flow], position: str, target: Any, raw_args: Any, options: dict[str, Any]
    ) -> Unit:
        where = f"flow {parent.name!r}, {position}"
        if not (isinstance(target, type) and issubclass(target, (Step, Flow))):
            raise FlowDefinitionError(
                f"{where}: expected a qwit.Step or qwit.Flow class, got {target!r}"
            )
        where = f"flow {parent.name!r}, {position} ({target.name!r})"
        if is_abstract(target):
            raise FlowDefinitionError(
                f"{where}: {target.__qualname__} is abstract (abstract=True), a base for "
                "other steps and flows: use one of its subclasses"
            )
        try:
            static_args = as_args(raw_args, "static args")
        except NotJSON as exc:
            field = f" field {exc.field!r}:" if exc.field else ""
            raise FlowDefinitionError(f"{where}, static args:{field} {exc.problem}") from None
        unknown = sorted(set(options) - set(STEP_OPTIONS))
        if unknown:
            raise FlowDefinitionError(
                f"{where}: unknown option(s) {', '.join(unknown)} "
                f"(expected: {', '.join(STEP_OPTIONS)})"
            )
        if issubclass(target, Flow):
            misplaced = sorted(set(options) - {"on_failure", "retry"})
            if misplaced:
                raise FlowDefinitionError(
                    f"{where}: option(s) {', '.join(misplaced)} apply to steps, not to a sub-flow"
                )
            retry = _option(target, options, "retry")
            try:
                retry = None if retry is None else _retry(retry, "retry")
            except ValueError as exc:
                raise FlowDefinitionError(f"{where}: {exc}") from None
            node = self.flow(target, static_args, _option(target, options, "on_failure"))
            return node if retry is None else node.model_copy(update={"retry": retry})
        return self.step(target, static_args, options, where)

    def step(
        self, cls: type[Step], static_args: dict[str, Any], options: dict[str, Any], where: str
    ) -> StepNode:
        other = self.names.setdefault(cls.name, cls)
        if other is not cls:
            raise FlowDefinitionError(
                f"{where}: two different steps are named {cls.name!r}: "
                f"{other.__module__}.{other.__qualname__} and {cls.__module__}.{cls.__qualname__}"
                " (give one an explicit name=)"
            )
        if not defines(cls, "step_forward"):
            raise FlowDefinitionError(f"{where}: step {cls.name!r} does not define step_forward")
        try:
            fields = _fields(cls, "step_forward")
            back_fields = _fields(cls, "step_back")
            _fields(cls, "step_fallback")  # (its model must resolve too)
        except TypeError as exc:
            raise FlowDefinitionError(f"{where}: {exc}") from None

        def get(key: str, default: Any) -> Any:
            value = _option(cls, options, key)
            return default if value is None else value

        try:
            retry = _retry(get("retry", DEFAULT_RETRY), "retry")
            back_retry = _retry(get("back_retry", DEFAULT_BACK_RETRY), "back_retry")
            timeout = parse_seconds(get("timeout", DEFAULT_TIMEOUT), "timeout")
            bt = _option(cls, options, "back_timeout")
            back_timeout = None if bt is None else parse_seconds(bt, "back_timeout")
            grace = parse_seconds(get("timeout_grace", DEFAULT_TIMEOUT_GRACE), "timeout_grace")
            hb = _option(cls, options, "heartbeat_timeout")
            heartbeat_timeout = None if hb is None else parse_seconds(hb, "heartbeat_timeout")
            on_failure = parse_on_failure(get("on_failure", FailurePolicy()))
            back_on_failure = parse_reaction(
                get("back_on_failure", "rollback"), allowed=BACK_FAILURE_REACTIONS
            )
            local = get("local", False)
            if not isinstance(local, bool):
                raise ValueError(f"local must be True or False, not {local!r}")
        except ValueError as exc:
            raise FlowDefinitionError(f"{where}: {exc}") from None
        if local and heartbeat_timeout is not None:
            raise FlowDefinitionError(
                f"{where}: step {cls.name!r} is local=True and has a heartbeat_timeout: a "
                "local step runs beside its flow and can't heartbeat (on Temporal); drop one"
            )
        if FALLBACK in on_failure.reactions() and not defines(cls, "step_fallback"):
            raise FlowDefinitionError(
                f"{where}: step {cls.name!r} reacts with FALLBACK but does not define "
                "step_fallback(self, args, error)"
            )
        return StepNode(
            name=cls.name,
            static_args=static_args,
            retry=retry,
            back_retry=back_retry,
            timeout=timeout,
            back_timeout=back_timeout,
            timeout_grace=grace,
            heartbeat_timeout=heartbeat_timeout,
            on_failure=on_failure,
            back_on_failure=back_on_failure,
            local=local,
            has_back=defines(cls, "step_back"),
            fields=fields,
            back_fields=back_fields,
            backend=_backend_name(cls.backend, where),
        )


def _shard_size(where: str) -> int:
    raw = os.environ.get(SHARD_SIZE_ENV, "").strip()
    if not raw:
        return DEFAULT_SHARD_SIZE
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if size < 1:
        raise FlowDefinitionError(
            f"{where}: {SHARD_SIZE_ENV} must be a whole number >= 1, not {raw!r}"
        )
    return size


def _retry(value: Any, option: str) -> Retry:
    if not isinstance(value, Retry):
        raise ValueError(f"{option} must be a qwit.Retry, not {value!r}")
    problem = out_of_bounds(value)
    if problem is not None:
        raise ValueError(f"{option}: {problem}")
    return value


def _fields(cls: type[Step], method: str) -> tuple[str, ...] | None:
    """The arg names a typed step method reads; None if it reads them all."""
    if not defines(cls, method):
        return None
    model = args_model(cls, method)
    names = model_fields(model) if model is not None else None
    return None if names is None else tuple(sorted(names))


#: What a plan was compiled from: the attributes of each class it used (the
#: flow, its sub-flows and steps, and their bases), as they were.
_Stamp = tuple[tuple[Any, ...], ...]


def _kept(value: Any) -> Any:
    """An attribute's value as a stamp keeps it: a function by its code (a
    function may hold its class, which the stamp must not keep alive)."""
    if isinstance(value, (classmethod, staticmethod)):
        value = value.__func__
    if isinstance(value, types.FunctionType):
        return value.__code__
    if isinstance(value, (types.GetSetDescriptorType, types.MemberDescriptorType)):
        return None  # (``__dict__``, ``__weakref__``: they hold their class)
    return value


def _stamp(classes: Iterable[type]) -> _Stamp:
    seen: dict[int, tuple[Any, ...]] = {}
    for cls in classes:
        for base in cls.__mro__:
            if base is not object and id(base) not in seen:
                attributes = vars(base)
                seen[id(base)] = (*attributes, *map(_kept, attributes.values()))
    return tuple(seen.values())


def _same(stamp: _Stamp, now: _Stamp) -> bool:
    """Whether nothing a plan was compiled from has changed (by identity: a
    value replaced by an equal one counts as a change)."""
    return len(stamp) == len(now) and all(
        len(was) == len(is_) and all(a is b for a, b in zip(was, is_, strict=True))
        for was, is_ in zip(stamp, now, strict=True)
    )


@dataclass(frozen=True)
class _Compiled:
    plan: FlowNode
    #: The steps and sub-flows it uses (not the flow: it would stay alive).
    used: tuple[type, ...]
    stamp: _Stamp

    @property
    def steps(self) -> tuple[type[Step], ...]:
        return tuple(c for c in self.used if issubclass(c, Step))


#: Each Flow class is compiled once (weakly kept: flows made at run time
#: go), and again only if an attribute of a class its plan was compiled
#: from has changed since (a test that sets a step's ``retry``, say).
_compiled: weakref.WeakKeyDictionary[type[Flow], _Compiled] = weakref.WeakKeyDictionary()


def _compile(flow: type[Flow]) -> _Compiled:
    if not (isinstance(flow, type) and issubclass(flow, Flow)):
        raise FlowDefinitionError(f"expected a qwit.Flow class, got {flow!r}")
    compiled = _compiled.get(flow)
    if compiled is not None and _same(compiled.stamp, _stamp((flow, *compiled.used))):
        return compiled
    if is_abstract(flow):
        raise FlowDefinitionError(
            f"flow {flow.name!r} is abstract (abstract=True): run one of its subclasses"
        )
    compiler = _Compiler()
    plan = compiler.flow(flow, {}, flow.on_failure)
    used = tuple(
        dict.fromkeys(c for c in (*compiler.flows, *compiler.names.values()) if c is not flow)
    )
    compiled = _compiled[flow] = _Compiled(plan, used, _stamp((flow, *used)))
    return compiled


def compile_flow(flow: type[Flow]) -> FlowNode:
    """Compile a Flow class into its plan (once per class).

    Raises:
        FlowDefinitionError: the flow, one of its steps, or an option is
            defined wrongly; the message names the flow, the step and the field.
    """
    return _compile(flow).plan


def _label(step: Any) -> str:
    name = getattr(step, "name", None)
    return repr(name) if isinstance(name, str) else repr(step)


def step_classes(flow: type[Flow]) -> Iterator[type[Step]]:
    """Every Step class a flow uses, sub-flows included, each once.

    Raises:
        FlowDefinitionError: the flow is defined wrongly.
    """
    yield from _compile(flow).steps
