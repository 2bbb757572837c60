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
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from ledger.canonical import canonical_bytes
from ledger.errors import SignatureError
from ledger.identity import b64decode
from ledger.timefmt import format_time

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


class HandshakeStore:
    """Challenges in PostgreSQL, so any replica can answer any handshake."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def create(
        self,
        initiator: str,
        responder: str,
        min_score: int | None,
        now: datetime,
        request_id: str | None = None,
    ) -> Challenge | None:
        """Store a new challenge; None if this signed request was already used.

        A signed start request names its own ``request_id``; the handshake id is
        derived from it, so replaying the request finds the id taken."""
        if request_id is None:
            handshake_id = "hs_" + secrets.token_hex(12)
        else:
            digest = hashlib.sha256(f"{initiator} {request_id}".encode()).hexdigest()
            handshake_id = "hs_" + digest[:24]
        challenge = Challenge(
            handshake_id=handshake_id,
            initiator=initiator,
            responder=responder,
            nonce=secrets.token_urlsafe(24),
            min_score=min_score,
            expires_at=now + CHALLENGE_TTL,
        )
        inserted = await self._pool.fetchval(
            "INSERT INTO handshakes (id, initiator, responder, nonce, min_score, created_at, "
            "expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING "
            "RETURNING 1",
            challenge.handshake_id,
            initiator,
            responder,
            challenge.nonce,
            min_score,
            now,
            challenge.expires_at,
        )
        if inserted is None:
            return None
        # Expired challenges are useless after their TTL; sweep them now and then.
        if secrets.randbelow(100) == 0:
            await self._pool.execute(
                "DELETE FROM handshakes WHERE expires_at < $1", now - timedelta(hours=1)
            )
        return challenge

    async def get(self, handshake_id: str) -> Challenge | None:
        row = await self._pool.fetchrow(
            "SELECT id, initiator, responder, nonce, min_score, expires_at, used_at "
            "FROM handshakes WHERE id = $1",
            handshake_id,
        )
        if row is None:
            return None
        return Challenge(
            row["id"],
            row["initiator"],
            row["responder"],
            row["nonce"],
            row["min_score"],
            row["expires_at"],
            row["used_at"],
        )

    async def consume(self, handshake_id: str, now: datetime) -> bool:
        """Mark the nonce used; False if it was already used (a replay)."""
        row = await self._pool.fetchval(
            "UPDATE handshakes SET used_at = $2 WHERE id = $1 AND used_at IS NULL RETURNING 1",
            handshake_id,
            now,
        )
        return row is not None


def decode_signature(text: str) -> bytes | None:
    try:
        raw = b64decode(text, "signature")
    except SignatureError:
        return None
    return raw if len(raw) == 64 else None
