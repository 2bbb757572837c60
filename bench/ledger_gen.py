"""A real, valid ledger written in bulk, for benchmarks that need a big one.

Appending a million events through ``PostgresEventStore.append`` (verify,
chain, commit) takes minutes. This writes the same rows directly:

1. every event is signed on worker processes, one per core, as
   ``SignedEvent.create`` would (a fresh event id, the RFC 8785 body, one
   Ed25519 signature) but about twice as fast: the body is written by msgspec
   with sorted keys, which is RFC 8785 for these flat ASCII bodies (the first
   16 of every chunk are compared with ``encode_event``, a non-ASCII one takes
   the reference path) and not parsed back; DIDs are computed once per key.
   No signature is reused: every body is single-use (its event id), so every
   entry verifies on its own. Signing is then about half the work;
2. in position order, this process chains them with ``envelope_bytes`` and
   ``entry_hash`` and COPYs them into ``events`` (daily partitions created
   first, as ``PostgresEventStore._ensure_partitions`` does);
3. then the side tables the write path keeps: ``agent_keys``, ``streams``,
   signed ``checkpoints`` every 1,000 positions and the ``ledger_head`` row,
   so ``agentmesh ledger verify`` accepts the result and
   ``PostgresEventStore`` can go on appending to it.

Event mix after the registrations (deterministic per seed): 70 %
``policy.violation`` and 25 % ``trust.signal`` signed by a random agent about
a random agent, 4 % ``handshake.completed`` signed by the ledger, 1 % root
``delegation.granted`` signed by the delegator, capabilities a subset of its
registered ones. ``recorded_at`` is spread evenly over the ``days`` before now.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing import get_context

import asyncpg
import msgspec

from ledger.canonical import canonical_bytes
from ledger.chain import GENESIS_HASH, Checkpoint, entry_hash, envelope_bytes, sign_checkpoint
from ledger.events import (
    AgentRegistered,
    AnyEvent,
    DelegationGranted,
    Event,
    HandshakeCompleted,
    PolicyViolation,
    TrustSignal,
    body_of,
    encode_event,
    event_type,
    new_event_id,
    stream_of,
    subject_agents,
)
from ledger.identity import SigningKey, VerifyKey, b64decode
from ledger.postgres import PostgresLedgerReader
from ledger.postgres.reader import partition_ddl
from ledger.timefmt import format_time
from ledger.verify import KeyRing, LedgerVerifier, verify_ledger

CAPABILITIES = (
    "tools:*",
    "tools:search",
    "tools:write",
    "http:get",
    "http:post",
    "mcp:*",
    "mcp:read",
    "files:read",
)
SEVERITIES = ("low",) * 14 + ("medium",) * 4 + ("high", "critical")
CHECKPOINT_EVERY = 1000
EVENT_COLUMNS = [
    "position",
    "recorded_at",
    "stream_id",
    "stream_version",
    "event_type",
    "actor",
    "subjects",
    "body",
    "signature",
    "prev_hash",
    "entry_hash",
]

# What a worker returns per event: body, signature, type, actor, stream, subjects.
Signed = tuple[bytes, bytes, str, str, str, list[str]]


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything that decides the ledger's content (shared with the workers)."""

    events: int
    agents: int
    seed: int
    start: datetime
    step_us: int

    def recorded_at(self, position: int) -> datetime:
        return self.start + timedelta(microseconds=(position - 1) * self.step_us)


@dataclass(frozen=True, slots=True)
class GeneratedLedger:
    ledger_key: SigningKey
    agents: list[SigningKey]
    capabilities: list[tuple[str, ...]]
    head_position: int
    head_hash: bytes
    streams: int
    grants: int
    checkpoints: int
    sign_workers: int
    seconds: float


# -- worker side: signing ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _WorkerKeys:
    ledger: _Key
    agents: list[_Key]
    caps: list[tuple[str, ...]]


_worker: list[_WorkerKeys] = []  # set once per worker process by _init_worker


@dataclass(frozen=True, slots=True)
class _Key:
    """A signing key with its DID computed once (the worker reads it three times an
    event)."""

    key: SigningKey
    did: str
    public: VerifyKey

    @classmethod
    def from_pem(cls, pem: str) -> _Key:
        key = SigningKey.from_pem(pem)
        return cls(key, key.did, key.public)

    def sign(self, body: bytes) -> bytes:
        return self.key.sign(body)


def _init_worker(ledger_pem: str, agent_pems: list[str], caps: list[tuple[str, ...]]) -> None:
    keys = [_Key.from_pem(p) for p in agent_pems]
    _worker.append(_WorkerKeys(_Key.from_pem(ledger_pem), keys, caps))


_sorted_json = msgspec.json.Encoder(order="sorted")
CHECKED_BODIES = 16
"""Bodies per chunk also made the slow, reference way and compared."""


def canonical_body(event: Event) -> bytes:
    """``ledger.events.encode_event(event)`` (RFC 8785), about 5x faster.

    For a flat object of ASCII strings, integers and lists of them, RFC 8785 is
    what msgspec writes with sorted keys (same escapes, no whitespace, ASCII key
    order = UTF-16 order); anything else takes the reference path."""
    body = _sorted_json.encode(body_of(event))
    return body if body.isascii() else canonical_bytes(body_of(event))


