"""Signed events: a canonical body plus its origin's Ed25519 signature."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from ledger.canonical import canonical_bytes
from ledger.errors import EventValidationError, SignatureError
from ledger.events import (
    AgentKeyRotated,
    AnyEvent,
    Event,
    LedgerKeyRotated,
    body_of,
    event_type,
    new_event_id,
    parse_event,
    stream_of,
)
from ledger.identity import SigningKey, VerifyKey, b64decode, b64encode


@dataclass(frozen=True, slots=True)
class SignedEvent:
    """An event ready to append.

    ``body`` is the RFC 8785 form of the object the origin signed; ``event`` is
    the same content parsed into its struct. The signature is over ``body``.
    """

    body: bytes
    signature: bytes
    event: AnyEvent

    @property
    def type(self) -> str:
        return event_type(self.event)

    @property
    def actor(self) -> str:
        return self.event.actor

    @classmethod
    def from_wire(cls, body: Mapping[str, Any], signature: str) -> SignedEvent:
        """An event as a client sent it: a JSON object and a base64 signature."""
        event = parse_event(body)
        raw_signature = b64decode(signature, "signature")
        if len(raw_signature) != 64:
            raise SignatureError("an Ed25519 signature is 64 bytes")
        plain = body if type(body) is dict else dict(body)
        return cls(body=canonical_bytes(plain), signature=raw_signature, event=event)

    @classmethod
    def create(cls, event: Event, key: SigningKey) -> SignedEvent:
        """Sign an event with ``key`` (the actor's current key, which after a
        rotation no longer hashes to the actor's DID). An event without an
        ``event_id`` gets a fresh one, so every body this process signs is
        single-use."""
        if event.event_id is None:
            event = msgspec.structs.replace(event, event_id=new_event_id())
        body = canonical_bytes(body_of(event))
        parsed = parse_event(msgspec.json.decode(body))
        return cls(body=body, signature=key.sign(body), event=parsed)

    @classmethod
    def rotation(
        cls, event: AgentKeyRotated | LedgerKeyRotated, current: SigningKey, new: SigningKey
    ) -> SignedEvent:
        """A key rotation signed by both keys: ``new`` signs the body without
        ``proof`` (possession of the new key), ``current`` signs the whole body."""
        if event.event_id is None:
            event = msgspec.structs.replace(event, event_id=new_event_id())
        body = body_of(msgspec.structs.replace(event, proof=None))
        proof = b64encode(new.sign(canonical_bytes(body)))
        return cls.create(msgspec.structs.replace(event, proof=proof), current)

    def verify_with(self, key: VerifyKey) -> None:
        """Return None if signed by ``key``; raise SignatureError otherwise.

        The key is the actor's *current* key, which after a rotation no longer
        hashes to the actor's DID; the caller chooses it from the ledger.
        """
        key.verify(self.signature, self.body)


def append_stream(events: Sequence[SignedEvent], idempotency_key: str | None) -> str:
    """The one stream an append writes, its shape checked (events of one stream, an
    idempotency key of 1 to 200 characters): the same for every ledger adapter."""
    if not events:
        raise EventValidationError("an append needs at least one event")
    streams = {stream_of(e.event) for e in events}
    if len(streams) != 1:
        raise EventValidationError(f"one append writes one stream, got {sorted(streams)}")
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 200:
        raise EventValidationError("an idempotency key is 1 to 200 characters")
    return streams.pop()
