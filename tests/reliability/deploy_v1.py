"""Release flow, version 1 (served by a worker the deploy test replaces)."""

from __future__ import annotations

from typing import Any

import qwit


class Prepare(qwit.Step, name="deploy.prepare"):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"prepared": True}


class Approve(qwit.Step, name="deploy.approve"):
    """Waits for an operator: fails until the args say approved."""

    retry = qwit.Retry(max_attempts=1)
    on_failure = qwit.WAIT

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        if not args.get("approved"):
            raise PermissionError("release not approved yet")
        return {"approved_by": args.get("approver", "ops")}


class Finish(qwit.Step, name="deploy.finish"):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"finished_by": "v1"}


class Release(qwit.Flow, name="deploy.release"):
    def build_flow(self) -> None:
        self.step(Prepare)
        self.step(Approve)
        self.step(Finish)
