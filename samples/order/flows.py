"""The order saga.

    PlaceOrder: ReserveInventory -> ChargePayment -> CreateShipment

A card ending in 0002 is declined: ChargePayment fails at once (retrying won't
help), and QWIT releases the reserved inventory.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

import qwit
from samples.order.shop import SHOP, CardDeclined


class OrderLine(BaseModel):
    order_id: str
    sku: str
    quantity: int = 1


def forward_key() -> str:
    """In a step_back: the idempotency key of the step_forward it undoes (an
    undo's key is its forward's key plus the direction)."""
    return qwit.context().idempotency_key.removesuffix("/step_back")


class ReserveInventory(qwit.Step, name="inventory.reserve"):
    """Typed: receives only the fields of OrderLine."""

    async def step_forward(self, args: OrderLine) -> dict[str, Any]:
        key = qwit.context().idempotency_key
        return {"reservation": SHOP.reserve(key, args.sku, args.quantity)}

    async def step_back(self, args: dict[str, Any]) -> None:
        # step_back sees its own step's output: the reservation to release. A
        # step_forward that failed after reserving has no output: its key
        # finds the reservation (releasing one never made does nothing).
        SHOP.release(args.get("reservation") or SHOP.reservation_id(forward_key()))


class ChargePayment(qwit.Step, name="payments.charge"):
    retry = qwit.Retry(max_attempts=3, initial_interval=0.5)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        key = qwit.context().idempotency_key
        try:
            charge = SHOP.charge(key, args["card"], args["cents"])
        except CardDeclined as exc:
            raise qwit.StepError(str(exc), retry=False) from exc
        return {"charge": charge}

    async def step_back(self, args: dict[str, Any]) -> None:
        # The undo of a charge that failed has no "charge" in its args, but it
        # may have charged (and timed out, or failed, after): its key finds the
        # charge. A declined card charged nothing, and there is nothing to refund.
        SHOP.refund(args.get("charge") or SHOP.charge_id(forward_key()))


class CreateShipment(qwit.Step, name="shipping.create"):
    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        tracking = f"1Z-{args['order_id']}"
        SHOP.shipments[args["order_id"]] = tracking
        SHOP.log.append(f"shipped order {args['order_id']} with {args['carrier']}")
        return {"tracking": tracking}


class PlaceOrder(qwit.Flow, name="orders.place"):
    def build_flow(self) -> None:
        self.step(ReserveInventory)
        self.step(ChargePayment)
        self.step(CreateShipment, {"carrier": "ups"})
