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

Round trips. The whole write of a batch is one statement (``_WRITE_SQL``),
guarded by the head it was computed from: it moves the head only if the head is
still that one, and writes nothing otherwise. While this process is the only
writer, a batch is checked against what its own last commit left (``_Known``:
keys, suspensions, stream versions, read once per agent) and committed by that
one statement alone, with no transaction held across the network (the "fast"
path). When the guard finds the head moved (another process appended), when a
check refuses something, or when a single-use id or idempotency key turns out to
be used already (their unique keys fail the statement), the batch is decided
again under the lock from the tables themselves (the "locked" path: lock, one
lookup, the same statement, commit), and the process takes the lock for a while.

Signatures. Each event's signature is checked against its actor's key before
the transaction (on worker threads: Ed25519 verification releases the GIL),
and the key used is compared with the actor's *current* key inside the
transaction, under the lock, so a rotation racing the append cannot let a
retired key through.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
from opentelemetry import trace

from ledger import authority, tlog
from ledger.chain import (
    AppendResult,
    Checkpoint,
    Head,
    entry_hash,
    envelope_bytes,
    sign_checkpoint,
)
from ledger.errors import (
    ConcurrencyError,
    EventValidationError,
    IdempotencyConflictError,
    LedgerError,
    LedgerKeyMismatchError,
    NotPermittedError,
    SignatureError,
    StoreUnavailableError,
)
from ledger.events import (
    AgentKeyRotated,
    AgentRegistered,
    AgentReinstated,
    AgentSuspended,
    Event,
    stream_of,
    subject_agents,
)
from ledger.identity import SigningKey, VerifyKey
from ledger.merkle import Frontier, Subtree
from ledger.postgres.reader import (
    DRIVER_ERRORS,
    NOTIFY_CHANNEL,
    PostgresLedgerReader,
    create_pool,
    partition_name,
)
from ledger.signatures import Signer
from ledger.signed import SignedEvent
from ledger.timefmt import format_time, parse_time, utc_now

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
# Ed25519 verification releases the GIL: one thread per core.
_VERIFY_THREADS = max(os.cpu_count() or 1, 1)
# Up to this many signatures are verified on the event loop (~50 µs each).
_VERIFY_INLINE = 2


@dataclass(slots=True)
class _Request:
    events: tuple[SignedEvent, ...]
    stream_id: str
    expected_version: int | None
    idempotency_key: str | None
    digest: bytes
    keys_used: dict[str, bytes]
    future: asyncio.Future[AppendResult]
    bootstrap: bool = False

    @property
    def signer(self) -> str:
        """Whose idempotency keys this request's key is one of."""
        return self.events[0].actor


@dataclass(slots=True)
class _BatchState:
    """What the transaction learned and changed so far, request by request."""

    head: Head
    frontier: Frontier
    now: datetime
    ledger_did: str
    keys: dict[str, bytes | None]
    key_positions: dict[str, int]
    suspended_dids: dict[str, bool]
    ids: set[bytes]
    has_any_agent: bool
    versions: dict[str, int]
    done_keys: dict[tuple[str, str], tuple[bytes, AppendResult]]
    existing_streams: set[str] = field(default_factory=set)
    rows: list[tuple[object, ...]] = field(default_factory=list)
    stream_rows: dict[str, tuple[int, int]] = field(default_factory=dict)
    key_rows: dict[str, tuple[bytes, int, bool]] = field(default_factory=dict)
    idem_rows: list[tuple[object, ...]] = field(default_factory=list)
    id_rows: list[tuple[bytes, int]] = field(default_factory=list)
    leaves: list[bytes] = field(default_factory=list)
    nodes: list[Subtree] = field(default_factory=list)
    checkpoint: _CheckpointRow | None = None
    results: list[tuple[_Request, AppendResult | LedgerError]] = field(default_factory=list)


# A checkpoint signed with a commit: position, head hash, time, signer, signature
# (base64), C2SP note.
_CheckpointRow = tuple[int, bytes, datetime, str, str, str]
# After the guarded write found the head moved (another process appends), batches take
# the lock for this long before trying the one-round-trip path again.
_LOCKED_AFTER_MISS = 1.0
# Beyond this many agents and streams remembered, start over (they are re-learned).
_KNOWN_LIMIT = 1_000_000


