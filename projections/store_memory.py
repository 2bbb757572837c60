"""``MemoryProjectionStore``: projections in this process (demos, one-process setups)."""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field

from projections.documents import Batch, Change, Meta
from projections.readstore import SUBSCRIBED, Closure, StaleWriteError, read_closure


@dataclass
class _Generation:
    meta: Meta
    agents: dict[str, bytes] = field(default_factory=dict)
    grants: dict[str, bytes] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)


class MemoryProjectionStore:
    name = "memory"

    def __init__(self) -> None:
        self._current: _Generation | None = None
        self._subscribers: list[asyncio.Queue[Change]] = []

    async def meta(self) -> Meta | None:
        return None if self._current is None else self._current.meta

    async def agent_docs(self, dids: Sequence[str]) -> list[bytes | None]:
        agents = {} if self._current is None else self._current.agents
        return [agents.get(did) for did in dids]

    async def grant_docs(self, grant_ids: Sequence[str]) -> list[bytes | None]:
        grants = {} if self._current is None else self._current.grants
        return [grants.get(gid) for gid in grant_ids]

    async def agent_closure(self, did: str) -> Closure | None:
        current = self._current
        if current is None:
            return None

        async def agents(dids: Sequence[str]) -> list[bytes | None]:
            return [current.agents.get(d) for d in dids]

        async def grants(grant_ids: Sequence[str]) -> list[bytes | None]:
            return [current.grants.get(g) for g in grant_ids]

        return await read_closure(did, agents, grants)

    async def agent_page(self, after: str | None, limit: int) -> list[tuple[str, bytes]]:
        current = self._current
        if current is None:
            return []
        start = 0 if after is None else bisect.bisect_right(current.order, after)
        return [(did, current.agents[did]) for did in current.order[start : start + limit]]

    async def all_agent_docs(self) -> AsyncIterator[bytes]:
        for doc in list(self._current.agents.values()) if self._current else []:
            yield doc

    async def all_grant_docs(self) -> AsyncIterator[bytes]:
        for doc in list(self._current.grants.values()) if self._current else []:
            yield doc

    async def commit(
        self, batch: Batch, expected: tuple[str, int], change: Change | None = None
    ) -> None:
        current = self._current
        if current is None or (current.meta.generation, current.meta.position) != expected:
            raise StaleWriteError(f"memory store is not at {expected}")
        _put(current, batch)
        if change is not None:
            await self.publish(change)

    async def replace_all(self, batch: Batch) -> None:
        generation = _Generation(meta=batch.meta)
        _put(generation, batch)
        self._current = generation

    def clear(self) -> None:
        """Forget everything (what a Redis restart without persistence does)."""
        self._current = None

    async def publish(self, change: Change) -> None:
        for queue in self._subscribers:
            queue.put_nowait(change)

    async def changes(self) -> AsyncGenerator[Change, None]:
        queue: asyncio.Queue[Change] = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            yield SUBSCRIBED
            while True:
                yield await queue.get()
        finally:
            self._subscribers.remove(queue)

    async def close(self) -> None:
        self._subscribers.clear()


def _put(generation: _Generation, batch: Batch) -> None:
    for did, doc in batch.agents.items():
        if did not in generation.agents:
            bisect.insort(generation.order, did)
        generation.agents[did] = doc
    generation.grants.update(batch.grants)
    generation.meta = batch.meta
