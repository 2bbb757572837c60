"""Replay for incident review, against a real PostgreSQL ledger.

Every replay answer must equal what the projections answer for the same
moment: ``MeshState`` folded over the entries recorded up to it, and for the
present the ``ProjectionReader`` over a read store the projector caught up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import random
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agentmesh.retention_job import run_retention
from agentmesh.settings import Settings
from ledger.audit import export_bundle
from ledger.chain import RecordedEvent
from ledger.events import PolicyViolation
from ledger.identity import SigningKey
from ledger.postgres import PostgresEventStore
from ledger.timefmt import format_time, parse_time
from projections.config import TrustConfig
from projections.delegation import is_active
from projections.projector import Projector
from projections.readstore import ProjectionReader
from projections.replay import (
    AgentTimelineReplay,
    DiffReplay,
    MeshAt,
    ReplayError,
    ReplaySource,
    StateReplay,
    Timeline,
    first_time_below,
    merge_by_position,
    tier_bands,
)
from projections.state import MeshState, fold_recorded
from projections.store_memory import MemoryProjectionStore
from projections.trust import TrustState, score_milli_at, tier_for
from projections.trust import points as shown_points
from tests.support import T0, ManualClock, random_history, register

CONFIG = TrustConfig()
SEEDS = [1, 2, 3, 4]
MICRO = timedelta(microseconds=1)


async def entries(ledger: PostgresEventStore) -> list[RecordedEvent]:
    return [r async for r in ledger.iter_entries()]


def folded_until(records: list[RecordedEvent], moment: datetime) -> MeshState:
    """The projections' answer: every entry recorded at or before ``moment``."""
    return fold_recorded([r for r in records if r.recorded_at <= moment], CONFIG)


def moments(records: list[RecordedEvent], rng: random.Random, count: int) -> list[datetime]:
    """Entry times, a microsecond either side, points in between and after the end."""
    times = sorted({r.recorded_at for r in records})
    picked = rng.sample(times, min(count, len(times)))
    found = {t + d for t in picked for d in (-MICRO, timedelta(0), MICRO)}
    found |= {times[-1] + timedelta(hours=h) for h in (0.5, 30, 400)}
    span = (times[-1] - times[0]).total_seconds()
    found |= {times[0] + timedelta(seconds=rng.uniform(0, span)) for _ in range(count)}
    return sorted(found)


def expected_mesh(state: MeshState, at: datetime, lowest: int = 10) -> dict[str, Any]:
    """What ``replay state`` must say, computed directly from the fold."""
    views = [state.trust_view(did, at) for did in state.trust]
    ranked = sorted((v.score_milli, v.did, v.score, v.tier) for v in views if v is not None)
    grants = sorted(state.delegations.grants.values(), key=lambda g: g.granted_position)
    return {
        "registry_size": state.registry_size(),
        "registered": len(state.agents),
        "tiers": state.tier_counts(at),
        "lowest": [(did, score, tier) for _, did, score, tier in ranked[:lowest]],
        "active": [g.grant_id for g in grants if is_active(state, g, at)],
        "position": state.position,
    }


def replayed_mesh(mesh: MeshAt) -> dict[str, Any]:
    return {
        "registry_size": mesh.registry_size,
        "registered": mesh.registered,
        "tiers": mesh.tiers,
        "lowest": [(a.did, a.score, a.tier) for a in mesh.lowest],
        "active": [g.grant_id for g in mesh.active_grants],
        "position": mesh.position,
    }


def timeline_of(records: list[RecordedEvent], did: str, **kwargs: Any) -> Timeline:
    return AgentTimelineReplay(ReplaySource(records), did, config=CONFIG, **kwargs).run()


