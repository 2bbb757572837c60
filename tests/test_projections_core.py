"""Pure unit and property tests of the projection core: no database, no clock."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import projections.state as state_module
from ledger.chain import RecordedEvent
from ledger.errors import EventValidationError
from ledger.events import (
    AgentKeyRotated,
    AgentRegistered,
    AgentReinstated,
    AgentSuspended,
    AnyEvent,
    DelegationGranted,
    DelegationRevoked,
    HandshakeCompleted,
    HandshakeFailed,
    PolicyViolation,
    RetentionApplied,
    TrustSignal,
    encode_event,
)
from ledger.timefmt import format_time
from projections.bodies import (
    FailedHandshakeBody,
    HandshakeBody,
    ReportBody,
    SignalBody,
    decode_for_fold,
)
from projections.config import SEVERITIES, Severity, TrustConfig
from projections.delegation import (
    Grant,
    covered_by_any,
    covers,
    delegation_chain,
    effective_capabilities,
    granted_capabilities,
    is_active,
    validate_grant,
    validate_revocation,
)
from projections.errors import DelegationError, SnapshotError
from projections.state import PAIR_WINDOW_US, MeshState, _standing, fold
from projections.trust import HOUR_US, tier_for, to_micros

T0 = datetime(2026, 1, 1, tzinfo=UTC)
STAMP = format_time(T0)  # occurred_at: the fold never reads it


def did(n: int) -> str:
    return f"did:mesh:{n:032x}"


LEDGER = did(0xFFFF)
A, B, C, D, E, S = (did(n) for n in range(1, 7))
STRANGER = did(99)


# -- event builders ---------------------------------------------------------------


def registered(agent: str, *capabilities: str) -> AgentRegistered:
    return AgentRegistered(
        actor=LEDGER,
        occurred_at=STAMP,
        did=agent,
        public_key=f"PEM of {agent}",
        capabilities=capabilities,
    )


def violation(agent: str, severity: Severity = "medium") -> PolicyViolation:
    return PolicyViolation(
        actor=LEDGER, occurred_at=STAMP, agent=agent, severity=severity, rule="tool-deny"
    )


def signal(agent: str) -> TrustSignal:
    return TrustSignal(actor=LEDGER, occurred_at=STAMP, agent=agent, signal="helpful")


def completed(initiator: str, responder: str) -> HandshakeCompleted:
    return HandshakeCompleted(
        actor=LEDGER,
        occurred_at=STAMP,
        handshake_id="hs",
        initiator=initiator,
        responder=responder,
    )


def failed(initiator: str, responder: str, reason: str) -> HandshakeFailed:
    return HandshakeFailed(
        actor=LEDGER,
        occurred_at=STAMP,
        handshake_id="hs",
        initiator=initiator,
        responder=responder,
        reason=reason,
    )


def suspended(agent: str) -> AgentSuspended:
    return AgentSuspended(actor=LEDGER, occurred_at=STAMP, did=agent, reason="test")


def reinstated(agent: str) -> AgentReinstated:
    return AgentReinstated(actor=LEDGER, occurred_at=STAMP, did=agent, reason="test")


def granted(
    grant_id: str,
    delegator: str,
    delegatee: str,
    *capabilities: str,
    expires_at: datetime | None = None,
    parent: str | None = None,
) -> DelegationGranted:
    return DelegationGranted(
        actor=delegator,
        occurred_at=STAMP,
        grant_id=grant_id,
        delegator=delegator,
        delegatee=delegatee,
        capabilities=capabilities,
        expires_at=None if expires_at is None else format_time(expires_at),
        parent=parent,
    )


def revoked(grant_id: str) -> DelegationRevoked:
    return DelegationRevoked(actor=LEDGER, occurred_at=STAMP, grant_id=grant_id, reason="test")


def retention() -> RetentionApplied:
    return RetentionApplied(
        actor=LEDGER,
        occurred_at=STAMP,
        cut_position=1,
        cut_time=STAMP,
        anchor_hash="0" * 64,
        snapshot_digest="0" * 64,
    )


@dataclass
class Feed:
    """A state plus a ledger-like position counter: ``feed.at(hours, event)``."""

    state: MeshState = field(default_factory=MeshState)

    def at(self, hours: float, *events: AnyEvent) -> frozenset[str]:
        changed: set[str] = set()
        for event in events:
            moment = T0 + timedelta(hours=hours)
            changed |= self.state.apply(event, self.state.position + 1, moment)
        return frozenset(changed)

    def score(self, agent: str, hours: float) -> int:
        view = self.state.trust_view(agent, T0 + timedelta(hours=hours))
        assert view is not None
        return view.score

    def tier(self, agent: str, hours: float) -> str:
        view = self.state.trust_view(agent, T0 + timedelta(hours=hours))
        assert view is not None
        return view.tier


def feed_with(*events: AnyEvent, config: TrustConfig | None = None) -> Feed:
    feed = Feed(MeshState(config))
    feed.at(0, *events)
    return feed


# -- score math -------------------------------------------------------------------


def test_new_agent_starts_at_initial_score() -> None:
    feed = feed_with(registered(A))
    assert feed.score(A, 0) == 800
    assert feed.tier(A, 0) == "trusted"


def test_medium_violation_costs_fifty() -> None:
    feed = feed_with(registered(A), violation(A, "medium"))
    assert feed.score(A, 0) == 750


def test_decay_is_two_points_an_hour() -> None:
    feed = feed_with(registered(A))
    assert feed.score(A, 10) == 780
    assert feed.score(A, 10.25) == 780  # 779.5 rounds half up
    assert feed.score(A, 10.26) == 779  # 779.48 rounds down


def test_decay_alone_stops_at_the_floor() -> None:
    feed = feed_with(registered(A))
    view = feed.state.trust_view(A, T0 + timedelta(hours=10_000))
    assert view is not None
    assert (view.score, view.decay.at_floor) == (100, True)


def test_penalties_go_below_the_floor_down_to_zero_and_decay_stops() -> None:
    feed = feed_with(registered(A), violation(A, "critical"), violation(A, "critical"))
    feed.at(1, violation(A, "high"))
    assert feed.score(A, 1) == 800 - 600 - 2 - 100
    assert feed.score(A, 500) == 98  # below the floor: decay does nothing
    feed.at(2, violation(A, "critical"))
    assert feed.score(A, 2) == 0
    assert feed.score(A, 3000) == 0


def test_rewards_are_capped_at_1000() -> None:
    feed = feed_with(registered(A), config=TrustConfig(initial_score=998))
    feed.at(0, signal(A))
    assert feed.score(A, 0) == 1000


def test_positive_event_restarts_the_decay_clock() -> None:
    feed = feed_with(registered(A))
    feed.at(10, signal(A))
    assert feed.score(A, 10) == 785
    assert feed.score(A, 20) == 765
    view = feed.state.trust_view(A, T0 + timedelta(hours=20))
    assert view is not None
    assert view.decay.anchor == T0 + timedelta(hours=10)


def test_violation_keeps_the_decay_clock_running_without_double_decay() -> None:
    feed = feed_with(registered(A))
    feed.at(5, violation(A, "low"))
    feed.at(7, violation(A, "low"))
    assert feed.score(A, 10) == 800 - 20 - 20
    view = feed.state.trust_view(A, T0 + timedelta(hours=10))
    assert view is not None
    assert view.decay.anchor == T0  # still the registration
    assert (view.components.base, view.components.decay) == (800 - 14 - 20, 6)


def test_completed_handshakes_reward_a_pair_once_per_window() -> None:
    feed = feed_with(registered(A), registered(B))
    # +2 each for the pair's first handshake; the repeat (either direction) and a
    # self-handshake earn nothing within 24 hours; one hour of decay takes 2 again.
    changed = feed.at(1, completed(A, B), completed(B, A), completed(A, A))
    assert changed == {A, B}
    assert (feed.score(A, 1), feed.score(B, 1)) == (800, 800)
    view = feed.state.trust_view(A, T0 + timedelta(hours=1))
    assert view is not None
    assert (view.components.handshakes_completed, view.components.positives) == (3, 1)
    feed.at(25, completed(A, B))  # a new window: rewarded again
    view = feed.state.trust_view(A, T0 + timedelta(hours=25))
    assert view is not None
    assert view.components.positives == 2


@pytest.mark.parametrize("reason", ["bad_signature", "expired", "score_too_low"])
def test_failed_handshake_costs_nobody(reason: str) -> None:
    feed = feed_with(registered(A), registered(B), failed(A, B, reason))
    assert (feed.score(A, 0), feed.score(B, 0)) == (800, 800)


def test_failed_handshake_for_other_reasons_is_only_counted() -> None:
    feed = feed_with(registered(A), registered(B), failed(A, B, "untrusted"))
    view = feed.state.trust_view(B, T0)
    assert view is not None
    assert (view.score, view.components.handshakes_failed) == (800, 1)


@pytest.mark.parametrize(
    ("score", "tier"),
    [
        (1000, "verified_partner"), (900, "verified_partner"), (899, "trusted"),
        (700, "trusted"), (699, "standard"), (500, "standard"), (499, "probationary"),
        (300, "probationary"), (299, "untrusted"), (0, "untrusted"),
    ],
)  # fmt: skip
def test_tier_boundaries(score: int, tier: str) -> None:
    assert tier_for(score, TrustConfig()) == tier


def test_min_threshold_overrides_higher_tiers_and_suspension_overrides_all() -> None:
    config = TrustConfig(min_threshold=600)
    assert tier_for(599, config) == "untrusted"
    assert tier_for(600, config) == "standard"
    assert tier_for(1000, config, suspended=True) == "suspended"


def test_suspended_agent_has_tier_suspended_until_reinstated() -> None:
    feed = feed_with(registered(A), suspended(A))
    assert (feed.tier(A, 0), feed.score(A, 0)) == ("suspended", 800)
    assert feed.state.registry_size() == 0
    feed.at(1, reinstated(A))
    assert feed.tier(A, 1) == "trusted"


def test_registry_size_and_tier_counts() -> None:
    feed = feed_with(registered(A), registered(B), registered(C), suspended(C))
    feed.at(0, violation(B, "critical"))
    assert feed.state.registry_size() == 2
    counts = feed.state.tier_counts(T0)
    assert counts["trusted"] == counts["standard"] == counts["suspended"] == 1
    assert sum(counts.values()) == 3


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"initial_score": 1001}, "initial_score"),
        ({"decay_rate": -1.0}, "decay_rate"),
        ({"decay_rate": float("nan")}, "decay_rate"),
        ({"decay_floor": 900}, "decay_floor"),
        ({"min_threshold": -1}, "min_threshold"),
        ({"penalties": {"low": 1}}, "penalties"),
        ({"max_delegation_depth": 0}, "max_delegation_depth"),
        ({"reward_signal": True}, "reward_signal"),
    ],
)
def test_config_rejects_bad_values(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrustConfig(**changes)


def test_config_is_hashable_and_copies_penalties() -> None:
    penalties = {"low": 1, "medium": 2, "high": 3, "critical": 4}
    config = TrustConfig(penalties=penalties)
    penalties["low"] = 99
    assert config.penalties["low"] == 1
    assert hash(config) == hash(TrustConfig(penalties=dict(config.penalties)))


# -- the fold ---------------------------------------------------------------------


def test_events_the_fold_cannot_apply_change_nothing() -> None:
    feed = feed_with(registered(A))
    before = feed.state.snapshot()
    for event in (violation(B), signal(B), suspended(B), revoked("nosuchgrant")):
        assert feed.at(1, event) == frozenset()
    assert feed.at(1, retention()) == frozenset()
    assert feed.at(1, registered(A, "tools:*")) == frozenset()  # duplicate registration
    after = feed.state.snapshot()
    assert (after["agents"], after["grants"]) == (before["agents"], before["grants"])


def test_redelivered_positions_are_ignored() -> None:
    state = MeshState()
    state.apply(registered(A), 1, T0)
    assert state.apply(violation(A), 2, T0) == {A}
    assert state.apply(violation(A), 2, T0) == frozenset()
    assert state.apply(violation(A), 1, T0) == frozenset()
    assert state.trust[A].violations["medium"] == 1


def test_changed_dids_and_positions() -> None:
    feed = feed_with(registered(A), registered(B))
    assert feed.at(0, registered(C)) == {C}
    assert feed.at(0, AgentKeyRotated(actor=A, occurred_at=STAMP, did=A, public_key="new")) == {A}
    assert feed.state.agents[A].public_key == "new"
    view = feed.state.trust_view(A, T0)
    assert view is not None
    assert view.position == feed.state.position == feed.state.agents[A].position


def test_apply_recorded_decodes_the_stored_body() -> None:
    state = MeshState()
    for position, event in enumerate((registered(A), violation(A, "high")), start=1):
        record = RecordedEvent(
            position=position,
            recorded_at=T0,
            stream_id=f"agent:{A}",
            stream_version=position,
            body=encode_event(event),
            signature=b"",
            prev_hash=b"",
            entry_hash=b"",
            event_type="",
            actor=LEDGER,
            subjects=(A,),
        )
        state.apply_recorded(record)
    assert state.trust_view(A, T0) is not None
    assert state.trust[A].violations["high"] == 1


def test_snapshot_round_trips_through_json() -> None:
    feed = feed_with(registered(A, "tools:*"), registered(B), signal(A))
    feed.at(1, granted("grant-0001", A, B, "tools:search", expires_at=T0 + timedelta(days=1)))
    feed.at(2, revoked("grant-0001"), suspended(B))
    snapshot = feed.state.snapshot()
    assert {type(leaf) for leaf in _leaves(snapshot)} <= {int, str, type(None)}  # no floats
    loaded = MeshState.from_snapshot(json.loads(json.dumps(snapshot)))
    assert loaded == feed.state
    assert loaded.snapshot() == snapshot


def test_snapshot_under_another_config_is_refused() -> None:
    snapshot = feed_with(registered(A)).state.snapshot()
    with pytest.raises(SnapshotError, match="configuration"):
        MeshState.from_snapshot(snapshot, TrustConfig(decay_rate=3.0))
    assert MeshState.from_snapshot(snapshot, TrustConfig()).config == TrustConfig()


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s.pop("agents"),
        lambda s: s.update(format=1),
        lambda s: s["agents"][A]["trust"].update(base_milli="800"),
        lambda s: s["agents"][A]["registry"].update(registered_at="yesterday"),
        lambda s: s["agents"][A]["registry"].update(status="gone"),
        lambda s: s["agents"].update({B: s["agents"][A]}),
        lambda s: s["grants"]["grant-0001"].update(parent="grant-0001"),
        lambda s: s["grants"]["grant-0001"].update(delegatee=STRANGER),
    ],
)
def test_malformed_snapshots_raise_snapshot_error(damage: Callable[[dict[str, Any]], Any]) -> None:
    feed = feed_with(registered(A, "tools:*"), registered(B))
    feed.at(0, granted("grant-0001", A, B, "tools:x"))
    snapshot = feed.state.snapshot()
    MeshState.from_snapshot(snapshot)  # intact, it loads
    damage(snapshot)
    with pytest.raises(SnapshotError):
        MeshState.from_snapshot(snapshot)


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


# -- capabilities and delegation ----------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "capability", "expected"),
    [
        ("tools:*", "tools:search", True), ("tools:*", "tools:x:y", True),
        ("tools:*", "tools:*", True), ("tools:*", "tools:x:*", True),
        ("tools:search", "tools:search", True), ("tools:*", "tools", False),
        ("tools:*", "toolsx:y", False), ("tools:search", "tools:*", False),
        ("tools:x:*", "tools:*", False), ("tools:s*", "tools:search", False),
    ],
)  # fmt: skip
def test_capability_coverage(pattern: str, capability: str, expected: bool) -> None:
    assert covers(pattern, capability) is expected


HOUR = timedelta(hours=1)


def delegation_world() -> Feed:
    """A, B, C, D, E registered (A holds tools:* and data:read), S suspended, grants:

    g-root (A→B tools:*), g-child (B→C tools:search, under g-root),
    g-revoked (A→B data:read, revoked), g-short (A→D tools:* until T0+1h),
    g-via-s (A→S tools:*, made before S was suspended).
    """
    feed = feed_with(
        registered(A, "tools:*", "data:read"),
        registered(B),
        registered(C),
        registered(D),
        registered(E),
        registered(S),
        granted("g-root0001", A, B, "tools:*"),
        granted("g-child001", B, C, "tools:search", parent="g-root0001"),
        granted("g-revoked1", A, B, "data:read"),
        revoked("g-revoked1"),
        granted("g-short001", A, D, "tools:*", expires_at=T0 + HOUR),
        granted("g-via-s001", A, S, "tools:*"),
        suspended(S),
    )
    assert len(feed.state.delegations.grants) == 5
    return feed


LATER = T0 + 2 * HOUR
REJECTIONS: list[tuple[DelegationGranted, str]] = [
    (granted("g-new00001", A, A, "tools:x"), "self_delegation"),
    (granted("g-root0001", A, C, "tools:x"), "duplicate_grant"),
    (granted("g-new00001", STRANGER, C, "tools:x"), "unknown_delegator"),
    (granted("g-new00001", A, STRANGER, "tools:x"), "unknown_delegatee"),
    (granted("g-new00001", S, C, "tools:x"), "suspended_delegator"),
    (granted("g-new00001", A, C), "no_capabilities"),
    (granted("g-new00001", A, C, "tools:x", expires_at=LATER), "already_expired"),
    (granted("g-new00001", B, D, "tools:x", parent="g-nothere1"), "unknown_parent"),
    (granted("g-new00001", C, D, "tools:x", parent="g-root0001"), "not_parent_delegatee"),
    (granted("g-new00001", B, D, "data:read", parent="g-revoked1"), "revoked_parent"),
    (granted("g-new00001", D, E, "tools:x", parent="g-short001"), "expired_parent"),
    (granted("g-new00001", S, E, "tools:x", parent="g-via-s001"), "suspended_delegator"),
    (granted("g-new00001", A, C, "admin"), "widening"),
    (granted("g-new00001", A, C, "tools:*", "data:*"), "widening"),
    (granted("g-new00001", C, D, "tools:*", parent="g-child001"), "widening"),
]


@pytest.mark.parametrize(("event", "reason"), REJECTIONS)
def test_delegation_rejections(event: DelegationGranted, reason: str) -> None:
    feed = delegation_world()
    with pytest.raises(DelegationError) as caught:
        validate_grant(feed.state, event, LATER)
    assert caught.value.reason == reason
    before = feed.state.snapshot()["grants"]
    assert feed.state.apply(event, feed.state.position + 1, LATER) == frozenset()
    assert feed.state.snapshot()["grants"] == before  # the fold re-checks and ignores it


def test_grant_under_a_suspended_delegators_grant_is_rejected() -> None:
    feed = delegation_world()
    feed.at(0, reinstated(S), granted("g-s-child1", S, E, "tools:x", parent="g-via-s001"))
    feed.at(0, suspended(S))
    event = granted("g-new00001", E, C, "tools:x", parent="g-s-child1")
    with pytest.raises(DelegationError) as caught:
        validate_grant(feed.state, event, T0)
    assert caught.value.reason == "inactive_parent"


def test_grant_may_not_outlive_its_parent() -> None:
    feed = delegation_world()
    for expires in (None, T0 + 2 * HOUR):
        event = granted("g-new00001", D, E, "tools:x", parent="g-short001", expires_at=expires)
        with pytest.raises(DelegationError) as caught:
            validate_grant(feed.state, event, T0)
        assert caught.value.reason == "outlives_parent"
    ok = granted("g-new00001", D, E, "tools:x", parent="g-short001", expires_at=T0 + HOUR)
    validate_grant(feed.state, ok, T0)


def test_chains_are_at_most_max_depth_links() -> None:
    agents = [did(100 + n) for n in range(7)]
    feed = feed_with(registered(agents[0], "tools:*"), *(registered(a) for a in agents[1:]))
    parent = None
    for depth in range(1, 6):
        grant_id = f"g-depth-{depth:03d}"
        event = granted(grant_id, agents[depth - 1], agents[depth], "tools:*", parent=parent)
        validate_grant(feed.state, event, T0)
        feed.at(0, event)
        parent = grant_id
    assert feed.state.delegations.grants["g-depth-005"].depth == 5
    too_deep = granted("g-depth-006", agents[5], agents[6], "tools:*", parent=parent)
    with pytest.raises(DelegationError) as caught:
        validate_grant(feed.state, too_deep, T0)
    assert caught.value.reason == "too_deep"
    chain = delegation_chain(feed.state, "g-depth-005")
    assert [g.depth for g in chain] == [5, 4, 3, 2, 1]


def test_revocation_rules() -> None:
    feed = delegation_world()
    cases = [
        ("g-nothere1", A, "unknown_grant"),
        ("g-root0001", C, "not_delegator"),
        ("g-revoked1", A, "already_revoked"),
    ]
    for grant_id, actor, reason in cases:
        with pytest.raises(DelegationError) as caught:
            validate_revocation(feed.state, grant_id, actor, LEDGER)
        assert caught.value.reason == reason
    validate_revocation(feed.state, "g-root0001", A, LEDGER)
    validate_revocation(feed.state, "g-child001", LEDGER, LEDGER)


def test_effective_capabilities() -> None:
    feed = delegation_world()
    state = feed.state
    assert effective_capabilities(state, A, T0) == ("data:read", "tools:*")
    assert effective_capabilities(state, B, T0) == ("tools:*",)  # g-revoked1 confers nothing
    assert effective_capabilities(state, C, T0) == ("tools:search",)
    assert effective_capabilities(state, D, T0) == ("tools:*",)
    assert effective_capabilities(state, D, T0 + HOUR) == ()  # expires_at <= now
    assert effective_capabilities(state, S, T0) == ()  # suspended
    assert effective_capabilities(state, STRANGER, T0) == ()


def test_revoking_a_grant_silences_its_subtree() -> None:
    feed = delegation_world()
    changed = feed.at(1, revoked("g-root0001"))
    assert changed == {A, B, C}
    assert effective_capabilities(feed.state, C, T0) == ()
    root = feed.state.delegations.grants["g-root0001"]
    assert (root.revoked_position, root.revoked_reason) == (feed.state.position, "test")
    assert root.revoked_at == T0 + HOUR
    child = feed.state.delegations.grants["g-child001"]
    assert not child.revoked  # inactive through its ancestor, not rewritten
    assert not is_active(feed.state, child, T0)


def test_suspending_a_delegator_silences_what_it_delegated_until_reinstated() -> None:
    feed = delegation_world()
    assert feed.at(1, suspended(B)) == {B, C}
    assert effective_capabilities(feed.state, C, T0) == ()
    assert feed.at(1, reinstated(B)) == {B, C}
    assert effective_capabilities(feed.state, C, T0) == ("tools:search",)


# -- properties -------------------------------------------------------------------

AGENTS = [did(n) for n in range(1, 6)]
CAPABILITY_POOL = ["tools:*", "tools:search", "tools:x:*", "tools:x:y", "data:read", "admin"]
FAILURE_REASONS = ["expired", "bad_signature", "untrusted"]
DELEGATION_STEPS = ["grant", "grant", "grant", "grant", "revoke", "suspend", "reinstate"]
ALL_STEPS = [*DELEGATION_STEPS, "register", "violation", "signal", "completed", "failed", "keep"]

capability_sets = st.lists(st.sampled_from(CAPABILITY_POOL), min_size=1, max_size=4, unique=True)


@dataclass
class World:
    """A ledger written as it goes: each step sees the state so far, so grants can be
    plausible (and then mostly accepted) instead of random (and nearly always refused)."""

    state: MeshState = field(default_factory=MeshState)
    now: datetime = T0
    items: list[tuple[AnyEvent, int, datetime]] = field(default_factory=list)

    def apply(self, event: AnyEvent) -> None:
        position = len(self.items) + 1
        self.items.append((event, position, self.now))
        self.state.apply(event, position, self.now)

    def agent(self, draw: st.DrawFn, *, registered: bool = True) -> str:
        """An agent: a registered one, unless ``registered`` is False (then any)."""
        known = sorted(self.state.agents) if registered else AGENTS
        return draw(st.sampled_from(known or AGENTS))


def _narrower(capability: str) -> list[str]:
    if not capability.endswith(":*"):
        return [capability]
    stem = capability[:-1]
    return [capability, f"{stem}x", f"{stem}x:*", f"{stem}y:z"]


def _candidate(draw: st.DrawFn, world: World) -> DelegationGranted:
    """A grant: usually one the rules allow, sometimes a deliberately careless one."""
    grants = sorted(world.state.delegations.grants.values(), key=lambda g: g.grant_id)
    parent = draw(st.none() | st.sampled_from(grants)) if grants else None
    careful = draw(st.integers(0, 4)) > 0
    delegator = parent.delegatee if parent and careful else world.agent(draw, registered=careful)
    record = world.state.agents.get(delegator)
    held = parent.capabilities if parent else (record.capabilities if record else ())
    pool = sorted({n for c in held for n in _narrower(c)}) if careful and held else CAPABILITY_POOL
    limit = parent.expires_at if parent else None
    return granted(
        f"grant-{len(world.items):04d}",
        delegator,
        world.agent(draw, registered=careful),
        *draw(st.lists(st.sampled_from(pool), min_size=1, max_size=2, unique=True)),
        expires_at=_expiry(draw, world.now, limit if careful else None),
        parent=None if parent is None else parent.grant_id,
    )


def _expiry(draw: st.DrawFn, now: datetime, limit: datetime | None) -> datetime | None:
    if limit is not None and limit > now:
        span = (limit - now) // timedelta(microseconds=1)
        return now + timedelta(microseconds=draw(st.integers(1, span)))
    offset = draw(st.none() | st.integers(-HOUR_US, 30 * HOUR_US))
    return None if offset is None else now + timedelta(microseconds=offset)


def _step(draw: st.DrawFn, world: World, kind: str, *, only_valid: bool) -> None:
    a, b = world.agent(draw, registered=False), world.agent(draw, registered=False)
    if kind == "grant":
        candidate = _candidate(draw, world)
        try:
            validate_grant(world.state, candidate, world.now)
        except DelegationError:
            if only_valid:
                return
        else:
            world.apply(candidate)
            assert candidate.grant_id in world.state.delegations.grants  # the fold agrees
            return
        world.apply(candidate)  # refused by the rules: the fold must ignore it
        assert candidate.grant_id not in world.state.delegations.grants
    elif kind == "revoke":
        grant_ids = sorted(world.state.delegations.grants) or ["grant-none"]
        world.apply(revoked(draw(st.sampled_from(grant_ids))))
    else:
        world.apply(_simple_event(draw, kind, a, b))


def _simple_event(draw: st.DrawFn, kind: str, a: str, b: str) -> AnyEvent:
    if kind == "register":
        return registered(a, *draw(capability_sets))
    if kind == "violation":
        return violation(a, draw(st.sampled_from(SEVERITIES)))
    if kind == "failed":
        return failed(a, b, draw(st.sampled_from(FAILURE_REASONS)))
    simple: dict[str, Callable[[], AnyEvent]] = {
        "signal": lambda: signal(a),
        "completed": lambda: completed(a, b),
        "suspend": lambda: suspended(a),
        "reinstate": lambda: reinstated(a),
    }
    return simple.get(kind, retention)()


def _worlds(
    draw: st.DrawFn, steps: list[str], *, only_valid: bool, length: int, depth: int = 5
) -> World:
    world = World(MeshState(TrustConfig(max_delegation_depth=depth)))
    for agent in AGENTS[: draw(st.integers(3, len(AGENTS)))]:
        world.apply(registered(agent, *draw(capability_sets)))
    for _ in range(draw(st.integers(length // 4, length))):
        world.now += timedelta(microseconds=draw(st.integers(0, 3 * HOUR_US)))
        _step(draw, world, draw(st.sampled_from(steps)), only_valid=only_valid)
    return world


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[AnyEvent, int, datetime]]:
    """Random ledgers: every event type, odd microsecond gaps, valid and refused grants."""
    return _worlds(draw, ALL_STEPS, only_valid=False, length=40).items


@st.composite
def delegation_worlds(draw: st.DrawFn) -> World:
    """Registered agents, then grants that ``validate_grant`` accepted, revocations and
    suspensions."""
    return _worlds(draw, DELEGATION_STEPS, only_valid=True, length=30, depth=3)


@settings(max_examples=100, deadline=None)
@given(histories(), st.data())
def test_fold_of_prefix_then_rest_equals_fold_of_all(
    items: list[tuple[AnyEvent, int, datetime]], data: st.DataObject
) -> None:
    cut = data.draw(st.integers(0, len(items)))
    whole = fold(items)
    prefix = fold(items[:cut])
    restored = MeshState.from_snapshot(json.loads(json.dumps(prefix.snapshot())))
    prefix.apply_all(items[cut:])
    restored.apply_all(items[cut:])
    assert prefix.snapshot() == whole.snapshot()
    assert restored.snapshot() == whole.snapshot()
    assert restored == whole


def _as_record(event: AnyEvent, position: int, moment: datetime) -> RecordedEvent:
    return RecordedEvent(
        position=position,
        recorded_at=moment,
        stream_id="s",
        stream_version=position,
        body=encode_event(event),
        signature=b"",
        prev_hash=b"",
        entry_hash=b"",
        event_type="",
        actor=event.actor,
        subjects=(),
    )


def _by_peers(
    items: list[tuple[AnyEvent, int, datetime]], data: st.DataObject
) -> list[tuple[AnyEvent, int, datetime]]:
    """The history with each report and signal filed by a drawn agent, the ledger or
    the subject itself: peer windows, weighting by standing and self-reports."""
    found = []
    for event, position, moment in items:
        if isinstance(event, PolicyViolation | TrustSignal):
            actor = data.draw(st.sampled_from([LEDGER, event.agent, *AGENTS]))
            repeat = data.draw(st.sampled_from([None, None, None, "earlier-event-0001"]))
            event = msgspec.structs.replace(event, actor=actor)
            if isinstance(event, PolicyViolation):
                event = msgspec.structs.replace(event, repeat_of=repeat)
        found.append((event, position, moment))
    return found


@settings(max_examples=100, deadline=None)
@given(histories(), st.data())
def test_folding_stored_bodies_equals_folding_the_full_events(
    items: list[tuple[AnyEvent, int, datetime]], data: st.DataObject
) -> None:
    """The lean decode of ``projections.bodies`` (``apply_recorded``, ``fold_records``)
    folds to exactly what the full event structs fold to."""
    items = _by_peers(items, data)
    records = [_as_record(*item) for item in items]
    whole = fold(items).snapshot()
    one_by_one = MeshState()
    for record in records:
        one_by_one.apply_recorded(record)
    in_bulk = MeshState()
    cut = data.draw(st.integers(0, len(records)))
    in_bulk.fold_records(records[:cut])
    in_bulk.fold_records(records[cut:])
    assert one_by_one.snapshot() == whole
    assert in_bulk.snapshot() == whole


@settings(max_examples=100, deadline=None)
@given(histories(), st.data())
def test_what_apply_returns_is_what_changed_each_stamped_with_its_position(
    items: list[tuple[AnyEvent, int, datetime]], data: st.DataObject
) -> None:
    """The handlers stamp the position on what they change themselves: the DIDs
    ``apply`` returns are exactly the agents whose record or trust changed, and each
    of them (record and trust) carries the event's position; nobody else moved."""
    state = MeshState()
    for event, position, moment in _by_peers(items, data):
        before = {did: state.snapshot()["agents"][did] for did in state.agents}
        changed = state.apply(event, position, moment)
        after = state.snapshot()["agents"]
        moved = {did for did in after if after[did] != before.get(did)}
        # A refused event can still stamp nothing and change nothing; a changed agent's
        # documents differ at least by their position.
        assert changed == moved
        for did in changed:
            assert after[did]["registry"]["position"] == position
            assert after[did]["trust"]["position"] == position


