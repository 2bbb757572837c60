"""The ledger's one identity on PostgreSQL: its key, recorded at genesis."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from ledger.errors import LedgerKeyMismatchError, StoreUnavailableError
from ledger.identity import SigningKey
from ledger.postgres.reader import DRIVER_ERRORS as _DRIVER_ERRORS


async def claim_identity(pool: asyncpg.Pool, key: SigningKey, now: datetime) -> None:
    """Record the ledger's key at genesis; refuse any other key afterwards (after a
    ``ledger.key_rotated``, any other than the key it installed).

    A second "ledger key" would sign checkpoints and ledger events that no verifier
    of this ledger accepts: the ledger would never verify again. So a process
    holding another key than the one recorded (or than the latest checkpoint's
    signer, for a ledger older than the record) raises ``LedgerKeyMismatchError``."""
    try:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO ledger_identity (id, did, public_key, recorded_at) "
                "VALUES (1, $1, $2, $3) ON CONFLICT (id) DO NOTHING",
                key.did,
                key.public.raw,
                now,
            )
            recorded = await conn.fetchval("SELECT did FROM ledger_identity WHERE id = 1")
            # The last rotation (if any): checkpoints before it are the old key's.
            rotated_at = await conn.fetchval(
                "SELECT max(position) FROM events WHERE stream_id = 'ledger' "
                "AND event_type = 'ledger.key_rotated'"
            )
            signer = await conn.fetchval(
                "SELECT signer FROM checkpoints WHERE position >= $1 "
                "ORDER BY position DESC LIMIT 1",
                rotated_at or 0,
            )
    except _DRIVER_ERRORS as exc:
        raise StoreUnavailableError(f"cannot read the ledger's identity: {exc}") from exc
    since = "recorded at genesis" if rotated_at is None else f"since its rotation at {rotated_at}"
    for owner in (recorded, signer):
        if owner is not None and owner != key.did:
            raise LedgerKeyMismatchError(
                f"this ledger's key is {owner} ({since}), but this process holds "
                f"{key.did}: start it with the ledger's own key (AGENTMESH_AGENT_PRIVATE_KEY)"
            )
