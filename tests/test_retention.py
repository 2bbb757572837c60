"""Retention over a ledger spanning more than 90 days (injected clock), on real PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import asyncpg
import msgspec
import pytest

from agentmesh.embedded import EmbeddedRedis
from agentmesh.retention_job import run_retention
from agentmesh.settings import Settings
from ledger import merkle, tlog
from ledger.errors import EventValidationError, ReplayError, VerificationError
from ledger.identity import SigningKey
from ledger.note import open_checkpoint
from ledger.postgres import PostgresEventStore
from ledger.postgres.retention import PostgresRetentionStore
from ledger.retention import RetentionError, apply_retention, plan_retention
from ledger.verify import verify_ledger
from projections.config import TrustConfig
from projections.projector import Projector
from projections.readstore import ProjectionReader
from projections.state import fold_recorded
from projections.store_memory import MemoryProjectionStore
from tests.api_support import api_settings, running_api
from tests.support import Agent, ManualClock, random_history, register
from tests.test_read_stores import as_bytes, store_answers

CONFIG = TrustConfig()
DAYS = 90


async def long_history(ledger: PostgresEventStore, clock: ManualClock) -> list[Agent]:
    """About 125 days of activity: a burst of everything, then daily reports."""
    agents = await random_history(ledger, clock, seed=11, steps=60)
    for day in range(110):
        clock.advance(days=1)
        a, b = agents[day % len(agents)], agents[(day + 1) % len(agents)]
        await ledger.append([a.violation(subject=b.did, severity="low", at=clock.now)])
        await ledger.append([b.signal(subject=a.did, at=clock.now)])
    await random_history(ledger, clock, seed=12, steps=20, agents=agents)
    return agents


def settings_for(url: str, key: SigningKey) -> Settings:
    return Settings.from_env(
        {
            "AGENTMESH_DATABASE_URL": url,
            "AGENTMESH_AGENT_PRIVATE_KEY": key.private_key_pem(),
            "AGENTMESH_STORAGE_BACKEND": "memory",
        }
    )


async def count_before(url: str, clock: ManualClock) -> tuple[int, int]:
    conn = await asyncpg.connect(url)
    try:
        cut = clock.now - timedelta(days=DAYS)
        before = await conn.fetchval("SELECT count(*) FROM events WHERE recorded_at < $1", cut)
        total = await conn.fetchval("SELECT count(*) FROM events")
    finally:
        await conn.close()
    return before, total


async def test_retention_cuts_at_the_window_and_verification_and_rebuild_hold(
    ledger: PostgresEventStore, database_url: str, ledger_key: SigningKey, clock: ManualClock
) -> None:
    await long_history(ledger, clock)
    await ledger.checkpoint()
    kept = await ledger.latest_tree_head()  # a witness's copy of the tree head before the cut
    assert kept is not None
    live_store = MemoryProjectionStore()
    live = Projector(ledger, live_store, CONFIG)
    progress = await live.load()
    await live.catch_up(progress)
    full = fold_recorded([r async for r in ledger.iter_entries()], CONFIG)
    before, total = await count_before(database_url, clock)
    assert 0 < before < total

    dry = await run_retention(settings_for(database_url, ledger_key), dry_run=True, clock=clock)
    assert dry.startswith("dry run: retention: cut at")
    assert await count_before(database_url, clock) == (before, total)

    message = await run_retention(
        settings_for(database_url, ledger_key), dry_run=False, clock=clock
    )
    assert message.startswith("retention applied")
    remaining_before, remaining = await count_before(database_url, clock)
    assert remaining_before == 0  # exactly the events recorded before the cut are gone
    assert remaining == total - before + 1  # plus ledger.retention_applied
    first = await ledger.first_position()
    assert first == before + 1
    last = await ledger.entry_at((await ledger.head()).position)
    assert last is not None
    assert last.event_type == "ledger.retention_applied"

    # 1. The chain still verifies, from the anchor; so does the tree, against a head
    #    taken before the cut, and proofs about what is kept still work.
    report = await verify_ledger(
        ledger, ledger_key.public, anchors=PostgresRetentionStore(ledger.pool), trusted=kept
    )
    assert report.first_position == before + 1
    with pytest.raises(VerificationError, match="needs its retention anchors"):
        await verify_ledger(ledger, ledger_key.public)  # a cut ledger without its anchors
    await tree_proofs_hold_after_the_cut(ledger, ledger_key, kept, cut=before)
    # 2. The live projection continues; a rebuild from snapshot + remaining equals it.
    await live.catch_up(progress)
    reader = ProjectionReader(live_store, CONFIG)
    dids = sorted(full.agents)
    live_answers = as_bytes(await store_answers(reader, dids, [], [0.0, 30.0], clock))
    await live.rebuild()
    rebuilt = as_bytes(await store_answers(reader, dids, [], [0.0, 30.0], clock))
    assert rebuilt == live_answers
    # 3. Running it again changes nothing.
    again = await run_retention(settings_for(database_url, ledger_key), dry_run=False, clock=clock)
    assert "nothing" in again
    assert await count_before(database_url, clock) == (0, remaining)


async def tree_proofs_hold_after_the_cut(
    ledger: PostgresEventStore, ledger_key: SigningKey, kept: str, cut: int
) -> None:
    """Inclusion proofs of retained entries and consistency proofs from checkpoints at
    or after the cut verify, with the entries before the cut gone."""
    await ledger.checkpoint()
    latest = await ledger.latest_tree_head()
    assert latest is not None
    verifier = [tlog.verifier(ledger_key.public)]
    old, _ = open_checkpoint(kept, verifier)
    new, _ = open_checkpoint(latest, verifier)
    for position in (cut + 1, cut + 2, (cut + new.size) // 2, new.size):
        entry = await ledger.entry_at(position)
        assert entry is not None
        proof = await ledger.inclusion_proof(position, new.size)
        leaf = tlog.entry_leaf(entry.entry_hash)
        merkle.verify_inclusion(leaf, position - 1, new.size, proof, new.root_hash)
    for first in (cut, cut + 1, old.size):
        proof = await ledger.consistency_proof(first, new.size)
        root = await ledger.tree_root(first)
        merkle.verify_consistency(first, new.size, proof, root, new.root_hash)
    assert await ledger.tree_root(old.size) == old.root_hash


async def test_appends_during_retention_are_kept(
    ledger: PostgresEventStore, database_url: str, ledger_key: SigningKey, clock: ManualClock
) -> None:
    agents = await long_history(ledger, clock)
    appended: list[int] = []

    async def keep_appending() -> None:
        for index in range(40):
            result = await ledger.append(
                [agents[0].signal(subject=agents[1].did, signal=f"during-{index}", at=clock.now)]
            )
            appended.append(result.positions[0])

    await asyncio.gather(
        run_retention(settings_for(database_url, ledger_key), dry_run=False, clock=clock),
        keep_appending(),
    )
    stored = {r.position for r in await ledger.read(appended[0] - 1, 1000)}
    assert set(appended) <= stored
    await verify_ledger(ledger, ledger_key.public, anchors=PostgresRetentionStore(ledger.pool))


async def test_refuses_when_the_snapshot_cannot_be_written(
    ledger: PostgresEventStore, database_url: str, ledger_key: SigningKey, clock: ManualClock
) -> None:
    await long_history(ledger, clock)
    before = await count_before(database_url, clock)
    plan = await plan_retention(ledger, ledger_key.public, clock.now, DAYS)

    async def broken(_: int) -> dict[str, object]:
        raise OSError("disk full")

    with pytest.raises(RetentionError, match="snapshot"):
        await apply_retention(ledger, ledger_key, plan, broken, clock.now)
    assert await count_before(database_url, clock) == before


async def test_an_interrupted_run_is_finished_by_the_next(
    ledger: PostgresEventStore,
    database_url: str,
    ledger_key: SigningKey,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await long_history(ledger, clock)
    import ledger.retention as retention

    async def crash(*_: object) -> None:
        raise ConnectionError("killed mid-prune")

    real = retention._prune
    monkeypatch.setattr(retention, "_prune", crash)
    with pytest.raises(ConnectionError):
        await run_retention(settings_for(database_url, ledger_key), dry_run=False, clock=clock)
    assert (await count_before(database_url, clock))[0] > 0  # anchored, nothing removed yet
    monkeypatch.setattr(retention, "_prune", real)
    await run_retention(settings_for(database_url, ledger_key), dry_run=False, clock=clock)
    assert (await count_before(database_url, clock))[0] == 0
    await verify_ledger(ledger, ledger_key.public, anchors=PostgresRetentionStore(ledger.pool))


async def test_time_travel_before_the_window_is_refused(
    database_url: str, redis_server: EmbeddedRedis, ledger_key: SigningKey
) -> None:
    clock = ManualClock()
    store = await PostgresEventStore.open(database_url, ledger_key, clock=clock)
    try:
        agents = await long_history(store, clock)
        history = [r async for r in store.iter_entries()]
        await run_retention(settings_for(database_url, ledger_key), dry_run=False, clock=clock)
    finally:
        await store.close()
    async with running_api(
        api_settings(database_url, redis_server, ledger_key), clock=clock
    ) as api:
        did = agents[1].did
        old = await api.client.get(f"/v1/agents/{did}/trust", params={"at": "2026-01-05T00:00:00Z"})
        assert old.status_code == 410
        assert "before the retention window" in old.json()["detail"]
        moment = clock.now - timedelta(days=10)
        recent = await api.client.get(f"/v1/agents/{did}/trust", params={"at": moment.isoformat()})
        assert recent.status_code == 200, recent.text
        # The same answer as a replay of the whole, pre-retention history.
        before_moment = [r for r in history if r.recorded_at <= moment]
        view = fold_recorded(before_moment, CONFIG).trust_view(did, moment)
        assert view is not None
        assert recent.json()["score"] == view.score


def test_cli_retention_dry_run(database_url: str, ledger_key: SigningKey) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")},
        "AGENTMESH_DATABASE_URL": database_url,
        "AGENTMESH_AGENT_PRIVATE_KEY": ledger_key.private_key_pem(),
        "AGENTMESH_STORAGE_BACKEND": "memory",
    }
    result = subprocess.run(
        [sys.executable, "-m", "agentmesh", "retention", "run", "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("dry run: retention: nothing before")


async def test_one_agents_key_after_a_cut_comes_from_the_anchor(
    ledger: PostgresEventStore,
    database_url: str,
    ledger_key: SigningKey,
    clock: ManualClock,
) -> None:
    """Once retention removed an agent's registration, ``key_before`` finds its key in
    the anchor below the position, as ``keys_before`` does."""
    agents = await long_history(ledger, clock)
    await run_retention(settings_for(database_url, ledger_key), dry_run=False, clock=clock)
    first = await ledger.first_position()
    assert first is not None
    assert first > 1
    head = (await ledger.head()).position
    everyone = await ledger.keys_before(head + 1)
    registered = {
        entry.subjects[0]
        for entry in await ledger.read(first - 1, head)
        if entry.event_type == "agent.registered"
    }
    from_anchor = [a for a in agents if a.did not in registered]
    assert from_anchor  # some registrations are gone
    for agent in agents:
        assert await ledger.key_before(agent.did, head + 1) == everyone.get(agent.did)
        assert everyone.get(agent.did) is not None


async def test_bundles_after_a_cut_carry_the_anchor_keys_and_verify(
    ledger: PostgresEventStore,
    database_url: str,
    ledger_key: SigningKey,
    clock: ManualClock,
    tmp_path: Path,
) -> None:
    """Agents registered before the cut still sign events in the window: their keys
    come from the signed anchor, since their registrations are gone."""
    import io

    from ledger.audit import BundleVerificationError, export_bundle, verify_bundle

    await long_history(ledger, clock)
    await run_retention(settings_for(database_url, ledger_key), dry_run=False, clock=clock)
    out = io.StringIO()
    manifest = await export_bundle(
        ledger,
        ledger_key,
        out,
        start=clock.now - timedelta(days=60),
        end=clock.now + timedelta(days=1),
        agent=None,
    )
    assert manifest.count > 50
    bundle = tmp_path / "after-cut.jsonl"
    bundle.write_text(out.getvalue())
    assert '"kind":"anchor"' in out.getvalue()
    report = verify_bundle(bundle)
    assert report.summary().startswith("bundle OK")
    # The anchor's keys are trusted only under the ledger's signature.
    lines = out.getvalue().splitlines()
    index = next(i for i, line in enumerate(lines) if '"kind":"anchor"' in line)
    did = next(iter(msgspec.json.decode(lines[index])["keys"]))
    forged = msgspec.json.decode(lines[index])
    forged["keys"][did] = base64.b64encode(SigningKey.generate().public.raw).decode()
    lines[index] = msgspec.json.encode(forged).decode()
    bundle.write_text("\n".join(lines) + "\n")
    with pytest.raises(BundleVerificationError, match="anchor"):
        verify_bundle(bundle)


async def _single_use_partitions(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent IN ('event_ids'::regclass, 'idempotency_keys'::regclass)"
        )
    finally:
        await conn.close()
    return {r["relname"] for r in rows}


async def test_a_run_drops_the_single_use_days_whose_bodies_are_stale(
    ledger: PostgresEventStore, database_url: str, ledger_key: SigningKey, clock: ManualClock
) -> None:
    agent, other = await register(ledger, at=clock.now), await register(ledger, at=clock.now)
    old = agent.violation(subject=other.did, at=clock.now)
    await ledger.append([old], idempotency_key="old")
    old_day = f"{clock.now:%Y%m%d}"
    clock.advance(days=4)
    recent = agent.violation(subject=other.did, at=clock.now)
    first_recent = await ledger.append([recent], idempotency_key="recent")
    recent_day = f"{clock.now:%Y%m%d}"
    clock.advance(days=5)  # the old day is 9 days back now: past the horizon (MAX_AGE + 1)
    await ledger.append([agent.violation(subject=other.did, at=clock.now)])
    stale = {f"event_ids_p{old_day}", f"idempotency_keys_p{old_day}"}
    kept = {f"event_ids_p{recent_day}", f"idempotency_keys_p{recent_day}"}
    assert stale | kept <= await _single_use_partitions(database_url)
    settings = settings_for(database_url, ledger_key)

    dry = await run_retention(settings, dry_run=True, clock=clock)
    assert "nothing before" in dry  # 9 days of a 90-day window: no cut
    assert f"drop 2 stale single-use partitions (event_ids_p{old_day}" in dry
    assert stale <= await _single_use_partitions(database_url)
    # As if a run had died between detaching one stale day and dropping it.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f"ALTER TABLE event_ids DETACH PARTITION event_ids_p{old_day}")
        assert f"event_ids_p{old_day}" in await run_retention(settings, dry_run=True, clock=clock)
        await run_retention(settings, dry_run=False, clock=clock)
        left = await _single_use_partitions(database_url)
        assert not stale & left
        assert kept <= left
        orphans = await conn.fetchval(
            "SELECT count(*) FROM pg_class WHERE relname = ANY($1::text[])", sorted(stale)
        )
        assert orphans == 0  # the detached one was dropped too
    finally:
        await conn.close()

    # Nothing replays: the old body is stale, the recent one is still in the index.
    head = await ledger.head()
    with pytest.raises(EventValidationError, match="stale"):
        await ledger.append([old], idempotency_key="old")
    with pytest.raises(ReplayError):
        await ledger.append([recent])
    retried = await ledger.append([recent], idempotency_key="recent")
    assert retried.duplicate
    assert retried.positions == first_recent.positions
    assert await ledger.head() == head
    report = await verify_ledger(ledger, ledger_key.public)
    assert report.entries == head.position  # every entry is still there, and verifies
