"""A durable outbox of signed reports, delivered to the API exactly once.

The sidecar must never lose a policy denial it enforced, even while the API is
down or the pod restarts, and the ledger must never hold one twice. So:

1. ``put`` signs the event with the agent's key and commits it, with an
   idempotency key, to SQLite (WAL, ``synchronous=FULL``) before returning:
   once ``put`` has returned, the report survives a crash.
2. ``deliver_once`` posts the oldest pending reports to
   ``POST /v1/reports:batch`` with their *stored* idempotency keys. The ledger
   appends a key once, so the retry of a batch whose answer was lost is
   answered ``duplicate``: at-least-once on the wire, exactly once in the ledger.
3. A report leaves the outbox only when answered ``appended`` or
   ``duplicate``. One answered ``rejected`` moves to the dead-letter table with
   the reason (never dropped; ``requeue_dead_letters`` sends them again).
   Anything else (transport error, timeout, 5xx, an unreadable answer) leaves
   the whole batch pending for the next attempt.

Denials take a faster path (``record`` / ``count_repeat`` / ``close_window``):
one writer thread drains an in-memory queue, signs what the queue holds and
commits all of it in **one** transaction (group commit), then resolves every
waiting caller at once. ``record`` (a penalty-bearing violation) returns only
after the commit holding it. ``count_repeat`` returns at once; the count is
committed within ``COUNT_FLUSH_SECONDS`` (10 ms) plus one commit, together
with whatever else is queued (``sync`` waits for it).
Aggregation windows (``windows`` table: the first violation's ``event_id`` and
the repeats committed since) live in the same database, and the follow-up
report (``repeat_of``, ``count``) is built by the writer from the committed
row in the same transaction that resets or deletes it — never twice, never
lost once committed.

One process owns an outbox directory: the database is opened with SQLite's
exclusive locking, so a second ``Outbox.open`` on it fails with
``OutboxError``; the lock dies with the process that held it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Literal

import httpx
import msgspec

from ledger.errors import IdempotencyConflictError
from ledger.events import PolicyViolation, TrustSignal, new_event_id
from ledger.identity import SigningKey, b64encode
from ledger.signed import SignedEvent
from ledger.timefmt import format_time, utc_now
from sidecar.errors import SidecarError

log = logging.getLogger("agentmesh.sidecar.outbox")

# The sidecar's pod has only /tmp writable (an emptyDir private to the pod);
# the directory is created 0700.
DEFAULT_DIRECTORY = Path("/tmp/agentmesh-outbox")  # noqa: S108
DATABASE_NAME = "outbox.sqlite3"
MAX_BATCH = 1000  # the API's limit per batch
MAX_BATCH_BYTES = 1_000_000  # half the API's 2 MiB body limit: room for the envelope
MAX_KEY_LENGTH = 200  # the API's limit on an idempotency key
BACKOFF_START = 0.2
BACKOFF_MAX = 30.0
_SCHEMA_VERSION = 2
MAX_WRITE_BATCH = 2000  # queued writes committed in one transaction at most
COUNT_FLUSH_SECONDS = 0.01  # repeat counts wait at most this long for a commit
# Whole-batch answers that blame the batch's content: retried in halves until the
# offending report is alone, then dead-lettered (a poison report must not stall the rest).
_CONTENT_REFUSALS = frozenset({400, 413, 422})
_JSON = {"content-type": "application/json"}

# Reports are taken oldest first by rowid, which grows with every insert; the
# outbox never runs VACUUM, the one command that could renumber it.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    idempotency_key TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    signature TEXT NOT NULL,
    created_at TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS windows (
    window_key TEXT PRIMARY KEY,
    first_event_id TEXT NOT NULL,
    opened_at REAL NOT NULL,
    repeats INTEGER NOT NULL DEFAULT 0,
    severity TEXT NOT NULL,
    rule TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    idempotency_key TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    signature TEXT NOT NULL,
    created_at TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    error TEXT NOT NULL,
    rejected_at TEXT NOT NULL
);
"""
_TO_DEAD_LETTERS = """
INSERT OR REPLACE INTO dead_letters
    (idempotency_key, body, signature, created_at, attempts, error, rejected_at)
SELECT idempotency_key, body, signature, created_at, attempts + 1, ?, ?
FROM pending WHERE idempotency_key = ?
"""
_REQUEUE = """
INSERT OR IGNORE INTO pending
    (idempotency_key, body, signature, created_at, attempts, last_error)
SELECT idempotency_key, body, signature, created_at, attempts, error
FROM dead_letters ORDER BY rowid
"""

