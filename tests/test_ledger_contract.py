"""The ledger's contract: one suite over every adapter of ``ledger.ports.Ledger``.

``memory`` (``ledger.memory.MemoryLedger``) and ``postgres``
(``ledger.postgres.PostgresEventStore`` against a real PostgreSQL) must answer
every test alike, as the read stores do in ``tests/test_read_stores.py``.
Tests of what only PostgreSQL has (group commit across processes, partitions,
NOTIFY) stay in ``tests/test_ledger_store.py``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest

from ledger import merkle, tlog
from ledger.errors import (
    AppendRejectedError,
    ConcurrencyError,
    EventValidationError,
    IdempotencyConflictError,
    NoteError,
    NotPermittedError,
    ProofError,
    ReplayError,
    SignatureError,
    VerificationError,
)
from ledger.events import (
    AgentKeyRotated,
    AgentRegistered,
    AgentReinstated,
    AgentSuspended,
    PolicyViolation,
    decode_body,
    decode_key_change,
)
from ledger.identity import SigningKey, VerifyKey
from ledger.memory import MemoryLedger
from ledger.merkle import Frontier
from ledger.note import open_checkpoint
from ledger.ports import BodyReader, Ledger, StoredBody
from ledger.postgres import PostgresEventStore
from ledger.signed import SignedEvent
from ledger.timefmt import format_time
from tests.support import T0, Agent, ManualClock, random_history, register


@pytest.fixture(params=["memory", "postgres"])
async def store(
    request: pytest.FixtureRequest, ledger_key: SigningKey, database_url: str
) -> AsyncIterator[Ledger]:
    adapter: Ledger
    if request.param == "memory":
        adapter = MemoryLedger(ledger_key)
    else:
        adapter = await PostgresEventStore.open(database_url, ledger_key)
    try:
        yield adapter
    finally:
        await adapter.close()


async def test_appends_are_gap_free_and_chained(store: Ledger) -> None:
    agent = await register(store)
    results = await asyncio.gather(*(store.append([agent.violation()]) for _ in range(40)))
    entries = await store.read(0, 1000)
    assert [e.position for e in entries] == list(range(1, 42))
    assert sorted(r.positions[0] for r in results) == list(range(2, 42))
    for before, entry in itertools.pairwise(entries):
        assert entry.prev_hash == before.entry_hash
    head = await store.head()
    assert (head.position, head.entry_hash) == (41, entries[-1].entry_hash)
    assert [e.position async for e in store.iter_entries(after=39, batch=1)] == [40, 41]
    assert (await store.entry_at(41)) == entries[-1]


async def test_a_signed_body_is_appended_once(store: Ledger) -> None:
    agent, other = await register(store), await register(store)
    report = agent.violation(subject=other.did)
    await store.append([report])
    head = await store.head()
    with pytest.raises(ReplayError, match="already in the ledger"):
        await store.append([report], idempotency_key="a-fresh-key")
    with pytest.raises(ReplayError):
        await store.append([report, report])
    assert await store.head() == head


async def test_a_suspended_agent_writes_nothing(store: Ledger) -> None:
    agent, other = await register(store), await register(store)
    stamp = format_time(T0)
    await store.append_own(AgentSuspended(actor=store.ledger_did, occurred_at=stamp, did=agent.did))
    assert await store.suspended_before((await store.head()).position + 1) == {agent.did}
    with pytest.raises(NotPermittedError, match="suspended"):
        await store.append([agent.violation(subject=other.did)])
    with pytest.raises(NotPermittedError, match="suspended"):
        await store.append([agent.signal(subject=other.did)])
    await store.append([agent.violation()])  # its own sidecar's report about itself
    await store.append_own(
        AgentReinstated(actor=store.ledger_did, occurred_at=stamp, did=agent.did)
    )
    await store.append([agent.violation(subject=other.did)])
    assert await store.suspended_before((await store.head()).position + 1) == set()


async def test_bootstrap_only_on_an_empty_ledger(store: Ledger) -> None:
    first, second = Agent(), Agent()
    for agent, allowed in ((first, True), (second, False)):
        event = AgentRegistered(
            actor=store.ledger_did,
            occurred_at=format_time(T0),
            did=agent.did,
            public_key=agent.key.public.pem(),
        )
        if allowed:
            await store.append([store.sign_own(event)], bootstrap=True)
        else:
            with pytest.raises(NotPermittedError, match="admin token"):
                await store.append([store.sign_own(event)], bootstrap=True)
    assert await store.current_key(first.did) == first.key.public
    assert await store.current_key(second.did) is None


async def test_idempotency_keys_are_scoped_by_signer(store: Ledger) -> None:
    a, b, victim = await register(store), await register(store), await register(store)
    mine = await store.append([a.violation(subject=victim.did)], idempotency_key="k-1")
    theirs = await store.append([b.violation(subject=victim.did)], idempotency_key="k-1")
    assert not theirs.duplicate
    assert mine.positions != theirs.positions


async def test_keys_before_follow_rotations(store: Ledger) -> None:
    agent = await register(store)
    new = SigningKey.generate()
    rotation = AgentKeyRotated(
        actor=agent.did, occurred_at=format_time(T0), did=agent.did, public_key=new.public.pem()
    )
    result = await store.append([SignedEvent.rotation(rotation, agent.key, new)])
    position = result.positions[0]
    assert (await store.keys_before(position))[agent.did] == agent.key.public.raw
    assert (await store.keys_before(position + 1))[agent.did] == new.public.raw
    assert await store.current_key(agent.did) == new.public


def test_a_body_that_is_no_event_is_refused_by_the_key_change_reader() -> None:
    with pytest.raises(EventValidationError):
        decode_key_change(b'{"type":"agent.registered","did":1}')
    with pytest.raises(EventValidationError):
        decode_key_change(b"not json")


async def test_one_agents_key_before_a_position(store: Ledger) -> None:
    """``key_before`` answers as ``keys_before`` does for one agent: before its
    registration nothing, then each key in force, whatever else names the agent."""
    first_position = (await store.head()).position + 1
    agent = await register(store)
    other = await register(store)
    await store.append([other.violation(subject=agent.did)])  # names the agent
    new = SigningKey.generate()
    rotation = AgentKeyRotated(
        actor=agent.did, occurred_at=format_time(T0), did=agent.did, public_key=new.public.pem()
    )
    position = (await store.append([SignedEvent.rotation(rotation, agent.key, new)])).positions[0]
    await store.append([other.violation(subject=agent.did)])
    head = (await store.head()).position
    for at in range(1, head + 2):
        expected = (await store.keys_before(at)).get(agent.did)
        assert await store.key_before(agent.did, at) == expected, at
    assert await store.key_before(agent.did, first_position) is None
    assert await store.key_before(agent.did, position) == agent.key.public.raw
    assert await store.key_before(agent.did, position + 1) == new.public.raw
    assert await store.key_before(other.did, head + 1) == other.key.public.raw
    assert await store.key_before("did:mesh:" + "0" * 32, head + 1) is None


async def test_checkpoints_sign_the_head(store: Ledger, ledger_key: SigningKey) -> None:
    agent = await register(store)
    await store.append([agent.violation()])
    checkpoint = await store.checkpoint()
    head = await store.head()
    assert (checkpoint.position, checkpoint.head_hash) == (head.position, head.entry_hash.hex())
    assert checkpoint.signer == ledger_key.did
    assert await store.latest_checkpoint() == checkpoint
    assert await store.checkpoint() == checkpoint  # idempotent per position


async def test_optimistic_concurrency(store: Ledger) -> None:
    agent = await register(store)
    stream = f"agent:{agent.did}"
    result = await store.append([agent.violation()], expected_version=1)
    assert (result.stream_id, result.stream_version) == (stream, 2)
    with pytest.raises(ConcurrencyError) as info:
        await store.append([agent.violation()], expected_version=1)
    assert (info.value.expected, info.value.actual) == (1, 2)
    assert (await store.head()).position == 2


async def test_idempotent_retry_returns_original_positions(store: Ledger) -> None:
    agent = await register(store)
    events = [agent.violation(), agent.violation(severity="high")]
    first = await store.append(events, idempotency_key="report-1")
    again = await store.append(events, idempotency_key="report-1")
    assert first.positions == again.positions == (2, 3)
    assert again.duplicate
    assert not first.duplicate
    assert (await store.head()).position == 3
    with pytest.raises(IdempotencyConflictError):
        await store.append([agent.violation(severity="low")], idempotency_key="report-1")
    assert (await store.head()).position == 3


async def test_idempotency_within_one_group_commit(store: Ledger) -> None:
    agent = await register(store)
    event = agent.violation()
    results = await asyncio.gather(
        *(store.append([event], idempotency_key="same") for _ in range(10))
    )
    assert {r.positions for r in results} == {(2,)}
    assert sum(not r.duplicate for r in results) == 1
    assert (await store.head()).position == 2


async def test_forged_wrong_key_and_unknown_signatures_are_rejected(
    store: Ledger,
) -> None:
    agent = await register(store)
    head = await store.head()
    good = agent.violation()
    forged = SignedEvent(body=good.body, signature=bytes(64), event=good.event)
    impostor = SigningKey.generate()
    wrong_key = SignedEvent(body=good.body, signature=impostor.sign(good.body), event=good.event)
    unknown = Agent().violation()
    for bad in (forged, wrong_key, unknown):
        with pytest.raises(SignatureError):
            await store.append([bad])
    # A bad event poisons its whole append, and nothing else.
    with pytest.raises(SignatureError):
        await store.append([good, forged])
    assert await store.head() == head


async def test_ledger_only_events_need_the_ledger_key(store: Ledger) -> None:
    agent = await register(store)
    event = AgentSuspended(actor=agent.did, occurred_at=format_time(T0), did=agent.did)
    with pytest.raises(NotPermittedError, match="only be signed by the ledger"):
        await store.append([SignedEvent.create(event, agent.key)])


async def test_registration_rules(store: Ledger) -> None:
    # Self-registration: the first agent of an empty ledger proves possession of its key.
    newcomer = Agent()
    own = AgentRegistered(
        actor=newcomer.did,
        occurred_at=format_time(T0),
        did=newcomer.did,
        public_key=newcomer.key.public.pem(),
    )
    await store.append([SignedEvent.create(own, newcomer.key)])
    assert await store.current_key(newcomer.did) == newcomer.key.public
    agent = await register(store)
    with pytest.raises(AppendRejectedError, match="already registered"):
        await register(store, agent)
    other = Agent()
    mismatched = AgentRegistered(
        actor=store.ledger_did,
        occurred_at=format_time(T0),
        did=other.did,
        public_key=agent.key.public.pem(),
    )
    with pytest.raises(AppendRejectedError, match="belongs to"):
        await store.append_own(mismatched)
    # Once the ledger holds a registration, nobody registers itself any more.
    late = Agent()
    own = AgentRegistered(
        actor=late.did, occurred_at=format_time(T0), did=late.did, public_key=late.key.public.pem()
    )
    with pytest.raises(NotPermittedError, match="first agent"):
        await store.append([SignedEvent.create(own, late.key)])
    assert await store.current_key(late.did) is None


async def test_key_rotation_retires_the_old_key(store: Ledger) -> None:
    agent = await register(store)
    new_key = SigningKey.generate()
    rotation = AgentKeyRotated(
        actor=agent.did, occurred_at=format_time(T0), did=agent.did, public_key=new_key.public.pem()
    )
    with pytest.raises(SignatureError, match="needs proof"):  # no proof of the new key
        await store.append([SignedEvent.create(rotation, agent.key)])
    await store.append([SignedEvent.rotation(rotation, agent.key, new_key)])
    with pytest.raises(SignatureError):
        await store.append([agent.violation()])  # signed with the retired key
    event = PolicyViolation(
        actor=agent.did, occurred_at=format_time(T0), agent=agent.did, severity="low", rule="r"
    )
    await store.append([SignedEvent.create(event, new_key)])
    assert (await store.current_key(agent.did)) == new_key.public


async def test_events_about_unregistered_agents_are_rejected(store: Ledger) -> None:
    reporter = await register(store)
    with pytest.raises(AppendRejectedError, match="not registered"):
        await store.append([reporter.violation(subject=Agent().did)])


async def test_read_agent_returns_events_it_signed_or_is_about(
    store: Ledger,
) -> None:
    alice, bob = await register(store), await register(store)
    await store.append([alice.violation(subject=bob.did)])
    await store.append([alice.signal(subject=bob.did)])
    about_bob = await store.read_agent(bob.did)
    assert [e.event_type for e in about_bob] == [
        "agent.registered",
        "policy.violation",
        "trust.signal",
    ]
    assert [e.position for e in await store.read_agent(alice.did)] == [1, 3, 4]


# -- the ledger as a transparency log (ledger/tlog.py) ------------------------------------


async def test_tree_roots_and_proofs_match_the_entries(
    store: Ledger, ledger_key: SigningKey
) -> None:
    agent = await register(store)
    for _ in range(36):  # 37 entries: several stored 16-leaf subtrees and a ragged edge
        await store.append([agent.violation()])
    entries = await store.read(0, 1000)
    leaves = [tlog.entry_leaf(e.entry_hash) for e in entries]
    roots = {}
    for size in range(1, len(leaves) + 1):
        roots[size] = Frontier().extend(leaves[:size]).root()
        assert await store.tree_root(size) == roots[size]
    for size in (1, 2, 16, 17, 33, 37):
        for position in {1, size // 2 + 1, size}:
            proof = await store.inclusion_proof(position, size)
            merkle.verify_inclusion(leaves[position - 1], position - 1, size, proof, roots[size])
    for first, second in ((1, 37), (16, 17), (17, 33), (5, 37), (37, 37)):
        proof = await store.consistency_proof(first, second)
        merkle.verify_consistency(first, second, proof, roots[first], roots[second])
    for position, size in ((0, 5), (6, 5), (1, 99)):
        with pytest.raises(ProofError):
            await store.inclusion_proof(position, size)
    for first, second in ((0, 5), (6, 5), (5, 99)):
        with pytest.raises(ProofError):
            await store.consistency_proof(first, second)
    await store.checkpoint()
    note = await store.latest_tree_head()
    assert note is not None
    checkpoint, _ = open_checkpoint(note, [tlog.verifier(ledger_key.public)])
    assert (checkpoint.origin, checkpoint.size, checkpoint.root_hash) == (
        tlog.origin(ledger_key.did),
        37,
        roots[37],
    )
    with pytest.raises(NoteError):  # any other key's note is refused
        open_checkpoint(note, [tlog.verifier(SigningKey.generate().public)])


async def test_the_ledger_verifies_with_its_tree_heads(
    store: Ledger, ledger_key: SigningKey
) -> None:
    """What ``ledger.verify`` reads through the port: the identity recorded at genesis,
    the stored signed tree heads, and everything ``verify_ledger`` checks."""
    from ledger.verify import verify_ledger

    assert await store.ledger_identity() in (None, ledger_key.public)
    agent = await register(store)
    for _ in range(20):
        await store.append([agent.violation()])
    await store.checkpoint()
    assert await store.ledger_identity() == ledger_key.public
    heads = await store.tree_heads()
    assert list(heads) == [21]
    head, _ = open_checkpoint(heads[21], [tlog.verifier(ledger_key.public)])
    assert (head.size, head.root_hash) == (21, await store.tree_root(21))
    assert await store.tree_heads(after=21) == {}
    report = await verify_ledger(store, ledger_key.public)
    assert (report.first_position, report.last_position, report.checkpoints) == (1, 21, 1)
    tail = await verify_ledger(store, ledger_key.public, from_position=12)
    assert (tail.first_position, tail.entries) == (12, 10)
    with pytest.raises(VerificationError, match="ledger key mismatch"):
        await verify_ledger(store, SigningKey.generate().public)


# -- single use and idempotency, days apart ---------------------------------------------


@pytest.fixture(params=["memory", "postgres"])
async def clocked(
    request: pytest.FixtureRequest, ledger_key: SigningKey, database_url: str, clock: ManualClock
) -> AsyncIterator[Ledger]:
    """Each adapter on the test's manual clock."""
    adapter: Ledger
    if request.param == "memory":
        adapter = MemoryLedger(ledger_key, clock=clock)
    else:
        adapter = await PostgresEventStore.open(database_url, ledger_key, clock=clock)
    try:
        yield adapter
    finally:
        await adapter.close()


