"""``qwit graph MODULE:FLOW``: the compiled plan as a Mermaid or Graphviz flowchart.

Solid edges are the forward path, step by step; sub-flows are subgraphs.
Dashed edges are compensations: from each step that has a ``step_back`` to
the step before it, the way a rollback walks back. A step whose failure
reaction is not the default (ROLLBACK) says so in its box.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import click

from .._errors import FlowDefinitionError
from .._flow import compile_flow
from .._options import FailurePolicy, Reaction
from .._plan import FlowNode, MapNode, Node, ParallelNode, StepNode, child_path, walk
from ._common import resolve_flow

#: Fill colours of steps by failure reaction, for both formats.
REACTION_COLOURS = {
    Reaction.WAIT: "#fff3b0",
    Reaction.SKIP: "#e8e8e8",
    Reaction.SKIPBACK: "#dbe9ff",
    Reaction.ABORT: "#ffd6d6",
    Reaction.FALLBACK: "#dcf5dc",
}


@dataclass(frozen=True)
class Box:
    """A step of the plan, placed: its id, path and the lines of its label."""

    id: str
    path: str
    lines: tuple[str, ...]
    has_back: bool
    reaction: Reaction


def _node_id(path: str) -> str:
    return "s" + path.replace(".", "_").replace("*", "each")


def policy_lines(policy: FailurePolicy) -> list[str]:
    """How a step reacts to failure, when it is not the default ROLLBACK."""
    lines = [f"on {rule.match.rsplit('.', 1)[-1]}: {rule.reaction.value}" for rule in policy.rules]
    if policy.default != Reaction.ROLLBACK:
        lines.append(f"on failure: {policy.default.value}")
    return lines


def _box(node: StepNode, path: str) -> Box:
    lines = [f"{path} {node.name}", *policy_lines(node.on_failure)]
    if node.back_on_failure != Reaction.ROLLBACK:
        lines.append(f"if undo fails: {node.back_on_failure.value}")
    if node.local:
        lines.append("local")
    # Coloured by the reaction to most failures: the default, else the first rule's.
    marked = [node.on_failure.default] + [r.reaction for r in node.on_failure.rules]
    reaction = next((r for r in marked if r != Reaction.ROLLBACK), Reaction.ROLLBACK)
    return Box(_node_id(path), path, tuple(lines), node.has_back, reaction)


def _boxes(flow: FlowNode) -> Iterator[Box]:
    for path, node, _ in walk(flow):
        if isinstance(node, StepNode):
            yield _box(node, path)


def _indent(depth: int) -> str:
    return "    " * (depth + 1)


def _outline(flow: FlowNode) -> Iterator[tuple[str, Node | None, int]]:
    """The plan's nodes as ``walk`` gives them, each sub-flow (parallel block,
    map) followed, after its last node, by ``(its path, None, its depth)``:
    where it closes."""
    opened: list[tuple[str, int]] = []
    for path, node, depth in walk(flow):
        while opened and opened[-1][1] >= depth:
            sub_path, sub_depth = opened.pop()
            yield sub_path, None, sub_depth
        yield path, node, depth
        if not isinstance(node, StepNode):
            opened.append((path, depth))
    for sub_path, sub_depth in reversed(opened):
        yield sub_path, None, sub_depth


def _subflow_title(node: Node, path: str) -> str:
    if isinstance(node, ParallelNode):
        return f"{path} parallel: {len(node.branches)} branches side by side"
    if isinstance(node, MapNode):
        return (
            f"{path} map {node.name} over {node.over} (as {node.item}, into {node.into}; "
            f"{node.max_concurrency} at once)"
        )
    assert isinstance(node, FlowNode)
    return " · ".join([f"{path} {node.name} (sub-flow)", *policy_lines(node.on_failure)])


def _wire(node: Node, path: str, edges: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """Add ``node``'s inner edges; return the boxes it starts at and ends at.

    A sequence chains its nodes; a parallel block forks to its branches and
    joins after them; a map is its element's node, drawn once.
    """
    if isinstance(node, StepNode):
        return [_node_id(path)], [_node_id(path)]
    if isinstance(node, MapNode):
        return _wire(node.node, f"{path}.*", edges)
    if isinstance(node, ParallelNode):
        starts: list[str] = []
        ends: list[str] = []
        for i, branch in enumerate(node.branches):
            first, last = _wire(branch, child_path(path, i), edges)
            starts += first
            ends += last
        return starts, ends
    starts, ends = [], []
    for i, step in enumerate(node.steps):
        inner: list[tuple[str, str]] = []
        first, last = _wire(step, child_path(path, i), inner)
        if not starts:
            starts = first
        edges.extend((a, b) for a in ends for b in first)  # into it, then through it
        edges.extend(inner)
        ends = last
    return starts, ends


def _edges(flow: FlowNode) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Forward edges, start to end, and compensation edges: each undo leads to
    the undos of what the step came after (a join's, to each branch's)."""
    inner: list[tuple[str, str]] = []
    first, last = _wire(flow, "", inner)
    forward = [("start", b) for b in first] + inner + [(a, "done") for a in last]
    has_back = {box.id for box in _boxes(flow) if box.has_back}
    back = [(b, a) for a, b in forward if b in has_back]
    return forward, back


