"""One group commit of the PostgreSQL writer: what it checks and what it writes.

Pure (no I/O): the store (``ledger.postgres.store``) reads with ``STATE_SQL`` /
``LOOKUP_SQL``, builds a ``BatchState`` (from ``Known``, what the process's last
commit left, plus the lookup), runs ``apply`` over each request — the trust
model's rules (``ledger.authority``), then the staged rows, chained and added to
the Merkle tree — and writes everything with ``WRITE_SQL`` and ``write_args``: one
statement guarded by the head the batch was computed from.
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
        digest=hashlib.sha256(b"\n".join(e.body for e in events)).digest(),
        keys_used={},
        future=asyncio.get_running_loop().create_future(),
        day=authority.single_use_day(events[0].event),
    )


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
        """Absorb what other writers appended after ``head`` (``CATCH_UP_SQL``'s rows,
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

    def key(self, did: str) -> bytes | None:
        return self.keys[did] if did in self.keys else self.state.keys.get(did)

    def suspended(self, did: str) -> bool:
        return self.suspended_dids.get(did, self.state.suspended_dids.get(did, False))

    def has_agents(self) -> bool:
        return bool(self.keys) or self.state.has_any_agent

    def seen(self, actor: str, event_id: str, day: date) -> bool:
        key = (event_key(actor, event_id), day)
        return key in self.ids or key in self.state.ids

    def advance(self, event: Event) -> None:
        day = authority.single_use_day(event)
        if event.event_id is not None and day is not None:
            self.ids.add((event_key(event.actor, event.event_id), day))
        if isinstance(event, AgentRegistered | AgentKeyRotated):
            self.keys[event.did] = VerifyKey.from_pem(event.public_key).raw
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

# What other writers appended after this process's last commit ($1, recorded at or
# after $2: time never runs backwards in the ledger, so only the newest partitions
# are read), for ``Known.catch_up``; at most $3 rows.
CATCH_UP_SQL = """
SELECT position, entry_hash, recorded_at, event_type, stream_id, stream_version, actor, subjects
  FROM events WHERE position > $1 AND recorded_at >= $2 ORDER BY position LIMIT $3
"""

# The whole write of a batch in one statement, guarded by the head it was computed
# from: ``h`` moves the head only if it is still ($1, $2); every other part writes
# only if ``h`` did (data-modifying CTEs always run; each reads ``h``). Without an
# explicit transaction this is one round trip and one commit; ``li`` records a rotated
# ledger key ($46, $47) in the commit that appends its rotation; inside the locked
# path the guard holds by construction. Returns one row when it wrote, none when
# another writer moved the head first. The single-use ids and idempotency keys are
# unique keys (per day, $48/$49: what a replay or a retry repeats falls on the same
# day): a value used before fails the statement, and nothing is written.
WRITE_SQL = """
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
    (signer, key, first_position, count, stream_id, stream_version, digest, day, recorded_at)
  SELECT *, $5::timestamptz
    FROM unnest($26::text[], $27::text[], $28::bigint[], $29::int[], $30::text[], $31::int[],
                $32::bytea[], $48::date[])
   WHERE EXISTS (SELECT 1 FROM h)
), e AS (
  INSERT INTO event_ids (key, day, position)
  SELECT * FROM unnest($33::bytea[], $49::date[], $34::bigint[]) WHERE EXISTS (SELECT 1 FROM h)
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
), li AS (
  UPDATE ledger_identity SET did = $46, public_key = $47, recorded_at = $5
   WHERE id = 1 AND $46::text IS NOT NULL AND EXISTS (SELECT 1 FROM h)
)
SELECT pg_notify($44, $45) FROM h
"""


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
            state.id_rows.append((event_key(signed.actor, signed.event.event_id), day, position))
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


def write_args(expected: Head, state: BatchState, checkpoint: CheckpointRow | None) -> list[object]:
    """``WRITE_SQL``'s parameters: the batch's rows as columns."""
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
        [k for k, _, _ in state.id_rows],
        [p for _, _, p in state.id_rows],
        [n.level for n in state.nodes],
        [n.index for n in state.nodes],
        [n.hash for n in state.nodes],
        *_columns(checkpoints, 6),
        NOTIFY_CHANNEL,
        str(head.position),
        None if state.identity_row is None else state.identity_row[0],
        None if state.identity_row is None else state.identity_row[1],
        [row[7] for row in idem],
        [d for _, d, _ in state.id_rows],
    ]


def _columns(rows: Sequence[tuple[object, ...]], width: int) -> list[list[object]]:
    return [[row[i] for row in rows] for i in range(width)]


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
        raw = VerifyKey.from_pem(event.public_key).raw
        suspended = state.suspended_dids.get(event.did, False)
        state.keys[event.did] = raw
        state.key_positions[event.did] = position
        state.key_rows[event.did] = (raw, position, suspended)
    elif isinstance(event, LedgerKeyRotated):
        state.identity_row = (event.did, VerifyKey.from_pem(event.public_key).raw)
    elif isinstance(event, AgentSuspended | AgentReinstated):
        suspended = isinstance(event, AgentSuspended)
        state.suspended_dids[event.did] = suspended
        raw_key = state.keys[event.did]
        assert raw_key is not None  # authority.check: the subject is registered
        state.key_rows[event.did] = (raw_key, state.key_positions[event.did], suspended)
