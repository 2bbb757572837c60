"""Change subscriptions, and reads, over a link whose server went silent.

A subscriber only listens: when its server disappears without a reset (a pod
rescheduled elsewhere leaves its old address answering nothing), it would wait
forever while every change passed it by, and the API's cache would keep what it
holds for its whole TTL. The read stores' ``changes`` ask a silent link for an
answer and give it up; the Redis store's commands give up a connection that does not
answer. Real Redis and PostgreSQL behind a TCP relay (``tests/relay_support.py``)
whose open connections are silenced.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

from agentmesh.embedded import EmbeddedRedis
from ledger.postgres import PostgresEventStore
from projections.cache import CachedStore
from projections.config import TrustConfig
from projections.documents import Change
from projections.projector import Projector
from projections.readstore import SUBSCRIBED, ProjectionStore, ReadStoreError
from projections.store_postgres import CHANNEL, PostgresProjectionStore
from projections.store_redis import RedisProjectionStore
from tests.relay_support import Relay
from tests.support import Agent, ManualClock, random_history, register

CONFIG = TrustConfig()
GUARD = 30.0  # seconds before a wait that should end gives up: a hang guard
HEARTBEAT = 0.3  # the subscribers' (5 s in service): a silent link is noticed in ~0.6 s


@dataclass
class Relayed:
    """A read store reached through ``relay`` (the subscriber) and the same store
    reached directly (the projector's side)."""

    through: RedisProjectionStore | PostgresProjectionStore
    direct: ProjectionStore
    relay: Relay
    publish_raw: Callable[[bytes], Awaitable[object]]  # anything, on the store's channel


@contextlib.asynccontextmanager
async def _closing(each: Relayed) -> AsyncIterator[Relayed]:
    """``each`` with the subscribers' heartbeat, all of it closed on exit."""
    each.through.heartbeat = HEARTBEAT
    try:
        yield each
    finally:
        await each.through.close()
        await each.direct.close()
        await each.relay.close()


@contextlib.asynccontextmanager
async def _relayed_redis(redis_server: EmbeddedRedis) -> AsyncIterator[Relayed]:
    relay = await Relay(redis_server.port).start()
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    through = RedisProjectionStore.connect(
        relay.host, relay.port, prefix=prefix, command_timeout=1.0
    )
    direct = RedisProjectionStore.connect(redis_server.host, redis_server.port, prefix=prefix)
    raw = aioredis.Redis(host=redis_server.host, port=redis_server.port)

    async def publish_raw(data: bytes) -> object:
        return await raw.publish(prefix + "changes", data)

    try:
        async with _closing(Relayed(through, direct, relay, publish_raw)) as each:
            yield each
    finally:
        await raw.aclose()


@contextlib.asynccontextmanager
async def _relayed_postgres(database_url: str) -> AsyncIterator[Relayed]:
    server = urlsplit(database_url)
    assert server.port is not None
    relay = await Relay(server.port).start()
    address = server.netloc.rpartition("@")[2]
    url = database_url.replace(f"@{address}/", f"@{relay.host}:{relay.port}/")
    name = uuid.uuid4().hex[:8]
    through = await PostgresProjectionStore.connect(url, name)
    direct = await PostgresProjectionStore.connect(database_url, name)

    async def publish_raw(data: bytes) -> object:
        conn = await asyncpg.connect(database_url)
        try:
            return await conn.execute(
                "SELECT pg_notify($1, $2)", f"{CHANNEL}_{name}", data.decode()
            )
        finally:
            await conn.close()

    async with _closing(Relayed(through, direct, relay, publish_raw)) as each:
        yield each


@pytest.fixture(params=["redis", "postgres"])
async def relayed(
    request: pytest.FixtureRequest, redis_server: EmbeddedRedis, database_url: str
) -> AsyncIterator[Relayed]:
    if request.param == "redis":
        opened = _relayed_redis(redis_server)
    else:
        opened = _relayed_postgres(database_url)
    async with opened as each:
        yield each


async def test_a_subscription_whose_server_went_silent_is_given_up(relayed: Relayed) -> None:
    changes = relayed.through.changes()
    try:
        assert await asyncio.wait_for(anext(changes), GUARD) == SUBSCRIBED
        await relayed.direct.publish(Change(5, frozenset({"did:mesh:a"})))
        assert await asyncio.wait_for(anext(changes), GUARD) == Change(5, frozenset({"did:mesh:a"}))
        assert relayed.relay.silence() >= 1
        await relayed.direct.publish(Change(6, None))  # passes the silent link by
        with pytest.raises(ReadStoreError, match="went silent"):
            await asyncio.wait_for(anext(changes), GUARD)
    finally:
        await asyncio.wait_for(changes.aclose(), GUARD)  # a silent link does not hold it up
    # A new subscription goes to the server's new address and hears again.
    again = relayed.through.changes()
    try:
        assert await asyncio.wait_for(anext(again), GUARD) == SUBSCRIBED
        await relayed.direct.publish(Change(7, None))
        assert await asyncio.wait_for(anext(again), GUARD) == Change(7, None)
    finally:
        await again.aclose()


async def test_a_change_that_cannot_be_read_drops_everything_and_goes_on(
    relayed: Relayed,
) -> None:
    """Anyone who may publish on the channel can send anything: what cannot be read
    says anything may have changed (the cache drops everything) and the subscription
    goes on; it neither ends the follower nor is passed over."""
    changes = relayed.through.changes()
    try:
        assert await asyncio.wait_for(anext(changes), GUARD) == SUBSCRIBED
        for junk in (b"not a change", b"[1, 2]", b'{"position": "x"}', b'{"agents": []}'):
            await relayed.publish_raw(junk)
            assert await asyncio.wait_for(anext(changes), GUARD) == Change(0, None)
        await relayed.direct.publish(Change(8, frozenset({"did:mesh:b"})))
        assert await asyncio.wait_for(anext(changes), GUARD) == Change(8, frozenset({"did:mesh:b"}))
    finally:
        await changes.aclose()


async def test_a_follower_stopping_on_a_silent_link_is_not_held_up(relayed: Relayed) -> None:
    """The API shutting down while its subscription's server is silent, before the
    silence is noticed: the goodbye (``UNLISTEN``) gets no answer and is cut short."""
    changes = relayed.through.changes()
    assert await asyncio.wait_for(anext(changes), GUARD) == SUBSCRIBED
    waiting = asyncio.ensure_future(anext(changes))
    await asyncio.sleep(0)
    relayed.relay.silence()
    waiting.cancel()
    await asyncio.wait_for(asyncio.gather(waiting, return_exceptions=True), GUARD)
    await asyncio.wait_for(changes.aclose(), GUARD)


async def test_an_idle_subscription_that_answers_is_kept(relayed: Relayed) -> None:
    """Silence alone is not death: a link that answers the heartbeat stays, however
    long nothing is published."""
    changes = relayed.through.changes()
    try:
        assert await asyncio.wait_for(anext(changes), GUARD) == SUBSCRIBED
        waiting = asyncio.ensure_future(anext(changes))
        await asyncio.sleep(HEARTBEAT * 8)  # many heartbeats
        assert not waiting.done()
        await relayed.direct.publish(Change(9, None))
        assert await asyncio.wait_for(waiting, GUARD) == Change(9, None)
    finally:
        await changes.aclose()


async def test_the_cache_behind_a_silent_subscription_catches_up(
    redis_server: EmbeddedRedis,
    ledger: PostgresEventStore,
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """End to end with Redis: the API's cache follows a subscription whose server
    went silent. The subscription is given up, the cache dropped and subscribed
    anew, and an agent registered meanwhile is found, not the cached "unknown" for
    300 s. Its reads, too, leave the silent connections for new ones."""
    async with _relayed_redis(redis_server) as each:
        cache = CachedStore(each.through, ttl=300)
        await random_history(ledger, clock, seed=41, steps=10)
        projector = Projector(ledger, each.direct, CONFIG)
        progress = await projector.load()  # its change is published before anyone listens
        watch = asyncio.create_task(cache.watch())
        try:
            newcomer = Agent()
            target = [newcomer.did]
            await _until(lambda: cache.last_change is not None, "subscribed")
            subscribed = cache.last_change
            assert await cache.agent_docs(target) == [None]  # unknown: kept up to 300 s
            each.relay.silence()
            await register(ledger, newcomer)
            await projector.catch_up(progress)  # published; the silent link never hears it
            now = await each.direct.agent_docs(target)
            assert now != [None]
            await _until(lambda: cache.last_change != subscribed, "subscribed anew")
            assert "change_subscription_lost" in caplog.messages  # given up, not woken
            assert await cache.agent_docs(target) == now
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)


async def test_a_redis_read_on_a_silent_connection_is_retried_on_a_new_one(
    redis_server: EmbeddedRedis,
) -> None:
    async with _relayed_redis(redis_server) as each:
        assert await each.through.meta() is None  # a pooled connection, through the relay
        assert each.relay.silence() >= 1
        # The command times out on the silent connection and is sent again on a new one.
        assert await asyncio.wait_for(each.through.meta(), GUARD) is None


async def _until(check: Callable[[], bool], what: str) -> None:
    """Poll ``check`` until it holds (a hang guard, not a measurement)."""
    for _ in range(int(GUARD / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")
