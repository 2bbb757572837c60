"""``PostgresLedgerReader``: every read of the ledger's tables (no key needed).

The row → ``RecordedEvent`` mapping and the SELECTs live here, once; the
writer (``ledger.postgres.store``) extends this class. Driver errors are
translated to ``StoreUnavailableError`` at this edge.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import asyncpg
import msgspec

from ledger import merkle, tlog
from ledger.chain import Checkpoint, Head, RecordedEvent
from ledger.errors import ProofError, StoreUnavailableError, VerificationError
from ledger.events import (
    AgentKeyRotated,
    AgentRegistered,
    AgentReinstated,
    AgentSuspended,
    decode_body,
    decode_key_change,
)
from ledger.identity import VerifyKey, b64decode
from ledger.merkle import Frontier
from ledger.ports import RetentionStore, StoredBody, Window
from ledger.postgres.dsn import connect_kwargs

if TYPE_CHECKING:
    from ledger.audit.export import AuditSource
from ledger.timefmt import format_time

log = logging.getLogger("agentmesh.ledger")
T = TypeVar("T")

NOTIFY_CHANNEL = "agentmesh_ledger"
PlanMode = Literal["force_generic_plan", "force_custom_plan"]
DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)

ENTRY_COLUMNS = (
    "position, recorded_at, stream_id, stream_version, event_type, actor, subjects, "
    "body, signature, prev_hash, entry_hash"
)


def record_from_row(row: asyncpg.Record) -> RecordedEvent:
    return RecordedEvent(
        position=row["position"],
        recorded_at=row["recorded_at"],
        stream_id=row["stream_id"],
        stream_version=row["stream_version"],
        body=bytes(row["body"]),
        signature=bytes(row["signature"]),
        prev_hash=bytes(row["prev_hash"]),
        entry_hash=bytes(row["entry_hash"]),
        event_type=row["event_type"],
        actor=row["actor"],
        subjects=tuple(row["subjects"]),
    )


def partition_name(day: datetime | date, table: str = "events") -> str:
    """The name of ``table``'s partition for a UTC day: ``events_p20261130``."""
    return f"{table}_p{day:%Y%m%d}"


# The tables kept in one partition per UTC day: ``events`` by ``recorded_at``, the
# single-use ids and idempotency keys by the day their bodies occurred on.
DAY_PARTITIONED = ("events", "event_ids", "idempotency_keys")
_DAY_PARTITION = re.compile(r"^(events|event_ids|idempotency_keys)_p(\d{8})$")


def _day_start(day: date) -> str:
    """A UTC day's first instant as a SQL timestamptz literal (a day partition's bound)."""
    return f"'{day.isoformat()}T00:00:00Z'"


def partition_ddl(table: str, day: date) -> str:
    """``CREATE TABLE IF NOT EXISTS`` of ``table``'s partition for ``day``."""
    if table not in DAY_PARTITIONED:
        raise ValueError(f"{table} is not partitioned by day")
    low, high = day, day + timedelta(days=1)
    if table == "events":  # a timestamptz range; the others are ranges of dates
        bounds = f"{_day_start(low)}) TO ({_day_start(high)}"
    else:
        bounds = f"'{low.isoformat()}') TO ('{high.isoformat()}'"
    return (
        f"CREATE TABLE IF NOT EXISTS {partition_name(day, table)} PARTITION OF {table} "
        f"FOR VALUES FROM ({bounds})"
    )


def partition_day(name: str) -> tuple[str, date] | None:
    """The table and UTC day of a day partition's name; None for any other name."""
    found = _DAY_PARTITION.match(name)
    if found is None:
        return None
    return found.group(1), datetime.strptime(found.group(2), "%Y%m%d").date()


_TIMES_KEPT = 256
_MAX_LIMIT = 2**63 - 1  # LIMIT is a bigint
_NODES_SQL = (
    "SELECT level, idx, hash FROM merkle_nodes WHERE (level, idx) IN "
    "(SELECT * FROM unnest($1::smallint[], $2::bigint[])) "
    "UNION ALL SELECT -1, position - 1, entry_hash FROM events "
    "WHERE position = ANY($3::bigint[])"
)
_DAYS_FRESH = 60.0  # seconds a reader keeps the day partitions' first positions

