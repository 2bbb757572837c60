"""The ledger as a transparency log over real HTTP: C2SP checkpoints, RFC 9162 proofs.

A client that pinned the ledger's note key verifies what the API serves with
nothing but ``ledger.merkle`` and ``ledger.note`` (what any RFC 9162 / C2SP
implementation would do)."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from agentmesh.embedded import EmbeddedRedis
from ledger import merkle, tlog
from ledger.audit import BundleVerificationError, export_bundle, verify_bundle
from ledger.chain import GENESIS_HASH, entry_hash, envelope_bytes
from ledger.errors import LedgerKeyMismatchError, VerificationError
from ledger.identity import SigningKey
from ledger.note import open_checkpoint, parse_vkey
from ledger.postgres import PostgresEventStore
from ledger.verify import verify_ledger
from tests.api_support import Api, api_settings, running_api
from tests.support import T0, Agent, ManualClock, register


@pytest.fixture
async def api(
    database_url: str, redis_server: EmbeddedRedis, ledger_key: SigningKey
) -> AsyncIterator[Api]:
    settings = api_settings(
        database_url, redis_server, ledger_key, AGENTMESH_LEDGER_CHECKPOINT_EVERY="5"
    )
    async with running_api(settings) as running:
        yield running


def b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


async def test_checkpoints_and_proofs_verify_with_the_pinned_key(
    api: Api, ledger_key: SigningKey
) -> None:
    pinned = tlog.verifier(ledger_key.public)
    served = (await api.client.get("/v1/ledger/vkey")).text.strip()
    assert parse_vkey(served).key_id == pinned.key_id
    for _ in range(3):
        await api.register()
    first_note = (await api.client.get("/v1/ledger/checkpoint")).text
    first, _ = open_checkpoint(first_note, [pinned])
    assert first.origin == f"agentmesh.ledger/{ledger_key.did}"
    for _ in range(18):
        await api.register()
    head = await api.head()
    second_note = (await api.client.get("/v1/ledger/checkpoint")).text
    second, _ = open_checkpoint(second_note, [pinned])
    assert 3 <= first.size < second.size <= head  # a checkpoint every 5 entries
    # Every entry of the second tree is in it; the first tree is a prefix of it.
    for position in range(1, second.size + 1):
        proof = (
            await api.client.get(
                "/v1/ledger/proofs/inclusion",
                params={"position": position, "tree_size": second.size},
            )
        ).json()
        assert proof["leaf_index"] == position - 1
        merkle.verify_inclusion(
            b64(proof["leaf_hash"]),
            position - 1,
            second.size,
            [b64(h) for h in proof["hashes"]],
            second.root_hash,
        )
    consistency = (
        await api.client.get(
            "/v1/ledger/proofs/consistency", params={"first": first.size, "second": second.size}
        )
    ).json()
    merkle.verify_consistency(
        first.size,
        second.size,
        [b64(h) for h in consistency["hashes"]],
        first.root_hash,
        second.root_hash,
    )


async def test_impossible_proof_requests_are_400(api: Api) -> None:
    await api.register()
    head = await api.head()
    cases: list[tuple[str, dict[str, int | str]]] = [
        ("/v1/ledger/proofs/inclusion", {"position": 1, "tree_size": head + 5}),
        ("/v1/ledger/proofs/inclusion", {"position": head + 1, "tree_size": head}),
        ("/v1/ledger/proofs/inclusion", {"position": 0, "tree_size": head}),
        ("/v1/ledger/proofs/consistency", {"first": head, "second": head + 1}),
        ("/v1/ledger/proofs/consistency", {"first": 2, "second": 1}),
        ("/v1/ledger/proofs/consistency", {"first": "x", "second": 1}),
        # Huge sizes cost no more than small ones (they once recursed through every
        # missing subtree: an anonymous request could pin a worker).
        ("/v1/ledger/proofs/inclusion", {"position": 1, "tree_size": 2**62}),
        ("/v1/ledger/proofs/consistency", {"first": 2**40, "second": 2**63 - 1}),
        # The key history of a tree past the head is not the ledger's to give.
        ("/v1/ledger/keys", {"tree_size": head + 1}),
        ("/v1/ledger/keys", {"tree_size": 0}),
        ("/v1/ledger/keys", {"tree_size": "x"}),
    ]
    for path, params in cases:
        response = await api.client.get(path, params=params)
        assert response.status_code == 400, (path, params, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")


# -- a database writer without the ledger key: what verification catches ----------------


# The ledger's clock in these tests: noon of the day the tests run (no midnight between
# an entry and the same entry moved back an hour).
NOON = T0.replace(hour=12, minute=0, second=0)


@pytest.fixture
async def ledger(database_url: str, ledger_key: SigningKey) -> AsyncIterator[PostgresEventStore]:
    clock = ManualClock(now=NOON)
    store = await PostgresEventStore.open(database_url, ledger_key, clock=clock)
    try:
        yield store
    finally:
        await store.close()


async def _history(ledger: PostgresEventStore) -> tuple[list[Agent], str]:
    """Twelve entries, then a checkpoint someone kept outside the database, then more.

    Signed two hours before the ledger's clock, whatever the time of day the tests
    run at: moving an entry back an hour keeps its times valid, so what catches the
    rewrite is the kept checkpoint, not the freshness rule."""
    at = NOON - timedelta(hours=2)
    agents = [await register(ledger, at=at) for _ in range(3)]
    for index in range(9):
        subject = agents[(index + 1) % 3].did
        await ledger.append([agents[index % 3].violation(subject=subject, at=at)])
    await ledger.checkpoint()
    note = await ledger.latest_tree_head()
    assert note is not None
    for index in range(4):
        subject = agents[(index + 2) % 3].did
        await ledger.append([agents[index % 3].violation(subject=subject, at=at)])
    await ledger.checkpoint()
    return agents, note


Rows = list[dict[str, Any]]


async def _rewrite(url: str, mutate: Callable[[Rows], None]) -> None:
    """What an attacker with write access does: change the rows, renumber, recompute every
    hash of the chain after the change, and drop the checkpoints it can no longer sign."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            rows = [dict(r) for r in await conn.fetch("SELECT * FROM events ORDER BY position")]
            mutate(rows)
            prev = GENESIS_HASH
            for position, row in enumerate(rows, start=1):
                row["position"], row["prev_hash"] = position, prev
                envelope = envelope_bytes(
                    position=position,
                    recorded_at=row["recorded_at"],
                    stream_id=row["stream_id"],
                    stream_version=row["stream_version"],
                    body=bytes(row["body"]),
                    signature=bytes(row["signature"]),
                )
                row["entry_hash"] = prev = entry_hash(prev, envelope)
            await conn.execute("DELETE FROM events")
            columns = list(rows[0])
            await conn.copy_records_to_table(
                "events", records=[tuple(r[c] for c in columns) for r in rows], columns=columns
            )
            await conn.execute(
                "UPDATE ledger_head SET position = $1, entry_hash = $2 WHERE id = 1",
                len(rows),
                prev,
            )
            await conn.execute("DELETE FROM checkpoints")
    finally:
        await conn.close()


