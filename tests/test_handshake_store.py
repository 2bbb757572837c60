"""The handshake store's contract: one suite over every adapter of
``api.handshakes.HandshakeStore`` (memory, and PostgreSQL for real), as the
ledger and the read stores have theirs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from api.handshakes import CHALLENGE_TTL, HandshakeStore
from api.handshakes_memory import MemoryHandshakeStore
from api.handshakes_postgres import PostgresHandshakeStore
from ledger.errors import StoreUnavailableError
from tests.support import T0, Agent


@pytest.fixture(params=["memory", "postgres"])
async def handshakes(
    request: pytest.FixtureRequest, database_url: str
) -> AsyncIterator[HandshakeStore]:
    if request.param == "memory":
        yield MemoryHandshakeStore()
        return
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        yield PostgresHandshakeStore(pool)
    finally:
        await pool.close()


async def test_a_challenge_is_stored_and_read_back(handshakes: HandshakeStore) -> None:
    initiator, responder = Agent(), Agent()
    challenge = await handshakes.create(initiator.did, responder.did, 600, T0)
    assert challenge is not None
    assert (challenge.initiator, challenge.responder, challenge.min_score) == (
        initiator.did,
        responder.did,
        600,
    )
    assert challenge.expires_at == T0 + CHALLENGE_TTL
    assert challenge.used_at is None
    assert await handshakes.get(challenge.handshake_id) == challenge
    assert await handshakes.get("hs_" + "0" * 24) is None


async def test_a_nonce_is_consumed_exactly_once(handshakes: HandshakeStore) -> None:
    challenge = await handshakes.create(Agent().did, Agent().did, None, T0)
    assert challenge is not None
    later = T0 + timedelta(seconds=5)
    consumed = await asyncio.gather(
        *(handshakes.consume(challenge.handshake_id, later) for _ in range(8))
    )
    assert sorted(consumed) == [False] * 7 + [True]
    stored = await handshakes.get(challenge.handshake_id)
    assert stored is not None
    assert stored.used_at == later
    assert not await handshakes.consume("hs_" + "1" * 24, later)


async def test_a_signed_request_starts_one_handshake(handshakes: HandshakeStore) -> None:
    initiator, responder = Agent(), Agent()
    first = await handshakes.create(initiator.did, responder.did, None, T0, "req-1")
    assert first is not None
    assert await handshakes.create(initiator.did, responder.did, None, T0, "req-1") is None
    other = await handshakes.create(initiator.did, responder.did, None, T0, "req-2")
    assert other is not None
    assert other.handshake_id != first.handshake_id
    # Another initiator's request of the same name is its own.
    assert await handshakes.create(responder.did, initiator.did, None, T0, "req-1") is not None


async def test_an_unreachable_database_is_named(database_url: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    store = PostgresHandshakeStore(pool)
    await pool.close()
    with pytest.raises(StoreUnavailableError, match="handshake"):
        await store.get("hs_" + "0" * 24)