# -- replay equals the projections ---------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
async def test_replay_answers_equal_the_projections(
    ledger: PostgresEventStore, clock: ManualClock, seed: int
) -> None:
    await random_history(ledger, clock, seed)
    records = await entries(ledger)
    rng = random.Random(seed)
    horizon = clock.now + timedelta(hours=400)
    dids = sorted(fold_recorded(records, CONFIG).agents)
    timelines = {did: timeline_of(records, did, end=horizon) for did in dids}
    for at in moments(records, rng, 12):
        state = folded_until(records, at)
        mesh = StateReplay(ReplaySource(records), at, config=CONFIG).run()
        assert replayed_mesh(mesh) == expected_mesh(state, at), at
        for did in dids:
            view = state.trust_view(did, at)
            if view is None:
                with pytest.raises(ReplayError):
                    timelines[did].at(at)
            else:
                point = timelines[did].at(at)
                assert (point.score, point.tier) == (view.score, view.tier), (did, at)
    # Streaming from PostgreSQL (small batches, stopping early) answers the same.
    for at in moments(records, rng, 3):
        source = ReplaySource(ledger.iter_entries(batch=7))
        streamed = await StateReplay(source, at, config=CONFIG).run_async()
        assert streamed == StateReplay(ReplaySource(records), at, config=CONFIG).run()


@pytest.mark.parametrize("seed", SEEDS[:2])
async def test_present_moment_equals_the_read_store(
    ledger: PostgresEventStore, clock: ManualClock, seed: int
) -> None:
    await random_history(ledger, clock, seed)
    read_store = MemoryProjectionStore()
    projector = Projector(ledger, read_store, CONFIG, batch_size=9)
    await projector.catch_up(await projector.load())
    reader = ProjectionReader(read_store, CONFIG)
    records = await entries(ledger)
    for now in (clock.now, clock.now + timedelta(hours=50)):
        mesh = StateReplay(ReplaySource(records), now, lowest=1000, config=CONFIG).run()
        assert mesh.registry_size == await reader.registry_size()
        assert mesh.tiers == await reader.tier_counts(now)
        for agent in mesh.lowest:
            stored = await reader.trust(agent.did, now)
            assert stored is not None
            assert (stored.score, stored.tier) == (agent.score, agent.tier)
            assert timeline_of(records, agent.did, end=now).at(now).tier == stored.tier
        grant_ids = [g.grant_id for g in fold_recorded(records, CONFIG).delegations.grants.values()]
        context = await reader.context([], grant_ids)
        active = [g for g in grant_ids if is_active(context, context.delegations.grants[g], now)]
        assert sorted(g.grant_id for g in mesh.active_grants) == sorted(active)


# -- the timeline ---------------------------------------------------------------------


def check_timeline(records: list[RecordedEvent], did: str, timeline: Timeline) -> None:
    """Rows chain, event rows are exactly the entries that changed the agent with the
    fold's scores, and the tier changes exactly on the rows that say so."""
    rows = timeline.rows
    for previous, row in itertools.pairwise(rows):
        assert row.decay >= 0
        assert previous.time <= row.time
        if row.score_before is not None:
            assert previous.score_after - row.decay == row.score_before
        assert previous.tier_after == row.tier_before
        # Decay only lowers the score and tiers are monotone in it, so the tier is
        # the same from one row up to a microsecond before the next.
        if row.time > previous.time:
            assert timeline.at(row.time - MICRO).tier == previous.tier_after
    state = MeshState(CONFIG)
    changed_at: list[int] = []
    by_position = {r.position: r for r in rows if r.position is not None}
    for record in records:
        known = state.trust_view(did, record.recorded_at)
        if did in state.apply_recorded(record):
            changed_at.append(record.position)
            row = by_position[record.position]
            after = state.trust_view(did, record.recorded_at)
            assert after is not None
            assert row.score_before == (None if known is None else known.score)
            assert (row.score_after, row.tier_after) == (after.score, after.tier)
            assert row.tier_changed == (known is not None and known.tier != after.tier)
    assert sorted(by_position) == changed_at
    assert [r.kind for r in rows].count("end") == 1


@pytest.mark.parametrize("seed", SEEDS)
async def test_timeline_rows_chain_and_show_every_tier_change(
    ledger: PostgresEventStore, clock: ManualClock, seed: int
) -> None:
    await random_history(ledger, clock, seed)
    records = await entries(ledger)
    horizon = clock.now + timedelta(hours=300)
    decay_rows = 0
    for did in sorted(fold_recorded(records, CONFIG).agents):
        timeline = timeline_of(records, did, end=horizon)
        check_timeline(records, did, timeline)
        for row in (r for r in timeline.rows if r.kind == "decay"):
            decay_rows += 1
            assert row.tier_changed
            just_before = timeline.at(row.time - MICRO)
            assert just_before.tier == row.tier_before
            assert just_before.score > row.score_after
            assert timeline.at(row.time).tier == row.tier_after
    assert decay_rows > 0  # decay alone crossed a tier somewhere in this history


