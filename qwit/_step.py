"""``qwit.Step``: one unit of work and its undo."""

from __future__ import annotations

import inspect
import sys
import typing
import weakref
from datetime import timedelta
from types import FrameType
from typing import Any, ClassVar

from pydantic import AliasChoices, AliasPath, BaseModel, RootModel

from ._errors import ErrorInfo, FlowDefinitionError
from ._jsonargs import unkeepable_char
from ._options import OnFailure, Reaction, Retry

#: The longest name a Step or Flow may have, in UTF-8 bytes: it names the
#: Temporal activities of a step (``<name>.step_fallback``) and a flow's ids
#: (``<name>-<32 hex digits>``), which Temporal holds up to 1,000 bytes.
MAX_NAME_BYTES = 200


def _own_name(cls: type, name: str | None) -> str:
    if name is not None:
        if not isinstance(name, str) or not name.strip():
            raise FlowDefinitionError(
                f"{cls.__qualname__}: name= must be a non-empty string, not {name!r}"
            )
        name = name.strip()
    else:
        name = cls.__name__
    shown = f"{name[:40]!r}..." if len(name) > 40 else repr(name)
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise FlowDefinitionError(
            f"{cls.__qualname__}: name {shown} is longer than {MAX_NAME_BYTES} bytes (UTF-8)"
        )
    if unkeepable_char(name) is not None:
        raise FlowDefinitionError(
            f"{cls.__qualname__}: name {shown} holds a control character or a lone surrogate"
        )
    return name


class Step:
    """A unit of work that can be undone.

    Subclass it and define ``step_forward`` (do the work) and, if the work has
    an effect to undo, ``step_back``. Either may be ``async`` or plain; a plain
    method runs in a thread so it does not block the worker.

    Class keywords:
        name: The step's stable name (default: the class name). It names the
            Temporal activities ``<name>.step_forward`` and ``<name>.step_back``,
            so renaming a step is a deploy decision.
        backend: The engine that runs the step. Default: the engine of the
            flow that contains it.
        abstract: True for a base class other steps derive from: it is never
            registered, served or used in a plan, and needs no unique name.

    Options, as class attributes (or keywords of ``Flow.step`` for one use):
        retry: ``qwit.Retry`` for ``step_forward`` (default: 3 attempts).
        back_retry: ``qwit.Retry`` for ``step_back`` (default: long, capped backoff).
        timeout: Seconds (or a timedelta) one attempt may take (default 300).
            At the deadline an ``async`` step is cancelled at its next
            ``await``; a plain one sees ``qwit.context().cancelled``.
        back_timeout: The same for one ``step_back`` attempt (default:
            ``timeout``): an undo often takes much less (or more) time.
        timeout_grace: Seconds a timed-out attempt gets to stop before the
            next attempt or the undo starts anyway (default 30).
        heartbeat_timeout: For long steps that call ``qwit.heartbeat()``.
        on_failure: A reaction, or a mapping from exception class (or class
            name) to reaction, applied once the retries are spent.
        back_on_failure: What a ``step_back`` that fails for good does:
            ``qwit.ROLLBACK`` (default) goes on undoing the other steps;
            ``qwit.WAIT`` parks the flow for an operator; ``qwit.ABORT`` stops
            the rollback there, leaving what is left as it is (for flows whose
            earlier undos depend on later ones). Either way but WAIT's RETRY,
            the flow ends ``CompensationFailed``.
        local: True runs the step as a Temporal local activity (short steps).

    Example:
        >>> class Reserve(qwit.Step):
        ...     async def step_forward(self, args: dict) -> dict:
        ...         return {"reservation": "r-1"}
        ...     async def step_back(self, args: dict) -> None:
        ...         release(args["reservation"])
    """

    name: ClassVar[str] = "Step"
    backend: ClassVar[Any] = None

    retry: ClassVar[Retry | None] = None
    back_retry: ClassVar[Retry | None] = None
    timeout: ClassVar[float | timedelta | None] = None
    back_timeout: ClassVar[float | timedelta | None] = None
    timeout_grace: ClassVar[float | timedelta | None] = None
    heartbeat_timeout: ClassVar[float | timedelta | None] = None
    on_failure: ClassVar[OnFailure | None] = None
    back_on_failure: ClassVar[Reaction | str | None] = None
    local: ClassVar[bool | None] = None
    #: The names of the function the class was defined in, if it was.
    _qwit_localns: ClassVar[dict[str, Any] | None] = None

    def __init_subclass__(
        cls,
        *,
        name: str | None = None,
        backend: Any = None,
        abstract: bool = False,
        **kwargs: Any,
    ):
        super().__init_subclass__(**kwargs)
        cls._qwit_localns = _defining_locals(cls)
        declared = cls.__dict__.get("name")
        cls.name = _own_name(cls, name if name is not None else declared)
        if backend is not None:
            cls.backend = backend
        mark_abstract(cls, abstract)

    def step_forward(self, args: Any) -> Any:
        """Do the work.

        Args:
            args: The flow's args at this point (a dict), or a validated
                pydantic model when the parameter is annotated with one.

        Returns:
            A dict (or pydantic model) merged into the args of later steps,
            or None.
        """
        raise NotImplementedError(f"{type(self).__qualname__} does not define step_forward")

    def step_back(self, args: Any) -> Any:
        """Undo what ``step_forward`` did. The default has nothing to undo.

        Args:
            args: What ``step_forward`` received, updated with its output when
                it completed.
        """
        return None

    def step_fallback(self, args: Any, error: ErrorInfo) -> Any:
        """What stands in for ``step_forward``'s output once it failed, for a
        step whose ``on_failure`` chooses ``qwit.FALLBACK`` (define it to use
        FALLBACK; the default is never called).

        The failed attempt has been undone (if it started) by then; the
        returned dict (a model, or None) is merged into the args as the
        output would have been, and ``step_back`` later receives it. Retried
        per the step's ``retry``; if it still fails, the flow rolls back.

        Args:
            args: What ``step_forward`` received.
            error: How ``step_forward`` failed: ``error.type`` (the qualified
                class name), ``error.types``, ``error.message``.
        """
        raise NotImplementedError(f"{type(self).__qualname__} does not define step_fallback")