_Row = tuple[str, str, str]  # idempotency key, canonical body text, base64 signature


class OutboxError(SidecarError):
    """The outbox's local storage failed, is closed, or is held by another process."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A report the API rejected, kept for an operator."""

    idempotency_key: str
    body: str
    error: str
    attempts: int
    created_at: str
    rejected_at: str


@dataclass(frozen=True, slots=True)
class Window:
    """An open aggregation window: identical denials after its first violation
    (``first_event_id``, opened at ``opened_at``, unix seconds) are counted in
    ``repeats`` until the window is closed by a follow-up report."""

    key: str
    first_event_id: str
    opened_at: float
    repeats: int
    severity: str
    rule: str
    detail: str


@dataclass(slots=True)
class _Put:
    event: PolicyViolation
    window: tuple[str, float] | None  # (window key, opened at) for the first of a window
    waiter: asyncio.Future[str] | None


@dataclass(slots=True)
class _Flush:
    """Commit the repeat counts taken so far (and answer ``waiter`` once committed)."""

    waiter: asyncio.Future[str] | None


@dataclass(slots=True)
class _Close:
    key: str
    keep: bool  # reset the count but keep the window open (shutdown)
    waiter: asyncio.Future[str] | None
    follow_ups: list[str] = field(default_factory=list)


_Op = _Put | _Flush | _Close


class _Report(msgspec.Struct, frozen=True):
    body: msgspec.Raw  # the stored canonical text, spliced in byte for byte
    signature: str
    idempotency_key: str


class _Batch(msgspec.Struct, frozen=True):
    reports: list[_Report]


class _Result(msgspec.Struct, frozen=True):
    index: int
    status: Literal["appended", "duplicate", "rejected"]
    error: str | None = None


class _Answer(msgspec.Struct, frozen=True):
    results: list[_Result]


class _Problem(msgspec.Struct, frozen=True):
    detail: str = ""