async def test_timeline_window_from_to(ledger: PostgresEventStore, clock: ManualClock) -> None:
    agents = await random_history(ledger, clock, seed=5)
    records = await entries(ledger)
    did = agents[1].did
    whole = timeline_of(records, did)
    start, end = records[40].recorded_at, records[90].recorded_at
    part = timeline_of(records, did, start=start, end=end)
    assert part.rows[0].kind == "start"
    assert part.rows[0].time == start
    assert (part.rows[-1].kind, part.rows[-1].time) == ("end", end)
    assert all(start < r.time <= end for r in part.rows[1:])
    inside = [r for r in whole.rows if r.kind in ("event", "decay") and start < r.time <= end]
    shown = [r for r in part.rows if r.kind in ("event", "decay")]
    assert len(inside) > 2
    # The same rows, but the first one's decay counts from the start row.
    assert shown[1:] == inside[1:]
    assert shown[0] == dataclasses.replace(inside[0], decay=shown[0].decay)
    assert shown[0].decay == part.rows[0].score_after - (shown[0].score_before or 0)
    for moment in (start, start + (end - start) / 3, end):
        assert part.at(moment) == whole.at(moment)
    assert timeline_of(records, did, end=end).rows[-1] == part.rows[-1]
    with pytest.raises(ReplayError, match="is after --to"):
        timeline_of(records, did, start=end, end=start)
    with pytest.raises(ReplayError, match="not registered"):
        timeline_of(records, "did:mesh:" + "0" * 32)


def test_first_time_below_inverts_the_decay() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        config = TrustConfig(decay_rate=rng.choice([0.5, 2.0, 3.7, 50.0]))
        decay_from = rng.randint(0, 10**12)
        base_at = decay_from + rng.randint(0, 10**10)
        state = TrustState("did:mesh:x", rng.randint(0, 1_000_000), base_at, decay_from)
        points = rng.randint(0, 1000)
        crossed = first_time_below(state, config, points)

        def score(at: int, state: TrustState = state, config: TrustConfig = config) -> int:
            return shown_points(score_milli_at(state, config.decay_rate_milli, 100_000, at))

        if crossed is None:  # never: the floor (100) or a base already below it holds
            assert points <= 100 or state.base_milli <= 100_000
            continue
        assert crossed > base_at
        assert score(crossed) < points
        assert crossed == base_at + 1 or score(crossed - 1) >= points


def test_tier_bands_follow_tier_for() -> None:
    for threshold in (0, 300, 500, 650, 950):
        config = TrustConfig(min_threshold=threshold, decay_floor=0)
        bands = tier_bands(config)
        assert bands[0][0] == 0
        assert bands[-1][1] == 1000
        for (_, high, _), (low, _, _) in itertools.pairwise(bands):
            assert high == low
        for low, high, tier in bands:
            assert tier_for(low, config) == tier == tier_for(high - 1, config)


# -- retention window and gaps -------------------------------------------------------


