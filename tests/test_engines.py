"""On the engines users already run, each the real server from Debian's packages:

* PgBouncer in ``pool_mode = transaction`` in front of the test PostgreSQL: the
  ledger (appends, reads, proofs, checkpoints, verify), the handshake store, the
  projector with the PostgreSQL read store, retention, and the whole API, through
  it. First
  the proof that these tests exercise the pooler: the ledger's own pool, with
  asyncpg's statement cache on, fails there the way asyncpg fails.
* A read replica URL: a copy of the ledger taken earlier (a replica that lags)
  answers the API's listings and ``?at=`` while appends go to the primary. A
  streaming replica is a second cluster to run; the copy shows the routing,
  which is what this code decides.
* redis-server with ``requirepass`` and TLS (a throwaway CA), and Sentinel: the
  read store connects through the Sentinel, the master is switched
  (``SENTINEL FAILOVER``), and the projector's writes and the reads go on; a
  promoted server that never got the old master's last writes is caught up again
  from the ledger.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from agentmesh.embedded import EmbeddedPostgres, EmbeddedRedis
from agentmesh.retention_job import run_retention
from agentmesh.services import open_api_context, run_projector
from agentmesh.settings import ConfigError, Settings
from agentmesh.wiring import open_history_reader, open_projection_store
from api.handshakes_postgres import PostgresHandshakeStore
from ledger.identity import SigningKey, b64encode
from ledger.postgres import PostgresEventStore, PostgresLedgerReader
from ledger.postgres.dsn import connect_kwargs, sqlalchemy_url
from ledger.postgres.reader import create_pool
from ledger.postgres.retention import PostgresRetentionStore
from ledger.timefmt import format_time
from ledger.verify import verify_ledger
from projections.config import TrustConfig
from projections.documents import Change
from projections.leader_postgres import project_while_leader
from projections.projector import Projector
from projections.readstore import SUBSCRIBED, ProjectionStore, ReadStoreError
from projections.store_memory import MemoryProjectionStore
from projections.store_postgres import PostgresProjectionStore
from projections.store_redis import RedisProjectionStore
from tests.api_support import ADMIN, ADMIN_TOKEN, handshake_request, running_api
from tests.engines_support import (
    PgBouncer,
    RedisSentinel,
    RedisServer,
    Tls,
    make_tls,
    wait_until,
)
from tests.support import Agent, ManualClock, random_history, register
from tests.test_retention import long_history

CONFIG = TrustConfig()
GUARD = 60.0  # seconds before a wait that should end gives up: a hang guard, not a measurement
PID = "SELECT pg_backend_pid()"


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pgbouncer(postgres: EmbeddedPostgres) -> Iterator[PgBouncer]:
    bouncer = PgBouncer(postgres.port, pool_size=3).start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


def _name(url: str) -> str:
    """The database name in a URL."""
    return url.rsplit("/", 1)[1].partition("?")[0]


@pytest.fixture
def pooled_url(pgbouncer: PgBouncer, database_url: str) -> str:
    """The test's fresh database through PgBouncer, marked ``pooler=transaction``."""
    return pgbouncer.url(_name(database_url))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("tls"))


async def _until(check: Any, what: str) -> None:
    """Await ``check()`` until it is true (guarded against a hang, not a measurement)."""
    try:
        async with asyncio.timeout(GUARD):
            while not await check():  # noqa: ASYNC110 -- polling a database: no event to await
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


async def _docs(store: ProjectionStore) -> tuple[list[bytes], list[bytes]]:
    agents = sorted([doc async for doc in store.all_agent_docs()])
    grants = sorted([doc async for doc in store.all_grant_docs()])
    return agents, grants


async def _memory_fold(ledger: PostgresLedgerReader) -> tuple[list[bytes], list[bytes]]:
    memory = MemoryProjectionStore()
    await Projector(ledger, memory, CONFIG).rebuild()
    return await _docs(memory)


