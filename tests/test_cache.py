"""The read-through cache: an invalidation racing a fetch never breaks a read.

Pure unit tests of ``CachedStore``'s bookkeeping; its use against real Redis is
covered by the API tests (``AGENTMESH_CACHE_ENABLED``)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from projections.cache import CachedStore
from projections.documents import Change
from projections.store_memory import MemoryProjectionStore


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
