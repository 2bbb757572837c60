"""The ledger reader against a real PostgreSQL: its pool's connections go back
without asyncpg's reset query and leave nothing behind for the next acquirer; a
reader reads only the day partitions it needs, and what it reads is what the table
holds, whatever the rows say."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta

import asyncpg
import pytest

from ledger import merkle, tlog
from ledger.errors import StoreUnavailableError
from ledger.ports import StoredBody
from ledger.postgres import PostgresEventStore, PostgresLedgerReader
from ledger.postgres.reader import (
    ENTRY_COLUMNS,
    create_pool,
    partition_ddl,
    partition_name,
    record_from_row,
)
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


async def _move_back(conn: asyncpg.Connection, position: int) -> None:
    """Move the entry at ``position`` to the day before the first entry's (its own
    new partition): a row edited past the writer, whose time runs back."""
    earlier = await conn.fetchval("SELECT recorded_at FROM events WHERE position = 1") - timedelta(
        days=1
    )
    await conn.execute(partition_ddl("events", earlier.date()))
    await conn.execute("UPDATE events SET recorded_at = $2 WHERE position = $1", position, earlier)


async def _lock_day(conn: asyncpg.Connection, day: datetime) -> None:
    """Hold the day partition of ``day`` in ACCESS EXCLUSIVE mode on ``conn`` (until
    its transaction ends): any statement that opens it waits."""
    await conn.execute("BEGIN")
    await conn.execute(f"LOCK TABLE {partition_name(day)} IN ACCESS EXCLUSIVE MODE")


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
async def test_paging_reads_every_entry_as_the_table_holds_it(
    ledger: PostgresEventStore, database_url: str, clock: ManualClock, bodies: bool
) -> None:
    head = await _days_of_history(ledger, clock)
    reader = await PostgresLedgerReader.connect(database_url, pool_size=1)
    try:
        paged = await _pages(reader, 7, bodies)
        # The whole table in one statement, not through the reader.
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(f"SELECT {ENTRY_COLUMNS} FROM events ORDER BY position")  # noqa: S608
        finally:
            await conn.close()
        alone: list[object] = [
            StoredBody(r["position"], r["recorded_at"], bytes(r["body"]))
            if bodies
            else record_from_row(r)
            for r in rows
        ]
        assert paged == alone
        assert [e.position for e in paged] == list(range(1, head + 1))  # type: ignore[attr-defined]
    finally:
        await reader.close()


async def test_reads_after_an_entry_leave_the_older_days_alone(
    ledger: PostgresEventStore, database_url: str, clock: ManualClock
) -> None:
    """With the oldest day partition locked by another session, a read after an
    entry this reader read, or after one it did not read but whose day partition it
    knows, does not wait for it (it opens only the partitions from that day on);
    a read from the start does."""
    head = await _days_of_history(ledger, clock)
    reader = await PostgresLedgerReader.connect(database_url, pool_size=1)
    locker = await asyncpg.connect(database_url)
    try:
        first = (await reader.read(0, 1))[0]
        last = (await reader.read(head - 3, 3))[-1]  # remembered
        assert last.position == head
        assert last.recorded_at.date() > first.recorded_at.date()
        await _lock_day(locker, first.recorded_at)
        await random_history(ledger, clock, seed=7, steps=2)  # the writer waits for nothing
        new_head = (await ledger.head()).position
        assert new_head > head
        after_last = await asyncio.wait_for(reader.read(head, 100), 10)
        assert [e.position for e in after_last] == list(range(head + 1, new_head + 1))
        # Not read before (the day partitions' first positions were read with the
        # reader's first read): an entry, and a page after it.
        entry = await asyncio.wait_for(reader.entry_at(head - 5), 10)
        assert entry is not None
        assert entry.position == head - 5
        page = await asyncio.wait_for(reader.read_bodies(head - 8, 4), 10)
        assert [b.position for b in page] == list(range(head - 7, head - 3))
        with pytest.raises(TimeoutError):  # the lock is real: a read from the start waits
            await asyncio.wait_for(reader.read(0, 100), 1)
    finally:
        await locker.close()
        await reader.close()


@pytest.mark.parametrize("known", ["its time", "its day"])
@pytest.mark.parametrize("row", ["remembered", "next", "later"])
async def test_a_time_that_runs_back_in_the_rows_still_reads_every_entry(
    ledger: PostgresEventStore, database_url: str, clock: ManualClock, row: str, known: str
) -> None:
    """Rows whose times run back (a ledger written past the writer, which
    verification refuses) are still read in full: the read after an entry falls
    back to the read by position alone when that entry is not where (or when) it
    was, or when the entries from its time on do not follow it without a gap."""
    head = await _days_of_history(ledger, clock)
    reader = await PostgresLedgerReader.connect(database_url, pool_size=1)
    try:
        middle = head // 2
        if known == "its time":
            await reader.read(middle - 5, 5)  # remembers the entry at `middle`
        else:
            await reader.read(head - 1, 1)  # reads the day partitions' first positions
        moved = middle + {"remembered": 0, "next": 1, "later": 3}[row]
        conn = await asyncpg.connect(database_url)
        try:
            await _move_back(conn, moved)
        finally:
            await conn.close()
        rest = await reader.read(middle, head)
        assert [e.position for e in rest] == list(range(middle + 1, head + 1))
        assert [e.position for e in await reader.read(middle, head)] == [e.position for e in rest]
    finally:
        await reader.close()


def _tree_hash(leaves: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1 MTH over leaf hashes, from its definition."""
    if len(leaves) == 1:
        return leaves[0]
    split = 1 << ((len(leaves) - 1).bit_length() - 1)
    return merkle.node_hash(_tree_hash(leaves[:split]), _tree_hash(leaves[split:]))


