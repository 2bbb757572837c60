"""Audit bundles across a rotation of the ledger's own key (issue 12 item 5).

A bundle carries every ``ledger.key_rotated`` entry as a key line, before the agents'
keys: they link the header's key (the exporter's, the ledger's latest) to the key in
force at each position. Entries are checked against the ledger key that signed at
their position, the checkpoint and its tree head against the key in force at their
size; a key that was never the ledger's signs nothing a verifier accepts."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from datetime import timedelta

import pytest

from ledger import tlog
from ledger.audit import BundleVerificationError, export_bundle, verify_bundle
from ledger.errors import VerificationError
from ledger.events import LedgerKeyRotated
from ledger.identity import SigningKey
from ledger.note import Checkpoint as NoteCheckpoint
from ledger.note import parse_note
from ledger.postgres import PostgresEventStore, PostgresLedgerReader
from ledger.signed import SignedEvent
from ledger.timefmt import format_time
from ledger.verify import verify_ledger
from tests.support import T0, Agent, ManualClock, register

START, END = T0 - timedelta(days=1), T0 + timedelta(days=1)


@dataclass
class Rotated:
    url: str
    old: SigningKey
    new: SigningKey
    rotated_at: int
    clock: ManualClock


@pytest.fixture
async def rotated(database_url: str, ledger_key: SigningKey) -> Rotated:
    """Registrations and an agent's own event under the genesis key, its rotation a
    minute later, then more under the new key."""
    clock = ManualClock()
    store = await PostgresEventStore.open(database_url, ledger_key, clock=clock)
    agent = await register(store)
    await store.append([agent.violation()])
    await store.checkpoint()
    clock.advance(minutes=1)
    new = SigningKey.generate()
    event = LedgerKeyRotated(
        actor=ledger_key.did,
        occurred_at=format_time(clock()),
        did=new.did,
        public_key=new.public.pem(),
        previous_key=ledger_key.public.pem(),
    )
    [rotated_at] = (await store.append([SignedEvent.rotation(event, ledger_key, new)])).positions
    await store.close()
    store = await PostgresEventStore.open(database_url, new, clock=clock)
    try:
        other = await register(store, Agent())
        await store.append([other.signal(agent.did, at=clock())])
        await store.append([agent.violation(at=clock())])
        await store.checkpoint()
    finally:
        await store.close()
    return Rotated(database_url, ledger_key, new, rotated_at, clock)


async def export(r: Rotated, key: SigningKey, **kwargs: object) -> list[str]:
    reader = await PostgresLedgerReader.connect(r.url)
    try:
        out = io.StringIO()
        await export_bundle(reader, key, out, **{"start": START, "end": END, **kwargs})  # type: ignore[arg-type]
    finally:
        await reader.close()
    return out.getvalue().splitlines()


def kinds(lines: list[str]) -> list[str]:
    return [json.loads(line)["kind"] for line in lines]


async def test_a_bundle_across_a_rotation_verifies(rotated: Rotated) -> None:
    lines = await export(rotated, rotated.new)
    # The rotation is a key line, before every agent's key.
    keys = [json.loads(line) for line in lines if json.loads(line)["kind"] == "key"]
    assert keys[0]["type"] == "ledger.key_rotated"
    assert keys[0]["position"] == rotated.rotated_at
    assert all(k["type"] != "ledger.key_rotated" for k in keys[1:])
    report = verify_bundle(lines, workers=0, ledger_key=rotated.new.public)
    assert report.ledger_did == rotated.new.did
    assert report.tree_size == report.manifest.last_position
    assert report.events == report.manifest.last_position  # every entry, none a stub
    # A checkpoint the genesis key signed before the rotation is a trusted one.
    reader = await PostgresLedgerReader.connect(rotated.url)
    try:
        old_note = (await reader.tree_heads())[rotated.rotated_at - 1]
        new_note = await reader.latest_tree_head()
    finally:
        await reader.close()
    assert verify_bundle(lines, workers=0, trusted=old_note).trusted_size == rotated.rotated_at - 1
    assert new_note is not None
    assert verify_bundle(lines, workers=0, trusted=new_note).trusted_size is not None
    # An agent's bundle too (stubs for the rest).
    agent_lines = await export(rotated, rotated.new, agent=keys[-1]["actor"])
    assert verify_bundle(agent_lines, workers=0).stubs > 0


async def test_a_key_that_was_never_the_ledgers_signs_nothing_accepted(
    rotated: Rotated,
) -> None:
    lines = await export(rotated, rotated.new)
    tail = [json.loads(line) for line in lines[-2:]]
    assert [t["kind"] for t in tail] == ["checkpoint", "manifest"]
    size = tail[0]["position"]
    root = NoteCheckpoint.parse(parse_note(tail[0]["note"]).text).root_hash
    fresh = SigningKey.generate()
    # The tree head re-signed by a fresh key, or by the retired key past its rotation.
    for key, words in ((fresh, "signed tree head"), (rotated.old, "signed tree head")):
        forged = dict(tail[0], note=tlog.signed_tree_head(key, size, root))
        bad = [*lines[:-2], json.dumps(forged), lines[-1]]
        with pytest.raises(BundleVerificationError, match=words):
            verify_bundle(bad, workers=0)
    # A header naming a fresh key: not the key the ledger's rotations lead to.
    header = json.loads(lines[0])
    header["ledger_public_key"] = fresh.public.pem()
    with pytest.raises(BundleVerificationError, match=r"never this ledger's key|key mismatch"):
        verify_bundle([json.dumps(header), *lines[1:]], workers=0)
    # Without the rotation line, the genesis key's entries have no key: refused.
    dropped = [line for line in lines if '"ledger.key_rotated"' not in line or '"key"' not in line]
    assert len(dropped) == len(lines) - 1
    with pytest.raises(BundleVerificationError, match="registered by the ledger"):
        verify_bundle(dropped, workers=0)
    # A rotation line whose body was edited (the new key swapped for a fresh one).
    at = next(i for i, line in enumerate(lines) if '"kind":"key"' in line.replace(" ", ""))
    edited = lines[at].replace(rotated.new.did, fresh.did)
    with pytest.raises(BundleVerificationError, match="entry_hash"):
        verify_bundle([*lines[:at], edited, *lines[at + 1 :]], workers=0)


async def test_a_range_before_the_rotation_is_refused_and_signs_nothing(
    rotated: Rotated,
) -> None:
    reader = await PostgresLedgerReader.connect(rotated.url)
    try:
        before = await reader.checkpoints()
    finally:
        await reader.close()
    with pytest.raises(VerificationError, match="export a range that ends after position"):
        await export(rotated, rotated.new, end=T0 + timedelta(seconds=30))
    # A retired key exports nothing either.
    with pytest.raises(VerificationError, match="key mismatch"):
        await export(rotated, rotated.old)
    reader = await PostgresLedgerReader.connect(rotated.url)
    try:
        assert await reader.checkpoints() == before  # no checkpoint was stored
        await verify_ledger(reader, rotated.old.public)
    finally:
        await reader.close()
