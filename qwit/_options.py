"""Step options: retry policies, timeouts and failure reactions."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ._errors import FlowDefinitionError, qualified_name

#: The longest duration an option takes, in seconds (a hundred years): past
#: it, engines overflow (Python's ``timedelta``, Temporal's durations).
MAX_SECONDS = 100 * 365.25 * 24 * 3600
#: The most attempts a ``Retry`` may allow (Temporal counts them in 32 bits).
MAX_ATTEMPTS = 2**31 - 1


class InvalidOption(FlowDefinitionError, ValueError):
    """A step option's value is not valid (a ``FlowDefinitionError``; also a
    ``ValueError``, as pydantic's validation errors are)."""


class Reaction(str, enum.Enum):
    """What a flow does once a step's retries are spent.

    The members are exported as ``qwit.ROLLBACK``, ``qwit.SKIPBACK``,
    ``qwit.SKIP``, ``qwit.ABORT``, ``qwit.WAIT`` and ``qwit.RETRY``; their
    lowercase names (``"rollback"``) are accepted wherever a reaction is.
    """

    ROLLBACK = "rollback"
    """Undo the failed step and every completed step, newest first."""
    SKIPBACK = "skipback"
    """Undo every completed step, newest first, but not the failed one."""
    SKIP = "skip"
    """Ignore the failure and go on with the next step."""
    ABORT = "abort"
    """Stop the flow and undo nothing."""
    WAIT = "wait"
    """Pause until an operator decides with ``handle.react(...)``."""
    RETRY = "retry"
    """Only as an operator's decision: run the step again."""
    FALLBACK = "fallback"
    """Undo the failed attempt (if it started), then let the step's
    ``step_fallback`` stand in for its output, and go on."""

    def __str__(self) -> str:
        return self.value


ROLLBACK = Reaction.ROLLBACK
SKIPBACK = Reaction.SKIPBACK
SKIP = Reaction.SKIP
ABORT = Reaction.ABORT
WAIT = Reaction.WAIT
RETRY = Reaction.RETRY
FALLBACK = Reaction.FALLBACK

#: What a step's method is run for: its work, its undo, or what stands in
#: for its work once that failed (``FALLBACK``).
Direction = Literal["step_forward", "step_back", "step_fallback"]

#: Reactions a step's ``on_failure`` may name.
FAILURE_REACTIONS = frozenset({ROLLBACK, SKIPBACK, SKIP, ABORT, WAIT, FALLBACK})
#: Reactions a step's ``back_on_failure`` may name: go on undoing the other
#: steps (the flow ends CompensationFailed), wait for an operator, or stop
#: the rollback there (ABORT: what is left stays as it is).
BACK_FAILURE_REACTIONS = frozenset({ROLLBACK, WAIT, ABORT})


def parse_reaction(value: object, *, allowed: frozenset[Reaction] | None = None) -> Reaction:
    """Turn ``value`` (a Reaction or its lowercase name) into a Reaction.

    Raises:
        ValueError: ``value`` is not a reaction, or not one of ``allowed``.
    """
    if isinstance(value, Reaction):
        reaction = value
    elif isinstance(value, str):
        try:
            reaction = Reaction(value.strip().lower())
        except ValueError:
            names = ", ".join(r.value for r in Reaction)
            raise ValueError(f"unknown reaction {value!r} (expected one of: {names})") from None
    else:
        raise ValueError(f"a reaction must be a qwit reaction or its name, not {value!r}")
    if allowed is not None and reaction not in allowed:
        names = ", ".join(sorted(r.value for r in allowed))
        raise ValueError(
            f"reaction {reaction.value!r} is not allowed here (expected one of: {names})"
        )
    return reaction


