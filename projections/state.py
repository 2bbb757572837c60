"""``MeshState``: the fold of the ledger into registry, trust and delegation state.

``apply`` takes one event with its ledger position and ``recorded_at`` (the
ledger's trusted time; the client's ``occurred_at`` is never used) and
mutates plain dicts and slots objects in place, so a rebuild folds tens of
thousands of events per second. It is still pure: no I/O, no clock.

The fold is deterministic and idempotent under redelivery: an event at a
position the state has already passed is ignored. Events it cannot apply
(about an unknown agent or grant; the ledger rejects those already) change
nothing. Grants add authority, so the fold re-checks each one with
``validate_grant`` at its ``recorded_at`` and ignores those that fail
(fail closed); revocations only take authority away, so every revocation of
a known, unrevoked grant is applied.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import datetime
from typing import Annotated, Any, Final, Protocol

import msgspec

from ledger.chain import RecordedEvent
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
    LedgerKeyRotated,
    PolicyViolation,
    RetentionApplied,
    TrustSignal,
)
from ledger.timefmt import format_time, parse_time
from projections.bodies import (
    FailedHandshakeBody,
    FoldEvent,
    HandshakeBody,
    ReportBody,
    SignalBody,
    decode_for_fold,
)
from projections.config import MAX_SCORE, SEVERITIES, TrustConfig
from projections.delegation import (
    DelegationGraph,
    Grant,
    grant_from_event,
    validate_grant,
)
from projections.errors import DelegationError, SnapshotError
from projections.registry import AgentRecord, AgentStatus, registry_size
from projections.trust import (
    MILLI,
    TIERS,
    TrustState,
    TrustView,
    new_trust,
    penalize_milli,
    reward,
    reward_milli,
    score_milli_at,
    to_micros,
    trust_at,
)

SNAPSHOT_FORMAT: Final = 2
PAIR_WINDOW_US: Final = 24 * 3_600_000_000
"""A peer's reports about one agent, and the rewards of one pair's handshakes, are
bounded per window of 24 hours (see ``_peer_effect`` and ``_handshake_completed``)."""
_NOTHING: frozenset[str] = frozenset()

Handler = Callable[["MeshState", Any, int, datetime, int], Collection[str]]
"""A handler folds one event: it stamps ``position`` on the record and the trust of every
agent whose projected state it changed, and returns their DIDs."""


class Folded(Protocol):
    """What ``MeshState.fold_records`` reads of a stored entry: a ``RecordedEvent``,
    or a ``ledger.ports.StoredBody`` (the body alone, for a rebuild)."""

    @property
    def position(self) -> int: ...

    @property
    def recorded_at(self) -> datetime: ...

    @property
    def body(self) -> bytes: ...


class MeshState:
    """Registry, trust and delegation state folded from the ledger up to ``position``."""

    __slots__ = ("agents", "config", "delegations", "position", "recorded_at", "trust")

    def __init__(self, config: TrustConfig | None = None) -> None:
        self.config: TrustConfig = config if config is not None else TrustConfig()
        self.agents: dict[str, AgentRecord] = {}
        self.trust: dict[str, TrustState] = {}
        self.delegations = DelegationGraph()
        self.position = 0
        self.recorded_at: datetime | None = None

    # -- folding ---------------------------------------------------------------

    def apply(self, event: FoldEvent, position: int, recorded_at: datetime) -> frozenset[str]:
        """Fold one event (a full struct, or the lean one ``projections.bodies`` decodes
        a stored body into); return the DIDs whose projected state changed."""
        if position <= self.position:
            return _NOTHING
        changed = _HANDLERS[type(event)](self, event, to_micros(recorded_at), recorded_at, position)
        self.position = position
        self.recorded_at = recorded_at
        return frozenset(changed)

    def apply_recorded(self, record: RecordedEvent) -> frozenset[str]:
        """Decode a stored entry's body (the fields the fold reads) and fold it."""
        return self.apply(decode_for_fold(record.body), record.position, record.recorded_at)

    def fold_records(self, records: Iterable[Folded]) -> None:
        """Fold stored entries in order, as ``apply_recorded`` does one at a time, without
        collecting what changed (a rebuild writes every document anyway)."""
        # ``apply`` inlined: a rebuild runs this loop once per event of the ledger. The
        # handlers stamp the positions of what they change themselves.
        handlers, decode = _HANDLERS, decode_for_fold
        for record in records:
            event = decode(record.body)
            position = record.position
            if position <= self.position:
                continue
            moment = record.recorded_at
            handlers[type(event)](self, event, to_micros(moment), moment, position)
            self.position = position
            self.recorded_at = moment

    def apply_all(self, items: Iterable[tuple[AnyEvent, int, datetime]]) -> frozenset[str]:
        """Fold ``(event, position, recorded_at)`` triples; return every changed DID."""
        changed: set[str] = set()
        for event, position, recorded_at in items:
            changed.update(self.apply(event, position, recorded_at))
        return frozenset(changed)

    def apply_all_recorded(self, records: Iterable[RecordedEvent]) -> frozenset[str]:
        """Fold stored entries in order; return every changed DID."""
        changed: set[str] = set()
        for record in records:
            changed.update(self.apply_recorded(record))
        return frozenset(changed)

    # -- queries ----------------------------------------------------------------

    def trust_view(self, did: str, now: datetime) -> TrustView | None:
        """The trust of ``did`` at ``now``, or None for an unknown agent."""
        state = self.trust.get(did)
        if state is None:
            return None
        suspended = self.agents[did].status == "suspended"
        return trust_at(state, self.config, now, suspended=suspended)

    def registry_size(self) -> int:
        """Number of active agents."""
        return registry_size(self.agents)

    def tier_counts(self, now: datetime) -> dict[str, int]:
        """How many agents are in each tier at ``now`` (every tier present, maybe 0)."""
        counts = dict.fromkeys(TIERS, 0)
        for did in self.trust:
            view = self.trust_view(did, now)
            assert view is not None  # iterating known agents
            counts[view.tier] += 1
        return counts

    # -- snapshots --------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The whole state as JSON-compatible data (ints, strings, null), keys sorted."""
        agents = {
            did: {"registry": self.agents[did].to_dict(), "trust": self.trust[did].to_dict()}
            for did in sorted(self.agents)
        }
        grants = self.delegations.grants
        return {
            "agents": agents,
            "config": self.config.as_dict(),
            "format": SNAPSHOT_FORMAT,
            "grants": {gid: grants[gid].to_dict() for gid in sorted(grants)},
            "position": self.position,
            "recorded_at": None if self.recorded_at is None else format_time(self.recorded_at),
        }

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any], config: TrustConfig | None = None) -> MeshState:
        """Load a ``snapshot()``; raise ``SnapshotError`` if malformed or folded under
        another config than ``config`` (None: use the snapshot's own)."""
        try:
            msgspec.convert(data, _Snapshot)
            return _load(data, config)
        except (msgspec.ValidationError, ValueError, KeyError) as exc:
            raise SnapshotError(f"invalid projection snapshot: {exc}") from exc

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MeshState):
            return NotImplemented
        return self.snapshot() == other.snapshot()

    __hash__ = None  # type: ignore[assignment]  # mutable: equal states may later differ

    def __repr__(self) -> str:
        return f"<MeshState position={self.position} agents={len(self.agents)}>"


