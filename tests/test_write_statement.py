"""The guarded write of a batch, in every shape ``write_statement`` produces, against
a real PostgreSQL: with the head it was computed from it writes every part; with any
other head it writes nothing; a single-use id or idempotency key used before fails the
whole statement."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from ledger.chain import Head
from ledger.merkle import Frontier, Subtree
from ledger.postgres.batch import (
    TAKE_TURN_SQL,
    BatchState,
    CheckpointRow,
    WriteShape,
    write_rows,
    write_shapes,
    write_statement,
)
from ledger.postgres.reader import partition_ddl

NOW = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=5)
DAY = NOW.date()
OLD_STREAMS = ("old-a", "old-b")  # streams that exist before each write


def test_shapes_are_every_subset_of_the_optional_parts_in_both_forms() -> None:
    shapes = write_shapes()
    assert len(shapes) == len(set(shapes)) == 2 * 2**8
    assert all(parts[0] == "ev" for _, parts in shapes)


def batch(shape: WriteShape, base: Head, tag: bytes) -> tuple[BatchState, CheckpointRow | None]:
    """A batch of this shape continuing ``base`` (rows need not make sense, only be
    distinct per ``tag`` where a unique key needs it)."""
    one, parts = shape
    count = 1 if one else 2
    state = BatchState(
        head=base,
        frontier=Frontier(),
        now=NOW,
        ledger_did="did:mesh:ledger",
        keys={},
        key_positions={},
        suspended_dids={},
        ids=set(),
        has_any_agent=True,
        versions={},
        done_keys={},
    )
    prev = base.entry_hash
    for i in range(count):
        position = base.position + 1 + i
        digest = bytes([i + 1]) * 31 + tag[:1]
        state.rows.append(
            (
                position,
                NOW,
                f"stream-{i}",
                7 + i,
                "policy.violation",
                f"did:mesh:actor{i}",
                sorted({f"did:mesh:actor{i}", "did:mesh:subject"}),
                b'{"body":%d}' % i,
                bytes(64),
                prev,
                digest,
            )
        )
        prev = digest
    last = base.position + count
    state.head = Head(last, prev, NOW)
    if "su" in parts:
        for i in range(count):
            state.stream_rows[OLD_STREAMS[i]] = (10 + i, last)
            state.existing_streams.add(OLD_STREAMS[i])
    if "si" in parts:
        for i in range(count):
            state.stream_rows[f"new-{i}-{tag.hex()}"] = (1 + i, last)
    if "k" in parts:
        for i in range(count):
            state.key_rows[f"did:mesh:key{i}"] = (bytes([i]) * 32, last, bool(i))
    if "i" in parts:
        for i in range(count):
            state.idem_rows.append(
                ("did:mesh:signer", f"key-{i}-" + tag.hex(), last, 1, f"stream-{i}", 7, b"d", DAY)
            )
    if "e" in parts:
        for i in range(count):
            state.id_rows.append((tag + bytes([i]) * 15, DAY, last))
    if "n" in parts:
        state.nodes = [Subtree(4 + i, i, bytes([9]) * 32) for i in range(count)]
    if "li" in parts:
        state.identity_row = ("did:mesh:rotated", bytes([5]) * 32)
    checkpoint = None
    if "c" in parts:
        checkpoint = (last, prev, NOW, "did:mesh:ledger", "c2lnbmF0dXJl", "note")
    return state, checkpoint


async def snapshot(conn: asyncpg.Connection) -> tuple[object, ...]:
    row = await conn.fetchrow(
        """SELECT (SELECT position FROM ledger_head), (SELECT did FROM ledger_identity),
                  (SELECT count(*) FROM events), (SELECT array_agg(version ORDER BY stream_id)
                  FROM streams), (SELECT count(*) FROM agent_keys),
                  (SELECT count(*) FROM idempotency_keys), (SELECT count(*) FROM event_ids),
                  (SELECT count(*) FROM merkle_nodes), (SELECT count(*) FROM checkpoints)"""
    )
    return tuple(row)


async def written(
    conn: asyncpg.Connection, state: BatchState, checkpoint: CheckpointRow | None
) -> None:
    """Every row of the batch is in the tables, as staged."""
    head = await conn.fetchrow("SELECT position, entry_hash, recorded_at FROM ledger_head")
    assert Head(head[0], bytes(head[1]), head[2]) == state.head
    events = await conn.fetch(
        "SELECT position, recorded_at, stream_id, stream_version, event_type, actor, subjects, "
        "body, signature, prev_hash, entry_hash FROM events WHERE position > $1 ORDER BY position",
        state.rows[0][0] - 1,  # type: ignore[operator]
    )
    assert [tuple(bytes(v) if isinstance(v, bytes) else v for v in r) for r in events] == [
        tuple(r) for r in state.rows
    ]
    streams = await conn.fetch("SELECT stream_id, version, last_position FROM streams")
    assert {s: (v, p) for s, v, p in streams}.items() >= state.stream_rows.items()
    keys = await conn.fetch("SELECT did, public_key, position, suspended FROM agent_keys")
    assert {d: (bytes(k), p, x) for d, k, p, x in keys} == state.key_rows
    idem = await conn.fetch(
        "SELECT signer, key, first_position, count, stream_id, stream_version, digest, day, "
        "recorded_at FROM idempotency_keys ORDER BY key"
    )
    assert [(*r[:6], bytes(r[6]), r[7]) for r in idem] == sorted(
        state.idem_rows,
        key=lambda r: r[1],  # type: ignore[arg-type,return-value]
    )
    assert all(r[8] == NOW for r in idem)
    ids = await conn.fetch("SELECT key, day, position FROM event_ids ORDER BY key")
    assert [(bytes(k), d, p) for k, d, p in ids] == sorted(state.id_rows)
    nodes = await conn.fetch("SELECT level, idx, hash FROM merkle_nodes ORDER BY level")
    assert [(lv, i, bytes(h)) for lv, i, h in nodes] == [
        (n.level, n.index, n.hash) for n in state.nodes
    ]
    checkpoints = await conn.fetch(
        "SELECT position, head_hash, time, signer, encode(signature, 'base64'), note "
        "FROM checkpoints"
    )
    expected = [checkpoint] if checkpoint is not None else []
    assert [(p, bytes(h), t, s, g, n) for p, h, t, s, g, n in checkpoints] == expected
    identity = await conn.fetchrow("SELECT did, public_key, recorded_at FROM ledger_identity")
    if state.identity_row is not None:
        assert (identity[0], bytes(identity[1]), identity[2]) == (*state.identity_row, NOW)
    else:
        assert identity[0] != "did:mesh:rotated"


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    for table in ("events", "event_ids", "idempotency_keys"):
        await conn.execute(partition_ddl(table, DAY))
    await conn.execute(
        "INSERT INTO ledger_identity (id, did, public_key, recorded_at) "
        "VALUES (1, 'did:mesh:ledger', '\\x00', now()) ON CONFLICT (id) DO NOTHING"
    )
    await conn.executemany(
        "INSERT INTO streams (stream_id, version, last_position) VALUES ($1, 1, 0)",
        [(s,) for s in OLD_STREAMS],
    )
    try:
        yield conn
    finally:
        await conn.close()


async def test_every_shape_writes_all_of_its_parts_or_nothing(conn: asyncpg.Connection) -> None:
    row = await conn.fetchrow("SELECT position, entry_hash, recorded_at FROM ledger_head")
    base = Head(row[0], bytes(row[1]), row[2])
    for shape in write_shapes():
        state, checkpoint = batch(shape, base, b"\x01")
        assert write_rows(state, checkpoint)[0] == shape
        transaction = conn.transaction()
        await transaction.start()
        try:
            before = await snapshot(conn)
            # Another writer moved the head: nothing is written.
            moved = Head(base.position, b"\xff" * 32, base.recorded_at)
            assert await conn.fetch(*_statement(moved, state, checkpoint)) == []
            assert await snapshot(conn) == before
            moved = Head(base.position + 1, base.entry_hash, base.recorded_at)
            assert await conn.fetch(*_statement(moved, state, checkpoint)) == []
            assert await snapshot(conn) == before
            # The head it was computed from: all of it, in one row naming the position.
            assert len(await conn.fetch(*_statement(base, state, checkpoint))) == 1
            await written(conn, state, checkpoint)
            after = await snapshot(conn)
            # A single-use id or idempotency key used before fails the statement whole,
            # the rest of the next batch (fresh positions, fresh other keys) unwritten.
            for part in ("e", "i"):
                if part not in shape[1]:
                    continue
                again, again_checkpoint = batch(shape, state.head, b"\x02")
                if part == "e":
                    again.id_rows = state.id_rows
                else:
                    again.idem_rows = state.idem_rows
                with pytest.raises(asyncpg.UniqueViolationError):
                    async with conn.transaction():  # a savepoint
                        await conn.fetch(*_statement(state.head, again, again_checkpoint))
                assert await snapshot(conn) == after
        finally:
            await transaction.rollback()


async def test_a_batch_updates_its_streams_through_the_primary_key(
    conn: asyncpg.Connection,
) -> None:
    """The generic plan (the one a prepared write settles on) guesses ten rows for any
    ``unnest`` of a parameter; against a fleet of a few thousand streams (2,000 here:
    from ~5,000 on the guess alone picks the index) it hashed the batch and read every
    stream, for each commit. The plan PostgreSQL runs, as auto_explain reports it to
    this session, reads the streams by their primary key."""
    row = await conn.fetchrow("SELECT position, entry_hash, recorded_at FROM ledger_head")
    base = Head(row[0], bytes(row[1]), row[2])
    state, checkpoint = batch((False, ("ev", "su")), base, b"\x03")
    plans: list[str] = []
    conn.add_log_listener(lambda _conn, message: plans.append(message.message))
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(
            "INSERT INTO streams (stream_id, version, last_position) "
            "SELECT 'fleet-' || i, 1, 0 FROM generate_series(1, 2000) AS i"
        )
        await conn.execute("ANALYZE streams")
        await conn.execute("LOAD 'auto_explain'")
        for setting in (
            "auto_explain.log_min_duration = 0",
            "client_min_messages = log",
            "plan_cache_mode = force_generic_plan",
        ):
            await conn.execute(f"SET LOCAL {setting}")
        assert len(await conn.fetch(*_statement(base, state, checkpoint))) == 1
        await written(conn, state, checkpoint)
    finally:
        await transaction.rollback()
    (plan,) = [p for p in plans if "Update on streams" in p]
    assert "streams_pkey" in plan
    assert "Seq Scan on streams" not in plan


def _statement(
    expected: Head, state: BatchState, checkpoint: CheckpointRow | None
) -> tuple[str, ...]:
    sql, args = write_statement(expected, state, checkpoint)
    return (sql, *args)  # type: ignore[arg-type]


TURN, COMMIT = 0x7E57_0001, 0x7E57_0002  # this test's own turn and commit locks


async def _waiting(conn: asyncpg.Connection, pid: int, lock: int) -> None:
    """Until the backend ``pid`` waits for the advisory lock ``lock``."""
    for _ in range(500):
        if await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE pid = $1 AND locktype = 'advisory' "
            "AND NOT granted AND ((classid::bigint << 32) | objid::bigint) = $2",
            pid,
            lock,
        ):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"backend {pid} never waited for lock {lock}")


async def test_a_write_hands_the_turn_over_and_the_next_holder_reads_it_committed(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """A holder hands its turn over inside its write, before that write commits: the
    waiter gets the turn lock at once but ``ledger_take_turn`` reads nothing until the
    write is committed, and then reads it (else its own write would find the head
    moved). With nobody waiting, the holder keeps its turn."""
    row = await conn.fetchrow("SELECT position, entry_hash, recorded_at FROM ledger_head")
    base = Head(row[0], bytes(row[1]), row[2])
    shape: WriteShape = (False, ("ev",))
    waiter = await asyncpg.connect(database_url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", TURN)
        # Nobody waits: the turn is kept (released, then taken again).
        state, _ = batch(shape, base, b"\x03")
        sql, args = write_statement(base, state, None, (TURN, COMMIT))
        [kept] = await conn.fetch(sql, *args)
        assert (kept["released"], kept["kept"]) == (True, True)
        head = state.head
        # A waiter: it gets the turn at the hand-over, and the entries once committed.
        turn = asyncio.ensure_future(
            waiter.fetch(TAKE_TURN_SQL, TURN, COMMIT, 10_000, head.position, head.recorded_at, 100)
        )
        await _waiting(conn, waiter.get_server_pid(), TURN)
        state, _ = batch(shape, head, b"\x04")
        sql, args = write_statement(head, state, None, (TURN, COMMIT))
        async with conn.transaction():
            [handed] = await conn.fetch(sql, *args)
            assert (handed["released"], handed["kept"]) == (True, False)
            await _waiting(conn, waiter.get_server_pid(), COMMIT)  # holds TURN, not done
            assert not turn.done()
        rows = await asyncio.wait_for(turn, 10)
        assert rows[0]["waited"] is True
        assert rows[0]["turn"] is True
        assert rows[0]["position"] is None
        assert [r["position"] for r in rows[1:]] == [r[0] for r in state.rows]
        assert [bytes(r["entry_hash"]) for r in rows[1:]] == [r[10] for r in state.rows]
        # The waiter holds the turn now; the old holder does not.
        assert not await conn.fetchval("SELECT pg_try_advisory_lock_shared($1)", TURN)
        assert await waiter.fetchval("SELECT pg_advisory_unlock($1)", TURN)
    finally:
        await conn.execute("SELECT pg_advisory_unlock_all()")
        await waiter.close()


async def test_a_wait_for_the_turn_ends_and_takes_nothing(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """A holder that keeps the turn past ``wait_ms`` (frozen, or its node gone with its
    connection left open) does not stall a waiter: the call returns without the turn
    and reads nothing, and the waiter's session keeps its own lock timeout."""
    waiter = await asyncpg.connect(database_url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", TURN)
        rows = await asyncio.wait_for(
            waiter.fetch(TAKE_TURN_SQL, TURN, COMMIT, 200, 0, NOW - timedelta(days=1), 100), 10
        )
        assert [(r["waited"], r["turn"]) for r in rows] == [(True, False)]
        assert await waiter.fetchval("SHOW lock_timeout") == "0"
        assert (
            await waiter.fetchval(
                "SELECT count(*) FROM pg_locks "
                "WHERE pid = pg_backend_pid() AND locktype = 'advisory'"
            )
            == 0
        )
        # Free again: taken at once, no wait.
        await conn.execute("SELECT pg_advisory_unlock($1)", TURN)
        rows = await waiter.fetch(TAKE_TURN_SQL, TURN, COMMIT, 200, None, None, 100)
        assert [(r["waited"], r["turn"]) for r in rows] == [(False, True)]
    finally:
        await conn.execute("SELECT pg_advisory_unlock_all()")
        await waiter.close()