# -- PgBouncer: the proof that the tests go through it ---------------------------------


async def _second_call_on_another_server(url: str, pgbouncer: PgBouncer) -> tuple[int, int]:
    """Run one statement twice on the single connection of the ledger's own pool on
    ``url`` (``create_pool``), the second time forced onto another of PgBouncer's server
    connections: every one is held in a transaction by another client, then one that
    did not run the first call is let go. Returns both calls' backend pids."""
    pool = await create_pool(url, 1)
    holders: list[asyncpg.Connection] = []
    try:
        first = await pool.fetchval(PID)
        for _ in range(pgbouncer.pool_size):
            holder = await asyncpg.connect(**connect_kwargs(pgbouncer.url(_name(url))))
            holders.append(holder)
            await holder.execute("BEGIN")
        pids = [await holder.fetchval(PID) for holder in holders]
        assert first in pids
        assert len(set(pids)) == pgbouncer.pool_size  # every server connection held
        freed = pids.index(next(pid for pid in pids if pid != first))
        await holders[freed].execute("COMMIT")
        second = await pool.fetchval(PID)
        return first, second
    finally:
        for holder in holders:
            await holder.close()
        await pool.close()


async def test_through_pgbouncer_the_statement_cache_fails_and_pooler_transaction_fixes_it(
    pgbouncer: PgBouncer, database_url: str
) -> None:
    name = _name(database_url)
    # Without the setting, asyncpg reuses a statement it prepared on a server connection
    # that the next transaction does not get: PostgreSQL does not know it there.
    with pytest.raises(asyncpg.exceptions.InvalidSQLStatementNameError, match="does not exist"):
        await _second_call_on_another_server(pgbouncer.url(name, pooler=False), pgbouncer)
    # With ?pooler=transaction the same two calls work, on two server connections.
    first, second = await _second_call_on_another_server(pgbouncer.url(name), pgbouncer)
    assert first != second


# -- PgBouncer: the ledger, handshakes, the projector ----------------------------------


async def test_the_ledger_appends_reads_proves_and_verifies_through_pgbouncer(
    pooled_url: str, database_url: str, ledger_key: SigningKey
) -> None:
    clock = ManualClock()
    ledger = await PostgresEventStore.open(pooled_url, ledger_key, clock=clock, pool_size=8)
    try:
        agents = await random_history(ledger, clock, seed=11, steps=60)
        # Many appenders at once: batches share commits over few server connections.
        reports = [
            ledger.append([agents[i % len(agents)].signal(agents[(i + 1) % len(agents)].did)])
            for i in range(120)
        ]
        results = await asyncio.gather(*reports)
        assert len({p for r in results for p in r.positions}) == 120
        await ledger.checkpoint()
        head = await ledger.head()
        entries = [e async for e in ledger.iter_entries()]
        assert [e.position for e in entries] == list(range(1, head.position + 1))
        mine = await ledger.read_agent(agents[0].did, 0, 1000)
        assert mine
        assert all(agents[0].did in (e.actor, *e.subjects) for e in mine)
        proof = await ledger.inclusion_proof(5, head.position)
        assert proof
        assert await ledger.consistency_proof(10, head.position)
        report = await verify_ledger(
            ledger, ledger_key.public, anchors=PostgresRetentionStore(ledger.pool)
        )
        assert report.entries == head.position

        # Handshake challenges live in the ledger's pool: through PgBouncer too.
        handshakes = PostgresHandshakeStore(ledger.pool)
        challenge = await handshakes.create(agents[0].did, agents[1].did, None, clock.now)
        assert challenge is not None
        assert await handshakes.get(challenge.handshake_id) == challenge
        assert await handshakes.consume(challenge.handshake_id, clock.now)
        assert not await handshakes.consume(challenge.handshake_id, clock.now)
    finally:
        await ledger.close()
    # What went through the pooler is what a direct session reads.
    direct = await PostgresLedgerReader.connect(database_url, 1)
    try:
        assert [e.entry_hash for e in await direct.read(0, 10_000)] == [
            e.entry_hash for e in entries
        ]
    finally:
        await direct.close()


