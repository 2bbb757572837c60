"""The projector's live tail: what a wake-up does, and that doing less of it changes
nothing the stores hold.

The tail folds a few events per wake-up, so each wake-up is one ledger read and one
store write that also publishes the change; a read that returns less than a batch is
the last; a notification of entries already read is not read again; the registry's
size is counted again only for the events that change it; wake-ups sooner than
``read_interval`` after a read wait out the rest of it and share one read. Each is
held here against the
rebuild (documents and meta byte for byte) and against a count of the reads, on
real PostgreSQL and each read store.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ledger.chain import RecordedEvent
from ledger.events import AgentReinstated, AgentSuspended
from ledger.postgres import PostgresEventStore
from ledger.timefmt import format_time
from projections.config import TrustConfig
from projections.documents import Batch, Change, Meta
from projections.projector import Projector, Wakeup
from projections.readstore import SUBSCRIBED, ProjectionStore, StaleWriteError
from projections.state import fold_recorded
from tests.support import Agent, ManualClock, random_history

CONFIG = TrustConfig()


class CountedLedger:
    """The real ledger, with its reads counted (everything else passed through)."""

    def __init__(self, inner: PostgresEventStore) -> None:
        self.inner = inner
        self.reads = 0

    async def read(self, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        self.reads += 1
        return await self.inner.read(after, limit)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def stored(store: ProjectionStore, dids: list[str], grants: list[str]) -> Any:
    """Everything a store holds about ``dids`` and ``grants``, with its meta's figures."""
    meta = await store.meta()
    assert meta is not None
    return (
        await store.agent_docs(dids),
        await store.grant_docs(grants),
        meta.position,
        meta.registry_size,
        meta.recorded_at,
    )


async def suspend(ledger: PostgresEventStore, clock: ManualClock, agent: Agent) -> None:
    await ledger.append_own(
        AgentSuspended(
            actor=ledger.ledger_did,
            occurred_at=format_time(clock.now),
            did=agent.did,
            reason="held for review",
        )
    )


async def reinstate(ledger: PostgresEventStore, clock: ManualClock, agent: Agent) -> None:
    await ledger.append_own(
        AgentReinstated(
            actor=ledger.ledger_did,
            occurred_at=format_time(clock.now),
            did=agent.did,
            reason="cleared",
        )
    )


async def test_one_event_per_write_equals_the_rebuild_byte_for_byte(
    ledger: PostgresEventStore, read_store: ProjectionStore, clock: ManualClock
) -> None:
    agents = await random_history(ledger, clock, seed=21, steps=60)
    await suspend(ledger, clock, agents[0])
    projector = Projector(ledger, read_store, CONFIG, batch_size=1)  # a write per event
    progress = await projector.load()
    await projector.catch_up(progress)
    # More events after the store was loaded, one registry change among reports.
    await ledger.append([agents[1].violation(subject=agents[2].did)])
    await reinstate(ledger, clock, agents[0])
    await ledger.append([agents[2].signal(subject=agents[3].did, at=clock.now)])
    await projector.catch_up(progress)
    state = fold_recorded([r async for r in ledger.iter_entries()], CONFIG)
    assert progress.state.snapshot() == state.snapshot()
    dids, grants = sorted(state.agents), sorted(state.delegations.grants)
    live = await stored(read_store, dids, grants)
    assert live[2:4] == (state.position, state.registry_size())
    await projector.rebuild()
    assert await stored(read_store, dids, grants) == live


async def test_a_short_read_is_the_last_read(
    ledger: PostgresEventStore, read_store: ProjectionStore, clock: ManualClock
) -> None:
    await random_history(ledger, clock, seed=22, steps=10)
    head = (await ledger.head()).position
    counted = CountedLedger(ledger)
    projector = Projector(counted, read_store, CONFIG, batch_size=head + 1)
    progress = await projector.load()  # a rebuild: reads of its own
    agents = await random_history(ledger, clock, seed=23, steps=5)
    before = counted.reads
    assert await projector.catch_up(progress) > 0
    assert counted.reads == before + 1
    # A batch read in full may have more behind it: one more read finds the rest.
    projector.batch_size = 2
    await ledger.append([agents[0].violation(subject=agents[1].did)])
    await ledger.append([agents[1].violation(subject=agents[2].did)])
    before = counted.reads
    assert await projector.catch_up(progress) == 2
    assert counted.reads == before + 2
    assert progress.state.position == (await ledger.head()).position


