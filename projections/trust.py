"""Trust score math: linear decay to a floor, penalties, rewards, tiers.

All arithmetic is on integers so that a replay is bit-identical: scores are
milli-points (0..1_000_000), times are microseconds since the Unix epoch, and
decay over ``elapsed_us`` is ``rate_milli * elapsed_us // HOUR_US``.

Per agent the fold keeps a *base* score materialized at ``base_at`` (the
last event that changed the score) and a *decay clock* started at
``decay_from`` (registration or the last positive event). The decay due at
time ``t`` is the linear decay since ``decay_from`` up to ``t`` minus the
part already folded into the base (up to ``base_at``). Measuring both from
the same clock start makes the sum of the parts telescope to one floor
division, so re-anchoring at every event neither subtracts decay twice nor
drifts by rounding. Decay stops at ``decay_floor``; a base already below the
floor (after penalties) does not decay at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ledger.timefmt import format_time, parse_time
from projections.config import MAX_SCORE, SEVERITIES, TrustConfig

MILLI = 1000
MAX_MILLI = MAX_SCORE * MILLI
HOUR_US = 3_600_000_000

TIERS = ("verified_partner", "trusted", "standard", "probationary", "untrusted", "suspended")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def to_micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch for an aware datetime (exact)."""
    if moment.tzinfo is None:
        raise ValueError("projection times must be timezone-aware")
    return (moment - _EPOCH) // _MICROSECOND


def from_micros(micros: int) -> datetime:
    """The aware UTC datetime ``micros`` microseconds after the Unix epoch."""
    return _EPOCH + timedelta(microseconds=micros)