async def test_the_projector_writes_the_postgres_store_through_pgbouncer(
    pooled_url: str, database_url: str, ledger_key: SigningKey
) -> None:
    clock = ManualClock()
    ledger = await PostgresEventStore.open(pooled_url, ledger_key, clock=clock)
    reader = await PostgresLedgerReader.connect(pooled_url)
    store = await PostgresProjectionStore.connect(
        pooled_url, uuid.uuid4().hex[:8], listen_url=database_url
    )
    stop = asyncio.Event()
    # A poll of an hour: only the LISTEN on the direct session can wake it in this test.
    projector = Projector(reader, store, CONFIG, poll_interval=3600)
    task = asyncio.create_task(project_while_leader(projector, database_url, stop))
    changes = store.changes()
    try:
        agents = await random_history(ledger, clock, seed=3, steps=40)

        async def caught_up() -> bool:
            meta = await store.meta()
            return meta is not None and meta.position == (await ledger.head()).position

        await _until(caught_up, "the projector reached the head")
        assert await _docs(store) == await _memory_fold(ledger)

        # Change notifications come over the direct session's LISTEN.
        assert await asyncio.wait_for(anext(changes), GUARD) == SUBSCRIBED
        first = asyncio.ensure_future(anext(changes))
        await ledger.append([agents[0].violation(subject=agents[1].did)])
        await _until(caught_up, "the projector was woken by LISTEN and caught up")
        change: Change = await asyncio.wait_for(first, GUARD)
        assert change.position == (await ledger.head()).position
        assert await _docs(store) == await _memory_fold(ledger)
    finally:
        stop.set()
        await asyncio.wait_for(task, GUARD)
        await changes.aclose()
        await store.close()
        await reader.close()
        await ledger.close()


async def test_what_needs_a_session_refuses_a_pooled_url(
    pooled_url: str, database_url: str, ledger_key: SigningKey
) -> None:
    reader = await PostgresLedgerReader.connect(pooled_url, 1)
    store = await PostgresProjectionStore.connect(pooled_url, "x")  # no direct URL given
    try:
        projector = Projector(reader, store, CONFIG)
        with pytest.raises(ValueError, match="direct session"):
            await project_while_leader(projector, pooled_url, asyncio.Event())
        with pytest.raises(ReadStoreError, match="AGENTMESH_DATABASE_DIRECT_URL"):
            await anext(store.changes())
        with pytest.raises(ValueError, match="direct connection"):
            sqlalchemy_url(pooled_url)
    finally:
        await store.close()
        await reader.close()
    # Start-up says which key is missing, before anything runs.
    settings = Settings.from_env(
        {
            "AGENTMESH_DATABASE_URL": pooled_url,
            "AGENTMESH_STORAGE_BACKEND": "postgres",
            "AGENTMESH_AGENT_PRIVATE_KEY": ledger_key.private_key_pem(),
            "AGENTMESH_PROJECTOR_METRICS_PORT": "0",
        }
    )
    with pytest.raises(ConfigError, match=r"^AGENTMESH_DATABASE_DIRECT_URL: required because"):
        await run_projector(settings)
    with pytest.raises(ConfigError, match=r"^AGENTMESH_DATABASE_DIRECT_URL: required because"):
        await open_api_context(settings)
    with pytest.raises(ConfigError, match=r"^AGENTMESH_DATABASE_DIRECT_URL: expected a direct"):
        Settings.from_env({"AGENTMESH_DATABASE_DIRECT_URL": pooled_url})
    with pytest.raises(ConfigError, match=r"^AGENTMESH_DATABASE_URL: expected pooler="):
        Settings.from_env({"AGENTMESH_DATABASE_URL": database_url + "?pooler=statement"})