def _sign_chunk(plan: Plan, first: int, count: int) -> list[Signed]:
    """Sign events ``first .. first + count - 1`` (0-based indexes) of the plan.

    What ``SignedEvent.create`` does, without re-parsing the body it just wrote:
    the canonical body (checked against ``encode_event`` for the first
    ``CHECKED_BODIES`` of every chunk), a fresh event id, one Ed25519 signature."""
    ledger, agents, caps = _worker[0].ledger, _worker[0].agents, _worker[0].caps
    rng = random.Random(f"{plan.seed}:{first}")
    out: list[Signed] = []
    for index in range(first, first + count):
        event, key = _event(plan, index, rng, ledger, agents, caps)
        event = msgspec.structs.replace(event, event_id=new_event_id())
        body = canonical_body(event)
        if index - first < CHECKED_BODIES and body != encode_event(event):
            raise AssertionError(f"event {index}: the fast body is not the canonical one")
        subjects = set(subject_agents(event))
        if event.actor != ledger.did:
            subjects.add(event.actor)
        out.append(
            (
                body,
                key.sign(body),
                event_type(event),
                event.actor,
                stream_of(event),
                sorted(subjects),
            )
        )
    return out


def _event(
    plan: Plan,
    index: int,
    rng: random.Random,
    ledger: _Key,
    agents: list[_Key],
    caps: list[tuple[str, ...]],
) -> tuple[AnyEvent, _Key]:
    moment = plan.recorded_at(index + 1)
    now = format_time(moment)
    if index < plan.agents:
        agent = agents[index]
        registered = AgentRegistered(
            actor=ledger.did,
            occurred_at=now,
            did=agent.did,
            public_key=agent.public.pem(),
            capabilities=caps[index],
        )
        return registered, ledger
    a, b = rng.sample(range(plan.agents), 2)
    roll = rng.random()
    if roll < 0.70:
        severity = rng.choice(SEVERITIES)
        violation = PolicyViolation(
            actor=agents[a].did,
            occurred_at=now,
            agent=agents[b].did,
            severity=severity,  # type: ignore[arg-type]
            rule="bench-rule",
            detail=f"blocked call {index}",
        )
        return violation, agents[a]
    if roll < 0.95:
        signal = TrustSignal(actor=agents[a].did, occurred_at=now, agent=agents[b].did, signal="ok")
        return signal, agents[a]
    if roll < 0.99:
        handshake = HandshakeCompleted(
            actor=ledger.did,
            occurred_at=now,
            handshake_id=f"hs-{index}",
            initiator=agents[a].did,
            responder=agents[b].did,
            score=800,
        )
        return handshake, ledger
    own = caps[a]
    chosen = tuple(sorted(rng.sample(own, rng.randint(1, len(own)))))
    expires = format_time(moment + timedelta(days=30)) if rng.random() < 0.5 else None
    grant = DelegationGranted(
        actor=agents[a].did,
        occurred_at=now,
        grant_id=f"grant-{index:010d}",
        delegator=agents[a].did,
        delegatee=agents[b].did,
        capabilities=chosen,
        expires_at=expires,
    )
    return grant, agents[a]


# -- main side: chaining and writing -----------------------------------------------


@dataclass
class _Chain:
    plan: Plan
    agents: list[SigningKey]
    ledger_key: SigningKey
    position: int = 0
    prev: bytes = GENESIS_HASH
    grants: int = 0

    def __post_init__(self) -> None:
        self.versions: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.checkpoints: list[Checkpoint] = []

    def rows(self, items: Sequence[Signed]) -> list[tuple[object, ...]]:
        rows: list[tuple[object, ...]] = []
        for body, signature, kind, actor, stream, subjects in items:
            self.position += 1
            position = self.position
            version = self.versions.get(stream, 0) + 1
            self.versions[stream] = version
            self.last[stream] = position
            moment = self.plan.recorded_at(position)
            envelope = envelope_bytes(
                position=position,
                recorded_at=moment,
                stream_id=stream,
                stream_version=version,
                body=body,
                signature=signature,
            )
            digest = entry_hash(self.prev, envelope)
            rows.append(
                (
                    position,
                    moment,
                    stream,
                    version,
                    kind,
                    actor,
                    subjects,
                    body,
                    signature,
                    self.prev,
                    digest,
                )
            )
            self.prev = digest
            self.grants += kind == "delegation.granted"
            if position % CHECKPOINT_EVERY == 0 or position == self.plan.events:
                self.checkpoints.append(sign_checkpoint(self.ledger_key, position, digest, moment))
        return rows


