"""A flow whose step fails deep in a helper, for ``qwit run -v`` and ``qwit status -v``."""

from __future__ import annotations

from typing import Any

import qwit

PRICES = {"apple": 1}


def price_of(item: str) -> int:
    """A helper that fails: the traceback must show this frame."""
    return PRICES[item]


class Price(qwit.Step, name="v.price"):
    retry = qwit.Retry(max_attempts=1)

    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"price": price_of(args["item"])}


class Reserve(qwit.Step, name="v.reserve"):
    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"reserved": True}

    def step_back(self, args: dict[str, Any]) -> None:
        pass


class PriceFlow(qwit.Flow, name="v.price_flow"):
    def build_flow(self) -> None:
        self.step(Reserve)
        self.step(Price)