_answer = msgspec.json.Decoder(_Answer)
_problem = msgspec.json.Decoder(_Problem)


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What one delivery attempt did; ``again`` asks for an immediate retry."""

    delivered: int = 0
    duplicates: int = 0
    rejected: int = 0
    failed: bool = False
    again: bool = False

    @property
    def progressed(self) -> bool:
        return bool(self.delivered or self.rejected or self.again)


class Outbox:
    """Pending signed reports on disk and their delivery to the API.

    Counters for metrics, as plain attributes: ``delivered`` (reports the
    ledger now holds that left the outbox: answered appended or duplicate),
    ``duplicates`` (the part of ``delivered`` answered duplicate), ``rejected``
    (moved to dead letters) and ``failures`` (delivery attempts that failed);
    ``last_error`` is the latest failure's text, None after a success.
    """

    def __init__(
        self,
        db: sqlite3.Connection,
        api_url: str,
        key: SigningKey,
        http: httpx.AsyncClient,
        *,
        owns_http: bool,
        batch_size: int,
        max_batch_bytes: int,
        clock: Callable[[], datetime],
    ) -> None:
        self._db = db
        self._endpoint = api_url.rstrip("/") + "/v1/reports:batch"
        self._key = key
        self._http = http
        self._owns_http = owns_http
        self._batch_size = batch_size
        self._limit = batch_size  # shrinks while the API refuses a batch for its content
        self._max_batch_bytes = max_batch_bytes
        self._clock = clock
        # put() runs in the caller's thread or a worker thread (put_async), delivery
        # in worker threads: one connection, so every use of it holds this lock.
        self._lock = threading.Lock()
        # Two overlapping deliveries would send the same batch twice: harmless for
        # the ledger, but the counters would count it twice.
        self._delivering = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_loop: asyncio.AbstractEventLoop | None = None
        self._repeats: dict[str, int] = {}  # first_event_id -> denials counted, not committed
        self._repeats_lock = threading.Lock()
        self._uncommitted: dict[str, int] = {}
        self.write_batches = 0  # transactions the writer committed
        self.writes = 0  # writes they held
        self.delivered = 0
        self.duplicates = 0
        self.rejected = 0
        self.failures = 0
        self.last_error: str | None = None

    @classmethod
    def open(
        cls,
        directory: Path,
        api_url: str,
        key: SigningKey,
        *,
        batch_size: int = 500,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        http: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
        clock: Callable[[], datetime] = utc_now,
    ) -> Outbox:
        """Open (creating if needed) the outbox in ``directory``.

        ``http`` is used as given and left open; without it the outbox makes its
        own client with ``timeout`` seconds per request. Raises ``OutboxError``
        when the directory is unusable or another process holds the outbox.
        """
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be 1..{MAX_BATCH}, not {batch_size}")
        db = _connect(directory)
        # An outbox-made client keeps no idle connection (one connect per batch), so
        # the synchronous close() leaves no socket behind for the garbage collector.
        if http is None:
            http_client = httpx.AsyncClient(
                timeout=timeout, limits=httpx.Limits(max_keepalive_connections=0)
            )
        else:
            http_client = http
        return cls(
            db,
            api_url,
            key,
            http_client,
            owns_http=http is None,
            batch_size=batch_size,
            max_batch_bytes=max_batch_bytes,
            clock=clock,
        )

    async def __aenter__(self) -> Outbox:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- writing ---------------------------------------------------------------------------

    def put(self, event: PolicyViolation | TrustSignal, idempotency_key: str | None = None) -> str:
        """Sign ``event``, commit it to disk and return its idempotency key.

        Without ``idempotency_key`` the key is ``sidecar:<uuid4 hex>``. Putting a
        key that is still pending with the same event is a no-op; with another
        event it raises ``IdempotencyConflictError``. An invalid event raises
        ``EventValidationError`` here, so it never reaches the queue.
        """
        key = "sidecar:" + uuid.uuid4().hex if idempotency_key is None else idempotency_key
        if not 1 <= len(key) <= MAX_KEY_LENGTH:
            raise ValueError(f"an idempotency key has 1..{MAX_KEY_LENGTH} characters")
        signed = SignedEvent.create(event, self._key)
        body = signed.body.decode()
        row = (key, body, b64encode(signed.signature), format_time(self._clock()))
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO pending (idempotency_key, body, signature, created_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                row,
            )
            if cursor.rowcount == 0 and not _same_event(_pending_body(db, key), body):
                raise IdempotencyConflictError(f"{key!r} is pending with another event")
        self.notify()
        return key

    async def put_async(
        self, event: PolicyViolation | TrustSignal, idempotency_key: str | None = None
    ) -> str:
        """``put`` in a worker thread, so the fsync never blocks the event loop."""
        return await asyncio.to_thread(self.put, event, idempotency_key)

    # -- batched writing (denials) -----------------------------------------------------------

    async def record(self, event: PolicyViolation, window: tuple[str, float] | None = None) -> str:
        """Sign and commit ``event`` through the writer (group commit); return its
        idempotency key once it is on disk. With ``window`` (key, opened at), the
        event opens that aggregation window in the same transaction."""
        return await self.record_nowait(event, window)

    def record_nowait(
        self, event: PolicyViolation, window: tuple[str, float] | None = None
    ) -> asyncio.Future[str]:
        """``record``, queued now: the future resolves once the event is on disk."""
        op = _Put(event, window, self._future())
        self._start_writer()
        self._ops.put(op)
        assert op.waiter is not None
        return op.waiter

    def count_repeat(self, first_event_id: str) -> None:
        """Count one more denial in the open window whose first violation is
        ``first_event_id``. Returns at once: the writer commits the count with its
        next transaction (``sync`` waits for that)."""
        with self._repeats_lock:
            first = not self._repeats
            self._repeats[first_event_id] = self._repeats.get(first_event_id, 0) + 1
        if first:  # one flush queued per batch of counts, not one per denial
            self._start_writer()
            self._ops.put(_Flush(None))

    async def sync(self) -> None:
        """Return once everything counted or queued before the call is committed."""
        await self._submit(_Flush(self._future()))

    async def close_window(self, key: str, *, keep: bool = False) -> str:
        """Close window ``key``: if it counted repeats, a follow-up violation
        (``repeat_of`` its first, ``count`` the repeats) is signed and queued for
        the API in the same transaction. ``keep`` resets the count and leaves the
        window open instead. Returns the follow-up's idempotency key, or ''."""
        return await self._submit(_Close(key, keep, self._future()))

    def windows(self) -> list[Window]:
        """The open aggregation windows, as committed."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT window_key, first_event_id, opened_at, repeats, severity, rule, detail"
                " FROM windows ORDER BY rowid"
            ).fetchall()
        return [Window(*row) for row in rows]

    def _future(self) -> asyncio.Future[str]:
        return asyncio.get_running_loop().create_future()

    def _start_writer(self) -> None:
        if self._closed:
            raise OutboxError("the outbox is closed")
        if self._writer is None:
            self._writer_loop = asyncio.get_running_loop()
            self._writer = threading.Thread(
                target=self._write_forever, name="outbox-writer", daemon=True
            )
            self._writer.start()

    async def _submit(self, op: _Op) -> str:
        self._start_writer()
        self._ops.put(op)
        assert op.waiter is not None
        return await op.waiter

    def _write_forever(self) -> None:
        """The writer thread: take what is queued, commit it in one transaction, answer."""
        stop = False
        while not stop:
            first = self._ops.get()
            if first is None:
                return
            batch = [first]
            # Counts alone (nobody waits for them) are gathered for up to COUNT_FLUSH_SECONDS,
            # so a retry storm costs a few commits a second, not one per handful of retries;
            # anything someone waits for is committed at once with what is queued.
            linger = first.waiter is None and isinstance(first, _Flush)
            deadline = time.monotonic() + COUNT_FLUSH_SECONDS
            while len(batch) < MAX_WRITE_BATCH:
                try:
                    if linger:
                        op = self._ops.get(timeout=max(0.0, deadline - time.monotonic()))
                    else:
                        op = self._ops.get_nowait()
                except queue.Empty:
                    break
                if op is None:
                    stop = True
                    break
                batch.append(op)
                linger = linger and op.waiter is None
            self._uncommitted = {}
            try:
                results = self._write(batch)
                error: BaseException | None = None
            except (OutboxError, ValueError) as exc:
                results, error = [], exc
                with self._repeats_lock:  # the counts stay for the next transaction
                    for event_id, count in self._uncommitted.items():
                        self._repeats[event_id] = self._repeats.get(event_id, 0) + count
            self._answer(batch, results, error)
            if any(results):  # a new report to deliver (a count alone is not one)
                self.notify()

    def _write(self, batch: list[_Op]) -> list[str]:
        results: list[str] = []
        now = format_time(self._clock())
        with self._transaction() as db:
            for op in batch:
                # Counts taken before an op was queued are committed before it is applied.
                self._add_repeats(db)
                if isinstance(op, _Flush):
                    results.append("")
                elif isinstance(op, _Put):
                    if op.window is not None:  # a window that was still open ends here
                        self._close(db, _Close(op.window[0], False, None), now)
                    results.append(self._insert(db, op.event, now))
                    if op.window is not None:
                        key, opened_at = op.window
                        db.execute(
                            "INSERT OR REPLACE INTO windows (window_key, first_event_id,"
                            " opened_at, repeats, severity, rule, detail)"
                            " VALUES (?, ?, ?, 0, ?, ?, ?)",
                            (
                                key,
                                op.event.event_id,
                                opened_at,
                                op.event.severity,
                                op.event.rule,
                                op.event.detail,
                            ),
                        )
                else:
                    results.append(self._close(db, op, now))
            self._add_repeats(db)
        self.write_batches += 1
        self.writes += len(batch)
        return results

    def _add_repeats(self, db: sqlite3.Connection) -> None:
        with self._repeats_lock:
            counts, self._repeats = self._repeats, {}
        if counts:
            db.executemany(
                "UPDATE windows SET repeats = repeats + ? WHERE first_event_id = ?",
                [(count, first) for first, count in counts.items()],
            )
            for first, count in counts.items():  # put back if the transaction fails
                self._uncommitted[first] = self._uncommitted.get(first, 0) + count

    def _insert(self, db: sqlite3.Connection, event: PolicyViolation, now: str) -> str:
        if event.event_id is None:
            event = msgspec.structs.replace(event, event_id=new_event_id())
        signed = SignedEvent.create(event, self._key)
        key = f"sidecar:{event.event_id}"
        db.execute(
            "INSERT INTO pending (idempotency_key, body, signature, created_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (key, signed.body.decode(), b64encode(signed.signature), now),
        )
        return key

    def _close(self, db: sqlite3.Connection, op: _Close, now: str) -> str:
        row = db.execute(
            "SELECT first_event_id, repeats, severity, rule, detail FROM windows"
            " WHERE window_key = ?",
            (op.key,),
        ).fetchone()
        if row is None:
            return ""
        first, repeats, severity, rule, detail = row
        key = ""
        if repeats > 0:
            event = PolicyViolation(
                actor=self._key.did,
                occurred_at=now,
                event_id=new_event_id(),
                agent=self._key.did,
                severity=severity,
                rule=rule,
                detail=f"{repeats} repeat(s) of violation {first}: {detail}"[:4000],
                count=repeats,
                repeat_of=first,
            )
            key = self._insert(db, event, now)
        if op.keep:
            db.execute("UPDATE windows SET repeats = 0 WHERE window_key = ?", (op.key,))
        else:
            db.execute("DELETE FROM windows WHERE window_key = ?", (op.key,))
        return key

    def _answer(self, batch: list[_Op], results: list[str], error: BaseException | None) -> None:
        loop = self._writer_loop
        if loop is None or loop.is_closed():
            return
        waiters = [op.waiter for op in batch]

        def settle() -> None:
            for index, waiter in enumerate(waiters):
                if waiter is None or waiter.done():
                    continue
                if error is not None:
                    waiter.set_exception(OutboxError(str(error)))
                else:
                    waiter.set_result(results[index])

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle)

    def _stop_writer(self) -> None:
        writer = self._writer
        if writer is not None and writer is not threading.current_thread():
            self._ops.put(None)
            writer.join()
        self._writer = None

    def notify(self) -> None:
        """Wake ``run`` now, from any thread (``put`` calls it)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # run() has not started: it delivers first thing when it does
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is loop:
            self._wakeup.set()
        else:  # asyncio.Event is not thread-safe
            loop.call_soon_threadsafe(self._wakeup.set)

    def requeue_dead_letters(self) -> int:
        """Move every dead letter back to pending (after fixing the cause); return how many."""
        with self._transaction() as db:
            moved = db.execute(_REQUEUE).rowcount
            db.execute("DELETE FROM dead_letters")
        self.notify()
        return moved

    # -- reading ---------------------------------------------------------------------------

    def depth(self) -> int:
        """How many reports are pending."""
        return self._count("pending")

    def dead_letters(self) -> int:
        """How many reports the API rejected."""
        return self._count("dead_letters")

    def dead_letter_items(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT idempotency_key, body, error, attempts, created_at, rejected_at"
                " FROM dead_letters ORDER BY rowid LIMIT ?",
                (limit,),
            ).fetchall()
        return [DeadLetter(*row) for row in rows]

    def pending_bodies(self, limit: int = 1000) -> list[str]:
        """The signed bodies of the oldest ``limit`` pending reports (canonical JSON)."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT body FROM pending ORDER BY rowid LIMIT ?", (limit,)
            ).fetchall()
        return [str(body) for (body,) in rows]

    def _count(self, table: Literal["pending", "dead_letters"]) -> int:
        with self._transaction() as db:
            (count,) = db.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608 (a literal)
        return int(count)

    # -- delivering ------------------------------------------------------------------------

    async def deliver_once(self) -> int:
        """Send the oldest pending reports once; return how many the ledger now holds.

        Never raises for the API's sake: on a transport error, timeout or 5xx
        it returns 0, keeps the reports and records the error in
        ``last_error``. A failure of local storage raises ``OutboxError``.
        """
        return (await self._deliver()).delivered

    async def run(self, stop: asyncio.Event, interval: float = 0.2) -> None:
        """Deliver until ``stop`` is set (or the outbox is closed): drain, then wait
        for a ``put`` or ``interval`` seconds; after a failure back off from 0.2 s,
        doubling to 30 s, back to 0.2 s after a success."""
        self._loop = asyncio.get_running_loop()
        backoff = BACKOFF_START
        while not stop.is_set() and not self._closed:
            self._wakeup.clear()  # before taking: a put from here on wakes the next wait
            outcome = await self._deliver_guarded()
            if outcome.failed:
                await _pause(stop, backoff)  # puts do not cut a backoff short
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_START
            if not outcome.progressed:
                await _pause(stop, interval, self._wakeup)

    async def _deliver_guarded(self) -> _Outcome:
        try:
            return await self._deliver()
        except OutboxError as exc:  # a full disk must not end delivery for good
            self._failed(f"local storage: {exc}", 0)
            return _Outcome(failed=True)

    async def _deliver(self) -> _Outcome:
        async with self._delivering:
            batch = await asyncio.to_thread(self._take)
            if not batch:
                return _Outcome()
            try:
                response = await self._http.post(
                    self._endpoint, content=_encode(batch), headers=_JSON
                )
            except httpx.HTTPError as exc:
                return await self._retry_later(batch, f"{type(exc).__name__}: {exc}")
            outcome = await self._settle(batch, response)
        self.delivered += outcome.delivered
        self.duplicates += outcome.duplicates
        self.rejected += outcome.rejected
        return outcome

    async def _settle(self, batch: list[_Row], response: httpx.Response) -> _Outcome:
        status = response.status_code
        if status == 200:
            try:
                results = _answer.decode(response.content).results
            except msgspec.DecodeError as exc:
                return await self._retry_later(batch, f"unreadable answer: {exc}")
            self._limit = min(self._batch_size, self._limit * 2)
            outcome = await asyncio.to_thread(self._apply, batch, results)
            if outcome.failed:
                self._failed("the API answered for none of the reports", len(batch))
            else:
                self.last_error = None
            return outcome
        error = f"HTTP {status}: {_detail(response)}"
        if status not in _CONTENT_REFUSALS:
            return await self._retry_later(batch, error)
        if len(batch) > 1:
            self._limit = max(1, len(batch) // 2)
            log.warning("outbox_batch_refused", extra={"error": error, "reports": len(batch)})
            return _Outcome(again=True)
        refused = [_Result(index=0, status="rejected", error=error)]
        return await asyncio.to_thread(self._apply, batch, refused)

    async def _retry_later(self, batch: list[_Row], error: str) -> _Outcome:
        self._failed(error, len(batch))
        await asyncio.to_thread(self._record_attempt, [key for key, _, _ in batch], error)
        return _Outcome(failed=True)

    def _failed(self, error: str, reports: int) -> None:
        self.failures += 1
        self.last_error = error
        log.warning("outbox_delivery_failed", extra={"error": error, "reports": reports})

    # -- storage (worker threads) ----------------------------------------------------------

    def _take(self) -> list[_Row]:
        with self._transaction() as db:
            rows = db.execute(
                "SELECT idempotency_key, body, signature FROM pending ORDER BY rowid LIMIT ?",
                (self._limit,),
            ).fetchall()
        return _within(rows, self._max_batch_bytes)

    def _apply(self, batch: list[_Row], results: Sequence[_Result]) -> _Outcome:
        """Remove what the ledger holds, dead-letter what it rejected, in one transaction."""
        answers = {r.index: r for r in results if 0 <= r.index < len(batch)}
        now = format_time(self._clock())
        with self._transaction() as db:
            for index, (key, _, _) in enumerate(batch):
                answer = answers.get(index)
                if answer is None:
                    _attempted(db, [key], "the API did not answer for this report")
                    continue
                if answer.status == "rejected":
                    db.execute(_TO_DEAD_LETTERS, (answer.error or "rejected", now, key))
                    log.warning(
                        "outbox_report_rejected",
                        extra={"idempotency_key": key, "error": answer.error},
                    )
                db.execute("DELETE FROM pending WHERE idempotency_key = ?", (key,))
        statuses = [a.status for a in answers.values()]
        return _Outcome(
            delivered=len(statuses) - statuses.count("rejected"),
            duplicates=statuses.count("duplicate"),
            rejected=statuses.count("rejected"),
            failed=not answers,
        )

    def _record_attempt(self, keys: list[str], error: str) -> None:
        with self._transaction() as db:
            _attempted(db, keys, error)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection inside ``BEGIN IMMEDIATE`` … ``COMMIT``; driver errors
        become ``OutboxError``."""
        with self._lock:
            if self._closed:
                raise OutboxError("the outbox is closed")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox storage failed: {exc}") from exc

    def close(self) -> None:
        """Close the database; ``put`` and delivery fail with ``OutboxError`` after.

        Idempotent and synchronous. Stop ``run`` first: a delivery still in
        flight keeps its reports pending, and the next start sends them again
        (answered ``duplicate`` if they had arrived).
        """
        self._stop_writer()  # what it took is committed and answered before it stops
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    async def aclose(self) -> None:
        """Wait for a delivery in flight, then ``close`` and close the HTTP client
        the outbox made."""
        await asyncio.to_thread(self._stop_writer)
        async with self._delivering:
            self.close()
        if self._owns_http:
            await self._http.aclose()


