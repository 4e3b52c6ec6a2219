"""Flows whose recorded histories are replayed on every change (tests/histories/).

Record them again with `python -m tests.record_histories` after a change to
the workflow that is meant to change its history (and keep the old files: flows
in flight were recorded with them).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import temporalio.client
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

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


class BookCarrier(qwit.Step):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"booking": f"b-{args['order_id']}"}

    async def step_back(self, args: dict[str, Any]) -> None:
        return None


class PrintLabel(qwit.Step):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"label": f"l-{args['booking']}"}

    async def step_back(self, args: dict[str, Any]) -> None:
        return None


class Shipping(qwit.Flow):
    def build_flow(self) -> None:
        self.step(BookCarrier)
        self.step(PrintLabel)


class Notify(qwit.Step):
    retry = qwit.Retry(max_attempts=1)

    async def step_forward(self, args: dict[str, Any]) -> None:
        if args.get("fail_notify"):
            raise RuntimeError("mail server down")


class ShippedOrder(qwit.Flow):
    def build_flow(self) -> None:
        self.step(Reserve)
        self.step(Shipping, {"carrier": "ups"})
        self.step(Notify)


class WaitForCancel(qwit.Step):
    heartbeat_timeout = 2

    async def step_forward(self, args: dict[str, Any]) -> None:
        import asyncio

        while True:
            qwit.heartbeat()
            await asyncio.sleep(0.05)

    async def step_back(self, args: dict[str, Any]) -> None:
        return None


class Cancellable(qwit.Flow):
    def build_flow(self) -> None:
        self.step(Reserve)
        self.step(Shipping)
        self.step(WaitForCancel)


class Approve(qwit.Step):
    retry = qwit.Retry(max_attempts=1)
    on_failure = qwit.WAIT

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        if not args.get("approved"):
            raise PermissionError("waiting for approval")
        return {"approved_by": args.get("approver", "ops")}

    async def step_back(self, args: dict[str, Any]) -> None:
        return None


class Refund(qwit.Step):
    back_retry = qwit.Retry(max_attempts=1)
    back_on_failure = qwit.WAIT

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"refundable": True}

    async def step_back(self, args: dict[str, Any]) -> None:
        raise ConnectionError("refund service down")


class ApprovedOrder(qwit.Flow):
    def build_flow(self) -> None:
        self.step(Reserve)
        self.step(Approve)
        self.step(Ship)


class ApprovedQuote(qwit.Flow):
    """A wait (then published), and a final step after the flow ended."""

    def build_flow(self) -> None:
        self.step(Reserve)
        self.step(Approve)
        self.finally_step(Receipt)


class RefundOrder(qwit.Flow):
    def build_flow(self) -> None:
        self.step(Refund)
        self.step(Notify)


class Pack(qwit.Step):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("fail_pack"):
            raise qwit.StepError("no box", retry=False)
        return {"packed": True}

    async def step_back(self, args: dict[str, Any]) -> None:
        return None


class Greet(qwit.Step):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"greeted": args["user"]}

    async def step_back(self, args: dict[str, Any]) -> None:
        return None


class ParallelOrder(qwit.Flow):
    """A parallel block (a step and a sub-flow as branches) and a map."""

    def build_flow(self) -> None:
        self.step(Reserve)
        with self.parallel():
            self.step(Charge)
            self.step(Shipping)
            self.step(Pack, on_failure=qwit.WAIT)
        self.map(Greet, over="users", item="user", into="greetings", max_concurrency=2)
        self.step(Notify)


class GreetOrWait(qwit.Step):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("hold") == args["user"]:
            raise qwit.StepError(f"{args['user']} is not in yet", retry=False)
        if args.get("slow") == args["user"]:
            await asyncio.sleep(2)
        return {"greeted": args["user"]}

    async def step_back(self, args: dict[str, Any]) -> None:
        return None


class GreetOne(qwit.Flow):
    def build_flow(self) -> None:
        self.step(GreetOrWait, on_failure=qwit.WAIT)


class GreetAll(qwit.Flow):
    """A map of sub-flows, one at a time: one whose step waits gives its place."""

    def build_flow(self) -> None:
        self.map(GreetOne, over="users", item="user", into="greetings", max_concurrency=1)


class Wave(qwit.Step):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"waved": args["user"]}


class SlowWave(qwit.Step):
    """Waves for a second and a half, through any cancel."""

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.5
        while (left := end - loop.time()) > 0:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(left)
        return {"waved": "slowly"}

    async def step_back(self, args: dict[str, Any]) -> None:
        return None


class EndsWithASlowWave(qwit.Flow):
    """Cancelled while its last step runs (which completes anyway)."""

    def build_flow(self) -> None:
        self.step(Greet)
        self.step(SlowWave)


class GreetBesideWait(qwit.Flow):
    """A block whose branch waits beside one that ends: then nothing of it
    runs, and as a map's element it gives its place back."""

    def build_flow(self) -> None:
        with self.parallel():
            self.step(GreetOrWait, on_failure=qwit.WAIT)
            self.step(Wave)