def report_with_id(agent: Agent, subject: str, event_id: str, at: datetime) -> SignedEvent:
    event = PolicyViolation(
        actor=agent.did,
        occurred_at=format_time(at),
        event_id=event_id,
        agent=subject,
        severity="low",
        rule="tool-deny",
        detail=at.isoformat(),
    )
    return SignedEvent.create(event, agent.key)


async def test_a_replay_days_later_is_refused_then_stale(
    clocked: Ledger, clock: ManualClock
) -> None:
    agent, other = await register(clocked), await register(clocked)
    report = agent.violation(subject=other.did, at=clock.now)
    await clocked.append([report])
    head = await clocked.head()
    clock.advance(days=6, hours=23)
    with pytest.raises(ReplayError, match="already in the ledger"):
        await clocked.append([report])
    clock.advance(hours=2)  # over MAX_AGE: the same body is stale, whatever the index holds
    with pytest.raises(EventValidationError, match="stale"):
        await clocked.append([report], idempotency_key="a-new-key")
    assert await clocked.head() == head


async def test_an_event_id_is_single_use_per_signer_and_day(
    clocked: Ledger, clock: ManualClock
) -> None:
    agent, other = await register(clocked), await register(clocked)
    today = clock.now
    await clocked.append([report_with_id(agent, other.did, "the-same-id-0001", today)])
    head = await clocked.head()
    again = report_with_id(agent, other.did, "the-same-id-0001", today + timedelta(seconds=1))
    with pytest.raises(ReplayError):  # another body, the same id and day
        await clocked.append([again])
    assert await clocked.head() == head
    # Another signer's id, and the signer's own id on another day, are other events.
    await clocked.append([report_with_id(other, agent.did, "the-same-id-0001", today)])
    clock.advance(days=1)
    await clocked.append(
        [report_with_id(agent, other.did, "the-same-id-0001", today + timedelta(days=1))]
    )
    assert (await clocked.head()).position == head.position + 2


