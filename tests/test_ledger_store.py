"""The event store against a real PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import asyncpg
import pytest

from ledger.chain import verify_checkpoint
from ledger.errors import (
    EventValidationError,
    NotPermittedError,
    ReplayError,
    SignatureError,
)
from ledger.events import (
    AgentKeyRotated,
    AgentSuspended,
    PolicyViolation,
)
from ledger.identity import SigningKey
from ledger.postgres import PostgresEventStore, PostgresLedgerReader, partition_name, signers
from ledger.postgres import store as store_module
from ledger.postgres.store import TURN_LOCK, TURN_WAIT_SECONDS
from ledger.signed import SignedEvent
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


async def test_processes_take_turns_and_never_race_for_the_head(
    database_url: str, ledger_key: SigningKey
) -> None:
    """Two stores appending at once take turns on the ledger (an advisory lock): each
    turn's batches pass the head guard — none is written in vain — and both get turns;
    an idle holder lets go, so a lone append of the other never waits for long."""
    stores = [await PostgresEventStore.open(database_url, ledger_key) for _ in range(2)]
    try:
        agents = [await register(stores[0]) for _ in range(8)]

        async def appender(index: int) -> None:
            store, agent = stores[index % 2], agents[index]
            for _ in range(150):
                await store.append([agent.violation(severity="low")])

        await asyncio.gather(*(appender(i) for i in range(8)))
        assert [s.turn_counts["missed"] for s in stores] == [0, 0]
        assert sum(s.turn_counts["waited"] for s in stores) > 0
        assert sum(s.turn_counts["caught_up"] for s in stores) > 0
        # Under contention a holder hands the ledger over after a commit that leaves its
        # queue empty, rather than keep it for the whole turn.
        assert sum(s.turn_counts["handed"] for s in stores) > 0, [s.turn_counts for s in stores]
        # A process's first commit of the day takes the lock (it makes sure of the day's
        # partition); none other needs it.
        assert all(s.commit_paths["locked"] <= 1 for s in stores), [s.commit_paths for s in stores]
        # Both idle now: whichever held the ledger lets go, and each can append alone.
        for store in stores:
            await asyncio.wait_for(store.append([agents[0].violation(severity="low")]), 10)
        total = (await stores[0].head()).position
        assert await positions(database_url) == list(range(1, total + 1))
    finally:
        for store in stores:
            await store.close()


async def test_a_refused_write_that_was_to_hand_the_turn_over_lets_the_turn_go(
    database_url: str, ledger_key: SigningKey
) -> None:
    """Under contention a holder hands the turn over inside its write; when that write
    fails (a replayed body's single-use id: the unique key is checked after the
    hand-over ran), the hand-over's answer is lost: the process lets the turn go
    rather than guess, the replay is refused, the head stays, and both processes go
    on appending without a lost race."""
    first = await PostgresEventStore.open(database_url, ledger_key)
    second = await PostgresEventStore.open(database_url, ledger_key)
    try:
        agent = await register(first)
        original = agent.violation(severity="low")
        await first.append([original])
        await second.append([agent.violation(severity="low")])  # `first` will wait for it
        head = await first.head()
        with pytest.raises(ReplayError):
            await first.append([original])  # its own turn, contended: the write hands over
        assert first.turn_counts["dropped"] == 1, first.turn_counts
        assert await first.head() == head
        for store in (first, second, first):
            await asyncio.wait_for(store.append([agent.violation(severity="low")]), 10)
        assert [s.turn_counts["missed"] for s in (first, second)] == [0, 0]
        total = (await first.head()).position
        assert await positions(database_url) == list(range(1, total + 1))
    finally:
        await first.close()
        await second.close()


async def test_a_holder_that_never_lets_go_does_not_stall_the_others(
    database_url: str, ledger_key: SigningKey
) -> None:
    """A process that holds the turn lock and does nothing (frozen, or its node gone
    with its connection left open): another's append waits at most TURN_WAIT_SECONDS
    for a turn, then commits without one (its guarded write), and its next appends do
    not wait again for a while."""
    holder = await asyncpg.connect(database_url)
    store = await PostgresEventStore.open(database_url, ledger_key)
    try:
        agent = await register(store)  # the first append: the turn is free
        await store.close()
        store = await PostgresEventStore.open(database_url, ledger_key)
        await holder.execute("SELECT pg_advisory_lock($1)", TURN_LOCK)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(store.append([agent.violation(severity="low")]), 30)
        assert store.turn_counts["timed_out"] == 1, store.turn_counts
        assert loop.time() - started >= TURN_WAIT_SECONDS  # it did wait for the turn first
        for _ in range(3):
            await asyncio.wait_for(store.append([agent.violation(severity="low")]), 30)
        assert store.turn_counts["timed_out"] == 1  # turns off for a while: no second wait
        total = (await store.head()).position
        assert await positions(database_url) == list(range(1, total + 1))
    finally:
        await holder.close()
        await store.close()


async def test_a_holder_frozen_with_the_head_locked_does_not_stall_the_others(
    database_url: str, ledger_key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process frozen inside the locked path (the head row locked, its transaction
    idle): PostgreSQL ends its session after HEAD_LOCK_IDLE_SECONDS, its transaction
    rolls back, and another's append, waiting on the head row, commits."""
    monkeypatch.setattr(store_module, "HEAD_LOCK_IDLE_SECONDS", 1.0)
    store = await PostgresEventStore.open(database_url, ledger_key)
    frozen = await asyncpg.connect(database_url)
    try:
        agent = await register(store)
        head = await store.head()
        await frozen.execute(store_module.lock_head_sql())  # then it never goes on
        loop = asyncio.get_running_loop()
        started = loop.time()
        appended = await asyncio.wait_for(store.append([agent.violation(severity="low")]), 15)
        assert loop.time() - started >= 0.9  # it did wait on the frozen holder's lock
        assert appended.positions == (head.position + 1,)
        # Its session was ended: asked of the server, as asyncpg reports a session
        # ended under it in more than one way (which depends on when it read the FATAL).
        await _backend_gone(database_url, frozen.get_server_pid())
        assert await positions(database_url) == list(range(1, head.position + 2))
    finally:
        frozen.terminate()
        await store.close()


