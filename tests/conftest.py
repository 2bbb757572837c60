"""Fixtures: a real PostgreSQL and a real Redis, started once per test session.

Each test that needs the ledger gets a fresh database (``CREATE DATABASE``
from a migrated template), so tests never see each other's events.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from agentmesh.embedded import EmbeddedPostgres, EmbeddedRedis
from agentmesh.migrate import upgrade
from ledger.identity import SigningKey
from ledger.postgres import PostgresEventStore
from projections.readstore import ProjectionStore
from projections.store_memory import MemoryProjectionStore
from projections.store_postgres import PostgresProjectionStore
from projections.store_redis import RedisProjectionStore
from tests.api_support import Api, api_settings, running_api
from tests.sidecar_support import RunningSidecar, Upstream, running_sidecar, running_upstream
from tests.support import ManualClock


@pytest.fixture(scope="session")
def tmp_root() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="agentmesh-test-") as path:
        yield Path(path)


@pytest.fixture(scope="session")
def postgres(tmp_root: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_root / "pg").start()
    try:
        _create_template(server)
        yield server
    finally:
        server.stop()


def _create_template(server: EmbeddedPostgres) -> None:
    import asyncio

    async def create() -> None:
        conn = await asyncpg.connect(server.url)
        await conn.execute("CREATE DATABASE ledger_template")
        await conn.close()

    asyncio.run(create())
    upgrade(server.url.rsplit("/", 1)[0] + "/ledger_template")


@pytest.fixture(scope="session")
def redis_server(tmp_root: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_root / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def database_url(postgres: EmbeddedPostgres) -> str:
    """A fresh, migrated database for one test."""
    name = "t_" + uuid.uuid4().hex[:12]
    conn = await asyncpg.connect(postgres.url)
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE ledger_template")
    finally:
        await conn.close()
    return postgres.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="session")
def ledger_key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
async def store(database_url: str, ledger_key: SigningKey) -> AsyncIterator[PostgresEventStore]:
    event_store = await PostgresEventStore.open(database_url, ledger_key)
    try:
        yield event_store
    finally:
        await event_store.close()


@pytest.fixture
def clock() -> ManualClock:
    """A clock a test moves by hand (tests.support.ManualClock)."""
    return ManualClock()


@pytest.fixture
async def ledger(
    database_url: str, ledger_key: SigningKey, clock: ManualClock
) -> AsyncIterator[PostgresEventStore]:
    """The event store on the test's database, on the test's manual clock."""
    store = await PostgresEventStore.open(database_url, ledger_key, clock=clock)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(params=["memory", "redis", "postgres"])
async def read_store(
    request: pytest.FixtureRequest, redis_server: EmbeddedRedis, database_url: str
) -> AsyncIterator[ProjectionStore]:
    """Each projection read store in turn, empty, on its own keys or schema."""
    store: ProjectionStore
    if request.param == "memory":
        store = MemoryProjectionStore()
    elif request.param == "redis":
        store = RedisProjectionStore.connect(
            redis_server.host, redis_server.port, prefix=f"t{uuid.uuid4().hex[:8]}:"
        )
    else:
        store = await PostgresProjectionStore.connect(database_url, uuid.uuid4().hex[:8])
    try:
        yield store
    finally:
        await store.close()


# -- servers most API and sidecar tests share (a module may define its own) --------------


@pytest.fixture
async def api(
    database_url: str, redis_server: EmbeddedRedis, ledger_key: SigningKey
) -> AsyncIterator[Api]:
    """The API over real HTTP with its projector, on the test's fresh database."""
    async with running_api(api_settings(database_url, redis_server, ledger_key)) as running:
        yield running


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """A real MCP server (the official SDK's) for a sidecar to relay to."""
    async with running_upstream() as running:
        yield running


@pytest.fixture
async def sidecar(api: Api, upstream: Upstream, tmp_path: Path) -> AsyncIterator[RunningSidecar]:
    """A sidecar for a registered agent (``tools:read``) in front of ``upstream``."""
    agent = await api.register(("tools:read",))
    async with running_sidecar(api, agent, tmp_path, f"tools={upstream.url}") as running:
        yield running