async def test_retention_runs_through_pgbouncer(
    pooled_url: str, ledger: PostgresEventStore, ledger_key: SigningKey, clock: ManualClock
) -> None:
    await long_history(ledger, clock)  # ~125 days, written directly
    await ledger.checkpoint()
    settings = Settings.from_env(
        {
            "AGENTMESH_DATABASE_URL": pooled_url,
            "AGENTMESH_AGENT_PRIVATE_KEY": ledger_key.private_key_pem(),
            "AGENTMESH_STORAGE_BACKEND": "memory",
        }
    )
    message = await run_retention(settings, dry_run=False, clock=clock)
    assert message.startswith("retention applied")
    reader = await PostgresLedgerReader.connect(pooled_url, 2)
    try:
        first = await reader.first_position()
        assert first is not None
        assert first > 1
        report = await verify_ledger(
            reader,
            ledger_key.public,
            anchors=PostgresRetentionStore(reader.pool),
            from_position=first,
        )
        assert report.last_position == (await reader.head()).position
    finally:
        await reader.close()


# -- the API through PgBouncer, with a read replica URL --------------------------------


async def _copy_database(postgres: EmbeddedPostgres, source: str) -> str:
    """A copy of ``source`` as it is now: a replica that stopped replaying here."""
    name = "r_" + uuid.uuid4().hex[:12]
    conn = await asyncpg.connect(postgres.url)
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE {_name(source)}")
    finally:
        await conn.close()
    return name


async def test_the_api_runs_through_pgbouncer_and_reads_history_from_the_read_url(
    postgres: EmbeddedPostgres,
    pgbouncer: PgBouncer,
    database_url: str,
    ledger_key: SigningKey,
) -> None:
    # The primary's first events, then a "replica" frozen at that point.
    ledger = await PostgresEventStore.open(database_url, ledger_key)
    try:
        old = await register(ledger, Agent())
        frozen = (await ledger.head()).position
    finally:
        await ledger.close()
    replica = await _copy_database(postgres, database_url)
    settings = Settings.from_env(
        {
            "AGENTMESH_DATABASE_URL": pgbouncer.url(_name(database_url)),
            "AGENTMESH_DATABASE_READ_URL": pgbouncer.url(replica),
            "AGENTMESH_STORAGE_BACKEND": "memory",  # projector in the API, woken by its poll
            "AGENTMESH_AGENT_PRIVATE_KEY": ledger_key.private_key_pem(),
            "AGENTMESH_ADMIN_TOKEN": ADMIN_TOKEN,
            "AGENTMESH_LOG_LEVEL": "WARNING",
            "AGENTMESH_METRICS_PORT": "0",
        }
    )
    async with running_api(settings, ManualClock(now=datetime.now(UTC))) as api:
        new = await api.register()  # appended through PgBouncer, projected
        # A handshake: challenges stored and consumed through PgBouncer, then appended.
        request = handshake_request(old, new.did, api.clock.now)
        started = await api.client.post("/v1/handshakes", json=request)
        assert started.status_code == 201, started.text
        challenge = started.json()
        signature = b64encode(new.key.sign(base64.b64decode(challenge["to_sign"])))
        answer = await api.client.post(
            f"/v1/handshakes/{challenge['handshake_id']}/response", json={"signature": signature}
        )
        assert answer.status_code == 200, answer.text
        head = await api.head()
        assert head > frozen  # the head is the primary's

        # Listings and ?at= come from the read URL: the replica has not seen `new`.
        listed = (await api.client.get("/v1/ledger/events", headers=ADMIN)).json()
        assert [e["position"] for e in listed["items"]] == list(range(1, frozen + 1))
        assert (await api.client.get(f"/v1/agents/{new.did}/events")).json()["items"] == []
        assert (await api.client.get(f"/v1/agents/{old.did}/events")).json()["items"]
        now = format_time(api.clock.now)
        assert (await api.client.get(f"/v1/agents/{old.did}/trust?at={now}")).status_code == 200
        late = await api.client.get(f"/v1/agents/{new.did}/trust?at={now}")
        assert late.status_code == 404, late.text
        # The current trust (projections) and the head (the primary) know `new`.
        assert (await api.client.get(f"/v1/agents/{new.did}/trust")).status_code == 200

    # The CLI's lagging reads (exports, replay, verify) open the same URL.
    history = await open_history_reader(settings, 1)
    try:
        assert (await history.head()).position == frozen
    finally:
        await history.close()


