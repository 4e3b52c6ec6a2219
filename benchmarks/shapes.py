"""The flows the benchmark runs, described once for both sides."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """One kind of flow: how many steps, what they return, how it ends."""

    key: str
    steps: int
    size: int = 0
    """Bytes each step returns (0: a short string)."""
    fail_last: bool = False
    """The last step fails without retry; the others are undone, newest first."""
    local: bool = False
    """Steps run as Temporal local activities."""
    typing: str = "untyped"
    """QWIT only: ``untyped`` steps are sent every accumulated arg; ``typed``
    ones (both methods read a pydantic model) just the model's fields;
    ``typed_forward`` ones type only ``step_forward``, as the order sample
    does, which leaves QWIT sending them everything (step_back reads all)."""

    @property
    def typed(self) -> bool:
        return self.typing != "untyped"

    @property
    def undos(self) -> int:
        return self.steps - 1 if self.fail_last else 0

    @property
    def activities(self) -> int:
        """Step methods a run executes, forward and back."""
        return self.steps + self.undos


ONE = Shape("1_steps", 1)
FIVE = Shape("5_steps", 5)
TWENTY = Shape("20_steps", 20)
FIVE_FAIL = Shape("5_steps_fail", 5, fail_last=True)
FIVE_LOCAL = Shape("5_local_steps", 5, local=True)

LATENCY_SHAPES = (ONE, FIVE, TWENTY, FIVE_FAIL, FIVE_LOCAL)
#: History only: FIVE and TWENTY with typed steps, which are sent only what
#: they read, as the hand-written saga's activities are (untyped steps are
#: sent every arg the flow has so far, by QWIT's contract).
TYPED_HISTORY_SHAPES = (
    Shape("5_steps_typed", 5, typing="typed"),
    Shape("20_steps_typed", 20, typing="typed"),
)

KB = 1024
#: History growth: two lengths, to tell linear from quadratic growth.
BIG_STEPS = (25, 50)


TYPINGS = ("untyped", "typed_forward", "typed")


def big(steps: int, typing: str = "untyped") -> Shape:
    """``steps`` steps that each return 1 KB."""
    suffix = "" if typing == "untyped" else f"_{typing}"
    return Shape(f"{steps}_steps_1kb{suffix}", steps, size=KB, typing=typing)


BIG_SHAPES = tuple(big(n, t) for n in BIG_STEPS for t in TYPINGS)
ALL_SHAPES = LATENCY_SHAPES + TYPED_HISTORY_SHAPES + BIG_SHAPES
