"""Wire types of the API (msgspec structs; the OpenAPI document is built from them)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from ledger.timefmt import format_time
from projections.delegation import Grant
from projections.readstore import AgentSummary
from projections.registry import AgentRecord
from projections.trust import TrustView

Did = Annotated[str, msgspec.Meta(pattern=r"^did:mesh:[0-9a-f]{32}$")]
Signature = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
# Printable, no control characters (a NUL cannot be stored in PostgreSQL text).
Key = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
HandshakeId = Annotated[str, msgspec.Meta(pattern=r"^hs_[0-9a-f]{24}$")]
RequestId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_\-]{16,64}$")]
Timestamp = Annotated[str, msgspec.Meta(min_length=20, max_length=40)]


class Struct(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


# -- requests -------------------------------------------------------------------------


class RegisterAgent(Struct):
    """Admin registration (bearer token) of an agent's public key."""

    public_key: Annotated[str, msgspec.Meta(max_length=1000)]
    sponsor: Did | None = None
    capabilities: list[Annotated[str, msgspec.Meta(max_length=200)]] = []
    metadata: dict[
        Annotated[str, msgspec.Meta(max_length=200)], Annotated[str, msgspec.Meta(max_length=4000)]
    ] = {}


class SignedEventIn(Struct):
    """An event body exactly as its origin signed it, with the base64 signature."""

    body: dict[str, Any]
    signature: Signature
    idempotency_key: Key | None = None


class AdminReason(Struct):
    reason: Annotated[str, msgspec.Meta(max_length=4000)] = ""


class AdminViolation(Struct):
    """A violation reported by an operator (admin token); signed by the ledger."""

    agent: Did
    severity: Literal["low", "medium", "high", "critical"]
    rule: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    detail: Annotated[str, msgspec.Meta(max_length=4000)] = ""
    idempotency_key: Key | None = None


class AdminSignal(Struct):
    agent: Did
    signal: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    detail: Annotated[str, msgspec.Meta(max_length=4000)] = ""
    idempotency_key: Key | None = None


class ReportBatch(Struct):
    """Each item is a ``SignedEventIn``, checked on its own: one malformed report is
    rejected alone and never fails the others."""

    reports: Annotated[list[dict[str, Any]], msgspec.Meta(min_length=1, max_length=1000)]


class StartHandshake(Struct):
    """An admin's handshake start (bearer token)."""

    initiator: Did
    responder: Did
    min_score: Annotated[int, msgspec.Meta(ge=0, le=1000)] | None = None


class HandshakeRequest(Struct):
    """What an initiator signs to start a handshake (``type`` is fixed)."""

    type: Literal["agentmesh.handshake.request"]
    initiator: Did
    responder: Did
    request_id: RequestId
    requested_at: Timestamp
    min_score: Annotated[int, msgspec.Meta(ge=0, le=1000)] | None = None


class SignedHandshakeRequest(Struct):
    """A handshake start signed by its initiator: ``{body, signature}``; ``body``
    is a ``HandshakeRequest`` and the signature covers its RFC 8785 bytes."""

    body: dict[str, Any]
    signature: Signature


class InclusionProofOut(Struct):
    position: int
    leaf_index: int
    tree_size: int
    leaf_hash: str
    hashes: list[str]


class ConsistencyProofOut(Struct):
    first: int
    second: int
    hashes: list[str]


class LedgerRotationOut(Struct):
    """One ``ledger.key_rotated`` entry as stored (enough to recompute its entry hash)
    and its RFC 9162 inclusion proof in the tree of ``tree_size``; bytes in base64."""

    position: int
    recorded_at: str
    stream_id: str
    stream_version: int
    body: str
    signature: str
    prev_hash: str
    entry_hash: str
    did: str  # the ledger's DID from this position on
    hashes: list[str]


class LedgerKeysOut(Struct):
    """The ledger's key history: genesis key and every rotation, proven in one tree."""

    tree_size: int
    ledger_did: str
    public_key: str  # PEM, the key in force at ``tree_size``
    rotations: list[LedgerRotationOut]


class HandshakeAnswer(Struct):
    signature: Signature


# -- responses ------------------------------------------------------------------------


class Status(msgspec.Struct):
    status: str


class Appended(msgspec.Struct, kw_only=True):
    position: int
    stream_id: str
    stream_version: int
    duplicate: bool = False


class AgentOut(msgspec.Struct, kw_only=True):
    did: str
    public_key: str
    sponsor: str | None
    capabilities: list[str]
    metadata: dict[str, str]
    status: str
    status_reason: str
    registered_at: str
    position: int


