"""Release flow, version 2: `deploy.finish` is renamed `deploy.complete`, and a
step `deploy.publish` is added.

The old step stays registered (with its new code) until the flows started on
version 1, whose plans name it, have finished: the rule for renaming a step.
"""

from __future__ import annotations

from typing import Any

import qwit
from tests.reliability.deploy_v1 import Approve, Prepare


class Finish(qwit.Step, name="deploy.finish"):
    """Kept for flows in flight whose plans name it."""

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"finished_by": "v2"}


class Complete(qwit.Step, name="deploy.complete"):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"completed_by": "v2"}


class Publish(qwit.Step, name="deploy.publish"):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"published": True}


class Release(qwit.Flow, name="deploy.release"):
    def build_flow(self) -> None:
        self.step(Prepare)
        self.step(Approve)
        self.step(Complete)
        self.step(Publish)