@settings(max_examples=100, deadline=None)
@given(histories(), st.data(), st.integers(0, 400 * HOUR_US))
def test_a_peers_standing_is_its_trust_view(
    items: list[tuple[AnyEvent, int, datetime]], data: st.DataObject, later: int
) -> None:
    state = fold(_by_peers(items, data))
    now = T0 + timedelta(microseconds=later)
    for agent, trust in state.trust.items():
        view = state.trust_view(agent, now)
        assert view is not None
        standing = view.tier not in ("suspended", "untrusted")
        assert _standing(state, trust, to_micros(now)) == (view.score if standing else None)


def test_lean_bodies_for_reports_and_handshakes_full_events_for_the_rest() -> None:
    lean = {
        violation(A): ReportBody,
        signal(A): SignalBody,
        completed(A, B): HandshakeBody,
        failed(A, B, "expired"): FailedHandshakeBody,
    }
    for event, kind in lean.items():
        decoded = decode_for_fold(encode_event(event))
        assert type(decoded) is kind
        for name in msgspec.structs.fields(kind):
            assert getattr(decoded, name.name) == getattr(event, name.name)
    for event in (registered(A, "tools:*"), suspended(A), reinstated(A), revoked("g-000001")):
        assert decode_for_fold(encode_event(event)) == event
    assert decode_for_fold(encode_event(retention())) == retention()
    for bad in (b"{", b'{"type": "no.such"}', b'{"type": "policy.violation", "actor": 1}'):
        with pytest.raises(EventValidationError):
            decode_for_fold(bad)


