"""One group commit of the PostgreSQL writer: what it checks and what it writes.

Pure (no I/O): the store (``ledger.postgres.store``) reads with ``STATE_SQL`` /
``LOOKUP_SQL``, builds a ``BatchState`` (from ``Known``, what the process's last
commit left, plus the lookup), runs ``apply`` over each request — the trust
model's rules (``ledger.authority``), then the staged rows, chained and added to
the Merkle tree — and writes everything with ``write_statement``: one statement
guarded by the head the batch was computed from, holding only the parts the batch
writes.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from ledger import authority, tlog
from ledger.chain import AppendResult, Head, entry_hash, envelope_bytes
from ledger.errors import (
    ConcurrencyError,
    IdempotencyConflictError,
    LedgerError,
    LedgerKeyMismatchError,
    NotPermittedError,
    SignatureError,
)
from ledger.events import (
    AgentKeyRotated,
    AgentRegistered,
    AgentReinstated,
    AgentSuspended,
    Event,
    LedgerKeyRotated,
    subject_agents,
)
from ledger.identity import VerifyKey
from ledger.merkle import Frontier, Subtree
from ledger.postgres.reader import NOTIFY_CHANNEL
from ledger.signed import SignedEvent, append_stream


@dataclass(slots=True)
class Request:
    events: tuple[SignedEvent, ...]
    stream_id: str
    expected_version: int | None
    idempotency_key: str | None
    digest: bytes
    keys_used: dict[str, bytes]
    future: asyncio.Future[AppendResult]
    bootstrap: bool = False
    # The idempotency key's day: its first event's ``authority.single_use_day`` (a
    # retry resends the same events); None when that is no time (refused anyway).
    day: date | None = None

    @property
    def signer(self) -> str:
        """Whose idempotency keys this request's key is one of."""
        return self.events[0].actor

    @property
    def scope(self) -> tuple[str, str, date | None] | None:
        """Where its idempotency key is unique: signer, key, day (None without a key)."""
        key = self.idempotency_key
        return None if key is None else (self.events[0].actor, key, self.day)


def new_request(
    events: Sequence[SignedEvent],
    expected_version: int | None,
    idempotency_key: str | None,
) -> Request:
    """An append's request, its shape checked (one stream, a sane key), its future
    on the running loop."""
    stream = append_stream(events, idempotency_key)
    return Request(
        events=tuple(events),
        stream_id=stream,
        expected_version=expected_version,
        idempotency_key=idempotency_key,
        # What a retry under the same key must repeat; nothing to compare without a key.
        digest=b"" if idempotency_key is None else _digest(events),
        keys_used={},
        future=asyncio.get_running_loop().create_future(),
        day=authority.single_use_day(events[0].event),
    )


def _digest(events: Sequence[SignedEvent]) -> bytes:
    return hashlib.sha256(b"\n".join(e.body for e in events)).digest()


@dataclass(slots=True)
class BatchState:
    """What the transaction learned and changed so far, request by request."""

    head: Head
    frontier: Frontier
    now: datetime
    ledger_did: str
    keys: dict[str, bytes | None]
    key_positions: dict[str, int]
    suspended_dids: dict[str, bool]
    ids: set[tuple[bytes, date]]  # single-use ids taken: (event_key, single_use_day)
    has_any_agent: bool
    versions: dict[str, int]
    done_keys: dict[tuple[str, str, date | None], tuple[bytes, AppendResult]]
    existing_streams: set[str] = field(default_factory=set)
    rows: list[tuple[object, ...]] = field(default_factory=list)
    stream_rows: dict[str, tuple[int, int]] = field(default_factory=dict)
    key_rows: dict[str, tuple[bytes, int, bool]] = field(default_factory=dict)
    idem_rows: list[tuple[object, ...]] = field(default_factory=list)
    id_rows: list[tuple[bytes, date, int]] = field(default_factory=list)
    leaves: list[bytes] = field(default_factory=list)
    nodes: list[Subtree] = field(default_factory=list)
    checkpoint: CheckpointRow | None = None
    identity_row: tuple[str, bytes] | None = None  # a rotation's new ledger DID and key
    results: list[tuple[Request, AppendResult | LedgerError]] = field(default_factory=list)


