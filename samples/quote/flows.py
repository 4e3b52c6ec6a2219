"""A shipping quote, with recovery beyond rollback.

    QuoteShipment: CarrierQuote (retried segment) -> ChooseRate (falls back)
                   finally: NotifyCustomer
    CarrierQuote:  HoldPickup -> AskPrice

Asking the carrier for a price needs a pickup slot held first. When the
carrier's pricing service does not answer, the segment undoes itself (the
slot is released) and runs again from its start, up to three times. If it
never answers, the quote goes on without it (``on_failure=SKIP``), and
``ChooseRate`` falls back to a flat rate. Whatever happens, the customer is
told (a final step).
"""

from __future__ import annotations

from typing import Any

import qwit
from samples.quote.desk import DESK, NoQuote

FLAT_RATE = 1900


class HoldPickup(qwit.Step, name="quote.hold_pickup"):
    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"hold": DESK.hold(qwit.context().idempotency_key, args["order_id"])}

    def step_back(self, args: dict[str, Any]) -> None:
        # A hold that failed after it was made has no output: its key finds it.
        key = qwit.context().idempotency_key.removesuffix("/step_back")
        DESK.release(args.get("hold") or DESK.hold_id(key))


class AskPrice(qwit.Step, name="quote.ask_price"):
    retry = qwit.Retry(max_attempts=1)  # the segment retries, from its start

    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            cents = DESK.price(args["order_id"], args["carrier_answers_on"])
        except NoQuote as exc:
            raise qwit.StepError(str(exc), retry=False) from exc
        return {"carrier_cents": cents}


class CarrierQuote(qwit.Flow, name="quote.carrier"):
    def build_flow(self) -> None:
        self.step(HoldPickup)
        self.step(AskPrice)


class ChooseRate(qwit.Step, name="quote.choose_rate"):
    """The carrier's price; without one, a flat rate stands in."""

    on_failure = qwit.FALLBACK

    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        if "carrier_cents" not in args:
            raise qwit.StepError("no carrier price", retry=False)
        return {"quote_cents": args["carrier_cents"], "rate": "carrier"}

    def step_fallback(self, args: dict[str, Any], error: Any) -> dict[str, Any]:
        return {"quote_cents": FLAT_RATE, "rate": "flat"}


class NotifyCustomer(qwit.Step, name="quote.notify_customer"):
    def step_forward(self, args: dict[str, Any]) -> None:
        if args["qwit_outcome"] == "completed":
            DESK.notify(
                f"order {args['order_id']}: {args['rate']} rate, {args['quote_cents']} cents"
            )
        else:
            DESK.notify(f"order {args['order_id']}: no quote ({args['qwit_outcome']})")


class QuoteShipment(qwit.Flow, name="quote.shipment"):
    def build_flow(self) -> None:
        self.step(
            CarrierQuote,
            retry=qwit.Retry(max_attempts=3, initial_interval=0.2),
            on_failure=qwit.SKIP,
        )
        self.step(ChooseRate)
        self.finally_step(NotifyCustomer)