def _drop_tail(rows: Rows) -> None:
    del rows[-6:]  # below the kept checkpoint too


def _drop_one(rows: Rows) -> None:
    del rows[5]


def _swap(rows: Rows) -> None:
    rows[4], rows[6] = rows[6], rows[4]


def _back_an_hour(rows: Rows) -> None:
    rows[7]["recorded_at"] -= timedelta(hours=1)


def _copy_a_report(rows: Rows) -> None:
    rows.append(dict(rows[5]))


def _edit_subjects(rows: Rows) -> None:
    rows[6]["subjects"] = [rows[0]["subjects"][0]]


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        (_drop_tail, "entries were removed from the tail"),
        (_drop_one, "history was rewritten"),
        (_swap, "history was rewritten"),
        (_back_an_hour, "position 8: .* the ledger's clock never runs back"),  # named first
        (_copy_a_report, "already in the ledger"),
        (_edit_subjects, "subjects column differs"),
    ],
)
async def test_verification_with_a_kept_checkpoint_catches_rewrites(
    ledger: PostgresEventStore,
    database_url: str,
    ledger_key: SigningKey,
    attack: Callable[[Rows], None],
    reason: str,
) -> None:
    _, kept = await _history(ledger)
    report = await verify_ledger(ledger, ledger_key.public, trusted=kept)
    assert report.last_position == 16
    await _rewrite(database_url, attack)
    with pytest.raises(VerificationError, match=reason):
        await verify_ledger(ledger, ledger_key.public, trusted=kept)


