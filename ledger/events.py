"""Event types: frozen, tagged msgspec structs, and the signed body.

An event *body* is the flat JSON object its origin signs::

    {"type": "policy.violation", "actor": "did:mesh:…", "occurred_at": "…Z",
     "agent": "did:mesh:…", "severity": "high", "rule": "…", "detail": "…"}

``type`` selects the struct; ``actor`` is the signer's DID (an agent, or the
ledger itself for events the server originates); the remaining members are
the type's payload. The signature covers ``canonical_bytes(body)`` exactly as
received, so a client in any language signs the RFC 8785 form of the object
it sends. Schema evolution is additive: new fields get defaults, no field is
ever retyped or reordered, and type names are contract strings, never module
paths.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal, cast

import msgspec

from ledger.canonical import canonical_bytes
from ledger.errors import EventValidationError
from ledger.identity import DID_PATTERN
from ledger.timefmt import format_time, parse_time

Did = Annotated[str, msgspec.Meta(pattern=DID_PATTERN.pattern)]
Timestamp = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
    ),
]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Text = Annotated[str, msgspec.Meta(max_length=4000)]
Capability = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.\-]+(:[A-Za-z0-9_.\-*]+)*$")]
Severity = Literal["low", "medium", "high", "critical"]
GrantId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_\-]{8,64}$")]
Sha256Hex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
# Chosen by the signer and unique per signer: what makes a signed body single-use.
EventId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_\-]{16,64}$")]
Count = Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)]


class Event(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type"
):
    """Base of every event body: who signed it, when it happened, and its id.

    ``event_id`` is chosen by the signer (``SignedEvent.create`` fills in a
    random one) and the ledger refuses a second event with the same
    ``(actor, event_id)`` that occurred on the same UTC day: a signed body can be
    appended once, never replayed (``ledger.authority``, rule 1).
    It is optional in the schema only so that bodies stored before it existed
    still decode; the append rules (``ledger.authority``) require it.
    """

    actor: Did
    occurred_at: Timestamp
    event_id: EventId | None = None


class AgentRegistered(Event, tag="agent.registered", frozen=True):
    did: Did
    public_key: Annotated[str, msgspec.Meta(max_length=1000)]
    sponsor: Did | None = None
    capabilities: tuple[Capability, ...] = ()
    metadata: dict[Name, Text] = msgspec.field(default_factory=dict)


class AgentKeyRotated(Event, tag="agent.key_rotated", frozen=True):
    """Signed by the agent's current key; ``proof`` is the *new* key's base64
    signature over this body without ``proof`` (``ledger.authority``)."""

    did: Did
    public_key: Annotated[str, msgspec.Meta(max_length=1000)]
    proof: Annotated[str, msgspec.Meta(max_length=200)] | None = None


class AgentSuspended(Event, tag="agent.suspended", frozen=True):
    did: Did
    reason: Text = ""


class AgentReinstated(Event, tag="agent.reinstated", frozen=True):
    did: Did
    reason: Text = ""


class HandshakeCompleted(Event, tag="handshake.completed", frozen=True):
    handshake_id: Name
    initiator: Did
    responder: Did
    score: int | None = None
    shadow: bool = False


class HandshakeFailed(Event, tag="handshake.failed", frozen=True):
    handshake_id: Name
    initiator: Did
    responder: Did
    reason: Text
    shadow: bool = False


class PolicyViolation(Event, tag="policy.violation", frozen=True):
    """A breach of policy by ``agent``.

    ``count`` is how many identical occurrences this record stands for. A
    record with ``repeat_of`` (the ``event_id`` of an earlier violation by the
    same reporter about the same agent) is evidence of repeats only: it is kept
    in the ledger and moves no score, so an agent retrying a blocked call pays
    the rule's penalty once.
    """

    agent: Did
    severity: Severity
    rule: Name
    detail: Text = ""
    count: Count = 1
    repeat_of: EventId | None = None


class TrustSignal(Event, tag="trust.signal", frozen=True):
    agent: Did
    signal: Name
    detail: Text = ""


class DelegationGranted(Event, tag="delegation.granted", frozen=True):
    grant_id: GrantId
    delegator: Did
    delegatee: Did
    capabilities: tuple[Capability, ...]
    expires_at: Timestamp | None = None
    parent: GrantId | None = None


class DelegationRevoked(Event, tag="delegation.revoked", frozen=True):
    grant_id: GrantId
    reason: Text = ""


class RetentionApplied(Event, tag="ledger.retention_applied", frozen=True):
    cut_position: int
    cut_time: Timestamp
    anchor_hash: Sha256Hex
    snapshot_digest: Sha256Hex


class LedgerKeyRotated(Event, tag="ledger.key_rotated", frozen=True):
    """The ledger's own key changes. Signed by the current ledger key (``actor``, whose
    public key is ``previous_key``); ``proof`` is the *new* key's base64 signature over
    this body without ``proof``. From this position on the ledger's DID is ``did`` (the
    new key's) for every rule, checkpoint and note, and the old key signs nothing."""

    did: Did
    public_key: Annotated[str, msgspec.Meta(max_length=1000)]
    previous_key: Annotated[str, msgspec.Meta(max_length=1000)]
    proof: Annotated[str, msgspec.Meta(max_length=200)] | None = None