trust_events = st.lists(
    st.tuples(
        st.integers(0, 50 * HOUR_US),
        st.sampled_from(["signal", "completed", "low", "medium", "high", "critical", "failed"]),
    ),
    max_size=20,
)


def _single_agent_feed(steps: list[tuple[int, str]]) -> tuple[MeshState, datetime]:
    state, now = MeshState(), T0
    state.apply(registered(A), 1, now)
    state.apply(registered(B), 2, now)
    for position, (gap, kind) in enumerate(steps, start=3):
        now += timedelta(microseconds=gap)
        state.apply(_trust_event(kind), position, now)
    return state, now


def _trust_event(kind: str) -> AnyEvent:
    if kind == "signal":
        return signal(A)
    if kind == "completed":
        return completed(A, B)
    if kind == "failed":
        return failed(B, A, "expired")
    return violation(A, next(s for s in SEVERITIES if s == kind))


@settings(max_examples=150, deadline=None)
@given(trust_events, st.lists(st.integers(0, 2000 * HOUR_US), min_size=2, max_size=6))
def test_decay_is_monotone_and_never_crosses_the_floor(
    steps: list[tuple[int, str]], offsets: list[int]
) -> None:
    state, last = _single_agent_feed(steps)
    floor = state.config.decay_floor * 1000
    at_last = state.trust[A].base_milli
    scores = []
    for offset in sorted(offsets):
        view = state.trust_view(A, last + timedelta(microseconds=offset))
        assert view is not None
        scores.append(view.score_milli)
    assert scores == sorted(scores, reverse=True)
    assert all(s >= min(at_last, floor) for s in scores)
    if at_last <= floor:
        assert set(scores) == {at_last}


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 10 * HOUR_US), st.sampled_from(SEVERITIES[:2])), max_size=10),
    st.integers(0, 10 * HOUR_US),
)
def test_decay_between_violations_is_exactly_linear(
    steps: list[tuple[int, Severity]], tail: int
) -> None:
    config = TrustConfig(initial_score=1000, decay_floor=0, decay_rate=2.5)
    state, now = MeshState(config), T0
    state.apply(registered(A), 1, now)
    lost = 0
    for position, (gap, severity) in enumerate(steps, start=2):
        now += timedelta(microseconds=gap)
        state.apply(violation(A, severity), position, now)
        lost += config.penalties[severity] * 1000
    query = now + timedelta(microseconds=tail)
    view = state.trust_view(A, query)
    assert view is not None
    # One floor division over the whole span: re-anchoring never decays twice.
    elapsed = (query - T0) // timedelta(microseconds=1)
    assert view.score_milli == 1_000_000 - lost - 2500 * elapsed // HOUR_US


