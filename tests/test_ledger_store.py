"""The event store against a real PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import pytest

from ledger.errors import (
    AppendRejectedError,
    ConcurrencyError,
    EventValidationError,
    IdempotencyConflictError,
    NotPermittedError,
    SignatureError,
)
from ledger.events import (
    AgentKeyRotated,
    AgentRegistered,
    AgentSuspended,
    PolicyViolation,
)
from ledger.identity import SigningKey
from ledger.signed import SignedEvent
from ledger.store import PostgresEventStore, partition_name
from ledger.timefmt import format_time
from tests.support import T0, Agent, ManualClock, register


async def positions(url: str) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        return [r[0] for r in await conn.fetch("SELECT position FROM events ORDER BY position")]
    finally:
        await conn.close()


async def test_concurrent_appenders_get_gap_free_positions_in_commit_order(
    database_url: str, ledger_key: SigningKey
) -> None:
    # Two stores = two connection pools, as two API replicas would have.
    stores = [await PostgresEventStore.open(database_url, ledger_key) for _ in range(2)]
    try:
        agents = [await register(stores[0]) for _ in range(16)]
        base = (await stores[0].head()).position
        per_task, done = 1000, asyncio.Event()
        seen: list[int] = []

        async def tail() -> None:
            async for batch in stores[1].follow(after=base, batch=500, poll_interval=0.2):
                seen.extend(r.position for r in batch)
                if len(seen) == 16 * per_task:
                    done.set()
                    return

        async def appender(index: int) -> None:
            store, agent = stores[index % 2], agents[index]
            for _ in range(per_task):
                await store.append([agent.violation(severity="low")])

        reader = asyncio.create_task(tail())
        await asyncio.gather(*(appender(i) for i in range(16)))
        await asyncio.wait_for(done.wait(), 30)
        await reader
        total = base + 16 * per_task
        assert seen == list(range(base + 1, total + 1))  # never a gap, never a reorder
        assert await positions(database_url) == list(range(1, total + 1))
    finally:
        for store in stores:
            await store.close()


async def test_optimistic_concurrency(store: PostgresEventStore) -> None:
    agent = await register(store)
    stream = f"agent:{agent.did}"
    result = await store.append([agent.violation()], expected_version=1)
    assert (result.stream_id, result.stream_version) == (stream, 2)
    with pytest.raises(ConcurrencyError) as info:
        await store.append([agent.violation()], expected_version=1)
    assert (info.value.expected, info.value.actual) == (1, 2)
    assert (await store.head()).position == 2


async def test_idempotent_retry_returns_original_positions(store: PostgresEventStore) -> None:
    agent = await register(store)
    events = [agent.violation(), agent.violation(severity="high")]
    first = await store.append(events, idempotency_key="report-1")
    again = await store.append(events, idempotency_key="report-1")
    assert first.positions == again.positions == (2, 3)
    assert again.duplicate
    assert not first.duplicate
    assert (await store.head()).position == 3
    with pytest.raises(IdempotencyConflictError):
        await store.append([agent.violation(severity="low")], idempotency_key="report-1")
    assert (await store.head()).position == 3


async def test_idempotency_within_one_group_commit(store: PostgresEventStore) -> None:
    agent = await register(store)
    event = agent.violation()
    results = await asyncio.gather(
        *(store.append([event], idempotency_key="same") for _ in range(10))
    )
    assert {r.positions for r in results} == {(2,)}
    assert sum(not r.duplicate for r in results) == 1
    assert (await store.head()).position == 2


async def test_forged_wrong_key_and_unknown_signatures_are_rejected(
    store: PostgresEventStore,
) -> None:
    agent = await register(store)
    head = await store.head()
    good = agent.violation()
    forged = SignedEvent(body=good.body, signature=bytes(64), event=good.event)
    impostor = SigningKey.generate()
    wrong_key = SignedEvent(body=good.body, signature=impostor.sign(good.body), event=good.event)
    unknown = Agent().violation()
    for bad in (forged, wrong_key, unknown):
        with pytest.raises(SignatureError):
            await store.append([bad])
    # A bad event poisons its whole append, and nothing else.
    with pytest.raises(SignatureError):
        await store.append([good, forged])
    assert await store.head() == head


def test_missing_and_malformed_signatures_are_rejected_on_the_wire() -> None:
    agent = Agent()
    body = {
        "type": "policy.violation",
        "actor": agent.did,
        "occurred_at": format_time(T0),
        "agent": agent.did,
        "severity": "low",
        "rule": "r",
    }
    with pytest.raises(SignatureError):
        SignedEvent.from_wire(body, "")
    with pytest.raises(SignatureError):
        SignedEvent.from_wire(body, "not base64!")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"type": "agent.exploded", "actor": "did:mesh:" + "a" * 32}, "unknown event type"),
        ({"type": "policy.violation", "actor": "did:mesh:" + "a" * 32}, "invalid"),
        (
            {
                "type": "policy.violation",
                "actor": "did:mesh:" + "a" * 32,
                "occurred_at": format_time(T0),
                "agent": "did:mesh:" + "a" * 32,
                "severity": "apocalyptic",
                "rule": "r",
            },
            "severity",
        ),
        (
            {
                "type": "trust.signal",
                "actor": "nobody",
                "occurred_at": format_time(T0),
                "agent": "did:mesh:" + "a" * 32,
                "signal": "s",
            },
            "actor",
        ),
        (
            {
                "type": "trust.signal",
                "actor": "did:mesh:" + "a" * 32,
                "occurred_at": format_time(T0),
                "agent": "did:mesh:" + "a" * 32,
                "signal": "s",
                "extra": 1,
            },
            "extra",
        ),
    ],
)
def test_unknown_types_and_malformed_payloads(body: dict[str, object], message: str) -> None:
    with pytest.raises(EventValidationError, match=message):
        SignedEvent.from_wire(body, "A" * 86 + "==")


async def test_ledger_only_events_need_the_ledger_key(store: PostgresEventStore) -> None:
    agent = await register(store)
    event = AgentSuspended(actor=agent.did, occurred_at=format_time(T0), did=agent.did)
    with pytest.raises(NotPermittedError, match="only be signed by the ledger"):
        await store.append([SignedEvent.create(event, agent.key)])


async def test_registration_rules(store: PostgresEventStore) -> None:
    # Self-registration: the first agent of an empty ledger proves possession of its key.
    newcomer = Agent()
    own = AgentRegistered(
        actor=newcomer.did,
        occurred_at=format_time(T0),
        did=newcomer.did,
        public_key=newcomer.key.public.pem(),
    )
    await store.append([SignedEvent.create(own, newcomer.key)])
    assert await store.current_key(newcomer.did) == newcomer.key.public
    agent = await register(store)
    with pytest.raises(AppendRejectedError, match="already registered"):
        await register(store, agent)
    other = Agent()
    mismatched = AgentRegistered(
        actor=store.ledger_did,
        occurred_at=format_time(T0),
        did=other.did,
        public_key=agent.key.public.pem(),
    )
    with pytest.raises(AppendRejectedError, match="belongs to"):
        await store.append_own(mismatched)
    # Once the ledger holds a registration, nobody registers itself any more.
    late = Agent()
    own = AgentRegistered(
        actor=late.did, occurred_at=format_time(T0), did=late.did, public_key=late.key.public.pem()
    )
    with pytest.raises(NotPermittedError, match="first agent"):
        await store.append([SignedEvent.create(own, late.key)])
    assert await store.current_key(late.did) is None


async def test_key_rotation_retires_the_old_key(store: PostgresEventStore) -> None:
    agent = await register(store)
    new_key = SigningKey.generate()
    rotation = AgentKeyRotated(
        actor=agent.did, occurred_at=format_time(T0), did=agent.did, public_key=new_key.public.pem()
    )
    with pytest.raises(SignatureError, match="needs proof"):  # no proof of the new key
        await store.append([SignedEvent.create(rotation, agent.key)])
    await store.append([SignedEvent.rotation(rotation, agent.key, new_key)])
    with pytest.raises(SignatureError):
        await store.append([agent.violation()])  # signed with the retired key
    event = PolicyViolation(
        actor=agent.did, occurred_at=format_time(T0), agent=agent.did, severity="low", rule="r"
    )
    await store.append([SignedEvent.create(event, new_key)])
    assert (await store.current_key(agent.did)) == new_key.public


async def test_key_rotation_seen_by_another_process(
    database_url: str, ledger_key: SigningKey
) -> None:
    first = await PostgresEventStore.open(database_url, ledger_key)
    second = await PostgresEventStore.open(database_url, ledger_key)
    try:
        agent = await register(first)
        await second.append([agent.violation()])  # `second` caches the old key now
        new_key = SigningKey.generate()
        rotation = AgentKeyRotated(
            actor=agent.did,
            occurred_at=format_time(T0),
            did=agent.did,
            public_key=new_key.public.pem(),
        )
        await first.append([SignedEvent.rotation(rotation, agent.key, new_key)])
        # The stale cache must not let the retired key through: checked under the lock.
        with pytest.raises(SignatureError, match="current key"):
            await second.append([agent.violation()])
        event = PolicyViolation(
            actor=agent.did, occurred_at=format_time(T0), agent=agent.did, severity="low", rule="r"
        )
        await second.append([SignedEvent.create(event, new_key)])
    finally:
        await first.close()
        await second.close()


async def test_events_about_unregistered_agents_are_rejected(store: PostgresEventStore) -> None:
    reporter = await register(store)
    with pytest.raises(AppendRejectedError, match="not registered"):
        await store.append([reporter.violation(subject=Agent().did)])


async def test_time_partitions_and_monotonic_recorded_at(
    database_url: str, ledger_key: SigningKey
) -> None:
    clock = ManualClock()
    store = await PostgresEventStore.open(database_url, ledger_key, clock=clock)
    try:
        agent = await register(store)
        clock.advance(days=3)
        await store.append([agent.violation()])
        clock.advance(days=-10)  # a clock that jumps back never reorders the ledger
        await store.append([agent.violation()])
        entries = await store.read()
        assert [e.recorded_at for e in entries] == sorted(e.recorded_at for e in entries)
        conn = await asyncpg.connect(database_url)
        try:
            parts = await conn.fetch(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'events'::regclass ORDER BY 1"
            )
        finally:
            await conn.close()
        assert [p[0] for p in parts] == [partition_name(T0), partition_name(T0 + timedelta(3))]
    finally:
        await store.close()


async def test_checkpoints_every_n_events_and_on_demand(
    database_url: str, ledger_key: SigningKey
) -> None:
    store = await PostgresEventStore.open(database_url, ledger_key, checkpoint_every=5)
    try:
        agent = await register(store)
        for _ in range(11):
            await store.append([agent.violation()])
        auto = await store.checkpoints()
        assert auto
        assert all(c.signer == ledger_key.did for c in auto)
        assert auto[-1].position >= 10
        manual = await store.checkpoint()
        assert manual.position == 12
        assert (await store.latest_checkpoint()) == manual
        assert await store.checkpoint() == manual  # idempotent per position
    finally:
        await store.close()


async def test_follow_is_woken_by_notify(store: PostgresEventStore) -> None:
    agent = await register(store)
    received: asyncio.Queue[int] = asyncio.Queue()

    async def tail() -> None:
        async for batch in store.follow(after=1, poll_interval=30):
            for record in batch:
                await received.put(record.position)

    task = asyncio.create_task(tail())
    try:
        await asyncio.sleep(0.2)
        await store.append([agent.violation()])
        # With a 30 s poll, only NOTIFY can deliver this within 5 s.
        assert await asyncio.wait_for(received.get(), 5) == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_read_agent_returns_events_it_signed_or_is_about(
    store: PostgresEventStore,
) -> None:
    alice, bob = await register(store), await register(store)
    await store.append([alice.violation(subject=bob.did)])
    await store.append([alice.signal(subject=bob.did)])
    about_bob = await store.read_agent(bob.did)
    assert [e.event_type for e in about_bob] == [
        "agent.registered",
        "policy.violation",
        "trust.signal",
    ]
    assert [e.position for e in await store.read_agent(alice.did)] == [1, 3, 4]