def fold(
    items: Iterable[tuple[AnyEvent, int, datetime]], config: TrustConfig | None = None
) -> MeshState:
    """A new state with ``(event, position, recorded_at)`` triples folded in."""
    state = MeshState(config)
    state.apply_all(items)
    return state


def fold_recorded(records: Iterable[RecordedEvent], config: TrustConfig | None = None) -> MeshState:
    """A new state with stored entries folded in."""
    state = MeshState(config)
    state.apply_all_recorded(records)
    return state


# -- event handlers: (state, event, at µs, at datetime, position) -> changed DIDs ------------
#
# Each handler stamps ``position`` on the documents it changes (``_stamp``) and returns
# their DIDs. The reports, signals and handshakes — 99 % of a ledger — do so inline
# and return a tuple: a rebuild runs them once per event and reads nothing they return.


def _stamp(state: MeshState, dids: Collection[str], position: int) -> frozenset[str]:
    """Stamp ``position`` on the record and the trust of each of ``dids``; their set."""
    agents, trust = state.agents, state.trust
    for did in dids:
        agents[did].position = position
        trust[did].position = position
    return frozenset(dids)


def _registered(
    state: MeshState, event: AgentRegistered, at: int, moment: datetime, position: int
) -> Collection[str]:
    if event.did in state.agents:
        return _NOTHING
    state.agents[event.did] = AgentRecord(
        did=event.did,
        public_key=event.public_key,
        sponsor=event.sponsor,
        capabilities=tuple(event.capabilities),
        metadata=dict(event.metadata),
        registered_at=moment,
    )
    state.trust[event.did] = new_trust(event.did, state.config, at)
    return _stamp(state, (event.did,), position)


