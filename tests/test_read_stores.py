"""One contract suite for the three read stores, against real Redis and PostgreSQL.

Every backend must answer every query exactly as the in-memory fold of the
whole ledger does, at any query time; rebuilds must equal live state byte for
byte; writes are exactly-once (compare-and-set); changes are published.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import msgspec
import pytest

from ledger.events import AgentSuspended, DelegationGranted
from ledger.postgres import PostgresEventStore
from ledger.signed import SignedEvent
from ledger.timefmt import format_time
from projections.cache import CachedStore
from projections.config import TrustConfig
from projections.delegation import delegation_chain, effective_capabilities
from projections.documents import Batch, Meta
from projections.errors import DelegationError
from projections.projector import Projector
from projections.readstore import (
    SUBSCRIBED,
    Closure,
    ProjectionReader,
    ProjectionStore,
    StaleWriteError,
    Standing,
)
from projections.state import MeshState, fold_recorded
from projections.store_memory import MemoryProjectionStore
from projections.store_postgres import PostgresProjectionStore
from projections.store_redis import RedisProjectionStore
from sidecar.trust import TrustSource
from tests.support import ManualClock, random_history, register

CONFIG = TrustConfig()


def _meta(generation: str, position: int, registry_size: int = 0) -> Meta:
    """A store's meta for hand-written documents."""
    return Meta(
        generation=generation,
        position=position,
        recorded_at=None,
        registry_size=registry_size,
        updated_at="2026-01-01T00:00:00.000000Z",
        config=CONFIG.as_dict(),
    )


async def full_replay(ledger: PostgresEventStore) -> MeshState:
    return fold_recorded([r async for r in ledger.iter_entries()], CONFIG)


def expected_answers(
    state: MeshState, now_offsets: list[float], clock: ManualClock
) -> dict[str, Any]:
    """What every read store must answer, computed from the in-memory fold."""
    answers: dict[str, Any] = {"registry_size": state.registry_size()}
    for hours in now_offsets:
        now = clock.now + timedelta(hours=hours)
        answers[f"trust@{hours}"] = {
            did: state.trust_view(did, now) for did in sorted(state.agents)
        }
        answers[f"tiers@{hours}"] = state.tier_counts(now)
        answers[f"caps@{hours}"] = {
            did: effective_capabilities(state, did, now) for did in sorted(state.agents)
        }
        answers[f"standing@{hours}"] = {
            did: Standing(
                state.trust_view(did, now),  # type: ignore[arg-type]
                state.agents[did],
                effective_capabilities(state, did, now),
            )
            for did in sorted(state.agents)
        }
    answers["chains"] = {
        gid: delegation_chain(state, gid) for gid in sorted(state.delegations.grants)
    }
    answers["agents"] = sorted(state.agents)
    return answers


async def store_answers(
    reader: ProjectionReader,
    dids: list[str],
    grant_ids: list[str],
    now_offsets: list[float],
    clock: ManualClock,
) -> dict[str, Any]:
    answers: dict[str, Any] = {"registry_size": await reader.registry_size()}
    for hours in now_offsets:
        now = clock.now + timedelta(hours=hours)
        answers[f"trust@{hours}"] = {did: await reader.trust(did, now) for did in dids}
        answers[f"tiers@{hours}"] = await reader.tier_counts(now)
        answers[f"caps@{hours}"] = {did: await reader.capabilities(did, now) for did in dids}
        answers[f"standing@{hours}"] = {did: await reader.standing(did, now) for did in dids}
    answers["chains"] = {gid: await reader.delegation_chain(gid) for gid in grant_ids}
    listed: list[str] = []
    cursor = None
    while True:
        page = await reader.agents(clock.now, after=cursor, limit=3)
        listed += [a.record.did for a in page.agents]
        cursor = page.next_cursor
        if cursor is None:
            break
    answers["agents"] = listed
    return answers


def as_bytes(value: Any) -> bytes:
    return msgspec.json.encode(value, order="sorted")


OFFSETS = [0.0, 5.0, 400.0]


@pytest.mark.parametrize("seed", [1, 2])
async def test_store_answers_equal_the_full_replay(
    ledger: PostgresEventStore, read_store: ProjectionStore, clock: ManualClock, seed: int
) -> None:
    await random_history(ledger, clock, seed)
    projector = Projector(ledger, read_store, CONFIG, batch_size=7)  # many small batches
    progress = await projector.load()
    await projector.catch_up(progress)
    state = await full_replay(ledger)
    assert len(state.delegations.grants) > 3
    reader = ProjectionReader(read_store, CONFIG)
    got = await store_answers(
        reader, sorted(state.agents), sorted(state.delegations.grants), OFFSETS, clock
    )
    assert as_bytes(got) == as_bytes(expected_answers(state, OFFSETS, clock))
    status = await reader.status((await ledger.head()).position)
    assert (status.position, status.lag) == (state.position, 0)


