"""``PostgresEventStore``: the append-only, hash-chained ledger (the writer).

Ordering. Every append transaction first locks the single ``ledger_head``
row (``SELECT … FOR UPDATE``) and reads the head under that lock. Positions
are therefore assigned in lock order, the lock is held through COMMIT, and a
transaction cannot take the lock until its predecessor's commit is visible:
commit order equals position order and positions are gap-free. A reader that
has seen position N has seen every position before N. (A bare sequence would
hand out values that commit out of order and leave gaps on rollback.)

Throughput. Serializing appends holds the lock through each WAL flush, so
appends are group-committed: concurrent ``append`` calls in one process queue
up and a single flusher writes everything queued in one transaction, so many
small appends cost one durable commit.

Round trips. The whole write of a batch is one statement (``write_statement``),
guarded by the head it was computed from: it moves the head only if the head is
still that one, and writes nothing otherwise. While this process is the only
writer, a batch is checked against what its own last commit left (``Known``:
keys, suspensions, stream versions, read once per agent) and committed by that
one statement alone, with no transaction held across the network (the "fast"
path). When the guard finds the head moved (another process appended), when a
check refuses something, or when a single-use id or idempotency key turns out to
be used already (their unique keys fail the statement), the batch is decided
again from one fresh lookup of the tables, then the same guarded statement (the
"optimistic" path: two round trips, still no lock held across the network, so
two processes prepare their next commits while one commits); after a few lost
races it takes the lock on the head row and decides there ("locked": lock,
lookup, write, commit), which always makes progress.

Turns. Processes appending to one ledger take turns rather than race: a session
advisory lock on the writer connection (``pg_advisory_lock``) is held for up to
``TURN_SECONDS`` of commits while a process has work, then handed to a process
waiting for it (``pg_advisory_unlock`` wakes the first waiter, which the lock
manager grants at once, so the releaser's ``pg_try_advisory_lock`` in the same
statement fails) or kept when none waits; a holder with nothing left to append
lets go after ``TURN_IDLE_SECONDS`` (``_release_when_idle``). Under contention
(another process waited for a turn or appended within ``CONTENDED_SECONDS``) a
holder hands the ledger over with a commit when nothing verified waits in its
queue: its next batch is still being verified, and the waiting process commits
its ready batch meanwhile, so one process's commit overlaps the others'
verification instead of waiting out the turn. On the fast path the hand-over is
part of the write statement itself (``write_statement(hand_over=…)``: no round
trip of its own); since it then runs before that statement commits, the writer
also holds ``COMMIT_LOCK`` (transaction-level, shared) until its commit is
visible. Otherwise it follows the commit (``_hand_over``, one round trip).
During its turn a process is the only writer, so its batches stay on the
one-round-trip path. Taking the ledger back is one round trip
(``ledger_take_turn``, migration 0009): the turn lock, then ``COMMIT_LOCK``
(so the commit it was handed over in is visible; waiting for it writes
nothing), then the entries appended since this process's own last commit
(``Known.catch_up``: stream versions taken, agents whose key or suspension
changed forgotten, the tree's edge carried over them). A write that was to hand
over and fails on a unique key loses the hand-over's answer; the process lets
the turn go (``_forget_turn``). A wait for the turn ends after
``TURN_WAIT_SECONDS`` (a holder that froze, or whose node went away with its
connection left open, holds the lock until PostgreSQL notices: hours, with
default TCP keepalives); the process then appends without turns for
``TURNS_OFF_SECONDS``. Turns are an economy, never the guarantee: every
commit is still the guarded statement, so a writer that does not take turns (one
behind a transaction pooler, ``?pooler=transaction``, where session locks do not
exist, and which therefore never takes them) only costs retries.

Signatures are checked before the commit (``ledger.postgres.signers``); the
rules of who may sign what, and the rows a batch writes, are the pure
``ledger.postgres.batch``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

import asyncpg
from opentelemetry import trace

from ledger import authority, tlog
from ledger.chain import (
    AppendResult,
    Checkpoint,
    Head,
)
from ledger.errors import (
    EventValidationError,
    LedgerError,
    StoreUnavailableError,
)
from ledger.events import (
    Event,
)
from ledger.identity import SigningKey, VerifyKey
from ledger.merkle import Frontier
from ledger.postgres.batch import (
    CATCH_UP_LIMIT,
    LOOKUP_SQL,
    STATE_SQL,
    TAKE_TURN_SQL,
    BatchState,
    Known,
    Partition,
    Request,
    apply,
    event_key,
    load_row,
    needs,
    new_request,
    partitions_of,
    retired,
    seal,
    write_statement,
)
from ledger.postgres.checkpoints import CheckpointPolicy
from ledger.postgres.dsn import pooler_of
from ledger.postgres.identity import claim_identity
from ledger.postgres.reader import (
    DRIVER_ERRORS,
    PostgresLedgerReader,
    create_pool,
    partition_ddl,
)
from ledger.postgres.signers import Signers
from ledger.postgres.tree import build_tree
from ledger.signatures import Signer
from ledger.signed import SignedEvent
from ledger.timefmt import parse_time, utc_now

__all__ = ["PostgresEventStore", "event_key"]

# Attempts of the two-round-trip path before a batch takes the head lock.
_OPTIMISTIC_TRIES = 3  # event_key: the single-use index's key
# The advisory lock processes appending to one database take turns on (see "Turns"),
# and the longest a process keeps the ledger while another waits for it.
TURN_LOCK = 0x414D4C454447  # "AMLEDG" in ASCII (the projector leader's is "AMPROJ")
TURN_SECONDS = 0.025
# Held (shared, to the end of its transaction) by a write that hands the turn over before
# it commits; the next holder waits for it before reading (``ledger_take_turn``).
COMMIT_LOCK = 0x414D4C454448  # "AMLEDH"
# A process that has had nothing to append for this long lets the others have the ledger.
TURN_IDLE_SECONDS = 0.005
# The longest a process waits for its turn; then it appends without turns (guarded
# writes, still correct) for TURNS_OFF_SECONDS: a holder that froze, or whose node went
# away leaving its TCP connection open, never stalls the other writers for long.
TURN_WAIT_SECONDS = 1.0
TURNS_OFF_SECONDS = 5.0
# The locked path holds the head row's lock across round trips: if its process freezes
# (SIGSTOP, a long pause) or its node goes away with the TCP connection left open, every
# other writer's guarded statement waits on that row. PostgreSQL ends a session idle in
# its transaction this long (its transaction rolls back: nothing it had was
# acknowledged), so the others go on. Set for that transaction only (``SET LOCAL``: no
# session setting to leak through a transaction pooler), in the message that takes the
# lock. Far above a live holder's pauses (a lookup, the checks of one batch, a write).
HEAD_LOCK_IDLE_SECONDS = 10.0


def lock_head_sql() -> str:
    """BEGIN, the idle bound, and the ledger's lock (the head row), in one message."""
    idle_ms = round(HEAD_LOCK_IDLE_SECONDS * 1000)  # an int: SET takes no parameter
    return (
        f"BEGIN; SET LOCAL idle_in_transaction_session_timeout = {idle_ms}; "  # noqa: S608
        "SELECT 1 FROM ledger_head WHERE id = 1 FOR UPDATE"
    )


