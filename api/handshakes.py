"""Challenge/response handshakes (Ed25519), with single-use nonces shared by replicas.

1. ``start``: the initiator names a responder; the API stores a challenge with
   a random nonce and a 30 s expiry, and returns ``to_sign``: the base64 of
   the canonical bytes the responder must sign.
2. ``answer``: the responder's signature is checked against its *current*
   key from the ledger; the nonce is consumed atomically (``UPDATE … WHERE
   used_at IS NULL``), so it works exactly once even across replicas; both
   agents must be active and the responder's score at least
   max(min_score, AGENTMESH_TRUST_MIN_THRESHOLD). Every outcome is appended
   to the ledger as ``handshake.completed`` or ``handshake.failed``.

``HandshakeStore`` is the port the API holds; its adapters are
``api.handshakes_postgres`` and ``api.handshakes_memory``.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from ledger.canonical import canonical_bytes
from ledger.errors import SignatureError
from ledger.identity import b64decode
from ledger.timefmt import format_time

__all__ = [
    "CHALLENGE_TTL",
    "CHALLENGE_TYPE",
    "Challenge",
    "HandshakeStore",
    "decode_signature",
    "new_challenge",
]

CHALLENGE_TTL = timedelta(seconds=30)
CHALLENGE_TYPE = "agentmesh.handshake.challenge"


@dataclass(frozen=True, slots=True)
class Challenge:
    handshake_id: str
    initiator: str
    responder: str
    nonce: str
    min_score: int | None
    expires_at: datetime
    used_at: datetime | None = None

    def signed_bytes(self) -> bytes:
        """What the responder signs: canonical JSON of the challenge."""
        return canonical_bytes(
            {
                "type": CHALLENGE_TYPE,
                "handshake_id": self.handshake_id,
                "initiator": self.initiator,
                "responder": self.responder,
                "nonce": self.nonce,
                "expires_at": format_time(self.expires_at),
            }
        )

    @property
    def to_sign(self) -> str:
        return base64.b64encode(self.signed_bytes()).decode()


class HandshakeStore(Protocol):
    """Where challenges are kept, shared by every replica that may answer one.

    Adapters: ``api.handshakes_postgres`` (production: a table beside the
    ledger) and ``api.handshakes_memory`` (one process, for unit tests); one
    contract suite (``tests/test_handshake_store.py``) runs over both."""

    async def create(
        self,
        initiator: str,
        responder: str,
        min_score: int | None,
        now: datetime,
        request_id: str | None = None,
    ) -> Challenge | None:
        """Store a new challenge (``new_challenge``); None if this signed request was
        already used (its handshake id is taken)."""

    async def get(self, handshake_id: str) -> Challenge | None: ...

    async def consume(self, handshake_id: str, now: datetime) -> bool:
        """Mark the nonce used, atomically; False if it was already used (a replay)."""


def new_challenge(
    initiator: str,
    responder: str,
    min_score: int | None,
    now: datetime,
    request_id: str | None = None,
) -> Challenge:
    """A fresh challenge with a random nonce, expiring ``CHALLENGE_TTL`` after ``now``.

    A signed start request names its own ``request_id``; the handshake id is
    derived from it, so replaying the request finds the id taken."""
    if request_id is None:
        handshake_id = "hs_" + secrets.token_hex(12)
    else:
        digest = hashlib.sha256(f"{initiator} {request_id}".encode()).hexdigest()
        handshake_id = "hs_" + digest[:24]
    return Challenge(
        handshake_id=handshake_id,
        initiator=initiator,
        responder=responder,
        nonce=secrets.token_urlsafe(24),
        min_score=min_score,
        expires_at=now + CHALLENGE_TTL,
    )


def decode_signature(text: str) -> bytes | None:
    try:
        raw = b64decode(text, "signature")
    except SignatureError:
        return None
    return raw if len(raw) == 64 else None
