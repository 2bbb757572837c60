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
from typing import Any

import msgspec

from ledger.events import AnyEvent, DelegationGranted, DelegationRevoked
from projections.config import TrustConfig
from projections.delegation import DelegationGraph, Grant
from projections.registry import AgentRecord
from projections.state import SNAPSHOT_FORMAT, MeshState
from projections.trust import TrustState

_encoder = msgspec.json.Encoder(order="sorted")
# Fields of a grant document that are derived from the graph, not part of the Grant.
_DERIVED = ("chain", "children")
_decoder = msgspec.json.Decoder(dict[str, Any])


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
    return encode(
        {
            "grants_in": list(state.delegations.by_delegatee.get(did, ())),
            "registry": state.agents[did].to_dict(),
            "trust": state.trust[did].to_dict(),
        }
    )


def grant_document(state: MeshState, grant_id: str) -> bytes:
    graph = state.delegations
    doc = graph.grants[grant_id].to_dict()
    doc["chain"] = [g.grant_id for g in graph.chain(grant_id)]
    doc["children"] = list(graph.children.get(grant_id, ()))
    return encode(doc)


def grants_touched(event: AnyEvent) -> tuple[str, ...]:
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
        record = AgentRecord.from_dict(doc["registry"])
        self.agents[record.did] = record

    def add_grant(self, doc: Mapping[str, Any]) -> None:
        data = {k: v for k, v in doc.items() if k not in _DERIVED}
        grant = Grant.from_dict(data)
        if grant.grant_id not in self.delegations.grants:
            self.delegations.add(grant)


def trust_state(doc: Mapping[str, Any]) -> TrustState:
    return TrustState.from_dict(doc["trust"])


def agent_record(doc: Mapping[str, Any]) -> AgentRecord:
    return AgentRecord.from_dict(doc["registry"])