async def test_rebuild_equals_live_state_byte_for_byte(
    ledger: PostgresEventStore, read_store: ProjectionStore, clock: ManualClock
) -> None:
    await random_history(ledger, clock, seed=3)
    projector = Projector(ledger, read_store, CONFIG, batch_size=5)
    await projector.catch_up(await projector.load())
    state = await full_replay(ledger)
    dids, grants = sorted(state.agents), sorted(state.delegations.grants)
    reader = ProjectionReader(read_store, CONFIG)
    live = as_bytes(await store_answers(reader, dids, grants, OFFSETS, clock))
    await projector.rebuild()
    rebuilt = as_bytes(await store_answers(reader, dids, grants, OFFSETS, clock))
    assert live == rebuilt


async def test_tier_filter_and_pagination(
    ledger: PostgresEventStore, read_store: ProjectionStore, clock: ManualClock
) -> None:
    agents = await random_history(ledger, clock, seed=4, steps=40)
    projector = Projector(ledger, read_store, CONFIG)
    await projector.catch_up(await projector.load())
    state = await full_replay(ledger)
    reader = ProjectionReader(read_store, CONFIG)
    for tier in ("trusted", "standard", "untrusted", "suspended"):
        expected = [
            d
            for d in sorted(state.agents)
            if (v := state.trust_view(d, clock.now)) is not None and v.tier == tier
        ]
        got: list[str] = []
        cursor = None
        while True:
            page = await reader.agents(clock.now, after=cursor, limit=2, tier=tier)
            got += [a.record.did for a in page.agents]
            assert all(a.trust.tier == tier for a in page.agents)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert got == expected
    assert len(agents) >= 4
    with pytest.raises(ValueError, match="unknown tier"):
        await reader.agents(clock.now, tier="legendary")


async def test_a_sidecar_reads_the_store_once_per_trust_miss(
    ledger: PostgresEventStore, read_store: ProjectionStore, clock: ManualClock
) -> None:
    """A sidecar's trust-cache miss (``TrustSource``) is one read of the store
    (``agent_closure``), grants to the agent or not: no document is read apart. Its
    answers are the in-memory fold's, with a suspended agent and a suspended delegator
    (whose grants then give nothing) among them."""
    await random_history(ledger, clock, seed=5)
    state = await full_replay(ledger)
    lone = next(x for x in sorted(state.agents) if not state.delegations.by_delegatee.get(x))
    # Besides the random grants (most revoked or expired by the end): a live chain
    # root -> child, whose delegatee holds the child's capability only through its
    # ancestor and both delegators; and a grant whose delegator is then suspended.
    a = await register(ledger, capabilities=("tools:*", "http:get"), at=clock.now)
    b = await register(ledger, capabilities=("mcp:*",), at=clock.now)
    c = await register(ledger, capabilities=("mcp:*",), at=clock.now)
    d = await register(ledger, capabilities=("http:get",), at=clock.now)
    e = await register(ledger, capabilities=("mcp:*",), at=clock.now)
    now = format_time(clock.now)
    for delegator, delegatee, grant_id, parent in (
        (a, b, "closure-root", None),
        (b, c, "closure-child", "closure-root"),
        (d, e, "closure-lone", None),
    ):
        grant = DelegationGranted(
            actor=delegator.did,
            occurred_at=now,
            grant_id=grant_id,
            delegator=delegator.did,
            delegatee=delegatee.did,
            capabilities=("http:get",),
            parent=parent,
        )
        await ledger.append([SignedEvent.create(grant, delegator.key)])
    for did in (lone, d.did):
        await ledger.append_own(
            AgentSuspended(actor=ledger.ledger_did, occurred_at=now, did=did, reason="t")
        )
    projector = Projector(ledger, read_store, CONFIG)
    await projector.catch_up(await projector.load())
    state = await full_replay(ledger)
    assert state.agents[lone].status == "suspended"
    assert "http:get" in effective_capabilities(state, c.did, clock.now)
    assert "http:get" not in effective_capabilities(state, e.did, clock.now)
    reader = ProjectionReader(read_store, CONFIG)
    reads: list[tuple[str, list[str]]] = []

    def counted(name: str) -> Any:
        method = getattr(read_store, name)

        async def read(ids: Any) -> Any:
            reads.append((name, [ids] if isinstance(ids, str) else list(ids)))
            return await method(ids)

        return read

    for name in ("agent_docs", "grant_docs", "agent_closure"):
        setattr(read_store, name, counted(name))
    for did in sorted(state.agents):
        reads.clear()
        source = TrustSource(reader, did, lambda: clock.now)
        found = await source.current()
        assert found is not None
        view = state.trust_view(did, clock.now)
        assert view is not None
        assert (found.score, found.tier, found.status) == (
            view.score,
            view.tier,
            state.agents[did].status,
        )
        assert found.capabilities == frozenset(effective_capabilities(state, did, clock.now))
        assert reads == [("agent_closure", [did])]


