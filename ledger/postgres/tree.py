"""The Merkle tree's stored subtrees on PostgreSQL (the writer keeps them; retention
keeps the edge at a cut)."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from ledger import tlog
from ledger.merkle import Frontier, Subtree


async def build_frontier(conn: asyncpg.Connection, head: int) -> Frontier:
    frontier, after = Frontier(), 0
    while rows := await conn.fetch(
        "SELECT position, entry_hash FROM events WHERE position > $1 AND position <= $2 "
        "ORDER BY position LIMIT 10000",
        after,
        head,
    ):
        leaves = [tlog.entry_leaf(bytes(r["entry_hash"])) for r in rows]
        frontier, completed = frontier.extend_with_subtrees(leaves)
        await store_subtrees(conn, [n for n in completed if n.level >= tlog.STORED_LEVEL])
        after = rows[-1]["position"]
    return frontier


async def store_subtrees(conn: asyncpg.Connection, subtrees: Sequence[Subtree]) -> None:
    """Keep these complete subtrees of the tree (idempotent: a subtree never changes)."""
    await conn.execute(
        "INSERT INTO merkle_nodes (level, idx, hash) "
        "SELECT * FROM unnest($1::smallint[], $2::bigint[], $3::bytea[]) "
        "ON CONFLICT (level, idx) DO NOTHING",
        [n.level for n in subtrees],
        [n.index for n in subtrees],
        [n.hash for n in subtrees],
    )