def _connect(directory: Path) -> sqlite3.Connection:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        db = sqlite3.connect(
            directory / DATABASE_NAME, isolation_level=None, check_same_thread=False, timeout=0
        )
    except (OSError, sqlite3.Error) as exc:
        raise OutboxError(f"cannot open the outbox in {directory}: {exc}") from exc
    try:
        _prepare(db)
    except sqlite3.Error as exc:
        db.close()
        raise OutboxError(f"cannot open the outbox in {directory}: {exc}") from exc
    except BaseException:
        db.close()
        raise
    return db


def _prepare(db: sqlite3.Connection) -> None:
    # Exclusive locking, set before WAL: the first write below takes a lock held
    # until close, so a second process cannot deliver (and count) the same reports.
    db.execute("PRAGMA locking_mode=EXCLUSIVE")
    (mode,) = db.execute("PRAGMA journal_mode=WAL").fetchone()
    if mode != "wal":
        raise OutboxError(f"SQLite would not use WAL (journal mode {mode})")
    # FULL: a commit is on disk (WAL fsync'd) when put() returns, not just in the OS cache.
    db.execute("PRAGMA synchronous=FULL")
    db.execute("BEGIN IMMEDIATE")
    try:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > _SCHEMA_VERSION:
            raise OutboxError(f"outbox schema {version} is newer than this sidecar's")
        for statement in _SCHEMA.split(";"):
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _same_event(stored: str | None, body: str) -> bool:
    """The same event, but for the ``event_id`` its signing chose (the stored body,
    signed first, is the one kept: it is never signed again)."""
    if stored is None:
        return False
    if stored == body:
        return True
    old, new = msgspec.json.decode(stored), msgspec.json.decode(body)
    if isinstance(old, dict) and isinstance(new, dict):
        old.pop("event_id", None)
        new.pop("event_id", None)
    return bool(old == new)


