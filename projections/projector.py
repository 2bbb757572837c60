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
* Cheap wake-ups: in the live tail most wake-ups bring a few events, so what a
  wake-up costs beyond folding them is kept to one ledger read and one store
  write (the write publishes the change in the same step). A read that returns
  less than a batch reached the head, so no second read looks for more; the
  lag gauges follow from it without asking the head. The leader lock and the
  store's emptiness are checked on every poll and at most once per
  ``poll_interval`` while appends keep waking it (a lost lock is fenced by the
  compare-and-set meanwhile, and an emptied store fails the next write).
* Fewer wake-ups under load: reads of the tail are at least ``read_interval``
  (``READ_INTERVAL``, 5 ms) apart, so commits that arrive faster are folded
  together; a wake-up after a quieter spell reads at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from ledger.chain import RecordedEvent
from ledger.errors import LedgerError
from ledger.events import AgentRegistered, AgentReinstated, AgentSuspended
from ledger.ports import LedgerReader
from ledger.timefmt import format_time, utc_now
from projections.bodies import decode_for_fold
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

# The only events that change how many agents are active (the meta's registry_size):
# a batch without one keeps the count it had, instead of counting the registry again.
_RECOUNT = frozenset({AgentRegistered, AgentSuspended, AgentReinstated})

# The shortest time between two reads of the live tail while appends keep waking the
# projector. A wake-up's fixed cost (a ledger read and a store write, their socket
# writes and the event loop) is most of its CPU when each brings one commit: at 1,000
# single-event commits a second, 5 ms of gathering cut the projector's CPU per event
# by ~40 % for ~3 ms more lag at the median (bench/projections.py; README, "The read
# interval"). A wake-up after a quiet spell longer than this reads at once.
READ_INTERVAL = 0.005


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
    registry_size: int
    """``state.registry_size()``, kept up to date by ``Projector.apply``."""


