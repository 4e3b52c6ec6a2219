"""The hand-written side's activities: the same work, registered under the
same activity names as QWIT's steps, so histories differ only by payloads."""

from __future__ import annotations

from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from benchmarks import work


@activity.defn(name="work.step_forward")
async def work_forward(args: dict[str, Any]) -> dict[str, str]:
    return work.forward(args["i"], args.get("size", 0))


@activity.defn(name="work.step_back")
async def work_back(args: dict[str, Any]) -> None:
    work.back(args["i"])


@activity.defn(name="fail.step_forward")
async def fail_forward(args: dict[str, Any]) -> None:
    try:
        work.fail(args["i"])
    except work.Declined as exc:
        raise ApplicationError(str(exc), type="Declined", non_retryable=True) from exc


@activity.defn(name="item.step_forward")
async def item_forward(args: dict[str, Any]) -> dict[str, str]:
    if args.get("fail"):
        raise ApplicationError(f"item {args['i']} failed on purpose", non_retryable=True)
    return work.forward(args["i"])


@activity.defn(name="item.step_back")
async def item_back(args: dict[str, Any]) -> None:
    work.back(0)


ACTIVITIES = (work_forward, work_back, fail_forward, item_forward, item_back)