def _key_rotated(
    state: MeshState, event: AgentKeyRotated, at: int, moment: datetime, position: int
) -> Collection[str]:
    agent = state.agents.get(event.did)
    if agent is None:
        return _NOTHING
    agent.public_key = event.public_key
    return _stamp(state, (event.did,), position)


def _suspended(
    state: MeshState, event: AgentSuspended, at: int, moment: datetime, position: int
) -> Collection[str]:
    return _set_status(state, event.did, "suspended", event.reason, position)


def _reinstated(
    state: MeshState, event: AgentReinstated, at: int, moment: datetime, position: int
) -> Collection[str]:
    return _set_status(state, event.did, "active", event.reason, position)


def _set_status(
    state: MeshState, did: str, status: AgentStatus, reason: str, position: int
) -> Collection[str]:
    agent = state.agents.get(did)
    if agent is None:
        return _NOTHING
    agent.status = status
    agent.status_reason = reason
    # What this agent delegated is silenced (or restored) with it.
    return _stamp(state, {did, *state.delegations.downstream_of(did)}, position)


def _handshake_completed(
    state: MeshState,
    event: HandshakeCompleted | HandshakeBody,
    at: int,
    moment: datetime,
    position: int,
) -> Collection[str]:
    """Both parties count the handshake; each earns the reward at most once per
    partner per window, so two agents cannot farm points by shaking hands in a loop.
    A self-handshake (refused by the API) earns nothing."""
    initiator, responder = event.initiator, event.responder
    trusts, agents, config = state.trust, state.agents, state.config
    first, second = trusts.get(initiator), trusts.get(responder)
    if initiator == responder:  # one party, who earns nothing
        if first is None:
            return _NOTHING
        first.handshakes_completed += 1
        first.position = position
        agents[initiator].position = position
        return (initiator,)
    changed: tuple[str, ...] = ()
    for trust, did, partner in ((first, initiator, responder), (second, responder, initiator)):
        if trust is None:
            continue
        trust.handshakes_completed += 1
        partners = trust.partners
        last = partners.get(partner)
        if last is None or at - last >= PAIR_WINDOW_US:
            reward(trust, config, config.reward_handshake, at)
            _drop_over(partners, at)  # ``partner``'s own, if over, among them
            partners[partner] = at
        trust.position = position
        agents[did].position = position
        changed += (did,)
    return changed


def _handshake_failed(
    state: MeshState,
    event: HandshakeFailed | FailedHandshakeBody,
    at: int,
    moment: datetime,
    position: int,
) -> Collection[str]:
    """Counted, never penalised: no failure reason (a bad or missing answer, an
    expired challenge, a low score) can be attributed to the responder, since anyone
    can answer a challenge with garbage or start one the responder never sees."""
    parties = _known(state, event.initiator, event.responder)
    for did in parties:
        state.trust[did].handshakes_failed += 1
    return _stamp(state, parties, position)


def _violation(
    state: MeshState, event: PolicyViolation | ReportBody, at: int, moment: datetime, position: int
) -> Collection[str]:
    agent = event.agent
    trust = state.trust.get(agent)
    if trust is None or event.repeat_of is not None:  # repeats are evidence, not penalties
        return _NOTHING
    config = state.config
    penalties = config.penalty_milli
    full = penalties[event.severity]
    cost = _peer_effect(state, event.actor, trust, full, penalties["critical"], 1, at)
    if cost == 0:
        return _NOTHING
    penalize_milli(trust, config, cost, at)
    trust.violations[event.severity] += 1
    trust.position = position
    state.agents[agent].position = position
    return (agent,)


def _signal(
    state: MeshState, event: TrustSignal | SignalBody, at: int, moment: datetime, position: int
) -> Collection[str]:
    agent, actor = event.agent, event.actor
    trust = state.trust.get(agent)
    if trust is None or actor == agent:  # nobody raises its own score
        return _NOTHING
    config = state.config
    full = config.reward_signal * MILLI
    gain = _peer_effect(state, actor, trust, full, full, 2, at)
    if gain == 0:
        return _NOTHING
    reward_milli(trust, config, gain, at)
    trust.position = position
    state.agents[agent].position = position
    return (agent,)