@pytest.mark.parametrize("moved", [False, True])
async def test_proofs_over_days_hold_and_read_only_their_leaves_days(
    ledger: PostgresEventStore, database_url: str, clock: ManualClock, moved: bool
) -> None:
    """Inclusion proofs and roots over a ledger of several days match the tree of
    every entry's hash; with the oldest day partition locked, a proof of a recent
    entry does not wait for it; and a leaf whose time was moved back (past the
    writer) is still found (the read by position alone)."""
    head = await _days_of_history(ledger, clock)
    conn = await asyncpg.connect(database_url)
    try:
        hashes = await conn.fetch("SELECT entry_hash FROM events ORDER BY position")
        leaves = [tlog.entry_leaf(bytes(r["entry_hash"])) for r in hashes]
        if moved:
            await _move_back(conn, head - 1)
    finally:
        await conn.close()
    root = _tree_hash(leaves)
    reader = await PostgresLedgerReader.connect(database_url, pool_size=1)
    locker = await asyncpg.connect(database_url)
    try:
        assert await reader.tree_root(head) == root
        for position in (1, head // 2, head - 1, head):
            proof = await reader.inclusion_proof(position, head)
            merkle.verify_inclusion(leaves[position - 1], position - 1, head, proof, root)
        if not moved:
            # A reader whose statements are planned for their values (PostgreSQL plans
            # a statement again for its values on its first runs; a generic plan,
            # used later, locks every partition however few it reads).
            fresh = await PostgresLedgerReader.connect(database_url, pool_size=1)
            try:
                oldest = (await fresh.read(0, 1))[0].recorded_at
                await fresh.read(head - 2, 1)  # reads the day partitions' first positions
                await _lock_day(locker, oldest)
                proof = await asyncio.wait_for(fresh.inclusion_proof(head - 1, head), 10)
                merkle.verify_inclusion(leaves[head - 2], head - 2, head, proof, root)
            finally:
                await fresh.close()
    finally:
        await locker.close()
        await reader.close()


async def test_a_read_with_the_largest_limit_after_an_entry_read_before(
    ledger: PostgresEventStore, database_url: str, clock: ManualClock
) -> None:
    """The bounded read asks for one row more than the limit: at the largest limit a
    bigint holds, it still reads (the limit is not exceeded)."""
    head = await _days_of_history(ledger, clock, days=1)
    reader = await PostgresLedgerReader.connect(database_url, pool_size=1)
    try:
        await reader.read(0, 3)  # remembers the entry at 3
        rows = await reader.read(3, 2**63 - 1)
        assert [e.position for e in rows] == list(range(4, head + 1))
    finally:
        await reader.close()


async def test_a_role_allowed_to_read_events_alone_reads_by_day_too(
    ledger: PostgresEventStore, database_url: str, clock: ManualClock
) -> None:
    """A role granted SELECT on ``events`` (not on its partitions, as a read-only role
    for exports and replicas is) still finds each day partition's first position:
    with the oldest day locked, its read after an entry it did not read does not
    wait for that day."""
    head = await _days_of_history(ledger, clock)
    role = "reader_" + uuid.uuid4().hex[:10]
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        await admin.execute(f"GRANT SELECT ON events, ledger_head TO {role}")
        oldest = await admin.fetchval("SELECT recorded_at FROM events WHERE position = 1")
        url = database_url.replace("postgres@", f"{role}@", 1)
        reader = await PostgresLedgerReader.connect(url, pool_size=1)
        try:
            with pytest.raises(StoreUnavailableError, match="permission denied"):
                await reader._fetch(f"SELECT count(*) FROM {partition_name(oldest)}")  # noqa: S608
            await reader.read(head - 1, 1)  # reads the day partitions' first positions
            await _lock_day(admin, oldest)
            entry = await asyncio.wait_for(reader.entry_at(head - 5), 10)
            assert entry is not None
            assert entry.position == head - 5
            await admin.execute("ROLLBACK")
        finally:
            await reader.close()
    finally:
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()