@dataclass(slots=True)
class _Known:
    """What the write-side tables held after this process's last commit — keys and
    suspension of agents, stream versions, whether any agent exists — valid while
    the ledger head is still ``head``, i.e. nobody else appended since: the premise
    of ``PostgresEventStore._flush_fast``, which the guarded write re-checks. Learned
    from lookups and from this process's commits; forgotten whenever another writer
    shows (a head that is not ``head``)."""

    head: Head | None = None
    keys: dict[str, tuple[bytes, int, bool] | None] = field(default_factory=dict)
    versions: dict[str, int | None] = field(default_factory=dict)  # None: no such stream
    has_any_agent: bool = False
    locked_until: float = 0.0

    def reset(self, head: Head | None) -> None:
        self.head = head
        self.keys.clear()
        self.versions.clear()
        self.has_any_agent = False

    def miss(self) -> None:
        self.reset(None)
        self.locked_until = time.monotonic() + _LOCKED_AFTER_MISS

    def learn(
        self, rows: Sequence[asyncpg.Record], dids: Sequence[str], streams: Sequence[str]
    ) -> None:
        """Absorb a ``_STATE_SQL`` (or ``_LOOKUP_SQL``) answer for these agents and streams."""
        if len(self.keys) + len(self.versions) > _KNOWN_LIMIT:
            self.keys.clear()
            self.versions.clear()
        self.keys.update(dict.fromkeys(dids))
        self.versions.update(dict.fromkeys(streams))
        for row in rows:
            kind = row["kind"]
            if kind == "k":
                self.keys[row["id"]] = (bytes(row["raw"]), row["a"], bool(row["b"]))
            elif kind == "s":
                self.versions[row["id"]] = row["b"]
            elif kind == "a":
                self.has_any_agent = True

    def batch_state(
        self,
        head: Head,
        frontier: Frontier,
        now: datetime,
        ledger_did: str,
        dids: set[str],
        streams: set[str],
    ) -> _BatchState:
        state = _BatchState(
            head=head,
            frontier=frontier,
            now=now,
            ledger_did=ledger_did,
            keys=dict.fromkeys(dids),
            key_positions={},
            suspended_dids={},
            ids=set(),
            has_any_agent=self.has_any_agent,
            versions={},
            done_keys={},
        )
        for did in dids:
            known = self.keys[did]
            if known is not None:
                state.keys[did], state.key_positions[did], state.suspended_dids[did] = known
        for stream in streams:
            version = self.versions[stream]
            if version is not None:
                state.versions[stream] = version
                state.existing_streams.add(stream)
        return state

    def committed(self, state: _BatchState) -> None:
        self.head = state.head
        for did, row in state.key_rows.items():
            self.keys[did] = row
        for stream, (version, _) in state.stream_rows.items():
            self.versions[stream] = version
        self.has_any_agent = self.has_any_agent or state.has_any_agent


class _RequestView:
    """``authority.WriteView`` over the batch so far plus one request's own changes,
    which are dropped if any event of the request is refused (all or nothing)."""

    def __init__(self, state: _BatchState) -> None:
        self.state = state
        self.ledger_did = state.ledger_did
        self.keys: dict[str, bytes] = {}
        self.suspended_dids: dict[str, bool] = {}
        self.ids: set[bytes] = set()

    def key(self, did: str) -> bytes | None:
        return self.keys[did] if did in self.keys else self.state.keys.get(did)

    def suspended(self, did: str) -> bool:
        return self.suspended_dids.get(did, self.state.suspended_dids.get(did, False))

    def has_agents(self) -> bool:
        return bool(self.keys) or self.state.has_any_agent

    def seen(self, actor: str, event_id: str) -> bool:
        key = event_key(actor, event_id)
        return key in self.ids or key in self.state.ids

    def advance(self, event: Event) -> None:
        if event.event_id is not None:
            self.ids.add(event_key(event.actor, event.event_id))
        if isinstance(event, AgentRegistered | AgentKeyRotated):
            self.keys[event.did] = VerifyKey.from_pem(event.public_key).raw
        elif isinstance(event, AgentSuspended | AgentReinstated):
            self.suspended_dids[event.did] = isinstance(event, AgentSuspended)


# What the checks of a batch read: keys and suspension of the agents it names, the
# versions of its streams, and whether any agent is registered ($1, $2).
_STATE_SQL = """
SELECT 'k' AS kind, did AS id, public_key AS raw, position AS a, suspended::int AS b,
       NULL::text AS c, NULL::int AS d, NULL::timestamptz AS t
  FROM agent_keys WHERE did = ANY($1::text[])
UNION ALL
SELECT 's', stream_id, NULL, NULL, version, NULL, NULL, NULL
  FROM streams WHERE stream_id = ANY($2::text[])
UNION ALL
SELECT 'a', NULL, NULL, NULL, NULL, NULL, NULL, NULL WHERE EXISTS (SELECT 1 FROM agent_keys)
"""

# Under the lock, also the head, and the idempotency keys ($3, $4) and single-use
# event ids ($5) the batch carries, so a retry or a replay is answered, not refused.
_LOOKUP_SQL = (
    _STATE_SQL  # noqa: S608 -- constants only
    + """UNION ALL
SELECT 'h', NULL, entry_hash, position, NULL, NULL, NULL, recorded_at
  FROM ledger_head WHERE id = 1
UNION ALL
SELECT 'i', signer || ' ' || key, digest, first_position, count, stream_id, stream_version, NULL
  FROM idempotency_keys
 WHERE (signer, key) IN (SELECT * FROM unnest($3::text[], $4::text[]))
UNION ALL
SELECT 'e', NULL, key, position, NULL, NULL, NULL, NULL
  FROM event_ids WHERE key = ANY($5::bytea[])
"""
)

