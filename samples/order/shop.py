"""Stand-ins for the systems an order touches. Each call takes an idempotency
key, as a real payment or inventory API would, so a retried step never applies
its effect twice."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field


def _id(prefix: str, key: str) -> str:
    return f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


class CardDeclined(Exception):
    """The payment provider refused the card."""


@dataclass
class Shop:
    stock: dict[str, int] = field(default_factory=lambda: {"A-1": 10, "B-2": 3})
    reservations: dict[str, tuple[str, int]] = field(default_factory=dict)
    charges: dict[str, int] = field(default_factory=dict)
    refunds: set[str] = field(default_factory=set)
    shipments: dict[str, str] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reservation_id(self, key: str) -> str:
        """The id of the reservation made under ``key`` (if any was)."""
        return _id("res", key)

    def reserve(self, key: str, sku: str, quantity: int) -> str:
        reservation_id = self.reservation_id(key)
        with self.lock:
            if reservation_id not in self.reservations:
                if self.stock.get(sku, 0) < quantity:
                    raise ValueError(f"only {self.stock.get(sku, 0)} of {sku} left")
                self.stock[sku] -= quantity
                self.reservations[reservation_id] = (sku, quantity)
                self.log.append(f"reserved {quantity} x {sku}")
            return reservation_id

    def release(self, reservation_id: str) -> None:
        with self.lock:
            reservation = self.reservations.pop(reservation_id, None)
            if reservation is not None:
                sku, quantity = reservation
                self.stock[sku] += quantity
                self.log.append(f"released {quantity} x {sku}")

    def charge_id(self, key: str) -> str:
        """The id of the charge made under ``key`` (if any was)."""
        return _id("ch", key)

    def charge(self, key: str, card: str, cents: int) -> str:
        charge_id = self.charge_id(key)
        with self.lock:
            if card.endswith("0002"):
                raise CardDeclined(f"card ending {card[-4:]} was declined")
            if charge_id not in self.charges:
                self.charges[charge_id] = cents
                self.log.append(f"charged {cents / 100:.2f}")
            return charge_id

    def refund(self, charge_id: str) -> None:
        with self.lock:
            if charge_id in self.charges and charge_id not in self.refunds:
                self.refunds.add(charge_id)
                self.log.append(f"refunded {self.charges[charge_id] / 100:.2f}")


SHOP = Shop()
