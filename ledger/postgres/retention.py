"""Retention's reads on PostgreSQL: the anchors a cut leaves (``retention_anchors``).

``PostgresRetentionStore`` implements ``ledger.ports.RetentionAnchors`` on a pool
of the ledger's database, for ``ledger.verify`` and ``ledger.retention``; driver
errors become ``StoreUnavailableError``.
"""

from __future__ import annotations

import asyncpg

from ledger.errors import StoreUnavailableError
from ledger.ports import StoredAnchor
from ledger.postgres.reader import DRIVER_ERRORS

__all__ = ["PostgresRetentionStore"]


class PostgresRetentionStore:
    """``ledger.ports.RetentionAnchors`` over PostgreSQL."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def latest_anchor(self) -> StoredAnchor | None:
        try:
            row = await self._pool.fetchrow(
                "SELECT position, entry_hash, cut_time, keys, snapshot, snapshot_digest, "
                "signer, signature, status FROM retention_anchors "
                "ORDER BY position DESC LIMIT 1"
            )
        except DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot read retention anchors: {exc}") from exc
        if row is None:
            return None
        return StoredAnchor(
            position=row["position"],
            entry_hash=bytes(row["entry_hash"]),
            cut_time=row["cut_time"],
            keys=bytes(row["keys"]),
            snapshot=bytes(row["snapshot"]),
            snapshot_digest=bytes(row["snapshot_digest"]),
            signer=row["signer"],
            signature=bytes(row["signature"]),
            status=row["status"],
        )
