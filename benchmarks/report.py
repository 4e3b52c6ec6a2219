"""Figures from the raw measurements: flat JSON keys, and a table to read."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from benchmarks.measure import median, percentile
from benchmarks.shapes import (
    BIG_STEPS,
    FIVE,
    LATENCY_SHAPES,
    ONE,
    TWENTY,
    TYPED_HISTORY_SHAPES,
    TYPINGS,
    big,
)


@dataclass(frozen=True)
class Row:
    section: str
    label: str
    unit: str
    qwit: float
    hand: float
    ratio: float
    spread: tuple[float, float] | None = None
    """The lowest and highest QWIT / hand ratio of the paired runs (or
    rounds) the medians come from, where there are several."""


class Figures:
    """Each figure is a QWIT value, a hand-written value and their ratio.

    Keys: ``<metric>[_<unit>]_qwit<suffix>``, ``..._hand<suffix>`` and
    ``<metric>_ratio<suffix>`` (QWIT / hand-written), e.g.
    ``latency_p50_ms_qwit_5_steps`` and ``latency_p50_ratio_5_steps``.
    """

    def __init__(self) -> None:
        self.flat: dict[str, float] = {}
        self.rows: list[Row] = []

    def add(
        self,
        section: str,
        label: str,
        metric: str,
        unit: str,
        suffix: str,
        qwit: float,
        hand: float,
        pairs: tuple[list[float], list[float]] | None = None,
    ) -> None:
        unit_part = f"_{unit}" if unit else ""
        ratio = qwit / hand if hand else math.nan
        self.flat[f"{metric}{unit_part}_qwit{suffix}"] = _round(qwit)
        self.flat[f"{metric}{unit_part}_hand{suffix}"] = _round(hand)
        self.flat[f"{metric}_ratio{suffix}"] = round(ratio, 3)
        spread = _spread(*pairs) if pairs else None
        if spread is not None:
            self.flat[f"{metric}_ratio_min{suffix}"] = round(spread[0], 3)
            self.flat[f"{metric}_ratio_max{suffix}"] = round(spread[1], 3)
        self.rows.append(Row(section, label, unit, qwit, hand, ratio, spread))

    def alias(self, key: str, existing: str) -> None:
        """A headline key for a figure already added (e.g. ``history_events_ratio``)."""
        self.flat[key] = self.flat[existing]


def _spread(qwit: list[float], hand: list[float]) -> tuple[float, float] | None:
    """Lowest and highest ratio of the runs made side by side (run i of
    each side), when there are at least two."""
    ratios = [q / h for q, h in zip(qwit, hand, strict=False) if h]
    return (min(ratios), max(ratios)) if len(ratios) >= 2 else None


def _round(value: float) -> float:
    if isinstance(value, int) or float(value).is_integer():
        return int(value)
    return round(value, 3 if abs(value) < 10 else 1)


def _label(key: str) -> str:
    return key.replace("_", " ")


def build(results: dict[str, Any]) -> Figures:
    figures = Figures()
    for server, suffix, where in (
        ("fast", "", "tuned dev server"),
        ("default", "_default_server", "default dev server"),
    ):
        _latency(figures, results["latency"][server], suffix, where)
        _phases(figures, results["step_phases"][server], suffix, where)
    for store, suffix in (
        ("memory", ""),
        ("unsandboxed", "_unsandboxed"),
        ("sqlite", "_sqlite"),
    ):
        if store in results["throughput"]:
            _throughput(figures, results["throughput"][store], suffix, store)
    _history(figures, results["history"])
    if "parallel" in results:
        _parallel(figures, results["parallel"])
    _workers(figures, results["workers"])
    return figures


def _parallel(figures: Figures, found: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Figures of the parallel shapes; a side's ``*_runs_ms`` are lists."""
    section = (
        "Parallel blocks and maps (maps: 50 at once; fail: the last item fails, the rest undone)"
    )
    for key, sides in found.items():
        label = key.replace("_", " ")
        for metric, unit, title in (
            ("latency_p50", "ms", "latency p50 (ms)"),
            ("worker_cpu", "ms_per_flow", "worker CPU per flow (ms)"),
            ("history_events", "", "history events"),
            ("history_bytes", "", "history bytes"),
        ):
            source = {"history_events": "events", "history_bytes": "bytes"}.get(
                metric, f"{metric}_{unit}"
            )
            runs = {"latency_p50": "latency_runs_ms", "worker_cpu": "worker_cpu_runs_ms"}
            pairs: tuple[list[float], list[float]] | None = None
            if metric in runs and runs[metric] in sides["qwit"]:
                runs_of = runs[metric]
                pairs = (sides["qwit"][runs_of], sides["hand"][runs_of])
            figures.add(
                section,
                f"{label}: {title}",
                metric,
                unit,
                f"_{key}",
                sides["qwit"][source],
                sides["hand"][source],
                pairs,
            )