async def test_a_commit_publishes_its_change_only_when_it_writes(
    read_store: ProjectionStore,
) -> None:
    meta = Meta(
        generation="gen1",
        position=5,
        recorded_at=None,
        registry_size=0,
        updated_at="2026-01-01T00:00:00.000000Z",
        config=CONFIG.as_dict(),
    )
    await read_store.replace_all(Batch({}, {}, meta))
    received: asyncio.Queue[Change] = asyncio.Queue()

    async def listen() -> None:
        async for change in read_store.changes():
            await received.put(change)

    task = asyncio.create_task(listen())
    try:
        assert await asyncio.wait_for(received.get(), 10) == SUBSCRIBED  # in place
        at6 = Meta(**{**meta.to_dict(), "position": 6})
        at7 = Meta(**{**meta.to_dict(), "position": 7})
        did = "did:mesh:" + "a" * 32
        await read_store.commit(Batch({}, {}, at6), ("gen1", 5), Change(6, frozenset({did})))
        with pytest.raises(StaleWriteError):  # refused: its change is not published
            await read_store.commit(Batch({}, {}, at6), ("gen1", 5), Change(66, None))
        await read_store.commit(Batch({}, {}, at7), ("gen1", 6), Change(7, frozenset()))
        got = [await asyncio.wait_for(received.get(), 10) for _ in range(2)]
        assert got == [Change(6, frozenset({did})), Change(7, frozenset())]
        assert await read_store.meta() == at7
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_wakeup_knows_which_entries_it_announced() -> None:
    wake = Wakeup()
    assert not wake.is_set()
    assert wake.seen(0)
    wake.notify("12")
    wake.notify("10")  # notifications may arrive out of order: the highest counts
    assert wake.is_set()
    assert wake.head == 12
    assert [wake.seen(p) for p in (11, 12, 13)] == [False, True, True]
    wake.notify("not a position")  # another writer's payload: always worth a read
    assert not wake.seen(1000)
    wake.clear()
    assert not wake.is_set()
    assert [wake.seen(p) for p in (11, 12)] == [False, True]


async def test_the_tail_reads_once_per_new_commit_and_never_for_a_stale_notification(
    ledger: PostgresEventStore, read_store: ProjectionStore, clock: ManualClock
) -> None:
    agents = await random_history(ledger, clock, seed=24, steps=10)
    counted = CountedLedger(ledger)
    projector = Projector(counted, read_store, CONFIG, poll_interval=3600)
    wake, stop = Wakeup(), asyncio.Event()

    async def leader() -> bool:
        return True

    task = asyncio.create_task(projector.project(stop, leader, wake))
    try:
        head = (await ledger.head()).position
        await reached(read_store, head)
        # The store was empty: the projector rebuilt it, then reads once from there
        # (finding nothing) — possibly after ``reached`` saw the rebuild's position.
        for _ in range(500):
            if counted.reads:
                break
            await asyncio.sleep(0.01)
        assert counted.reads == 1
        for n in range(3):
            before = counted.reads
            wake.notify(str(head))  # the NOTIFY of a commit the last read already had
            await ledger.append([agents[n].violation(subject=agents[n + 1].did)])
            head = (await ledger.head()).position
            wake.notify(str(head))
            await reached(read_store, head)
            assert counted.reads == before + 1
        await equals_a_rebuild(ledger, read_store, projector)
    finally:
        stop.set()
        await task


async def equals_a_rebuild(
    ledger: PostgresEventStore, store: ProjectionStore, projector: Projector
) -> None:
    """The agents' documents the tail left are those a rebuild writes."""
    state = fold_recorded([r async for r in ledger.iter_entries()], CONFIG)
    dids = sorted(state.agents)
    live = await store.agent_docs(dids)
    await projector.rebuild()
    assert await store.agent_docs(dids) == live


async def reached(store: ProjectionStore, position: int) -> None:
    """Until the store's meta is at ``position`` (a deadline only against a hang)."""
    for _ in range(400):
        meta = await store.meta()
        if meta is not None and meta.position >= position:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the store never reached position {position}")


async def test_wakeups_soon_after_a_read_gather_their_commits_into_one_read(
    ledger: PostgresEventStore, read_store: ProjectionStore, clock: ManualClock
) -> None:
    """Under appends the tail reads at most once per ``read_interval``: a wake-up that
    comes sooner waits out the rest of it (``pause``), and whatever committed meanwhile
    is folded by one read. A wake-up after a quiet spell reads at once."""
    agents = await random_history(ledger, clock, seed=25, steps=10)
    counted = CountedLedger(ledger)
    pauses: list[float] = []
    wake, stop = Wakeup(), asyncio.Event()

    async def commit(n: int) -> int:
        actor, subject = agents[n % len(agents)], agents[(n + 1) % len(agents)]
        await ledger.append([actor.violation(subject=subject.did)])
        head = (await ledger.head()).position
        wake.notify(str(head))
        return head

    async def pause(seconds: float) -> None:
        # Two more commits land while the projector waits: its next read has all three.
        pauses.append(seconds)
        await commit(1)
        await commit(2)

    projector = Projector(
        counted, read_store, CONFIG, poll_interval=3600, read_interval=3600, pause=pause
    )

    async def leader() -> bool:
        return True

    task = asyncio.create_task(projector.project(stop, leader, wake))
    try:
        await reached(read_store, (await ledger.head()).position)
        for _ in range(500):  # the first read after the rebuild (it finds nothing)
            if counted.reads:
                break
            await asyncio.sleep(0.01)
        assert counted.reads == 1
        assert pauses == []
        first = await commit(0)  # woken within the interval of that read: it waits
        await reached(read_store, first + 2)  # one event per commit
        assert len(pauses) == 1
        assert 0 < pauses[0] <= 3600
        assert counted.reads == 2  # three commits, three notifications, one read
        # After a quiet spell longer than the interval, a wake-up reads without waiting.
        projector.read_interval = 0.05
        await asyncio.sleep(0.2)
        pauses.clear()
        head = await commit(3)
        await reached(read_store, head)
        assert pauses == []
        assert counted.reads == 3
        await equals_a_rebuild(ledger, read_store, projector)
    finally:
        stop.set()
        await task
