"""`qwit run`'s progress lines: what changed between two polls, in saga order."""

from __future__ import annotations

from typing import Any

from click.testing import CliRunner

from qwit import FlowState, StepState
from qwit._cli import cli
from qwit._cli._progress import diff
from qwit._errors import ErrorInfo

DECLINED = ErrorInfo(type="qwit.StepError", message="no route")


def step(path: str, name: str, status: str, **extra: Any) -> StepState:
    return StepState(name=name, path=path, status=status, **extra)  # type: ignore[arg-type]


def state(status: str, *steps: StepState) -> FlowState:
    return FlowState(flow="f", flow_id="f-1", status=status, steps=list(steps))  # type: ignore[arg-type]


def lines(
    old: FlowState | None, new: FlowState, no_back: frozenset[str] = frozenset()
) -> list[str]:
    return [f"{e.row.step.path} {e.kind} {e.detail}".strip() for e in diff(old, new, no_back)]


def test_a_rollback_inside_a_sub_flow_seen_in_one_poll_reads_in_saga_order():
    final = state(
        "rolled_back",
        step("1", "reserve", "compensated", attempts=1),
        step(
            "2",
            "shipping",
            "failed",
            kind="flow",
            attempts=1,
            error=DECLINED,
            steps=[
                step("2.1", "book", "compensated", attempts=1),
                step("2.2", "label", "compensated", attempts=1, error=DECLINED),
            ],
        ),
        step("3", "notify", "pending"),
    )
    assert lines(None, final, frozenset({"2.2"})) == [
        "1 started",
        "1 done",
        "2 started",
        "2.1 started",
        "2.1 done",
        "2.2 started",
        "2.2 failed StepError: no route",
        "2.2 compensated (no step_back: nothing to undo)",
        "2.1 compensating",
        "2.1 compensated",
        "2 failed StepError: no route",
        "1 compensating",
        "1 compensated",
    ]


def test_a_failed_step_first_seen_while_being_undone():
    running = state("running", step("1", "reserve", "done"), step("2", "charge", "running"))
    undoing = state(
        "compensating",
        step("1", "reserve", "done", attempts=1),
        step("2", "charge", "compensating", attempts=1, error=DECLINED),
    )
    assert lines(running, undoing) == ["2 failed StepError: no route", "2 compensating"]


def test_a_step_run_again_after_a_wait():
    waiting = state(
        "waiting",
        step("1", "submit", "done", attempts=1),
        step("2", "approve", "failed", attempts=1, error=DECLINED),
    )
    again = state(
        "completed",
        step("1", "submit", "done", attempts=1),
        step("2", "approve", "done", attempts=2),
    )
    assert lines(waiting, again) == ["2 started again", "2 done (2 attempts)"]
    assert lines(again, again) == []


def test_usage_errors_of_run_exit_2_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("QWIT_DATA_DIR", str(tmp_path))
    cases = [
        (["tests.no_such_module:Flow"], "'tests.no_such_module:Flow' does not resolve"),
        (["tests.cli_flows:Missing"], "'tests.cli_flows:Missing' does not resolve"),
        (["tests.cli_flows:NOT_A_FLOW"], "is 42, not a qwit.Flow subclass"),
        (["tests.cli_flows:Outer", "--args", "{bad"], "--args: not valid JSON"),
        (["tests.cli_flows:Outer", "--args", "[1]"], "must be a JSON object, not list"),
        (["tests.cli_flows:Outer", "--args", '{"x": NaN}'], "'x': nan is not a finite number"),
        (["tests.cli_flows:Empty"], "flow 't.empty' has no steps"),
        (["tests.cli_flows:Outer", "--id", " "], "id must be a non-empty string"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(cli, ["run", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
    assert not list(tmp_path.iterdir())  # no server was started for any of them