class Wakeup(asyncio.Event):
    """An event set by the ledger's notifications that also keeps what they said: the
    highest head position notified (the ledger's NOTIFY payload is the head its commit
    left). A wake-up for entries the projector has already read is then no reason to
    read again."""

    def __init__(self) -> None:
        super().__init__()
        self.head = 0
        self._unknown = False

    def notify(self, payload: str) -> None:
        """A notification arrived; a payload that is no position means "read"."""
        try:
            self.head = max(self.head, int(payload))
        except ValueError:
            self._unknown = True
        self.set()

    def clear(self) -> None:
        super().clear()
        self._unknown = False

    def seen(self, position: int) -> bool:
        """Whether every notification since the last ``clear`` is for entries up to
        ``position``: nothing new to read."""
        return not self._unknown and self.head <= position


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
        read_interval: float = READ_INTERVAL,
        clock: Callable[[], datetime] = utc_now,
        metrics: ProjectorMetrics | None = None,
        pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.ledger = ledger
        self.store = store
        self.config = config
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.read_interval = read_interval
        self.pause = pause
        self.clock = clock
        self.metrics = metrics
        self._config = config.as_dict()

    # -- loading and rebuilding ----------------------------------------------------

    async def load(self) -> _Progress:
        """The store's state, or a rebuild if it is empty, foreign or unreadable."""
        meta = await self.store.meta()
        if meta is None:
            log.info("read_store_rebuild", extra={"reason": "empty"})
            return await self.rebuild()
        if meta.config != self._config:
            log.warning("read_store_rebuild", extra={"reason": "other_trust_config"})
            return await self.rebuild()
        agents = [doc async for doc in self.store.all_agent_docs()]
        grants = [doc async for doc in self.store.all_grant_docs()]
        try:
            state = state_from_documents(meta, agents, grants, self.config)
        except SnapshotError as exc:
            log.warning("read_store_rebuild", extra={"reason": "inconsistent", "error": str(exc)})
            return await self.rebuild()
        return _Progress(state, meta.generation, state.registry_size())

    async def rebuild(self, progress: Progress | None = None) -> _Progress:
        """Fold the whole ledger into a fresh generation, then swap it in at once."""
        state = await state_at_position(self.ledger, self.config, progress=progress)
        meta = self._meta(state, uuid.uuid4().hex, state.registry_size())
        await self.store.replace_all(full_batch(state, meta))
        await self.store.publish(Change(state.position, None))
        if self.metrics is not None:
            self.metrics.rebuilds.inc()
        log.info("read_store_rebuilt", extra={"store": self.store.name, "position": state.position})
        return _Progress(state, meta.generation, meta.registry_size)

    def _meta(self, state: MeshState, generation: str, registry_size: int) -> Meta:
        return Meta(
            generation=generation,
            position=state.position,
            recorded_at=None if state.recorded_at is None else format_time(state.recorded_at),
            registry_size=registry_size,
            updated_at=format_time(self.clock()),
            config=self._config,
        )

    # -- projecting ---------------------------------------------------------------

    async def apply(self, progress: _Progress, records: Sequence[RecordedEvent]) -> None:
        """Fold ``records`` and write the changed documents with the new position, and
        the change notification with them.

        Bodies are decoded as the rebuild decodes them (``decode_for_fold``), so the
        live state and a rebuilt one come from the same structs."""
        state = progress.state
        before = state.position
        agents: set[str] = set()
        grants: set[str] = set()
        recount = False
        for record in records:
            event = decode_for_fold(record.body)
            agents.update(state.apply(event, record.position, record.recorded_at))
            if type(event) in _RECOUNT:
                recount = True
            grants.update(grants_touched(event))
        if state.position == before:
            return
        if recount:
            progress.registry_size = state.registry_size()
        meta = self._meta(state, progress.generation, progress.registry_size)
        await self.store.commit(
            batch_for(state, agents, grants, meta),
            expected=(progress.generation, before),
            change=Change(state.position, frozenset(agents)),
        )

    async def catch_up(self, progress: _Progress) -> int:
        """Apply everything committed so far; return how many events were applied.

        Positions are gap-free and in commit order, so a read that returns less than
        ``batch_size`` entries reached the head as it was when the read ran: it is the
        last read (none follows it only to find nothing)."""
        applied = 0
        while True:
            records = await self.ledger.read(progress.state.position, self.batch_size)
            if records:
                await self.apply(progress, records)
                applied += len(records)
            if len(records) < self.batch_size:
                self._caught_up(progress)
                return applied
            await self._export(progress)

    def _caught_up(self, progress: _Progress) -> None:
        """The gauges when a read reached the head: nothing was left to project then."""
        if self.metrics is None:
            return
        position = progress.state.position
        self.metrics.position.set(position)
        self.metrics.head.set(position)
        self.metrics.lag_events.set(0)
        self.metrics.lag_seconds.set(0)

    async def _export(self, progress: _Progress) -> None:
        """The gauges while behind (a full batch was read): the head and the age of
        the oldest entry not yet projected, asked of the ledger."""
        if self.metrics is None:
            return
        head = await self.ledger.head()
        lag = max(head.position - progress.state.position, 0)
        self.metrics.position.set(progress.state.position)
        self.metrics.head.set(head.position)
        self.metrics.lag_events.set(lag)
        if lag == 0:
            self.metrics.lag_seconds.set(0)
        else:
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
        pool. Either way the poll every ``poll_interval`` is the source of truth.

        ``still_leader`` (a query) and the store's emptiness (``meta``, a round trip)
        are asked on every poll, after every failure, and otherwise at most once per
        ``poll_interval``: not on each of the hundreds of wake-ups a second appends
        cause. Meanwhile a lost lock is fenced by the compare-and-set (a second
        leader's write moves the position this one expects), and an emptied store by
        the next write, which finds no generation."""
        progress: _Progress | None = None
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            if wake is None:
                wake = await stack.enter_async_context(self.ledger.listener())
            # ``stop`` also sets ``wake``, so an idle wait waits on ``wake`` alone: one
            # future and a timer per wait, not two tasks, a wait and their cancellation.
            waker = asyncio.ensure_future(_set_when(stop, wake))
            stack.callback(waker.cancel)
            confirmed = -math.inf  # when the lock was last confirmed
            intact = -math.inf  # when the store was last seen holding this generation
            last_read = -math.inf  # when the last read of the tail began
            while not stop.is_set():
                if loop.time() - confirmed >= self.poll_interval:
                    if not await still_leader():
                        return
                    confirmed = loop.time()
                try:
                    if progress is None:
                        progress = await self.load()
                        intact = loop.time()
                    early = last_read + self.read_interval - loop.time()
                    if early > 0:  # woken again soon after a read: let commits gather
                        await self.pause(early)
                    last_read = loop.time()
                    wake.clear()
                    if await self.catch_up(progress):
                        intact = loop.time()  # a write's compare-and-set found it intact
                    elif loop.time() - intact >= self.poll_interval:
                        if await self.store.meta() is None:
                            log.warning("read_store_rebuild", extra={"reason": "emptied"})
                            progress = None
                            continue
                        intact = loop.time()
                    if not await self._idle(stop, wake, progress.state.position):
                        confirmed = intact = -math.inf  # a poll: ask both again
                except StaleWriteError as exc:
                    log.warning("read_store_moved", extra={"error": str(exc)})
                    progress = None
                    confirmed = -math.inf
                except (ReadStoreError, ProjectionError, LedgerError, OSError) as exc:
                    # A failed query (failover, idle kill) is retried from the store's
                    # state: nothing half-applied survives, thanks to the compare-and-set.
                    log.warning("projection_failed", extra={"error": str(exc)})
                    progress = None
                    confirmed = -math.inf
                    await wait_any(stop, asyncio.Event(), self.poll_interval)

    async def _idle(self, stop: asyncio.Event, wake: asyncio.Event, position: int) -> bool:
        """Wait for entries after ``position`` to be notified, or ``stop``; False when
        ``poll_interval`` passed without either. A notification of entries up to
        ``position`` (a commit the last read already had: its NOTIFY came after the
        read) is no reason to read again."""
        while not stop.is_set():
            if isinstance(wake, Wakeup) and wake.seen(position):
                wake.clear()
            if wake.is_set():
                return True
            try:
                async with asyncio.timeout(self.poll_interval):
                    await wake.wait()
            except TimeoutError:
                return False
        return True

    def set_leader(self, value: bool) -> None:
        """Report leadership (the ``leader`` gauge)."""
        if self.metrics is not None:
            self.metrics.leader.set(1 if value else 0)


async def _set_when(stop: asyncio.Event, wake: asyncio.Event) -> None:
    await stop.wait()
    wake.set()


async def wait_any(stop: asyncio.Event, wake: asyncio.Event, seconds: float) -> bool:
    """Wait until ``stop`` or ``wake`` is set, or ``seconds`` pass; whether one was set."""
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        done, _ = await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return bool(done)