async def test_an_idempotent_retry_days_later_gets_the_original(
    clocked: Ledger, clock: ManualClock
) -> None:
    agent, other = await register(clocked), await register(clocked)
    key, report = "k-1", agent.violation(subject=other.did, at=clock.now)
    first = await clocked.append([report], idempotency_key=key)
    earlier = clock.now
    clock.advance(days=5)
    retried = await clocked.append([report], idempotency_key=key)  # the same events
    assert retried.duplicate
    assert retried.positions == first.positions
    with pytest.raises(IdempotencyConflictError):  # other events, the first of the same day
        await clocked.append(
            [agent.violation(subject=other.did, severity="high", at=earlier)], idempotency_key=key
        )
    # A key is scoped by the day its request's first event occurred on (as an id is).
    fresh = await clocked.append(
        [agent.violation(subject=other.did, at=clock.now)], idempotency_key=key
    )
    assert not fresh.duplicate
    assert fresh.positions[0] > first.positions[0]


async def test_bodies_alone_are_the_entries_bodies(store: Ledger) -> None:
    """``read_bodies`` (``ports.BodyReader``: what a rebuild folds) gives each entry's
    position, time and body as ``read`` does, in the same batches."""
    agent, other = await register(store), await register(store)
    for _ in range(5):
        await store.append([agent.violation(subject=other.did)])
    assert isinstance(store, BodyReader)
    for after, limit in ((0, 1000), (2, 3), (6, 10), (7, 10)):
        entries = await store.read(after, limit)
        bodies = await store.read_bodies(after, limit)
        assert bodies == [StoredBody(e.position, e.recorded_at, e.body) for e in entries]
        assert all(isinstance(b.body, bytes) for b in bodies)