# A checkpoint signed with a commit: position, head hash, time, signer, signature
# (base64), C2SP note.
CheckpointRow = tuple[int, bytes, datetime, str, str, str]
# After the guarded write found the head moved (another process appends), batches skip
# the one-round-trip path for this long (it would miss again).
LOCKED_AFTER_MISS = 1.0
# Beyond this many agents and streams remembered, start over (they are re-learned).
_KNOWN_LIMIT = 1_000_000
# Events that change a row of ``agent_keys`` (a key, or a suspension).
_KEY_EVENTS = frozenset(
    {"agent.registered", "agent.key_rotated", "agent.suspended", "agent.reinstated"}
)
# Catching up on another process's turn reads at most this many entries; past it,
# what this process knew is forgotten and read again as needed.
CATCH_UP_LIMIT = 10_000


@dataclass(slots=True)
class Known:
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
    contended_until: float = 0.0
    ledger_did: str | None = None  # the ledger's DID (``ledger_identity``) as of ``head``

    def reset(self, head: Head | None) -> None:
        self.head = head
        self.ledger_did = None
        self.keys.clear()
        self.versions.clear()
        self.has_any_agent = False

    def miss(self) -> None:
        self.reset(None)
        self.contended_until = time.monotonic() + LOCKED_AFTER_MISS

    def learn(
        self, rows: Sequence[Mapping[str, Any]], dids: Sequence[str], streams: Sequence[str]
    ) -> None:
        """Absorb a ``STATE_SQL`` (or ``LOOKUP_SQL``) answer for these agents and streams."""
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
            elif kind == "l":
                self.ledger_did = row["id"]

    def batch_state(
        self,
        head: Head,
        frontier: Frontier,
        now: datetime,
        ledger_did: str,
        dids: set[str],
        streams: set[str],
    ) -> BatchState:
        state = BatchState(
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

    def catch_up(self, rows: Sequence[Mapping[str, Any]]) -> Head | None:
        """Absorb what other writers appended after ``head`` (``TAKE_TURN_SQL``'s rows,
        in position order): stream versions are taken, agents whose key or suspension
        an event changed are forgotten (read again when next named). The new head, or
        None when the rows do not continue ``head`` gap-free (everything forgotten)."""
        head = self.head
        if head is None or not rows:
            return head
        if rows[0]["position"] != head.position + 1 or rows[-1]["position"] != (
            head.position + len(rows)
        ):
            self.reset(None)
            return None
        for row in rows:
            kind = row["event_type"]
            self.versions[row["stream_id"]] = row["stream_version"]
            if kind in _KEY_EVENTS:
                for did in (row["actor"], *row["subjects"]):
                    self.keys.pop(did, None)
                self.has_any_agent = self.has_any_agent or kind == "agent.registered"
            elif kind == "ledger.key_rotated":
                self.reset(None)  # the ledger's identity is read again, with everything
                return None
        last = rows[-1]
        self.head = Head(last["position"], bytes(last["entry_hash"]), last["recorded_at"])
        return self.head

    def committed(self, state: BatchState) -> None:
        self.head = state.head
        self.ledger_did = state.ledger_did
        for did, row in state.key_rows.items():
            self.keys[did] = row
        for stream, (version, _) in state.stream_rows.items():
            self.versions[stream] = version
        self.has_any_agent = self.has_any_agent or state.has_any_agent


class RequestView:
    """``authority.WriteView`` over the batch so far plus one request's own changes,
    which are dropped if any event of the request is refused (all or nothing)."""

    def __init__(self, state: BatchState) -> None:
        self.state = state
        self.ledger_did = state.ledger_did
        self.keys: dict[str, bytes] = {}
        self.suspended_dids: dict[str, bool] = {}
        self.ids: set[tuple[bytes, date]] = set()
        self._id_keys: dict[tuple[str, str], bytes] = {}  # event_key, once per event

    def id_key(self, actor: str, event_id: str) -> bytes:
        found = self._id_keys.get((actor, event_id))
        if found is None:
            found = self._id_keys[actor, event_id] = event_key(actor, event_id)
        return found

    def key(self, did: str) -> bytes | None:
        return self.keys[did] if did in self.keys else self.state.keys.get(did)

    def suspended(self, did: str) -> bool:
        return self.suspended_dids.get(did, self.state.suspended_dids.get(did, False))

    def has_agents(self) -> bool:
        return bool(self.keys) or self.state.has_any_agent

    def seen(self, actor: str, event_id: str, day: date) -> bool:
        key = (self.id_key(actor, event_id), day)
        return key in self.ids or key in self.state.ids

    def advance(self, event: Event) -> None:
        day = authority.single_use_day(event)
        if event.event_id is not None and day is not None:
            self.ids.add((self.id_key(event.actor, event.event_id), day))
        if isinstance(event, AgentRegistered | AgentKeyRotated):
            self.keys[event.did] = VerifyKey.from_recorded_pem(event.public_key).raw
        elif isinstance(event, AgentSuspended | AgentReinstated):
            self.suspended_dids[event.did] = isinstance(event, AgentSuspended)
        elif isinstance(event, LedgerKeyRotated):
            self.ledger_did = event.did  # the old key signs nothing after this


def retired(ledger_did: str | None, own_did: str) -> LedgerKeyMismatchError | None:
    """The refusal of a process whose key is no longer the ledger's (another process
    rotated it): it appends and signs nothing, rather than fork the ledger."""
    if ledger_did is None or ledger_did == own_did:
        return None
    return LedgerKeyMismatchError(
        f"the ledger's key was rotated to {ledger_did}; this process holds the retired key "
        f"{own_did}: restart it with the new key (AGENTMESH_AGENT_PRIVATE_KEY)"
    )


# What the checks of a batch read: keys and suspension of the agents it names, the
# versions of its streams, and whether any agent is registered ($1, $2).
STATE_SQL = """
SELECT 'k' AS kind, did AS id, public_key AS raw, position AS a, suspended::int AS b,
       NULL::text AS c, NULL::int AS d, NULL::timestamptz AS t
  FROM agent_keys WHERE did = ANY($1::text[])
UNION ALL
SELECT 's', stream_id, NULL, NULL, version, NULL, NULL, NULL
  FROM streams WHERE stream_id = ANY($2::text[])
UNION ALL
SELECT 'a', NULL, NULL, NULL, NULL, NULL, NULL, NULL WHERE EXISTS (SELECT 1 FROM agent_keys)
"""

# Under the lock, also the head, the ledger's DID (a rotation by another process
# retires this one's key), and the idempotency keys ($3-$5: signer, key, day) and
# single-use event ids ($6, $7: key, day) the batch carries, so a retry or a replay is
# answered, not refused. Both tables are partitioned by that day (the bodies'
# ``occurred_at``, ``authority.single_use_day``), so each probe reads one partition.
LOOKUP_SQL = (
    STATE_SQL  # noqa: S608 -- constants only
    + """UNION ALL
SELECT 'h', NULL, entry_hash, position, NULL, NULL, NULL, recorded_at
  FROM ledger_head WHERE id = 1
UNION ALL
SELECT 'l', did, NULL, NULL, NULL, NULL, NULL, NULL FROM ledger_identity WHERE id = 1
UNION ALL
SELECT 'i', signer || ' ' || key, digest, first_position, count, stream_id, stream_version,
       day::timestamp AT TIME ZONE 'UTC'
  FROM idempotency_keys
 WHERE (signer, key, day) IN (SELECT * FROM unnest($3::text[], $4::text[], $5::date[]))
UNION ALL
SELECT 'e', NULL, key, position, NULL, NULL, NULL, day::timestamp AT TIME ZONE 'UTC'
  FROM event_ids WHERE (key, day) IN (SELECT * FROM unnest($6::bytea[], $7::date[]))
"""
)

# This process's turn on the ledger, then what other writers appended after its last
# commit, for ``Known.catch_up``: one round trip (migration 0009's function: $1 the
# turn lock, $2 the lock a holder keeps until the commit it handed over in is visible,
# $3 the longest wait for the turn in ms, $4 the position after which to read or NULL,
# $5 the time they are recorded at or after — time never runs backwards in the
# ledger, so only the newest partitions are read —, $6 at most that many rows). The
# first row says whether the turn was waited for and whether it is held.
TAKE_TURN_SQL = "SELECT * FROM ledger_take_turn($1, $2, $3, $4, $5, $6)"

# The whole write of a batch in one statement, guarded by the head it was computed
# from: ``h`` moves the head only if it is still ($1, $2) and sets the new one ($3-$5:
# position, hash, time); every other part writes only if ``h`` did (data-modifying
# CTEs always run; each reads ``h``). Without an explicit transaction this is one
# round trip and one commit; ``li`` records a rotated ledger key in the commit that
# appends its rotation; inside the locked path the guard holds by construction.
# Returns one row when it wrote, none when another writer moved the head first. The
# single-use ids and idempotency keys are unique keys (per day: what a replay or a
# retry repeats falls on the same day): a value used before fails the statement, and
# nothing is written.
#
# A statement holds only the parts its batch writes (``write_statement``): a part with
# no rows would write nothing, so leaving it out changes nothing but what PostgreSQL
# plans and runs and what the driver encodes. A batch of one event (the lone
# appender's) passes each part's row as scalars (``SELECT … FROM h``: one row when
# ``h`` moved the head, none otherwise); a larger batch passes columns, as arrays
# unnested. ``{name}`` is a parameter of the part, numbered from $6 in the order the
# parts appear (``write_text``). Every shape runs against PostgreSQL in
# tests/test_write_statement.py.
_WRITE_HEAD = """WITH h AS (
  UPDATE ledger_head SET position = $3, entry_hash = $4, recorded_at = $5
   WHERE id = 1 AND position = $1 AND entry_hash = $2
  RETURNING 1
)"""
# Per part: (its parameters, in the order of its rows' fields; its text with one row
# as scalars; its text with the rows as arrays). A part with one text has one form.
_WRITE_PARTS: dict[str, tuple[tuple[str, ...], str | None, str | None]] = {
    "ev": (
        ("p", "s", "v", "t", "a", "j", "b", "g", "ph", "eh"),
        """ev AS (
  INSERT INTO events (position, recorded_at, stream_id, stream_version, event_type, actor,
                      subjects, body, signature, prev_hash, entry_hash)
  SELECT {p}::bigint, $5, {s}::text, {v}::int, {t}::text, {a}::text, {j}::text[],
         {b}::bytea, {g}::bytea, {ph}::bytea, {eh}::bytea FROM h
)""",
        """ev AS (
  INSERT INTO events (position, recorded_at, stream_id, stream_version, event_type, actor,
                      subjects, body, signature, prev_hash, entry_hash)
  SELECT u.p, $5, u.s, u.v, u.t, u.a, string_to_array(u.j, ' '), u.b, u.g, u.ph, u.eh
    FROM unnest({p}::bigint[], {s}::text[], {v}::int[], {t}::text[], {a}::text[],
                {j}::text[], {b}::bytea[], {g}::bytea[], {ph}::bytea[], {eh}::bytea[])
         AS u(p, s, v, t, a, j, b, g, ph, eh)
   WHERE EXISTS (SELECT 1 FROM h)
)""",
    ),
    "su": (
        ("s", "v", "p"),
        """su AS (
  UPDATE streams SET version = {v}::int, last_position = {p}::bigint
   WHERE stream_id = {s}::text AND EXISTS (SELECT 1 FROM h)
)""",
        # ``= ANY`` as well as the join: the generic plan guesses ten rows for any
        # ``unnest`` of a parameter, and against up to ~5,000 streams it joined them by
        # hashing after reading every stream (0.2-0.4 ms a commit at 2,000); ``= ANY``
        # is answered from the primary key whatever the guess.
        """su AS (
  UPDATE streams SET version = u.v, last_position = u.p
    FROM unnest({s}::text[], {v}::int[], {p}::bigint[]) AS u(s, v, p)
   WHERE streams.stream_id = ANY({s}::text[]) AND streams.stream_id = u.s
     AND EXISTS (SELECT 1 FROM h)
)""",
    ),
    "si": (
        ("s", "v", "p"),
        """si AS (
  INSERT INTO streams (stream_id, version, last_position)
  SELECT {s}::text, {v}::int, {p}::bigint FROM h
)""",
        """si AS (
  INSERT INTO streams (stream_id, version, last_position)
  SELECT * FROM unnest({s}::text[], {v}::int[], {p}::bigint[]) WHERE EXISTS (SELECT 1 FROM h)
)""",
    ),
    "k": (
        ("d", "k", "p", "x"),
        """k AS (
  INSERT INTO agent_keys (did, public_key, position, suspended)
  SELECT {d}::text, {k}::bytea, {p}::bigint, {x}::bool FROM h
  ON CONFLICT (did) DO UPDATE SET public_key = excluded.public_key,
    position = excluded.position, suspended = excluded.suspended
)""",
        """k AS (
  INSERT INTO agent_keys (did, public_key, position, suspended)
  SELECT * FROM unnest({d}::text[], {k}::bytea[], {p}::bigint[], {x}::bool[])
   WHERE EXISTS (SELECT 1 FROM h)
  ON CONFLICT (did) DO UPDATE SET public_key = excluded.public_key,
    position = excluded.position, suspended = excluded.suspended
)""",
    ),
    "i": (
        ("signer", "key", "first", "count", "s", "v", "digest", "day"),
        """i AS (
  INSERT INTO idempotency_keys
    (signer, key, first_position, count, stream_id, stream_version, digest, day, recorded_at)
  SELECT {signer}::text, {key}::text, {first}::bigint, {count}::int, {s}::text, {v}::int,
         {digest}::bytea, {day}::date, $5 FROM h
)""",
        """i AS (
  INSERT INTO idempotency_keys
    (signer, key, first_position, count, stream_id, stream_version, digest, day, recorded_at)
  SELECT *, $5::timestamptz
    FROM unnest({signer}::text[], {key}::text[], {first}::bigint[], {count}::int[],
                {s}::text[], {v}::int[], {digest}::bytea[], {day}::date[])
   WHERE EXISTS (SELECT 1 FROM h)
)""",
    ),
    "e": (
        ("k", "d", "p"),
        """e AS (
  INSERT INTO event_ids (key, day, position) SELECT {k}::bytea, {d}::date, {p}::bigint FROM h
)""",
        """e AS (
  INSERT INTO event_ids (key, day, position)
  SELECT * FROM unnest({k}::bytea[], {d}::date[], {p}::bigint[]) WHERE EXISTS (SELECT 1 FROM h)
)""",
    ),
    "n": (  # a single leaf may complete subtrees at several levels: always arrays
        ("l", "i", "h"),
        None,
        """n AS (
  INSERT INTO merkle_nodes (level, idx, hash)
  SELECT * FROM unnest({l}::smallint[], {i}::bigint[], {h}::bytea[])
   WHERE EXISTS (SELECT 1 FROM h)
  ON CONFLICT (level, idx) DO NOTHING
)""",
    ),
    "c": (  # at most one checkpoint a batch
        ("p", "h", "t", "s", "g", "n"),
        """c AS (
  INSERT INTO checkpoints (position, head_hash, time, signer, signature, note)
  SELECT {p}::bigint, {h}::bytea, {t}::timestamptz, {s}::text, decode({g}::text, 'base64'),
         {n}::text FROM h
  ON CONFLICT (position) DO NOTHING
)""",
        None,
    ),
    "li": (  # at most one rotation of the ledger's key a batch
        ("d", "k"),
        """li AS (
  UPDATE ledger_identity SET did = {d}::text, public_key = {k}::bytea, recorded_at = $5
   WHERE id = 1 AND EXISTS (SELECT 1 FROM h)
)""",
        None,
    ),
}
# The parts a batch may lack (``ev``, the entries, it always has), in statement order.
OPTIONAL_PARTS = ("su", "si", "k", "i", "e", "n", "c", "li")
_NOTIFY = f"pg_notify('{NOTIFY_CHANNEL}', $3::text)"
_WRITE_TAIL = f"\nSELECT {_NOTIFY} FROM h\n"
# The same, handing this process's turn over as it writes (``PostgresEventStore``'s
# "Turns"): the commit lock taken until this statement's commit is visible (a waiter
# that gets the turn lock waits for it in ``ledger_take_turn``), then the turn lock
# released, and taken again at once if no process waited for it.
_HAND_OVER_TAIL = (
    f"\nSELECT {_NOTIFY}, pg_advisory_xact_lock_shared({{commit}}), "
    "pg_advisory_unlock({turn}) AS released, pg_try_advisory_lock({turn}) AS kept FROM h\n"
)
# (turn lock, commit lock) of a write that hands the turn over.
HandOver = tuple[int, int]
# A write's shape: whether its batch is one event (scalars), and the parts it has.
WriteShape = tuple[bool, tuple[str, ...]]
_write_texts: dict[tuple[WriteShape, HandOver | None], str] = {}


def write_shapes() -> list[WriteShape]:
    """Every shape ``write_statement`` can produce (each its own prepared statement)."""
    subsets: list[tuple[str, ...]] = [()]
    for part in OPTIONAL_PARTS:
        subsets += [(*subset, part) for subset in subsets]
    order = {p: i for i, p in enumerate(OPTIONAL_PARTS)}
    return [
        (one, ("ev", *sorted(subset, key=order.__getitem__)))
        for one in (True, False)
        for subset in subsets
    ]


def _scalar(one: bool, part: str) -> bool:
    _, scalars, arrays = _WRITE_PARTS[part]
    return arrays is None or (one and scalars is not None)


def write_text(shape: WriteShape, hand_over: HandOver | None = None) -> str:
    """The statement of a shape (made once, then kept); with ``hand_over`` it also
    hands the turn over (``_HAND_OVER_TAIL``)."""
    text = _write_texts.get((shape, hand_over))
    if text is None:
        one, parts = shape
        number = 6
        ctes = [_WRITE_HEAD]
        for part in parts:
            names, scalars, arrays = _WRITE_PARTS[part]
            template = scalars if _scalar(one, part) else arrays
            assert template is not None
            ctes.append(template.format(**{n: f"${number + i}" for i, n in enumerate(names)}))
            number += len(names)
        tail = (
            _WRITE_TAIL
            if hand_over is None
            else _HAND_OVER_TAIL.format(turn=int(hand_over[0]), commit=int(hand_over[1]))
        )
        text = _write_texts[shape, hand_over] = ", ".join(ctes) + tail
    return text


def write_rows(
    state: BatchState, checkpoint: CheckpointRow | None
) -> tuple[WriteShape, list[Sequence[Sequence[object]]]]:
    """A batch's shape and, per part of it, its rows (fields in the part's order)."""
    rows = state.rows
    assert rows, "a write appends at least one entry"
    one = len(rows) == 1
    parts: list[str] = ["ev"]
    # An entry's fields but its time ($5); as columns, subjects joined (a DID holds no space).
    values: list[Sequence[Sequence[object]]] = [
        [(r[0], *r[2:6], r[6] if one else " ".join(r[6]), *r[7:]) for r in rows]  # type: ignore[arg-type]
    ]
    if state.stream_rows:
        updated: list[tuple[str, int, int]] = []
        created: list[tuple[str, int, int]] = []
        for stream, (version, position) in state.stream_rows.items():
            rows_of = updated if stream in state.existing_streams else created
            rows_of.append((stream, version, position))
        if updated:
            parts.append("su")
            values.append(updated)
        if created:
            parts.append("si")
            values.append(created)
    if state.key_rows:
        parts.append("k")
        values.append([(did, *row) for did, row in state.key_rows.items()])
    if state.idem_rows:
        parts.append("i")
        values.append(state.idem_rows)
    if state.id_rows:
        parts.append("e")
        values.append(state.id_rows)
    if state.nodes:
        parts.append("n")
        values.append([(n.level, n.index, n.hash) for n in state.nodes])
    if checkpoint is not None:
        parts.append("c")
        values.append([checkpoint])
    if state.identity_row is not None:
        parts.append("li")
        values.append([state.identity_row])
    return (one, tuple(parts)), values


def write_statement(
    expected: Head,
    state: BatchState,
    checkpoint: CheckpointRow | None,
    hand_over: HandOver | None = None,
) -> tuple[str, list[object]]:
    """The guarded write of a batch computed from head ``expected``: the statement of
    its shape and the parameters."""
    shape, values = write_rows(state, checkpoint)
    head = state.head
    args: list[object] = [
        expected.position,
        expected.entry_hash,
        head.position,
        head.entry_hash,
        head.recorded_at,
    ]
    one = shape[0]
    for part, part_rows in zip(shape[1], values, strict=True):
        if _scalar(one, part):
            args.extend(part_rows[0])
        else:
            args.extend([list(column) for column in zip(*part_rows, strict=True)])
    return write_text(shape, hand_over), args


def apply(request: Request, state: BatchState) -> None:
    """Check one request against the state so far; stage its rows or its error."""
    key, scope = request.idempotency_key, request.scope
    if scope is not None and scope in state.done_keys:
        digest, original = state.done_keys[scope]
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
        view = _check_request(request, state)
    except LedgerError as exc:
        state.results.append((request, exc))
        return
    state.results.append((request, _stage(request, state, view)))


def _check_request(request: Request, state: BatchState) -> RequestView:
    version = state.versions.get(request.stream_id, 0)
    if request.expected_version is not None and request.expected_version != version:
        raise ConcurrencyError(request.stream_id, request.expected_version, version)
    if request.bootstrap and state.has_any_agent:
        raise NotPermittedError(
            "the ledger already holds a registration: registering needs the admin token"
        )
    # The request's own changes live in the view until every event passed.
    view = RequestView(state)
    for signed in request.events:
        _check_event(signed, request.keys_used, view, state.now)
        view.advance(signed.event)
    return view


def _check_event(
    signed: SignedEvent,
    keys_used: dict[str, bytes],
    view: RequestView,
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


def _stage(request: Request, state: BatchState, view: RequestView) -> AppendResult:
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
        if signed.actor != state.ledger_did:
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
        day = authority.single_use_day(signed.event)
        if signed.event.event_id is not None and day is not None:  # checked: both are
            state.id_rows.append((view.id_key(signed.actor, signed.event.event_id), day, position))
        positions.append(position)
        prev = digest
    state.head = Head(position, prev, state.now)
    state.versions[request.stream_id] = version
    state.stream_rows[request.stream_id] = (version, position)
    state.ids |= view.ids
    state.ledger_did = view.ledger_did  # after a rotation, the new key's DID
    state.has_any_agent = state.has_any_agent or bool(view.keys)
    result = AppendResult(tuple(positions), request.stream_id, version)
    scope = request.scope
    if scope is not None:
        state.idem_rows.append(
            (
                request.signer,
                request.idempotency_key,
                positions[0],
                len(positions),
                request.stream_id,
                version,
                request.digest,
                request.day,
            )
        )
        state.done_keys[scope] = (
            request.digest,
            AppendResult(result.positions, result.stream_id, version, duplicate=True),
        )
    return result


def needs(batch: Sequence[Request]) -> tuple[set[str], set[str]]:
    """The agents and streams a batch's checks read."""
    dids: set[str] = set()
    for request in batch:
        for signed in request.events:
            dids.update(referenced_agents(signed))
    return dids, {r.stream_id for r in batch}


# A day partition: the partitioned table and the UTC day.
Partition = tuple[str, date]


def partitions_of(state: BatchState) -> set[Partition]:
    """The day partitions a batch writes into: ``events`` of its ``recorded_at`` (one:
    a batch shares it), ``event_ids`` and ``idempotency_keys`` of its bodies' days."""
    if not state.rows:
        return set()
    days = {("events", state.now.astimezone(UTC).date())}
    days.update(("event_ids", day) for _, day, _ in state.id_rows)
    days.update(("idempotency_keys", row[7]) for row in state.idem_rows)  # type: ignore[misc]
    return days


def seal(state: BatchState) -> None:
    """Extend the tree by the batch's leaves: its new edge, and the subtrees to keep."""
    state.frontier, completed = state.frontier.extend_with_subtrees(state.leaves)
    state.nodes = [n for n in completed if n.level >= tlog.STORED_LEVEL]


def referenced_agents(signed: SignedEvent) -> set[str]:
    dids = {signed.actor, *subject_agents(signed.event)}
    if isinstance(signed.event, AgentRegistered) and signed.event.sponsor is not None:
        dids.add(signed.event.sponsor)
    return dids


def event_key(actor: str, event_id: str) -> bytes:
    """The single-use index's key of an event: 16 bytes of SHA-256(actor ‖ 0 ‖ id)."""
    return hashlib.sha256(f"{actor}\x00{event_id}".encode()).digest()[:16]


def load_row(state: BatchState, row: Mapping[str, Any]) -> None:
    """An idempotency key or single-use id row of ``LOOKUP_SQL`` into the batch
    state (keys, streams and agents went through ``Known.learn``)."""
    kind, ident = row["kind"], row["id"]
    if kind == "i":
        signer, _, key = ident.partition(" ")  # a DID never holds a space
        first = row["a"]
        state.done_keys[(signer, key, row["t"].astimezone(UTC).date())] = (
            bytes(row["raw"]),
            AppendResult(tuple(range(first, first + row["b"])), row["c"], row["d"], duplicate=True),
        )
    elif kind == "e":
        state.ids.add((bytes(row["raw"]), row["t"].astimezone(UTC).date()))


def _stage_agent_row(state: BatchState, signed: SignedEvent, position: int) -> None:
    """Key changes and suspensions update ``agent_keys`` in the same commit."""
    event = signed.event
    if isinstance(event, AgentRegistered | AgentKeyRotated):
        raw = VerifyKey.from_recorded_pem(event.public_key).raw
        suspended = state.suspended_dids.get(event.did, False)
        state.keys[event.did] = raw
        state.key_positions[event.did] = position
        state.key_rows[event.did] = (raw, position, suspended)
    elif isinstance(event, LedgerKeyRotated):
        state.identity_row = (event.did, VerifyKey.from_recorded_pem(event.public_key).raw)
    elif isinstance(event, AgentSuspended | AgentReinstated):
        suspended = isinstance(event, AgentSuspended)
        state.suspended_dids[event.did] = suspended
        raw_key = state.keys[event.did]
        assert raw_key is not None  # authority.check: the subject is registered
        state.key_rows[event.did] = (raw_key, state.key_positions[event.did], suspended)
