"""The work every benchmarked step does, shared by QWIT's steps and the
hand-written saga's activities so that both run exactly the same code.

Kept free of Temporal and QWIT imports: the hand-written workflow's sandbox
never needs it, and both workers import it once.
"""

from __future__ import annotations


def forward(index: int, size: int = 0) -> dict[str, str]:
    """What step ``index`` returns: one key, a short value or ``size`` bytes."""
    return {f"r{index}": "x" * size if size else f"done-{index}"}


def back(index: int) -> None:
    """Undo step ``index``: nothing to do, the cost measured is the round trip."""
    del index


class Declined(Exception):
    """The error the failing step raises; neither side retries it."""


def fail(index: int) -> None:
    raise Declined(f"step {index} failed on purpose")