# -- Redis: password and TLS -------------------------------------------------------------


@pytest.fixture
async def tls_redis(tmp_path: Path, tls: Tls) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", password="s3cret-redis", tls=tls).start()
    try:
        yield server
    finally:
        server.stop()


def _redis_env(server: RedisServer, **extra: str) -> dict[str, str]:
    assert server.tls is not None
    assert server.password is not None
    return {
        "AGENTMESH_STORAGE_BACKEND": "redis",
        "AGENTMESH_REDIS_HOST": "127.0.0.1",
        "AGENTMESH_REDIS_PORT": str(server.port),
        "AGENTMESH_REDIS_PASSWORD": server.password,
        "AGENTMESH_REDIS_TLS": "true",
        "AGENTMESH_REDIS_TLS_CA_FILE": str(server.tls.ca),
        "AGENTMESH_REDIS_PREFIX": f"t{uuid.uuid4().hex[:8]}:",
        **extra,
    }


async def test_the_redis_store_with_a_password_over_tls(
    tls_redis: RedisServer, ledger: PostgresEventStore, clock: ManualClock, tmp_path: Path
) -> None:
    store = ledger
    agents = await random_history(store, clock, seed=7, steps=40)
    settings = Settings.from_env(_redis_env(tls_redis))
    read_store = await open_projection_store(settings)
    changes = read_store.changes()
    try:
        projector = Projector(store, read_store, CONFIG)
        progress = await projector.load()
        assert await _docs(read_store) == await _memory_fold(store)
        assert await asyncio.wait_for(anext(changes), GUARD) == SUBSCRIBED  # over TLS too
        first = asyncio.ensure_future(anext(changes))
        await store.append([agents[0].violation(subject=agents[2].did)])
        await projector.catch_up(progress)
        change = await asyncio.wait_for(first, GUARD)
        assert change.position == (await store.head()).position
        assert await _docs(read_store) == await _memory_fold(store)
    finally:
        await changes.aclose()
        await read_store.close()

    # The store verifies the server's certificate: one from another CA is refused.
    other_ca = make_tls(tmp_path / "other", "other").ca
    wrong = _redis_env(tls_redis, AGENTMESH_REDIS_TLS_CA_FILE=str(other_ca))
    refused = await open_projection_store(Settings.from_env(wrong))
    try:
        with pytest.raises(ReadStoreError, match="certificate verify failed"):
            await refused.meta()
    finally:
        await refused.close()
    # And the server demands the rest (asked once, without redis-py's retries).
    assert tls_redis.password is not None
    no_retry = Retry(NoBackoff(), 0)
    without = {"no password": (None, tls_redis.tls), "plain TCP": (tls_redis.password, None)}
    for case, (password, tls) in without.items():
        client = redis.Redis(
            host="127.0.0.1",
            port=tls_redis.port,
            password=password,
            ssl=tls is not None,
            ssl_ca_certs=None if tls is None else str(tls.ca),
            retry=no_retry,
            socket_timeout=5,
        )
        with client, pytest.raises(redis.ConnectionError):  # AuthenticationError is one
            client.ping()
        del case


# -- Redis: Sentinel failover ----------------------------------------------------------


async def _leader() -> bool:
    return True