def _latency(
    figures: Figures, samples: dict[str, dict[str, list[float]]], suffix: str, where: str
) -> None:
    section = f"Latency of one flow, {where} (ms)"
    for shape in LATENCY_SHAPES:
        by_side = samples[shape.key]
        for q in (50, 95):
            figures.add(
                section,
                f"p{q} {_label(shape.key)}",
                f"latency_p{q}",
                "ms",
                f"_{shape.key}{suffix}",
                percentile(by_side["qwit"], q),
                percentile(by_side["hand"], q),
            )
    # The cost of one more step: the slope between the 1- and 20-step flows.
    steps = TWENTY.steps - ONE.steps
    per_step = {
        side: (percentile(samples[TWENTY.key][side], 50) - percentile(samples[ONE.key][side], 50))
        / steps
        for side in ("qwit", "hand")
    }
    figures.add(
        section,
        "per step (p50 slope, 1 to 20 steps)",
        "latency_per_step",
        "ms",
        suffix,
        per_step["qwit"],
        per_step["hand"],
    )


def _phases(figures: Figures, phases: dict[str, dict[str, float]], suffix: str, where: str) -> None:
    section = f"Where a step's time goes, {where} (ms, medians from history event times)"
    labels = {
        "activity": "activity: scheduled to completed",
        "task_dispatch": "next workflow task: scheduled to picked up",
        "task_run": "next workflow task: picked up to completed",
        "first_task_run": "first workflow task: picked up to completed (per flow)",
    }
    for phase, label in labels.items():
        figures.add(
            section,
            label,
            f"step_{phase}",
            "ms",
            suffix,
            phases["qwit"][phase],
            phases["hand"][phase],
        )


def _throughput(
    figures: Figures, rounds: dict[str, list[dict[str, float]]], suffix: str, store: str
) -> None:
    where = {
        "memory": "in memory",
        "unsandboxed": "in memory, both workers without the workflow sandbox",
        "sqlite": "SQLite",
    }[store]
    section = f"Throughput, {FIVE.steps}-step flows all in flight at once, one worker, {where}"

    def med(side: str, key: str) -> float:
        return median([r[key] for r in rounds[side]])

    rows = (
        ("flows/s", "throughput", "flows_per_s"),
        ("steps/s", "throughput_steps", "per_s"),
        ("worker CPU ms per flow", "worker_cpu", "ms_per_flow"),
        ("server CPU ms per flow", "server_cpu", "ms_per_flow"),
        ("client CPU ms per flow", "client_cpu", "ms_per_flow"),
    )
    sources = {
        "throughput": "flows_per_s",
        "throughput_steps": "steps_per_s",
        "worker_cpu": "worker_cpu_ms_per_flow",
        "server_cpu": "server_cpu_ms_per_flow",
        "client_cpu": "client_cpu_ms_per_flow",
    }
    for label, metric, unit in rows:
        source = sources[metric]
        pairs = ([r[source] for r in rounds["qwit"]], [r[source] for r in rounds["hand"]])
        figures.add(
            section, label, metric, unit, suffix, med("qwit", source), med("hand", source), pairs
        )


