"""``TrustConfig``: the parameters of the trust model, validated once.

Defaults are the deployment guide's ConfigMap. Scores are points on 0-1000;
the fold works in integer milli-points, so the decay rate is used as
``round(decay_rate * 1000)`` milli-points per hour (``decay_rate_milli``):
a rate finer than 0.001 point/hour is rounded, and replays stay bit-identical.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

Severity = Literal["low", "medium", "high", "critical"]
SEVERITIES: tuple[Severity, ...] = ("low", "medium", "high", "critical")
MAX_SCORE = 1000
MAX_DEPTH = 100

_DEFAULT_PENALTIES: Mapping[str, int] = MappingProxyType(
    {"low": 10, "medium": 50, "high": 100, "critical": 300}
)

_POINT_FIELDS = (
    "initial_score",
    "decay_floor",
    "min_threshold",
    "reward_handshake",
    "reward_signal",
)


@dataclass(frozen=True, kw_only=True)
class TrustConfig:
    """Trust-model parameters. Invalid values raise ``ValueError`` naming the field."""

    initial_score: int = 800
    """Score of a newly registered agent."""
    decay_rate: float = 2.0
    """Points per hour a score falls without a positive event."""
    decay_floor: int = 100
    """Decay alone never takes a score below this."""
    min_threshold: int = 300
    """Below this an agent is untrusted."""
    penalties: Mapping[str, int] = field(default_factory=lambda: _DEFAULT_PENALTIES)
    """Points a ``policy.violation`` subtracts, by severity (all four severities)."""
    reward_handshake: int = 2
    """Points a completed handshake adds to each party (once per pair per 24 hours)."""
    reward_signal: int = 5
    """Points a ``trust.signal`` adds (a peer's: weighted, once per pair per 24 hours)."""
    max_delegation_depth: int = 5
    """Longest delegation chain; a root grant has depth 1."""

    def __post_init__(self) -> None:
        for name in _POINT_FIELDS:
            _check_int(name, getattr(self, name), 0, MAX_SCORE)
        _check_int("max_delegation_depth", self.max_delegation_depth, 1, MAX_DEPTH)
        _check_rate(self.decay_rate)
        if self.decay_floor > self.initial_score:
            raise ValueError(
                f"decay_floor ({self.decay_floor}) must not exceed "
                f"initial_score ({self.initial_score})"
            )
        # A read-only copy: the caller's dict may change later, the config must not.
        object.__setattr__(self, "penalties", MappingProxyType(_checked_penalties(self.penalties)))

    def __hash__(self) -> int:
        # The generated hash would fail on the mapping; hash what equality compares.
        return hash((tuple(self.as_dict().items()), self.decay_rate))

    @functools.cached_property
    def decay_rate_milli(self) -> int:
        """Decay in milli-points per hour, the integer the fold uses (computed once: the
        fold reads it for nearly every event)."""
        return round(self.decay_rate * 1000)

    @functools.cached_property
    def decay_floor_milli(self) -> int:
        """``decay_floor`` in milli-points (the fold reads it for nearly every event)."""
        return self.decay_floor * 1000

    @functools.cached_property
    def penalty_milli(self) -> dict[str, int]:
        """Penalties by severity in milli-points: a plain dict the fold indexes per
        report (``penalties`` is a read-only view, slower to index)."""
        return {severity: points * 1000 for severity, points in self.penalties.items()}

    def as_dict(self) -> dict[str, int]:
        """The parameters the fold uses, ints only (stored in snapshots)."""
        result = {
            "initial_score": self.initial_score,
            "decay_rate_milli": self.decay_rate_milli,
            "decay_floor": self.decay_floor,
            "min_threshold": self.min_threshold,
            "reward_handshake": self.reward_handshake,
            "reward_signal": self.reward_signal,
            "max_delegation_depth": self.max_delegation_depth,
        }
        result.update({f"penalty_{s}": self.penalties[s] for s in SEVERITIES})
        return dict(sorted(result.items()))


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")


def _check_rate(value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and 0 <= value <= MAX_SCORE)
    ):
        raise ValueError(f"decay_rate must be a number from 0 to {MAX_SCORE}, got {value!r}")


def _checked_penalties(penalties: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(penalties, Mapping) or set(penalties) != set(SEVERITIES):
        raise ValueError("penalties must give exactly low, medium, high and critical")
    for severity in SEVERITIES:
        _check_int(f"penalties[{severity!r}]", penalties[severity], 0, MAX_SCORE)
    return {s: penalties[s] for s in SEVERITIES}