# One agent's entries, through the ``subjects`` GIN index of every day partition.
# Planned for each call (a custom plan, what PostgreSQL chooses for them on its own)
# such a read costs its planning in every partition: over the 90-day window's 91,
# ~13 ms of planning for ~3 ms of execution. The first page of an agent (what most
# reads are: most agents have less than a page) and an agent's key entries run under a
# generic plan instead (``_fetch_planned``), whose subquery (``OFFSET 0``: nothing is
# pushed into it) is the index's bitmap scans alone, with the bounds and one sort on
# top. Pushed down, a generic plan's bounds by position walk or AND in each
# partition's primary key (~130 ms for ``ORDER BY position LIMIT $2``, ~20 ms for a key
# entry). A generic plan reads every entry of the agent, whatever the page; so the
# pages after the first (an agent with more than a page) are planned per call, which
# lets PostgreSQL walk an agent found in much of the ledger in position order and stop
# at the page (~35 ms a page against ~73 for an agent in half of 200,000 entries,
# growing with the agent's entries) — forced too: left to choose, PostgreSQL may
# settle on that statement's generic plan, which walks every primary key.
_GENERIC: PlanMode = "force_generic_plan"
_CUSTOM: PlanMode = "force_custom_plan"
_AGENT_FIRST_PAGE = (
    f"SELECT * FROM (SELECT {ENTRY_COLUMNS} FROM events "  # noqa: S608 -- constant
    "WHERE subjects @> ARRAY[$1]::text[] OFFSET 0) AS e ORDER BY position LIMIT $2"
)
_AGENT_PAGE = (
    f"SELECT {ENTRY_COLUMNS} FROM events "  # noqa: S608 -- constant
    "WHERE subjects @> ARRAY[$1]::text[] AND position > $2 ORDER BY position LIMIT $3"
)
_AGENT_KEY_ENTRIES = (
    "SELECT body FROM (SELECT position, body FROM events "
    "WHERE subjects @> ARRAY[$1]::text[] "
    "AND event_type IN ('agent.registered', 'agent.key_rotated') OFFSET 0) AS e "
    "WHERE position < $2 AND position > $3 ORDER BY position DESC"
)


# The day tables of ``$1`` (``<table>_pYYYYMMDD``) in the ledger's schema: its
# partitions, and any such table no longer attached to it (a retention run that died between
# detaching and dropping).
_DAY_TABLES = """
SELECT c.relname
  FROM pg_class c LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
 WHERE c.relkind = 'r' AND c.relnamespace = current_schema()::regnamespace
   AND c.relname ~ ('^' || $1 || '_p[0-9]{8}$')
   AND (i.inhparent IS NULL OR i.inhparent = $1::regclass)
 ORDER BY 1
"""


async def day_tables(pool: asyncpg.Pool, table: str) -> list[tuple[str, date]]:
    """``table``'s day tables (name, UTC day), oldest first: its partitions, and any
    left detached by a retention run that died before dropping them."""
    try:
        rows = await pool.fetch(_DAY_TABLES, table)
    except DRIVER_ERRORS as exc:
        raise StoreUnavailableError(f"cannot list the ledger's partitions: {exc}") from exc
    days = []
    for (name,) in rows:
        found = partition_day(name)
        if found is None or found[0] != table:
            raise StoreUnavailableError(f"unexpected partition {name!r} of {table}")
        days.append((name, found[1]))
    return days


