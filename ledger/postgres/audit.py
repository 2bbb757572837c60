"""The audit exporter's source over PostgreSQL: ``PostgresAuditSource`` runs the
SELECTs ``ledger.audit.export.AuditSource`` names (and the one checkpoint
INSERT) on a ``PostgresLedgerReader``'s pool; ``PostgresLedgerReader.audit_source()``
hands it to ``ledger.audit``'s exporter. Driver errors become
``StoreUnavailableError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec

from ledger.audit.bundle import AnchorLine
from ledger.chain import Checkpoint, RecordedEvent
from ledger.errors import StoreUnavailableError
from ledger.merkle import Frontier
from ledger.postgres.reader import (
    DRIVER_ERRORS,
    ENTRY_COLUMNS,
    PostgresLedgerReader,
    checkpoint_from_row,
    record_from_row,
)
from ledger.timefmt import format_time, parse_time

__all__ = ["PostgresAuditSource"]

_KEY_TYPES = ("agent.registered", "agent.key_rotated")


def _registers(row: Any, did: str) -> bool:
    """Whether the entry ``row`` is the registration of ``did``."""
    return bool(row["event_type"] == "agent.registered" and did in row["subjects"])


class PostgresAuditSource:
    """``AuditSource`` over PostgreSQL: the reader's own reads, plus the audit queries."""

    def __init__(self, reader: PostgresLedgerReader) -> None:
        self.reader = reader

    async def entry_range(self, start: datetime, end: datetime) -> tuple[int, int] | None:
        row = await self._fetchrow(
            "SELECT min(position) AS first, max(position) AS last FROM events "
            "WHERE recorded_at >= $1 AND recorded_at < $2",
            start,
            end,
        )
        if row is None or row["first"] is None:
            return None
        return int(row["first"]), int(row["last"])

    async def entry_signers(
        self,
        first: int,
        last: int,
        start: datetime,
        end: datetime,
        *,
        exclude: str,
        agent: str | None,
    ) -> list[str]:
        query = (
            "SELECT DISTINCT actor FROM events WHERE position BETWEEN $1 AND $2 "
            "AND recorded_at >= $3 AND recorded_at < $4 AND actor <> $5"
        )
        args: list[object] = [first, last, start, end, exclude]
        if agent is not None:
            query += " AND subjects @> ARRAY[$6]::text[]"
            args.append(agent)
        return [row["actor"] for row in await self._fetch(query, *args)]

    async def ledger_rotations(self) -> list[RecordedEvent]:
        return await self.reader.ledger_rotations()

    async def key_entries(self, dids: Sequence[str], last: int) -> list[RecordedEvent]:
        """The key entries of ``dids`` up to ``last``, found through ``agent_keys``.

        Matching ``subjects`` against tens of thousands of DIDs (every signer of a large
        export) scans the whole events table (5 s at 2M entries, growing with it), and
        no index holds key entries alone. ``agent_keys`` holds each agent's latest key
        entry (written in the same commit): when that is its registration, at or before
        ``last``, it is the agent's only key entry (an agent is registered once and a
        rotation follows its registration), read by position. When it is not there, or
        is a rotation, or lies after ``last``, the agent's entries are matched by
        subject as before: only for those agents. One whose latest key entry retention
        removed has none left (the retention anchor carries its key).
        """
        latest = await self._fetch(
            "SELECT did, position FROM agent_keys WHERE did = ANY($1::text[])", list(dids)
        )
        # The positions go in as a sub-select, not a constant array: the planner
        # estimates a constant ``= ANY`` element by element in every day partition
        # (38,000 positions over 91 partitions: 1.2 s of planning against 65 ms of
        # execution); a sub-select's array is known only when it runs (3 ms to plan).
        rows = await self._fetch(
            f"SELECT {ENTRY_COLUMNS} FROM events "  # noqa: S608 -- a constant column list
            "WHERE position = ANY(ARRAY(SELECT unnest($1::bigint[]))) AND position <= $2",
            sorted({row["position"] for row in latest}),
            last,
        )
        by_position = {row["position"]: row for row in rows}
        kept = await self._fetchrow("SELECT min(position) AS first FROM events")
        first = kept["first"] if kept is not None and kept["first"] is not None else 1
        found: list[RecordedEvent] = []
        rest = set(dids)
        for row in latest:
            entry = by_position.get(row["position"])
            if entry is not None and _registers(entry, row["did"]):
                found.append(record_from_row(entry))
                rest.discard(row["did"])
            elif row["position"] < first:  # retention removed it, and every earlier one
                rest.discard(row["did"])
        if rest:
            found += await self._key_entries_by_subject(sorted(rest), last)
        return sorted(found, key=lambda record: record.position)

    async def _key_entries_by_subject(self, dids: Sequence[str], last: int) -> list[RecordedEvent]:
        rows = await self._fetch(
            f"SELECT {ENTRY_COLUMNS} FROM events "  # noqa: S608 -- a constant column list
            "WHERE event_type = ANY($1::text[]) AND position <= $2 AND subjects && $3::text[] "
            "ORDER BY position",
            list(_KEY_TYPES),
            last,
            list(dids),
        )
        return [record_from_row(row) for row in rows]

    async def retention_anchor(self) -> AnchorLine | None:
        row = await self._fetchrow(
            "SELECT position, entry_hash, cut_time, keys, snapshot_digest, signer, "
            "encode(signature, 'base64') AS signature FROM retention_anchors "
            "ORDER BY position DESC LIMIT 1"
        )
        if row is None:
            return None
        return AnchorLine(
            position=row["position"],
            entry_hash=bytes(row["entry_hash"]).hex(),
            cut_time=format_time(row["cut_time"]),
            keys=msgspec.json.decode(bytes(row["keys"])),
            snapshot_digest=bytes(row["snapshot_digest"]).hex(),
            signer=row["signer"],
            signature=row["signature"].replace("\n", ""),
        )

    async def read(self, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        return await self.reader.read(after, limit)

    async def entry_at(self, position: int) -> RecordedEvent | None:
        return await self.reader.entry_at(position)

    async def checkpoints(self, after: int = 0, limit: int = 10_000) -> list[Checkpoint]:
        return await self.reader.checkpoints(after, limit)

    async def tree_edge(self, size: int) -> Frontier:
        return await self.reader.frontier_at(size)

    async def tree_nodes(self, wanted: set[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        return await self.reader.tree_nodes(wanted)

    async def store_checkpoint(self, checkpoint: Checkpoint) -> Checkpoint | None:
        # The INSERT happens only if the stored entry has exactly this head hash, so the
        # ledger key never signs (into the table) a chain the database does not hold.
        head_hash = bytes.fromhex(checkpoint.head_hash)
        try:
            async with self.reader.pool.acquire() as conn:
                await conn.execute(
                    "INSERT INTO checkpoints (position, head_hash, time, signer, signature) "
                    "SELECT $1, $2, $3, $4, decode($5, 'base64') WHERE EXISTS "
                    "(SELECT 1 FROM events WHERE position = $1 AND entry_hash = $2) "
                    "ON CONFLICT (position) DO NOTHING",
                    checkpoint.position,
                    head_hash,
                    parse_time(checkpoint.time),
                    checkpoint.signer,
                    checkpoint.signature,
                )
                row = await conn.fetchrow(
                    "SELECT position, head_hash, time, signer, encode(signature, 'base64') AS sig "
                    "FROM checkpoints WHERE position = $1",
                    checkpoint.position,
                )
        except DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot write a checkpoint: {exc}") from exc
        return None if row is None else checkpoint_from_row(row)

    async def _fetch(self, query: str, *args: object) -> list[Any]:
        try:
            return list(await self.reader.pool.fetch(query, *args))
        except DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot read the ledger: {exc}") from exc

    async def _fetchrow(self, query: str, *args: object) -> Any:
        try:
            return await self.reader.pool.fetchrow(query, *args)
        except DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot read the ledger: {exc}") from exc