async def _backend_gone(database_url: str, pid: int) -> None:
    """Until PostgreSQL no longer lists backend ``pid`` (a hang guard, not a timing)."""
    conn = await asyncpg.connect(database_url)
    try:
        for _ in range(300):
            if not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"backend {pid} was never ended")
    finally:
        await conn.close()


async def test_a_process_alone_never_offers_its_turn(store: PostgresEventStore) -> None:
    """With no other process appending, a commit is one round trip: the hand-over
    after a commit (one more) is asked only under contention."""
    agents = [await register(store) for _ in range(8)]

    async def appender(agent: Agent) -> None:
        for _ in range(40):
            await store.append([agent.violation(severity="low")])

    await asyncio.gather(*(appender(agent) for agent in agents))
    assert store.turn_counts["waited"] == 0
    assert store.turn_counts["offered"] == 0, store.turn_counts
    assert store.commit_paths["fast"] > 0


@pytest.mark.parametrize("inline", [0, 10_000], ids=["on-threads", "on-the-loop"])
async def test_forged_signatures_among_concurrent_appends_are_refused_either_way(
    store: PostgresEventStore, monkeypatch: pytest.MonkeyPatch, inline: int
) -> None:
    """Concurrent appends are verified as one batch, on worker threads or, below a
    size, on the loop: whichever way, each forged signature fails its own append and
    nothing else, and the head moves by the good ones only."""
    monkeypatch.setattr(signers, "_VERIFY_INLINE", inline)
    agents = [await register(store) for _ in range(4)]
    head = await store.head()
    batch = []
    for index in range(80):
        good = agents[index % 4].violation(severity="low")
        if index % 10 == 3:  # forged: a signature over another body
            batch.append(SignedEvent(body=good.body, signature=bytes(64), event=good.event))
        else:
            batch.append(good)
    results = await asyncio.gather(
        *(store.append([event]) for event in batch), return_exceptions=True
    )
    refused = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert refused == list(range(3, 80, 10))
    assert all(isinstance(results[i], SignatureError) for i in refused)
    assert (await store.head()).position == head.position + 72


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


async def test_an_agents_reads_are_planned_once_across_day_partitions(
    database_url: str, ledger_key: SigningKey
) -> None:
    """``read_agent`` and ``key_before`` search the ``subjects`` index of every day
    partition; planned per call they would plan each partition each time (over the
    90-day window's 91 partitions, ~13 ms of ~16). An agent's first page and its key
    entries run under one generic plan per connection, and every read answers what the
    plain queries answer, page by page."""
    clock = ManualClock()
    store = await PostgresEventStore.open(database_url, ledger_key, clock=clock)
    reader = await PostgresLedgerReader.connect(database_url, pool_size=1)
    try:
        agent, other = await register(store), await register(store)
        for _ in range(4):
            clock.advance(days=1)
            for event in (agent.violation(), other.violation(), other.signal(agent.did)):
                await store.append([event])
        head = (await store.head()).position
        conn = await asyncpg.connect(database_url)
        try:
            expected = [
                r[0]
                for r in await conn.fetch(
                    "SELECT position FROM events WHERE subjects @> ARRAY[$1]::text[] "
                    "ORDER BY position",
                    agent.did,
                )
            ]
            days = await conn.fetchval("SELECT count(*) FROM pg_inherits")
        finally:
            await conn.close()
        assert len(expected) == 9
        assert days >= 5
        for _ in range(3):
            paged, after = [], 0
            while page := await reader.read_agent(agent.did, after, 4):
                paged += [e.position for e in page]
                after = page[-1].position
            assert paged == expected
            assert await reader.key_before(agent.did, head + 1) == agent.key.public.raw
            assert await reader.key_before(agent.did, expected[0]) is None
        plans = await reader.pool.fetch(
            "SELECT statement LIKE '%OFFSET 0%' AS generic, generic_plans, custom_plans "
            "FROM pg_prepared_statements "
            "WHERE statement LIKE '%subjects @>%' AND statement NOT LIKE '%pg_prepared%'"
        )
        # The first page and the key entries under generic plans; the next pages (an
        # agent with more than a page) planned per call, free to stop at the page.
        assert sorted(
            (p["generic"], p["generic_plans"] > 0, p["custom_plans"] > 0) for p in plans
        ) == [
            (False, False, True),
            (True, True, False),
            (True, True, False),
        ], plans
    finally:
        await reader.close()
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


