"""The ledger reader against a real PostgreSQL: its pool's connections go back
without asyncpg's reset query and leave nothing behind for the next acquirer; a
reader paging through the ledger reads only the day partitions it needs, and what
it reads is what a read by position alone reads, whatever the rows say."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import pytest

from ledger.postgres import PostgresEventStore, PostgresLedgerReader
from ledger.postgres.reader import create_pool, partition_ddl, partition_name
from tests.support import ManualClock, random_history


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


async def _days_of_history(ledger: PostgresEventStore, clock: ManualClock, days: int = 4) -> int:
    """Entries over ``days`` + 1 UTC days (one day partition each); the head position."""
    agents = await random_history(ledger, clock, seed=5, steps=12)
    for _ in range(days):
        clock.advance(days=1)
        await random_history(ledger, clock, seed=6, steps=6, agents=agents)
    return (await ledger.head()).position


async def _pages(reader: PostgresLedgerReader, size: int, bodies: bool) -> list[object]:
    """Every entry, a page of ``size`` at a time from the last one read (as a
    projector's tail or a client paging does), as comparable tuples."""
    seen: list[object] = []
    after = 0
    while True:
        if bodies:
            page: list[object] = list(await reader.read_bodies(after, size))
        else:
            page = list(await reader.read(after, size))
        seen += page
        if len(page) < size:
            return seen
        after = seen[-1].position  # type: ignore[attr-defined]


@pytest.mark.parametrize("bodies", [False, True])
async def test_paging_reads_what_reads_by_position_alone_read(
    ledger: PostgresEventStore, database_url: str, clock: ManualClock, bodies: bool
) -> None:
    head = await _days_of_history(ledger, clock)
    reader = await PostgresLedgerReader.connect(database_url, pool_size=1)
    try:
        paged = await _pages(reader, 7, bodies)
        # The same reads by position alone: a fresh reader for each page.
        alone: list[object] = []
        for after in range(0, head, 7):
            fresh = await PostgresLedgerReader.connect(database_url, pool_size=1)
            try:
                if bodies:
                    alone += await fresh.read_bodies(after, 7)
                else:
                    alone += await fresh.read(after, 7)
            finally:
                await fresh.close()
        assert paged == alone
        assert [e.position for e in paged] == list(range(1, head + 1))  # type: ignore[attr-defined]
    finally:
        await reader.close()


async def test_a_read_after_an_entry_read_before_leaves_older_days_alone(
    ledger: PostgresEventStore, database_url: str, clock: ManualClock
) -> None:
    """With the oldest day partition locked by another session, a read after an
    entry this reader read does not wait for it (it opens only the partitions from
    that entry's day on); a read by position alone does."""
    head = await _days_of_history(ledger, clock)
    reader = await PostgresLedgerReader.connect(database_url, pool_size=1)
    fresh = await PostgresLedgerReader.connect(database_url, pool_size=1)
    locker = await asyncpg.connect(database_url)
    try:
        first = (await reader.read(0, 1))[0]
        last = (await reader.read(head - 3, 3))[-1]  # read by position alone: remembered
        assert last.position == head
        assert last.recorded_at.date() > first.recorded_at.date()
        await locker.execute("BEGIN")
        await locker.execute(
            f"LOCK TABLE {partition_name(first.recorded_at)} IN ACCESS EXCLUSIVE MODE"
        )
        await random_history(ledger, clock, seed=7, steps=2)  # the writer waits for nothing
        new_head = (await ledger.head()).position
        assert new_head > head
        after_last = await asyncio.wait_for(reader.read(head, 100), 10)
        assert [e.position for e in after_last] == list(range(head + 1, new_head + 1))
        with pytest.raises(TimeoutError):  # the lock is real: by position alone, it waits
            await asyncio.wait_for(fresh.read(head, 100), 1)
    finally:
        await locker.close()
        await fresh.close()
        await reader.close()


@pytest.mark.parametrize("row", ["remembered", "next"])
async def test_a_time_that_runs_back_in_the_rows_still_reads_every_entry(
    ledger: PostgresEventStore, database_url: str, clock: ManualClock, row: str
) -> None:
    """Rows whose times run back (a ledger written past the writer, which
    verification refuses) are still read in full: the read after a remembered entry
    falls back to the read by position alone when that entry's time changed, or
    when the entries from its time on do not follow it."""
    head = await _days_of_history(ledger, clock)
    reader = await PostgresLedgerReader.connect(database_url, pool_size=1)
    try:
        middle = head // 2
        await reader.read(middle - 5, 5)  # remembers the entry at `middle`
        moved = middle if row == "remembered" else middle + 1
        conn = await asyncpg.connect(database_url)
        try:
            earlier = await conn.fetchval(
                "SELECT recorded_at FROM events WHERE position = 1"
            ) - timedelta(days=1)
            await conn.execute(partition_ddl("events", earlier.date()))
            await conn.execute(
                "UPDATE events SET recorded_at = $2 WHERE position = $1", moved, earlier
            )
        finally:
            await conn.close()
        rest = await reader.read(middle, head)
        assert [e.position for e in rest] == list(range(middle + 1, head + 1))
        assert [e.position for e in await reader.read(middle, head)] == [e.position for e in rest]
    finally:
        await reader.close()
