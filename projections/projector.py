"""The projector: tails the ledger and keeps a read store exactly up to date.

* Exactly-once: every batch is written with a compare-and-set on the store's
  (generation, position), in the same atomic step as the documents derived
  from it. After a crash the projector reloads the store's state and resumes
  from its position, so a crash at any point gives the same state as an
  uninterrupted run.
* One leader: replicas compete for a PostgreSQL session advisory lock; only
  the holder projects, and when it dies its session ends, the lock is freed
  and a standby takes over. The compare-and-set also fences a leader that
  lost its lock but has not noticed yet. The lock and the LISTEN wake-ups
  live on one direct session (``projections.leader_postgres``, the adapter):
  neither passes through a transaction pooler, while the ledger reads and store
  writes may.
* Self-healing: an emptied read store (Redis flushed or restarted without
  persistence) or one folded under another trust configuration is rebuilt
  from the ledger without being asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from ledger.chain import RecordedEvent
from ledger.errors import LedgerError
from ledger.events import decode_body
from ledger.ports import LedgerReader
from ledger.timefmt import format_time, utc_now
from projections.config import TrustConfig
from projections.documents import (
    Change,
    Meta,
    batch_for,
    full_batch,
    grants_touched,
    state_from_documents,
)
from projections.errors import ProjectionError, SnapshotError
from projections.readstore import ProjectionStore, ReadStoreError, StaleWriteError
from projections.start import state_at_position
from projections.state import MeshState

log = logging.getLogger("agentmesh.projector")

Progress = Callable[[int], None]


class ProjectorMetrics:
    """The projector's gauges, in a registry of the caller's choosing."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import REGISTRY

        reg = REGISTRY if registry is None else registry
        self.position = Gauge(
            "agentmesh_projector_position",
            "Ledger position folded into the read store",
            registry=reg,
        )
        self.head = Gauge("agentmesh_projector_head", "Ledger head position seen", registry=reg)
        self.lag_events = Gauge(
            "agentmesh_projector_lag_events",
            "Events committed to the ledger but not yet projected",
            registry=reg,
        )
        self.lag_seconds = Gauge(
            "agentmesh_projector_lag_seconds",
            "Age of the oldest event not yet projected",
            registry=reg,
        )
        self.leader = Gauge(
            "agentmesh_projector_leader",
            "1 while this replica holds the projector lock",
            registry=reg,
        )
        self.rebuilds = Counter(
            "agentmesh_projector_rebuilds",
            "Full rebuilds of the read store from the ledger",
            registry=reg,
        )


@dataclass
class _Progress:
    state: MeshState
    generation: str


class FollowedLedger(LedgerReader, Protocol):
    """A ledger whose appends can be awaited (``PostgresLedgerReader``: LISTEN)."""

    def listener(self) -> contextlib.AbstractAsyncContextManager[asyncio.Event]: ...


