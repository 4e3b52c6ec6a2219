"""Flows whose recorded histories are replayed on every change (tests/histories/).

Record them again with `python -m tests.record_histories` after a change to
the workflow that is meant to change its history (and keep the old files: flows
in flight were recorded with them).
"""

from __future__ import annotations

from typing import Any

import qwit


class Reserve(qwit.Step):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"reservation": f"r-{args['order_id']}"}

    async def step_back(self, args: dict[str, Any]) -> None:
        return None


class Charge(qwit.Step):
    retry = qwit.Retry(max_attempts=2, initial_interval=0.1, max_interval=0.1)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("fail_payment"):
            raise qwit.StepError("card declined", retry=False)
        return {"charge": "c-1"}

    async def step_back(self, args: dict[str, Any]) -> None:
        return None


class Ship(qwit.Step):
    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"tracking": "t-1"}


class OrderFlow(qwit.Flow):
    def build_flow(self) -> None:
        self.step(Reserve, {"warehouse": "w1"})
        self.step(Charge)
        self.step(Ship)
