"""What keeps an export of the newest events of a large ledger as fast as of a small one,
checked for what it must not change: the batch prover's paths are RFC 9162's, and it asks
the store only for subtrees past the batch; the key entries found through ``agent_keys``
are the ones a match by subject finds; the key entries' signatures, checked together, still
fail a bundle at the first bad line."""

from __future__ import annotations

import dataclasses
import io
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from nacl import bindings

from bench.ledger_gen import GeneratedLedger, generate_ledger
from ledger import identity as identity_module
from ledger import merkle
from ledger.audit import BundleVerificationError, export_bundle, verify_bundle
from ledger.audit import verify as verify_module
from ledger.audit.bundle import clock_ran_back
from ledger.audit.proofs import BatchProver, batch_proofs
from ledger.errors import ProofError
from ledger.events import AgentRegistered
from ledger.identity import NOT_A_GROUP_ELEMENT, SigningKey, b64encode, did_for_raw_public_key
from ledger.postgres import PostgresEventStore, PostgresLedgerReader
from ledger.postgres.audit import PostgresAuditSource
from ledger.signed import SignedEvent
from ledger.timefmt import format_time, parse_time
from tests.support import FORGERY, IDENTITY, Agent, ManualClock, pem_of
from tests.test_audit import rehash, rotate, self_register
from tests.test_audit_proofs import tree

# -- the batch prover against ledger.merkle, every size up to 160 -------------------------


@pytest.mark.parametrize("size", [*range(1, 161), 511, 512, 513, 1000, 4097])
async def test_every_batch_split_gives_the_rfc_paths(size: int) -> None:
    nodes = tree(size)

    def hash_at(level: int, index: int) -> bytes:
        return nodes[(level, index)]

    rng = random.Random(size)
    fetched: dict[tuple[int, int], bytes] = {}
    start = rng.randint(0, size - 1)
    while start < size:
        end = min(size, start + rng.choice([1, 2, 3, 7, 16, 33, rng.randint(1, size)]))
        before = merkle.frontier_at(start, hash_at)

        async def fetch(wanted: set[tuple[int, int]], end: int = end) -> dict[Any, bytes]:
            assert all(((ix + 1) << lv) > end for lv, ix in wanted), "asked for the batch's own"
            return {key: nodes[key] for key in wanted}

        leaves = [nodes[(0, i)] for i in range(start, end)]
        shown = list(range(start, end))
        paths = await batch_proofs(size, before, leaves, shown, fetched, fetch)
        assert paths == [merkle.inclusion_proof(i, size, hash_at) for i in shown]
        start = end


async def test_a_subtree_the_store_lacks_is_named() -> None:
    size = 100
    nodes = tree(size)
    before = merkle.frontier_at(10, lambda lv, ix: nodes[(lv, ix)])
    prover = BatchProver(size, before, [nodes[(0, i)] for i in range(10, 20)], {})
    # past the batch: two complete subtrees, then the tree's ragged right edge
    assert prover.needed([12]) == {(4, 1), (5, 1), (5, 2), (2, 24)}
    with pytest.raises(ProofError, match=r"subtree \(2, 24\) is not available"):
        prover.proof(12)
    with pytest.raises(ProofError, match="not in a tree of size 100"):
        prover.proof(100)


# -- key entries through agent_keys --------------------------------------------------------


async def register(store: PostgresEventStore, agent: Agent, clock: ManualClock) -> None:
    event = AgentRegistered(
        actor=store.ledger_did,
        occurred_at=format_time(clock.now),
        did=agent.did,
        public_key=agent.key.public.pem(),
    )
    await store.append([store.sign_own(event)])


async def test_key_entries_through_agent_keys_are_those_a_match_by_subject_finds(
    database_url: str, ledger_key: SigningKey
) -> None:
    clock = ManualClock()
    store = await PostgresEventStore.open(database_url, ledger_key, clock=clock)
    try:
        plain, later, unknown = Agent(), Agent(), Agent()
        rotated = [await self_register(store, clock), Agent()]
        await register(store, plain, clock)  # only a registration
        await register(store, rotated[1], clock)
        await rotate(store, rotated, 0, clock)  # a registration, then a rotation
        await store.append([plain.violation(subject=rotated[0].did, at=clock.now)])
        last = (await store.head()).position
        await rotate(store, rotated, 1, clock)  # its latest key entry lies after `last`
        await register(store, later, clock)  # registered after `last`: none
        dids = [plain.did, rotated[0].did, rotated[1].did, later.did, unknown.did]
        source = store.audit_source()
        assert isinstance(source, PostgresAuditSource)
        found = await source.key_entries(dids, last)
        assert found == await source._key_entries_by_subject(dids, last)
        assert [(r.position, r.event_type) for r in found] == [
            (1, "agent.registered"),
            (2, "agent.registered"),
            (3, "agent.registered"),
            (4, "agent.key_rotated"),
        ]
    finally:
        await store.close()