class Retry(BaseModel):
    """A retry policy for one direction of a step.

    Args:
        max_attempts: How many times to run the method in all, the first try
            included. ``None`` means no limit.
        initial_interval: Seconds to wait before the first retry.
        backoff: Multiplier of the wait after each retry.
        max_interval: Longest wait between two attempts, in seconds.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # (The bounds every engine holds, ``out_of_bounds``, are checked as a
    # flow is compiled, not as a plan pinned by an older QWIT is read back.)
    max_attempts: int | None = Field(default=3, ge=1)
    initial_interval: float = Field(default=1.0, gt=0)
    backoff: float = Field(default=2.0, ge=1.0)
    max_interval: float = Field(default=60.0, gt=0)

    def __init__(
        self,
        max_attempts: int | None = 3,
        initial_interval: float = 1.0,
        backoff: float = 2.0,
        max_interval: float = 60.0,
    ) -> None:
        """Check the policy.

        Raises:
            InvalidOption: a value out of its range, or of the wrong type.
        """
        if isinstance(max_attempts, bool):
            raise InvalidOption(f"qwit.Retry: max_attempts must be an integer, not {max_attempts}")
        try:
            super().__init__(
                max_attempts=max_attempts,
                initial_interval=initial_interval,
                backoff=backoff,
                max_interval=max_interval,
            )
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'policy'}: {e['msg']} (not {e['input']!r})"
                if e["loc"]
                else e["msg"].removeprefix("Value error, ")
                for e in exc.errors()
            )
            raise InvalidOption(f"qwit.Retry: {problems}") from None

    # Only a user's ``Retry(...)`` runs the checks above. A plan read back
    # (each flow's input, on every workflow task of a replay) is validated by
    # the fields alone, without calling this again and validating twice.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @model_validator(mode="after")
    def _check_intervals(self) -> Retry:
        if self.max_interval < self.initial_interval:
            raise ValueError("max_interval must not be shorter than initial_interval")
        return self

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return float(min(self.initial_interval * self.backoff ** (attempt - 1), self.max_interval))

    def budget(self) -> float | None:
        """Total seconds of waiting between attempts, or None when unbounded."""
        if self.max_attempts is None:
            return None
        return sum(self.delay(n) for n in range(1, self.max_attempts))


def out_of_bounds(policy: Retry) -> str | None:
    """What of ``policy`` not every engine holds, if anything."""
    if policy.max_attempts is not None and policy.max_attempts > MAX_ATTEMPTS:
        return f"max_attempts must be an integer up to {MAX_ATTEMPTS}, or None"
    for name in ("initial_interval", "max_interval"):
        if not getattr(policy, name) <= MAX_SECONDS:
            return f"{name} must be at most {MAX_SECONDS:.0f} seconds (100 years)"
    if not math.isfinite(policy.backoff):
        return "backoff must be a finite number"
    return None


#: Default policy for ``step_forward``: three attempts.
DEFAULT_RETRY = Retry()
#: Default policy for ``step_back``: compensation must not give up easily, so
#: it retries with capped backoff for about forty minutes.
DEFAULT_BACK_RETRY = Retry(max_attempts=25, initial_interval=1.0, backoff=2.0, max_interval=120.0)
#: Default timeout of one attempt, in seconds.
DEFAULT_TIMEOUT = 300.0
#: Default ``timeout_grace``: how long a timed-out attempt, once told to stop
#: (an ``async`` step cancelled, a plain one seeing ``context().cancelled``),
#: gets to stop before the next attempt or the undo starts anyway.
DEFAULT_TIMEOUT_GRACE = 30.0
#: How many elements of a map run (or are undone) at once unless it says.
DEFAULT_MAX_CONCURRENCY = 10
#: The most a map may run at once: Temporal holds at most 2,000 activities or
#: sub-flows in flight per workflow, and a rollback's undos run beside them.
MAX_CONCURRENCY = 1000
#: Elements of a map per shard (a sub-flow of its own) when its list is longer:
#: a shard's forward and undo histories fit Temporal's 51,200 events with room
#: to spare. ``QWIT_MAP_SHARD_SIZE`` overrides it where flows are compiled (the
#: plan keeps the size a flow started with).
DEFAULT_SHARD_SIZE = 1000
SHARD_SIZE_ENV = "QWIT_MAP_SHARD_SIZE"


class FailureRule(BaseModel):
    """One ``except``-like clause of an ``on_failure`` mapping."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    match: str
    """A qualified class name (``module.QualName``) or a bare class name."""
    reaction: Reaction


class FailurePolicy(BaseModel):
    """A step's ``on_failure``: rules matched in order, then a default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rules: tuple[FailureRule, ...] = ()
    default: Reaction = ROLLBACK

    def choose(self, error_types: list[str]) -> Reaction:
        """The reaction for an error whose class hierarchy is ``error_types``.

        ``error_types`` lists qualified class names, most specific first (the
        exception's MRO). A rule matches when it names any class of it,
        qualified or bare; the first matching rule wins, like ``except``.
        """
        bare = [name.rsplit(".", 1)[-1] for name in error_types]
        for rule in self.rules:
            if rule.match in error_types or rule.match in bare:
                return rule.reaction
        return self.default

    def reactions(self) -> set[Reaction]:
        """Every reaction this policy may choose."""
        return {self.default, *(rule.reaction for rule in self.rules)}


OnFailure = Reaction | str | Mapping[Any, Any] | FailurePolicy


def parse_on_failure(value: object) -> FailurePolicy:
    """Normalise an ``on_failure`` option into a FailurePolicy.

    Accepts a reaction (or its name), or a mapping from exception class (or
    class name) to reaction. The key ``"default"`` (or ``Exception``) sets the
    reaction for errors no other key matches.

    Raises:
        ValueError: a key is not an exception class or name, or a value is not
            a reaction a step may choose.
    """
    if isinstance(value, FailurePolicy):
        return value
    if isinstance(value, Mapping):
        rules: list[FailureRule] = []
        default = ROLLBACK
        for key, raw in value.items():
            reaction = parse_reaction(raw, allowed=FAILURE_REACTIONS)
            if key == "default":
                default = reaction
            elif isinstance(key, type) and issubclass(key, BaseException):
                rules.append(FailureRule(match=qualified_name(key), reaction=reaction))
            elif isinstance(key, str) and key.strip():
                rules.append(FailureRule(match=key.strip(), reaction=reaction))
            else:
                raise ValueError(
                    f"on_failure keys must be exception classes or class names, not {key!r}"
                )
        return FailurePolicy(rules=tuple(rules), default=default)
    return FailurePolicy(default=parse_reaction(value, allowed=FAILURE_REACTIONS))


def parse_seconds(value: object, option: str) -> float:
    """Seconds from a number or a timedelta, which must be positive.

    Raises:
        ValueError: the value is not a positive duration.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ValueError(f"{option} must be seconds or a timedelta, not {value!r}")
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(
            f"{option} must be a positive duration of at most 100 years, not {value!r}"
        )
    return seconds


#: The options a step accepts, as class attributes or ``self.step`` keywords.
STEP_OPTIONS = (
    "retry",
    "back_retry",
    "timeout",
    "back_timeout",
    "timeout_grace",
    "heartbeat_timeout",
    "on_failure",
    "back_on_failure",
    "local",
)
