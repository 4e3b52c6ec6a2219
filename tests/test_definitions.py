"""Bad definitions are refused before anything runs (CONTRACT section 1)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

import qwit
from qwit._flow import compile_flow
from qwit._plan import FlowNode, MapNode, StepNode


class A(qwit.Step):
    async def step_forward(self, args: dict[str, Any]) -> None:
        return None


class B(qwit.Step, name="payments.charge"):
    def step_forward(self, args: dict[str, Any]) -> None:
        return None

    def step_back(self, args: dict[str, Any]) -> None:
        return None


def flow_of(*entries: Any) -> type[qwit.Flow]:
    class Made(qwit.Flow):
        def build_flow(self) -> None:
            for entry in entries:
                if isinstance(entry, tuple):
                    target, *rest = entry
                    options = rest[1] if len(rest) > 1 else {}
                    self.step(target, rest[0] if rest else None, **options)
                else:
                    self.step(entry)

    return Made


def refused(flow: type[qwit.Flow], *fragments: str) -> str:
    client = qwit.Client(task_queue="unused")
    with pytest.raises(qwit.FlowDefinitionError) as info:
        client.prepare(flow, {})
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_names_default_to_the_class_name_or_are_explicit():
    assert A.name == "A"
    assert B.name == "payments.charge"

    class Sub(B):
        pass

    assert Sub.name == "Sub"


def test_the_plan_is_data_with_options_from_class_and_call():
    class Slow(qwit.Step):
        timeout = timedelta(minutes=2)
        retry = qwit.Retry(max_attempts=5)
        on_failure = {ValueError: qwit.SKIP, "KeyError": "abort"}

        async def step_forward(self, args: dict[str, Any]) -> None:
            return None

    class Inner(qwit.Flow):
        def build_flow(self) -> None:
            self.step(B)

    class Outer(qwit.Flow, name="orders.outer"):
        def build_flow(self) -> None:
            self.step(Slow, {"k": [1, 2]}, timeout=10, local=True)
            self.step(Inner, {"scope": "inner"}, on_failure=qwit.SKIP)
            self.step(Slow)

    plan = compile_flow(Outer)
    assert plan.name == "orders.outer"
    first, inner, last = plan.steps
    assert isinstance(first, StepNode) and isinstance(last, StepNode)
    assert first.static_args == {"k": [1, 2]}
    assert first.timeout == 10 and first.local
    assert last.timeout == 120 and not last.local
    assert first.retry.max_attempts == 5
    assert first.has_back is False
    assert first.on_failure.choose(["builtins.ValueError"]) == qwit.SKIP
    assert first.on_failure.choose(["builtins.KeyError", "builtins.LookupError"]) == qwit.ABORT
    assert first.on_failure.choose(["builtins.TypeError"]) == qwit.ROLLBACK
    assert isinstance(inner, FlowNode)
    assert inner.static_args == {"scope": "inner"}
    assert inner.on_failure.default == qwit.SKIP
    assert inner.steps[0].name == "payments.charge"
    assert inner.steps[0].has_back is True
    # the plan round-trips as JSON: the workflow gets data, not code
    assert FlowNode.model_validate_json(plan.model_dump_json()) == plan


class In(BaseModel):
    order_id: int
    note: str = ""


def test_typed_steps_record_the_fields_they_read():
    class Typed(qwit.Step):
        async def step_forward(self, args: In) -> None:
            return None

    class Untyped(qwit.Step):
        async def step_forward(self, args: dict[str, Any]) -> None:
            return None

    class F(qwit.Flow):
        def build_flow(self) -> None:
            self.step(Typed)
            self.step(Untyped)

    typed, untyped = compile_flow(F).steps
    assert isinstance(typed, StepNode) and isinstance(untyped, StepNode)
    assert typed.fields == ("note", "order_id")
    assert untyped.fields is None


def test_a_flow_with_no_steps():
    class Empty(qwit.Flow):
        def build_flow(self) -> None:
            pass

    refused(Empty, "'Empty'", "no steps")


def test_a_flow_without_build_flow():
    class NoBuild(qwit.Flow):
        pass

    refused(NoBuild, "'NoBuild'", "build_flow")


def test_a_step_that_is_not_a_step_or_flow():
    refused(flow_of(A, "not a step"), "'Made'", "step 2", "'not a step'")
    refused(flow_of(A()), "step 1", "qwit.Step or qwit.Flow class")
    refused(flow_of(int), "step 1", "int")


def test_a_flow_that_contains_itself():
    class Loop(qwit.Flow):
        def build_flow(self) -> None:
            self.step(A)
            self.step(Loop)

    refused(Loop, "contains itself", "Loop -> Loop")


def test_a_flow_that_contains_itself_through_another():
    class Ping(qwit.Flow):
        def build_flow(self) -> None:
            self.step(Pong)

    class Pong(qwit.Flow):
        def build_flow(self) -> None:
            self.step(Ping)

    refused(Ping, "Ping -> Pong -> Ping")


def test_two_different_steps_with_the_same_name():
    class Charge(qwit.Step, name="payments.charge"):
        async def step_forward(self, args: dict[str, Any]) -> None:
            return None

    message = refused(flow_of(B, Charge), "'payments.charge'", "two different steps")
    assert "B" in message and "Charge" in message


def test_same_step_twice_is_fine():
    plan = compile_flow(flow_of(A, A))
    assert [s.name for s in plan.steps] == ["A", "A"]


def test_static_args_may_be_given_by_keyword():
    # self.step(StepOrFlow, static_args=None, **options), as documented:
    # the keyword was taken for an unknown option.
    class Inner(qwit.Flow):
        def build_flow(self) -> None:
            self.step(B)

    class Keyed(qwit.Flow, name="orders.keyed"):
        def build_flow(self) -> None:
            self.step(B, static_args={"k": 1}, timeout=10)
            self.step(Inner, static_args={"scope": "inner"})
            self.map(B, static_args={"m": 2}, over="xs", item="x", into="ys")

    first, inner, mapped = compile_flow(Keyed).steps
    assert isinstance(first, StepNode) and first.static_args == {"k": 1}
    assert first.timeout == 10
    assert isinstance(inner, FlowNode) and inner.static_args == {"scope": "inner"}
    assert isinstance(mapped, MapNode) and mapped.node.static_args == {"m": 2}


def test_static_args_that_are_not_json():
    refused(flow_of((A, {"when": object()})), "step 1 ('A')", "field 'when'", "object")
    refused(flow_of((A, {"deep": {"x": [1, {2, 3}]}})), "field 'deep.x[1]'", "set")
    refused(flow_of((A, {"n": float("inf")})), "field 'n'", "finite")
    refused(flow_of((A, {1: "int key"})), "keys must be strings")
    refused(flow_of((A, ["a", "list"])), "static args", "dict")


def test_bad_options():
    refused(flow_of((A, None, {"retries": 3})), "unknown option", "retries")
    refused(flow_of((A, None, {"retry": 3})), "retry must be a qwit.Retry")
    refused(flow_of((A, None, {"timeout": -1})), "timeout must be a positive")
    refused(flow_of((A, None, {"timeout": "soon"})), "timeout must be seconds")
    refused(flow_of((A, None, {"on_failure": "explode"})), "unknown reaction 'explode'")
    refused(flow_of((A, None, {"on_failure": qwit.RETRY})), "'retry' is not allowed")
    refused(flow_of((A, None, {"on_failure": {42: "skip"}})), "exception classes or class names")
    refused(flow_of((A, None, {"back_on_failure": qwit.SKIP})), "'skip' is not allowed")
    refused(flow_of((A, None, {"local": "yes"})), "local must be True or False")
    refused(
        flow_of((A, None, {"local": True, "heartbeat_timeout": 5})),
        "local=True and has a heartbeat_timeout",
    )


def test_sub_flow_takes_only_on_failure_and_retry():
    class Inner(qwit.Flow):
        def build_flow(self) -> None:
            self.step(A)

    refused(flow_of((Inner, None, {"timeout": 5})), "apply to steps, not to a sub-flow")
    refused(flow_of((Inner, None, {"retry": 3})), "retry must be a qwit.Retry")


def test_a_step_without_step_forward():
    class Lazy(qwit.Step):
        pass

    refused(flow_of(Lazy), "'Lazy' does not define step_forward")


def test_build_flow_errors_name_the_flow():
    class Broken(qwit.Flow):
        def build_flow(self) -> None:
            raise KeyError("oops")

    refused(Broken, "'Broken'", "build_flow() raised KeyError")


def test_start_refuses_something_that_is_not_a_flow():
    client = qwit.Client(task_queue="unused")
    with pytest.raises(qwit.FlowDefinitionError, match=r"expected a qwit\.Flow class"):
        client.prepare(A, {})  # type: ignore[arg-type]


def test_a_step_naming_another_backend():
    class Elsewhere(qwit.Step, backend=qwit.temporal):
        async def step_forward(self, args: dict[str, Any]) -> None:
            return None

    class Fake:
        name = "fake"

    class Odd(qwit.Step, backend=Fake()):
        async def step_forward(self, args: dict[str, Any]) -> None:
            return None

    qwit.Client(task_queue="unused").prepare(flow_of(Elsewhere), {})
    refused(flow_of(Odd), "'Odd' names backend 'fake'", "runs on 'temporal'")


def test_a_step_is_checked_against_the_engine_the_client_runs_its_flow_on():
    """A client with a backend runs every flow there: a Step naming another
    engine is refused, one naming that engine is not."""
    import qwit.postgres

    class OnTemporal(qwit.Step, backend=qwit.temporal):
        async def step_forward(self, args: dict[str, Any]) -> None:
            return None

    class OnPostgres(qwit.Step, backend=qwit.postgres):
        async def step_forward(self, args: dict[str, Any]) -> None:
            return None

    on_postgres = qwit.Client(backend=qwit.postgres)
    on_postgres.prepare(flow_of(OnPostgres), {})
    with pytest.raises(qwit.FlowDefinitionError, match="runs on 'postgres'"):
        on_postgres.prepare(flow_of(OnTemporal), {})
    with pytest.raises(qwit.FlowDefinitionError, match="'OnPostgres' names backend 'postgres'"):
        qwit.Client(backend=qwit.local).prepare(flow_of(OnPostgres), {})


def test_retry_policy_validation():
    with pytest.raises(ValueError, match="max_interval"):
        qwit.Retry(initial_interval=10, max_interval=1)
    with pytest.raises(ValueError, match="max_attempts"):
        qwit.Retry(max_attempts=0)
    # A bad definition: QWIT's error (still a ValueError, as pydantic's was).
    for bad in (
        {"max_attempts": 0},
        {"max_attempts": True},
        {"max_attempts": 1.5},
        {"initial_interval": -1},
        {"backoff": float("nan")},
    ):
        with pytest.raises(qwit.FlowDefinitionError, match=r"^qwit\.Retry: "):
            qwit.Retry(**bad)
    assert qwit.Retry(max_attempts="5").max_attempts == 5  # (as pydantic reads it)
    # Past what every engine holds (Temporal counts attempts in 32 bits; an
    # infinite interval has no JSON form): refused as a flow is compiled
    # (a plan pinned by an older QWIT with such a policy still reads back).
    for bad in (
        {"max_attempts": 2**31},
        {"initial_interval": float("inf"), "max_interval": float("inf")},
        {"backoff": float("inf")},
        {"max_interval": 1e300},
    ):

        class Eager(qwit.Step, name="defs.eager"):
            retry = qwit.Retry(**bad)

            async def step_forward(self, args: dict[str, Any]) -> None:
                return None

        class UsesEager(qwit.Flow, name="defs.uses_eager"):
            def build_flow(self) -> None:
                self.step(Eager)

        with pytest.raises(qwit.FlowDefinitionError, match="retry: "):
            compile_flow(UsesEager)
    from qwit._options import Retry

    assert Retry.model_validate({"max_attempts": None, "max_interval": 1e10}).max_interval == 1e10
    policy = qwit.Retry(max_attempts=4, initial_interval=1, backoff=2, max_interval=3)
    assert [policy.delay(n) for n in (1, 2, 3)] == [1, 2, 3]
    assert policy.budget() == 6


def test_reactions_accept_lowercase_names():
    from qwit._options import parse_reaction

    assert parse_reaction("rollback") is qwit.ROLLBACK
    assert parse_reaction("RETRY") is qwit.RETRY
    assert qwit.Reaction("skipback") is qwit.SKIPBACK


def test_a_typed_step_whose_model_cant_be_resolved():
    class Hidden(qwit.Step):
        async def step_forward(self, args: Later) -> None:
            return None

    class Later(BaseModel):  # (after the step: it can't see it)
        x: int

    refused(flow_of(Hidden), "'Hidden'", "can't resolve", "module level")


async def test_a_typed_step_defined_in_a_function_finds_its_model_there():
    # (this module reads annotations as strings: ``from __future__ import annotations``)
    class Local(BaseModel):
        x: int

    class Typed(qwit.Step, name="defs.typed_in_function"):
        async def step_forward(self, args: Local) -> dict[str, Any]:
            return {"seen": f"{type(args).__name__}:{args.x}"}

        async def step_back(self, args: Local) -> None:
            return None

    class Stage(qwit.Step, abstract=True):
        async def step_forward(self, args: Local) -> dict[str, Any]:
            return {"staged": args.x + 1}

    class Staged(Stage, name="defs.staged_in_function"):
        pass

    async with await qwit.connect(backend=qwit.local) as client:
        result = await client.run(flow_of(Typed, Staged), {"x": 2})
    assert (result["seen"], result["staged"]) == ("Local:2", 3)
    # check_rollbacks runs it as a subclass of its own making, which wraps
    # its methods: the model is still read where the step was defined
    report = await qwit.testing.check_rollbacks(flow_of(Typed), {"x": 2})
    assert report.cases


def test_only_a_class_statement_in_a_function_keeps_that_functions_names():
    import types

    class Model(BaseModel):
        x: int

    made = types.new_class("Made", (qwit.Step,), {"name": "defs.made"})
    assert made._qwit_localns is None  # (types.new_class's own names are not its)

    class Kept(qwit.Step, name="defs.kept"):
        pass

    assert Kept._qwit_localns is not None and Kept._qwit_localns["Model"] is Model
    assert all(isinstance(value, type) for value in Kept._qwit_localns.values())


def test_a_step_method_without_an_args_parameter():
    class NoArgs(qwit.Step):
        async def step_forward(self) -> None:  # type: ignore[override]
            return None

    refused(flow_of(NoArgs), "must take one parameter")


# -- abstract bases ----------------------------------------------------------------


class _Stage(qwit.Step, abstract=True):
    """A base that defines step_forward for its subclasses."""

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {type(self).name: True}


class StageOne(_Stage, name="abstract.one"):
    pass


class StageTwo(_Stage, name="abstract.two"):
    pass


class _BaseFlow(qwit.Flow, abstract=True):
    def build_flow(self) -> None:
        self.step(StageOne)


class Staged(_BaseFlow, name="abstract.staged"):
    def build_flow(self) -> None:
        super().build_flow()
        self.step(StageTwo)


class UsesTheBase(qwit.Flow, name="abstract.uses_base"):
    def build_flow(self) -> None:
        self.step(_Stage)


def test_an_abstract_base_is_neither_registered_nor_served():
    import types

    from qwit.engine import Registry

    module = types.ModuleType("stages")
    module.__dict__.update(_Stage=_Stage, StageOne=StageOne, StageTwo=StageTwo, Staged=Staged)
    registry = Registry(module)
    assert sorted(registry.steps) == ["abstract.one", "abstract.two"]
    assert not qwit.Step.__dict__.get("_qwit_abstract")
    assert "_qwit_abstract" not in StageOne.__dict__ or not StageOne._qwit_abstract
    with pytest.raises(qwit.FlowDefinitionError, match="abstract"):
        Registry(_Stage)


async def test_an_abstract_base_can_not_be_used_in_a_plan_or_run():
    client = await qwit.connect(backend=qwit.local)
    with pytest.raises(qwit.FlowDefinitionError, match="abstract"):
        await client.start(UsesTheBase, {})
    with pytest.raises(qwit.FlowDefinitionError, match="abstract"):
        await client.start(_BaseFlow, {})
    assert await client.run(Staged, {}) == {"abstract.one": True, "abstract.two": True}
    await client.close()


@pytest.mark.parametrize("name", ["", "   ", 3])
def test_a_blank_or_non_string_name_is_a_definition_error(name: Any):
    with pytest.raises(qwit.FlowDefinitionError, match="name= must be a non-empty string"):

        class Named(qwit.Step, name=name):
            async def step_forward(self, args: dict[str, Any]) -> None:
                return None

    with pytest.raises(qwit.FlowDefinitionError, match="name= must be a non-empty string"):

        class NamedFlow(qwit.Flow, name=name):
            def build_flow(self) -> None:
                self.step(A)


def test_a_non_bool_abstract_is_a_definition_error():
    with pytest.raises(qwit.FlowDefinitionError, match="abstract= must be True or False"):

        class Half(qwit.Step, abstract="yes"):  # type: ignore[arg-type]
            pass


@pytest.mark.parametrize(
    "option", ["timeout", "back_timeout", "timeout_grace", "heartbeat_timeout"]
)
def test_a_duration_past_a_hundred_years_is_refused(option: str):
    # Before, 1e300 seconds passed, and the flow never ended on Temporal (its
    # workflow task failed on every try: timedelta overflowed).
    class Sleepy(qwit.Step, name=f"defs.sleepy_{option}"):
        async def step_forward(self, args: dict[str, Any]) -> None:
            return None

    class Patient(qwit.Flow, name=f"defs.patient_{option}"):
        def build_flow(self) -> None:
            self.step(Sleepy, **{option: 1e300})

    with pytest.raises(qwit.FlowDefinitionError, match="at most 100 years"):
        compile_flow(Patient)


def test_a_fallback_whose_model_cant_be_resolved_is_refused_at_start():
    # As step_forward's and step_back's: before, it failed only when the
    # fallback ran (a raw TypeError on the in-memory engines).
    class FallsBackBlind(qwit.Step, name="defs.falls_back_blind"):
        on_failure = qwit.FALLBACK

        async def step_forward(self, args: dict[str, Any]) -> None:
            return None

        async def step_fallback(self, args: Hidden, error: Any) -> None:
            return None

    class Hidden(BaseModel):  # (after the step: it can't see it)
        x: int

    class Blind(qwit.Flow, name="defs.blind"):
        def build_flow(self) -> None:
            self.step(FallsBackBlind)

    with pytest.raises(qwit.FlowDefinitionError, match="step_fallback"):
        compile_flow(Blind)
    with pytest.raises(qwit.FlowDefinitionError, match="step_fallback"):
        qwit.engine.Registry().add(FallsBackBlind)


@pytest.mark.parametrize(
    ("methods", "problem"),
    [
        ({"__init__": lambda self, db: None}, "made without arguments"),
        ({"step_forward": lambda self, *, args: None}, r"step_forward\(self, args\)"),
        ({"step_forward": lambda self, args, more: None}, r"step_forward\(self, args\)"),
        ({"step_back": lambda self, args, more: None}, r"step_back\(self, args\)"),
        ({"step_fallback": lambda self, args: None}, r"step_fallback\(self, args, error\)"),
        ({"step_fallback": lambda self, args, err: None}, r"step_fallback\(self, args, error\)"),
    ],
)
def test_a_step_qwit_cant_call_is_refused_at_start(methods: dict[str, Any], problem: str):
    # Before, each failed only as it ran: a TypeError, retried.
    forward = methods.pop("step_forward", lambda self, args: None)
    odd = type("Odd", (qwit.Step,), {"step_forward": forward, **methods})

    class Calls(qwit.Flow, name=f"defs.calls_{len(problem)}_{id(odd)}"):
        def build_flow(self) -> None:
            self.step(odd)

    with pytest.raises(qwit.FlowDefinitionError, match=problem):
        compile_flow(Calls)


def _logged(method: Any) -> Any:
    def inner(*args: Any, **kwargs: Any) -> Any:  # (no functools.wraps)
        return method(*args, **kwargs)

    return inner


def test_steps_qwit_can_call_pass():
    class Wrapped(qwit.Step, name="defs.wrapped \u200c\xa0ok"):
        @_logged
        def step_forward(this, args: Any) -> None:
            return None

        def step_back(this, *args: Any) -> None:
            return None

    class UsesWrapped(qwit.Flow, name="defs.uses_wrapped"):
        def build_flow(self) -> None:
            self.step(Wrapped)

    compile_flow(UsesWrapped)

    class Fine(qwit.Step, name="defs.fine"):
        def __init__(self, db: Any = None) -> None:
            self.db = db

        @staticmethod
        def step_forward(args: dict[str, Any], /) -> None:
            return None

        def step_back(self, args: Any, *more: Any, **options: Any) -> None:
            return None

        def step_fallback(self, args: Any, error: Any = None) -> None:
            return None

    class UsesFine(qwit.Flow, name="defs.uses_fine"):
        def build_flow(self) -> None:
            self.step(Fine)

    compile_flow(UsesFine)


class StampBase(qwit.Step, abstract=True):
    timeout = 30


class StampStep(StampBase, name="stamp.step"):
    retry = qwit.Retry(max_attempts=3)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {}


class StampFlow(qwit.Flow, name="stamp.flow"):
    def build_flow(self) -> None:
        self.step(StampStep)


class StampOuter(qwit.Flow, name="stamp.outer"):
    def build_flow(self) -> None:
        self.step(StampFlow)


class StampArgs(BaseModel):
    x: int = 0


def test_a_plan_is_compiled_once_and_again_after_a_class_it_uses_changes(
    monkeypatch: pytest.MonkeyPatch,
):
    # Compiled once per class; but a test that sets a step's option (here
    # with monkeypatch) gets a plan with it, and the next test, the option
    # put back, the plan as it was. Before, the first plan stayed cached.
    first = compile_flow(StampFlow)
    assert compile_flow(StampFlow) is first

    def step() -> StepNode:
        node = compile_flow(StampFlow).steps[0]
        assert isinstance(node, StepNode)
        return node

    monkeypatch.setattr(StampStep, "retry", qwit.Retry(max_attempts=1))
    assert step().retry.max_attempts == 1
    monkeypatch.setattr(StampBase, "timeout", 5)  # (a base's option)
    assert step().timeout == 5
    monkeypatch.setattr(StampFlow, "on_failure", qwit.ABORT)  # (the flow's own)
    assert compile_flow(StampFlow).on_failure.default == qwit.ABORT

    def build_flow(self: qwit.Flow) -> None:  # (its build_flow replaced)
        self.step(StampStep, {"extra": 1})

    monkeypatch.setattr(StampFlow, "build_flow", build_flow)
    assert compile_flow(StampFlow).steps[0].static_args == {"extra": 1}
    monkeypatch.undo()
    assert compile_flow(StampFlow) == first
    assert step().retry.max_attempts == 3 and step().timeout == 30
    # a sub-flow's class, seen by the flow that uses it
    outer = compile_flow(StampOuter)
    monkeypatch.setattr(StampFlow, "on_failure", qwit.ABORT)
    assert compile_flow(StampOuter).steps[0].on_failure.default == qwit.ABORT
    monkeypatch.undo()
    assert compile_flow(StampOuter) == outer

    # a step method replaced by a typed one: the fields it reads too
    async def typed(self: qwit.Step, args: StampArgs) -> dict[str, Any]:
        return {}

    monkeypatch.setattr(StampStep, "step_forward", typed)
    assert step().fields == ("x",)
    monkeypatch.undo()
    assert step().fields is None
