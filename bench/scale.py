"""The scale run: the same figures at a small ledger and at a big one, side by side.

Builds, at each of two sizes (``--small-events`` and ``--events``; the small
size keeps the big one's events per agent), a ledger with real signatures, a
real chain and a real Merkle tree, then measures on it:

  * single-report appends: agent-signed ``policy.violation`` reports (each its
    agent's own blocked call, as a sidecar sends them), **one report per HTTP
    request** (``POST /v1/violations``), ``--report-connections`` keep-alive
    connections, closed loop (wrk): reports/s and p99;
  * trust reads: ``GET /v1/agents/{did}/trust`` with the API's cache off, cycling
    over every agent in random order, ``--concurrency`` connections: requests/s
    and p99 (``GET /health`` of the same server and client beside it, for
    context: how loaded the machine was);
  * sidecar decision latency: what a sidecar does per call when its trust cache
    misses (a fresh ``sidecar.trust.TrustSource`` reading trust, record and
    capabilities from Redis, then ``sidecar.policy.decide``), and on a hit;
    p50/p99 over ``--samples`` agents, in this process;
  * registry listing: ``GET /v1/agents?cursor=…&limit=100`` with cursors in the
    tenth of the DID order that ends 100 agents before its end (so every page is
    full at both sizes), one connection: p50/p99 ms;
  * ``?at=``: ``GET /v1/agents/{did}/trust?at=…`` for an agent with
    ``--hot-events`` events of its own (its sidecar's self-reports); median ms;
  * projection rebuild into Redis (``Projector.rebuild``) beside the raw read of
    the same events (``iter_entries``, batch 10,000) in the same rounds: events/s,
    target >= 0.8x the raw read; and the bytes Redis then holds per agent document
    (``MEMORY USAGE`` of the documents' hash over its fields);
  * audit export (``export_bundle``, jsonl, every event with its inclusion proof)
    of the newest ``--export-events`` generated events and offline verification
    of that bundle (``verify_bundle``, every signature, one worker per core):
    events/s, and lines/s counting the bundle's key entries too (one per signer
    of its events, each with a signature checked on export and on verify: at a
    fixed number of events the big ledger's bundle has far more signers);
  * retention of one day's partition: a cut at the end of the oldest day
    (``ledger.retention.apply_retention`` as ``agentmesh retention run`` calls
    it), the prune (detach + drop the day's partition, delete its checkpoints)
    timed apart from the snapshot and anchor, target <= 1 s; then dropping that
    day's single-use ids and idempotency keys (their own day partitions), as
    every run drops the days no fresh body can fall on;
  * disk bytes per event: ``pg_total_relation_size`` of every ledger table (all
    partitions of ``events`` with their indexes, ``event_ids``, ``merkle_nodes``,
    ``checkpoints``, …) over the events stored.

Then one table: each figure at both sizes, the ratio big/small, and whether the
big one is within 20 % of the small one (higher is better for rates, lower for
times and bytes). Rates are medians of ``--repeat`` rounds; latencies are the
median of the rounds' percentiles. Targets are reported, never asserted.

How the ledger is built, per size (timed and printed): ``bench/ledger_gen.py``
signs and chains ``events - hot_events`` events over ``--days`` days of
``recorded_at`` (90 by default: the retention window a fleet keeps, a day partition
each; the oldest day starting at midnight, so it is one whole partition) and COPYs
them; this script then fills ``event_ids`` (the single-use
index the write path keeps, which the generator leaves empty) in SQL, opens
``PostgresEventStore``, which builds the Merkle tree over the entries (stored
subtrees) as on any first open, registers the hot agent and appends its
``--hot-events`` self-reports through ``PostgresEventStore.append`` (64 appenders;
verified, chained, committed), and verifies the first and last 2,000 entries.
The hot agent is a new one because ``?at=`` folds the agent's events *and*,
transitively, those of every peer that reported about it (``projections.history``):
the generator's reports go from random agents to random agents, so for any
generated agent that closure is nearly the whole ledger.

Servers are real: embedded PostgreSQL and Redis (``bench/common.py``), the API as
``python -m agentmesh serve api --workers N`` reading the Redis projection the
rebuild wrote; no projector runs during the HTTP measures. Each size's database
and Redis keys are dropped after its figures.

Usage: .venv/bin/python bench/scale.py [--events 10000000] [--agents 100000]
           [--small-events 100000] [--days 90] [--hot-events 10000] [--repeat 3]
           [--duration 10] [--big-rebuild-repeat N] [--quick]
``--quick`` is ``--events 200000 --agents 2000 --duration 3 --samples 500``.
Uses AGENTMESH_DATABASE_URL and AGENTMESH_REDIS_HOST/PORT when set, else embedded
servers. 10M events take about 10 GB of disk while they exist.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ledger.retention as retention
from bench.api import (
    WRK_SCRIPT,
    HttpConnection,
    Load,
    Service,
    Stack,
    WrkClient,
    http_request,
    start_api,
)
from bench.common import (
    drop_database,
    end_on_sigterm,
    fresh_database,
    percentile,
    positive,
    register,
    servers,
)
from bench.ledger_gen import GeneratedLedger, generate_ledger, verify_sample
from bench.retention import timed
from ledger.audit import export_bundle, verify_bundle
from ledger.events import PolicyViolation, body_of, new_event_id
from ledger.identity import SigningKey, b64encode
from ledger.postgres import PostgresEventStore, PostgresLedgerReader, partition_name
from ledger.postgres.reader import partition_ddl
from ledger.postgres.store import event_key
from ledger.signatures import make_executor
from ledger.signed import SignedEvent
from ledger.timefmt import format_time, utc_now
from projections.config import TrustConfig
from projections.documents import decode_grants_in
from projections.projector import Projector
from projections.readstore import Closure, ProjectionReader, read_closure
from projections.start import state_at_position
from projections.store_redis import RedisProjectionStore
from sidecar.policy import Action, RateLimiter, decide, parse_policy
from sidecar.trust import TrustSource

CONFIG = TrustConfig()
WITHIN = 0.20  # the big figure within 20 % of the small one
REBUILD_TARGET = 0.8  # rebuild events/s over raw read events/s
RETENTION_TARGET_S = 1.0
HOT_APPENDERS = 64
LIST_LIMIT = 100
POLICY = """\
version: 1
rules:
  - id: everyday-tools
    tools: ["search"]
    effect: allow
