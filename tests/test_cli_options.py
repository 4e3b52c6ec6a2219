"""Options the commands share are declared once and behave the same everywhere."""

from __future__ import annotations

from typing import Any

import click
import pytest
from click.testing import CliRunner

from qwit._cli import _common, _list, _ops, _run, cli
from qwit.temporal import _workflow


def option(command: click.Command, name: str) -> click.Parameter:
    return next(p for p in command.params if p.name == name)


def test_args_is_one_option_for_run_and_react():
    run_args, react_args = option(_run.run, "args"), option(_ops.react, "args")
    assert run_args.callback is not None
    assert run_args.callback.__qualname__ == react_args.callback.__qualname__
    for args, message in [
        (["run", "samples.order.flows:PlaceOrder", "--args", "[1]"], "must be a JSON object"),
        (["react", "f-1", "retry", "--args", "{nope"], "not valid JSON"),
    ]:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert "Invalid value for --args" in result.output and message in result.output


@pytest.mark.parametrize(
    ("command", "name", "given", "value"),
    [(_list.list_flows, "status_filter", "WAITING", "waiting"),
     (_list.list_flows, "status_filter", "Rolled_Back", "rolled_back"),
     (_ops.react, "reaction", "SkipBack", "skipback")],
)  # fmt: skip
def test_case_insensitive_choices_come_in_their_own_case(command, name, given, value):
    param = option(command, name)
    ctx = click.Context(command)
    assert param.type.convert(given, param, ctx) == value


def test_one_console_per_call(monkeypatch: pytest.MonkeyPatch):
    made: list[Any] = []
    real = _common.Console

    def counting(*args: Any, **kwargs: Any) -> Any:
        made.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(_common, "Console", counting)
    out = _common.console()
    assert len(made) == 1
    assert not out.is_terminal and out.width == 200 and out.soft_wrap  # off a terminal


def test_search_attribute_keys_are_those_flows_publish():
    assert _list.QWIT_FLOW is _workflow.QWIT_FLOW
    assert _list.QWIT_STATUS is _workflow.QWIT_STATUS
    assert not hasattr(_list, "QUERY_STATE") and not hasattr(_list, "failure_info")
