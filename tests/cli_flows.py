"""Flows for the command-line tests."""

from __future__ import annotations

from typing import Any

import qwit


class Reserve(qwit.Step, name="t.reserve"):
    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"reserved": True}

    def step_back(self, args: dict[str, Any]) -> None:
        pass


class Pack(qwit.Step, name="t.pack"):
    """Nothing to undo."""

    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"packed": True}


class Notify(qwit.Step, name="t.notify"):
    on_failure = qwit.SKIP
    local = True

    def step_forward(self, args: dict[str, Any]) -> None:
        if args.get("fail_notify"):
            raise qwit.StepError("mail server down", retry=False)


class Approve(qwit.Step, name="t.approve"):
    on_failure = {KeyError: qwit.ABORT, "default": qwit.WAIT}
    back_on_failure = qwit.WAIT
    retry = qwit.Retry(max_attempts=1)

    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        if not args.get("approved"):
            raise qwit.StepError("needs approval")
        return {"approved_by": "ops"}

    def step_back(self, args: dict[str, Any]) -> None:
        pass


class Inner(qwit.Flow, name="t.inner"):
    def build_flow(self) -> None:
        self.step(Pack)
        self.step(Notify)


class Outer(qwit.Flow, name="t.outer"):
    def build_flow(self) -> None:
        self.step(Reserve)
        self.step(Inner, {"box": "small"}, on_failure=qwit.SKIPBACK)
        self.step(Approve)


class Flaky(qwit.Step, name="t.flaky"):
    """Fails its first two attempts."""

    retry = qwit.Retry(max_attempts=3, initial_interval=0.3)

    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        attempt = qwit.context().attempt
        if attempt < 3:
            raise ConnectionError(f"try {attempt} refused")
        return {"attempt": attempt}


class Retried(qwit.Flow, name="t.retried"):
    def build_flow(self) -> None:
        self.step(Reserve)
        self.step(Flaky)


class Empty(qwit.Flow, name="t.empty"):
    def build_flow(self) -> None:
        pass


NOT_A_FLOW = 42
