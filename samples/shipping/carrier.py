"""A stand-in for a carrier's API: bookings and labels, keyed for idempotency."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field


class NoRoute(Exception):
    """The carrier does not ship there."""


@dataclass
class Carrier:
    bookings: dict[str, str] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def booking_id(self, key: str) -> str:
        """The id of the booking made under ``key`` (if any was)."""
        return f"bk-{hashlib.sha256(key.encode()).hexdigest()[:8]}"

    def book(self, key: str, order_id: str, carrier: str) -> str:
        booking = self.booking_id(key)
        with self.lock:
            if booking not in self.bookings:
                self.bookings[booking] = order_id
                self.log.append(f"booked {carrier} for order {order_id}")
        return booking

    def cancel(self, booking: str) -> None:
        with self.lock:
            if self.bookings.pop(booking, None) is not None:
                self.log.append(f"cancelled booking {booking}")

    def label(self, booking: str, country: str) -> str:
        if country == "XX":
            raise NoRoute(f"no carrier route to {country!r}")
        return f"1Z-{booking}"


CARRIER = Carrier()