# -- many key entries: their signatures checked together, the first bad line named -----------


@pytest.fixture
async def many_signers(database_url: str) -> tuple[str, GeneratedLedger]:
    """A ledger of 300 agents, registered by the ledger at positions 1..300."""
    ledger = await generate_ledger(database_url, events=1500, agents=300, workers=2)
    store = await PostgresEventStore.open(database_url, ledger.ledger_key)  # builds the tree
    await store.close()
    return database_url, ledger


async def export_after(url: str, ledger: GeneratedLedger, position: int, out: io.StringIO) -> None:
    """Export the entries after ``position`` (by their times) into ``out``."""
    reader = await PostgresLedgerReader.connect(url)
    try:
        start = await reader.pool.fetchval(
            "SELECT recorded_at FROM events WHERE position = $1", position + 1
        )
        end = parse_time("2100-01-01T00:00:00.000000Z")
        await export_bundle(reader, ledger.ledger_key, out, start=start, end=end)
    finally:
        await reader.close()


@pytest.fixture
async def many_keys(many_signers: tuple[str, GeneratedLedger]) -> list[dict[str, Any]]:
    """A bundle with ~300 key entries (more than are checked on one thread)."""
    out = io.StringIO()
    await export_after(*many_signers, 300, out)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert sum(x["kind"] == "key" for x in lines) >= 256
    return lines


def fails_at(path: Path, lines: list[dict[str, Any]], at: int, reason: str) -> None:
    path.write_text("".join(json.dumps(x, separators=(",", ":")) + "\n" for x in lines))
    for options in ({"workers": 0}, {"workers": 2, "chunk": 64}):
        with pytest.raises(BundleVerificationError) as caught:
            verify_bundle(path, **options)  # type: ignore[arg-type]
        assert (caught.value.line, caught.value.position) == (at + 1, lines[at]["position"])
        assert caught.value.reason == reason


@pytest.mark.parametrize("pooled", [False, True], ids=["threads", "pool"])
async def test_a_bad_key_signature_is_named_at_its_line_among_many(
    many_keys: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pooled: bool
) -> None:
    if pooled:  # as with thousands of key entries: sent to the pool, 64 at a time
        monkeypatch.setattr(verify_module, "_KEY_CHUNK", 64)
    path = tmp_path / "bundle.jsonl"
    path.write_text("".join(json.dumps(x, separators=(",", ":")) + "\n" for x in many_keys))
    assert verify_bundle(path).keys == sum(x["kind"] == "key" for x in many_keys)
    keys = [i for i, x in enumerate(many_keys) if x["kind"] == "key"]
    first, second = keys[100], keys[200]

    resigned = json.loads(json.dumps(many_keys))  # another entry's signature, rehashed
    resigned[first]["signature"] = many_keys[keys[101]]["signature"]
    rehash(resigned[first])
    fails_at(path, resigned, first, "signature does not verify")

    # a later line that fails by itself does not hide the earlier bad signature
    later_bad = json.loads(json.dumps(resigned))
    later_bad[second]["body"] = later_bad[second]["body"].replace("did:mesh:", "did:mesh:0", 1)
    fails_at(path, later_bad, first, "signature does not verify")
    later_bad[second + 1] = "not a line"  # nor does a line that does not decode
    path.write_text(
        "".join(
            (x if isinstance(x, str) else json.dumps(x, separators=(",", ":"))) + "\n"
            for x in later_bad
        )
    )
    with pytest.raises(BundleVerificationError) as caught:
        verify_bundle(path, workers=0)
    assert caught.value.line == first + 1

    # an earlier line that fails by itself is named before a later bad signature
    earlier_bad = json.loads(json.dumps(resigned))
    earlier_bad[keys[50]]["stream_version"] += 1
    fails_at(path, earlier_bad, keys[50], "entry_hash does not match the entry's content")


async def rewrite_entry(conn: asyncpg.Connection, position: int, **changes: Any) -> None:
    """Give the entry at ``position`` the ``changes`` (its ``signature`` as bytes, its
    ``recorded_at`` as a datetime) and recompute its entry hash, as an attacker with the
    database would: only the checks that do not trust the stored hash can tell."""
    row = dict(await conn.fetchrow("SELECT * FROM events WHERE position = $1", position))
    row.update(changes)
    record = {
        "position": position,
        "recorded_at": format_time(row["recorded_at"]),
        "stream_id": row["stream_id"],
        "stream_version": row["stream_version"],
        "body": bytes(row["body"]).decode(),
        "signature": b64encode(bytes(row["signature"])),
        "prev_hash": bytes(row["prev_hash"]).hex(),
    }
    rehash(record)
    await conn.execute(
        "UPDATE events SET signature = $2, recorded_at = $3, entry_hash = $4 WHERE position = $1",
        position,
        bytes(row["signature"]),
        row["recorded_at"],
        bytes.fromhex(record["entry_hash"]),
    )