class Components(msgspec.Struct, kw_only=True):
    base: int
    decay: int
    violations: dict[str, int]
    positives: int
    handshakes_completed: int
    handshakes_failed: int


class Decay(msgspec.Struct, kw_only=True):
    anchor: str
    rate_per_hour: float
    floor: int
    at_floor: bool


class TrustOut(msgspec.Struct, kw_only=True):
    did: str
    score: int
    tier: str
    at: str
    components: Components
    decay: Decay
    position: int


class AgentWithTrust(msgspec.Struct, kw_only=True):
    agent: AgentOut
    trust: TrustOut


class AgentPageOut(msgspec.Struct, kw_only=True):
    items: list[AgentWithTrust]
    next_cursor: str | None


class Registered(msgspec.Struct, kw_only=True):
    did: str
    position: int


class EventOut(msgspec.Struct, kw_only=True):
    position: int
    recorded_at: str
    stream_id: str
    stream_version: int
    type: str
    actor: str
    body: dict[str, Any]
    signature: str
    prev_hash: str
    entry_hash: str


class EventPage(msgspec.Struct, kw_only=True):
    items: list[EventOut]
    next_after: int | None


class Challenge(msgspec.Struct, kw_only=True):
    handshake_id: str
    nonce: str
    expires_at: str
    to_sign: str


class ResponderOut(msgspec.Struct, kw_only=True):
    did: str
    score: int | None
    tier: str | None


class HandshakeResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    verified: bool
    responder: ResponderOut
    reason: str | None = None
    shadow: bool = False


class ReportResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    index: int
    status: Literal["appended", "duplicate", "rejected"]
    position: int | None = None
    error: str | None = None


class BatchResult(msgspec.Struct, kw_only=True):
    appended: int
    duplicates: int
    rejected: int
    results: list[ReportResult]


class GrantOut(msgspec.Struct, kw_only=True):
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
    active: bool
    signature_verified: bool


class DelegationCreated(msgspec.Struct, kw_only=True):
    grant_id: str
    depth: int
    position: int


class ChainOut(msgspec.Struct, kw_only=True):
    grant_id: str
    chain: list[GrantOut]
    valid: bool


class Revoked(msgspec.Struct, kw_only=True):
    grant_id: str
    revoked: list[str]
    position: int


class CapabilitiesOut(msgspec.Struct, kw_only=True):
    did: str
    at: str
    capabilities: list[str]


class HeadOut(msgspec.Struct, kw_only=True):
    position: int
    entry_hash: str
    recorded_at: str


class CheckpointOut(msgspec.Struct, kw_only=True):
    origin: str
    position: int
    head_hash: str
    time: str
    signer: str
    signature: str
    signed_bytes: str
    ledger_public_key: str


# -- conversions ----------------------------------------------------------------------


def agent_out(record: AgentRecord) -> AgentOut:
    return AgentOut(
        did=record.did,
        public_key=record.public_key,
        sponsor=record.sponsor,
        capabilities=list(record.capabilities),
        metadata=dict(record.metadata),
        status=record.status,
        status_reason=record.status_reason,
        registered_at=format_time(record.registered_at),
        position=record.position,
    )


def trust_out(view: TrustView, at: str) -> TrustOut:
    c, d = view.components, view.decay
    return TrustOut(
        did=view.did,
        score=view.score,
        tier=view.tier,
        at=at,
        components=Components(
            base=c.base,
            decay=c.decay,
            violations=dict(c.violations),
            positives=c.positives,
            handshakes_completed=c.handshakes_completed,
            handshakes_failed=c.handshakes_failed,
        ),
        decay=Decay(
            anchor=format_time(d.anchor), rate_per_hour=d.rate, floor=d.floor, at_floor=d.at_floor
        ),
        position=view.position,
    )


def summary_out(summary: AgentSummary, at: str) -> AgentWithTrust:
    return AgentWithTrust(agent=agent_out(summary.record), trust=trust_out(summary.trust, at))


def grant_out(grant: Grant, active: bool, verified: bool) -> GrantOut:
    return GrantOut(
        grant_id=grant.grant_id,
        delegator=grant.delegator,
        delegatee=grant.delegatee,
        capabilities=list(grant.capabilities),
        expires_at=None if grant.expires_at is None else format_time(grant.expires_at),
        parent=grant.parent,
        depth=grant.depth,
        granted_at=format_time(grant.granted_at),
        granted_position=grant.granted_position,
        revoked_at=None if grant.revoked_at is None else format_time(grant.revoked_at),
        active=active,
        signature_verified=verified,
    )
