"""Retention on PostgreSQL: every statement ``ledger.retention`` runs.

``PostgresRetentionStore`` holds the anchors a cut leaves (``retention_anchors``;
``ledger.ports.RetentionAnchors``, which ``ledger.verify`` reads) and the steps
of a run: the cut position, the daily partitions, writing the anchor with its
checkpoint and the tree's edge in one transaction, pruning. Driver errors
become ``StoreUnavailableError``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg

from ledger.chain import Checkpoint
from ledger.errors import StoreUnavailableError
from ledger.merkle import Subtree
from ledger.ports import StoredAnchor
from ledger.postgres.reader import DRIVER_ERRORS, day_tables, partition_day
from ledger.postgres.tree import store_subtrees

log = logging.getLogger("agentmesh.retention")

__all__ = ["PostgresRetentionStore"]

# Whether the table ``$1`` is still a partition, and whether a detach is pending.
_PARTITION_STATE = """
SELECT i.inhparent IS NOT NULL AS attached, coalesce(i.inhdetachpending, false) AS pending
  FROM pg_class c LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
 WHERE c.oid = to_regclass($1)
"""


class PostgresRetentionStore:
    """``ledger.ports.RetentionAnchors`` over PostgreSQL, and retention's steps."""

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

    async def cut_position(self, cut_time: datetime) -> int:
        """The last position recorded before ``cut_time`` (0 if none)."""
        return int(
            await self._fetchval(
                "SELECT coalesce(max(position), 0) FROM events WHERE recorded_at < $1", cut_time
            )
        )

    async def count_entries(self, after: int, upto: int) -> int:
        """How many entries are stored with ``after < position <= upto``."""
        return int(
            await self._fetchval(
                "SELECT count(*) FROM events WHERE position <= $1 AND position > $2", upto, after
            )
        )

    async def partitions(self, cut_time: datetime) -> tuple[list[str], list[str]]:
        """Daily partitions wholly before the cut, and the one that straddles it."""
        drop, straddling = [], []
        for name, midnight in await self._days("events"):
            day = datetime.combine(midnight, datetime.min.time(), UTC)
            if day + timedelta(days=1) <= cut_time:
                drop.append(name)
            elif day < cut_time:
                straddling.append(name)
        return drop, straddling

    async def stale_partitions(self, before: date) -> list[str]:
        """The single-use ids' and idempotency keys' partitions of days before
        ``before`` (``ledger.authority.single_use_horizon``): bodies that occurred
        then are stale, so these rows can match nothing that may still be appended."""
        stale = []
        for table in ("event_ids", "idempotency_keys"):
            stale += [name for name, day in await self._days(table) if day < before]
        return stale

    async def drop_partitions(self, names: Sequence[str]) -> None:
        """Detach (CONCURRENTLY: appends go on) and drop these day partitions. A run
        that died half-way is finished: a detach left pending is finalized, a table
        detached but not dropped is dropped, one already gone is skipped."""
        try:
            for name in names:
                found = partition_day(name)
                if found is None:
                    raise StoreUnavailableError(f"unexpected partition name {name!r}")
                state = await self._pool.fetchrow(_PARTITION_STATE, name)
                if state is None:
                    continue  # dropped by an earlier run
                if state["attached"]:
                    how = "FINALIZE" if state["pending"] else "CONCURRENTLY"
                    await self._pool.execute(
                        f"ALTER TABLE {found[0]} DETACH PARTITION {name} {how}"
                    )
                await self._pool.execute(f"DROP TABLE IF EXISTS {name}")
                log.info("partition_dropped", extra={"partition": name})
        except DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot drop a partition: {exc}") from exc

    async def _days(self, table: str) -> list[tuple[str, date]]:
        """``table``'s day partitions (name, UTC day), oldest first: attached, or left
        detached by a run that died before dropping them."""
        return await day_tables(self._pool, table)

    async def write_anchor(
        self,
        anchor: StoredAnchor,
        checkpoint: Checkpoint,
        note: str,
        edge: Sequence[Subtree],
        now: datetime,
    ) -> None:
        """The anchor, the signed checkpoint and tree head at its position (both made
        at ``now``), and the tree's right edge there, in one transaction."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await store_subtrees(conn, edge)
                await conn.execute(
                    "INSERT INTO retention_anchors (position, entry_hash, cut_time, created_at, "
                    "keys, snapshot, snapshot_digest, signer, signature, status) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    anchor.position,
                    anchor.entry_hash,
                    anchor.cut_time,
                    now,
                    anchor.keys,
                    anchor.snapshot,
                    anchor.snapshot_digest,
                    anchor.signer,
                    anchor.signature,
                    anchor.status,
                )
                await conn.execute(
                    "INSERT INTO checkpoints (position, head_hash, time, signer, signature, note) "
                    "VALUES ($1, $2, $3, $4, decode($5, 'base64'), $6) "
                    "ON CONFLICT (position) DO UPDATE SET note = COALESCE(checkpoints.note, $6)",
                    checkpoint.position,
                    bytes.fromhex(checkpoint.head_hash),
                    now,
                    checkpoint.signer,
                    checkpoint.signature,
                    note,
                )
        except DRIVER_ERRORS as exc:
            raise StoreUnavailableError(str(exc)) from exc

    async def prune(self, position: int, cut_time: datetime) -> None:
        """Drop the daily partitions wholly before ``cut_time``; delete what is left at
        or before ``position`` (entries of the straddling day, older checkpoints). The
        single-use ids and idempotency keys go by their own days (``stale_partitions``):
        those of fresh bodies stay whatever the cut, or a replay would get through."""
        drop, _ = await self.partitions(cut_time)
        await self.drop_partitions(drop)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("DELETE FROM events WHERE position <= $1", position)
                await conn.execute("DELETE FROM checkpoints WHERE position < $1", position)
        except DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot remove the history before the cut: {exc}") from exc

    async def set_status(self, position: int, status: str) -> None:
        """Record how far the run at this anchor got (anchored, pruned, recorded)."""
        try:
            await self._pool.execute(
                "UPDATE retention_anchors SET status = $2 WHERE position = $1", position, status
            )
        except DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot record the retention status: {exc}") from exc

    async def _fetchval(self, query: str, *args: object) -> Any:
        try:
            return await self._pool.fetchval(query, *args)
        except DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot read the ledger: {exc}") from exc