@contextlib.asynccontextmanager
async def _projecting(projector: Projector) -> AsyncIterator[None]:
    """The projector's own loop (what ``serve projector`` runs while it leads)."""
    stop = asyncio.Event()
    task = asyncio.create_task(projector.project(stop, _leader))
    try:
        yield
    finally:
        stop.set()
        await task


async def _at_head(ledger: PostgresLedgerReader, read_store: ProjectionStore) -> None:
    """Until the read store holds the ledger's head."""
    head = (await ledger.head()).position

    async def there() -> bool:
        try:
            meta = await read_store.meta()
        except ReadStoreError:  # a read during the switch; the loop retries its own
            return False
        return meta is not None and meta.position == head

    await _until(there, f"the read store at the head ({head})")


def _failover_started(client: redis.Redis) -> bool:
    """Ask for the switch; False while the Sentinel does not yet hold the replica fit to
    promote (``NOGOODSLAVE``: its view of a replica it has just met is not fresh yet)."""
    try:
        return bool(client.execute_command("SENTINEL", "FAILOVER", "mymaster"))  # type: ignore[no-untyped-call]
    except redis.ResponseError as exc:
        if "NOGOODSLAVE" in str(exc):
            return False
        raise


def _replica_state(info: dict[str, Any]) -> str | None:
    replica = info.get("slave0")
    return replica.get("state") if isinstance(replica, dict) else None


@pytest.mark.parametrize("secure", [False, True], ids=["password", "password+tls"])
async def test_the_redis_store_follows_a_sentinel_failover(
    secure: bool, tmp_path: Path, tls: Tls, ledger: PostgresEventStore, clock: ManualClock
) -> None:
    store = ledger
    password = "s3cret-redis"
    use_tls = tls if secure else None
    master = RedisServer(tmp_path / "master", password=password, tls=use_tls)
    replica = RedisServer(tmp_path / "replica", password=password, tls=use_tls)
    sentinel: RedisSentinel | None = None
    read_store: ProjectionStore | None = None
    try:
        master.start()
        replica.replica_of = master.port
        replica.start()
        with master.client() as client:
            wait_until(
                lambda: _replica_state(client.info("replication")) == "online",
                "the replica is in sync",
            )
        sentinel = RedisSentinel(
            tmp_path / "sentinel", master.port, password=password, tls=use_tls
        ).start()
        with sentinel.client() as client:
            wait_until(
                lambda: len(client.execute_command("SENTINEL", "REPLICAS", "mymaster")) == 1,
                "the sentinel knows the replica",
            )
        env = {
            "AGENTMESH_STORAGE_BACKEND": "redis",
            "AGENTMESH_REDIS_SENTINELS": f"127.0.0.1:{sentinel.port}",
            "AGENTMESH_REDIS_SENTINEL_MASTER": "mymaster",
            "AGENTMESH_REDIS_PASSWORD": password,
            "AGENTMESH_REDIS_PREFIX": f"t{uuid.uuid4().hex[:8]}:",
        }
        if secure:
            env |= {"AGENTMESH_REDIS_TLS": "true", "AGENTMESH_REDIS_TLS_CA_FILE": str(tls.ca)}
        read_store = await open_projection_store(Settings.from_env(env))

        agents = await random_history(store, clock, seed=13, steps=30)
        projector = Projector(store, read_store, CONFIG, poll_interval=0.2)
        progress = await projector.load()
        assert await _docs(read_store) == await _memory_fold(store)
        changes = read_store.changes()  # what the API's cache and the sidecars follow
        assert await asyncio.wait_for(anext(changes), GUARD) == SUBSCRIBED
        subscribed = asyncio.ensure_future(anext(changes))
        await store.append([agents[2].signal(subject=agents[3].did)])
        await projector.catch_up(progress)
        assert (await asyncio.wait_for(subscribed, GUARD)).position == (await store.head()).position

        # Switch the master; the sentinel reconfigures the old one as a replica and
        # closes its clients, so the store's next commands go to the promoted one.
        with sentinel.client() as client:
            wait_until(lambda: _failover_started(client), "the sentinel accepted the failover")
        assert sentinel is not None
        watched = sentinel
        wait_until(lambda: watched.switched_to(replica.port), "the failover")
        with replica.client() as client:
            wait_until(
                lambda: client.info("replication")["role"] == "master", "the replica promoted"
            )

        # From here the projector's own loop: Redis replicates asynchronously, so the
        # promoted replica may lack the old master's last writes (on a starved machine
        # even the generation swapped in a second before); the compare-and-set then
        # refuses the next write and the loop re-applies from the ledger, the record.
        await store.append([agents[0].violation(subject=agents[1].did)])
        await store.append([agents[1].signal(subject=agents[2].did)])
        async with _projecting(projector):
            await _at_head(store, read_store)  # the writes reach the new master
        assert await _docs(read_store) == await _memory_fold(store)
        meta = await read_store.meta()
        assert meta is not None
        assert meta.position == (await store.head()).position
        prefix = env["AGENTMESH_REDIS_PREFIX"]
        with replica.client() as client:  # the promoted server holds the new position
            generation = client.get(prefix + "current")
            written = client.hget(f"{prefix}g:{generation}:meta", "position")
            assert written == str(meta.position)

        # The subscription follows too: on the old master until Sentinel demotes it and
        # closes its clients, then again on the new one, saying so (anything may have
        # changed meanwhile). A rebuild the loop may have made on the new master was
        # announced there while this subscription was still on the old one.
        async def resubscribed() -> None:
            while await anext(changes) != SUBSCRIBED:
                pass

        await asyncio.wait_for(resubscribed(), GUARD)
        await changes.aclose()
    finally:
        if read_store is not None:
            await read_store.close()
        for server in (sentinel, replica, master):
            if server is not None:
                server.stop()