def _peer_effect(
    state: MeshState,
    reporter: str,
    target: TrustState,
    full: int,
    cap: int,
    slot: int,
    at: int,
) -> int:
    """Milli-points a report by ``reporter`` moves ``target`` by (``full`` at most).

    1. The ledger (an admin) and the agent's own key (its sidecar) count in full.
    2. A peer counts by its own standing at that moment: ``full * score // 1000``;
       a suspended or untrusted peer counts zero (its report stays recorded).
    3. One peer moves one agent by at most ``cap`` — one critical penalty (``slot``
       1) or one signal's reward (``slot`` 2) — per 24-hour window, however many it
       files, weighed the same way.
    """
    peer = state.trust.get(reporter)
    if peer is None or reporter == target.did:  # 1. (an actor the fold does not know is
        return full  # the ledger: the append rules admit no other unregistered signer)
    score = _standing(state, peer, at)
    if score is None:  # 2.
        return 0
    weighted = full * score // MAX_SCORE
    peers = target.peers
    window = peers.get(reporter)
    if window is None or at - window[0] >= PAIR_WINDOW_US:  # 3.
        _drop_over(peers, at)  # ``reporter``'s own, if over, among them
        window = peers[reporter] = [at, 0, 0]
    room = cap * score // MAX_SCORE - window[slot]
    effect = weighted if weighted < room else room
    if effect <= 0:
        return 0
    window[slot] += effect
    return effect


def _drop_over(windows: dict[str, Any], at: int) -> None:
    """Forget the windows that are over at ``at`` (µs): a window over counts as no
    window at all (the next report or handshake opens a new one), so dropping it
    changes no score; without it an agent's document would keep every peer that
    ever reported on it (about a hundred for each agent of a 10M-event ledger).

    ``windows`` maps a peer to its window's start (``partners``) or to
    ``[start, …]`` (``peers``) and is kept in order of start — a window opens at
    the end of the dict, at the entry's ``recorded_at``, which never runs
    backwards; one renewed was over, so it was dropped first; ``TrustState.from_dict``
    restores the order — so the windows over are at its front. Called when a window opens;
    what it drops depends only on the events folded, so every fold of the same
    entries (live, rebuilt, from a snapshot, in any batches) keeps the same ones."""
    over = []
    for peer, window in windows.items():
        start = window if type(window) is int else window[0]
        if at - start < PAIR_WINDOW_US:
            break
        over.append(peer)
    for peer in over:
        del windows[peer]


