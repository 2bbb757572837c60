"""The Alembic migrations against a real PostgreSQL: every revision goes down and up."""

from __future__ import annotations

import asyncio

import asyncpg
from alembic import command

from agentmesh.migrate import alembic_config, head_revision


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
    assert {"event_ids_position_brin", "idempotency_keys_position_brin"} <= indexes
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