async def test_writes_a_promoted_redis_never_got_are_applied_again(
    redis_server: EmbeddedRedis,
    ledger: PostgresEventStore,
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What a failover can leave, Redis replicating asynchronously: the new master
    holds the store as it was a few writes earlier (the same generation at an earlier
    position). The running projector's next write is refused by its compare-and-set;
    the loop loads what the store holds and applies the rest from the ledger — no
    rebuild, and nothing the ledger has is missing."""
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    read_store = RedisProjectionStore.connect(redis_server.host, redis_server.port, prefix=prefix)
    raw = redis.Redis(host=redis_server.host, port=redis_server.port)
    try:
        agents = await random_history(ledger, clock, seed=17, steps=20)
        projector = Projector(ledger, read_store, CONFIG, poll_interval=0.2)
        async with _projecting(projector):
            await _at_head(ledger, read_store)
            before = await read_store.meta()
            assert before is not None
            replica: dict[bytes, bytes] = {}  # what the replica got
            for key in raw.scan_iter(match=prefix + "*"):
                value = raw.dump(key)
                assert isinstance(value, bytes)
                replica[key] = value
            await ledger.append([agents[0].violation(subject=agents[1].did)])
            await ledger.append([agents[2].signal(subject=agents[3].did)])
            await _at_head(ledger, read_store)

            # The switch: the promoted server never got those two writes.
            raw.delete(*raw.scan_iter(match=prefix + "*"))
            for key, value in replica.items():
                raw.restore(key, 0, value)
            assert await read_store.meta() == before
            await ledger.append([agents[1].signal(subject=agents[0].did)])
            await _at_head(ledger, read_store)

        assert "read_store_moved" in caplog.messages  # the compare-and-set refused
        after = await read_store.meta()
        assert after is not None
        assert after.generation == before.generation  # caught up, not rebuilt
        assert await _docs(read_store) == await _memory_fold(ledger)
    finally:
        raw.close()
        await read_store.close()