def mark_abstract(cls: type, abstract: bool) -> None:
    """Record whether ``cls`` itself (not its subclasses) is abstract."""
    if not isinstance(abstract, bool):
        raise FlowDefinitionError(
            f"{cls.__qualname__}: abstract= must be True or False, not {abstract!r}"
        )
    cls._qwit_abstract = abstract  # type: ignore[attr-defined]


def is_abstract(cls: type) -> bool:
    """Whether ``cls`` was declared with ``abstract=True`` (its subclasses are not)."""
    return bool(cls.__dict__.get("_qwit_abstract", False))


def _defining_locals(cls: type) -> dict[str, Any] | None:
    """The classes among the local names of the function whose ``class``
    statement made ``cls`` (a copy, as they are now), or None if no function
    did (a module, or ``type()`` / ``types.new_class`` called by one).

    That function's frame is found above ``Step.__init_subclass__`` by its
    qualified name, which the class's own starts with
    (``make.<locals>.MyStep``): past any ``__init_subclass__`` of subclasses
    and ``__new__`` of metaclasses.
    """
    where, local, _ = cls.__qualname__.rpartition(".<locals>.")
    if not local:
        return None
    frame: FrameType | None = sys._getframe(2)  # (past this and Step.__init_subclass__)
    for _ in range(_FRAMES_UP):
        if frame is None:
            return None
        code = frame.f_code
        # (3.10 has no co_qualname: the name, the last part of it, then)
        if hasattr(code, "co_qualname"):
            found, wanted = code.co_qualname, where
        else:
            found, wanted = code.co_name, where.rpartition(".")[2]
        if found == wanted:
            names = {k: v for k, v in frame.f_locals.items() if isinstance(v, type)}
            return names or None
        frame = frame.f_back
    return None


#: How many frames up ``_defining_locals`` looks for the defining function.
_FRAMES_UP = 8


def defines(cls: type, method: str) -> bool:
    """Whether ``cls`` overrides ``method`` of Step."""
    return getattr(cls, method) is not getattr(Step, method)


#: The models of step methods, by class (weakly: steps made at run time go),
#: then by method and its code (a method replaced, by a test's monkeypatch
#: say, is read again).
_models: weakref.WeakKeyDictionary[type, dict[tuple[str, Any], type[BaseModel] | None]] = (
    weakref.WeakKeyDictionary()
)


