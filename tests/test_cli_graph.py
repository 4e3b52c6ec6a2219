"""`qwit graph`: the plan as a flowchart, Mermaid or Graphviz."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from qwit._cli import cli


def graph(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["graph", *args])
    return result.exit_code, result.output


def test_mermaid_of_a_nested_flow():
    code, out = graph("tests.cli_flows:Outer")
    assert code == 0, out
    lines = [line.strip() for line in out.splitlines()]
    assert lines[0] == "flowchart TD"
    # steps in order, the sub-flow as a subgraph around its own steps
    order = [line.split("[", 1)[0] for line in lines if re.match(r"s[\d_]+\[", line)]
    assert order == ["s1", "s2_1", "s2_2", "s3"]
    sub = lines.index('subgraph f2["2 t.inner (sub-flow) · on failure: skipback"]')
    assert lines[sub + 1].startswith('s2_1["2.1 t.pack"]')
    assert lines[sub + 2].startswith('s2_2["2.2 t.notify<br/>on failure: skip<br/>local"]')
    assert lines[sub + 3] == "end"
    # non-default reactions are marked, the default (rollback) is not
    assert (
        's3["3 t.approve<br/>on KeyError: abort<br/>on failure: wait<br/>if undo fails: wait"]'
        in lines
    )
    assert 's1["1 t.reserve"]' in lines
    # forward path, start to end
    forward = [line for line in lines if " --> " in line]
    assert forward == [
        "start --> s1",
        "s1 --> s2_1",
        "s2_1 --> s2_2",
        "s2_2 --> s3",
        "s3 --> done",
    ]
    # compensations: dashed, from each step with a step_back to the one before it
    assert [line for line in lines if ".->" in line] == [
        "s1 -. undo .-> start",
        "s3 -. undo .-> s2_2",
    ]
    assert "class s3 wait" in lines and "class s2_2 skip" in lines


def test_dot_of_a_nested_flow():
    code, out = graph("tests.cli_flows:Outer", "--format", "dot")
    assert code == 0, out
    assert out.startswith('digraph "t.outer" {')
    assert out.rstrip().endswith("}")
    assert "subgraph cluster_2 {" in out
    assert 'label="2 t.inner (sub-flow) · on failure: skipback";' in out
    assert 's2_2 [label="2.2 t.notify\\non failure: skip\\nlocal"' in out
    assert "s1 -> s2_1;" in out and "s2_2 -> s3;" in out
    assert 's3 -> s2_2 [style=dashed, label="undo", constraint=false];' in out
    assert 's1 -> start [style=dashed, label="undo", constraint=false];' in out
    assert "s2_1 -> s1 [style=dashed" not in out  # t.pack has no step_back
    assert out.count("{") == out.count("}")


def test_the_readme_shows_what_graph_draws():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    shown = re.findall(r"```mermaid\n(.*?)```", readme, re.S)
    code, out = graph("samples.shipping.flows:ShipOrder")
    assert code == 0
    assert shown == [out]


def test_graph_usage_errors_exit_2_naming_the_flow():
    code, out = graph("tests.cli_flows:Nope")
    assert code == 2
    assert "'tests.cli_flows:Nope' does not resolve" in out
    code, out = graph("tests.cli_flows:NOT_A_FLOW")
    assert code == 2
    assert "not a qwit.Flow subclass" in out
    code, out = graph("tests.cli_flows:Empty")
    assert code == 2
    assert "t.empty" in out
    code, out = graph("tests.cli_flows")
    assert code == 2
    assert "is not MODULE:FLOW" in out


def test_every_failure_reaction_is_drawn():
    # A FALLBACK step (the quote sample has three) made both formats crash
    # (KeyError: its fill colour was missing), exit 1.
    from qwit._cli._graph import REACTION_COLOURS
    from qwit._options import Reaction

    assert set(REACTION_COLOURS) == set(Reaction) - {Reaction.ROLLBACK, Reaction.RETRY}
    for fmt in ("mermaid", "dot"):
        code, out = graph("samples.quote.flows:QuoteShipment", "--format", fmt)
        assert code == 0, out
        assert "on failure: fallback" in out
    code, out = graph("samples.quote.flows:QuoteShipment")
    assert "classDef fallback fill:#dcf5dc" in out
