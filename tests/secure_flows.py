"""Flows whose every payload carries the secret in args['secret']: its input,
its steps' outputs, a step's failure message and so the rolled-back outcome.
Served in-process and by `qwit-worker` subprocesses."""

from __future__ import annotations

from typing import Any

import qwit


class Remember(qwit.Step, name="secure.remember"):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"remembered": f"output of {args['secret']}"}

    async def step_back(self, args: dict[str, Any]) -> None:
        assert args["remembered"].endswith(args["secret"])


class Explode(qwit.Step, name="secure.explode"):
    retry = qwit.Retry(max_attempts=1)

    async def step_forward(self, args: dict[str, Any]) -> None:
        if args.get("explode", True):
            raise RuntimeError(f"card declined for {args['secret']}")


class Complete(qwit.Flow, name="secure.complete"):
    def build_flow(self) -> None:
        self.step(Remember)


class RollBack(qwit.Flow, name="secure.roll_back"):
    """A completed sub-flow (a child workflow), then a failure: both roll back."""

    def build_flow(self) -> None:
        self.step(Complete)
        self.step(Explode)


class WaitThenFinish(qwit.Flow, name="secure.wait_then_finish"):
    """Parks on the failure until an operator retries it with explode=False."""

    def build_flow(self) -> None:
        self.step(Remember)
        self.step(Explode, on_failure=qwit.WAIT)