def _standing(state: MeshState, trust: TrustState, at: int) -> int | None:
    """The score ``trust_view`` gives the agent of ``trust`` at ``at`` (µs), or None
    when its tier is suspended or untrusted (``tier_for``), without building the view:
    a peer's standing is read for every report it files."""
    if state.agents[trust.did].status == "suspended":
        return None
    config = state.config
    milli = score_milli_at(trust, config.decay_rate_milli, config.decay_floor_milli, at)
    score = (milli + MILLI // 2) // MILLI  # ``points``
    return None if score < config.min_threshold else score


def _granted(
    state: MeshState, event: DelegationGranted, at: int, moment: datetime, position: int
) -> Collection[str]:
    try:
        validate_grant(state, event, moment)
    except DelegationError:
        return _NOTHING
    state.delegations.add(grant_from_event(state, event, moment, position))
    return _stamp(state, (event.delegator, event.delegatee), position)


def _revoked(
    state: MeshState, event: DelegationRevoked, at: int, moment: datetime, position: int
) -> Collection[str]:
    graph = state.delegations
    grant = graph.grants.get(event.grant_id)
    if grant is None or grant.revoked:
        return _NOTHING
    graph.revoke(event.grant_id, moment, position, event.reason)
    changed = {grant.delegator, *(g.delegatee for g in graph.subtree(event.grant_id))}
    return _stamp(state, changed, position)


def _retention(
    state: MeshState,
    event: RetentionApplied | LedgerKeyRotated,
    at: int,
    moment: datetime,
    position: int,
) -> Collection[str]:
    return _NOTHING  # the ledger's own business: no agent's state changes


def _known(state: MeshState, *dids: str) -> frozenset[str]:
    return frozenset(did for did in dids if did in state.trust)


_HANDLERS: dict[type, Handler] = {
    AgentRegistered: _registered,
    AgentKeyRotated: _key_rotated,
    AgentSuspended: _suspended,
    AgentReinstated: _reinstated,
    HandshakeCompleted: _handshake_completed,
    HandshakeFailed: _handshake_failed,
    PolicyViolation: _violation,
    TrustSignal: _signal,
    DelegationGranted: _granted,
    DelegationRevoked: _revoked,
    RetentionApplied: _retention,
    LedgerKeyRotated: _retention,
    # What projections.bodies decodes a stored report, signal or handshake into.
    ReportBody: _violation,
    SignalBody: _signal,
    HandshakeBody: _handshake_completed,
    FailedHandshakeBody: _handshake_failed,
}


# -- snapshot schema: checked with msgspec before anything is built --------------


class _Violations(msgspec.Struct, forbid_unknown_fields=True):
    low: int
    medium: int
    high: int
    critical: int


class _Trust(msgspec.Struct, forbid_unknown_fields=True):
    did: str
    base_milli: int
    base_at: str
    decay_from: str
    violations: _Violations
    positives: int
    handshakes_completed: int
    handshakes_failed: int
    position: int
    peers: dict[str, Annotated[list[int], msgspec.Meta(min_length=3, max_length=3)]] = {}
    partners: dict[str, int] = {}


class _Registry(msgspec.Struct, forbid_unknown_fields=True):
    did: str
    public_key: str
    sponsor: str | None
    capabilities: list[str]
    metadata: dict[str, str]
    registered_at: str
    status: AgentStatus
    status_reason: str
    position: int


class _Agent(msgspec.Struct, forbid_unknown_fields=True):
    registry: _Registry
    trust: _Trust


class _Grant(msgspec.Struct, forbid_unknown_fields=True):
    grant_id: str
    delegator: str
    delegatee: str
    capabilities: list[str]
    expires_at: str | None
    parent: str | None
    depth: int
    granted_at: str
    granted_position: int
    revoked_at: str | None
    revoked_position: int | None
    revoked_reason: str | None


class _Snapshot(msgspec.Struct, forbid_unknown_fields=True):
    format: int
    config: dict[str, int]
    position: int
    recorded_at: str | None
    agents: dict[str, _Agent]
    grants: dict[str, _Grant]


def _load(data: Mapping[str, Any], config: TrustConfig | None) -> MeshState:
    if data["format"] != SNAPSHOT_FORMAT:
        raise SnapshotError(f"unknown snapshot format {data['format']!r}")
    state = MeshState(_snapshot_config(data["config"], config))
    state.position = data["position"]
    state.recorded_at = None if data["recorded_at"] is None else parse_time(data["recorded_at"])
    for did, entry in data["agents"].items():
        _load_agent(state, did, entry)
    grants = (Grant.from_dict(g) for g in data["grants"].values())
    # Parents before children, so the graph's indexes come out as the fold built them.
    for grant in sorted(grants, key=lambda g: g.granted_position):
        _load_grant(state, grant)
    return state


def _load_grant(state: MeshState, grant: Grant) -> None:
    graph = state.delegations
    # A parent must already be loaded: this also rules out cycles that would make
    # chain walks loop forever.
    if grant.parent is not None and grant.parent not in graph.grants:
        raise SnapshotError(f"grant {grant.grant_id!r} comes before its parent {grant.parent!r}")
    if grant.grant_id in graph.grants or not {grant.delegator, grant.delegatee} <= {*state.agents}:
        raise SnapshotError(f"grant {grant.grant_id!r} is duplicated or names unknown agents")
    graph.add(grant)


def _load_agent(state: MeshState, did: str, entry: Mapping[str, Any]) -> None:
    record = AgentRecord.from_dict(entry["registry"])
    trust = TrustState.from_dict(entry["trust"])
    if not record.did == trust.did == did:
        raise SnapshotError(f"agent entry {did!r} holds another agent's data")
    state.agents[did] = record
    state.trust[did] = trust


def _snapshot_config(saved: Mapping[str, int], config: TrustConfig | None) -> TrustConfig:
    if config is None:
        return _config_from(saved)
    if config.as_dict() != dict(saved):
        # Scores were folded with other parameters: only a rebuild from the ledger is right.
        raise SnapshotError("snapshot was folded under another trust configuration; rebuild it")
    return config


def _config_from(saved: Mapping[str, int]) -> TrustConfig:
    penalties: dict[str, int] = {s: saved[f"penalty_{s}"] for s in SEVERITIES}
    return TrustConfig(
        initial_score=saved["initial_score"],
        decay_rate=saved["decay_rate_milli"] / 1000,
        decay_floor=saved["decay_floor"],
        min_threshold=saved["min_threshold"],
        penalties=penalties,
        reward_handshake=saved["reward_handshake"],
        reward_signal=saved["reward_signal"],
        max_delegation_depth=saved["max_delegation_depth"],
    )