@pytest.mark.parametrize("registry_first", [False, True])
async def test_an_agents_closure_holds_its_grants_their_ancestors_and_delegators(
    read_store: ProjectionStore, registry_first: bool
) -> None:
    """``agent_closure`` reads the grants named in the agent's document (whatever the
    order of its keys: the projector writes them sorted, ``grants_in`` first), each
    grant's ancestors (its chain) and the delegators other than the agent; what the
    store does not hold is left out, and a grant nothing names is not read."""
    me, d0, d1 = (f"did:mesh:{n:032x}" for n in (1, 2, 3))
    grants_in = ["g-child", "g-missing"]
    if registry_first:
        agent = msgspec.json.encode({"registry": {"did": me}, "grants_in": grants_in})
    else:
        agent = msgspec.json.encode({"grants_in": grants_in, "registry": {"did": me}})
    # child (from d1) <- mid (from the agent itself) <- root (from d0, not held) <- gone
    chain = ["g-child", "g-mid", "g-root", "g-gone"]
    child = msgspec.json.encode({"chain": chain, "delegator": d1, "grant_id": "g-child"})
    mid = msgspec.json.encode({"chain": chain[1:], "delegator": me, "grant_id": "g-mid"})
    root = msgspec.json.encode({"chain": chain[2:], "delegator": d0, "grant_id": "g-root"})
    other = msgspec.json.encode({"chain": ["g-other"], "delegator": d1, "grant_id": "g-other"})
    delegator = msgspec.json.encode({"grants_in": [], "registry": {"did": d1}})
    meta = _meta("gen1", 5, registry_size=2)
    grants = {"g-child": child, "g-mid": mid, "g-root": root, "g-other": other}
    await read_store.replace_all(Batch({me: agent, d1: delegator}, grants, meta))
    closure = await read_store.agent_closure(me)
    held = {"g-child": child, "g-mid": mid, "g-root": root}
    assert closure == Closure(agent, held, {d1: delegator})  # not the agent's own document
    assert await read_store.agent_closure(d0) is None  # not held: no closure
    assert await read_store.agent_closure(d1) == Closure(delegator)


async def test_unknown_ids_answer_none(read_store: ProjectionStore) -> None:
    reader = ProjectionReader(read_store, CONFIG)
    did = "did:mesh:" + "0" * 32
    assert await reader.trust(did, ManualClock().now) is None
    assert await reader.capabilities(did, ManualClock().now) is None
    assert await reader.standing(did, ManualClock().now) is None
    assert await reader.delegation_chain("nope-nope") is None
    assert await reader.registry_size() == 0


async def test_stale_writes_are_refused(read_store: ProjectionStore) -> None:
    meta = _meta("gen1", 5)
    await read_store.replace_all(Batch({}, {}, meta))
    later = Meta(**{**meta.to_dict(), "position": 6})
    await read_store.commit(Batch({}, {}, later), expected=("gen1", 5))
    # A replayed (duplicate) apply and a writer on an old generation are both refused.
    with pytest.raises(StaleWriteError):
        await read_store.commit(Batch({}, {}, later), expected=("gen1", 5))
    with pytest.raises(StaleWriteError):
        await read_store.commit(Batch({}, {}, later), expected=("gen0", 6))
    assert (await read_store.meta()) == later


