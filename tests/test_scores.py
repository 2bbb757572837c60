"""The score a person reads and its tier agree and round as expected (issue 14,
item 8): milli-points are rounded to the nearest point, halves up, and the tier
is the tier of that rounded score."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from projections.config import TrustConfig
from projections.replay import first_time_below
from projections.trust import (
    MAX_MILLI,
    MILLI,
    TrustState,
    _materialize,
    new_trust,
    penalize_milli,
    points,
    record_violation,
    reward_milli,
    score_milli_at,
    tier_for,
    to_micros,
    trust_at,
)

DID = "did:mesh:" + "ab" * 16
CONFIG = TrustConfig()
T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def test_a_new_agent_reads_its_initial_score_seconds_later() -> None:
    state = new_trust(DID, CONFIG, to_micros(T0))
    view = trust_at(state, CONFIG, T0 + timedelta(seconds=2))
    assert view.score_milli < 800 * MILLI  # decay has started…
    assert view.score == 800  # …but 799.9994 reads 800
    assert view.tier == "trusted"
    assert view.components.base == 800
    assert view.components.decay == 0


def test_one_critical_violation_from_800_reads_500_standard() -> None:
    state = new_trust(DID, CONFIG, to_micros(T0))
    record_violation(state, CONFIG, "critical", to_micros(T0 + timedelta(seconds=1)))
    view = trust_at(state, CONFIG, T0 + timedelta(seconds=2))
    assert view.score == 500
    assert view.tier == "standard"


@given(st.integers(min_value=0, max_value=1000 * MILLI))
def test_points_round_half_up_and_the_tier_is_the_shown_scores(milli: int) -> None:
    shown = points(milli)
    assert abs(shown * MILLI - milli) <= MILLI // 2
    assert tier_for(shown, CONFIG) == tier_for(round(milli / MILLI + 1e-9), CONFIG)


def test_halves_round_up() -> None:
    assert points(499_500) == 500
    assert points(499_499) == 499
    assert points(0) == 0
    assert points(1000 * MILLI) == 1000


@given(
    st.integers(min_value=CONFIG.decay_floor + 1, max_value=1000),
    st.sampled_from([900, 700, 500, 300]),
)
def test_decay_crossings_are_found_at_the_rounded_boundary(start: int, boundary: int) -> None:
    config = TrustConfig(initial_score=start)
    state = new_trust(DID, config, to_micros(T0))
    crossed = first_time_below(state, config, boundary)
    if boundary > start or boundary <= config.decay_floor:
        return
    assert crossed is not None
    rate, floor = config.decay_rate_milli, config.decay_floor * MILLI
    assert points(score_milli_at(state, rate, floor, crossed)) < boundary
    if crossed - 1 > state.base_at:
        assert points(score_milli_at(state, rate, floor, crossed - 1)) >= boundary


_CONFIGS = st.builds(
    TrustConfig,
    initial_score=st.integers(100, 1000),
    decay_rate=st.integers(0, 50_000).map(lambda r: r / 1000),
    decay_floor=st.integers(0, 100),
)


@given(
    _CONFIGS,
    st.integers(0, MAX_MILLI),
    st.integers(0, 10**12),
    st.integers(-(10**12), 10**12),
    st.integers(0, MAX_MILLI),
)
def test_the_inline_decay_of_a_reward_or_penalty_is_materialize(
    config: TrustConfig, base: int, since: int, step: int, milli: int
) -> None:
    """``reward_milli`` and ``penalize_milli`` fold the decay due in first (the fold
    calls them for nearly every event): the same as ``_materialize`` and then the
    reward or the penalty, also for a clock that steps back."""
    decay_from = to_micros(T0)
    base_at = decay_from + since
    at = base_at + step
    for apply in (reward_milli, penalize_milli):
        fast = TrustState(DID, base, base_at, decay_from)
        apply(fast, config, milli, at)
        slow = TrustState(DID, base, base_at, decay_from)
        _materialize(slow, config, at)
        if apply is reward_milli:
            slow.base_milli = min(slow.base_milli + milli, MAX_MILLI)
            slow.decay_from = slow.base_at
            slow.positives += 1
        else:
            slow.base_milli = max(slow.base_milli - milli, 0)
        assert fast == slow