async def test_window_start_is_enforced(ledger: PostgresEventStore, clock: ManualClock) -> None:
    agents = await random_history(ledger, clock, seed=6)
    records = await entries(ledger)
    cut = 50
    snapshot = fold_recorded(records[:cut], CONFIG)
    kept_snapshot = snapshot.snapshot()
    window = records[cut].recorded_at - timedelta(minutes=1)
    assert window > records[cut - 1].recorded_at

    def source() -> ReplaySource:
        return ReplaySource(records[cut:], snapshot, window)

    early = window - MICRO
    did = agents[0].did
    for ask in (
        lambda: StateReplay(source(), early, config=CONFIG).run(),
        lambda: DiffReplay(source(), early, clock.now, config=CONFIG).run(),
        lambda: AgentTimelineReplay(source(), did, start=early, config=CONFIG).run(),
        lambda: AgentTimelineReplay(source(), did, end=early, config=CONFIG).run(),
    ):
        with pytest.raises(ReplayError, match=r"is before the retention window \(cut at "):
            ask()
    for at in (window, records[cut + 20].recorded_at, clock.now + timedelta(hours=9)):
        from_cut = StateReplay(source(), at, config=CONFIG).run()
        assert from_cut == StateReplay(ReplaySource(records), at, config=CONFIG).run()
    timeline = AgentTimelineReplay(source(), did, config=CONFIG).run()
    assert (timeline.rows[0].kind, timeline.rows[0].time) == ("start", window)
    whole = timeline_of(records, did, start=window)
    assert timeline.rows == whole.rows
    diff = DiffReplay(source(), window, clock.now, config=CONFIG).run()
    assert diff == DiffReplay(ReplaySource(records), window, clock.now, config=CONFIG).run()
    assert snapshot.snapshot() == kept_snapshot  # the caller's snapshot is not touched
    # Without a snapshot, the same entries are a gap: refuse rather than answer.
    with pytest.raises(ReplayError, match=r"has no entries 1\.\.50"):
        StateReplay(ReplaySource(records[cut:]), clock.now, config=CONFIG).run()
    holed = records[:30] + records[31:]
    with pytest.raises(ReplayError, match=r"has no entries 31\.\.31:"):
        StateReplay(ReplaySource(holed), clock.now, config=CONFIG).run()


# -- the same answer from the live ledger and from a built list of entries ------------


async def test_merged_and_filtered_entries_answer_like_the_ledger(
    ledger: PostgresEventStore, clock: ManualClock
) -> None:
    agents = await random_history(ledger, clock, seed=8)
    records = await entries(ledger)
    keys = [r for r in records if r.event_type in ("agent.registered", "agent.key_rotated")]
    merged = list(merge_by_position(keys, records))
    assert merged == records
    start, end = records[30].recorded_at, clock.now
    for question in (
        lambda s: StateReplay(s, end, config=CONFIG),
        lambda s: DiffReplay(s, start, end, config=CONFIG),
        lambda s: AgentTimelineReplay(s, agents[2].did, start=start, config=CONFIG),
    ):
        live = await question(ReplaySource(ledger.iter_entries(batch=11))).run_async()
        assert question(ReplaySource(merged)).run().to_dict() == live.to_dict()
    # One agent's own entries give its exact trust (not the rows other agents'
    # delegation changes cascade onto it) while only the ledger and its own key
    # reported about it; other questions are refused.
    quiet = await register(ledger, at=clock.advance(minutes=5))
    await ledger.append([quiet.violation(severity="high", at=clock.advance(minutes=5))])
    await ledger.append_own(
        PolicyViolation(
            actor=ledger.ledger_did,
            occurred_at=format_time(clock.advance(minutes=5)),
            agent=quiet.did,
            severity="low",
            rule="admin",
        )
    )
    records = await entries(ledger)
    did = quiet.did
    filtered = ReplaySource(await own_entries(ledger, did), agent=did, ledger_did=ledger.ledger_did)
    whole = timeline_of(records, did)
    partial = AgentTimelineReplay(filtered, did, end=whole.end, config=CONFIG).run()
    for moment in moments(records, random.Random(8), 10):
        if whole.rows[0].time <= moment <= whole.end:
            assert partial.at(moment) == whole.at(moment)
    with pytest.raises(ReplayError, match="needs the whole ledger"):
        StateReplay(filtered, end, config=CONFIG).run()
    with pytest.raises(ReplayError, match="holds only the entries of"):
        AgentTimelineReplay(filtered, agents[0].did, config=CONFIG).run()
    # A peer's report counts by the peer's standing, which one agent's entries lack.
    reported = ReplaySource(
        await own_entries(ledger, agents[2].did), agent=agents[2].did, ledger_did=ledger.ledger_did
    )
    with pytest.raises(ReplayError, match="reporter's standing"):
        AgentTimelineReplay(reported, agents[2].did, config=CONFIG).run()


async def own_entries(ledger: PostgresEventStore, did: str) -> list[RecordedEvent]:
    own: list[RecordedEvent] = []
    while batch := await ledger.read_agent(did, own[-1].position if own else 0, 17):
        own += batch
    return own


# -- the CLI --------------------------------------------------------------------------