def args_model(cls: type, method: str) -> type[BaseModel] | None:
    """The pydantic model a step method's ``args`` parameter is annotated with.

    Raises:
        TypeError: the method takes no args parameter, or its annotation
            can't be resolved (e.g. a model defined inside a function).
    """
    fn = getattr(cls, method, None)
    key = (method, getattr(fn, "__code__", None))
    known = _models.get(cls)
    if known is None:
        known = _models[cls] = {}
    if key not in known:
        known[key] = _args_model(cls, method)
    return known[key]


def _args_model(cls: type, method: str) -> type[BaseModel] | None:
    fn = getattr(cls, method)
    if method == "step_forward":  # (once per step: run as ``cls().method(...)``)
        try:
            inspect.signature(cls).bind()
        except TypeError:
            raise TypeError(
                f"{cls.__qualname__} must be made without arguments (its __init__ takes some)"
            ) from None
        except ValueError:  # no signature to read
            pass
    signature = inspect.signature(fn)
    params = list(signature.parameters.values())
    # A method defined in the class takes the instance first, whatever its name.
    selves = 1 if inspect.isfunction(inspect.getattr_static(cls, method)) and params else 0
    if len(params) == selves:
        raise TypeError(f"{method} must take one parameter, the step's args")
    try:
        if method == "step_fallback":
            signature.bind(*[None] * selves, None, error=None)
        else:
            signature.bind(*[None] * selves, None)
    except TypeError:
        usage = "(self, args, error)" if method == "step_fallback" else "(self, args)"
        raise TypeError(f"{method} must be callable as {method}{usage}") from None
    params = params[selves:]
    if params[0].kind is params[0].VAR_POSITIONAL:
        return None  # (args taken by *args: not typed)
    if params[0].annotation is inspect.Parameter.empty:
        return None
    # With the names of the function the class that defines the method was
    # defined in, if it was (a model defined there is found under ``from
    # __future__ import annotations``); that class, not a subclass that
    # wraps the method, as check_rollbacks' probes do.
    defined = inspect.unwrap(fn)
    owner = next((c for c in cls.__mro__ if vars(c).get(method) is defined), cls)
    try:
        hints = typing.get_type_hints(fn, localns=vars(owner).get("_qwit_localns"))
    except Exception as exc:
        raise TypeError(
            f"can't resolve the type annotations of {method} ({type(exc).__name__}: {exc}); "
            "define the args model at module level, or before the step class"
        ) from None
    hint = hints.get(params[0].name)
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return hint
    return None


def model_fields(model: type[BaseModel]) -> set[str] | None:
    """Names under which ``model`` reads its input (its fields' names and
    aliases), or None if it may read any key: it allows extra keys, is a
    ``RootModel``, or has a ``before`` or ``wrap`` model validator (which
    sees the whole input)."""
    if model.model_config.get("extra") == "allow" or issubclass(model, RootModel):
        return None
    validators = model.__pydantic_decorators__.model_validators.values()
    if any(v.info.mode in ("before", "wrap") for v in validators):
        return None
    names: set[str] = set()
    for field_name, field in model.model_fields.items():
        names.add(field_name)  # (read by name too: see ``validate_args``)
        alias = field.validation_alias if field.validation_alias is not None else field.alias
        if alias is not None:
            choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
            for choice in choices:
                if isinstance(choice, str):
                    names.add(choice)
                elif isinstance(choice, AliasPath) and isinstance(choice.path[0], str):
                    names.add(choice.path[0])
                elif choice is not None:
                    return None
    return names


def validate_args(model: type[BaseModel], args: dict[str, Any]) -> BaseModel:
    """``args`` as an instance of ``model``, a typed step's args.

    Keys the model does not read are left out first (so that a model that
    forbids extra keys ignores the flow's others), and each field is read
    by its alias or its name: a model returned by an earlier step is merged
    by its fields' names, and the same model reads it back.

    Raises:
        ValidationError: the model refused them.
    """
    names = model_fields(model)
    if names is not None:
        args = {key: value for key, value in args.items() if key in names}
    return model.model_validate(args, by_alias=True, by_name=True)
