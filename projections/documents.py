"""Read-store documents: how folded state is laid out for the read stores.

A read store holds one JSON document per agent and per grant, plus a small
meta record, so a reader fetches only what a query needs:

* agent document: ``{"registry": AgentRecord, "trust": TrustState,
  "grants_in": [grant ids to this agent]}``
* grant document: ``Grant`` plus ``"chain"``: its id and every ancestor's
  id up to the root (a grant's ancestry never changes once granted).

Queries assemble a small ``DelegationContext`` from these documents and call
the same pure functions the in-memory fold uses, so every backend answers
exactly what ``MeshState`` answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from ledger.events import DelegationGranted, DelegationRevoked
from ledger.timefmt import format_time, parse_time
from projections.bodies import FoldEvent
from projections.config import SEVERITIES, TrustConfig
from projections.delegation import DelegationGraph, Grant
from projections.registry import AgentRecord, AgentStatus
from projections.state import SNAPSHOT_FORMAT, MeshState
from projections.trust import (
    TrustState,
    TrustView,
    from_micros,
    points,
    score_milli_at,
    tier_for,
    to_micros,
    trust_at,
)

_encoder = msgspec.json.Encoder(order="sorted")
# Fields of a grant document that are derived from the graph, not part of the Grant.
_DERIVED = ("chain", "children")
_decoder = msgspec.json.Decoder(dict[str, Any])
# Encodes dicts in the order they were built: for documents built in sorted key order.
_as_built = msgspec.json.Encoder()
_SORTED_SEVERITIES = tuple(sorted(SEVERITIES))
_NONE: list[str] = []


@dataclass(frozen=True, slots=True)
class Meta:
    """What a read store knows about itself."""

    generation: str
    position: int
    recorded_at: str | None
    registry_size: int
    updated_at: str
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "generation": self.generation,
            "position": self.position,
            "recorded_at": self.recorded_at,
            "registry_size": self.registry_size,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Meta:
        return cls(
            generation=str(data["generation"]),
            position=int(data["position"]),
            recorded_at=data.get("recorded_at"),
            registry_size=int(data["registry_size"]),
            updated_at=str(data["updated_at"]),
            config=dict(data["config"]),
        )


@dataclass(frozen=True, slots=True)
class Batch:
    """Documents to write together with the meta they lead to."""

    agents: dict[str, bytes]
    grants: dict[str, bytes]
    meta: Meta


@dataclass(frozen=True, slots=True)
class Change:
    """A change notification: ``agents`` changed at ``position`` (None: everything)."""

    position: int
    agents: frozenset[str] | None

    def encode(self) -> bytes:
        return _encoder.encode(
            {
                "position": self.position,
                "agents": None if self.agents is None else sorted(self.agents),
            }
        )

    @classmethod
    def decode(cls, data: bytes | str) -> Change:
        raw = _decoder.decode(data)
        agents = raw.get("agents")
        return cls(int(raw["position"]), None if agents is None else frozenset(agents))


def encode(value: Mapping[str, Any]) -> bytes:
    return _encoder.encode(value)


def decode(data: bytes | str) -> dict[str, Any]:
    return _decoder.decode(data)


def agent_document(state: MeshState, did: str) -> bytes:
    """The agent's document: ``{"grants_in", "registry", "trust"}`` with the
    ``to_dict`` forms, keys sorted at every level.

    Built here in sorted key order and encoded as built, rather than through
    ``to_dict`` and a sorting encoder: a rebuild encodes every agent, and the
    windows (``peers``) — most of a busy agent's document — are then neither
    copied nor sorted twice. ``tests/test_rebuild.py`` holds the bytes equal to
    the ``to_dict`` form."""
    record, trust = state.agents[did], state.trust[did]
    peers, partners = trust.peers, trust.partners
    return _as_built.encode(
        {
            "grants_in": state.delegations.by_delegatee.get(did, _NONE),
            "registry": {
                "capabilities": record.capabilities,
                "did": record.did,
                "metadata": dict(sorted(record.metadata.items())),
                "position": record.position,
                "public_key": record.public_key,
                "registered_at": format_time(record.registered_at),
                "sponsor": record.sponsor,
                "status": record.status,
                "status_reason": record.status_reason,
            },
            "trust": {
                "base_at": format_time(from_micros(trust.base_at)),
                "base_milli": trust.base_milli,
                "decay_from": format_time(from_micros(trust.decay_from)),
                "did": trust.did,
                "handshakes_completed": trust.handshakes_completed,
                "handshakes_failed": trust.handshakes_failed,
                "partners": {d: partners[d] for d in sorted(partners)},
                "peers": {d: peers[d] for d in sorted(peers)},
                "position": trust.position,
                "positives": trust.positives,
                "violations": {s: trust.violations[s] for s in _SORTED_SEVERITIES},
            },
        }
    )


def grant_document(state: MeshState, grant_id: str) -> bytes:
    graph = state.delegations
    doc = graph.grants[grant_id].to_dict()
    doc["chain"] = [g.grant_id for g in graph.chain(grant_id)]
    doc["children"] = list(graph.children.get(grant_id, ()))
    return encode(doc)


def grants_touched(event: FoldEvent) -> tuple[str, ...]:
    """Grant documents an event can change: the grant itself, and a new grant's
    parent (its list of children). A revocation marks only its own grant;
    descendants fall through their chain."""
    if isinstance(event, DelegationGranted):
        return (event.grant_id,) if event.parent is None else (event.grant_id, event.parent)
    if isinstance(event, DelegationRevoked):
        return (event.grant_id,)
    return ()


def batch_for(state: MeshState, agents: Iterable[str], grants: Iterable[str], meta: Meta) -> Batch:
    """Documents of the given agents and grants as ``state`` has them now."""
    return Batch(
        agents={did: agent_document(state, did) for did in agents if did in state.agents},
        grants={
            gid: grant_document(state, gid) for gid in grants if gid in state.delegations.grants
        },
        meta=meta,
    )


def full_batch(state: MeshState, meta: Meta) -> Batch:
    return batch_for(state, state.agents, state.delegations.grants, meta)


def state_from_documents(
    meta: Meta, agents: Iterable[bytes], grants: Iterable[bytes], config: TrustConfig
) -> MeshState:
    """Rebuild the fold's in-memory state from a read store's documents."""
    agent_docs = [decode(d) for d in agents]
    grant_docs = [decode(d) for d in grants]
    snapshot = {
        "agents": {
            d["registry"]["did"]: {"registry": d["registry"], "trust": d["trust"]}
            for d in agent_docs
        },
        "config": meta.config,
        "format": SNAPSHOT_FORMAT,
        "grants": {
            g["grant_id"]: {k: v for k, v in g.items() if k not in _DERIVED} for g in grant_docs
        },
        "position": meta.position,
        "recorded_at": meta.recorded_at,
    }
    return MeshState.from_snapshot(snapshot, config)


@dataclass
class PartialContext:
    """A ``DelegationContext`` holding just the documents a query loaded."""

    config: TrustConfig
    agents: dict[str, AgentRecord] = field(default_factory=dict)
    delegations: DelegationGraph = field(default_factory=DelegationGraph)

    def add_agent(self, doc: Mapping[str, Any]) -> None:
        self.add_record(AgentRecord.from_dict(doc["registry"]))

    def add_record(self, record: AgentRecord) -> None:
        self.agents[record.did] = record

    def add_grant(self, doc: Mapping[str, Any]) -> None:
        data = {k: v for k, v in doc.items() if k not in _DERIVED}
        grant = Grant.from_dict(data)
        if grant.grant_id not in self.delegations.grants:
            self.delegations.add(grant)


class _Status(msgspec.Struct, gc=False):
    status: AgentStatus


class _ListedRegistry(_Status, gc=False):
    did: str
    public_key: str
    sponsor: str | None
    capabilities: tuple[str, ...]
    metadata: dict[str, str]
    registered_at: str
    status_reason: str
    position: int


class _ListedTrust(msgspec.Struct, gc=False):
    did: str
    base_milli: int
    base_at: str
    decay_from: str
    violations: dict[str, int]
    positives: int
    handshakes_completed: int
    handshakes_failed: int
    position: int


class TrustOnly(msgspec.Struct, gc=False):
    """What a trust view reads of an agent document: the registry's status and the
    trust scalars (``ProjectionReader.trust``, the tier counts, ``GET
    /v1/agents/{did}/trust``'s fast lane, the metrics refresh over every agent). The
    rest is skipped by the decoder, never built; the view is still
    ``projections.trust.trust_at`` over a ``TrustState``: the numbers are the same
    function's."""

    registry: _Status
    trust: _ListedTrust

    @property
    def suspended(self) -> bool:
        return self.registry.status == "suspended"

    @property
    def active(self) -> bool:
        return self.registry.status == "active"

    def trust_state(self) -> TrustState:
        """``trust_state`` of the document, without the windows (no view reads them)."""
        t = self.trust
        return TrustState(
            did=t.did,
            base_milli=t.base_milli,
            base_at=stored_micros(t.base_at),
            decay_from=stored_micros(t.decay_from),
            violations={s: t.violations[s] for s in SEVERITIES},
            positives=t.positives,
            handshakes_completed=t.handshakes_completed,
            handshakes_failed=t.handshakes_failed,
            position=t.position,
        )

    def view(self, config: TrustConfig, now: datetime) -> TrustView:
        """``trust_at`` of this document at ``now``."""
        return trust_at(self.trust_state(), config, now, suspended=self.suspended)

    def score_and_tier(self, config: TrustConfig, now_us: int) -> tuple[int, str]:
        """The view's score and tier alone (``trust_at``'s arithmetic, no view built:
        what the metrics refresh computes for every agent)."""
        t = self.trust
        decaying = TrustState(
            t.did, t.base_milli, stored_micros(t.base_at), stored_micros(t.decay_from)
        )
        milli = score_milli_at(decaying, config.decay_rate_milli, config.decay_floor_milli, now_us)
        score = points(milli)
        return score, tier_for(score, config, suspended=self.suspended)


class ListedAgent(TrustOnly, gc=False):
    """What the registry listing reads of an agent document: the record and the trust
    scalars. The peer and partner windows — most of a busy agent's document, and read
    by the fold alone — are skipped by the decoder, never built."""

    registry: _ListedRegistry  # the whole record, where TrustOnly reads its status

    def record(self) -> AgentRecord:
        """``agent_record`` of the document."""
        r = self.registry
        return AgentRecord(
            did=r.did,
            public_key=r.public_key,
            sponsor=r.sponsor,
            capabilities=r.capabilities,
            metadata=r.metadata,
            registered_at=stored_time(r.registered_at),
            status=r.status,
            status_reason=r.status_reason,
            position=r.position,
        )


class _GrantsIn(msgspec.Struct, gc=False):
    grants_in: list[str]


class GrantLinks(msgspec.Struct, gc=False):
    """Of a grant's document, what leads to the rest of an agent's closure: its chain
    (its id and every ancestor's) and its delegator."""

    chain: list[str]
    delegator: str


_listed_decoder = msgspec.json.Decoder(ListedAgent)
_NAIVE_EPOCH = datetime(1970, 1, 1)
_MICROSECOND = timedelta(microseconds=1)
_grants_in_decoder = msgspec.json.Decoder(_GrantsIn)
_grant_links_decoder = msgspec.json.Decoder(GrantLinks)
_trust_only_decoder = msgspec.json.Decoder(TrustOnly)


def decode_listed(data: bytes) -> ListedAgent:
    return _listed_decoder.decode(data)


def decode_trust_only(data: bytes) -> TrustOnly:
    return _trust_only_decoder.decode(data)


def decode_grants_in(data: bytes) -> list[str]:
    """An agent document's ``grants_in`` (the grants to the agent), nothing else."""
    return _grants_in_decoder.decode(data).grants_in


def decode_grant_links(data: bytes) -> GrantLinks:
    return _grant_links_decoder.decode(data)


def _canonical(text: str) -> datetime | None:
    """A time in ``format_time``'s form (how the projections store every time), read
    by the C ISO parser as a naive UTC datetime; None for any other form."""
    if len(text) == 27 and text[26] == "Z" and text[10] == "T" and text[19] == ".":
        try:
            return datetime.fromisoformat(text[:26])
        except ValueError:
            return None
    return None


def stored_micros(text: str) -> int:
    """Microseconds since the epoch of a stored time (``stored_time``'s, without
    building an aware datetime)."""
    naive = _canonical(text)
    if naive is None:
        return to_micros(parse_time(text))
    return (naive - _NAIVE_EPOCH) // _MICROSECOND


def stored_time(text: str) -> datetime:
    """A time as the projections store it (``format_time``'s form, read by the C ISO
    parser), or any RFC 3339 time (``parse_time``)."""
    naive = _canonical(text)
    return parse_time(text) if naive is None else naive.replace(tzinfo=UTC)


def trust_state(doc: Mapping[str, Any]) -> TrustState:
    return TrustState.from_dict(doc["trust"])


def agent_record(doc: Mapping[str, Any]) -> AgentRecord:
    return AgentRecord.from_dict(doc["registry"])