def _history(figures: Figures, histories: dict[str, dict[str, dict[str, int]]]) -> None:
    section = "Temporal history per flow"
    for shape in LATENCY_SHAPES:
        by_side = histories[shape.key]
        for metric in ("events", "bytes"):
            figures.add(
                section,
                f"{metric} {_label(shape.key)}",
                f"history_{metric}",
                "",
                f"_{shape.key}",
                by_side["qwit"][metric],
                by_side["hand"][metric],
            )
        figures.add(
            section,
            f"workflow input bytes {_label(shape.key)}",
            "workflow_input",
            "bytes",
            f"_{shape.key}",
            by_side["qwit"]["input_bytes"],
            by_side["hand"]["input_bytes"],
        )
    # Typed steps are sent only what they read, as the hand-written saga's
    # activities are: the same flow, step for step.
    for typed, same in zip(TYPED_HISTORY_SHAPES, (FIVE, TWENTY), strict=True):
        figures.add(
            section,
            f"bytes {_label(same.key)}, QWIT steps typed",
            "history_bytes",
            "",
            f"_{typed.key}",
            histories[typed.key]["qwit"]["bytes"],
            histories[same.key]["hand"]["bytes"],
        )
    figures.alias("history_events_ratio", f"history_events_ratio_{FIVE.key}")
    figures.alias("history_bytes_ratio", f"history_bytes_ratio_{FIVE.key}")

    section = "History of steps returning 1 KB each (bytes)"
    for typing in TYPINGS:
        suffix = "" if typing == "untyped" else f"_{typing}"
        kind = typing.replace("_", " ")
        for steps in BIG_STEPS:
            figures.add(
                section,
                f"{steps} steps, QWIT {kind}",
                "history_bytes",
                "",
                f"_{big(steps, typing).key}",
                histories[big(steps, typing).key]["qwit"]["bytes"],
                histories[big(steps).key]["hand"]["bytes"],
            )
        # Bytes double when history grows linearly with the steps (exponent
        # 1), and more than double when it grows quadratically (towards 2).
        small, large = (big(n, typing).key for n in BIG_STEPS)
        base_small, base_large = (big(n).key for n in BIG_STEPS)
        scale = math.log(BIG_STEPS[1] / BIG_STEPS[0])
        figures.add(
            section,
            f"growth exponent {BIG_STEPS[0]} to {BIG_STEPS[1]} steps, QWIT {kind}",
            "history_growth_exponent",
            "",
            f"_1kb{suffix}",
            math.log(histories[large]["qwit"]["bytes"] / histories[small]["qwit"]["bytes"]) / scale,
            math.log(
                histories[base_large]["hand"]["bytes"] / histories[base_small]["hand"]["bytes"]
            )
            / scale,
        )


def _workers(figures: Figures, workers: dict[str, Any]) -> None:
    section = "Worker process (one per side, tuned in-memory server)"
    figures.add(
        section,
        "RSS after warm-up (MB)",
        "worker_rss_idle",
        "mb",
        "",
        workers["idle"]["qwit"]["rss"],
        workers["idle"]["hand"]["rss"],
    )
    figures.add(
        section,
        "peak RSS, throughput run included (MB)",
        "worker_rss_peak",
        "mb",
        "",
        workers["end"]["qwit"]["peak"],
        workers["end"]["hand"]["peak"],
    )
    figures.add(
        section,
        "start to ready (s)",
        "worker_ready",
        "s",
        "",
        workers["ready_s"]["qwit"],
        workers["ready_s"]["hand"],
    )


def _cell(value: float) -> str:
    if math.isnan(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100 or float(value).is_integer():
        return f"{value:.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def table(figures: Figures) -> str:
    """The figures as a Markdown table, one section after another."""
    lines: list[str] = []
    section = None
    for row in figures.rows:
        if row.section != section:
            section = row.section
            if lines:
                lines.append("")
            lines += [
                f"**{section}**",
                "",
                "| figure | QWIT | hand-written | QWIT / hand | lowest-highest |",
            ]
            lines.append("|---|---:|---:|---:|---:|")
        spread = f"{row.spread[0]:.2f}-{row.spread[1]:.2f}" if row.spread else ""
        lines.append(
            f"| {row.label} | {_cell(row.qwit)} | {_cell(row.hand)} | {row.ratio:.2f} | {spread} |"
        )
    return "\n".join(lines)