def _active_grants(world: World, now: datetime) -> Iterator[Grant]:
    for grant in world.state.delegations.grants.values():
        if is_active(world.state, grant, now):
            yield grant


@settings(max_examples=75, deadline=None)
@given(delegation_worlds(), st.integers(-3 * HOUR_US, 30 * HOUR_US))
def test_grants_never_widen_beyond_the_root_delegator(world: World, offset: int) -> None:
    state, now = world.state, world.now + timedelta(microseconds=offset)
    for grant in _active_grants(world, now):
        chain = delegation_chain(state, grant.grant_id)
        root_holds = state.agents[chain[-1].delegator].capabilities
        for link, above in zip(chain, [*chain[1:], None], strict=True):
            allowed = above.capabilities if above else root_holds
            assert all(covered_by_any(c, allowed) for c in link.capabilities)
            assert all(covered_by_any(c, root_holds) for c in link.capabilities)
        assert grant.depth == len(chain) <= state.config.max_delegation_depth
    for agent, record in state.agents.items():
        holds = {
            c for g in _active_grants(world, now) if g.delegatee == agent for c in g.capabilities
        }
        expected = holds if record.active else set()
        assert set(granted_capabilities(state, agent, now)) == expected


@settings(max_examples=75, deadline=None)
@given(delegation_worlds(), st.integers(-3 * HOUR_US, 30 * HOUR_US))
def test_revoked_and_expired_subtrees_are_inactive(world: World, offset: int) -> None:
    state, now = world.state, world.now + timedelta(microseconds=offset)
    graph = state.delegations
    for grant in list(graph.grants.values()):
        if grant.revoked or grant.expired(now):
            assert all(not is_active(state, g, now) for g in graph.subtree(grant.grant_id))
    for agent, record in state.agents.items():
        caps = effective_capabilities(state, agent, now)
        if not record.active:
            assert caps == ()
        else:
            assert set(record.capabilities) <= set(caps)