class Projector:
    """Folds the ledger into ``store``; ``project`` runs it while leadership lasts
    (``projections.leader_postgres.project_while_leader`` competes for it)."""

    def __init__(
        self,
        ledger: FollowedLedger,
        store: ProjectionStore,
        config: TrustConfig,
        *,
        batch_size: int = 1000,
        poll_interval: float = 1.0,
        clock: Callable[[], datetime] = utc_now,
        metrics: ProjectorMetrics | None = None,
    ) -> None:
        self.ledger = ledger
        self.store = store
        self.config = config
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.clock = clock
        self.metrics = metrics

    # -- loading and rebuilding ----------------------------------------------------

    async def load(self) -> _Progress:
        """The store's state, or a rebuild if it is empty, foreign or unreadable."""
        meta = await self.store.meta()
        if meta is None:
            log.info("read_store_rebuild", extra={"reason": "empty"})
            return await self.rebuild()
        if meta.config != self.config.as_dict():
            log.warning("read_store_rebuild", extra={"reason": "other_trust_config"})
            return await self.rebuild()
        agents = [doc async for doc in self.store.all_agent_docs()]
        grants = [doc async for doc in self.store.all_grant_docs()]
        try:
            state = state_from_documents(meta, agents, grants, self.config)
        except SnapshotError as exc:
            log.warning("read_store_rebuild", extra={"reason": "inconsistent", "error": str(exc)})
            return await self.rebuild()
        return _Progress(state, meta.generation)

    async def rebuild(self, progress: Progress | None = None) -> _Progress:
        """Fold the whole ledger into a fresh generation, then swap it in at once."""
        state = await state_at_position(self.ledger, self.config, progress=progress)
        meta = self._meta(state, uuid.uuid4().hex)
        await self.store.replace_all(full_batch(state, meta))
        await self.store.publish(Change(state.position, None))
        if self.metrics is not None:
            self.metrics.rebuilds.inc()
        log.info("read_store_rebuilt", extra={"store": self.store.name, "position": state.position})
        return _Progress(state, meta.generation)

    def _meta(self, state: MeshState, generation: str) -> Meta:
        return Meta(
            generation=generation,
            position=state.position,
            recorded_at=None if state.recorded_at is None else format_time(state.recorded_at),
            registry_size=state.registry_size(),
            updated_at=format_time(self.clock()),
            config=self.config.as_dict(),
        )

    # -- projecting ---------------------------------------------------------------

    async def apply(self, progress: _Progress, records: Sequence[RecordedEvent]) -> None:
        """Fold ``records`` and write the changed documents with the new position."""
        state = progress.state
        before = state.position
        agents: set[str] = set()
        grants: set[str] = set()
        for record in records:
            event = decode_body(record.body)
            agents |= state.apply(event, record.position, record.recorded_at)
            grants.update(grants_touched(event))
        if state.position == before:
            return
        batch = batch_for(state, agents, grants, self._meta(state, progress.generation))
        await self.store.commit(batch, expected=(progress.generation, before))
        await self.store.publish(Change(state.position, frozenset(agents)))

    async def catch_up(self, progress: _Progress) -> int:
        """Apply everything committed so far; return how many events were applied."""
        applied = 0
        while True:
            records = await self.ledger.read(progress.state.position, self.batch_size)
            if not records:
                return applied
            await self.apply(progress, records)
            applied += len(records)
            await self._export(progress, records[-1])

    async def _export(self, progress: _Progress, last: RecordedEvent | None) -> None:
        if self.metrics is None:
            return
        head = await self.ledger.head()
        lag = max(head.position - progress.state.position, 0)
        self.metrics.position.set(progress.state.position)
        self.metrics.head.set(head.position)
        self.metrics.lag_events.set(lag)
        if lag == 0:
            self.metrics.lag_seconds.set(0)
        elif last is not None:
            nxt = await self.ledger.entry_at(progress.state.position + 1)
            if nxt is not None:
                age = (self.clock() - nxt.recorded_at).total_seconds()
                self.metrics.lag_seconds.set(max(age, 0.0))

    async def project(
        self,
        stop: asyncio.Event,
        still_leader: Callable[[], Awaitable[bool]],
        wake: asyncio.Event | None = None,
    ) -> None:
        """Project until ``stop`` is set or leadership is lost.

        ``wake`` is set whenever an append commits (its owner LISTENs on a direct
        session); without it, the projector LISTENs on a connection of the ledger's
        pool. Either way the poll every ``poll_interval`` is the source of truth."""
        progress: _Progress | None = None
        async with contextlib.AsyncExitStack() as stack:
            if wake is None:
                wake = await stack.enter_async_context(self.ledger.listener())
            while not stop.is_set() and await still_leader():
                try:
                    if progress is None:
                        progress = await self.load()
                    wake.clear()
                    if await self.catch_up(progress) == 0:
                        await self._export(progress, None)
                        if await self.store.meta() is None:
                            log.warning("read_store_rebuild", extra={"reason": "emptied"})
                            progress = None
                            continue
                        await wait_any(stop, wake, self.poll_interval)
                except StaleWriteError as exc:
                    log.warning("read_store_moved", extra={"error": str(exc)})
                    progress = None
                except (ReadStoreError, ProjectionError, LedgerError, OSError) as exc:
                    # A failed query (failover, idle kill) is retried from the store's
                    # state: nothing half-applied survives, thanks to the compare-and-set.
                    log.warning("projection_failed", extra={"error": str(exc)})
                    progress = None
                    await wait_any(stop, asyncio.Event(), self.poll_interval)

    def set_leader(self, value: bool) -> None:
        """Report leadership (the ``leader`` gauge)."""
        if self.metrics is not None:
            self.metrics.leader.set(1 if value else 0)


async def wait_any(stop: asyncio.Event, wake: asyncio.Event, seconds: float) -> None:
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