async def exporter_refuses(url: str, ledger: GeneratedLedger, position: int, reason: str) -> None:
    """The export of the entries after 300 stops at ``position`` for ``reason``, before
    it signs anything (no manifest, no checkpoint written out)."""
    count = "SELECT count(*) FROM checkpoints"
    conn = await asyncpg.connect(url)
    try:
        stored = await conn.fetchval(count)
        out = io.StringIO()
        with pytest.raises(BundleVerificationError) as caught:
            await export_after(url, ledger, 300, out)
        assert await conn.fetchval(count) == stored  # no checkpoint signed and stored either
    finally:
        await conn.close()
    assert (caught.value.position, caught.value.reason) == (position, reason)
    assert '"kind":"manifest"' not in out.getvalue()
    assert '"kind":"checkpoint"' not in out.getvalue()


async def test_the_exporter_signs_nothing_over_a_key_entry_whose_signature_fails(
    many_signers: tuple[str, GeneratedLedger],
) -> None:
    url, ledger = many_signers
    conn = await asyncpg.connect(url)
    try:  # a registration before the range given another's signature, its hash recomputed
        other = await conn.fetchval("SELECT signature FROM events WHERE position = 101")
        await rewrite_entry(conn, 100, signature=bytes(other))
    finally:
        await conn.close()
    await exporter_refuses(url, ledger, 100, "signature does not verify")


async def test_the_exporter_signs_nothing_over_key_entries_whose_clock_runs_back(
    many_signers: tuple[str, GeneratedLedger],
) -> None:
    url, ledger = many_signers
    conn = await asyncpg.connect(url)
    try:  # a registration before the range moved 1 µs past the next one, rehashed
        after = await conn.fetchval("SELECT recorded_at FROM events WHERE position = 101")
        later = after + timedelta(microseconds=1)
        await rewrite_entry(conn, 100, recorded_at=later)
        stored = await conn.fetchval("SELECT recorded_at FROM events WHERE position = 100")
        assert stored == later  # the edit held (the same day's partition)
    finally:
        await conn.close()
    await exporter_refuses(
        url,
        ledger,
        101,
        clock_ran_back(format_time(after), format_time(later), "key entry's"),
    )


# -- a key outside the prime-order group, recorded by a ledger that took it -----------------


def accept_small_order_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the ledger did before its checks were libsodium's: OpenSSL's check took a
    key of small order, and a forged signature by it over every message."""

    def sign_open(signed_message: bytes, raw: bytes) -> bytes:
        if signed_message[:64] == FORGERY:
            return signed_message[64:]
        return bindings.crypto_sign_open(signed_message, raw)

    monkeypatch.setattr(identity_module, "crypto_core_ed25519_is_valid_point", lambda _: True)
    monkeypatch.setattr(identity_module, "crypto_sign_open", sign_open)


async def test_a_small_order_key_an_older_ledger_took_fails_export_and_offline_verify(
    many_signers: tuple[str, GeneratedLedger], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key entries' group check runs beside their signatures, off the main thread
    (``check_key_entries``), not where each line is read: it must still name the line."""
    url, ledger = many_signers
    did = did_for_raw_public_key(IDENTITY)
    out = io.StringIO()
    with monkeypatch.context() as older:
        accept_small_order_keys(older)
        store = await PostgresEventStore.open(url, ledger.ledger_key)
        try:
            now = format_time(datetime.now(UTC))
            registration = AgentRegistered(
                actor=store.ledger_did, occurred_at=now, did=did, public_key=pem_of(IDENTITY)
            )
            position = (await store.append([store.sign_own(registration)])).positions[0]
            honest = Agent().violation(at=datetime.now(UTC))
            claim = msgspec.structs.replace(honest.event, actor=did, agent=did)
            forged = SignedEvent.create(claim, SigningKey.generate())
            await store.append([dataclasses.replace(forged, signature=FORGERY)])
        finally:
            await store.close()
        await export_after(url, ledger, 300, out)  # the older exporter signed it too
    reason = f"invalid public key: {NOT_A_GROUP_ELEMENT}"
    await exporter_refuses(url, ledger, position, reason)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    at = next(i for i, x in enumerate(lines) if x["kind"] == "key" and x["position"] == position)
    fails_at(tmp_path / "bundle.jsonl", lines, at, reason)  # on threads
    monkeypatch.setattr(verify_module, "_KEY_CHUNK", 64)
    fails_at(tmp_path / "bundle.jsonl", lines, at, reason)  # on the pool, 64 at a time