def _stretched(
    items: list[tuple[AnyEvent, int, datetime]], stretch: int
) -> list[tuple[AnyEvent, int, datetime]]:
    """The history with every gap between entries ``stretch`` times as long."""
    return [(event, position, T0 + (moment - T0) * stretch) for event, position, moment in items]


def _without_windows(snapshot: dict[str, Any]) -> dict[str, Any]:
    agents = {
        did: {**entry, "trust": {**entry["trust"], "peers": None, "partners": None}}
        for did, entry in snapshot["agents"].items()
    }
    return {**snapshot, "agents": agents}


@settings(max_examples=150, deadline=None)
@given(histories(), st.data(), st.sampled_from([1, 6, 20]))
def test_windows_over_are_dropped_and_no_score_moves(
    items: list[tuple[AnyEvent, int, datetime]], data: st.DataObject, stretch: int
) -> None:
    """A peer window (or a handshake pair's) that is over counts as none, so the fold
    drops it when a window opens: every score and tier, at any later time, is what the
    fold keeping every window gives; only windows over at the last entry are gone; and
    a fold resumed from a snapshot (windows restored in order of start) keeps and drops
    the same ones as a fold of everything."""
    items = _stretched(_by_peers(items, data), stretch)
    dropped = fold(items)
    with mock.patch.object(state_module, "_drop_over", return_value=None):
        kept = fold(items)
    assert _without_windows(dropped.snapshot()) == _without_windows(kept.snapshot())
    last = items[-1][2] if items else T0
    for did, trust in dropped.trust.items():
        for later in (0, 5 * HOUR_US, 30 * HOUR_US, 400 * HOUR_US):
            moment = last + timedelta(microseconds=later)
            assert dropped.trust_view(did, moment) == kept.trust_view(did, moment)
        every = kept.trust[did]
        assert trust.peers.items() <= every.peers.items()
        assert trust.partners.items() <= every.partners.items()
        for peer in every.peers.keys() - trust.peers.keys():
            assert to_micros(last) - every.peers[peer][0] >= PAIR_WINDOW_US
        for peer in every.partners.keys() - trust.partners.keys():
            assert to_micros(last) - every.partners[peer] >= PAIR_WINDOW_US
    cut = data.draw(st.integers(0, len(items)))
    restored = MeshState.from_snapshot(json.loads(json.dumps(fold(items[:cut]).snapshot())))
    restored.apply_all(items[cut:])
    assert restored.snapshot() == dropped.snapshot()