def _pending_body(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT body FROM pending WHERE idempotency_key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _attempted(db: sqlite3.Connection, keys: list[str], error: str) -> None:
    db.executemany(
        "UPDATE pending SET attempts = attempts + 1, last_error = ? WHERE idempotency_key = ?",
        [(error, key) for key in keys],
    )


def _within(rows: list[_Row], budget: int) -> list[_Row]:
    """The oldest rows whose request fits ``budget`` bytes (always at least one)."""
    size = 0
    for count, (key, body, signature) in enumerate(rows):
        size += len(body.encode()) + len(key) + len(signature) + 64  # 64: the JSON around them
        if size > budget and count > 0:
            return rows[:count]
    return rows


def _encode(batch: list[_Row]) -> bytes:
    reports = [_Report(msgspec.Raw(body.encode()), sig, key) for key, body, sig in batch]
    return msgspec.json.encode(_Batch(reports))


def _detail(response: httpx.Response) -> str:
    """The problem document's detail, or the start of the body."""
    try:
        detail = _problem.decode(response.content).detail
    except msgspec.DecodeError:
        detail = ""
    return detail or response.text[:200]


async def _pause(stop: asyncio.Event, seconds: float, wake: asyncio.Event | None = None) -> None:
    """Sleep up to ``seconds``; return early once ``stop`` (or ``wake``) is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in (stop, wake) if e is not None]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