def make_plan(events: int, agents: int, days: float, seed: int) -> Plan:
    agents = max(2, min(agents, events // 2))
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    start = end - timedelta(days=days)
    step_us = max(int(days * 86_400_000_000) // max(events, 1), 1)
    return Plan(events=events, agents=agents, seed=seed, start=start, step_us=step_us)


async def generate_ledger(
    url: str,
    *,
    events: int,
    agents: int = 1000,
    days: float = 3.0,
    seed: int = 1,
    chunk: int = 5000,
    workers: int | None = None,
) -> GeneratedLedger:
    """Write a valid ledger of ``events`` events into the (empty, migrated) database."""
    started = time.perf_counter()
    plan = make_plan(events, agents, days, seed)
    rng = random.Random(seed)
    ledger_key = SigningKey.generate()
    keys = [SigningKey.generate() for _ in range(plan.agents)]
    caps = [tuple(sorted(rng.sample(CAPABILITIES, rng.randint(2, 4)))) for _ in keys]
    chain = _Chain(plan, keys, ledger_key)
    workers = workers or os.cpu_count() or 1
    conn = await asyncpg.connect(url)
    try:
        await _create_partitions(conn, plan)
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=get_context("spawn"),  # no fork of a process with a running loop
            initializer=_init_worker,
            initargs=(ledger_key.private_key_pem(), [k.private_key_pem() for k in keys], caps),
        ) as pool:
            await _sign_chain_copy(conn, pool, plan, chain, chunk, workers)
        await _write_side_tables(conn, chain, keys)
        await conn.execute("VACUUM (ANALYZE) events")
    finally:
        await conn.close()
    return GeneratedLedger(
        ledger_key=ledger_key,
        agents=keys,
        capabilities=caps,
        head_position=chain.position,
        head_hash=chain.prev,
        streams=len(chain.versions),
        grants=chain.grants,
        checkpoints=len(chain.checkpoints),
        sign_workers=workers,
        seconds=time.perf_counter() - started,
    )


async def _sign_chain_copy(
    conn: asyncpg.Connection,
    pool: ProcessPoolExecutor,
    plan: Plan,
    chain: _Chain,
    chunk: int,
    workers: int,
) -> None:
    """Keep a few chunks in flight on the workers; chain and COPY them in order."""
    pending: deque[Future[list[Signed]]] = deque()
    next_index = 0
    while pending or next_index < plan.events:
        while next_index < plan.events and len(pending) < 3 * workers:
            count = min(chunk, plan.events - next_index)
            pending.append(pool.submit(_sign_chunk, plan, next_index, count))
            next_index += count
        items = await asyncio.wrap_future(pending.popleft())
        await conn.copy_records_to_table("events", records=chain.rows(items), columns=EVENT_COLUMNS)


async def _create_partitions(conn: asyncpg.Connection, plan: Plan) -> None:
    first, last = plan.recorded_at(1), plan.recorded_at(plan.events)
    day = first.astimezone(UTC).date()
    while day <= last.astimezone(UTC).date():
        await conn.execute(partition_ddl("events", day))
        day += timedelta(days=1)


async def _write_side_tables(
    conn: asyncpg.Connection, chain: _Chain, keys: list[SigningKey]
) -> None:
    async with conn.transaction():
        # Registrations are positions 1..agents, in agent order.
        await conn.copy_records_to_table(
            "agent_keys",
            records=[(k.did, k.public.raw, i + 1) for i, k in enumerate(keys)],
            columns=["did", "public_key", "position"],
        )
        await conn.copy_records_to_table(
            "streams",
            records=[(s, v, chain.last[s]) for s, v in chain.versions.items()],
            columns=["stream_id", "version", "last_position"],
        )
        await conn.copy_records_to_table(
            "checkpoints",
            records=[
                (
                    c.position,
                    bytes.fromhex(c.head_hash),
                    chain.plan.recorded_at(c.position),
                    c.signer,
                    b64decode(c.signature),
                )
                for c in chain.checkpoints
            ],
            columns=["position", "head_hash", "time", "signer", "signature"],
        )
        await conn.execute(
            "UPDATE ledger_head SET position = $1, entry_hash = $2, recorded_at = $3 WHERE id = 1",
            chain.position,
            chain.prev,
            chain.plan.recorded_at(chain.position),
        )


async def verify_sample(url: str, ledger: GeneratedLedger, sample: int = 2000) -> str:
    """Verify the first and the last ``sample`` entries (chain, signatures,
    checkpoints; the tail up to the head row); raise VerificationError if not."""
    reader = await PostgresLedgerReader.connect(url)
    try:
        checkpoints = await reader.checkpoints(after=0, limit=sample // CHECKPOINT_EVERY + 1)
        prefix = LedgerVerifier(
            KeyRing(ledger.ledger_key.public),
            start_position=1,
            start_hash=GENESIS_HASH,
            checkpoints=[c for c in checkpoints if c.position <= sample],
        )
        for record in await reader.read(0, sample):
            await prefix.feed(record, record.event_type, record.actor)
        head = await prefix.finish()
        tail_from = max(ledger.head_position - sample + 1, 1)
        tail = await verify_ledger(reader, ledger.ledger_key.public, from_position=tail_from)
    finally:
        await reader.close()
    return (
        f"positions 1..{head.last_position} from genesis ({head.signatures} signatures, "
        f"{head.checkpoints} checkpoints) and {tail.first_position}..{tail.last_position} "
        f"up to the head row ({tail.signatures} signatures, {tail.checkpoints} checkpoints)"
    )