AnyEvent = (
    AgentRegistered
    | AgentKeyRotated
    | AgentSuspended
    | AgentReinstated
    | HandshakeCompleted
    | HandshakeFailed
    | PolicyViolation
    | TrustSignal
    | DelegationGranted
    | DelegationRevoked
    | RetentionApplied
    | LedgerKeyRotated
)

EVENT_TYPES: dict[str, type[Event]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in (
        AgentRegistered,
        AgentKeyRotated,
        AgentSuspended,
        AgentReinstated,
        HandshakeCompleted,
        HandshakeFailed,
        PolicyViolation,
        TrustSignal,
        DelegationGranted,
        DelegationRevoked,
        RetentionApplied,
        LedgerKeyRotated,
    )
}

_decoder = msgspec.json.Decoder(AnyEvent)


def event_type(event: Event) -> str:
    tag = type(event).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def parse_event(body: Mapping[str, Any]) -> AnyEvent:
    """Validate a body (already-parsed JSON) into its event struct."""
    if not isinstance(body, Mapping):
        raise EventValidationError("an event body must be a JSON object")
    kind = body.get("type")
    if kind not in EVENT_TYPES:
        known = ", ".join(sorted(EVENT_TYPES))
        raise EventValidationError(f"unknown event type {kind!r}; known types: {known}")
    try:
        # Into the type's own struct: converting into the tagged union costs ~6x more.
        event = cast(AnyEvent, msgspec.convert(dict(body), EVENT_TYPES[kind]))
    except msgspec.ValidationError as exc:
        raise EventValidationError(f"invalid {kind} event: {exc}") from exc
    for name in ("occurred_at", "expires_at", "cut_time"):
        text = getattr(event, name, None)
        if text is None:
            continue
        try:
            parse_time(text)  # the pattern admits month 13 and 25 o'clock; a date does not
        except (ValueError, OverflowError) as exc:
            raise EventValidationError(
                f"invalid {kind} event: {name} is not a real time: {exc}"
            ) from None
    return event


def decode_body(data: bytes) -> AnyEvent:
    """Decode canonical body bytes (as stored) into the event struct."""
    try:
        event: AnyEvent = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise EventValidationError(f"invalid event body: {exc}") from exc
    return event


class KeyChange(msgspec.Struct, frozen=True):
    """Whose key a stored ``agent.registered`` or ``agent.key_rotated`` body installs."""

    type: str
    did: str
    public_key: str


_key_change_decoder = msgspec.json.Decoder(KeyChange)
_KEY_CHANGES = frozenset({"agent.registered", "agent.key_rotated"})


def decode_key_change(data: bytes) -> KeyChange | None:
    """``did`` and ``public_key`` of a stored body that registers or rotates an agent's
    key, None for a body of another type: for readers folding every agent's key over
    many entries (``keys_before``: 100k registrations): ~1 µs against ``decode_body``'s
    ~9 µs. Only for bodies the ledger stored (already validated by ``decode_body``)."""
    try:
        change = _key_change_decoder.decode(data)
    except msgspec.DecodeError:
        decode_body(data)  # not an event at all: EventValidationError, as decode_body says
        return None  # an event without a key (no did or public_key)
    return change if change.type in _KEY_CHANGES else None


def body_of(event: Event) -> dict[str, Any]:
    """The JSON object for an event this process creates (defaults omitted)."""
    raw = msgspec.to_builtins(event)
    assert isinstance(raw, dict)
    defaults = _defaults(type(event))
    return {k: v for k, v in raw.items() if k not in defaults or defaults[k] != v}


def encode_event(event: Event) -> bytes:
    """Canonical body bytes for an event this process creates and signs."""
    return canonical_bytes(body_of(event))


@functools.cache
def _defaults(cls: type[Event]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for field in msgspec.structs.fields(cls):
        if field.default is not msgspec.NODEFAULT:
            result[field.encode_name] = msgspec.to_builtins(field.default)
        elif field.default_factory is not msgspec.NODEFAULT:
            result[field.encode_name] = msgspec.to_builtins(field.default_factory())
    return result


def stream_of(event: AnyEvent) -> str:
    """The stream an event belongs to: the entity it is about."""
    match event:
        case AgentRegistered() | AgentKeyRotated() | AgentSuspended() | AgentReinstated():
            return f"agent:{event.did}"
        case PolicyViolation() | TrustSignal():
            return f"agent:{event.agent}"
        case HandshakeCompleted() | HandshakeFailed():
            return f"handshake:{event.handshake_id}"
        case DelegationGranted() | DelegationRevoked():
            return f"delegation:{event.grant_id}"
        case RetentionApplied() | LedgerKeyRotated():
            return "ledger"
    raise EventValidationError(f"no stream for {type(event).__name__}")


def subject_agents(event: AnyEvent) -> tuple[str, ...]:
    """The agents whose projected state an event can change."""
    match event:
        case AgentRegistered() | AgentKeyRotated() | AgentSuspended() | AgentReinstated():
            return (event.did,)
        case PolicyViolation() | TrustSignal():
            return (event.agent,)
        case HandshakeCompleted() | HandshakeFailed():
            return (event.initiator, event.responder)
        case DelegationGranted():
            return (event.delegator, event.delegatee)
    return ()


def new_event_id() -> str:
    """A fresh, unguessable event id (128 random bits, hex)."""
    return secrets.token_hex(16)


def stamp(moment: datetime) -> str:
    """``occurred_at`` text for a datetime."""
    return format_time(moment)
