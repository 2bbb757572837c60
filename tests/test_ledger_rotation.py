"""Rotating the ledger's own key (issue 12 item 5): ``ledger.key_rotated``, signed by
the current ledger key with the new key's proof. Attacker's tests first; each refused
call leaves the head where it was."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import asyncpg
import pytest

from agentmesh.witness import Alarm, AlarmKind, SignedCheckpoint, cross_rotation
from ledger import keyhistory, tlog
from ledger.errors import LedgerError, LedgerKeyMismatchError, VerificationError
from ledger.events import LedgerKeyRotated
from ledger.identity import SigningKey
from ledger.memory import MemoryLedger
from ledger.note import open_checkpoint
from ledger.postgres import PostgresEventStore
from ledger.signed import SignedEvent
from ledger.timefmt import format_time
from ledger.verify import verify_ledger
from tests.support import T0, ManualClock, register

Store = MemoryLedger | PostgresEventStore


@pytest.fixture(params=["memory", "postgres"])
async def ledger(
    request: pytest.FixtureRequest, ledger_key: SigningKey, database_url: str
) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryLedger(ledger_key, clock=ManualClock())
        return
    store = await PostgresEventStore.open(database_url, ledger_key, clock=ManualClock())
    try:
        yield store
    finally:
        await store.close()


def rotation(current: SigningKey, new: SigningKey, actor: str | None = None) -> LedgerKeyRotated:
    return LedgerKeyRotated(
        actor=actor or current.did,
        occurred_at=format_time(T0),
        did=new.did,
        public_key=new.public.pem(),
        previous_key=current.public.pem(),
    )


async def refused(ledger: Store, signed: SignedEvent, match: str) -> None:
    before = await ledger.head()
    with pytest.raises(LedgerError, match=match):
        await ledger.append([signed])
    assert await ledger.head() == before
    assert await ledger.ledger_rotations() == []


async def test_a_rotation_without_proof_or_by_another_key_changes_nothing(
    ledger: Store, ledger_key: SigningKey
) -> None:
    await register(ledger)
    new, impostor = SigningKey.generate(), SigningKey.generate()
    # No proof by the new key.
    await refused(ledger, SignedEvent.create(rotation(ledger_key, new), ledger_key), "proof")
    # A proof by another key than the one installed.
    bad = SignedEvent.rotation(rotation(ledger_key, new), ledger_key, impostor)
    await refused(ledger, bad, "proof does not verify")
    # Signed by a key that is not the ledger's (under its own name, or the ledger's).
    by_impostor = SignedEvent.rotation(rotation(impostor, new), impostor, new)
    await refused(ledger, by_impostor, "ledger|unknown signer|not permitted")
    forged = SignedEvent.rotation(rotation(impostor, new, ledger_key.did), impostor, new)
    await refused(ledger, forged, "previous_key|signature")
    assert (await ledger.ledger_identity()) == ledger_key.public
    await verify_ledger(ledger, ledger_key.public)


async def test_after_a_rotation_the_old_key_signs_nothing_and_verify_follows(
    ledger: Store, ledger_key: SigningKey, database_url: str
) -> None:
    await register(ledger)
    await ledger.checkpoint()
    new = SigningKey.generate()
    await ledger.append([SignedEvent.rotation(rotation(ledger_key, new), ledger_key, new)])
    rotated_at = (await ledger.head()).position
    assert (await ledger.ledger_identity()) == new.public
    # The process still holding the old key is refused, with the way out named.
    head = await ledger.head()
    with pytest.raises(LedgerKeyMismatchError, match="restart it with the new key"):
        await register(ledger)
    with pytest.raises(LedgerKeyMismatchError, match="rotated to"):
        await ledger.checkpoint()
    assert await ledger.head() == head
    if isinstance(ledger, PostgresEventStore):
        url = database_url
        with pytest.raises(LedgerKeyMismatchError, match=f"since its rotation at {rotated_at}"):
            await PostgresEventStore.open(url, ledger_key)
        renewed: Store = await PostgresEventStore.open(url, new, clock=ManualClock())
    else:
        with pytest.raises(LedgerKeyMismatchError):
            ledger.use_key(ledger_key)
        ledger.use_key(new)
        renewed = ledger
    try:
        await register(renewed)
        checkpoint = await renewed.checkpoint()
        assert checkpoint.signer == new.did
        note = await renewed.latest_tree_head()
        assert note is not None
        assert tlog.origin(new.did) in note
        # Verify crosses the rotation, pinned to the genesis key or to the new one.
        for pinned in (ledger_key.public, new.public):
            report = await verify_ledger(renewed, pinned, trusted=note)
            assert report.last_position == (await renewed.head()).position
        with pytest.raises(VerificationError, match="never this ledger's key"):
            await verify_ledger(renewed, SigningKey.generate().public)
        # A tree head by a fresh key is still no checkpoint of this ledger.
        forged = tlog.signed_tree_head(SigningKey.generate(), 3, bytes(32))
        with pytest.raises(VerificationError, match="does not verify"):
            await verify_ledger(renewed, new.public, trusted=forged)
        # The retired key's tree head over the rotation is refused: not the key in force.
        size = (await renewed.head()).position
        stale = tlog.signed_tree_head(ledger_key, size, await renewed.tree_root(size))
        with pytest.raises(VerificationError, match="not the ledger key in force"):
            await verify_ledger(renewed, new.public, trusted=stale)
    finally:
        if renewed is not ledger:
            await renewed.close()


async def test_a_retired_keys_checkpoint_in_the_database_fails_verification(
    database_url: str, ledger_key: SigningKey
) -> None:
    old = await PostgresEventStore.open(database_url, ledger_key, clock=ManualClock())
    new = SigningKey.generate()
    await register(old)
    await old.append([SignedEvent.rotation(rotation(ledger_key, new), ledger_key, new)])
    await old.close()
    renewed = await PostgresEventStore.open(database_url, new, clock=ManualClock())
    try:
        await register(renewed)
        head = await renewed.head()
        # A database writer holding only the retired key signs the head.
        from ledger.chain import sign_checkpoint

        forged = sign_checkpoint(ledger_key, head.position, head.entry_hash, head.recorded_at)
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                "INSERT INTO checkpoints (position, head_hash, time, signer, signature) "
                "VALUES ($1, $2, $3, $4, decode($5, 'base64'))",
                head.position,
                head.entry_hash,
                head.recorded_at,
                forged.signer,
                forged.signature,
            )
        finally:
            await conn.close()
        with pytest.raises(VerificationError, match="not the ledger key"):
            await verify_ledger(renewed, ledger_key.public)
    finally:
        await renewed.close()


# --- witnesses cross a rotation only with its proof ---------------------------------------


async def proven(ledger: MemoryLedger, size: int) -> list[keyhistory.ProvenRotation]:
    return [
        keyhistory.ProvenRotation(e, size, tuple(await ledger.inclusion_proof(e.position, size)))
        for e in await ledger.ledger_rotations()
    ]


async def test_a_witness_crosses_a_proven_rotation_and_alarms_without_it(
    ledger_key: SigningKey,
) -> None:
    ledger = MemoryLedger(ledger_key, clock=ManualClock())
    await register(ledger)
    await ledger.checkpoint()
    accepted = (await ledger.head()).position
    pinned = tlog.verifier(ledger_key.public)
    new = SigningKey.generate()
    await ledger.append([SignedEvent.rotation(rotation(ledger_key, new), ledger_key, new)])
    ledger.use_key(new)
    await register(ledger)
    await ledger.checkpoint()
    note = await ledger.latest_tree_head()
    assert note is not None
    offered, _ = open_checkpoint(note, [tlog.verifier(new.public)])
    size = offered.size
    crossed = cross_rotation(pinned, accepted, note, offered, await proven(ledger, size))
    assert isinstance(crossed, SignedCheckpoint)
    assert crossed.checkpoint == offered
    # Without the rotation's proof: the alarm of today.
    missing = cross_rotation(pinned, accepted, note, offered, [])
    assert isinstance(missing, Alarm)
    assert missing.kind is AlarmKind.BAD_SIGNATURE
    # A proof in another tree, or a tampered entry, is no proof.
    other = [
        keyhistory.ProvenRotation(p.entry, p.tree_size, p.proof[1:])
        for p in await proven(ledger, size)
    ]
    assert isinstance(cross_rotation(pinned, accepted, note, offered, other), Alarm)
    entry = (await ledger.ledger_rotations())[0]
    tampered = dataclasses.replace(entry, body=entry.body.replace(b"did:", b"DID:", 1))
    bad = [keyhistory.ProvenRotation(tampered, size, (await proven(ledger, size))[0].proof)]
    assert isinstance(cross_rotation(pinned, accepted, note, offered, bad), Alarm)
    # A fresh key's checkpoint with the real rotation proven is still refused.
    fresh = tlog.signed_tree_head(SigningKey.generate(), size, offered.root_hash)
    refused_ = cross_rotation(pinned, accepted, fresh, offered, await proven(ledger, size))
    assert isinstance(refused_, Alarm)
    assert refused_.kind is AlarmKind.BAD_SIGNATURE
