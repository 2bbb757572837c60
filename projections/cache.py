"""A read-through cache of projection documents, invalidated by change notifications.

``CachedStore`` wraps any ``ProjectionStore``: agent and grant documents are
kept up to ``ttl`` seconds, and ``watch()`` drops them the moment the
projector publishes a change, so a violation recorded anywhere is seen at
once rather than after the TTL. A read that raced an invalidation is not
cached (an epoch counter guards the insert), so a stale document can never
be put back after its invalidation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence

from projections.documents import Batch, Change, Meta
from projections.readstore import Closure, ProjectionStore, ReadStoreError, read_closure

log = logging.getLogger("agentmesh.cache")


class CachedStore:
    """A ``ProjectionStore`` whose document reads are cached."""

    def __init__(
        self, inner: ProjectionStore, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.ttl = ttl
        self._clock = clock
        self._agents: dict[str, tuple[float, bytes | None]] = {}
        self._grants: dict[str, tuple[float, bytes | None]] = {}
        self._epoch = 0
        self.hits = 0
        self.misses = 0
        self.last_change: float | None = None

    # -- invalidation --------------------------------------------------------

    def invalidate(self, change: Change) -> None:
        self._epoch += 1
        self.last_change = self._clock()
        self._grants.clear()  # grant changes always come with their agents' changes
        if change.agents is None:
            self._agents.clear()
        else:
            for did in change.agents:
                self._agents.pop(did, None)

    def clear(self) -> None:
        self._epoch += 1
        self._agents.clear()
        self._grants.clear()

    async def watch(self, on_change: Callable[[Change], None] | None = None) -> None:
        """Apply change notifications forever; on a broken subscription, drop
        everything (we may have missed changes) and resubscribe."""
        while True:
            try:
                # aclosing: a cancelled watch closes its subscription (and socket) at once.
                async with contextlib.aclosing(self.inner.changes()) as changes:
                    async for change in changes:
                        self.invalidate(change)
                        if on_change is not None:
                            on_change(change)
            except ReadStoreError as exc:
                log.warning("change_subscription_lost", extra={"error": str(exc)})
            except Exception:  # a bug must not end invalidation for good: drop, go on
                log.exception("change_watch_failed")
            self.clear()
            await asyncio.sleep(0.5)

    # -- cached reads ----------------------------------------------------------

    async def _cached(
        self,
        table: dict[str, tuple[float, bytes | None]],
        ids: Sequence[str],
        fetch: Callable[[Sequence[str]], object],
    ) -> list[bytes | None]:
        now = self._clock()
        # Take the cached values *before* awaiting: an invalidation that runs while
        # the fetch is in flight may drop them from the table.
        found: dict[str, bytes | None] = {}
        missing: list[str] = []
        for i in ids:
            entry = table.get(i)
            if entry is None or now - entry[0] > self.ttl:
                missing.append(i)
            else:
                found[i] = entry[1]
        self.hits += len(ids) - len(missing)
        self.misses += len(missing)
        if missing:
            epoch = self._epoch
            values: list[bytes | None] = await fetch(missing)  # type: ignore[misc]
            if epoch == self._epoch:
                for key, value in zip(missing, values, strict=True):
                    table[key] = (now, value)
            found.update(zip(missing, values, strict=True))
        return [found[i] for i in ids]

    async def agent_docs(self, dids: Sequence[str]) -> list[bytes | None]:
        if self.ttl <= 0:
            return await self.inner.agent_docs(dids)
        return await self._cached(self._agents, dids, self.inner.agent_docs)

    async def grant_docs(self, grant_ids: Sequence[str]) -> list[bytes | None]:
        if self.ttl <= 0:
            return await self.inner.grant_docs(grant_ids)
        return await self._cached(self._grants, grant_ids, self.inner.grant_docs)

    async def agent_closure(self, did: str) -> Closure | None:
        """From the cache when it holds the agent (its grants and delegators read
        through it); otherwise the store's one read, whose documents are kept."""
        if self.ttl <= 0:
            return await self.inner.agent_closure(did)
        now = self._clock()
        entry = self._agents.get(did)
        if entry is not None and now - entry[0] <= self.ttl:
            return await read_closure(did, self.agent_docs, self.grant_docs)
        self.misses += 1
        epoch = self._epoch
        closure = await self.inner.agent_closure(did)
        if epoch == self._epoch:  # no invalidation raced the read (see _cached)
            self._agents[did] = (now, None if closure is None else closure.agent)
            if closure is not None:
                self._grants.update((gid, (now, doc)) for gid, doc in closure.grants.items())
                self._agents.update((d, (now, doc)) for d, doc in closure.delegators.items())
        return closure

    # -- pass-through ------------------------------------------------------------

    async def meta(self) -> Meta | None:
        return await self.inner.meta()

    async def agent_page(self, after: str | None, limit: int) -> list[tuple[str, bytes]]:
        return await self.inner.agent_page(after, limit)

    def all_agent_docs(self) -> AsyncIterator[bytes]:
        return self.inner.all_agent_docs()

    def all_grant_docs(self) -> AsyncIterator[bytes]:
        return self.inner.all_grant_docs()

    async def commit(
        self, batch: Batch, expected: tuple[str, int], change: Change | None = None
    ) -> None:
        await self.inner.commit(batch, expected, change)

    async def replace_all(self, batch: Batch) -> None:
        await self.inner.replace_all(batch)

    async def publish(self, change: Change) -> None:
        await self.inner.publish(change)

    def changes(self) -> AsyncGenerator[Change, None]:
        return self.inner.changes()

    async def close(self) -> None:
        await self.inner.close()