class PostgresLedgerReader:
    """Read access to the ledger: entries, head and checkpoints. Needs no key."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        # The time of the last entry of recent reads, by position: what lets the next
        # read of a reader paging through the ledger name the day partitions it needs.
        self._times: dict[int, datetime] = {}
        # The first position of each day partition, by position, and when it was read.
        self._days: tuple[list[int], list[datetime]] = ([], [])
        self._days_read = -math.inf

    @classmethod
    async def connect(cls, url: str, pool_size: int = 4) -> PostgresLedgerReader:
        """A reader on its own pool, whose connections go back without a reset query
        (``create_pool(reader=True)``: a reader takes no session state)."""
        return cls(await create_pool(url, pool_size, reader=True))

    async def close(self) -> None:
        await self._pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    async def _checkpoint_at(self, conn: asyncpg.Connection, position: int) -> Checkpoint | None:
        row = await conn.fetchrow(
            "SELECT position, head_hash, time, signer, encode(signature, 'base64') AS sig "
            "FROM checkpoints WHERE position = $1",
            position,
        )
        return None if row is None else checkpoint_from_row(row)

    async def latest_checkpoint(self) -> Checkpoint | None:
        row = await self._fetchrow(
            "SELECT position, head_hash, time, signer, encode(signature, 'base64') AS sig "
            "FROM checkpoints ORDER BY position DESC LIMIT 1"
        )
        return None if row is None else checkpoint_from_row(row)

    async def checkpoints(self, after: int = 0, limit: int = 10_000) -> list[Checkpoint]:
        rows = await self._fetch(
            "SELECT position, head_hash, time, signer, encode(signature, 'base64') AS sig "
            "FROM checkpoints WHERE position > $1 ORDER BY position LIMIT $2",
            after,
            limit,
        )
        return [checkpoint_from_row(r) for r in rows]

    # -- reading -----------------------------------------------------------

    async def head(self) -> Head:
        row = await self._fetchrow(
            "SELECT position, entry_hash, recorded_at FROM ledger_head WHERE id = 1"
        )
        assert row is not None  # the migration inserts the row
        return Head(row["position"], bytes(row["entry_hash"]), row["recorded_at"])

    async def read(self, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        """Entries with position > ``after`` in position order, at most ``limit``."""
        rows = await self._read_rows(ENTRY_COLUMNS, after, limit)
        return [record_from_row(r) for r in rows]

    async def read_bodies(self, after: int = 0, limit: int = 1000) -> list[StoredBody]:
        """``ports.BodyReader``: position, time and body of the entries after ``after``
        (a quarter of a full read's CPU: no hashes, signature, subjects or dataclass)."""
        rows = await self._read_rows("position, recorded_at, body", after, limit)
        make = tuple.__new__
        return [make(StoredBody, row) for row in rows]

    async def _read_rows(self, columns: str, after: int, limit: int) -> list[asyncpg.Record]:
        """``columns`` of the entries after ``after``, at most ``limit``, by position.

        ``events`` is partitioned by day of ``recorded_at``, not by position: a read by
        position alone plans and opens every day partition (91 in the 90-day window:
        ~3.4 ms a read, against ~0.15 ms for one partition). So the read is bounded
        below by a time the entry at ``after`` is known to have reached — its own
        time when this reader read it before (the last of an earlier read: a reader
        paging through the ledger, the projector's tail), else the start of the day
        partition that held it (``_day_floor``) — and, the ledger's clock never running
        back (the writer holds it to the head's, verification refuses a ledger where
        it does), only the partitions from that day on are read. The bounded read
        also returns the entry at ``after`` and keeps its rows only if that entry is
        there (with the time remembered, if one was) and the rows follow it without a
        gap (positions have none); otherwise the read is by position alone. (Rows
        edited so that their times run back are then read all the same, once a later
        entry shows the gap.)"""
        since = self._times.get(after)
        exact = since is not None
        if since is None and after > 0:
            since = await self._day_floor(after)
        rows: list[asyncpg.Record] | None = None
        if since is not None:
            bounded = await self._fetch(
                f"SELECT {columns} FROM events "  # noqa: S608 -- constants only
                "WHERE position >= $1 AND recorded_at >= $3 ORDER BY position LIMIT $2",
                after,
                min(limit, _MAX_LIMIT - 1) + 1,  # the entry at ``after`` too
                since,
            )
            if (
                bounded
                and bounded[0]["position"] == after
                and (not exact or bounded[0]["recorded_at"] == since)
                # Positions are unique and in order: these are after, after + 1, …
                and bounded[-1]["position"] == after + len(bounded) - 1
            ):
                rows = bounded[1:]
            elif exact:
                self._times.pop(after, None)
        if rows is None:
            rows = await self._fetch(
                f"SELECT {columns} FROM events WHERE position > $1 "  # noqa: S608 -- constants
                "ORDER BY position LIMIT $2",
                after,
                limit,
            )
        if rows:
            self._remember(rows[-1]["position"], rows[-1]["recorded_at"])
        return rows

    async def _day_floor(self, position: int) -> datetime | None:
        """The start of the day partition that held the entry at ``position`` when this
        reader last read each day partition's first position (at most ``_DAYS_FRESH``
        seconds ago; positions and times rise together, so a partition holds the
        positions from its first to the next one's), or None if it held none. A map
        read before a new day started still gives a lower bound (an older day)."""
        if time.monotonic() - self._days_read > _DAYS_FRESH:
            self._days_read = time.monotonic()
            self._days = await self._first_positions()
        firsts, days = self._days
        index = bisect.bisect_right(firsts, position) - 1
        return days[index] if index >= 0 else None

    async def _first_positions(self) -> tuple[list[int], list[datetime]]:
        """Each day partition of ``events`` holding entries: its first position and the
        start of its day, by position (two round trips: the partitions' names from the
        catalog, then an index probe a day, through ``events`` itself — a role allowed
        to read ``events`` needs no grant on its partitions). Empty if they cannot be
        read: reads are then by position alone until the next try."""
        try:
            days = [day for _, day in await day_tables(self._pool, "events")]
            if not days:
                return [], []
            # Each day's bounds are constants (dates formatted here), so each probe is
            # planned for that day's partition alone (a detached day finds nothing).
            rows = await self._pool.fetch(
                " UNION ALL ".join(
                    f"SELECT {i} AS i, (SELECT min(position) FROM events "  # noqa: S608
                    f"WHERE recorded_at >= {_day_start(day)} "
                    f"AND recorded_at < {_day_start(day + timedelta(days=1))}) AS first"
                    for i, day in enumerate(days)
                )
            )
        except (StoreUnavailableError, *DRIVER_ERRORS) as exc:
            log.debug("day partitions' first positions not read: %s", exc)
            return [], []
        found = sorted(
            (r["first"], datetime.combine(days[r["i"]], datetime.min.time(), UTC))
            for r in rows
            if r["first"] is not None
        )
        return [first for first, _ in found], [day for _, day in found]

    def _remember(self, position: int, recorded_at: datetime) -> None:
        """Keep the time of the entry at ``position`` for a read after it (the newest
        ``_TIMES_KEPT`` positions read up to: one per reader paging at once)."""
        times = self._times
        times[position] = recorded_at
        if len(times) > _TIMES_KEPT:
            del times[next(iter(times))]

    async def read_agent(self, did: str, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        """Entries an agent signed or is the subject of, in position order (the first
        page under one generic plan, the next ones planned per call: ``_AGENT_PAGE``)."""
        if after <= 0:
            rows = await self._fetch_planned(_GENERIC, _AGENT_FIRST_PAGE, did, limit)
        else:
            rows = await self._fetch_planned(_CUSTOM, _AGENT_PAGE, did, after, limit)
        return [record_from_row(r) for r in rows]

    async def iter_entries(self, after: int = 0, batch: int = 2000) -> AsyncIterator[RecordedEvent]:
        """Every entry after ``after``, streamed in batches (never loaded whole)."""
        while True:
            rows = await self.read(after, batch)
            for row in rows:
                yield row
            if len(rows) < batch:
                return
            after = rows[-1].position

    async def current_key(self, did: str) -> VerifyKey | None:
        """The agent's current key, or None if it is not registered."""
        row = await self._fetchrow("SELECT public_key FROM agent_keys WHERE did = $1", did)
        return None if row is None else VerifyKey.from_raw(bytes(row["public_key"]))

    def audit_source(self) -> AuditSource:
        """The audit exporter's reads on this database (``ledger.audit``'s port)."""
        from ledger.postgres.audit import PostgresAuditSource  # it imports this module

        return PostgresAuditSource(self)

    def retention_store(self) -> RetentionStore:
        """Retention's statements on this database (``ledger.retention``'s port)."""
        from ledger.postgres.retention import PostgresRetentionStore  # it imports this module

        return PostgresRetentionStore(self.pool)

    @contextlib.asynccontextmanager
    async def listener(self) -> AsyncIterator[asyncio.Event]:
        """An event set whenever an append commits (LISTEN on a held connection)."""
        wake = asyncio.Event()

        def on_notify(*_: object) -> None:
            wake.set()

        try:
            conn = await self._pool.acquire()
            await conn.add_listener(NOTIFY_CHANNEL, on_notify)
        except DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot listen for appends: {exc}") from exc
        try:
            yield wake
        finally:
            try:
                await conn.remove_listener(NOTIFY_CHANNEL, on_notify)  # sends UNLISTEN
            except DRIVER_ERRORS:
                conn.terminate()  # still listening, maybe: not for another acquirer
            await self._pool.release(conn)

    async def follow(
        self, after: int = 0, batch: int = 1000, poll_interval: float = 1.0
    ) -> AsyncIterator[list[RecordedEvent]]:
        """Yield batches of new entries forever, woken by NOTIFY.

        NOTIFY is only a hint: a periodic poll is the source of truth, so a
        lost notification (or PgBouncer in the way) costs latency, not events.
        """
        async with self.listener() as wake:
            while True:
                wake.clear()
                rows = await self.read(after, batch)
                if rows:
                    after = rows[-1].position
                    yield rows
                    if len(rows) == batch:
                        continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), poll_interval)

    async def _fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        try:
            return list(await self._pool.fetch(query, *args))
        except DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot read the ledger: {exc}") from exc

    async def _fetch_planned(
        self, mode: PlanMode, query: str, *args: object
    ) -> list[asyncpg.Record]:
        """``query``'s rows planned as ``mode`` says — one generic plan per connection
        and statement, or a plan per call — in a read-only transaction whose ``SET
        LOCAL`` ends with it (see ``_AGENT_FIRST_PAGE``)."""
        try:
            async with self._pool.acquire() as conn, conn.transaction(readonly=True):
                await conn.execute(f"SET LOCAL plan_cache_mode = {mode}")
                return list(await conn.fetch(query, *args))
        except DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot read the ledger: {exc}") from exc

    async def _fetchrow(self, query: str, *args: object) -> asyncpg.Record | None:
        try:
            return await self._pool.fetchrow(query, *args)
        except DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot read the ledger: {exc}") from exc

    async def _fetchval(self, query: str, *args: object) -> object:
        try:
            return await self._pool.fetchval(query, *args)
        except DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot read the ledger: {exc}") from exc

    async def entry_at(self, position: int) -> RecordedEvent | None:
        rows = await self.read(position - 1, 1)
        return rows[0] if rows and rows[0].position == position else None

    async def key_before(self, did: str, position: int) -> bytes | None:
        """One agent's key as of just before ``position``: its last registration or
        rotation below it (after the latest retention anchor below it), else that
        anchor's key for it. Found through the ``subjects`` index: the agent's own
        entries, not every registration of the ledger (``keys_before`` decodes all
        of them: seconds at 100,000 agents)."""
        anchor = await self._anchor_below(position)
        start = 0 if anchor is None else anchor["position"]
        rows = await self._fetch_planned(_GENERIC, _AGENT_KEY_ENTRIES, did, position, start)
        for row in rows:
            event = decode_body(bytes(row["body"]))
            if isinstance(event, AgentRegistered | AgentKeyRotated) and event.did == did:
                return VerifyKey.from_recorded_pem(event.public_key).raw
        if anchor is None:
            return None
        raw = msgspec.json.decode(bytes(anchor["keys"])).get(did)
        return None if raw is None else b64decode(raw, "key")

    async def _anchor_below(self, position: int) -> Any:
        return await self._fetchrow(
            "SELECT position, keys FROM retention_anchors WHERE position < $1 "
            "ORDER BY position DESC LIMIT 1",
            position,
        )

    async def keys_before(self, position: int) -> dict[str, bytes]:
        """Every agent's key as of just before ``position``: the keys of the latest
        retention anchor below it (whose history is gone), then the registrations
        and rotations after that anchor."""
        anchor = await self._anchor_below(position)
        keys: dict[str, bytes] = {}
        start = 0
        if anchor is not None:
            start = anchor["position"]
            stored = msgspec.json.decode(bytes(anchor["keys"]))
            keys = {did: b64decode(raw, "key") for did, raw in stored.items()}
        rows = await self._fetch(
            "SELECT body FROM events WHERE position < $1 AND position > $2 "
            "AND event_type IN ('agent.registered', 'agent.key_rotated') ORDER BY position",
            position,
            start,
        )
        for row in rows:
            change = decode_key_change(bytes(row["body"]))
            if change is not None:
                keys[change.did] = VerifyKey.from_recorded_pem(change.public_key).raw
        return keys

    async def suspended_before(self, position: int) -> set[str]:
        """The agents suspended as of just before ``position``: those of the latest
        retention snapshot below it, then the suspensions and reinstatements after."""
        anchor = await self._fetchrow(
            "SELECT position, snapshot FROM retention_anchors WHERE position < $1 "
            "ORDER BY position DESC LIMIT 1",
            position,
        )
        suspended: set[str] = set()
        start = 0
        if anchor is not None:
            start = anchor["position"]
            agents = msgspec.json.decode(bytes(anchor["snapshot"]))["agents"]
            suspended = {d for d, a in agents.items() if a["registry"]["status"] == "suspended"}
        rows = await self._fetch(
            "SELECT body FROM events WHERE position < $1 AND position > $2 "
            "AND event_type IN ('agent.suspended', 'agent.reinstated') ORDER BY position",
            position,
            start,
        )
        for row in rows:
            event = decode_body(bytes(row["body"]))
            if isinstance(event, AgentSuspended):
                suspended.add(event.did)
            elif isinstance(event, AgentReinstated):
                suspended.discard(event.did)
        return suspended

    # -- the Merkle tree (ledger.tlog) ------------------------------------------------

    async def tree_root(self, size: int) -> bytes:
        """The root of the tree of the first ``size`` entries."""
        _check_size(size)
        return await self._with_nodes(size, lambda hash_at: merkle.root_at(size, hash_at))

    async def inclusion_proof(self, position: int, tree_size: int) -> list[bytes]:
        """RFC 9162 audit path of the entry at ``position`` in the tree of ``tree_size``."""
        _check_size(tree_size)
        if not 1 <= position <= tree_size:
            raise ProofError(f"position {position} is not in a tree of {tree_size} entries")
        return await self._with_nodes(
            tree_size, lambda hash_at: merkle.inclusion_proof(position - 1, tree_size, hash_at)
        )

    async def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """RFC 9162 consistency proof from the tree of ``first`` to that of ``second``."""
        _check_size(second)
        if not 1 <= first <= second:
            raise ProofError(
                f"no consistency proof from size {first} to {second}: "
                "the sizes must satisfy 1 <= first <= second"
            )
        return await self._with_nodes(
            second, lambda hash_at: merkle.consistency_proof(first, second, hash_at)
        )

    async def frontier_at(self, size: int) -> Frontier:
        """The right edge of the tree of the first ``size`` entries."""
        _check_size(size)
        return await self._with_nodes(size, lambda hash_at: merkle.frontier_at(size, hash_at))

    async def tree_heads(self, after: int = 0) -> dict[int, str]:
        """The stored signed tree heads (C2SP notes) after ``after``, by position."""
        rows = await self._fetch(
            "SELECT position, note FROM checkpoints WHERE note IS NOT NULL AND position > $1",
            after,
        )
        return {r["position"]: r["note"] for r in rows}

    async def latest_tree_head(self) -> str | None:
        """The latest checkpoint as a C2SP signed note, None before the first."""
        value = await self._fetchval(
            "SELECT note FROM checkpoints WHERE note IS NOT NULL ORDER BY position DESC LIMIT 1"
        )
        return None if value is None else str(value)

    async def _with_nodes(self, size: int, compute: Callable[[merkle.HashAt], T]) -> T:
        """Run a tree computation over the subtrees it needs, fetched in one round trip.

        A tree past the head lacks its last leaves, so a missing subtree is the sign
        of a size too large; only then is the head read, to say so."""
        found = await self._tree_nodes(tlog.needed_nodes(compute))
        missing: list[tuple[int, int]] = []

        def hash_at(level: int, index: int) -> bytes:
            value = found.get((level, index))
            if value is None:
                missing.append((level, index))
                return bytes(32)
            return value

        result = compute(hash_at)
        if missing:
            head = await self.head()
            if size > head.position:
                raise ProofError(f"tree size {size} is not in 0..{head.position} (the head)")
            level, index = missing[0]
            raise ProofError(f"subtree ({level}, {index}) is not available")
        return result

    async def tree_nodes(self, wanted: set[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """The hashes of the complete subtrees ``wanted`` ((level, index)) that exist,
        in one round trip (an audit export's inclusion proofs, batch by batch)."""
        found = await self._tree_nodes(wanted)
        return {key: found[key] for key in wanted if key in found}

    async def _tree_nodes(self, wanted: set[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """The hashes of ``wanted`` subtrees: stored ones (16+ leaves, and the tree's edge
        kept at a retention cut) read in one query; smaller ones rebuilt from stored
        pieces and the entries' hashes (never more than 16 of them per subtree)."""
        pieces = {
            (level, index)
            for lv, ix in wanted
            if lv < tlog.STORED_LEVEL
            for level in range(lv)
            for index in range(ix << (lv - level), (ix + 1) << (lv - level))
        }
        keys = wanted | pieces
        levels, indexes = [lv for lv, _ in keys], [ix for _, ix in keys]
        leaves = sorted(i + 1 for lv, i in keys if lv == 0)
        # One round trip: the stored subtrees, and the entries under the small ones
        # (level -1 marks an entry's hash; a stored leaf, kept at a cut, wins). The
        # entries are read from the day partition of the first one on (see
        # ``_read_rows``), and by position alone if that misses any of them.
        since = await self._day_floor(leaves[0]) if leaves else None
        if since is not None:
            rows = await self._fetch(
                _NODES_SQL + " AND recorded_at >= $4", levels, indexes, leaves, since
            )
            got = {r["idx"] + 1 for r in rows if r["level"] <= 0}
            if not got.issuperset(leaves):
                since = None
        if since is None:
            rows = await self._fetch(_NODES_SQL, levels, indexes, leaves)
        found = {(r["level"], r["idx"]): bytes(r["hash"]) for r in rows if r["level"] >= 0}
        for r in rows:
            if r["level"] < 0:
                found.setdefault((0, r["idx"]), tlog.entry_leaf(bytes(r["hash"])))
        for lv, ix in sorted(wanted):
            if lv < tlog.STORED_LEVEL:  # a larger one is stored, or does not exist (yet)
                _compose(found, lv, ix)
        return found

    async def ledger_identity(self) -> VerifyKey | None:
        """The ledger's public key: recorded at genesis, replaced by each rotation (None
        before the first open)."""
        row = await self._fetchrow("SELECT public_key FROM ledger_identity WHERE id = 1")
        return None if row is None else VerifyKey.from_raw(bytes(row["public_key"]))

    async def ledger_rotations(self) -> list[RecordedEvent]:
        """Every ``ledger.key_rotated`` entry (the ledger's key history), by position:
        they are on the ``ledger`` stream, so its index finds them."""
        rows = await self._fetch(
            f"SELECT {ENTRY_COLUMNS} FROM events WHERE stream_id = 'ledger' "  # noqa: S608
            "AND event_type = 'ledger.key_rotated' ORDER BY position"
        )
        return [record_from_row(r) for r in rows]

    async def retention_window(self) -> Window | None:
        """The latest recorded retention anchor's snapshot, digest-checked; None if
        nothing was cut (``ledger verify`` checks the anchor's signature)."""
        row = await self._fetchrow(
            "SELECT position, cut_time, snapshot, snapshot_digest FROM retention_anchors "
            "WHERE status <> 'anchored' ORDER BY position DESC LIMIT 1"
        )
        if row is None:
            return None
        snapshot = bytes(row["snapshot"])
        if hashlib.sha256(snapshot).digest() != bytes(row["snapshot_digest"]):
            raise VerificationError(row["position"], "retention snapshot does not match its digest")
        return Window(row["position"], row["cut_time"], msgspec.json.decode(snapshot))

    async def schema_revision(self) -> str | None:
        """The Alembic revision the database is at (readiness), None before migrations."""
        try:
            value = await self._pool.fetchval("SELECT version_num FROM alembic_version")
        except asyncpg.UndefinedTableError:
            return None
        except DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot read the schema revision: {exc}") from exc
        return None if value is None else str(value)

    async def first_position(self) -> int | None:
        """The oldest position still stored (retention removes the ones before it)."""
        row = await self._fetchrow("SELECT min(position) AS first FROM events")
        return None if row is None else row["first"]


async def create_pool(url: str, size: int, *, reader: bool = False) -> asyncpg.Pool:
    """A pool on ``url``; behind a transaction pooler (``?pooler=transaction``) its
    connections keep no prepared statements between calls (``ledger.postgres.dsn``).

    A released connection is reset by asyncpg with a query (advisory locks, cursors,
    LISTEN, settings): one more round trip per read. ``reader`` pools skip it
    (``_reader_release``); the writer's pool keeps it (its turn lock is a session
    advisory lock)."""
    reset = _reader_release if reader else None
    try:
        return await asyncpg.create_pool(
            **connect_kwargs(url), min_size=1, max_size=size, reset=reset
        )
    except DRIVER_ERRORS as exc:
        raise StoreUnavailableError(f"cannot connect to PostgreSQL: {exc}") from exc


async def _reader_release(conn: asyncpg.Connection) -> None:
    """What a reader's connection needs on release beyond what asyncpg always does
    (roll back an open transaction, drop listener callbacks): nothing. A reader takes
    no session state — no SET, no session advisory lock, no cursor outside a
    transaction; ``listener`` undoes its LISTEN itself (or closes the connection)."""


def checkpoint_from_row(row: asyncpg.Record) -> Checkpoint:
    return Checkpoint(
        origin="agentmesh-ledger",
        position=row["position"],
        head_hash=bytes(row["head_hash"]).hex(),
        time=format_time(row["time"]),
        signer=row["signer"],
        signature=row["sig"].replace("\n", ""),
    )


def _compose(found: dict[tuple[int, int], bytes], level: int, index: int) -> bytes | None:
    """The hash of subtree (level, index) from what ``found`` holds, memoised in it."""
    known = found.get((level, index))
    if known is not None or level == 0:
        return known
    left = _compose(found, level - 1, 2 * index)
    right = _compose(found, level - 1, 2 * index + 1)
    if left is None or right is None:
        return None
    found[(level, index)] = merkle.node_hash(left, right)
    return found[(level, index)]


def _check_size(size: int) -> None:
    if not 0 <= size <= 2**63 - 1:
        raise ProofError(f"tree size {size} is not a size")