# The whole write of a batch in one statement, guarded by the head it was computed
# from: ``h`` moves the head only if it is still ($1, $2); every other part writes
# only if ``h`` did (data-modifying CTEs always run; each reads ``h``). Without an
# explicit transaction this is one round trip and one commit; inside the locked
# path the guard holds by construction. Returns one row when it wrote, none when
# another writer moved the head first. The single-use ids and idempotency keys are
# unique keys: a value used before fails the statement, and nothing is written.
_WRITE_SQL = """
WITH h AS (
  UPDATE ledger_head SET position = $3, entry_hash = $4, recorded_at = $5
   WHERE id = 1 AND position = $1 AND entry_hash = $2
  RETURNING 1
), ev AS (
  INSERT INTO events (position, recorded_at, stream_id, stream_version, event_type, actor,
                      subjects, body, signature, prev_hash, entry_hash)
  SELECT u.p, $5, u.s, u.v, u.t, u.a, string_to_array(u.j, ' '), u.b, u.g, u.ph, u.eh
    FROM unnest($6::bigint[], $7::text[], $8::int[], $9::text[], $10::text[], $11::text[],
                $12::bytea[], $13::bytea[], $14::bytea[], $15::bytea[])
         AS u(p, s, v, t, a, j, b, g, ph, eh)
   WHERE EXISTS (SELECT 1 FROM h)
), su AS (
  UPDATE streams SET version = u.v, last_position = u.p
    FROM unnest($16::text[], $17::int[], $18::bigint[]) AS u(s, v, p)
   WHERE streams.stream_id = u.s AND EXISTS (SELECT 1 FROM h)
), si AS (
  INSERT INTO streams (stream_id, version, last_position)
  SELECT * FROM unnest($19::text[], $20::int[], $21::bigint[]) WHERE EXISTS (SELECT 1 FROM h)
), k AS (
  INSERT INTO agent_keys (did, public_key, position, suspended)
  SELECT * FROM unnest($22::text[], $23::bytea[], $24::bigint[], $25::bool[])
   WHERE EXISTS (SELECT 1 FROM h)
  ON CONFLICT (did) DO UPDATE SET public_key = excluded.public_key,
    position = excluded.position, suspended = excluded.suspended
), i AS (
  INSERT INTO idempotency_keys
    (signer, key, first_position, count, stream_id, stream_version, digest, recorded_at)
  SELECT *, $5::timestamptz
    FROM unnest($26::text[], $27::text[], $28::bigint[], $29::int[], $30::text[], $31::int[],
                $32::bytea[])
   WHERE EXISTS (SELECT 1 FROM h)
), e AS (
  INSERT INTO event_ids (key, position)
  SELECT * FROM unnest($33::bytea[], $34::bigint[]) WHERE EXISTS (SELECT 1 FROM h)
), n AS (
  INSERT INTO merkle_nodes (level, idx, hash)
  SELECT * FROM unnest($35::smallint[], $36::bigint[], $37::bytea[])
   WHERE EXISTS (SELECT 1 FROM h)
  ON CONFLICT (level, idx) DO NOTHING
), c AS (
  INSERT INTO checkpoints (position, head_hash, time, signer, signature, note)
  SELECT u.p, u.h, u.t, u.s, decode(u.g, 'base64'), u.n
    FROM unnest($38::bigint[], $39::bytea[], $40::timestamptz[], $41::text[], $42::text[],
                $43::text[]) AS u(p, h, t, s, g, n)
   WHERE EXISTS (SELECT 1 FROM h)
  ON CONFLICT (position) DO NOTHING
)
SELECT pg_notify($44, $45) FROM h
"""


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
    ) -> None:
        super().__init__(pool)
        self._ledger_key = ledger_key
        self._clock = clock
        self._checkpoint_every = checkpoint_every
        self._checkpoint_interval = timedelta(seconds=checkpoint_interval)
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._incoming: asyncio.Queue[_Request] = asyncio.Queue()
        self._keys: dict[str, bytes] = {}
        self._verify_keys: dict[bytes, VerifyKey] = {}  # parsed once per key, not per event
        self._partitions: set[datetime] = set()  # days known to have a partition
        self._known = _Known()
        self._conn: asyncpg.Connection | None = None  # the flusher's (see _writer)
        self._flush_lock = asyncio.Lock()  # whoever holds it commits (see _submit)
        self._in_flight = 0  # appends submitted and not yet answered
        # Commits by path: "fast" (one guarded statement), "locked" (under the head lock).
        self.commit_paths: collections.Counter[str] = collections.Counter()
        self._frontier: tuple[bytes, Frontier] | None = None  # (head hash, edge) last commit
        self._last_checkpoint: tuple[int, datetime] = (0, clock())
        self._verify_pool = ThreadPoolExecutor(
            max_workers=_VERIFY_THREADS, thread_name_prefix="ed25519"
        )
        self._verifier: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
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
        )
        try:
            await store._start()
        except BaseException:
            await pool.close()  # a refused start leaves no connection behind
            raise
        return store

    async def _start(self) -> None:
        await self._claim_identity()
        await self._build_tree()
        latest = await self.latest_checkpoint()
        if latest is not None:
            self._last_checkpoint = (latest.position, parse_time(latest.time))
        self._verifier = asyncio.create_task(self._verify_loop(), name="ledger-verifier")
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

    async def _build_tree(self) -> None:
        """Build the Merkle tree over the entries appended before it existed (once;
        a ledger created since has its frontier from the first append on)."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    "SELECT position, merkle_built FROM ledger_head WHERE id = 1 FOR UPDATE"
                )
                if row["merkle_built"]:
                    return
                first = await conn.fetchval("SELECT min(position) FROM events")
                if first not in (None, 1):
                    raise StoreUnavailableError(
                        f"the ledger starts at position {first} (cut by retention before it had "
                        "a Merkle tree): its tree cannot be built from the entries left"
                    )
                frontier = await _build_frontier(conn, row["position"])
                await conn.execute("UPDATE ledger_head SET merkle_built = true WHERE id = 1")
                log.info("merkle_tree_built", extra={"size": frontier.size})
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot build the Merkle tree: {exc}") from exc

    async def close(self) -> None:
        """Finish every queued append, then release connections."""
        if self._closed:
            return
        self._closed = True
        await self._incoming.join()
        await self._queue.join()
        for task in (self._verifier, self._flusher, self._ticker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        async with self._flush_lock:  # a commit from a caller's task may be running
            await self._drop_writer()
        await self._pool.close()
        self._verify_pool.shutdown(wait=False)

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
        request = self._request(events, expected_version, idempotency_key)
        request.bootstrap = bootstrap
        if not _tracing():
            return await self._submit(request)
        with _tracer.start_as_current_span("ledger.append") as span:
            span.set_attribute("ledger.events", len(request.events))
            span.set_attribute("ledger.stream_id", request.stream_id)
            result = await self._submit(request)
            span.set_attribute("ledger.position", result.positions[-1])
            return result

    async def _submit(self, request: _Request) -> AppendResult:
        """Queue a request for the verifier and the flusher; or, when it is the only
        append in flight and its signatures are quick to check, commit it from the
        caller's own task (no hand-off between tasks: a lone appender waits for its
        commit, nothing else). Concurrent appends always queue, so they share commits."""
        self._in_flight += 1
        try:
            if (
                self._in_flight == 1
                and not self._flush_lock.locked()
                and self._verified_here(request)
            ):
                async with self._flush_lock:
                    try:
                        await self._flush_isolated([request])
                    except Exception as exc:  # as the flusher: never leave the caller hanging
                        log.exception("ledger_flusher_error")
                        self._fail([request], StoreUnavailableError(f"append not committed: {exc}"))
            else:
                self._incoming.put_nowait(request)
            return await request.future
        finally:
            self._in_flight -= 1

    def _verified_here(self, request: _Request) -> bool:
        """Verify a small request on the loop when every signer's key is known here;
        False sends it the long way (key lookups, re-checks, error answers)."""
        if len(request.events) > _VERIFY_INLINE:
            return False
        keys = {}
        for signed in request.events:
            if signed.actor not in self._keys and signed.actor != self._ledger_key.did:
                return False
            try:
                key = self._believed_key(signed)
            except LedgerError:
                return False
            if not key.is_valid(signed.signature, signed.body):
                return False
            keys[signed.actor] = key.raw
        request.keys_used.update(keys)
        return True

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

    def _request(
        self,
        events: Sequence[SignedEvent],
        expected_version: int | None,
        idempotency_key: str | None,
    ) -> _Request:
        if not events:
            raise EventValidationError("an append needs at least one event")
        streams = {stream_of(e.event) for e in events}
        if len(streams) != 1:
            raise EventValidationError(f"one append writes one stream, got {sorted(streams)}")
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 200:
            raise EventValidationError("an idempotency key is 1 to 200 characters")
        return _Request(
            events=tuple(events),
            stream_id=streams.pop(),
            expected_version=expected_version,
            idempotency_key=idempotency_key,
            digest=hashlib.sha256(b"\n".join(e.body for e in events)).digest(),
            keys_used={},
            future=asyncio.get_running_loop().create_future(),
        )

    # -- the verifier: signatures of everything queued, on worker threads ------

    async def _verify_loop(self) -> None:
        """Verify queued appends in bulk, then hand them to the flusher.

        One thread hand-off per batch rather than per append: per-call
        hand-offs convoy on the GIL and starve group commit of large batches.
        """
        while True:
            batch = [await self._incoming.get()]
            while not self._incoming.empty():
                batch.append(self._incoming.get_nowait())
            try:
                await self._verify_batch(batch)
            except LedgerError as exc:
                self._fail(batch, exc)
            except Exception as exc:  # never let the verifier die with callers waiting
                log.exception("ledger_verifier_error")
                self._fail(batch, StoreUnavailableError(f"append not verified: {exc}"))
            for request in batch:
                if not request.future.done():
                    self._queue.put_nowait(request)
                self._incoming.task_done()

    async def _verify_batch(self, batch: list[_Request]) -> None:
        await self._load_keys({e.actor for r in batch for e in r.events})
        jobs: list[tuple[_Request, SignedEvent, VerifyKey]] = []
        for request in batch:
            try:
                jobs.extend((request, e, self._believed_key(e)) for e in request.events)
            except LedgerError as exc:
                request.future.set_exception(exc)
        jobs = [j for j in jobs if not j[0].future.done()]
        if len(jobs) <= _VERIFY_INLINE:
            # A signature or two: verifying here costs less than the trip to a thread.
            chunks, results = [jobs], [_verify_all(jobs)]
        else:
            loop = asyncio.get_running_loop()
            chunks = [jobs[i::_VERIFY_THREADS] for i in range(_VERIFY_THREADS)]
            results = await asyncio.gather(
                *(loop.run_in_executor(self._verify_pool, _verify_all, chunk) for chunk in chunks)
            )
        for chunk, valid in zip(chunks, results, strict=True):
            for (request, signed, key), ok in zip(chunk, valid, strict=True):
                if request.future.done():
                    continue
                if not ok:
                    fresh = await self._recheck(signed)
                    if fresh is None:
                        request.future.set_exception(
                            SignatureError(
                                f"{signed.type}: signature by {signed.actor} does not verify"
                            )
                        )
                        continue
                    key = fresh
                request.keys_used[signed.actor] = key.raw

    async def _recheck(self, signed: SignedEvent) -> VerifyKey | None:
        """Our cached key may be stale (rotated by another process): ask once more."""
        if signed.actor == self._ledger_key.did or isinstance(signed.event, AgentRegistered):
            return None
        fresh = await self._fetch_key(signed.actor)
        if fresh is None or not VerifyKey.from_raw(fresh).is_valid(signed.signature, signed.body):
            return None
        return VerifyKey.from_raw(fresh)

    async def _load_keys(self, dids: set[str]) -> None:
        missing = [d for d in dids if d not in self._keys and d != self._ledger_key.did]
        if not missing:
            return
        try:
            rows = await self._pool.fetch(
                "SELECT did, public_key FROM agent_keys WHERE did = ANY($1::text[])", missing
            )
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot read agent keys: {exc}") from exc
        for row in rows:
            self._keys[row["did"]] = bytes(row["public_key"])

    def _believed_key(self, signed: SignedEvent) -> VerifyKey:
        event = signed.event
        if signed.actor == self._ledger_key.did:
            return self._ledger_key.public
        if isinstance(event, AgentRegistered) and event.actor == event.did:
            # Self-registration proves possession of the key being registered.
            return VerifyKey.from_pem(event.public_key)
        raw = self._keys.get(signed.actor)
        if raw is None:
            raise SignatureError(f"{signed.type}: unknown signer {signed.actor}")
        key = self._verify_keys.get(raw)
        if key is None:
            key = self._verify_keys[raw] = VerifyKey.from_raw(raw)
        return key

    async def _fetch_key(self, did: str) -> bytes | None:
        try:
            value = await self._pool.fetchval(
                "SELECT public_key FROM agent_keys WHERE did = $1", did
            )
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot read agent keys: {exc}") from exc
        if value is not None:
            self._keys[did] = bytes(value)
            return bytes(value)
        return None

    # -- the flusher: one transaction per batch ------------------------------

    async def _flush_loop(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                async with self._flush_lock:  # one flush at a time (see _submit)
                    await self._flush_isolated(batch, top_up=True)
            except Exception as exc:  # never let the flusher die with callers waiting
                log.exception("ledger_flusher_error")
                self._fail(batch, StoreUnavailableError(f"append not committed: {exc}"))
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _flush_isolated(self, batch: list[_Request], *, top_up: bool = False) -> None:
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

    async def _next_batch(self) -> list[_Request]:
        batch = [await self._queue.get()]
        while len(batch) < self._max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    @staticmethod
    def _fail(batch: list[_Request], error: LedgerError) -> None:
        for request in batch:
            if not request.future.done():
                request.future.set_exception(error)

    async def _flush(self, batch: list[_Request], *, top_up: bool = False) -> None:
        try:
            state = await self._flush_fast(batch)
            path = "fast"
            if state is None:
                state, path = await self._flush_locked(batch, top_up=top_up), "locked"
        except BaseException:
            await self._drop_writer()  # a broken connection is not reused
            raise
        if state.rows:
            self.commit_paths[path] += 1
        self._committed(state)

    async def _flush_fast(self, batch: list[_Request]) -> _BatchState | None:
        """One round trip, no lock held across the network: check the batch against
        what this process's own last commit left (``_Known``), then write it in one
        statement guarded by that head. ``None`` when the locked path must decide:
        another writer moved the head, a check refused something (refusals are
        decided under the lock, from the tables), an id or key was used before, or
        a new day's partition is needed."""
        known = self._known
        head = known.head
        if head is None or time.monotonic() < known.locked_until:
            return None
        dids, streams = _needs(batch)
        missing_dids = [d for d in dids if d not in known.keys]
        missing_streams = [s for s in streams if s not in known.versions]
        conn = await self._writer()
        if missing_dids or missing_streams:
            # Read without the lock: valid only if the head is still ``head`` when
            # the guarded write runs, which the write checks.
            rows = await conn.fetch(_STATE_SQL, missing_dids, missing_streams)
            known.learn(rows, missing_dids, missing_streams)
        frontier = await self._frontier_at_head(head)
        state = known.batch_state(
            head, frontier, self._now(head), self._ledger_key.did, dids, streams
        )
        for request in batch:
            self._apply(request, state)
        if any(isinstance(outcome, LedgerError) for _, outcome in state.results):
            return None
        if not self._partitions.issuperset(_partitions_of(state)):
            return None
        _seal(state)
        checkpoint = self._due_checkpoint(state)
        try:
            wrote = await conn.fetch(_WRITE_SQL, *_write_args(head, state, checkpoint))
        except asyncpg.UniqueViolationError:
            return None  # a replay or a retry: the locked path answers it
        if not wrote:
            known.miss()  # another process appended: its changes are unknown here
            return None
        state.checkpoint = checkpoint
        return state

    async def _flush_locked(self, batch: list[_Request], *, top_up: bool = False) -> _BatchState:
        """The batch under the head lock, checked against the tables themselves:
        four round trips (begin and lock, lookup, write, commit). With ``top_up``
        (the flusher's own batch), what queued while the lock was awaited — another
        process held it — joins this commit: contention makes commits larger."""
        conn = await self._writer()
        # BEGIN and the ledger's lock (the head row: see the module docstring) in one
        # message; the lookup after it takes its snapshot once the lock is held, so it
        # sees everything the previous holder committed.
        await conn.execute("BEGIN; SELECT 1 FROM ledger_head WHERE id = 1 FOR UPDATE")
        try:
            while top_up and len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())  # the flush loop counts them done
            dids, streams = _needs(batch)
            ids = {
                event_key(s.actor, s.event.event_id)
                for r in batch
                for s in r.events
                if s.event.event_id is not None
            }
            idem = {(r.signer, r.idempotency_key) for r in batch if r.idempotency_key is not None}
            rows = await conn.fetch(
                _LOOKUP_SQL,
                list(dids),
                list(streams),
                [s for s, _ in idem],
                [k for _, k in idem],
                list(ids),
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
                _load_row(state, lookup)
            for request in batch:
                self._apply(request, state)
            if state.rows:
                _seal(state)
                await self._ensure_partitions(conn, _partitions_of(state))
                checkpoint = self._due_checkpoint(state)
                wrote = await conn.fetch(_WRITE_SQL, *_write_args(head, state, checkpoint))
                assert wrote, "the head moved under the ledger lock"
                state.checkpoint = checkpoint
            await conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(*_DRIVER_ERRORS):
                await conn.execute("ROLLBACK")
            raise
        return state

    async def _writer(self) -> asyncpg.Connection:
        """The flusher's own connection, held between batches: no pool round trip
        (asyncpg resets a released connection with a query) per commit."""
        if self._conn is None or self._conn.is_closed():
            self._conn = await self._pool.acquire()
        return self._conn

    async def _drop_writer(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(*_DRIVER_ERRORS):
                await self._pool.release(conn)

    def _committed(self, state: _BatchState) -> None:
        """After COMMIT (or with nothing to write): remember, then answer."""
        if state.rows:
            # The tree's edge is now the new head's (see _frontier_at_head).
            self._frontier = (state.head.entry_hash, state.frontier)
            self._known.committed(state)
            self._partitions.update(_partitions_of(state))
            for did, (raw, _, _) in state.key_rows.items():
                self._keys[did] = raw
            if state.checkpoint is not None:
                self._last_checkpoint = (state.checkpoint[0], state.checkpoint[2])
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

    def _due_checkpoint(self, state: _BatchState) -> _CheckpointRow | None:
        """The checkpoint this batch's commit signs, when one is due."""
        head = state.head
        if not self._checkpoint_due(head):
            return None
        now = max(self._clock(), head.recorded_at)
        checkpoint = sign_checkpoint(self._ledger_key, head.position, head.entry_hash, now)
        # The same head as a C2SP signed note over the Merkle root, for witnesses.
        note = tlog.signed_tree_head(self._ledger_key, state.frontier.size, state.frontier.root())
        return (head.position, head.entry_hash, now, checkpoint.signer, checkpoint.signature, note)

    def _apply(self, request: _Request, state: _BatchState) -> None:
        """Check one request against the state so far; stage its rows or its error."""
        key = request.idempotency_key
        if key is not None and (request.signer, key) in state.done_keys:
            digest, original = state.done_keys[(request.signer, key)]
            if digest != request.digest:
                state.results.append(
                    (
                        request,
                        IdempotencyConflictError(
                            f"idempotency key {key!r} was used for different events"
                        ),
                    )
                )
            else:
                state.results.append((request, original))
            return
        try:
            view = self._check_request(request, state)
        except LedgerError as exc:
            state.results.append((request, exc))
            return
        state.results.append((request, self._stage(request, state, view)))

    def _check_request(self, request: _Request, state: _BatchState) -> _RequestView:
        version = state.versions.get(request.stream_id, 0)
        if request.expected_version is not None and request.expected_version != version:
            raise ConcurrencyError(request.stream_id, request.expected_version, version)
        if request.bootstrap and state.has_any_agent:
            raise NotPermittedError(
                "the ledger already holds a registration: registering needs the admin token"
            )
        # The request's own changes live in the view until every event passed.
        view = _RequestView(state)
        for signed in request.events:
            self._check_event(signed, request.keys_used, view, state.now)
            view.advance(signed.event)
        return view

    def _check_event(
        self,
        signed: SignedEvent,
        keys_used: dict[str, bytes],
        view: _RequestView,
        now: datetime,
    ) -> None:
        event, actor = signed.event, signed.actor
        authority.check(event, signed.body, now, view)
        if actor == view.ledger_did or isinstance(event, AgentRegistered):
            return
        # The signature was checked against the key believed before the lock; a
        # rotation committed since then must not let a retired key through.
        current = view.key(actor)
        assert current is not None  # authority.check refused unknown signers
        if current != keys_used.get(actor) and not VerifyKey.from_raw(current).is_valid(
            signed.signature, signed.body
        ):
            raise SignatureError(f"{signed.type}: not signed by {actor}'s current key")

    def _stage(self, request: _Request, state: _BatchState, view: _RequestView) -> AppendResult:
        version = state.versions.get(request.stream_id, 0)
        positions: list[int] = []
        prev = state.head.entry_hash
        position = state.head.position
        for signed in request.events:
            position += 1
            version += 1
            envelope = envelope_bytes(
                position=position,
                recorded_at=state.now,
                stream_id=request.stream_id,
                stream_version=version,
                body=signed.body,
                signature=signed.signature,
            )
            digest = entry_hash(prev, envelope)
            subjects = {*subject_agents(signed.event)}
            if signed.actor != self._ledger_key.did:
                subjects.add(signed.actor)
            state.rows.append(
                (
                    position,
                    state.now,
                    request.stream_id,
                    version,
                    signed.type,
                    signed.actor,
                    sorted(subjects),
                    signed.body,
                    signed.signature,
                    prev,
                    digest,
                )
            )
            _stage_agent_row(state, signed, position)
            state.leaves.append(tlog.entry_leaf(digest))
            if signed.event.event_id is not None:
                state.id_rows.append((event_key(signed.actor, signed.event.event_id), position))
            positions.append(position)
            prev = digest
        state.head = Head(position, prev, state.now)
        state.versions[request.stream_id] = version
        state.stream_rows[request.stream_id] = (version, position)
        state.ids |= view.ids
        state.has_any_agent = state.has_any_agent or bool(view.keys)
        result = AppendResult(tuple(positions), request.stream_id, version)
        if request.idempotency_key is not None:
            state.idem_rows.append(
                (
                    request.signer,
                    request.idempotency_key,
                    positions[0],
                    len(positions),
                    request.stream_id,
                    version,
                    request.digest,
                    state.now,
                )
            )
            state.done_keys[(request.signer, request.idempotency_key)] = (
                request.digest,
                AppendResult(result.positions, result.stream_id, version, duplicate=True),
            )
        return result

    async def _ensure_partitions(self, conn: asyncpg.Connection, days: set[datetime]) -> None:
        """Create the day partitions a batch writes into (under the head lock, so
        concurrent writers cannot race to create one); remembered after COMMIT."""
        for day in days - self._partitions:
            low, high = format_time(day), format_time(day + timedelta(days=1))
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {partition_name(day)} PARTITION OF events "
                f"FOR VALUES FROM ('{low}') TO ('{high}')"
            )

    # -- checkpoints -------------------------------------------------------

    def _checkpoint_due(self, head: Head) -> bool:
        last_position, last_time = self._last_checkpoint
        if head.position <= last_position:
            return False
        return (
            head.position - last_position >= self._checkpoint_every
            or head.recorded_at - last_time >= self._checkpoint_interval
        )

    async def _insert_checkpoint(
        self, conn: asyncpg.Connection, head: Head, frontier: Frontier
    ) -> Checkpoint:
        now = max(self._clock(), head.recorded_at)
        checkpoint = sign_checkpoint(self._ledger_key, head.position, head.entry_hash, now)
        # The same head as a C2SP signed note over the Merkle root, for witnesses.
        note = tlog.signed_tree_head(self._ledger_key, frontier.size, frontier.root())
        await conn.execute(
            "INSERT INTO checkpoints (position, head_hash, time, signer, signature, note) "
            "VALUES ($1, $2, $3, $4, decode($5, 'base64'), $6) ON CONFLICT (position) DO NOTHING",
            checkpoint.position,
            head.entry_hash,
            now,
            checkpoint.signer,
            checkpoint.signature,
            note,
        )
        self._last_checkpoint = (head.position, now)
        return checkpoint

    async def checkpoint(self) -> Checkpoint:
        """Sign the current head now (idempotent per position) and return the checkpoint."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    "SELECT position, entry_hash, recorded_at FROM ledger_head WHERE id = 1"
                )
                head = Head(row["position"], bytes(row["entry_hash"]), row["recorded_at"])
                existing = await self._checkpoint_at(conn, head.position)
                if existing is not None:
                    return existing
                frontier = await self.frontier_at(head.position)
                return await self._insert_checkpoint(conn, head, frontier)
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot write a checkpoint: {exc}") from exc

    async def _checkpoint_ticker(self) -> None:
        """Sign the head every ``checkpoint_interval`` when it moved and nobody did."""
        seconds = max(self._checkpoint_interval.total_seconds(), 0.05)
        while True:
            await asyncio.sleep(seconds)
            try:
                head = await self.head()
                if head.position > self._last_checkpoint[0] and self._checkpoint_due(
                    Head(head.position, head.entry_hash, max(self._clock(), head.recorded_at))
                ):
                    await self.checkpoint()
            except LedgerError as exc:
                log.warning("checkpoint_failed", extra={"error": str(exc)})


def _needs(batch: Sequence[_Request]) -> tuple[set[str], set[str]]:
    """The agents and streams a batch's checks read."""
    dids: set[str] = set()
    for request in batch:
        for signed in request.events:
            dids.update(_referenced_agents(signed))
    return dids, {r.stream_id for r in batch}


def _partitions_of(state: _BatchState) -> set[datetime]:
    """The UTC days a batch writes into (one: a batch shares its ``recorded_at``)."""
    utc = state.now.astimezone(UTC)
    return {datetime(utc.year, utc.month, utc.day, tzinfo=UTC)} if state.rows else set()


def _seal(state: _BatchState) -> None:
    """Extend the tree by the batch's leaves: its new edge, and the subtrees to keep."""
    state.frontier, completed = state.frontier.extend_with_subtrees(state.leaves)
    state.nodes = [n for n in completed if n.level >= tlog.STORED_LEVEL]


def _write_args(
    expected: Head, state: _BatchState, checkpoint: _CheckpointRow | None
) -> list[object]:
    """``_WRITE_SQL``'s parameters: the batch's rows as columns."""
    head = state.head
    rows = state.rows
    streams = state.stream_rows.items()
    updated = [(s, v, p) for s, (v, p) in streams if s in state.existing_streams]
    created = [(s, v, p) for s, (v, p) in streams if s not in state.existing_streams]
    keys = list(state.key_rows.items())
    idem = state.idem_rows
    checkpoints = [checkpoint] if checkpoint is not None else []
    return [
        expected.position,
        expected.entry_hash,
        head.position,
        head.entry_hash,
        head.recorded_at,
        [r[0] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
        [r[4] for r in rows],
        [r[5] for r in rows],
        [" ".join(r[6]) for r in rows],  # type: ignore[arg-type]  # DIDs hold no space
        [r[7] for r in rows],
        [r[8] for r in rows],
        [r[9] for r in rows],
        [r[10] for r in rows],
        *_columns(updated, 3),
        *_columns(created, 3),
        [d for d, _ in keys],
        [k for _, (k, _, _) in keys],
        [p for _, (_, p, _) in keys],
        [x for _, (_, _, x) in keys],
        *_columns(idem, 7),
        [k for k, _ in state.id_rows],
        [p for _, p in state.id_rows],
        [n.level for n in state.nodes],
        [n.index for n in state.nodes],
        [n.hash for n in state.nodes],
        *_columns(checkpoints, 6),
        NOTIFY_CHANNEL,
        str(head.position),
    ]


def _columns(rows: Sequence[tuple[object, ...]], width: int) -> list[list[object]]:
    return [[row[i] for row in rows] for i in range(width)]


def _verify_all(jobs: Sequence[tuple[object, SignedEvent, VerifyKey]]) -> list[bool]:
    return [key.is_valid(signed.signature, signed.body) for _, signed, key in jobs]


def _referenced_agents(signed: SignedEvent) -> set[str]:
    dids = {signed.actor, *subject_agents(signed.event)}
    if isinstance(signed.event, AgentRegistered) and signed.event.sponsor is not None:
        dids.add(signed.event.sponsor)
    return dids


async def claim_identity(pool: asyncpg.Pool, key: SigningKey, now: datetime) -> None:
    """Record the ledger's key at genesis; refuse any other key afterwards.

    A second "ledger key" would sign checkpoints and ledger events that no verifier
    of this ledger accepts: the ledger would never verify again. So a process
    holding another key than the one recorded (or than the latest checkpoint's
    signer, for a ledger older than the record) raises ``LedgerKeyMismatchError``."""
    try:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO ledger_identity (id, did, public_key, recorded_at) "
                "VALUES (1, $1, $2, $3) ON CONFLICT (id) DO NOTHING",
                key.did,
                key.public.raw,
                now,
            )
            recorded = await conn.fetchval("SELECT did FROM ledger_identity WHERE id = 1")
            signer = await conn.fetchval(
                "SELECT signer FROM checkpoints ORDER BY position DESC LIMIT 1"
            )
    except _DRIVER_ERRORS as exc:
        raise StoreUnavailableError(f"cannot read the ledger's identity: {exc}") from exc
    for owner in (recorded, signer):
        if owner is not None and owner != key.did:
            raise LedgerKeyMismatchError(
                f"this ledger's key is {owner} (recorded at genesis), but this process holds "
                f"{key.did}: start it with the ledger's own key (AGENTMESH_AGENT_PRIVATE_KEY)"
            )


async def _build_frontier(conn: asyncpg.Connection, head: int) -> Frontier:
    frontier, after = Frontier(), 0
    while rows := await conn.fetch(
        "SELECT position, entry_hash FROM events WHERE position > $1 AND position <= $2 "
        "ORDER BY position LIMIT 10000",
        after,
        head,
    ):
        leaves = [tlog.entry_leaf(bytes(r["entry_hash"])) for r in rows]
        frontier, completed = frontier.extend_with_subtrees(leaves)
        await store_subtrees(conn, [n for n in completed if n.level >= tlog.STORED_LEVEL])
        after = rows[-1]["position"]
    return frontier


async def store_subtrees(conn: asyncpg.Connection, subtrees: Sequence[Subtree]) -> None:
    """Keep these complete subtrees of the tree (idempotent: a subtree never changes)."""
    await conn.execute(
        "INSERT INTO merkle_nodes (level, idx, hash) "
        "SELECT * FROM unnest($1::smallint[], $2::bigint[], $3::bytea[]) "
        "ON CONFLICT (level, idx) DO NOTHING",
        [n.level for n in subtrees],
        [n.index for n in subtrees],
        [n.hash for n in subtrees],
    )


def event_key(actor: str, event_id: str) -> bytes:
    """The single-use index's key of an event: 16 bytes of SHA-256(actor ‖ 0 ‖ id)."""
    return hashlib.sha256(f"{actor}\x00{event_id}".encode()).digest()[:16]


def _load_row(state: _BatchState, row: asyncpg.Record) -> None:
    """An idempotency key or single-use id row of ``_LOOKUP_SQL`` into the batch
    state (keys, streams and agents went through ``_Known.learn``)."""
    kind, ident = row["kind"], row["id"]
    if kind == "i":
        signer, _, key = ident.partition(" ")  # a DID never holds a space
        first = row["a"]
        state.done_keys[(signer, key)] = (
            bytes(row["raw"]),
            AppendResult(tuple(range(first, first + row["b"])), row["c"], row["d"], duplicate=True),
        )
    elif kind == "e":
        state.ids.add(bytes(row["raw"]))


def _stage_agent_row(state: _BatchState, signed: SignedEvent, position: int) -> None:
    """Key changes and suspensions update ``agent_keys`` in the same commit."""
    event = signed.event
    if isinstance(event, AgentRegistered | AgentKeyRotated):
        raw = VerifyKey.from_pem(event.public_key).raw
        suspended = state.suspended_dids.get(event.did, False)
        state.keys[event.did] = raw
        state.key_positions[event.did] = position
        state.key_rows[event.did] = (raw, position, suspended)
    elif isinstance(event, AgentSuspended | AgentReinstated):
        suspended = isinstance(event, AgentSuspended)
        state.suspended_dids[event.did] = suspended
        raw_key = state.keys[event.did]
        assert raw_key is not None  # authority.check: the subject is registered
        state.key_rows[event.did] = (raw_key, state.key_positions[event.did], suspended)