# After another process waited for the ledger or appended to it, for this long a holder
# hands the ledger over after each commit that leaves nothing verified in its queue; a
# process alone never does (no extra round trip).
CONTENDED_SECONDS = 1.0
# Give the turn up if another process waits for it (the lock manager grants the lock
# to the first waiter at the unlock, so the try fails), else keep it.
_HAND_OVER_SQL = "SELECT pg_advisory_unlock($1) AS released, pg_try_advisory_lock($1) AS kept"

log = logging.getLogger("agentmesh.ledger")
# A no-op unless the process configured an OpenTelemetry tracer provider.
_tracer = trace.get_tracer("agentmesh.ledger")


def _tracing() -> bool:
    """Whether a tracer provider is configured (a no-op span still costs ~15 µs)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


_DRIVER_ERRORS = DRIVER_ERRORS
# Errors caused by what a request carries (class 22 data exceptions, e.g. a NUL in
# text; class 23 constraint violations), as opposed to the database being unwell.
_DATA_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)

Clock = Callable[[], datetime]


class PostgresEventStore(PostgresLedgerReader):
    """The ledger on PostgreSQL. Create with ``await PostgresEventStore.open(...)``."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        ledger_key: SigningKey,
        *,
        clock: Clock = utc_now,
        checkpoint_every: int = 1000,
        checkpoint_interval: float = 60.0,
        max_batch: int = 2000,
        turns: bool = True,
    ) -> None:
        super().__init__(pool)
        self._ledger_key = ledger_key
        self._clock = clock
        self._checkpoints = CheckpointPolicy(
            ledger_key, clock, checkpoint_every, timedelta(seconds=checkpoint_interval)
        )
        self._max_batch = max_batch
        self._queue: asyncio.Queue[Request] = asyncio.Queue()
        self._incoming: asyncio.Queue[Request] = asyncio.Queue()
        self._signers = Signers(pool, ledger_key)
        self._partitions: set[Partition] = set()  # day partitions known to exist
        self._known = Known()
        self._conn: asyncpg.Connection | None = None  # the flusher's (see _writer)
        self._flush_lock = asyncio.Lock()  # whoever holds it commits (see _submit)
        self._in_flight = 0  # appends submitted and not yet answered
        # Commits by path: "fast" (one guarded statement), "optimistic" (a fresh lookup,
        # then the guarded statement), "locked" (under the head lock).
        self.commit_paths: collections.Counter[str] = collections.Counter()
        # "waited": turns this process waited for (another process had the ledger);
        # "offered"/"handed": hand-overs after a commit tried / taken by a waiting process;
        # "caught_up": entries of other processes read on taking the ledger back;
        # "dropped": turns let go after a write that was to hand over failed;
        # "timed_out": waits for a turn given up (TURN_WAIT_SECONDS; see _take_turn);
        # "missed": guarded writes that found the head moved (a writer not taking turns).
        self.turn_counts: collections.Counter[str] = collections.Counter()
        self._frontier: tuple[bytes, Frontier] | None = None  # (head hash, edge) last commit
        self._verifier: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._turns = turns  # take turns with other processes (see "Turns")
        self._turn_ends: float | None = None  # when this process's turn ends; None: not its turn
        self._contended_until = 0.0  # hand over after commits until then (see _hand_over)
        self._offered = False  # the last write offered the turn (see _hand_over)
        self._turns_off_until = 0.0  # no turns until then: a wait for one timed out
        self._idle_check: asyncio.TimerHandle | None = None
        self._last_flush = 0.0  # the loop's time when the last flush ended
        # Whether appends are traced, decided once (a tracer provider is configured
        # before the ledger is opened; asking OpenTelemetry reads the environment).
        self._traced = _tracing()
        self._keeper: asyncio.Task[None] | None = None  # the latest idle release
        self._closed = False

    # -- lifecycle ---------------------------------------------------------

    @classmethod
    async def open(
        cls,
        url: str,
        ledger_key: SigningKey,
        *,
        clock: Clock = utc_now,
        checkpoint_every: int = 1000,
        checkpoint_interval: float = 60.0,
        pool_size: int = 8,
    ) -> PostgresEventStore:
        pool = await create_pool(url, pool_size)
        store = cls(
            pool,
            ledger_key,
            clock=clock,
            checkpoint_every=checkpoint_every,
            checkpoint_interval=checkpoint_interval,
            turns=pooler_of(url) == "none",  # no session locks through a transaction pooler
        )
        try:
            await store._start()
        except BaseException:
            await pool.close()  # a refused start leaves no connection behind
            raise
        return store

    async def _start(self) -> None:
        await self._claim_identity()
        await build_tree(self._pool)
        latest = await self.latest_checkpoint()
        if latest is not None:
            self._checkpoints.signed(latest.position, parse_time(latest.time))
        self._verifier = asyncio.create_task(
            self._signers.verify_loop(self._incoming, self._queue, self._fail),
            name="ledger-verifier",
        )
        self._flusher = asyncio.create_task(self._flush_loop(), name="ledger-flusher")
        self._ticker = asyncio.create_task(self._checkpoint_ticker(), name="ledger-checkpoints")

    async def _claim_identity(self) -> None:
        await claim_identity(self._pool, self._ledger_key, self._clock())

    async def _frontier_at_head(self, head: Head) -> Frontier:
        """The tree's right edge at the head (called under the head lock).

        Kept in memory from this process's last commit while the head is still the
        one it committed (same position *and* hash); otherwise — another process
        appended, or someone rewrote the tables — derived from the stored subtrees
        and the last few entries, which every commit writes. So nothing is
        rewritten in place per commit (no frontier in the head row, no WAL for
        it), and the tree always describes the rows the chain continues from."""
        if self._frontier is not None:
            entry_hash, frontier = self._frontier
            if frontier.size == head.position and entry_hash == head.entry_hash:
                return frontier
        return await self.frontier_at(head.position)

    async def close(self) -> None:
        """Finish every queued append, then release connections."""
        if self._closed:
            return
        self._closed = True
        await self._incoming.join()
        await self._queue.join()
        if self._idle_check is not None:
            self._idle_check.cancel()
        for task in (self._verifier, self._flusher, self._ticker, self._keeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        async with self._flush_lock:  # a commit from a caller's task may be running
            await self._drop_writer()
        await self._pool.close()
        self._signers.close()

    @property
    def ledger_key(self) -> VerifyKey:
        return self._ledger_key.public

    @property
    def ledger_did(self) -> str:
        return self._ledger_key.did

    @property
    def signer(self) -> Signer:
        """The ledger key, typed as the narrow ``Signer`` (``ledger.ports.LedgerWriter``)."""
        return self._ledger_key

    # -- appending ---------------------------------------------------------

    async def append(
        self,
        events: Sequence[SignedEvent],
        *,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
        bootstrap: bool = False,
    ) -> AppendResult:
        """Append events of one stream atomically; return their positions.

        ``expected_version`` is the stream's version before the append (0 for a
        new stream); a mismatch raises ConcurrencyError. A retry with the same
        ``idempotency_key`` (scoped by signer) and the same events returns the
        original result with ``duplicate=True`` and appends nothing. Every event
        must pass ``ledger.authority.check`` under the ledger lock. ``bootstrap``
        appends only while the ledger holds no registration (the first agent
        of a fresh install), decided under the same lock.
        """
        if self._closed:
            raise StoreUnavailableError("the event store is closed")
        request = new_request(events, expected_version, idempotency_key)
        request.bootstrap = bootstrap
        if not self._traced:
            return await self._submit(request)
        with _tracer.start_as_current_span("ledger.append") as span:
            span.set_attribute("ledger.events", len(request.events))
            span.set_attribute("ledger.stream_id", request.stream_id)
            result = await self._submit(request)
            span.set_attribute("ledger.position", result.positions[-1])
            return result

    async def _submit(self, request: Request) -> AppendResult:
        """Queue a request for the verifier and the flusher; or, when it is the only
        append in flight and its signatures are quick to check, commit it from the
        caller's own task (no hand-off between tasks: a lone appender waits for its
        commit, nothing else). Concurrent appends always queue, so they share commits."""
        self._in_flight += 1
        try:
            if (
                self._in_flight == 1
                and not self._flush_lock.locked()
                and self._signers.verified_here(request)
            ):
                async with self._flush_lock:
                    try:
                        await self._flush_isolated([request])
                        await self._hand_over()
                    except Exception as exc:  # as the flusher: never leave the caller hanging
                        log.exception("ledger_flusher_error")
                        self._fail([request], StoreUnavailableError(f"append not committed: {exc}"))
                self._release_when_idle()
            else:
                self._incoming.put_nowait(request)
            return await request.future
        finally:
            self._in_flight -= 1

    async def append_own(
        self,
        event: Event,
        *,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
    ) -> AppendResult:
        """Sign an event with the ledger's key (server-originated) and append it."""
        signed = SignedEvent.create(event, self._ledger_key)
        return await self.append(
            [signed], expected_version=expected_version, idempotency_key=idempotency_key
        )

    def sign_own(self, event: Event) -> SignedEvent:
        return SignedEvent.create(event, self._ledger_key)

    # -- the flusher: one transaction per batch ------------------------------

    async def _flush_loop(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                async with self._flush_lock:  # one flush at a time (see _submit)
                    await self._flush_isolated(batch, top_up=True)
                    await self._hand_over()
            except Exception as exc:  # never let the flusher die with callers waiting
                log.exception("ledger_flusher_error")
                self._fail(batch, StoreUnavailableError(f"append not committed: {exc}"))
            finally:
                for _ in batch:
                    self._queue.task_done()
            self._release_when_idle()

    async def _flush_isolated(self, batch: list[Request], *, top_up: bool = False) -> None:
        """Flush a group commit; if the database refuses its *data*, flush each
        request alone, so one request's bad bytes never fail another's append."""
        try:
            await self._flush(batch, top_up=top_up)
        except _DATA_ERRORS as exc:
            if len(batch) == 1:
                log.warning("ledger_append_refused", extra={"error": str(exc)})
                self._fail(batch, EventValidationError(f"the database refused the event: {exc}"))
                return
            for request in batch:
                await self._flush_isolated([request])
        except _DRIVER_ERRORS as exc:
            log.warning("ledger_append_failed", extra={"error": str(exc)})
            self._fail(batch, StoreUnavailableError(f"append not committed: {exc}"))

    async def _next_batch(self) -> list[Request]:
        batch = [await self._queue.get()]
        while len(batch) < self._max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    @staticmethod
    def _fail(batch: list[Request], error: LedgerError) -> None:
        for request in batch:
            if not request.future.done():
                request.future.set_exception(error)

    async def _flush(self, batch: list[Request], *, top_up: bool = False) -> None:
        refusal = retired(self._known.ledger_did, self._ledger_key.did)
        if refusal is not None:  # this process committed a rotation of its own key
            self._fail(batch, refusal)
            return
        try:
            await self._take_turn()
            state = await self._flush_fast(batch)
            path = "fast"
            for _ in range(_OPTIMISTIC_TRIES if state is None else 0):
                state = await self._flush_optimistic(batch, top_up=top_up)
                if state is not None:
                    path = "optimistic"
                    break
            if state is None:
                state, path = await self._flush_locked(batch, top_up=top_up), "locked"
        except BaseException:
            await self._drop_writer()  # a broken connection is not reused
            raise
        if state.rows:
            self.commit_paths[path] += 1
        self._committed(state)

    async def _flush_fast(self, batch: list[Request]) -> BatchState | None:
        """One round trip, no lock held across the network: check the batch against
        what this process's own last commit left (``Known``), then write it in one
        statement guarded by that head. ``None`` when the locked path must decide:
        another writer moved the head, a check refused something (refusals are
        decided under the lock, from the tables), an id or key was used before, or
        a new day's partition is needed."""
        known = self._known
        head = known.head
        if head is None or time.monotonic() < known.contended_until:
            return None
        dids, streams = needs(batch)
        missing_dids = [d for d in dids if d not in known.keys]
        missing_streams = [s for s in streams if s not in known.versions]
        conn = await self._writer()
        if missing_dids or missing_streams:
            # Read without the lock: valid only if the head is still ``head`` when
            # the guarded write runs, which the write checks.
            rows = await conn.fetch(STATE_SQL, missing_dids, missing_streams)
            known.learn(rows, missing_dids, missing_streams)
        frontier = await self._frontier_at_head(head)
        state = known.batch_state(
            head, frontier, self._now(head), self._ledger_key.did, dids, streams
        )
        for request in batch:
            apply(request, state)
        if any(isinstance(outcome, LedgerError) for _, outcome in state.results):
            return None
        if not self._partitions.issuperset(partitions_of(state)):
            return None
        seal(state)
        checkpoint = self._checkpoints.for_batch(state)
        hand_over = (TURN_LOCK, COMMIT_LOCK) if self._may_hand_over() else None
        try:
            sql, args = write_statement(head, state, checkpoint, hand_over)
            wrote = await conn.fetch(sql, *args)
        except asyncpg.UniqueViolationError:
            if hand_over is not None:
                await self._forget_turn(conn)
            return None  # a replay or a retry: the locked path answers it
        if not wrote:
            known.miss()  # another process appended: its changes are unknown here
            self.turn_counts["missed"] += 1
            return None
        if hand_over is not None:
            self._offered = True  # no second offer after this commit (_hand_over)
            self._handed_over(wrote[0])
        state.checkpoint = checkpoint
        return state

    async def _flush_optimistic(
        self, batch: list[Request], *, top_up: bool = False
    ) -> BatchState | None:
        """The batch checked against one fresh lookup of the tables (no lock held),
        then the guarded statement: two round trips. ``None`` when another writer
        committed in between (the guard or a unique key says so): try again."""
        conn = await self._writer()
        head, state = await self._decide(conn, batch, top_up=top_up)
        if not state.rows:
            return state  # every request refused, from a consistent snapshot
        if not self._partitions.issuperset(partitions_of(state)):
            return None  # a new day's partition is created under the lock
        checkpoint = self._checkpoints.for_batch(state)
        try:
            sql, args = write_statement(head, state, checkpoint)
            wrote = await conn.fetch(sql, *args)
        except asyncpg.UniqueViolationError:
            return None  # an id or key committed by another writer since the lookup
        if not wrote:
            return None
        state.checkpoint = checkpoint
        return state

    async def _flush_locked(self, batch: list[Request], *, top_up: bool = False) -> BatchState:
        """The batch under the head lock, checked against the tables themselves:
        four round trips (begin and lock, lookup, write, commit); always makes
        progress, whatever other writers do."""
        conn = await self._writer()
        # BEGIN and the ledger's lock (the head row: see the module docstring) in one
        # message; the lookup after it takes its snapshot once the lock is held, so it
        # sees everything the previous holder committed.
        await conn.execute(lock_head_sql())
        try:
            head, state = await self._decide(conn, batch, top_up=top_up)
            if state.rows:
                await self._ensure_partitions(conn, partitions_of(state))
                checkpoint = self._checkpoints.for_batch(state)
                sql, args = write_statement(head, state, checkpoint)
                wrote = await conn.fetch(sql, *args)
                assert wrote, "the head moved under the ledger lock"
                state.checkpoint = checkpoint
            await conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(*_DRIVER_ERRORS):
                await conn.execute("ROLLBACK")
            raise
        return state

    async def _decide(
        self, conn: asyncpg.Connection, batch: list[Request], *, top_up: bool
    ) -> tuple[Head, BatchState]:
        """Look the batch up (head, keys, streams, idempotency keys, single-use ids:
        one round trip, one snapshot) and apply every request to it. With ``top_up``
        (the flusher's own batch), what queued meanwhile joins first: while another
        process holds the ledger, this one's commits grow rather than multiply."""
        while top_up and len(batch) < self._max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())  # the flush loop counts them done
        dids, streams = needs(batch)
        ids = {
            (event_key(s.actor, s.event.event_id), day)
            for r in batch
            for s in r.events
            if s.event.event_id is not None
            and (day := authority.single_use_day(s.event)) is not None
        }
        idem = {r.scope for r in batch if r.scope is not None and r.day is not None}
        rows = await conn.fetch(
            LOOKUP_SQL,
            list(dids),
            list(streams),
            [s for s, _, _ in idem],
            [k for _, k, _ in idem],
            [d for _, _, d in idem],
            [k for k, _ in ids],
            [d for _, d in ids],
        )
        found = next(r for r in rows if r["kind"] == "h")
        head = Head(found["a"], bytes(found["raw"]), found["t"])
        frontier = await self._frontier_at_head(head)
        if head != self._known.head:
            self._known.reset(head)
        self._known.learn(rows, list(dids), list(streams))
        state = self._known.batch_state(
            head, frontier, self._now(head), self._ledger_key.did, dids, streams
        )
        for lookup in rows:
            load_row(state, lookup)
        refusal = retired(self._known.ledger_did, self._ledger_key.did)
        for request in batch:  # another process rotated the ledger key: refuse all
            if refusal is None:
                apply(request, state)
            else:
                state.results.append((request, refusal))
        if state.rows:
            seal(state)
        return head, state

    async def _writer(self) -> asyncpg.Connection:
        """The flusher's own connection, held between batches: no pool round trip
        (asyncpg resets a released connection with a query) per commit."""
        if self._conn is None or self._conn.is_closed():
            self._conn = await self._pool.acquire()
        return self._conn

    async def _drop_writer(self) -> None:
        self._turn_ends = None  # a session lock ends with its session (asyncpg's reset
        conn, self._conn = self._conn, None  # query unlocks it on a pooled one)
        if conn is not None:
            with contextlib.suppress(*_DRIVER_ERRORS):
                await self._pool.release(conn)

    # -- turns (see the module docstring) ----------------------------------

    async def _take_turn(self) -> None:
        """Make sure it is this process's turn to write (called under the flush lock)."""
        if not self._turns:
            return
        now = time.monotonic()
        if (self._turn_ends is not None and now < self._turn_ends) or now < self._turns_off_until:
            return
        conn = await self._writer()
        if self._turn_ends is not None:
            # The turn is over: hand the ledger to a process waiting for it, if any.
            row = await conn.fetchrow(_HAND_OVER_SQL, TURN_LOCK)
            if row["released"] and row["kept"]:
                self._turn_ends = now + TURN_SECONDS  # nobody was waiting: nothing to catch up
                return
            self._turn_ends = None
        # Wait for the turn, then read what others appended meanwhile: one round trip
        # (``ledger_take_turn``: the lock, the previous holder's commit, the entries).
        known, edge = self._known, self._frontier
        head = known.head
        carry = head is not None and edge is not None and edge[0] == head.entry_hash
        rows = await conn.fetch(
            TAKE_TURN_SQL,
            TURN_LOCK,
            COMMIT_LOCK,
            round(TURN_WAIT_SECONDS * 1000),
            head.position if carry and head is not None else None,
            head.recorded_at if carry and head is not None else None,
            CATCH_UP_LIMIT + 1,
        )
        if rows[0]["waited"]:
            self.turn_counts["waited"] += 1
            self._contended_until = time.monotonic() + CONTENDED_SECONDS
        if not rows[0]["turn"]:
            # The holder kept the ledger past any turn: go on without turns for a while.
            self.turn_counts["timed_out"] += 1
            self._turns_off_until = time.monotonic() + TURNS_OFF_SECONDS
            log.warning("ledger_turn_timed_out", extra={"waited_seconds": TURN_WAIT_SECONDS})
            return
        self._turn_ends = time.monotonic() + TURN_SECONDS
        if not carry:
            known.reset(None)
            return
        self._catch_up(rows[1:])

    def _catch_up(self, rows: Sequence[asyncpg.Record]) -> None:
        """Carry ``Known`` and the tree's edge over the entries appended since this
        process's last commit, so the turn's batches stay on the one-round-trip path;
        the guarded write checks the result, as always. When there is nothing to
        carry over, the first batch looks the tables up."""
        known, edge = self._known, self._frontier
        head = known.head
        assert head is not None
        assert edge is not None
        if len(rows) > CATCH_UP_LIMIT:
            known.reset(None)
            return
        if rows:
            self._contended_until = time.monotonic() + CONTENDED_SECONDS
        new_head = known.catch_up(rows)
        if new_head is None:
            return
        if new_head != head:
            frontier = edge[1].extend(tlog.entry_leaf(bytes(r["entry_hash"])) for r in rows)
            self._frontier = (new_head.entry_hash, frontier)
        self.turn_counts["caught_up"] += len(rows)

    def _may_hand_over(self) -> bool:
        """Whether to offer the turn with this commit: this process holds it, others
        contend for the ledger, and nothing verified waits in its queue."""
        return (
            self._turn_ends is not None
            and self._queue.empty()
            and time.monotonic() < self._contended_until
        )

    def _handed_over(self, row: asyncpg.Record) -> None:
        """The answer to an offer of the turn (``_HAND_OVER_TAIL`` or ``_HAND_OVER_SQL``)."""
        self.turn_counts["offered"] += 1
        if not row["kept"]:
            self._turn_ends = None
            self.turn_counts["handed"] += 1

    async def _forget_turn(self, conn: asyncpg.Connection) -> None:
        """A write that was to hand the turn over failed (a single-use id or key used
        before): its hand-over ran, as the unique keys are checked after it, and its
        answer is lost, so whether this process still holds the turn is unknown. Let go
        of it: holding no lock is a state this process knows."""
        self._turn_ends = None
        self.turn_counts["dropped"] += 1
        try:
            await conn.execute("SELECT pg_advisory_unlock_all()")
        except _DRIVER_ERRORS:
            await self._drop_writer()

    async def _hand_over(self) -> None:
        """After a commit (under the flush lock) whose write did not offer the turn
        itself (not the fast path, or the queue was not empty then): while other
        processes contend for the ledger and nothing verified waits in this process's
        queue, give the turn to a process waiting for it now, rather than hold it while
        this process verifies its next batch. One round trip; kept when none waits. A
        process alone (no contention within ``CONTENDED_SECONDS``) never asks."""
        offered, self._offered = self._offered, False
        conn = self._conn
        if offered or conn is None or not self._may_hand_over():
            return
        try:
            row = await conn.fetchrow(_HAND_OVER_SQL, TURN_LOCK)
        except _DRIVER_ERRORS as exc:
            self.turn_counts["offered"] += 1
            log.warning("ledger_turn_release_failed", extra={"error": str(exc)})
            await self._drop_writer()
            return
        self._handed_over(row)

    def _release_when_idle(self) -> None:
        """After a flush: once this process has had nothing to append for
        ``TURN_IDLE_SECONDS``, let go of the ledger, so an idle process never holds
        up the others (a busy one hands over at the end of its turn instead). One
        timer at a time: it looks at when the last flush ended when it fires."""
        if self._turn_ends is None or self._closed:
            return
        loop = asyncio.get_running_loop()
        self._last_flush = loop.time()
        if self._idle_check is None:
            self._idle_check = loop.call_at(
                self._last_flush + TURN_IDLE_SECONDS, self._idle_release
            )

    def _idle(self) -> bool:
        return not self._in_flight and self._queue.empty() and not self._flush_lock.locked()

    def _idle_release(self) -> None:
        self._idle_check = None
        if self._turn_ends is None or self._closed:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._last_flush + TURN_IDLE_SECONDS:  # flushed since: wait on
            self._idle_check = loop.call_at(
                self._last_flush + TURN_IDLE_SECONDS, self._idle_release
            )
            return
        if self._idle():
            self._keeper = asyncio.create_task(self._release_turn(), name="ledger-turn-release")

    async def _release_turn(self) -> None:
        async with self._flush_lock:
            if self._turn_ends is None or self._conn is None or self._in_flight:
                return  # appends came in meanwhile: the turn goes on
            try:
                await self._conn.execute("SELECT pg_advisory_unlock($1)", TURN_LOCK)
                self._turn_ends = None
            except _DRIVER_ERRORS as exc:
                log.warning("ledger_turn_release_failed", extra={"error": str(exc)})
                await self._drop_writer()

    def _committed(self, state: BatchState) -> None:
        """After COMMIT (or with nothing to write): remember, then answer."""
        if state.rows:
            # The tree's edge is now the new head's (see _frontier_at_head).
            self._frontier = (state.head.entry_hash, state.frontier)
            self._known.committed(state)
            self._partitions.update(partitions_of(state))
            for did, (raw, _, _) in state.key_rows.items():
                self._signers.keys[did] = raw
            if state.checkpoint is not None:
                self._checkpoints.signed(state.checkpoint[0], state.checkpoint[2])
        # Only now, after COMMIT, is anything acknowledged.
        for request, outcome in state.results:
            if request.future.done():
                continue
            if isinstance(outcome, LedgerError):
                request.future.set_exception(outcome)
            else:
                request.future.set_result(outcome)

    def _now(self, head: Head) -> datetime:
        # Time never runs backwards in the ledger, whatever the injected clock says.
        return max(self._clock(), head.recorded_at)

    async def _ensure_partitions(self, conn: asyncpg.Connection, days: set[Partition]) -> None:
        """Create the day partitions a batch writes into (under the head lock, so
        concurrent writers cannot race to create one); remembered after COMMIT."""
        for table, day in sorted(days - self._partitions):
            await conn.execute(partition_ddl(table, day))

    # -- checkpoints -------------------------------------------------------

    async def _insert_checkpoint(
        self, conn: asyncpg.Connection, head: Head, frontier: Frontier
    ) -> Checkpoint:
        checkpoint, note = self._checkpoints.sign(head, frontier)
        await conn.execute(
            "INSERT INTO checkpoints (position, head_hash, time, signer, signature, note) "
            "VALUES ($1, $2, $3, $4, decode($5, 'base64'), $6) ON CONFLICT (position) DO NOTHING",
            checkpoint.position,
            head.entry_hash,
            parse_time(checkpoint.time),
            checkpoint.signer,
            checkpoint.signature,
            note,
        )
        self._checkpoints.signed(head.position, parse_time(checkpoint.time))
        return checkpoint

    async def checkpoint(self) -> Checkpoint:
        """Sign the current head now (idempotent per position) and return the checkpoint."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                # The head and the ledger's key in one snapshot: a retired key never
                # signs a head that includes its rotation.
                row = await conn.fetchrow(
                    "SELECT position, entry_hash, h.recorded_at, did FROM ledger_head h, "
                    "ledger_identity i WHERE h.id = 1 AND i.id = 1"
                )
                head = Head(row["position"], bytes(row["entry_hash"]), row["recorded_at"])
                existing = await self._checkpoint_at(conn, head.position)
                if existing is not None:
                    return existing
                refusal = retired(row["did"], self._ledger_key.did)
                if refusal is not None:
                    raise refusal
                frontier = await self.frontier_at(head.position)
                return await self._insert_checkpoint(conn, head, frontier)
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot write a checkpoint: {exc}") from exc

    async def _checkpoint_ticker(self) -> None:
        """Sign the head every ``checkpoint_interval`` when it moved and nobody did."""
        seconds = max(self._checkpoints.interval.total_seconds(), 0.05)
        while True:
            await asyncio.sleep(seconds)
            try:
                head = await self.head()
                if head.position > self._checkpoints.last[0] and self._checkpoints.due(
                    Head(head.position, head.entry_hash, max(self._clock(), head.recorded_at))
                ):
                    await self.checkpoint()
            except LedgerError as exc:
                log.warning("checkpoint_failed", extra={"error": str(exc)})
