"""The read-through cache: an invalidation racing a fetch never breaks a read.

Pure unit tests of ``CachedStore``'s bookkeeping; its use against real Redis is
covered by the API tests (``AGENTMESH_CACHE_ENABLED``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import msgspec

from projections.cache import CachedStore
from projections.documents import Change, Meta
from projections.readstore import Closure
from projections.store_memory import MemoryProjectionStore, _Generation


class _SlowStore(MemoryProjectionStore):
    """A memory store whose agent reads wait until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.docs: dict[str, bytes] = {}

    async def agent_docs(self, dids: Sequence[str]) -> list[bytes | None]:
        await self.release.wait()
        return [self.docs.get(d) for d in dids]


async def test_an_invalidation_during_a_fetch_does_not_break_the_read() -> None:
    inner = _SlowStore()
    inner.docs = {"a": b"A1", "b": b"B1"}
    cache = CachedStore(inner, ttl=60)
    inner.release.set()
    assert await cache.agent_docs(["a"]) == [b"A1"]  # "a" is cached now
    inner.release.clear()
    # A read of "a" (cached) and "b" (fetched) is in flight when "a" is invalidated.
    read = asyncio.create_task(cache.agent_docs(["a", "b"]))
    await asyncio.sleep(0)
    cache.invalidate(Change(position=2, agents=frozenset({"a"})))
    inner.docs["a"] = b"A2"
    inner.release.set()
    assert await read == [b"A1", b"B1"]  # answered from what it had; no KeyError
    # The racing read cached nothing, so the invalidated value is never put back.
    assert await cache.agent_docs(["a", "b"]) == [b"A2", b"B1"]


async def test_sixty_concurrent_reads_with_invalidations_all_answer() -> None:
    inner = _SlowStore()
    inner.docs = {f"d{i}": f"v{i}".encode() for i in range(10)}
    inner.release.set()
    cache = CachedStore(inner, ttl=60)

    async def reader(index: int) -> list[bytes | None]:
        dids = [f"d{(index + k) % 10}" for k in range(3)]
        return await cache.agent_docs(dids)

    async def invalidator() -> None:
        for i in range(60):
            cache.invalidate(Change(position=i, agents=frozenset({f"d{i % 10}"})))
            await asyncio.sleep(0)

    results = await asyncio.gather(*(reader(i) for i in range(60)), invalidator())
    for index, answer in enumerate(results[:60]):
        assert answer == [f"v{(index + k) % 10}".encode() for k in range(3)]


def _closure_store() -> tuple[MemoryProjectionStore, list[str], Closure, asyncio.Event]:
    """A memory store holding an agent with a grant (from a delegator), counting the
    reads that reach it; its closure reads wait while the event is clear."""
    me, other = f"did:mesh:{1:032x}", f"did:mesh:{2:032x}"
    agent = msgspec.json.encode({"grants_in": ["g-1"], "registry": {"did": me}})
    grant = msgspec.json.encode({"chain": ["g-1"], "delegator": other, "grant_id": "g-1"})
    delegator = msgspec.json.encode({"grants_in": [], "registry": {"did": other}})
    meta = Meta("gen", 1, None, 2, "2026-01-01T00:00:00.000000Z", {})
    store = MemoryProjectionStore()
    store._current = _Generation(meta, {me: agent, other: delegator}, {"g-1": grant}, [me, other])
    calls: list[str] = []
    gate = asyncio.Event()
    gate.set()
    for name in ("agent_docs", "grant_docs", "agent_closure"):
        method = getattr(store, name)

        async def counted(arg: Any, _name: str = name, _method: Any = method) -> Any:
            calls.append(_name)
            await gate.wait()
            return await _method(arg)

        setattr(store, name, counted)
    return store, calls, Closure(agent, {"g-1": grant}, {other: delegator}), gate


async def test_an_agents_closure_is_one_read_then_cached() -> None:
    inner, calls, expected, _ = _closure_store()
    cache = CachedStore(inner, ttl=60)
    me = f"did:mesh:{1:032x}"
    assert await cache.agent_closure(me) == expected
    assert calls == ["agent_closure"]  # one read of the store on a miss
    calls.clear()
    assert await cache.agent_closure(me) == expected
    assert calls == []  # the agent, its grant and its delegator were all kept
    cache.invalidate(Change(position=2, agents=frozenset({me})))
    assert await cache.agent_closure(me) == expected
    assert calls == ["agent_closure"]
    assert await CachedStore(inner, ttl=0).agent_closure(me) == expected  # no cache


async def test_a_closure_read_racing_an_invalidation_is_not_kept() -> None:
    inner, calls, expected, gate = _closure_store()
    me = f"did:mesh:{1:032x}"
    cache = CachedStore(inner, ttl=60)
    gate.clear()
    read = asyncio.create_task(cache.agent_closure(me))
    await asyncio.sleep(0)
    assert calls == ["agent_closure"]  # in flight
    cache.invalidate(Change(position=2, agents=None))  # before the read answers
    gate.set()
    assert await read == expected
    calls.clear()
    await cache.agent_closure(me)
    assert calls == ["agent_closure"]  # nothing of the racing read was kept


class _BrokenOnceStore(MemoryProjectionStore):
    """A memory store whose first subscription fails with an unexpected error."""

    def __init__(self) -> None:
        super().__init__()
        self.subscriptions = 0

    async def changes(self) -> AsyncGenerator[Change, None]:
        self.subscriptions += 1
        if self.subscriptions == 1:
            raise RuntimeError("a bug in a subscription")
        async for change in super().changes():
            yield change


async def test_an_unexpected_error_does_not_end_the_watch() -> None:
    """Invalidation that stopped for good would keep every document for the TTL: the
    watch drops what it holds and subscribes again, whatever the error."""
    inner = _BrokenOnceStore()
    cache = CachedStore(inner, ttl=60)
    watch = asyncio.create_task(cache.watch())
    try:
        for _ in range(200):  # until the second subscription said it is in place
            if cache.last_change is not None:
                break
            await asyncio.sleep(0.05)
        assert inner.subscriptions == 2
        assert cache.last_change is not None
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
