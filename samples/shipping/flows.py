"""The order saga, with shipping as a sub-flow.

    ShipOrder: ReserveInventory -> ChargePayment -> Shipping
    Shipping:  BookCarrier -> PrintLabel

A label can't be printed for a destination no carrier serves ("XX"): the
sub-flow fails at its second step, and QWIT undoes everything, newest first:
the carrier booking, the charge, the reservation.
"""

from __future__ import annotations

from typing import Any

import qwit
from samples.order.flows import ChargePayment, ReserveInventory, forward_key
from samples.shipping.carrier import CARRIER, NoRoute


class BookCarrier(qwit.Step, name="shipping.book_carrier"):
    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        key = qwit.context().idempotency_key
        return {"booking": CARRIER.book(key, args["order_id"], args["carrier"])}

    def step_back(self, args: dict[str, Any]) -> None:
        # A booking that failed after it was made has no output: its key finds it.
        CARRIER.cancel(args.get("booking") or CARRIER.booking_id(forward_key()))


class PrintLabel(qwit.Step, name="shipping.print_label"):
    """Nothing to undo: a label that was never used is just paper."""

    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            label = CARRIER.label(args["booking"], args.get("country", "US"))
        except NoRoute as exc:
            raise qwit.StepError(str(exc), retry=False) from exc
        return {"tracking": label}


class Shipping(qwit.Flow, name="shipping"):
    def build_flow(self) -> None:
        self.step(BookCarrier)
        self.step(PrintLabel)


class ShipOrder(qwit.Flow, name="orders.ship"):
    def build_flow(self) -> None:
        self.step(ReserveInventory)
        self.step(ChargePayment)
        self.step(Shipping, {"carrier": "ups"})  # every step of the sub-flow sees the carrier
