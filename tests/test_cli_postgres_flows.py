"""Flows the command-line tests of the PostgreSQL engine run."""

from __future__ import annotations

from typing import Any

import qwit


class PgCliReserve(qwit.Step, name="pgcli.reserve"):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"reserved": args["n"]}

    async def step_back(self, args: dict[str, Any]) -> None:
        return None


class PgCliCharge(qwit.Step, name="pgcli.charge"):
    retry = qwit.Retry(max_attempts=1)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("fail"):
            raise qwit.StepError("card declined", retry=False)
        return {"charged": True}


class PgCliOrder(qwit.Flow, name="pgcli.order"):
    def build_flow(self) -> None:
        self.step(PgCliReserve)
        self.step(PgCliCharge)


class PgCliAborting(qwit.Flow, name="pgcli.aborting"):
    def build_flow(self) -> None:
        self.step(PgCliReserve)
        self.step(PgCliCharge, on_failure=qwit.ABORT)


class PgCliApprove(qwit.Step, name="pgcli.approve"):
    """Waits for an operator until the args say ``ok``."""

    on_failure = qwit.WAIT
    retry = qwit.Retry(max_attempts=1)

    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        if not args.get("ok"):
            raise qwit.StepError("needs approval", retry=False)
        return {"approved": True}

    def step_back(self, args: dict[str, Any]) -> None:
        return None


class PgCliWaiting(qwit.Flow, name="pgcli.waiting"):
    def build_flow(self) -> None:
        self.step(PgCliReserve)
        self.step(PgCliApprove)


class PgCliWaitingInside(qwit.Flow, name="pgcli.waiting_inside"):
    """A flow whose sub-flow waits for an operator: it waits too."""

    def build_flow(self) -> None:
        self.step(PgCliWaiting)


class PgCliSlow(qwit.Step, name="pgcli.slow"):
    """Says it started (a file in ``args["dir"]``), runs 2 s, says it is done;
    one attempt only: one cut off fails it."""

    retry = qwit.Retry(max_attempts=1)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        import asyncio
        from pathlib import Path

        (Path(args["dir"]) / "started").touch()
        await asyncio.sleep(2)
        (Path(args["dir"]) / "done").touch()
        return {"slow": "done"}


class PgCliDeploy(qwit.Flow, name="pgcli.deploy"):
    def build_flow(self) -> None:
        self.step(PgCliSlow)
        self.step(PgCliReserve, {"n": 1})


class PgCliPlainLong(qwit.Step, name="pgcli.plain_long"):
    """A plain step (a thread nothing can stop) of 30 s; says it started."""

    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        import time
        from pathlib import Path

        (Path(args["dir"]) / "started").touch()
        time.sleep(30)
        return {}


class PgCliPlainLongFlow(qwit.Flow, name="pgcli.plain_long_flow"):
    def build_flow(self) -> None:
        self.step(PgCliPlainLong)