async def test_one_ledger_key(
    ledger: PostgresEventStore, database_url: str, ledger_key: SigningKey
) -> None:
    await _history(ledger)
    impostor = SigningKey.generate()
    with pytest.raises(LedgerKeyMismatchError, match="recorded at genesis"):
        await PostgresEventStore.open(database_url, impostor)
    with pytest.raises(VerificationError, match="ledger key mismatch"):
        await verify_ledger(ledger, impostor.public)
    # A checkpoint note signed by any other key is no checkpoint of this ledger.
    forged = tlog.signed_tree_head(impostor, 3, bytes(32))
    with pytest.raises(VerificationError, match="does not verify"):
        await verify_ledger(ledger, ledger_key.public, trusted=forged)


async def test_audit_bundles_are_held_against_a_kept_checkpoint(
    ledger: PostgresEventStore, database_url: str, ledger_key: SigningKey, tmp_path: Path
) -> None:
    agents, kept = await _history(ledger)
    start, end = T0 - timedelta(days=1), T0 + timedelta(days=1)

    async def bundle(name: str, agent: str | None = None) -> Path:
        path = tmp_path / name
        with path.open("w") as out:
            await export_bundle(ledger, ledger_key, out, start=start, end=end, agent=agent)
        return path

    # A bundle filtered to one agent still proves every entry it shows is in the log.
    only = await bundle("only.jsonl", agents[0].did)
    report = verify_bundle(only, workers=0, trusted=kept)
    assert (report.tree_size, report.trusted_size, report.stubs > 0) == (16, 12, True)
    assert "consistent with the trusted checkpoint of 12" in report.summary()
    # After a rewrite the bundle is internally fine, but not the log the witness saw.
    await _rewrite(database_url, _drop_one)
    rewritten = await bundle("rewritten.jsonl")
    assert verify_bundle(rewritten, workers=0).tree_size == 15
    with pytest.raises(BundleVerificationError, match="history was rewritten"):
        verify_bundle(rewritten, workers=0, trusted=kept)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentmesh", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_the_cli_holds_ledger_and_bundle_against_a_kept_checkpoint(
    ledger: PostgresEventStore, database_url: str, ledger_key: SigningKey, tmp_path: Path
) -> None:
    _, kept = await _history(ledger)
    note = tmp_path / "seen.note"
    note.write_text(kept)
    bundle = tmp_path / "all.jsonl"
    with bundle.open("w") as out:
        start, end = T0 - timedelta(days=1), T0 + timedelta(days=1)
        await export_bundle(ledger, ledger_key, out, start=start, end=end)
    pub = tmp_path / "ledger.pub.pem"
    pub.write_text(ledger_key.public.pem())
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
    env["AGENTMESH_DATABASE_URL"] = database_url
    args = ("--ledger-public-key", str(pub), "--trusted-checkpoint", str(note))
    checked, audited = await asyncio.gather(
        asyncio.to_thread(_cli, "ledger", "verify", *args, env=env),
        asyncio.to_thread(_cli, "audit", "verify", str(bundle), *args, env=env),
    )
    assert checked.returncode == 0, checked.stderr
    assert audited.returncode == 0, audited.stderr
    assert "consistent with the trusted checkpoint of 12" in audited.stdout
    await _rewrite(database_url, _drop_tail)
    refused = await asyncio.to_thread(_cli, "ledger", "verify", *args, env=env)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1  # one line
    assert "entries were removed from the tail" in refused.stderr
