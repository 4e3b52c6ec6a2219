"""What a redrive starts from: an ended flow's records, turned into the
input of its next run (``Client.redrive``)."""

from __future__ import annotations

import secrets
from typing import Any

from ._engine import Engine
from ._errors import ReactionError
from ._jsonargs import NotJSON, as_args
from ._plan import FlowInput, FlowNode, FlowRecords, Redrive, StepRecord, node_at, relative_place
from ._state import FINAL_STATUSES


async def redrive_input(
    engine: Engine, flow_id: str, from_step: str | None, args: Any
) -> FlowInput:
    """The input of the run that redrives ``flow_id``'s last run.

    Raises:
        ReactionError: the flow has not ended, completed, or can't be
            redriven from ``from_step`` (or with ``args``).
        FlowNotFound: no flow has this id.
    """
    earlier = await engine.flow_records(flow_id)
    status = earlier.status
    if status not in FINAL_STATUSES:
        raise ReactionError(
            f"flow {flow_id!r} is {status}: only a flow that has ended can be redriven"
        )
    if status == "completed":
        raise ReactionError(f"flow {flow_id!r} completed: there is nothing to redrive")
    try:
        corrections = as_args(args, "args")
    except NotJSON as exc:
        raise ReactionError(f"flow {flow_id!r}: args {exc}") from None
    failure = earlier.failure
    input = earlier.input
    steps = await _with_subflows(engine, earlier.steps)
    kept = status == "aborted" or (
        status == "cancelled" and failure is not None and not failure.rolled_back
    )
    sharded = _sharded(steps) if kept or status == "compensation_failed" else None
    if sharded is not None:  # (refused here: the new run could not start)
        raise ReactionError(
            f"flow {flow_id!r}: the map at {sharded} ran in shards; a redrive can't "
            "reuse or undo it yet"
        )
    if kept:  # its effects are kept: resume where it stopped, or from ``from_step``
        resume = _resume_path(flow_id, input.flow, steps, from_step)
        redrive = Redrive(
            of_run=earlier.run_id,
            records=steps,
            resume=resume,
            corrections=corrections,
            failure=failure,
            # where it stopped, in a block or a map: what completed there stays
            keep_members=from_step is None and _is_group_at(steps, resume),
        )
    elif status == "compensation_failed":
        if from_step is not None:
            raise ReactionError(
                f"flow {flow_id!r}: a flow whose rollback failed is redriven by finishing "
                "its rollback, from where it is (no from_step)"
            )
        # ``args`` reach the undos it runs, over their recorded args and outputs
        redrive = Redrive(
            of_run=earlier.run_id,
            mode="rollback",
            records=steps,
            failure=failure,
            corrections=corrections,
        )
    else:  # rolled back: its steps were undone; it starts again from its start
        if from_step is not None:
            raise ReactionError(
                f"flow {flow_id!r} was {status.replace('_', ' ')}: its steps were undone, so "
                "it starts again from its start (no from_step)"
            )
        redrive = Redrive(of_run=earlier.run_id, failure=failure)
        input = input.model_copy(update={"args": {**input.args, **corrections}})
    return input.model_copy(
        update={"execution": secrets.token_urlsafe(16), "redrive": redrive, "payload_limit": None}
    )


async def _with_subflows(engine: Engine, steps: list[StepRecord]) -> list[StepRecord]:
    """``steps`` with each sub-flow's own records read in (recursively)."""
    filled = []
    for step in steps:
        update: dict[str, Any] = {}
        if step.members:
            update["members"] = await _with_subflows(engine, step.members)
        if step.sub is not None:
            update["sub"] = await _with_subflows(engine, step.sub)
        elif step.sub_id is not None:
            child: FlowRecords = await engine.flow_records(step.sub_id)
            update["sub"] = await _with_subflows(engine, child.steps)
        filled.append(step.model_copy(update=update) if update else step)
    return filled


def _sharded(steps: list[StepRecord]) -> str | None:
    """The path of a map among ``steps`` (or inside them) that ran in shards."""
    for step in steps:
        if step.sharded:
            return step.path
        inner = _sharded(step.members) or _sharded(step.sub or [])
        if inner is not None:
            return inner
    return None


def _stopped_at(steps: list[StepRecord]) -> str | None:
    """The path of the step a flow stopped at (inside a sub-flow: its own
    step; in a block or a map: the block), or of its first step not run."""
    for step in steps:
        if step.status == "failed":
            inner = _stopped_at(step.sub) if step.sub else None
            return inner or step.path
        if step.status == "pending":
            return step.path
    return None


def _resume_path(
    flow_id: str, plan: FlowNode, steps: list[StepRecord], from_step: str | None
) -> str:
    stopped = _stopped_at(steps)
    if stopped is None:
        raise ReactionError(f"flow {flow_id!r} has no step left to resume from")
    if from_step is None:
        return stopped
    resume = _find(flow_id, plan, steps, from_step.strip())
    if relative_place(resume, stopped) == "after":
        raise ReactionError(
            f"flow {flow_id!r}: can't redrive from {from_step!r}, after the step it stopped "
            f"at ({stopped}): that step would never run"
        )
    return resume


def _find(flow_id: str, plan: FlowNode, steps: list[StepRecord], path: str) -> str:
    """``path`` as a redrive resumes from it: a step of a block or a map
    resumes the block (or map) as a whole.

    Raises:
        ReactionError: no such step, or it was undone.
    """
    for step in steps:
        place = relative_place(step.path, path) if _is_path(path) else "before"
        if place == "at":
            if step.status in ("compensated", "compensating", "compensation_failed"):
                raise ReactionError(
                    f"flow {flow_id!r}: step {path} was undone; redrive from a step that was not"
                )
            return step.path
        if place == "inside":
            if step.members and _exists(plan, step.members, path):
                return step.path  # a block or a map resumes as a whole
            if step.sub:
                return _find(flow_id, plan, step.sub, path)
            break
    raise ReactionError(f"flow {flow_id!r} has no step at path {path!r}")


def _exists(plan: FlowNode, steps: list[StepRecord], path: str) -> bool:
    """Whether the earlier run had a step at ``path`` among ``steps`` (or
    inside one of them; inside one that never ran: whether the plan has)."""
    for step in steps:
        place = relative_place(step.path, path)
        if place == "at":
            return True
        if place == "inside":
            inner = step.members or step.sub
            return _exists(plan, inner, path) if inner else node_at(plan, path) is not None
    return False


def _is_group_at(steps: list[StepRecord], path: str) -> bool:
    """Whether the step at ``path`` (a top-level one of ``steps``) is a
    parallel block or a map."""
    return any(step.path == path and step.members for step in steps)


def _is_path(path: str) -> bool:
    return bool(path) and all(part.isdigit() and int(part) > 0 for part in path.split("."))
