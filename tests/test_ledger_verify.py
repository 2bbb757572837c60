"""`ledger verify`: a clean ledger passes; every kind of tampering names its position."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.authority import single_use_horizon
from ledger.chain import GENESIS_HASH, Entry, entry_hash
from ledger.errors import VerificationError
from ledger.identity import SigningKey
from ledger.postgres import PostgresEventStore
from ledger.verify import KeyRing, verify_entries, verify_ledger
from tests.support import T0, Agent, register

Tamper = Callable[[asyncpg.Connection], Awaitable[None]]


@pytest.fixture(scope="module")
def executor() -> Iterator[ProcessPoolExecutor]:
    pool = ProcessPoolExecutor(max_workers=2)
    yield pool
    pool.shutdown()


async def populate(store: PostgresEventStore) -> None:
    """12 entries: 2 registrations, then violations and signals by both agents."""
    alice, bob = await register(store), await register(store)
    for index in range(5):
        await store.append([alice.violation(subject=bob.did, severity="low")])
        await store.append([bob.signal(alice.did, signal=f"ok-{index}")])
    await store.checkpoint()


async def run_sql(url: str, tamper: Tamper) -> None:
    conn = await asyncpg.connect(url)
    try:
        await tamper(conn)
    finally:
        await conn.close()


async def test_clean_ledger_verifies(
    store: PostgresEventStore, ledger_key: SigningKey, executor: ProcessPoolExecutor
) -> None:
    await populate(store)
    report = await verify_ledger(store, ledger_key.public, executor=executor)
    assert (report.first_position, report.last_position, report.signatures) == (1, 12, 12)
    assert report.checkpoints == 1
    assert "ledger OK" in report.summary()
    partial = await verify_ledger(store, ledger_key.public, from_position=7, executor=executor)
    assert (partial.first_position, partial.entries) == (7, 6)


async def _edit_payload(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "UPDATE events SET body = convert_to(replace(convert_from(body, 'UTF8'), "
        "'\"low\"', '\"critical\"'), 'UTF8') WHERE position = 5"
    )


async def _delete_row(conn: asyncpg.Connection) -> None:
    await conn.execute("DELETE FROM events WHERE position = 6")


async def _swap_rows(conn: asyncpg.Connection) -> None:
    await conn.execute("UPDATE events SET position = -1 WHERE position = 4")
    await conn.execute("UPDATE events SET position = 4 WHERE position = 8")
    await conn.execute("UPDATE events SET position = 8 WHERE position = -1")


async def _rechain_from(conn: asyncpg.Connection, position: int, new_body: bytes) -> None:
    """The insider attack: rewrite an entry and recompute every later hash."""
    rows = await conn.fetch("SELECT * FROM events WHERE position >= $1 ORDER BY position", position)
    prev = bytes(rows[0]["prev_hash"])
    for index, row in enumerate(rows):
        body = new_body if index == 0 else bytes(row["body"])
        entry = Entry(
            position=row["position"],
            recorded_at=row["recorded_at"],
            stream_id=row["stream_id"],
            stream_version=row["stream_version"],
            body=body,
            signature=bytes(row["signature"]),
            prev_hash=prev,
            entry_hash=b"",
        )
        digest = entry_hash(prev, entry.envelope())
        await conn.execute(
            "UPDATE events SET body = $2, prev_hash = $3, entry_hash = $4 WHERE position = $1",
            row["position"],
            body,
            prev,
            digest,
        )
        prev = digest
    await conn.execute("UPDATE ledger_head SET entry_hash = $1", prev)


async def _rewrite_and_rechain(conn: asyncpg.Connection) -> None:
    body = bytes(await conn.fetchval("SELECT body FROM events WHERE position = 9"))
    await _rechain_from(conn, 9, body.replace(b'"low"', b'"medium"').replace(b'"ok-', b'"OK-'))


async def _change_actor_column(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "UPDATE events SET actor = 'did:mesh:' || repeat('0', 32) WHERE position = 10"
    )


async def _insert_row(conn: asyncpg.Connection) -> None:
    await conn.execute("UPDATE events SET position = position + 1 WHERE position >= 7")
    await conn.execute(
        "INSERT INTO events SELECT 7, recorded_at, stream_id, stream_version, event_type, "
        "actor, subjects, body, signature, prev_hash, entry_hash FROM events WHERE position = 6"
    )


async def _drop_tail(conn: asyncpg.Connection) -> None:
    # Remove the last two entries and point the head at the new tail, consistently.
    await conn.execute("DELETE FROM events WHERE position > 10")
    await conn.execute(
        "UPDATE ledger_head SET position = 10, "
        "entry_hash = (SELECT entry_hash FROM events WHERE position = 10)"
    )


async def _forge_checkpoint(conn: asyncpg.Connection) -> None:
    await conn.execute("UPDATE checkpoints SET signature = decode(repeat('00', 64), 'hex')")


@pytest.mark.parametrize(
    ("tamper", "position", "reason"),
    [
        (_edit_payload, 5, "entry_hash"),
        (_delete_row, 6, "missing"),
        (_swap_rows, 4, "prev_hash"),
        (_rewrite_and_rechain, 9, "signature"),
        (_change_actor_column, 10, "actor column"),
        (_insert_row, 7, "prev_hash"),
        (_drop_tail, 12, "checkpoint"),
        (_forge_checkpoint, 12, "checkpoint signature"),
    ],
    ids=["edit", "delete", "swap", "rechain", "column", "insert", "drop-tail", "forge-cp"],
)
async def test_tampering_is_named_at_its_first_position(
    store: PostgresEventStore,
    database_url: str,
    ledger_key: SigningKey,
    executor: ProcessPoolExecutor,
    tamper: Tamper,
    position: int,
    reason: str,
) -> None:
    await populate(store)
    await run_sql(database_url, tamper)
    with pytest.raises(VerificationError) as info:
        await verify_ledger(store, ledger_key.public, executor=executor)
    assert info.value.position == position, str(info.value)
    assert reason in info.value.reason


async def test_rechained_ledger_signed_entry_fails_too(
    store: PostgresEventStore, database_url: str, ledger_key: SigningKey
) -> None:
    """Rewriting a ledger-signed event (a registration) needs the ledger key."""
    await populate(store)
    impostor = Agent()

    async def tamper(conn: asyncpg.Connection) -> None:
        body = bytes(await conn.fetchval("SELECT body FROM events WHERE position = 2"))
        old_did = await conn.fetchval("SELECT actor FROM events WHERE position = 4")
        await _rechain_from(conn, 2, body.replace(old_did.encode(), impostor.did.encode()))

    await run_sql(database_url, tamper)
    with pytest.raises(VerificationError) as info:
        await verify_ledger(store, ledger_key.public)
    assert info.value.position == 2


async def test_wrong_ledger_key_fails(store: PostgresEventStore) -> None:
    await populate(store)
    with pytest.raises(VerificationError, match=r"ledger key mismatch: the ledger recorded"):
        await verify_ledger(store, SigningKey.generate().public)


def _cli(args: list[str], url: str, key: SigningKey) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "AGENTMESH_DATABASE_URL": url,
        "AGENTMESH_AGENT_PRIVATE_KEY": key.private_key_pem(),
    }
    return subprocess.run(
        [sys.executable, "-m", "agentmesh", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_cli_verify_exit_codes(
    store: PostgresEventStore, database_url: str, ledger_key: SigningKey
) -> None:
    await populate(store)
    ok = _cli(["ledger", "verify"], database_url, ledger_key)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ledger OK: positions 1..12")
    await run_sql(database_url, _delete_row)
    bad = _cli(["ledger", "verify"], database_url, ledger_key)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "agentmesh: error: position 6: missing or out of order: expected position 6, found 7"
    ]
    assert ledger_key.private_key_pem().splitlines()[1] not in bad.stderr + bad.stdout


async def test_cli_checkpoint_and_head(
    store: PostgresEventStore, database_url: str, ledger_key: SigningKey
) -> None:
    await populate(store)
    alice = (await store.read(0, 1))[0].subjects[0]  # registered at position 1
    await store.append([(await register(store)).signal(subject=alice)])
    result = _cli(["ledger", "checkpoint"], database_url, ledger_key)
    assert result.returncode == 0, result.stderr
    assert '"position": 14' in result.stdout
    head = _cli(["ledger", "head"], database_url, ledger_key)
    assert '"position": 14' in head.stdout


# -- property: a chain verifies iff nothing was altered ----------------------------


def _entries(signed_events: list[Any], times: list[datetime] | None = None) -> list[Entry]:
    """A well-chained, well-signed chain of exactly these events, as a database
    writer without the rules (but with the agents' keys) could write it; recorded
    at ``times`` (all at T0 by default)."""
    entries, prev = [], GENESIS_HASH
    for position, signed in enumerate(signed_events, start=1):
        entry = Entry(
            position=position,
            recorded_at=T0 if times is None else times[position - 1],
            stream_id="x",
            stream_version=position,
            body=signed.body,
            signature=signed.signature,
            prev_hash=prev,
            entry_hash=b"",
        )
        entries.append(replace(entry, entry_hash=entry_hash(prev, entry.envelope())))
        prev = entries[-1].entry_hash
    return entries


def _chain(count: int, key: SigningKey) -> list[Entry]:
    """An agent registered by the ledger, then ledger-signed signals about it."""
    from ledger.events import AgentRegistered, Event, TrustSignal
    from ledger.signed import SignedEvent
    from ledger.timefmt import format_time

    agent = SigningKey.generate()
    events: list[Event] = [
        AgentRegistered(
            actor=key.did, occurred_at=format_time(T0), did=agent.did, public_key=agent.public.pem()
        )
    ]
    events += [
        TrustSignal(actor=key.did, occurred_at=format_time(T0), agent=agent.did, signal=f"s{n}")
        for n in range(2, count + 1)
    ]
    return _entries([SignedEvent.create(event, key) for event in events])


async def _aiter(entries: list[Entry]) -> AsyncIterator[Entry]:
    for entry in entries:
        yield entry


LEDGER = SigningKey.generate()
CHAIN = _chain(8, LEDGER)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 7),
    st.sampled_from(["drop", "swap", "flip_body", "flip_hash", "flip_sig", "none"]),
    st.data(),
)
async def test_chain_verifies_iff_unaltered(index: int, change: str, data: st.DataObject) -> None:
    entries = list(CHAIN)
    if change == "drop":
        del entries[index]
    elif change == "swap":
        other = data.draw(st.integers(0, 7).filter(lambda i: i != index))
        entries[index], entries[other] = entries[other], entries[index]
    elif change in ("flip_body", "flip_hash", "flip_sig"):
        attr = {"flip_body": "body", "flip_hash": "entry_hash", "flip_sig": "signature"}[change]
        value = bytearray(getattr(entries[index], attr))
        value[data.draw(st.integers(0, len(value) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        changed: dict[str, Any] = {attr: bytes(value)}
        entries[index] = replace(entries[index], **changed)
    ring = KeyRing(LEDGER.public)
    run = verify_entries(
        _aiter(entries),
        ring,
        start_position=1,
        start_hash=GENESIS_HASH,
        checkpoints=[],
        head=(8, CHAIN[-1].entry_hash),
    )
    if change == "none":
        assert (await run).last_position == 8
    else:
        with pytest.raises(VerificationError):
            await run


# -- verification re-checks the append rules (ledger/authority.py) ----------------------


def _broken_histories() -> dict[str, tuple[list[Any], str]]:
    from ledger.events import AgentRegistered, AgentSuspended, TrustSignal
    from ledger.signed import SignedEvent
    from ledger.timefmt import format_time

    stamp = format_time(T0)
    alice, bob = Agent(), Agent()

    def registered(agent: Agent) -> Any:
        event = AgentRegistered(
            actor=LEDGER.did, occurred_at=stamp, did=agent.did, public_key=agent.key.public.pem()
        )
        return SignedEvent.create(event, LEDGER)

    start = [registered(alice), registered(bob)]
    report = alice.violation(subject=bob.did)
    self_signal = SignedEvent.create(
        TrustSignal(actor=alice.did, occurred_at=stamp, agent=alice.did, signal="me"), alice.key
    )
    suspension = SignedEvent.create(
        AgentSuspended(actor=LEDGER.did, occurred_at=stamp, did=alice.did), LEDGER
    )
    late_self_registration = SignedEvent.create(
        AgentRegistered(
            actor=alice.did, occurred_at=stamp, did=alice.did, public_key=alice.key.public.pem()
        ),
        alice.key,
    )
    return {
        "replayed report": ([*start, report, report], "already in the ledger"),
        "self signal": ([*start, self_signal], "signal trust in itself"),
        "suspended writer": ([*start, suspension, report], "suspended"),
        "stale body": (
            [*start, alice.violation(subject=bob.did, at=T0 - timedelta(days=8))],
            "stale",
        ),
        "late self-registration": ([*start, late_self_registration], "first agent"),
    }


@pytest.mark.parametrize("case", sorted(_broken_histories()))
async def test_verification_replays_the_append_rules(case: str) -> None:
    events, reason = _broken_histories()[case]
    entries = _entries(events)
    run = verify_entries(
        _aiter(entries),
        KeyRing(LEDGER.public),
        start_position=1,
        start_hash=GENESIS_HASH,
        checkpoints=[],
        head=(len(entries), entries[-1].entry_hash),
    )
    with pytest.raises(VerificationError, match=reason) as caught:
        await run
    assert caught.value.position == len(entries)  # the entry that broke a rule


# -- the ledger's clock, and the single-use days a verifier keeps ------------------------


def _two_agents() -> tuple[list[Any], Agent, Agent]:
    from ledger.events import AgentRegistered
    from ledger.signed import SignedEvent
    from ledger.timefmt import format_time

    alice, bob = Agent(), Agent()
    start = [
        SignedEvent.create(
            AgentRegistered(
                actor=LEDGER.did,
                occurred_at=format_time(T0),
                did=agent.did,
                public_key=agent.key.public.pem(),
            ),
            LEDGER,
        )
        for agent in (alice, bob)
    ]
    return start, alice, bob


async def _verify(entries: list[Entry], ring: KeyRing | None = None) -> None:
    await verify_entries(
        _aiter(entries),
        ring or KeyRing(LEDGER.public),
        start_position=1,
        start_hash=GENESIS_HASH,
        checkpoints=[],
        head=(len(entries), entries[-1].entry_hash),
    )


async def test_a_clock_that_runs_back_is_named_at_its_entry() -> None:
    start, alice, bob = _two_agents()
    events = [*start, alice.violation(subject=bob.did), alice.violation(subject=bob.did)]
    entries = _entries(events, [T0, T0, T0 + timedelta(hours=1), T0 + timedelta(minutes=59)])
    with pytest.raises(VerificationError, match="clock never runs back") as caught:
        await _verify(entries)
    assert caught.value.position == 4


async def test_a_replay_days_later_is_caught_and_old_days_are_let_go() -> None:
    start, alice, bob = _two_agents()
    report = alice.violation(subject=bob.did)
    later = T0 + timedelta(days=6, hours=23)
    with pytest.raises(VerificationError, match="already in the ledger") as caught:
        await _verify(_entries([*start, report, report], [T0, T0, T0, later]))
    assert caught.value.position == 4
    # Three weeks of one report a day: the verifier ends up holding the days a fresh
    # body can still fall on (the horizon's), not every day it read.
    days = [T0 + timedelta(days=n) for n in range(21)]
    reports = [alice.violation(subject=bob.did, at=day) for day in days]
    ring = KeyRing(LEDGER.public)
    await _verify(_entries([*start, *reports], [T0, T0, *days]), ring)
    horizon = single_use_horizon(days[-1])
    assert min(ring.authority.ids) == horizon
    assert sorted(ring.authority.ids) == sorted({d.date() for d in days if d.date() >= horizon})