async def test_changes_are_published_after_each_batch(
    ledger: PostgresEventStore, read_store: ProjectionStore, clock: ManualClock
) -> None:
    agents = await random_history(ledger, clock, seed=5, steps=5)
    projector = Projector(ledger, read_store, CONFIG)
    progress = await projector.load()
    received: asyncio.Queue[Any] = asyncio.Queue()

    async def listen() -> None:
        async for change in read_store.changes():
            await received.put(change)

    task = asyncio.create_task(listen())
    try:
        # The subscription says when it is in place: from then on nothing is missed.
        assert await asyncio.wait_for(received.get(), 10) == SUBSCRIBED
        await ledger.append([agents[0].violation(subject=agents[1].did)])
        await projector.catch_up(progress)
        change = await asyncio.wait_for(received.get(), 5)
        assert change.agents is not None
        assert agents[1].did in change.agents
        assert change.position == (await ledger.head()).position
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_what_a_cache_read_before_its_subscription_was_in_place_is_dropped(
    ledger: PostgresEventStore, read_store: ProjectionStore, clock: ManualClock
) -> None:
    """A change published while no subscription is in place (the API starting, a
    subscription re-opened after Redis came back) reaches no one, and the cache would
    keep what it read before for its whole TTL: a suspended agent still trusted.
    Every subscription starts with ``SUBSCRIBED``; the cache drops everything on it."""
    agents = await random_history(ledger, clock, seed=8, steps=10)
    projector = Projector(ledger, read_store, CONFIG)
    progress = await projector.load()
    cache = CachedStore(read_store, ttl=300)
    target = [agents[1].did]
    before = await cache.agent_docs(target)  # read, and kept, before any subscription
    await ledger.append([agents[0].violation(subject=agents[1].did)])
    await projector.catch_up(progress)  # its change is published to no one
    now = await read_store.agent_docs(target)
    assert now != before
    assert await cache.agent_docs(target) == before  # the TTL alone would keep it
    watch = asyncio.create_task(cache.watch())
    try:
        for _ in range(400):  # until the subscription is in place (a hang guard)
            if cache.last_change is not None:
                break
            await asyncio.sleep(0.05)
        assert cache.last_change is not None, "the subscription never said it was in place"
        assert await cache.agent_docs(target) == now
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)


async def test_emptied_store_is_rebuilt_without_being_asked(
    ledger: PostgresEventStore, read_store: ProjectionStore, clock: ManualClock
) -> None:
    agents = await random_history(ledger, clock, seed=6, steps=20)
    projector = Projector(ledger, read_store, CONFIG, poll_interval=0.1)
    stop = asyncio.Event()

    async def leader() -> bool:
        return True

    task = asyncio.create_task(projector.project(stop, leader))
    reader = ProjectionReader(read_store, CONFIG)
    try:
        head = (await ledger.head()).position
        await wait_until(lambda: reader_position(reader), head)
        await empty(read_store)
        assert await reader.trust(agents[0].did, clock.now) is None
        await ledger.append([agents[1].signal(subject=agents[0].did, at=clock.now)])
        await wait_until(lambda: reader_position(reader), head + 1)
        state = await full_replay(ledger)
        assert await reader.trust(agents[0].did, clock.now) == state.trust_view(
            agents[0].did, clock.now
        )
    finally:
        stop.set()
        await task


async def empty(store: ProjectionStore) -> None:
    if isinstance(store, MemoryProjectionStore):
        store.clear()
    elif isinstance(store, RedisProjectionStore):
        await store.flush_for_tests()
    elif isinstance(store, PostgresProjectionStore):
        await store.clear_for_tests()


async def reader_position(reader: ProjectionReader) -> int:
    meta = await reader.store.meta()
    return 0 if meta is None else meta.position


async def wait_until(probe: Any, target: int, seconds: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while await probe() < target:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"position never reached {target}")
        await asyncio.sleep(0.05)


async def test_foreign_config_forces_a_rebuild(
    ledger: PostgresEventStore, read_store: ProjectionStore, clock: ManualClock
) -> None:
    agents = await random_history(ledger, clock, seed=7, steps=10)
    await Projector(ledger, read_store, CONFIG).rebuild()
    harsher = TrustConfig(penalties={"low": 20, "medium": 80, "high": 200, "critical": 500})
    projector = Projector(ledger, read_store, harsher)
    await projector.load()  # folded under CONFIG: must rebuild under `harsher`
    reader = ProjectionReader(read_store, harsher)
    state = fold_recorded([r async for r in ledger.iter_entries()], harsher)
    assert await reader.trust(agents[1].did, clock.now) == state.trust_view(
        agents[1].did, clock.now
    )


def test_delegation_errors_have_reasons() -> None:
    error = DelegationError("widening", "tools:* is wider than tools:search")
    assert error.reason == "widening"
