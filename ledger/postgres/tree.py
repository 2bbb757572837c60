"""The Merkle tree's stored subtrees on PostgreSQL (the writer keeps them; retention
keeps the edge at a cut)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import asyncpg

from ledger import tlog
from ledger.errors import StoreUnavailableError
from ledger.merkle import Frontier, Subtree
from ledger.postgres.reader import DRIVER_ERRORS

log = logging.getLogger("agentmesh.ledger")


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


async def build_tree(pool: asyncpg.Pool) -> None:
    """Build the Merkle tree over the entries appended before it existed (once;
    a ledger created since has its frontier from the first append on)."""
    try:
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT position, merkle_built FROM ledger_head WHERE id = 1 FOR UPDATE"
            )
            if row["merkle_built"]:
                return
            first = await conn.fetchval("SELECT min(position) FROM events")
            if first not in (None, 1):
                raise StoreUnavailableError(
                    f"the ledger starts at position {first} (cut by retention before it had "
                    "a Merkle tree): its tree cannot be built from the entries left"
                )
            frontier = await build_frontier(conn, row["position"])
            await conn.execute("UPDATE ledger_head SET merkle_built = true WHERE id = 1")
            log.info("merkle_tree_built", extra={"size": frontier.size})
    except DRIVER_ERRORS as exc:
        raise StoreUnavailableError(f"cannot build the Merkle tree: {exc}") from exc
