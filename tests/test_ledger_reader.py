"""The ledger reader's pool against a real PostgreSQL: its connections go back
without asyncpg's reset query, and leave nothing behind for the next acquirer."""

from __future__ import annotations

import asyncpg
import pytest

from ledger.postgres import PostgresLedgerReader
from ledger.postgres.reader import create_pool


async def _queries(pool: asyncpg.Pool) -> int:
    """Queries sent on the pool's one connection so far (asyncpg's own count)."""
    async with pool.acquire() as conn:
        count: int = conn._con._protocol.queries_count
    return count


async def _fail_in_a_transaction(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.execute("BEGIN")
        await conn.execute("SELECT * FROM no_such_table")


@pytest.mark.parametrize("reader", [True, False])
async def test_a_readers_release_sends_no_reset_query(database_url: str, reader: bool) -> None:
    pool = await create_pool(database_url, 1, reader=reader)
    try:
        before = await _queries(pool)
        for _ in range(5):
            assert await pool.fetchval("SELECT 1") == 1
        sent = await _queries(pool) - before
        # Each read is one query; the writer's pool (reader=False) also resets on each
        # release: the 5 reads' and the first count's (6 reset queries more).
        assert sent == (5 if reader else 11)
    finally:
        await pool.close()


async def test_what_a_reader_leaves_is_gone_for_the_next_acquirer(database_url: str) -> None:
    reader = await PostgresLedgerReader.connect(database_url, pool_size=1)
    try:
        async with reader.listener():
            pass  # LISTEN on the pool's only connection; UNLISTEN when done
        async with reader.pool.acquire() as conn:
            assert await conn.fetch("SELECT pg_listening_channels()") == []
        # A transaction a failure left open is rolled back on release.
        with pytest.raises(asyncpg.UndefinedTableError):
            await _fail_in_a_transaction(reader.pool)
        async with reader.pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT count(*) FROM events") == 0
    finally:
        await reader.close()