"""
# The ledger tables whose size is "the ledger on disk" (every partition of each).
SIDE_TABLES = (
    "event_ids",
    "merkle_nodes",
    "checkpoints",
    "streams",
    "agent_keys",
    "idempotency_keys",
    "ledger_head",
    "ledger_identity",
    "retention_anchors",
)


# -- what is measured, and how it is compared ----------------------------------------------


@dataclass(frozen=True)
class Measure:
    key: str
    label: str
    unit: str
    higher_is_better: bool | None  # None: context only, no target


MEASURES = (
    Measure("appends", "single-report appends, 1 per POST /v1/violations", "reports/s", True),
    Measure("appends_p99", "  … p99", "ms", False),
    Measure("health", "GET /health (context: machine load)", "req/s", None),
    Measure("trust", "GET /v1/agents/{did}/trust, cache off", "req/s", True),
    Measure("trust_p99", "  … p99", "ms", False),
    Measure("trust_health", "  … trust / health, same round", "x", True),
    Measure("appends_health", "  … appends / health, same round", "x", True),
    Measure("decide_miss_p50", "sidecar decision, trust-cache miss p50", "µs", False),
    Measure("decide_miss_p99", "  … p99", "µs", False),
    Measure(
        "decide_separate_p50",
        "  … as separate reads (baseline)",
        "µs",
        None,
    ),
    Measure("decide_granted_p50", "  … p50 of the agents with grants to them", "µs", False),
    Measure("decide_granted_separate_p50", "  … the same as separate reads (baseline)", "µs", None),
    Measure("decide_hit_p50", "sidecar decision, cache hit p50", "µs", False),
    Measure("list_p50", "GET /v1/agents deep full page p50", "ms", False),
    Measure("list_p99", "  … p99", "ms", False),
    Measure("at", "GET …/trust?at= agent with hot events", "ms", False),
    Measure("raw_read", "raw read of the ledger (baseline)", "events/s", None),
    Measure("rebuild", "projection rebuild into redis", "events/s", True),
    Measure("rebuild_ratio", "  … rebuild / raw read (target >= 0.8)", "x", True),
    Measure("document_bytes", "  … redis bytes per agent document", "B", False),
    Measure("export", "audit export (jsonl, with proofs)", "events/s", True),
    Measure("export_lines", "  … events + key entries written", "lines/s", True),
    Measure("verify", "offline verify (every signature)", "events/s", True),
    Measure("verify_lines", "  … events + key entries checked", "lines/s", True),
    Measure("keys", "  key entries in the bundle (its signers)", "entries", None),
    Measure("prune", "retention: one day's partition (target <= 1 s)", "s", False),
    Measure("forget", "  … one stale day of single-use ids and keys", "s", False),
    Measure("retention_total", "  … whole run incl. snapshot at the cut", "s", None),
    Measure("bytes", "disk bytes per event", "B", False),
)


@dataclass
class Size:
    events: int
    agents: int
    values: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(value)

    def median(self, key: str) -> float | None:
        found = self.values.get(key)
        return statistics.median(found) if found else None


def say(text: str) -> None:
    print(text, flush=True)


def label(events: int) -> str:
    if events >= 1_000_000 and events % 100_000 == 0:
        return f"{events / 1_000_000:g}M"
    if events >= 1000 and events % 1000 == 0:
        return f"{events // 1000}k"
    return f"{events:,}"


# -- building the ledger ---------------------------------------------------------------------


def first_midnight(days: int) -> datetime:
    """The midnight ``days`` days before today's: where the oldest partition starts."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=days)