@dataclass(slots=True)
class TrustState:
    """One agent's trust, as folded so far (mutated in place by the fold)."""

    did: str
    base_milli: int
    base_at: int
    decay_from: int
    violations: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SEVERITIES, 0))
    positives: int = 0
    handshakes_completed: int = 0
    handshakes_failed: int = 0
    position: int = 0
    peers: dict[str, list[int]] = field(default_factory=dict)
    """Per peer reporter, its current window: ``[start µs, penalty spent, reward given]``
    (milli-points), so one peer's reports about this agent stay bounded. In order of
    start; windows over are dropped when a window opens (``state._drop_over``)."""
    partners: dict[str, int] = field(default_factory=dict)
    """Per handshake partner, when a completed handshake with it last earned a reward
    (µs); in that order, those over dropped as ``peers``'s are."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form (ints and strings, sorted keys)."""
        return {
            "base_at": format_time(from_micros(self.base_at)),
            "base_milli": self.base_milli,
            "decay_from": format_time(from_micros(self.decay_from)),
            "did": self.did,
            "handshakes_completed": self.handshakes_completed,
            "handshakes_failed": self.handshakes_failed,
            "partners": {did: self.partners[did] for did in sorted(self.partners)},
            "peers": {did: list(self.peers[did]) for did in sorted(self.peers)},
            "position": self.position,
            "positives": self.positives,
            "violations": {s: self.violations[s] for s in SEVERITIES},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrustState:
        """Inverse of ``to_dict`` for data already checked against the snapshot schema."""
        return cls(
            did=data["did"],
            base_milli=data["base_milli"],
            base_at=to_micros(parse_time(data["base_at"])),
            decay_from=to_micros(parse_time(data["decay_from"])),
            violations={s: data["violations"][s] for s in SEVERITIES},
            positives=data["positives"],
            handshakes_completed=data["handshakes_completed"],
            handshakes_failed=data["handshakes_failed"],
            position=data["position"],
            # In order of start, as the fold keeps them (``state._drop_over``).
            peers={
                did: list(window)
                for did, window in sorted(
                    data.get("peers", {}).items(), key=lambda item: (item[1][0], item[0])
                )
            },
            partners=dict(
                sorted(data.get("partners", {}).items(), key=lambda item: (item[1], item[0]))
            ),
        )


@dataclass(frozen=True, slots=True)
class TrustComponents:
    """What the score is made of. ``base - decay == score`` (points)."""

    base: int
    decay: int
    violations: dict[str, int]
    positives: int
    handshakes_completed: int
    handshakes_failed: int


@dataclass(frozen=True, slots=True)
class DecayState:
    """The decay clock: running since ``anchor`` at ``rate_milli`` per hour down to ``floor``."""

    anchor: datetime
    rate_milli: int
    floor: int
    at_floor: bool

    @property
    def rate(self) -> float:
        """Points per hour."""
        return self.rate_milli / MILLI


@dataclass(frozen=True, slots=True)
class TrustView:
    """An agent's trust at a query time."""

    did: str
    score: int
    score_milli: int
    tier: str
    components: TrustComponents
    decay: DecayState
    position: int


def new_trust(did: str, config: TrustConfig, at: int) -> TrustState:
    """The trust of an agent registered at ``at`` (µs): initial score, clock started."""
    return TrustState(did=did, base_milli=config.initial_score * MILLI, base_at=at, decay_from=at)


def score_milli_at(state: TrustState, rate_milli: int, floor_milli: int, at: int) -> int:
    """The decayed score (milli-points) at ``at`` (µs); no decay before ``base_at``."""
    base = state.base_milli
    if base <= floor_milli or at <= state.base_at:
        return base
    start = state.decay_from
    due = rate_milli * (at - start) // HOUR_US - rate_milli * (state.base_at - start) // HOUR_US
    return max(base - due, floor_milli)


def _materialize(state: TrustState, config: TrustConfig, at: int) -> None:
    """Fold the decay due at ``at`` into the base (``score_milli_at``), and move ``base_at``
    there. A clock that steps back between batches must not undo decay: time only
    moves on."""
    at = max(at, state.base_at)
    state.base_milli = score_milli_at(state, config.decay_rate_milli, config.decay_floor_milli, at)
    state.base_at = at


def reward(state: TrustState, config: TrustConfig, points: int, at: int) -> None:
    """A positive event at ``at``: add ``points`` (capped at 1000), restart the decay clock."""
    reward_milli(state, config, points * MILLI, at)


def reward_milli(state: TrustState, config: TrustConfig, milli: int, at: int) -> None:
    """``reward`` in milli-points (a weighted peer signal earns a fraction of a point)."""
    _materialize(state, config, at)
    state.base_milli = min(state.base_milli + milli, MAX_MILLI)
    state.decay_from = state.base_at
    state.positives += 1


def penalize(state: TrustState, config: TrustConfig, points: int, at: int) -> None:
    """Subtract ``points`` at ``at`` (down to 0); the decay clock keeps running."""
    penalize_milli(state, config, points * MILLI, at)


def penalize_milli(state: TrustState, config: TrustConfig, milli: int, at: int) -> None:
    """``penalize`` in milli-points (a weighted peer report costs a fraction)."""
    _materialize(state, config, at)
    state.base_milli = max(state.base_milli - milli, 0)


def record_violation(state: TrustState, config: TrustConfig, severity: str, at: int) -> None:
    """A ``policy.violation`` of ``severity`` at ``at``."""
    penalize(state, config, config.penalties[severity], at)
    state.violations[severity] += 1


def points(milli: int) -> int:
    """The score a person reads: milli-points rounded to the nearest whole point,
    halves up (799.9994 reads 800, 499.9996 reads 500). The tier is always that of
    this number, so the score shown and its tier agree."""
    return (milli + MILLI // 2) // MILLI


def tier_for(score: int, config: TrustConfig, *, suspended: bool = False) -> str:
    """The tier of a score; below ``min_threshold`` is always untrusted."""
    if suspended:
        return "suspended"
    if score < config.min_threshold:
        return "untrusted"
    if score >= 900:
        return "verified_partner"
    if score >= 700:
        return "trusted"
    if score >= 500:
        return "standard"
    return "probationary"


def trust_at(
    state: TrustState, config: TrustConfig, now: datetime, *, suspended: bool = False
) -> TrustView:
    """The agent's trust at ``now`` (decay computed, nothing mutated)."""
    floor_milli = config.decay_floor * MILLI
    milli = score_milli_at(state, config.decay_rate_milli, floor_milli, to_micros(now))
    score = points(milli)
    base = points(state.base_milli)
    components = TrustComponents(
        base=base,
        decay=base - score,
        violations=dict(state.violations),
        positives=state.positives,
        handshakes_completed=state.handshakes_completed,
        handshakes_failed=state.handshakes_failed,
    )
    decay = DecayState(
        anchor=from_micros(state.decay_from),
        rate_milli=config.decay_rate_milli,
        floor=config.decay_floor,
        at_floor=milli <= floor_milli,
    )
    tier = tier_for(score, config, suspended=suspended)
    return TrustView(state.did, score, milli, tier, components, decay, state.position)