async def test_keys_before_are_the_keys_every_entry_installs(
    clocked: Ledger, clock: ManualClock, ledger_key: SigningKey
) -> None:
    """``keys_before`` (which reads only the fields a key change needs,
    ``decode_key_change``) gives, at every position of a varied history, the keys that
    fully decoded registrations and rotations install."""
    store = clocked
    await random_history(store, clock, seed=7, steps=80)
    agent = await register(store, at=clock())
    new = SigningKey.generate()
    rotation = AgentKeyRotated(
        actor=agent.did,
        occurred_at=format_time(clock()),
        did=agent.did,
        public_key=new.public.pem(),
    )
    await store.append([SignedEvent.rotation(rotation, agent.key, new)])
    entries = await store.read(0, 10_000)
    expected: dict[str, bytes] = {}
    for entry in entries:
        assert (await store.keys_before(entry.position)) == expected, entry.position
        event = decode_body(entry.body)
        change = decode_key_change(entry.body)
        if isinstance(event, AgentRegistered | AgentKeyRotated):
            assert change is not None
            assert (change.did, change.public_key) == (event.did, event.public_key)
            expected[event.did] = VerifyKey.from_pem(event.public_key).raw
        else:
            assert change is None, event
    assert expected[agent.did] == new.public.raw
    assert ledger_key.did not in expected  # the ledger's own rotations are not agents'