class GreetAllBesideWaits(qwit.Flow):
    def build_flow(self) -> None:
        self.map(GreetBesideWait, over="users", item="user", into="greetings", max_concurrency=1)


class JammedLabel(qwit.Step):
    on_failure = qwit.ABORT
    retry = qwit.Retry(max_attempts=1)

    async def step_forward(self, args: dict[str, Any]) -> None:
        raise RuntimeError("printer jammed")


class JammedShipping(qwit.Flow):
    def build_flow(self) -> None:
        self.step(BookCarrier)
        self.step(JammedLabel)


class AbortedOrder(qwit.Flow):
    """Its sub-flow aborts (keeping its booking) and waits for its word."""

    def build_flow(self) -> None:
        self.step(Reserve)
        self.step(JammedShipping)


class Rate(qwit.Step):
    """Falls back to a flat rate when told the carrier is down."""

    on_failure = qwit.FALLBACK
    retry = qwit.Retry(max_attempts=1)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("carrier_down"):
            raise qwit.StepError("carrier down", retry=False)
        return {"rate": "carrier"}

    async def step_fallback(self, args: dict[str, Any], error: Any) -> dict[str, Any]:
        return {"rate": "flat"}

    async def step_back(self, args: dict[str, Any]) -> None:
        return None


class Receipt(qwit.Step):
    async def step_forward(self, args: dict[str, Any]) -> None:
        return None


class Quote(qwit.Flow):
    """A retried segment, a fallback, a final step: recovery in one flow."""

    def build_flow(self) -> None:
        self.step(Shipping, retry=qwit.Retry(max_attempts=2, initial_interval=0.1))
        self.step(Rate)
        self.step(Charge)
        self.finally_step(Receipt)


class Held(qwit.Step):
    """Holds until its flow is cancelled."""

    heartbeat_timeout = 2

    async def step_forward(self, args: dict[str, Any]) -> None:
        import asyncio

        while True:
            qwit.heartbeat()
            await asyncio.sleep(0.05)


class HeldOrder(qwit.Flow):
    def build_flow(self) -> None:
        self.step(Reserve)
        self.step(Held)
        self.step(Ship)


class HoldChildStart(PayloadCodec):
    """Leaves payloads as they are, but holds the encoding of the first
    sub-flow's input (what the parent's start command carries) until
    ``release``: the workflow task that starts the child can't complete, and
    what arrives meanwhile (a cancel) reaches the parent before the news that
    its child started."""

    def __init__(self) -> None:
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        if not self.holding.is_set() and any(b'"parent_id":"' in p.data for p in payloads):
            self.holding.set()
            await self.release.wait()
        return list(payloads)

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return list(payloads)

    def client(self, temporal: temporalio.client.Client) -> temporalio.client.Client:
        """``temporal``'s connection, with this codec: for the worker to hold."""
        config = temporal.config()
        config["data_converter"] = dataclasses.replace(temporal.data_converter, payload_codec=self)
        return temporalio.client.Client(**config)
