"""A stand-in for a carrier's quoting desk: pickup holds and prices, keyed
for idempotency, and a notification outbox."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field


class NoQuote(Exception):
    """The carrier's pricing service did not answer."""


@dataclass
class Desk:
    holds: dict[str, str] = field(default_factory=dict)
    asked: dict[str, int] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hold_id(self, key: str) -> str:
        """The id of the slot held under ``key`` (if any was)."""
        return f"h-{hashlib.sha256(key.encode()).hexdigest()[:6]}"

    def hold(self, key: str, order_id: str) -> str:
        """Hold a pickup slot for an order (once per key)."""
        hold = self.hold_id(key)
        with self.lock:
            if hold not in self.holds:
                self.holds[hold] = order_id
                self.log.append(f"held pickup slot {hold} for order {order_id}")
        return hold

    def release(self, hold: str) -> None:
        with self.lock:
            if self.holds.pop(hold, None) is not None:
                self.log.append(f"released pickup slot {hold}")

    def price(self, order_id: str, answers_on: int) -> int:
        """The carrier's price in cents; its service answers only from the
        ``answers_on``-th question about this order on (0: never)."""
        with self.lock:
            asked = self.asked[order_id] = self.asked.get(order_id, 0) + 1
        if answers_on == 0 or asked < answers_on:
            raise NoQuote(f"the carrier's pricing service did not answer (try {asked})")
        return 1250

    def notify(self, text: str) -> None:
        with self.lock:
            self.log.append(f"notified: {text}")


DESK = Desk()