def _mermaid_text(text: str) -> str:
    return text.replace('"', "#quot;")


def mermaid(flow: FlowNode) -> str:
    """The plan as a Mermaid flowchart."""
    out = ["flowchart TD", f'    start(["{_mermaid_text(flow.name)}"])']
    classes: dict[Reaction, list[str]] = {}
    for path, step, depth in _outline(flow):
        indent = _indent(depth)
        if step is None:
            out.append(f"{indent}end")
        elif not isinstance(step, StepNode):
            title = _mermaid_text(_subflow_title(step, path))
            out.append(f'{indent}subgraph f{_node_id(path)[1:]}["{title}"]')
        else:
            box = _box(step, path)
            label = "<br/>".join(_mermaid_text(line) for line in box.lines)
            out.append(f'{indent}{box.id}["{label}"]')
            if box.reaction != Reaction.ROLLBACK:
                classes.setdefault(box.reaction, []).append(box.id)
    out.append('    done(["completed"])')
    forward, back = _edges(flow)
    out += [f"    {a} --> {b}" for a, b in forward]
    out += [f"    {a} -. undo .-> {b}" for a, b in back]
    for reaction, ids in classes.items():
        out.append(f"    classDef {reaction.value} fill:{REACTION_COLOURS[reaction]}")
        out.append(f"    class {','.join(ids)} {reaction.value}")
    return "\n".join(out) + "\n"


def _dot_text(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dot(flow: FlowNode) -> str:
    """The plan as a Graphviz digraph."""
    out = [
        f"digraph {_dot_text(flow.name)} {{",
        "    rankdir=TB;",
        '    node [shape=box, style=rounded, fontname="Helvetica"];',
        '    edge [fontname="Helvetica", fontsize=10];',
        f"    start [label={_dot_text(flow.name)}, shape=oval];",
    ]
    for path, step, depth in _outline(flow):
        indent = _indent(depth)
        if step is None:
            out.append(f"{indent}}}")
        elif not isinstance(step, StepNode):
            out.append(f"{indent}subgraph cluster_{_node_id(path)[1:]} {{")
            out.append(f"{indent}    label={_dot_text(_subflow_title(step, path))};")
            out.append(f"{indent}    style=rounded;")
        else:
            box = _box(step, path)
            attrs = "label=" + _dot_text("\n".join(box.lines)).replace("\n", "\\n")
            if box.reaction != Reaction.ROLLBACK:
                colour = REACTION_COLOURS[box.reaction]
                attrs += f', style="rounded,filled", fillcolor="{colour}"'
            out.append(f"{indent}{box.id} [{attrs}];")
    out.append('    done [label="completed", shape=oval];')
    forward, back = _edges(flow)
    out += [f"    {a} -> {b};" for a, b in forward]
    out += [f'    {a} -> {b} [style=dashed, label="undo", constraint=false];' for a, b in back]
    out.append("}")
    return "\n".join(out) + "\n"


@click.command("graph")
@click.argument("flow_spec", metavar="MODULE:FLOW")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["mermaid", "dot"], case_sensitive=False),
    default="mermaid",
    show_default=True,
    help="Mermaid (renders on GitHub) or Graphviz dot.",
)
def graph(flow_spec: str, fmt: str) -> None:
    """Print a flowchart of the flow MODULE:FLOW.

    Steps in order, sub-flows as subgraphs, failure reactions other than the
    default rollback marked, and compensations as dashed edges from each step
    that has a step_back to the step before it.
    """
    flow, _ = resolve_flow(flow_spec)
    try:
        plan = compile_flow(flow)
    except FlowDefinitionError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(mermaid(plan) if fmt == "mermaid" else dot(plan), nl=False)