def test_a_window_over_is_dropped_when_another_opens() -> None:
    """Boundaries and order: a window is over 24 h after it opened (not a microsecond
    before); a renewed window moves behind the others; a state restored from its
    snapshot drops what the state it came from drops."""
    target, first, second, third = AGENTS[:4]
    assert first < second < third  # restored windows are in order of start, not of DID
    state = fold([(registered(did), n, T0) for n, did in enumerate(AGENTS[:4], start=1)])
    position = 4

    def report(reporter: str, hours: float, micros: int = 0) -> None:
        nonlocal position
        position += 1
        moment = T0 + timedelta(hours=hours, microseconds=micros)
        event = msgspec.structs.replace(violation(target, "low"), actor=reporter)
        state.apply(event, position, moment)

    def shake(partner: str, hours: float) -> None:
        nonlocal position
        position += 1
        state.apply(completed(target, partner), position, T0 + timedelta(hours=hours))

    report(second, 1)
    report(first, 2)
    report(third, 25, -1)  # second's window (1 h) has a microsecond left
    assert list(state.trust[target].peers) == [second, first, third]
    restored = MeshState.from_snapshot(json.loads(json.dumps(state.snapshot())))
    assert list(restored.trust[target].peers) == [second, first, third]
    report(first, 26)  # first's window (2 h) is over: renewed, to the end; second's dropped
    assert list(state.trust[target].peers) == [third, first]
    report(second, 49)  # third's (25 h) over; first's (26 h) not
    assert list(state.trust[target].peers) == [first, second]
    for n, (reporter, hours) in enumerate(((first, 26), (second, 49)), start=8):
        restored.apply(
            msgspec.structs.replace(violation(target, "low"), actor=reporter),
            n,
            T0 + timedelta(hours=hours),
        )
    assert restored.trust[target].peers == state.trust[target].peers
    shake(second, 50)
    shake(first, 51)
    shake(second, 74)  # over at 74 h, renewed behind first's
    assert list(state.trust[target].partners) == [first, second]
    shake(third, 75)  # first's (51 h) over
    assert list(state.trust[target].partners) == [second, third]