async def test_steady_appends_take_one_guarded_statement_and_still_refuse_replays(
    store: PostgresEventStore,
) -> None:
    """The one-round-trip path (checked against what this process committed last)
    answers replays and retries exactly as the locked path does."""
    agent = await register(store)
    for _ in range(5):
        await store.append([agent.violation(severity="low")])
    assert store.commit_paths["fast"] >= 4  # after the first, nothing new to learn
    event = agent.violation(severity="low")
    first = await store.append([event], idempotency_key="k-1")
    head = await store.head()
    retry = await store.append([event], idempotency_key="k-1")
    assert retry.duplicate
    assert retry.positions == first.positions
    with pytest.raises(ReplayError):
        await store.append([event])  # the same signed body, no key: a replay
    assert await store.head() == head


async def test_a_suspension_by_another_process_is_not_missed(
    database_url: str, ledger_key: SigningKey
) -> None:
    """A process's memory of the tables is void once another appends: the guarded
    write finds the head moved and the batch is decided again from the tables."""
    first = await PostgresEventStore.open(database_url, ledger_key)
    second = await PostgresEventStore.open(database_url, ledger_key)
    try:
        agent = await register(first)
        victim = await register(first)
        await first.append([agent.violation(severity="low")])
        await first.append([agent.violation(severity="low")])  # `first` knows agent: active
        await second.append_own(
            AgentSuspended(actor=ledger_key.did, occurred_at=format_time(T0), did=agent.did)
        )
        head = await first.head()
        with pytest.raises(NotPermittedError):
            await first.append([agent.signal(victim.did, "bad")])
        assert await first.head() == head
        # `first` waited for its turn and caught up on the suspension (it did not
        # forget everything it knew, nor learn it from a lost race).
        assert first.turn_counts["caught_up"] >= 1
        assert first.turn_counts["missed"] == 0
    finally:
        await first.close()
        await second.close()


async def test_a_missed_guard_is_decided_again_from_a_fresh_lookup(
    database_url: str, ledger_key: SigningKey
) -> None:
    """Another process appended: the one-round-trip write finds the head moved and
    writes nothing; the batch is checked again against a fresh lookup and committed
    by the same guarded statement, without taking the lock."""
    # Behind a transaction pooler processes cannot take turns (no session locks), so
    # nothing tells `first` that `second` wrote but the guard.
    pooled = database_url + "?pooler=transaction"
    first = await PostgresEventStore.open(pooled, ledger_key)
    second = await PostgresEventStore.open(pooled, ledger_key)
    try:
        agent = await register(first)
        await first.append([agent.violation(severity="low")])
        await second.append([agent.violation(severity="low")])  # the head moves
        before = dict(first.commit_paths)
        result = await first.append([agent.violation(severity="low")])
        assert first.commit_paths["optimistic"] == before.get("optimistic", 0) + 1
        assert first.commit_paths["locked"] == before.get("locked", 0)
        assert first.turn_counts["missed"] == 1
        assert second.turn_counts["waited"] == 0  # it never asked for a turn
        assert (await first.head()).position == result.positions[-1]
        assert await positions(database_url) == list(range(1, result.positions[-1] + 1))
    finally:
        await first.close()
        await second.close()


async def test_a_checkpoint_is_stored_with_the_time_it_signed(
    database_url: str, ledger_key: SigningKey
) -> None:
    """With a clock that moves between two readings, the stored checkpoint still
    verifies: its row holds the time its signature covers."""
    ticks = iter(range(10**6))

    def moving_clock() -> datetime:
        return T0 + timedelta(microseconds=next(ticks) * 7)

    store = await PostgresEventStore.open(
        database_url, ledger_key, clock=moving_clock, checkpoint_every=2
    )
    try:
        agent = await register(store, at=T0)
        for _ in range(4):
            await store.append([agent.violation(severity="low", at=T0)])
        checkpoints = await store.checkpoints()
        assert checkpoints
        for checkpoint in checkpoints:
            verify_checkpoint(checkpoint, ledger_key.public)
    finally:
        await store.close()
