"""Alembic environment: runs migrations over asyncpg.

The URL comes from the Alembic config's ``sqlalchemy.url`` when a caller set it
(``agentmesh db upgrade``), else from ``AGENTMESH_DATABASE_URL``.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from ledger.postgres.dsn import sqlalchemy_url
from ledger.postgres.schema import metadata

config = context.config


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("AGENTMESH_DATABASE_URL")
    if not url:
        raise SystemExit("AGENTMESH_DATABASE_URL is required: postgresql://user:pass@host:5432/db")
    return sqlalchemy_url(url)


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():
        # Concurrent `db upgrade` runs (e.g. several migration Jobs) take turns.
        context.execute("SELECT pg_advisory_xact_lock(7240001)")
        context.run_migrations()


async def _main() -> None:
    engine = create_async_engine(_url())
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline SQL generation is not supported; run against a database")
asyncio.run(_main())
