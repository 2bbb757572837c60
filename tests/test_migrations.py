"""The Alembic migrations against a real PostgreSQL: every revision goes down and up."""

from __future__ import annotations

import asyncio
from datetime import date

import asyncpg
import pytest
from alembic import command

from agentmesh.migrate import alembic_config, head_revision
from ledger.errors import ReplayError
from ledger.identity import SigningKey
from ledger.postgres import PostgresEventStore
from tests.support import ManualClock, register


async def _indexes(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT indexname FROM pg_indexes "
            "WHERE tablename IN ('events', 'event_ids', 'idempotency_keys')"
        )
        return {r["indexname"] for r in rows}
    finally:
        await conn.close()


async def test_every_revision_downgrades_and_upgrades_again(database_url: str) -> None:
    config = alembic_config(database_url)
    indexes = await _indexes(database_url)
    assert "events_stream_idx" not in indexes  # 0007: no query needs it
    assert "events_ledger_key_idx" in indexes
    # 0008: single-use ids and idempotency keys are dropped by day, not deleted by position
    assert not {"event_ids_position_brin", "idempotency_keys_position_brin"} & indexes
    await asyncio.to_thread(command.downgrade, config, "0007_write_path")
    assert {"event_ids_position_brin", "idempotency_keys_position_brin"} <= await _indexes(
        database_url
    )
    await asyncio.to_thread(command.downgrade, config, "0006_merkle")
    assert "events_stream_idx" in await _indexes(database_url)
    await asyncio.to_thread(command.downgrade, config, "base")
    await asyncio.to_thread(command.upgrade, config, "head")
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT version_num FROM alembic_version") == head_revision()
    finally:
        await conn.close()
    assert "events_stream_idx" not in await _indexes(database_url)


async def _single_use_rows(url: str) -> tuple[set[tuple[bytes, date]], set[tuple[str, date]]]:
    conn = await asyncpg.connect(url)
    try:
        ids = await conn.fetch("SELECT key, day FROM event_ids")
        keys = await conn.fetch("SELECT key, day FROM idempotency_keys")
    finally:
        await conn.close()
    return {(bytes(r["key"]), r["day"]) for r in ids}, {(r["key"], r["day"]) for r in keys}


async def test_0008_carries_the_fresh_days_of_single_use_ids_and_keys(
    database_url: str, ledger_key: SigningKey, clock: ManualClock
) -> None:
    """Down to single tables and up again: the rows of days inside the horizon come
    back with the day their bodies occurred on; older days' rows are left behind."""
    config = alembic_config(database_url)
    store = await PostgresEventStore.open(database_url, ledger_key, clock=clock)
    try:
        agent, other = await register(store), await register(store)
        stale = agent.violation(subject=other.did, at=clock.now)
        await store.append([stale], idempotency_key="stale")
        clock.advance(days=5)
        fresh = agent.violation(subject=other.did, at=clock.now)
        first = await store.append([fresh], idempotency_key="fresh")
        clock.advance(days=5)  # the first day is past the horizon, the second is not
        await store.append([agent.violation(subject=other.did, at=clock.now)])
        ids, keys = await _single_use_rows(database_url)
    finally:
        await store.close()
    days = sorted({day for _, day in ids})
    assert len(days) == 3
    assert {day for _, day in keys} == set(days[:2])
    await asyncio.to_thread(command.downgrade, config, "0007_write_path")
    await asyncio.to_thread(command.upgrade, config, "head")
    assert await _single_use_rows(database_url) == (
        {(key, day) for key, day in ids if day != days[0]},
        {("fresh", days[1])},
    )
    store = await PostgresEventStore.open(database_url, ledger_key, clock=clock)
    try:
        head = await store.head()
        with pytest.raises(ReplayError):
            await store.append([fresh])
        retried = await store.append([fresh], idempotency_key="fresh")
        assert retried.duplicate
        assert retried.positions == first.positions
        assert await store.head() == head
    finally:
        await store.close()
