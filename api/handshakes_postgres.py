"""``PostgresHandshakeStore``: challenges in the ``handshakes`` table (migration 0003),
so any replica can answer any handshake. Driver errors become
``StoreUnavailableError``, as the ledger's adapter translates them."""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

import asyncpg

from api.handshakes import Challenge, new_challenge
from ledger.errors import StoreUnavailableError

__all__ = ["PostgresHandshakeStore"]

_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)
# Expired challenges are useless after their TTL; about one create in this many sweeps.
_SWEEP_ONE_IN = 100


class PostgresHandshakeStore:
    """``api.handshakes.HandshakeStore`` on a pool of the ledger's database."""

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
        challenge = new_challenge(initiator, responder, min_score, now, request_id)
        try:
            inserted = await self._pool.fetchval(
                "INSERT INTO handshakes (id, initiator, responder, nonce, min_score, "
                "created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7) "
                "ON CONFLICT (id) DO NOTHING RETURNING 1",
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
            if secrets.randbelow(_SWEEP_ONE_IN) == 0:
                await self._pool.execute(
                    "DELETE FROM handshakes WHERE expires_at < $1", now - timedelta(hours=1)
                )
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot store a handshake challenge: {exc}") from exc
        return challenge

    async def get(self, handshake_id: str) -> Challenge | None:
        try:
            row = await self._pool.fetchrow(
                "SELECT id, initiator, responder, nonce, min_score, expires_at, used_at "
                "FROM handshakes WHERE id = $1",
                handshake_id,
            )
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot read a handshake challenge: {exc}") from exc
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
        try:
            row = await self._pool.fetchval(
                "UPDATE handshakes SET used_at = $2 WHERE id = $1 AND used_at IS NULL RETURNING 1",
                handshake_id,
                now,
            )
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot consume a handshake challenge: {exc}") from exc
        return row is not None
