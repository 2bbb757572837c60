"""The sidecar's view of its own agent's trust: cached, invalidated at once on change.

Decisions read ``current()`` — a dictionary lookup on the hot path. The value
is re-read from the read store when the projector publishes a change for this
agent (pub/sub or NOTIFY), when it is older than the refresh interval, or when
the subscription broke (changes may have been missed). Every read records the
time it succeeded, so the policy can refuse to decide on stale data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import datetime

from projections.documents import Change
from projections.errors import ProjectionError
from projections.readstore import ProjectionReader, ReadStoreError
from sidecar.policy import TrustInfo

log = logging.getLogger("agentmesh.sidecar.trust")


class _Miss:
    """``TrustSource.cached()`` has no fresh value: read it (``current()``)."""


MISS = _Miss()


class TrustSource:
    def __init__(
        self,
        reader: ProjectionReader,
        did: str,
        clock: Callable[[], datetime],
        refresh_seconds: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reader = reader
        self.did = did
        self.clock = clock
        self.refresh_seconds = refresh_seconds
        self.monotonic = monotonic
        self._value: TrustInfo | None = None
        self._read_at: float | None = None
        self._valid = False
        self._generation = 0  # bumped by every invalidation
        self._lock = asyncio.Lock()
        self.hits = 0
        self.misses = 0
        self.last_error: str | None = None
        # Called (in the event loop) after a read whose answer differs from the last one.
        self.on_change: Callable[[], None] | None = None

    @property
    def registered(self) -> bool | None:
        """Whether the last successful read found the agent (None: never read)."""
        return None if self._read_at is None else self._value is not None

    @property
    def age(self) -> float | None:
        """Seconds since the last successful read (None: never read)."""
        return None if self._read_at is None else self.monotonic() - self._read_at

    async def current(self) -> TrustInfo | None:
        """The agent's trust, with its age; None when it was never readable."""
        if self._valid and self._value is not None and (self.age or 0.0) < self.refresh_seconds:
            self.hits += 1
            return self._with_age(self._value)
        self.misses += 1
        await self.refresh()
        return None if self._value is None else self._with_age(self._value)

    @property
    def stamp(self) -> tuple[int, float | None]:
        """Changes whenever the value may have: every invalidation and every read."""
        return (self._generation, self._read_at)

    def cached(self) -> TrustInfo | _Miss | None:
        """``current()`` when it needs no read (a cache hit), else ``MISS``."""
        value = self._value
        if self._valid and value is not None and (self.age or 0.0) < self.refresh_seconds:
            self.hits += 1
            return self._with_age(value)
        return MISS

    def _with_age(self, value: TrustInfo) -> TrustInfo:
        return TrustInfo(
            did=value.did,
            score=value.score,
            tier=value.tier,
            status=value.status,
            capabilities=value.capabilities,
            age_seconds=self.age or 0.0,
        )

    async def refresh(self) -> None:
        async with self._lock:
            if self._valid and (self.age or 0.0) < self.refresh_seconds:
                return  # another task refreshed while we waited
            # A change published while this read is in flight may not be in its answer:
            # then the value is kept but not marked valid, so the next lookup reads again.
            generation = self._generation
            try:
                before = _standing(self._value)
                self._value = await self._read()
                if self.on_change is not None and _standing(self._value) != before:
                    self.on_change()
                self._read_at = self.monotonic()
                self._valid = generation == self._generation
                self.last_error = None
            except (ReadStoreError, ProjectionError, OSError) as exc:
                # Keep the old value: its age tells the policy how stale it is.
                self.last_error = str(exc)
                self._valid = False

    async def _read(self) -> TrustInfo | None:
        found = await self.reader.standing(self.did, self.clock())
        if found is None:
            return None  # not registered (yet): decisions treat it as unavailable
        return TrustInfo(
            did=self.did,
            score=found.view.score,
            tier=found.view.tier,
            status=found.record.status,
            capabilities=frozenset(found.capabilities),
            age_seconds=0.0,
        )

    def invalidate(self, change: Change | None = None) -> None:
        if change is None or change.agents is None or self.did in change.agents:
            self._generation += 1
            self._valid = False

    async def watch(self) -> None:
        """Follow change notifications forever (resubscribing on failure)."""
        while True:
            try:
                # aclosing: a cancelled watch closes its subscription (and socket) at once.
                async with contextlib.aclosing(self.reader.store.changes()) as changes:
                    async for change in changes:
                        self.invalidate(change)
                        while not self._valid and self.last_error is None:
                            await self.refresh()  # again if a newer change raced the read
            except ReadStoreError as exc:
                log.warning("change_subscription_lost", extra={"error": str(exc)})
            except Exception:  # a bug must not end invalidation for good: drop, go on
                log.exception("change_watch_failed")
            self.invalidate()
            await asyncio.sleep(0.5)

    async def keep_fresh(self) -> None:
        """Re-read periodically, so an idle sidecar still knows whether its data is fresh."""
        while True:
            self._valid = False
            await self.refresh()
            await asyncio.sleep(self.refresh_seconds / 2)


def _standing(value: TrustInfo | None) -> tuple[object, ...] | None:
    """What decisions read of a trust value (not its age)."""
    if value is None:
        return None
    return (value.score, value.tier, value.status, value.capabilities)