async def cli(*args: str, url: str | None) -> subprocess.CompletedProcess[str]:
    """``agentmesh replay …`` in a subprocess (off the event loop), AGENTMESH_DATABASE_URL
    set to ``url`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
    if url is not None:
        env["AGENTMESH_DATABASE_URL"] = url
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "agentmesh", "replay", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("agentmesh: error: ")
    return lines[0]


async def test_cli_answers_plots_and_errors(
    ledger: PostgresEventStore, clock: ManualClock, database_url: str, tmp_path: Path
) -> None:
    agents = await random_history(ledger, clock, seed=9)
    records = await entries(ledger)
    did, end = agents[1].did, format_time(clock.now)
    start = format_time(records[20].recorded_at)

    result = await cli("agent", did, "--to", end, "--json", url=database_url)
    assert result.returncode == 0, result.stderr
    expected = timeline_of(records, did, end=clock.now)
    assert json.loads(result.stdout) == expected.to_dict()
    text = await cli("agent", did, "--from", start, "--to", end, url=database_url)
    assert text.returncode == 0, text.stderr
    part = timeline_of(records, did, start=records[20].recorded_at, end=clock.now)
    assert text.stdout.splitlines() == part.lines()

    state = await cli("state", "--at", start, "--json", url=database_url)
    assert state.returncode == 0, state.stderr
    mesh = StateReplay(ReplaySource(records), records[20].recorded_at, config=CONFIG).run()
    assert json.loads(state.stdout) == mesh.to_dict()
    assert "lowest-trust agents" in (await cli("state", "--at", end, url=database_url)).stdout
    diff = await cli("diff", "--from", start, "--to", end, "--json", url=database_url)
    assert diff.returncode == 0, diff.stderr
    replayed = DiffReplay(ReplaySource(records), records[20].recorded_at, clock.now).run()
    assert json.loads(diff.stdout) == replayed.to_dict()

    png, svg = tmp_path / "trust.png", tmp_path / "trust.SVG"
    for path in (png, svg):
        plotted = await cli("agent", did, "--plot", str(path), url=database_url)
        assert plotted.returncode == 0, plotted.stderr
        assert plotted.stdout.splitlines()[-1] == f"plot written to {path}"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert png.stat().st_size > 20_000
    assert b"<svg" in svg.read_bytes()[:2000]
    assert svg.stat().st_size > 20_000

    error = one_line_error(
        await cli("agent", did, "--plot", str(tmp_path / "t.gif"), url=database_url)
    )
    assert ".png or .svg" in error
    assert not (tmp_path / "t.gif").exists()
    assert "is after --to" in one_line_error(
        await cli("diff", "--from", end, "--to", start, url=database_url)
    )
    assert "not registered" in one_line_error(
        await cli("agent", "did:mesh:" + "0" * 32, url=database_url)
    )
    missing = tmp_path / "missing" / "t.png"
    assert "cannot write" in one_line_error(
        await cli("agent", did, "--plot", str(missing), url=database_url)
    )
    usage = await cli("state", url=database_url)  # --at is required: a usage error
    assert usage.returncode == 2
    assert "the following arguments are required: --at" in usage.stderr
    bad_time = await cli("state", "--at", "yesterday", url=database_url)
    assert bad_time.returncode == 2
    assert "RFC 3339" in bad_time.stderr
    unset = await cli("state", "--at", end, url=None)
    assert "AGENTMESH_DATABASE_URL" in one_line_error(unset)


async def test_cli_bundle_answers_like_the_live_ledger(
    ledger: PostgresEventStore,
    clock: ManualClock,
    database_url: str,
    ledger_key: SigningKey,
    tmp_path: Path,
) -> None:
    agents = await random_history(ledger, clock, seed=12)
    quiet = await register(ledger, at=clock.advance(minutes=5))  # reported on by itself only
    await ledger.append([quiet.violation(severity="high", at=clock.advance(minutes=5))])
    records = await entries(ledger)
    did = agents[2].did
    end = clock.now + timedelta(hours=1)
    bundles = {
        "whole": (T0 - timedelta(days=1), None),
        "agent": (T0 - timedelta(days=1), quiet.did),
        "peered": (T0 - timedelta(days=1), did),
        "late": (records[30].recorded_at, None),
    }
    for name, (start, agent) in bundles.items():
        with (tmp_path / name).open("w") as out:
            await export_bundle(ledger, ledger_key, out, start=start, end=end, agent=agent)
    whole, only = str(tmp_path / "whole"), str(tmp_path / "agent")
    t1, t2 = format_time(records[25].recorded_at), format_time(clock.now)
    questions = [
        ("agent", did),
        ("agent", did, "--from", t1, "--to", t2, "--json"),
        ("state", "--at", t1),
        ("state", "--at", t2, "--json"),
        ("diff", "--from", t1, "--to", t2),
        ("diff", "--from", t1, "--to", t2, "--json"),
    ]
    live = await asyncio.gather(*(cli(*q, url=database_url) for q in questions))
    bundled = await asyncio.gather(*(cli(*q, "--bundle", whole, url=None) for q in questions))
    for question, a, b in zip(questions, live, bundled, strict=True):
        assert a.returncode == b.returncode == 0, (question, a.stderr, b.stderr)
        assert a.stdout == b.stdout, question
    # An agent's own bundle gives its trust; the mesh needs the whole ledger; a
    # bundle without the start of the ledger, or a moment past its end, is refused.
    own, peered, state, late, past = await asyncio.gather(
        cli("agent", quiet.did, "--json", "--bundle", only, url=None),
        cli("agent", did, "--bundle", str(tmp_path / "peered"), url=None),
        cli("state", "--at", t2, "--bundle", only, url=None),
        cli("state", "--at", t2, "--bundle", str(tmp_path / "late"), url=None),
        cli("state", "--at", format_time(end), "--bundle", whole, url=None),
    )
    assert own.returncode == 0, own.stderr
    mine = json.loads(own.stdout)["rows"][-1]
    reference = timeline_of(records, quiet.did, end=parse_time(mine["time"])).rows[-1]
    assert (mine["score_after"], mine["tier_after"]) == (
        reference.score_after,
        reference.tier_after,
    )
    assert "reporter's standing" in one_line_error(peered)
    assert "needs the whole ledger" in one_line_error(state)
    assert "replay needs a bundle from the ledger's first entry" in one_line_error(late)
    assert "is past the end of the source" in one_line_error(past)


async def test_cli_replays_from_the_retention_snapshot(
    ledger: PostgresEventStore, clock: ManualClock, database_url: str, ledger_key: SigningKey
) -> None:
    agents = await random_history(ledger, clock, seed=10, steps=40)
    for day in range(100):
        clock.advance(days=1)
        a, b = agents[day % len(agents)], agents[(day + 1) % len(agents)]
        await ledger.append([a.violation(subject=b.did, severity="low", at=clock.now)])
        await ledger.append([b.signal(subject=a.did, at=clock.now)])
    full = await entries(ledger)
    settings = Settings.from_env(
        {
            "AGENTMESH_DATABASE_URL": database_url,
            "AGENTMESH_AGENT_PRIVATE_KEY": ledger_key.private_key_pem(),
            "AGENTMESH_STORAGE_BACKEND": "memory",
        }
    )
    applied = await run_retention(settings, dry_run=False, clock=clock)
    assert applied.startswith("retention applied")
    cut_time = clock.now - timedelta(days=90)
    before = await cli("state", "--at", format_time(cut_time - timedelta(days=1)), url=database_url)
    assert "is before the retention window (cut at" in one_line_error(before)
    at = clock.now - timedelta(days=3)
    after = await cli("state", "--at", format_time(at), "--json", url=database_url)
    assert after.returncode == 0, after.stderr
    expected = StateReplay(ReplaySource(full), at, config=CONFIG).run()
    assert json.loads(after.stdout) == expected.to_dict()
    timeline = await cli("agent", agents[0].did, "--json", url=database_url)
    assert timeline.returncode == 0, timeline.stderr
    rows = json.loads(timeline.stdout)["rows"]
    assert rows[0]["kind"] == "start"
    assert rows[0]["time"] == format_time(cut_time)
    whole = timeline_of(full, agents[0].did, start=cut_time, end=parse_time(rows[-1]["time"]))
    assert rows == whole.to_dict()["rows"]