async def fill_event_ids(url: str, ledger_did: str) -> int:
    """``event_ids`` as the write path keeps it: SHA-256(actor ‖ 0 ‖ event_id)[:16] per
    entry (``ledger.postgres.store.event_key``) on the UTC day the body occurred on
    (``ledger.authority.single_use_day``), computed in PostgreSQL, one partition per
    day; a sample is compared with ``event_key``. And ``idempotency_keys`` as a fleet
    of sidecars leaves them: one key per report an agent signed (``sidecar:<event_id>``,
    what ``sidecar.outbox`` sends), on the same day."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE TEMP TABLE fill AS SELECT position, actor, recorded_at, "
            "convert_from(body, 'UTF8')::jsonb ->> 'event_id' AS event_id, "
            "((convert_from(body, 'UTF8')::jsonb ->> 'occurred_at')::timestamptz "
            "AT TIME ZONE 'UTC')::date AS day FROM events"
        )
        for day in await conn.fetch("SELECT DISTINCT day FROM fill"):
            for table in ("event_ids", "idempotency_keys"):
                await conn.execute(partition_ddl(table, day["day"]))
        await conn.execute(
            "INSERT INTO event_ids (key, day, position) "
            "SELECT substring(sha256(convert_to(actor, 'UTF8') || '\\x00'::bytea || "
            "convert_to(event_id, 'UTF8')) from 1 for 16), day, position FROM fill"
        )
        await conn.execute(
            "INSERT INTO idempotency_keys (signer, key, day, first_position, count, stream_id, "
            "stream_version, digest, recorded_at) "
            "SELECT f.actor, 'sidecar:' || f.event_id, f.day, f.position, 1, e.stream_id, "
            "e.stream_version, sha256(e.body), f.recorded_at "
            "FROM fill f JOIN events e USING (position) "
            "WHERE f.actor <> $1",
            ledger_did,
        )
        await conn.execute("DROP TABLE fill")
        rows = await conn.fetch(
            "SELECT e.actor, e.body, i.key FROM events e JOIN event_ids i USING (position) "
            "ORDER BY random() LIMIT 100"
        )
        for row in rows:
            expected = event_key(row["actor"], json.loads(row["body"])["event_id"])
            if bytes(row["key"]) != expected:
                raise AssertionError(f"event_ids key differs from event_key for {row['actor']}")
        await conn.execute("VACUUM (ANALYZE) event_ids, idempotency_keys")
        return int(await conn.fetchval("SELECT count(*) FROM event_ids"))
    finally:
        await conn.close()


def self_report(key: SigningKey, tag: str) -> SignedEvent:
    """A sidecar's report of its own agent's blocked call (sidecar/denials.py)."""
    event = PolicyViolation(
        actor=key.did,
        occurred_at=format_time(datetime.now(UTC)),
        event_id=new_event_id(),
        agent=key.did,
        severity="low",
        rule="bench-rule",
        detail=f"blocked call {tag}",
    )
    return SignedEvent.create(event, key)


async def hot_appends(store: PostgresEventStore, key: SigningKey, count: int) -> float:
    """``count`` self-reports of one agent through ``PostgresEventStore.append`` (64
    appenders, one event per call); returns appends/s."""
    events = [self_report(key, f"hot-{i}") for i in range(count)]
    pending = iter(events)

    async def appender() -> None:
        for event in pending:
            await store.append([event])

    started = time.perf_counter()
    await asyncio.gather(*(appender() for _ in range(HOT_APPENDERS)))
    return count / (time.perf_counter() - started)


async def disk_bytes(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("VACUUM (ANALYZE)")
        found = {
            "events (all partitions, with indexes)": int(
                await conn.fetchval(
                    "SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('events')"
                )
            )
        }
        for table in SIDE_TABLES:  # event_ids and idempotency_keys: every partition too
            found[table] = int(
                await conn.fetchval(
                    "SELECT coalesce(sum(pg_total_relation_size(relid)), 0) "
                    "FROM pg_partition_tree($1::regclass)",
                    table,
                )
            )
        return found
    finally:
        await conn.close()


@dataclass
class Built:
    url: str
    name: str
    ledger: GeneratedLedger
    hot: SigningKey
    generated_head: int
    head: int
    oldest_day: datetime


async def build(args: argparse.Namespace, server_url: str, size: Size) -> Built:
    url, name = await fresh_database(server_url, "scale_")
    oldest = first_midnight(args.days)
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)  # as ledger_gen
    days = (end - oldest).total_seconds() / 86_400
    started = time.perf_counter()
    generated = await generate_ledger(
        url, events=size.events - args.hot_events, agents=size.agents, days=days
    )
    say(
        f"  generated {generated.head_position:,} events in {generated.seconds:,.1f} s "
        f"({generated.head_position / generated.seconds:,.0f}/s, signed on "
        f"{generated.sign_workers} processes, chained and COPYed): "
        f"{len(generated.agents):,} agents, {generated.grants:,} grants, "
        f"{generated.checkpoints:,} checkpoints, recorded_at over {days:.2f} days"
    )
    step = time.perf_counter()
    ids = await fill_event_ids(url, generated.ledger_key.did)
    say(f"  event_ids filled: {ids:,} keys in {time.perf_counter() - step:,.1f} s")
    step = time.perf_counter()
    store = await PostgresEventStore.open(url, generated.ledger_key)
    try:
        say(f"  Merkle tree built at first open in {time.perf_counter() - step:,.1f} s")
        hot = SigningKey.generate()
        await register(store, hot)
        rate = await hot_appends(store, hot, args.hot_events)
        say(
            f"  hot agent: {args.hot_events:,} self-reports appended through "
            f"PostgresEventStore.append at {rate:,.0f}/s"
        )
        await store.checkpoint()
        head = (await store.head()).position
    finally:
        await store.close()
    say(f"  verified: {await verify_sample(url, generated)}")
    total = time.perf_counter() - started
    size.notes.append(f"built in {total:,.0f} s")
    say(f"  ledger ready: {head:,} events in {total:,.1f} s")
    return Built(url, name, generated, hot, generated.head_position, head, oldest)


# -- rebuild -----------------------------------------------------------------------------------


async def raw_read(url: str, head: int) -> float:
    reader = await PostgresLedgerReader.connect(url)
    try:
        count, started = 0, time.perf_counter()
        async for _ in reader.iter_entries(after=0, batch=10_000):
            count += 1
        elapsed = time.perf_counter() - started
    finally:
        await reader.close()
    assert count == head, f"read {count} entries of {head}"
    return count / elapsed


async def rebuild(url: str, host: str, port: int, prefix: str, head: int) -> tuple[float, float]:
    """The rebuild's events/s, and the bytes Redis holds per agent document it wrote
    (``MEMORY USAGE`` of the generation's document hash, every field counted)."""
    reader = await PostgresLedgerReader.connect(url)
    store = RedisProjectionStore.connect(host, port, prefix=prefix)
    try:
        started = time.perf_counter()
        progress = await Projector(reader, store, CONFIG).rebuild()
        elapsed = time.perf_counter() - started
    finally:
        await store.close()
        await reader.close()
    assert progress.state.position == head, progress.state.position
    client = redis.Redis(host=host, port=port)
    try:
        documents = f"{prefix}g:{progress.generation}:agents"
        held = await client.memory_usage(documents, samples=0)
        count = await client.hlen(documents)
    finally:
        await client.aclose()
    assert held is not None, f"no documents at {documents}"
    assert count, f"no documents at {documents}"
    return head / elapsed, held / count


async def rebuild_figures(
    args: argparse.Namespace, built: Built, host: str, port: int, prefix: str, size: Size
) -> None:
    rounds = args.repeat if size.events < args.events else args.big_rebuild_repeat or args.repeat
    if rounds != args.repeat:
        size.notes.append(f"rebuild and raw read: {rounds} round(s)")
    for number in range(1, rounds + 1):
        read = await raw_read(built.url, built.head)
        rate, per_agent = await rebuild(built.url, host, port, prefix, built.head)
        size.add("raw_read", read)
        size.add("rebuild", rate)
        size.add("rebuild_ratio", rate / read)
        size.add("document_bytes", per_agent)
        say(
            f"  round {number}: raw read {read:,.0f} events/s, rebuild into redis "
            f"{rate:,.0f} events/s ({rate / read:.2f}x); {per_agent:,.0f} B of redis "
            "per agent document"
        )


# -- HTTP --------------------------------------------------------------------------------------


WRK_LUA = """
local requests = {}
local json = {["Content-Type"] = "application/json"}
for line in io.lines(%s) do
  local method, path, body = line:match("^(%%u+) (%%S+) ?(.*)$")
  if body == "" then
    requests[#requests + 1] = wrk.format(method, path)
  else
    requests[#requests + 1] = wrk.format(method, path, json, body)
  end
end
local n = 0
request = function()
  n = n + 1
  return requests[((n - 1) %% #requests) + 1]
end
""" + WRK_SCRIPT.split("end\n", 1)[1]


async def closed_loop(
    port: int,
    lines: list[str],
    connections: int,
    seconds: float,
    workdir: Path,
    threads: int = 2,
) -> Load:
    """Each of ``lines`` ("METHOD PATH [BODY]") in turn on ``connections`` keep-alive
    connections, each sending its next request when its answer is in: wrk when it is on
    PATH, else an asyncio client in this process."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return await python_loop(port, lines, connections, seconds)
    data = workdir / f"requests-{uuid.uuid4().hex[:8]}.txt"
    script = workdir / f"wrk-{uuid.uuid4().hex[:8]}.lua"
    data.write_text("\n".join(lines) + "\n")
    script.write_text(WRK_LUA % json.dumps(str(data)))
    try:
        return await WrkClient(wrk, threads, workdir).run_script(port, script, connections, seconds)
    finally:
        data.unlink(missing_ok=True)


def as_request(port: int, line: str) -> bytes:
    method, path, *rest = line.split(" ", 2)
    return http_request(port, method, path, rest[0].encode() if rest else None)


async def python_loop(port: int, lines: list[str], connections: int, seconds: float) -> Load:
    requests = [as_request(port, line) for line in lines]
    conns = [await HttpConnection.open(port) for _ in range(connections)]
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(index: int, conn: HttpConnection) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            status, _ = await conn.exchange(requests[index % len(requests)])
            latencies.append(time.perf_counter() - started)
            errors += status >= 300
            index += connections

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker(i, c) for i, c in enumerate(conns)))
    finally:
        elapsed = time.perf_counter() - started
        await asyncio.gather(*(c.close() for c in conns))
    latencies.sort()
    return Load(
        rate=len(latencies) / elapsed,
        p50_ms=percentile(latencies, 0.5) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        errors=errors,
        requests=len(latencies),
    )


def report_lines(agents: list[SigningKey], count: int, tag: str) -> list[str]:
    """``POST /v1/violations`` request lines: one agent-signed self-report each (with
    its idempotency key), signed before timing (the client's work)."""
    lines = []
    for index in range(count):
        key = agents[index % len(agents)]
        signed = self_report(key, f"{tag}-{index}")
        body = body_of(signed.event)
        report = {
            "body": body,
            "signature": b64encode(signed.signature),
            "idempotency_key": f"{tag}-{index}",
        }
        lines.append("POST /v1/violations " + msgspec.json.encode(report).decode())
    return lines


async def latencies(port: int, paths: list[str], count: int) -> list[float]:
    """``count`` GETs of ``paths`` in turn on one keep-alive connection: seconds each."""
    conn = await HttpConnection.open(port)
    found: list[float] = []
    try:
        for index in range(count):
            path = paths[index % len(paths)]
            started = time.perf_counter()
            status, raw = await conn.exchange(http_request(port, "GET", path))
            found.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"GET {path} answered {status}: {raw[:300]!r}")
    finally:
        await conn.close()
    return sorted(found)


async def http_figures(
    args: argparse.Namespace,
    built: Built,
    host: str,
    port: int,
    prefix: str,
    root: Path,
    size: Size,
) -> None:
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    stack = Stack(
        built.url, host, port, prefix, built.ledger.ledger_key, secrets.token_hex(16), logs
    )
    stack.cache = False
    for attempt in range(3):  # start_api waits 90 s; a busy machine can take longer
        try:
            api, api_port = await start_api(stack, args.workers)
            break
        except RuntimeError as exc:
            say(f"  the API did not start (attempt {attempt + 1}): {str(exc)[-500:]}")
    else:
        raise RuntimeError("the API did not start in three attempts")
    try:
        await http_measures(args, built, api, api_port, root, size)
    finally:
        api.stop()


async def http_measures(
    args: argparse.Namespace,
    built: Built,
    api: Service,
    port: int,
    root: Path,
    size: Size,
) -> None:
    rng = random.Random(5)
    agents = built.ledger.agents
    dids = [a.did for a in agents]
    trust_lines = [f"GET /v1/agents/{d}/trust" for d in rng.sample(dids, len(dids))]
    ordered = sorted(dids)
    # Deep cursors that still leave a full page after them: at both sizes a page lists
    # LIST_LIMIT agents (90-99 % deep in 1,000 agents left 10-99, half a page on average).
    high = max(len(ordered) - LIST_LIMIT, 1)
    deep = ordered[max(high - len(ordered) // 10, 0) : high]
    list_paths = [f"/v1/agents?limit={LIST_LIMIT}&cursor={d}" for d in rng.sample(deep, len(deep))]
    moment = format_time(datetime.now(UTC))
    at_path = f"/v1/agents/{built.hot.did}/trust?at={moment}"
    reporters = agents[:1000]
    conc, conns, seconds = args.concurrency, args.report_connections, args.duration
    # Warm the server (and its connection pools) first: not measured.
    await closed_loop(port, trust_lines, conc, min(seconds, 2), root)
    for number in range(1, args.repeat + 1):
        api.check()
        gets = [("health", ["GET /health"]), ("trust", trust_lines)]
        for name, lines in gets if number % 2 else gets[::-1]:
            load = await closed_loop(port, lines, conc, seconds, root)
            size.add(name, load.rate)
            if name == "trust":
                size.add("trust_p99", load.p99_ms)
            say(
                f"  round {number} {name:8} {load.rate:9,.0f} req/s  p50 {load.p50_ms:6.2f} ms  "
                f"p99 {load.p99_ms:6.2f} ms  errors {load.errors}"
            )
        bodies = report_lines(reporters, round(args.max_report_rate * seconds), f"r{number}")
        load = await closed_loop(port, bodies, conns, seconds, root, threads=1)
        size.add("appends", load.rate)
        size.add("appends_p99", load.p99_ms)
        # The same round's /health: what is left of a ratio once the machine's load is out.
        size.add("trust_health", size.values["trust"][-1] / size.values["health"][-1])
        size.add("appends_health", load.rate / size.values["health"][-1])
        wrapped = " (more requests than bodies: raise --max-report-rate)" * (
            load.requests > len(bodies)
        )
        say(
            f"  round {number} appends  {load.rate:9,.0f} /s     p50 {load.p50_ms:6.2f} ms  "
            f"p99 {load.p99_ms:6.2f} ms  errors {load.errors}{wrapped}"
        )
        listed = await latencies(port, list_paths, args.samples)
        size.add("list_p50", percentile(listed, 0.5) * 1000)
        size.add("list_p99", percentile(listed, 0.99) * 1000)
        at = await latencies(port, [at_path], args.at_samples)
        size.add("at", statistics.median(at) * 1000)
        say(
            f"  round {number} listing p50 {percentile(listed, 0.5) * 1000:.2f} ms "
            f"p99 {percentile(listed, 0.99) * 1000:.2f} ms ({len(listed)} pages of "
            f"{LIST_LIMIT}); ?at= median {statistics.median(at) * 1000:,.1f} ms "
            f"({len(at)} requests)"
        )


# -- the sidecar's per-call trust lookup ----------------------------------------------------


class _SeparateReads:
    """The read store as a sidecar's miss read it before ``agent_closure`` (until
    2026-12-01): the agent's document, then the grants to it, their ancestors and
    their delegators' documents, each its own round trip."""

    def __init__(self, store: RedisProjectionStore) -> None:
        self.store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def agent_closure(self, did: str) -> Closure | None:
        return await read_closure(did, self.store.agent_docs, self.store.grant_docs)


async def sidecar_figures(
    args: argparse.Namespace, built: Built, host: str, port: int, prefix: str, size: Size
) -> None:
    """Per agent: a fresh ``TrustSource`` (what a sidecar holds) answers ``current()``
    from Redis (a miss: one read of the store, ``agent_closure``), then ``decide``;
    then the same again from its cache (a hit); then the miss as separate reads (the
    baseline). Agents with grants to them are also reported apart."""
    store = RedisProjectionStore.connect(host, port, prefix=prefix)
    reader = ProjectionReader(store, CONFIG)
    separate = ProjectionReader(_SeparateReads(store), CONFIG)
    policy = parse_policy(POLICY, "bench", "standard", False)
    action = Action("tool", "search")
    rng = random.Random(11)
    agents = [a.did for a in built.ledger.agents]
    try:
        for number in range(1, args.repeat + 1):
            misses: list[float] = []
            hits: list[float] = []
            apart: list[float] = []
            granted: list[float] = []
            granted_apart: list[float] = []
            reasons: collections.Counter[str] = collections.Counter()
            for did in rng.sample(agents, min(args.samples, len(agents))):
                limiter = RateLimiter()
                source = TrustSource(reader, did, utc_now)
                started = time.perf_counter()
                trust = await source.current()
                decision = decide(policy, action, trust, did, limiter, time.monotonic())
                middle = time.perf_counter()
                trust = await source.current()
                decide(policy, action, trust, did, limiter, time.monotonic())
                misses.append(middle - started)
                hits.append(time.perf_counter() - middle)
                reasons[decision.reason] += 1
                # The baseline: the same miss and decision through separate reads.
                source = TrustSource(separate, did, utc_now)
                started = time.perf_counter()
                trust = await source.current()
                baseline = decide(policy, action, trust, did, RateLimiter(), time.monotonic())
                apart.append(time.perf_counter() - started)
                if trust is None:
                    raise SystemExit(f"scale: {did} is not in the read store (--only rebuild,…)")
                if baseline.reason != decision.reason:
                    raise SystemExit(f"scale: {did}: the reads decided {decision} and {baseline}")
                (raw,) = await store.agent_docs([did])
                if raw is not None and decode_grants_in(raw):
                    granted.append(misses[-1])
                    granted_apart.append(apart[-1])
            for series in (misses, hits, apart, granted, granted_apart):
                series.sort()
            size.add("decide_miss_p50", percentile(misses, 0.5) * 1e6)
            size.add("decide_miss_p99", percentile(misses, 0.99) * 1e6)
            size.add("decide_separate_p50", percentile(apart, 0.5) * 1e6)
            size.add("decide_hit_p50", percentile(hits, 0.5) * 1e6)
            if granted:
                size.add("decide_granted_p50", percentile(granted, 0.5) * 1e6)
                size.add("decide_granted_separate_p50", percentile(granted_apart, 0.5) * 1e6)
            say(
                f"  round {number} sidecar decision: miss p50 {percentile(misses, 0.5) * 1e6:,.0f} "
                f"µs p99 {percentile(misses, 0.99) * 1e6:,.0f} µs (as separate reads: p50 "
                f"{percentile(apart, 0.5) * 1e6:,.0f} µs); {len(granted)} agents with grants: "
                f"p50 {percentile(granted, 0.5) * 1e6 if granted else 0:,.0f} µs (separate "
                f"{percentile(granted_apart, 0.5) * 1e6 if granted else 0:,.0f} µs); hit p50 "
                f"{percentile(hits, 0.5) * 1e6:,.1f} µs (decisions: "
                f"{', '.join(f'{n} {r}' for r, n in reasons.most_common())})"
            )
    finally:
        await store.close()


# -- audit -----------------------------------------------------------------------------------


async def audit_figures(args: argparse.Namespace, built: Built, root: Path, size: Size) -> None:
    count = min(args.export_events, built.generated_head)
    first = built.generated_head - count + 1
    path = root / "scale-bundle.jsonl"
    reader = await PostgresLedgerReader.connect(built.url)
    try:
        low = await reader.pool.fetchval(
            "SELECT recorded_at FROM events WHERE position = $1", first
        )
        high = await reader.pool.fetchval(
            "SELECT recorded_at FROM events WHERE position = $1", built.generated_head
        )
        for number in range(1, args.repeat + 1):
            started = time.perf_counter()
            with path.open("w", encoding="utf-8") as handle:
                manifest = await export_bundle(
                    reader,
                    built.ledger.ledger_key,
                    handle,
                    start=low,
                    end=high + timedelta(microseconds=1),
                )
            elapsed = time.perf_counter() - started
            rate = manifest.count / elapsed
            assert manifest.count == count, manifest
            size.add("export", rate)
            size.add("export_lines", (manifest.count + manifest.keys) / elapsed)
            size.add("keys", manifest.keys)
            say(
                f"  round {number} export {rate:,.0f} events/s ({count:,} events and "
                f"{manifest.keys:,} key entries: {(count + manifest.keys) / elapsed:,.0f} lines/s)"
            )
    finally:
        await reader.close()
    workers = os.cpu_count() or 1
    executor = make_executor(workers)
    try:
        list(executor.map(abs, range(2 * workers)))  # every worker started first
        for number in range(1, args.repeat + 1):
            started = time.perf_counter()
            report = await asyncio.to_thread(verify_bundle, path, executor=executor)
            elapsed = time.perf_counter() - started
            rate = report.events / elapsed
            assert report.events == count, report
            size.add("verify", rate)
            size.add("verify_lines", (report.events + report.keys) / elapsed)
            say(
                f"  round {number} offline verify {rate:,.0f} events/s "
                f"({(report.events + report.keys) / elapsed:,.0f} lines/s, key entries included)"
            )
    finally:
        executor.shutdown()
        path.unlink(missing_ok=True)


# -- retention ---------------------------------------------------------------------------------


async def retention_figures(built: Built, size: Size) -> None:
    """Cut at the end of the oldest day: its whole partition goes (one run: it removes)."""
    key = built.ledger.ledger_key
    store = await PostgresEventStore.open(built.url, key)
    phases: dict[str, float] = {}
    real = (retention._anchor, retention._prune)
    retention._anchor = timed(phases, "anchor", retention._anchor)  # type: ignore[assignment]
    retention._prune = timed(phases, "prune", retention._prune)  # type: ignore[assignment]
    try:
        cut = built.oldest_day + timedelta(days=1)
        plan = await retention.plan_retention(store, key.public, cut + timedelta(days=1), 1)
        day = partition_name(built.oldest_day)
        if plan.drop != [day] or plan.straddling:
            raise RuntimeError(f"expected to drop {day} alone: {plan.drop}, {plan.straddling}")
        rows = await store.pool.fetchval(f"SELECT count(*) FROM {day}")  # noqa: S608 -- a partition name
        # The single-use ids and idempotency keys of stale days (over 8 days old: a ledger
        # generated over more days has them) are dropped apart below, so that the run is
        # the same work at every --days: a daily run drops a day or two of them.
        tables = ("event_ids", "idempotency_keys")
        single_use = [partition_name(built.oldest_day, table) for table in tables]
        stale = [name for name in plan.stale if name not in single_use]
        plan = dataclasses.replace(plan, stale=[])

        async def snapshot_at(position: int) -> dict[str, Any]:
            return (await state_at_position(store, CONFIG, position)).snapshot()

        started = time.perf_counter()
        await retention.apply_retention(store, key, plan, snapshot_at, datetime.now(UTC))
        total = time.perf_counter() - started
        # The same day's single-use ids and idempotency keys, as a run drops them once
        # they are stale (8 days on).
        keys = 0
        for name in single_use:
            keys += await store.pool.fetchval(f"SELECT count(*) FROM {name}")  # noqa: S608
        started = time.perf_counter()
        await store.retention_store().drop_partitions(single_use)
        forget = time.perf_counter() - started
        started = time.perf_counter()
        await store.retention_store().drop_partitions(stale)
        if stale:
            say(
                f"  retention: {len(stale)} other stale single-use partitions dropped in "
                f"{time.perf_counter() - started:.2f} s (once; a daily run drops a day's)"
            )
    finally:
        retention._anchor, retention._prune = real
        await store.close()
    size.add("prune", phases["prune"])
    size.add("forget", forget)
    size.add("retention_total", total)
    say(
        f"  retention: partition {day} ({rows:,} events) pruned in {phases['prune']:.3f} s; "
        f"snapshot + anchor {phases['anchor']:.1f} s; whole run {total:.1f} s; that day's "
        f"single-use ids and keys ({keys:,} rows) dropped in {forget:.3f} s"
    )


# -- one size, then the table -----------------------------------------------------------------


async def one_size(
    args: argparse.Namespace, server_url: str, host: str, port: int, root: Path, size: Size
) -> None:
    say(f"\n== {label(size.events)} events, {size.agents:,} agents ==")
    free = shutil.disk_usage(root).free
    need = size.events * 1500
    if free < need:
        raise SystemExit(f"{root}: {free / 1e9:.1f} GB free, about {need / 1e9:.1f} GB needed")
    prefix = f"scale{uuid.uuid4().hex[:8]}:"
    built = await build(args, server_url, size)
    try:
        found = await disk_bytes(built.url)
        total = sum(found.values())
        size.add("bytes", total / built.head)
        parts = ", ".join(f"{k} {v / built.head:,.0f}" for k, v in found.items() if v >= built.head)
        say(f"  disk: {total / 1e9:,.2f} GB, {total / built.head:,.0f} B/event ({parts})")
        # A phase that fails is reported and the run goes on: a 10M build is too dear
        # to lose to one refused connection.
        phases: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("rebuild", lambda: rebuild_figures(args, built, host, port, prefix, size)),
            ("http", lambda: http_figures(args, built, host, port, prefix, root, size)),
            ("sidecar", lambda: sidecar_figures(args, built, host, port, prefix, size)),
            ("audit", lambda: audit_figures(args, built, root, size)),
            ("retention", lambda: retention_figures(built, size)),
        ]
        for name, phase in phases:
            if args.only and name not in args.only:
                continue
            try:
                await phase()
            except Exception as exc:  # reported; the other phases still run
                say(f"  {name} FAILED: {type(exc).__name__}: {str(exc)[-2000:]}")
                size.notes.append(f"{name} failed ({type(exc).__name__})")
    finally:
        store = RedisProjectionStore.connect(host, port, prefix=prefix)
        await store.flush_for_tests()
        await store.close()
        await drop_database(server_url, built.name)


def within(measure: Measure, small: float, big: float) -> str:
    if measure.higher_is_better is None:
        return "—"
    if measure.higher_is_better:
        return "met" if big >= (1 - WITHIN) * small else "NOT met"
    return "met" if big <= (1 + WITHIN) * small else "NOT met"


def cell(value: float | None) -> str:
    return "—" if value is None else f"{value:,.2f}"


def table(args: argparse.Namespace, small: Size, big: Size) -> None:
    a, b = label(small.events), label(big.events)
    say(
        f"\nscale run: {a} events / {small.agents:,} agents vs {b} events / {big.agents:,} "
        f"agents; medians of {args.repeat} round(s); cores: {os.cpu_count()}"
    )
    say(f"{'measure':50} {'unit':>9} {a:>11} {b:>11} {b + '/' + a:>9} {'within 20 %':>11}")
    for m in MEASURES:
        s, g = small.median(m.key), big.median(m.key)
        if s is None and g is None:
            continue
        ratio = f"{g / s:9.2f}" if s and g is not None else f"{'—':>9}"
        verdict = within(m, s, g) if s is not None and g is not None else "not measured"
        say(f"{m.label:50} {m.unit:>9} {cell(s):>11} {cell(g):>11} {ratio} {verdict:>11}")
    for size in (small, big):
        rebuilt, prune = size.median("rebuild_ratio"), size.median("prune")
        verdicts = []
        if rebuilt is not None:
            met = "met" if rebuilt >= REBUILD_TARGET else "NOT met"
            verdicts.append(f"rebuild {rebuilt:.2f}x raw read (target >= {REBUILD_TARGET}): {met}")
        if prune is not None:
            met = "met" if prune <= RETENTION_TARGET_S else "NOT met"
            verdicts.append(
                f"retention of one day {prune:.3f} s (target <= {RETENTION_TARGET_S:g} s): {met}"
            )
        say(f"{label(size.events)}: {'; '.join(verdicts + size.notes) or 'not measured'}")


async def run(args: argparse.Namespace, server_url: str, host: str, port: int, root: Path) -> None:
    ratio = args.agents / args.events
    small = Size(args.small_events, max(2, round(args.small_events * ratio)))
    big = Size(args.events, args.agents)
    say(
        f"cores: {os.cpu_count()}; sizes: {label(small.events)} and {label(big.events)} events; "
        f"hot agent: {args.hot_events:,} events; {args.days} days of recorded_at; "
        f"rounds: {args.repeat}; HTTP measures {args.duration:g} s each, "
        f"serve api --workers {args.workers}"
    )
    started = time.perf_counter()
    try:
        for size in (small, big):
            await one_size(args, server_url, host, port, root, size)
    finally:  # an interrupted run still prints what it measured
        table(args, small, big)
        say(f"\nwhole run: {(time.perf_counter() - started) / 60:,.1f} min")


def main(args: argparse.Namespace) -> None:
    if args.quick:
        args.events, args.agents = 200_000, 2000
        args.duration, args.samples = min(args.duration, 3.0), min(args.samples, 500)
    if args.hot_events >= args.small_events:
        raise SystemExit("--hot-events must be below --small-events")
    root = Path(tempfile.mkdtemp(prefix="agentmesh-scale-"))
    try:
        with servers(root) as (server_url, host, port):
            asyncio.run(run(args, server_url, host, port, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parse.add_argument("--events", type=positive, default=10_000_000, help="the big size")
    parse.add_argument("--agents", type=positive, default=100_000, help="agents at the big size")
    parse.add_argument("--small-events", type=positive, default=100_000, help="the small size")
    parse.add_argument(
        "--days", type=positive, default=90, help="days of recorded_at (90: the retention window)"
    )
    parse.add_argument("--hot-events", type=positive, default=10_000)
    parse.add_argument("--repeat", type=positive, default=3)
    parse.add_argument("--duration", type=float, default=10.0, help="seconds per HTTP load")
    parse.add_argument("--concurrency", type=positive, default=32, help="trust-read connections")
    parse.add_argument("--report-connections", type=positive, default=64)
    parse.add_argument("--max-report-rate", type=positive, default=4000, help="bodies signed/s")
    parse.add_argument(
        "--big-rebuild-repeat", type=int, default=0, help="rebuild rounds at --events (--repeat)"
    )
    parse.add_argument("--workers", type=positive, default=1, help="serve api --workers")
    parse.add_argument("--samples", type=positive, default=2000, help="listing pages, decisions")
    parse.add_argument("--at-samples", type=positive, default=5, help="?at= requests per round")
    parse.add_argument("--export-events", type=positive, default=50_000)
    parse.add_argument("--quick", action="store_true", help="--events 200000 --agents 2000 …")
    parse.add_argument(
        "--only",
        type=lambda text: set(text.split(",")),
        default=set(),
        metavar="PHASES",
        help="measure only these phases (comma-separated: rebuild, http, sidecar, audit, "
        "retention); the build and disk bytes always run",
    )
    return parse


if __name__ == "__main__":
    end_on_sigterm()
    with contextlib.suppress(KeyboardInterrupt):
        main(parser().parse_args())
