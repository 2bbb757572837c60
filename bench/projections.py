"""Projection rebuild throughput and projection lag, each beside a baseline.

Prints, from one run (medians of ``--repeat`` rounds):
  * events/s of a full rebuild — ``Projector(reader, store, TrustConfig()).rebuild()``:
    read the ledger, fold, write a fresh generation, swap — into each read
    store (redis, postgres, memory) and into a null store (read + fold +
    documents, nothing written), over a generated ledger of ``--events``
    events; baseline: the raw read of the same events
    (``PostgresLedgerReader.iter_entries``, batch 10,000, no fold), as the ratio
    of the medians and as the median of each round's ratio (a round runs every
    measure back to back: load that drifts between rounds cancels); target:
    the rebuild into redis at >= 0.8x the raw read; beside it, the raw read of
    the bodies alone (``read_bodies``: what the rebuild itself reads, the
    cheapest read of the same events), whose ratio the rebuild's fold decides;
  * the registry page (``GET /v1/agents?cursor=…&limit=100`` without the HTTP
    server: ``ProjectionReader.agents`` and the response encoded) p50/p99 for
    cursors 90-99 % deep in the DID order (as ``bench/scale.py``) and 0-50 %
    deep (full pages); baseline: the store's page read alone (p50);
  * projection lag p50/p99 — from ``PostgresEventStore.append`` returning
    (committed) to the read store announcing a position at or past the
    event's (its change notification, published after the write is visible)
    — while appending 1,000 events/s for ``--lag-seconds``, with the
    projector as an ``agentmesh serve projector`` process (redis, postgres)
    and inside this process (redis); baseline: a bare ``store.meta()`` round
    trip (p50); with /proc, the projector process's CPU per event appended (the
    live tail's cost: a few events per wake-up).

The ledger is written in bulk by ``bench/ledger_gen.py`` (real signatures,
real chain; a sample is verified and the result printed), once per run.

Usage: .venv/bin/python bench/projections.py [--events 1000000] [--agents 1000]
           [--repeat 3] [--lag-seconds 20] [--listing-samples 1000] [--profile]
Uses AGENTMESH_DATABASE_URL (a fresh database is created on that server) and
AGENTMESH_REDIS_HOST/AGENTMESH_REDIS_PORT when set, else embedded servers.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import cProfile
import io
import os
import pstats
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec

import api.schemas as schemas
from bench.common import drop_database, end_on_sigterm, fresh_database, servers
from bench.ledger_gen import GeneratedLedger, generate_ledger, verify_sample
from ledger.events import PolicyViolation, TrustSignal
from ledger.postgres import PostgresEventStore, PostgresLedgerReader
from ledger.signed import SignedEvent
from ledger.timefmt import format_time
from projections.config import TrustConfig
from projections.documents import Batch
from projections.leader_postgres import project_while_leader
from projections.projector import Projector
from projections.readstore import SUBSCRIBED, ProjectionReader, ProjectionStore
from projections.store_memory import MemoryProjectionStore
from projections.store_postgres import PostgresProjectionStore
from projections.store_redis import RedisProjectionStore

RATE = 1000  # appends per second during the lag measurement
REBUILD_TARGET = 0.8  # rebuild into redis over the raw read, events/s
LIST_LIMIT = 100  # agents per registry page, as bench/scale.py asks
CONFIG = TrustConfig()


class NullProjectionStore(MemoryProjectionStore):
    """Keeps nothing: a rebuild into it costs the read, the fold and the documents."""

    name = "null"

    async def replace_all(self, batch: Batch) -> None:
        return None


@dataclass
class Context:
    url: str
    redis_host: str
    redis_port: int
    prefix: str
    root: Path
    ledger: GeneratedLedger

    async def store(self, backend: str) -> ProjectionStore:
        if backend == "redis":
            return RedisProjectionStore.connect(
                self.redis_host, self.redis_port, prefix=self.prefix
            )
        if backend == "postgres":
            # "default": the store name `agentmesh serve projector` uses.
            return await PostgresProjectionStore.connect(self.url, "default")
        if backend == "memory":
            return MemoryProjectionStore()
        return NullProjectionStore()


# -- servers ------------------------------------------------------------------------


# -- rebuild ------------------------------------------------------------------------


async def raw_read(ctx: Context) -> float:
    """Baseline: stream every entry from PostgreSQL, fold nothing."""
    reader = await PostgresLedgerReader.connect(ctx.url)
    try:
        count, start = 0, time.perf_counter()
        async for _ in reader.iter_entries(after=0, batch=10_000):
            count += 1
        elapsed = time.perf_counter() - start
    finally:
        await reader.close()
    assert count == ctx.ledger.head_position, f"read {count} entries"
    return count / elapsed


async def raw_bodies(ctx: Context) -> float:
    """The cheapest read of the same events: bodies alone (``read_bodies``, batch
    10,000, what the rebuild itself reads), fold nothing."""
    reader = await PostgresLedgerReader.connect(ctx.url)
    try:
        count, after, start = 0, 0, time.perf_counter()
        while rows := await reader.read_bodies(after, 10_000):
            count += len(rows)
            after = rows[-1].position
        elapsed = time.perf_counter() - start
    finally:
        await reader.close()
    assert count == ctx.ledger.head_position, f"read {count} bodies"
    return count / elapsed


async def rebuild(ctx: Context, backend: str, profile: cProfile.Profile | None = None) -> float:
    reader = await PostgresLedgerReader.connect(ctx.url)
    store = await ctx.store(backend)
    try:
        projector = Projector(reader, store, CONFIG)
        start = time.perf_counter()
        if profile is not None:
            profile.enable()
        progress = await projector.rebuild()
        if profile is not None:
            profile.disable()
        elapsed = time.perf_counter() - start
    finally:
        await store.close()
        await reader.close()
    assert progress.state.position == ctx.ledger.head_position
    return ctx.ledger.head_position / elapsed


async def rebuild_figures(ctx: Context, repeat: int) -> None:
    runs: dict[str, Callable[[], Awaitable[float]]] = {
        "raw read, batch 10,000 (baseline)": lambda: raw_read(ctx),
        "raw read of the bodies alone": lambda: raw_bodies(ctx),
        "rebuild into null store (no write)": lambda: rebuild(ctx, "null"),
        "rebuild into memory": lambda: rebuild(ctx, "memory"),
        "rebuild into redis": lambda: rebuild(ctx, "redis"),
        "rebuild into postgres": lambda: rebuild(ctx, "postgres"),
    }
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):  # rounds interleave the measures, so drift hits all alike
        for name, run in runs.items():
            rates[name].append(await run())
    medians = {name: statistics.median(values) for name, values in rates.items()}
    raw = next(iter(rates.values()))
    baseline = next(iter(medians.values()))
    # Each round's rate over the raw read of the same round, then their median: on a
    # shared machine the load drifts between rounds, and a round's measures run
    # back to back.
    paired = {
        name: statistics.median(r / b for r, b in zip(values, raw, strict=True))
        for name, values in rates.items()
    }
    print(f"\nrebuild, {ctx.ledger.head_position:,} events, median of {repeat}")
    print(f"{'measure':40} {'events/s':>10} {'s':>7} {'x raw read':>11} {'x same round':>13}")
    for name, rate in medians.items():
        seconds = ctx.ledger.head_position / rate
        print(
            f"{name:40} {rate:10,.0f} {seconds:7.1f} {rate / baseline:11.3f} {paired[name]:13.3f}"
        )
    ratio = medians["rebuild into redis"] / baseline
    met = "met" if ratio >= REBUILD_TARGET else "NOT met"
    print(
        f"target: rebuild into redis >= {REBUILD_TARGET}x the raw read: {ratio:.2f}x, {met} "
        f"(round by round: {paired['rebuild into redis']:.2f}x)"
    )


# -- registry listing ---------------------------------------------------------------


async def listing_figures(ctx: Context, samples: int) -> None:
    """``GET /v1/agents?cursor=…&limit=100`` without the HTTP server: the page read
    (``store.agent_page``, the baseline), then what the route does with it
    (``ProjectionReader.agents`` and the response encoded), for cursors 90-99 % deep
    in the DID order (as ``bench/scale.py``: the last pages may be short) and 0-50 %
    deep (always full pages), from the Redis projection a rebuild wrote."""
    store = RedisProjectionStore.connect(ctx.redis_host, ctx.redis_port, prefix=ctx.prefix)
    try:
        reader = await PostgresLedgerReader.connect(ctx.url)
        try:
            await Projector(reader, store, CONFIG).rebuild()
        finally:
            await reader.close()
        ordered = sorted(a.did for a in ctx.ledger.agents)
        n = len(ordered)
        low = int(0.9 * n)
        sets = {
            "cursor 90-99 % deep": ordered[low : max(int(0.99 * n), low + 1)],
            "cursor 0-50 % deep (full pages)": ordered[: max(n // 2, 1)],
        }
        print(f"\nregistry page of {LIST_LIMIT}, {n:,} agents, {samples:,} pages each")
        print(f"{'measure':34} {'agents':>6} {'read p50':>9} {'page p50':>9} {'page p99':>9}")
        rng = random.Random(5)
        for name, cursors in sets.items():
            reads, pages, items = await _pages(store, [rng.choice(cursors) for _ in range(samples)])
            print(
                f"{name:34} {statistics.mean(items):6.1f} {percentile(reads, 50) * 1e3:6.2f} ms "
                f"{percentile(pages, 50) * 1e3:6.2f} ms {percentile(pages, 99) * 1e3:6.2f} ms"
            )
    finally:
        await store.close()


async def _pages(
    store: RedisProjectionStore, cursors: list[str]
) -> tuple[list[float], list[float], list[int]]:
    reader = ProjectionReader(store, CONFIG)
    reads, pages, items = [], [], []
    for cursor in cursors:
        started = time.perf_counter()
        await store.agent_page(cursor, LIST_LIMIT)
        middle = time.perf_counter()
        now = datetime.now(UTC)
        page = await reader.agents(now, after=cursor, limit=LIST_LIMIT)
        at = format_time(now)
        out = schemas.AgentPageOut(
            items=[schemas.summary_out(a, at) for a in page.agents], next_cursor=page.next_cursor
        )
        msgspec.json.encode(out)
        pages.append(time.perf_counter() - middle)
        reads.append(middle - started)
        items.append(len(page.agents))
    return sorted(reads), sorted(pages), items


def print_profile(profile: cProfile.Profile, rate: float) -> None:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime").print_stats(22)
    print(f"\nprofile of one rebuild into redis ({rate:,.0f} events/s under cProfile), by tottime")
    print("\n".join(out.getvalue().splitlines()[4:]))


# -- lag ----------------------------------------------------------------------------


@dataclass
class LagRound:
    lags: list[float]  # seconds, one per appended event seen
    unseen: int
    early: int  # seen before append() returned to us (counted as 0)
    rate: float  # appends/s achieved
    cpu_us: float | None = None  # the projector process's CPU per event appended


@dataclass
class LagFigures:
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    worst: list[float] = field(default_factory=list)
    events: int = 0
    unseen: int = 0
    early: int = 0
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(int(q / 100 * len(ordered) + 0.999999) - 1, 0)
    return ordered[min(rank, len(ordered) - 1)]


def signed_reports(ctx: Context, count: int, rng: random.Random) -> list[SignedEvent]:
    """Agent-signed violations and signals about other agents (signing is not timed)."""
    agents = ctx.ledger.agents
    now = format_time(datetime.now(UTC))
    events = []
    for index in range(count):
        a, b = rng.sample(agents, 2)
        if rng.random() < 0.7:
            event: PolicyViolation | TrustSignal = PolicyViolation(
                actor=a.did,
                occurred_at=now,
                agent=b.did,
                severity="low",
                rule="lag-bench",
                detail=f"call {index}",
            )
        else:
            event = TrustSignal(actor=a.did, occurred_at=now, agent=b.did, signal="ok")
        events.append(SignedEvent.create(event, a))
    return events


async def meta_round_trips(store: ProjectionStore, count: int = 2000) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        await store.meta()
        times.append(time.perf_counter() - start)
    return sorted(times)


class ProjectorRunner:
    """The projector under test: an `agentmesh serve projector` process or a task here."""

    def __init__(self, ctx: Context, backend: str, mode: str) -> None:
        self.ctx, self.backend, self.mode = ctx, backend, mode
        self.process: subprocess.Popen[bytes] | None = None
        self.task: asyncio.Task[None] | None = None
        self.stop_event = asyncio.Event()
        self.resources: list[ProjectionStore | PostgresLedgerReader] = []

    async def start(self) -> None:
        if self.mode == "process":
            self.process = self._spawn()
            return
        reader = await PostgresLedgerReader.connect(self.ctx.url)
        store = await self.ctx.store(self.backend)
        self.resources = [store, reader]
        projector = Projector(reader, store, CONFIG)
        self.task = asyncio.create_task(
            project_while_leader(projector, self.ctx.url, self.stop_event)
        )

    def cpu_seconds(self) -> float | None:
        """The projector process's CPU time so far (None in process, or without /proc)."""
        if self.process is None:
            return None
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
        env.update(
            AGENTMESH_DATABASE_URL=self.ctx.url,
            AGENTMESH_STORAGE_BACKEND=self.backend,
            AGENTMESH_REDIS_HOST=self.ctx.redis_host,
            AGENTMESH_REDIS_PORT=str(self.ctx.redis_port),
            AGENTMESH_REDIS_PREFIX=self.ctx.prefix,
            AGENTMESH_LOG_LEVEL="WARNING",
        )
        with open(self.ctx.root / f"projector-{self.backend}.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "agentmesh", "serve", "projector"],
                env=env,
                stdout=log,
                stderr=log,
            )

    async def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.process.wait, 30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.task is not None:
            self.stop_event.set()
            await asyncio.wait_for(self.task, 30)
        for resource in self.resources:
            await resource.close()


async def watch(store: ProjectionStore, seen: list[tuple[int, float]]) -> None:
    """Timestamp every change the read store announces (it publishes after writing)."""
    async for change in store.changes():
        if change != SUBSCRIBED:  # (the subscription in place, not an event)
            seen.append((change.position, time.perf_counter()))


async def wait_seen(seen: list[tuple[int, float]], position: int, seconds: float) -> bool:
    deadline = time.perf_counter() + seconds
    while not (seen and seen[-1][0] >= position):
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def warm_up(
    ledger: PostgresEventStore, events: Iterator[SignedEvent], seen: list[tuple[int, float]]
) -> None:
    """Append until a change for our latest event arrives: the projector has caught
    up (it may rebuild first) and our subscription is live."""
    deadline = time.perf_counter() + 300
    while time.perf_counter() < deadline:
        result = await ledger.append([next(events)])
        if await wait_seen(seen, result.positions[-1], 0.5):
            return
    raise RuntimeError("the projector never caught up (see its log in the bench directory)")


async def paced_appends(
    ledger: PostgresEventStore, events: list[SignedEvent]
) -> tuple[list[tuple[int, float]], float]:
    """Append one event per call at RATE/s; return (position, returned at) per event."""

    async def one(event: SignedEvent) -> tuple[int, float]:
        result = await ledger.append([event])
        return result.positions[0], time.perf_counter()

    tasks = []
    start = time.perf_counter()
    for index, event in enumerate(events):
        delay = start + index / RATE - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(event)))
    sent = time.perf_counter() - start
    return list(await asyncio.gather(*tasks)), len(events) / sent


def lags_of(committed: list[tuple[int, float]], seen: list[tuple[int, float]]) -> LagRound:
    positions = [p for p, _ in seen]
    lags, unseen, early = [], 0, 0
    for position, at in committed:
        index = bisect.bisect_left(positions, position)
        if index == len(positions):
            unseen += 1
            continue
        lag = seen[index][1] - at
        early += lag < 0
        lags.append(max(lag, 0.0))
    return LagRound(sorted(lags), unseen, early, 0.0)


async def lag_round(ctx: Context, backend: str, mode: str, seconds: float, seed: int) -> LagRound:
    rng = random.Random(seed)
    warm = iter(signed_reports(ctx, 600, rng))
    events = signed_reports(ctx, int(seconds * RATE), rng)
    ledger = await PostgresEventStore.open(ctx.url, ctx.ledger.ledger_key)
    watcher_store = await ctx.store(backend)
    runner = ProjectorRunner(ctx, backend, mode)
    seen: list[tuple[int, float]] = []
    watcher = asyncio.create_task(watch(watcher_store, seen))
    cpu: tuple[float, float] | None = None
    try:
        await runner.start()
        await warm_up(ledger, warm, seen)
        before = runner.cpu_seconds()
        committed, rate = await paced_appends(ledger, events)
        await wait_seen(seen, max(p for p, _ in committed), 30)
        after = runner.cpu_seconds()
        if before is not None and after is not None:
            cpu = (before, after)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await runner.stop()
        await watcher_store.close()
        await ledger.close()
    result = lags_of(committed, seen)
    result.rate = rate
    if cpu is not None:
        result.cpu_us = (cpu[1] - cpu[0]) / len(events) * 1e6
    return result


async def lag_figures(ctx: Context, repeat: int, seconds: float) -> None:
    configs = [("redis", "process"), ("redis", "in-process"), ("postgres", "process")]
    baselines: dict[str, list[float]] = {}
    for backend in ("redis", "postgres"):
        store = await ctx.store(backend)
        try:
            baselines[backend] = await meta_round_trips(store)
        finally:
            await store.close()
    figures = {config: LagFigures() for config in configs}
    for round_index in range(repeat):
        for config in configs:
            result = await lag_round(ctx, *config, seconds, seed=round_index)
            fig = figures[config]
            if result.lags:
                fig.p50.append(percentile(result.lags, 50))
                fig.p99.append(percentile(result.lags, 99))
                fig.worst.append(result.lags[-1])
            fig.events += len(result.lags)
            fig.unseen += result.unseen
            fig.early += result.early
            fig.rates.append(result.rate)
            if result.cpu_us is not None:
                fig.cpu_us.append(result.cpu_us)
    print(
        f"\nprojection lag, commit -> visible in the read store, {RATE:,} appends/s "
        f"for {seconds:g} s, median of {repeat}"
    )
    print(
        f"{'measure':40} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'events':>8} "
        f"{'appends/s':>10} {'p50 x meta':>11} {'p99 x meta':>11} {'CPU µs/ev':>10}"
    )
    for backend, times in baselines.items():
        p50, p99 = percentile(times, 50), percentile(times, 99)
        name = f"{backend} meta() round trip (baseline)"
        print(f"{name:40} {p50 * 1e3:8.2f} {p99 * 1e3:8.2f} {times[-1] * 1e3:8.2f}")
    for (backend, mode), fig in figures.items():
        base = percentile(baselines[backend], 50)
        if not fig.p50:
            print(f"{backend}, projector {mode}: nothing seen ({fig.unseen} unseen)")
            continue
        p50, p99 = statistics.median(fig.p50), statistics.median(fig.p99)
        name = f"{backend}, projector {mode}"
        cpu = f"{statistics.median(fig.cpu_us):10.0f}" if fig.cpu_us else f"{'-':>10}"
        print(
            f"{name:40} {p50 * 1e3:8.2f} {p99 * 1e3:8.2f} {max(fig.worst) * 1e3:8.2f} "
            f"{fig.events:8,} {statistics.median(fig.rates):10,.0f} "
            f"{p50 / base:11.1f} {p99 / base:11.1f} {cpu}"
        )
        if fig.unseen or fig.early:
            print(f"  ({fig.unseen} never seen, {fig.early} seen before append() returned)")
    redis_p99 = statistics.median(figures[("redis", "process")].p99 or [float("inf")])
    met = "met" if redis_p99 <= 0.050 else "NOT met"
    print(f"target p99 <= 50 ms (redis, projector process): {met}")


# -- main ---------------------------------------------------------------------------


async def bench(
    args: argparse.Namespace, server_url: str, host: str, port: int, root: Path
) -> None:
    url, name = await fresh_database(server_url)
    prefix = f"bench{uuid.uuid4().hex[:8]}:"
    try:
        print(
            f"cores: {os.cpu_count()}, ledger events: {args.events:,} over {args.days:g} days "
            f"of recorded_at (a day partition each), rounds: {args.repeat}"
        )
        ledger = await generate_ledger(url, events=args.events, agents=args.agents, days=args.days)
        print(
            f"generated {ledger.head_position:,} events in {ledger.seconds:.1f} s "
            f"({ledger.head_position / ledger.seconds:,.0f} events/s; signed on "
            f"{ledger.sign_workers} processes, chained and COPYed here): "
            f"{len(ledger.agents):,} agents, {ledger.grants:,} grants, "
            f"{ledger.streams:,} streams, {ledger.checkpoints:,} checkpoints"
        )
        # The first open builds the Merkle tree the verification reads (as on any ledger).
        await (await PostgresEventStore.open(url, ledger.ledger_key)).close()
        print(f"verified: {await verify_sample(url, ledger)}")
        ctx = Context(url, host, port, prefix, root, ledger)
        if args.profile:
            profile = cProfile.Profile()
            print_profile(profile, await rebuild(ctx, "redis", profile))
        await rebuild_figures(ctx, args.repeat)
        if args.listing_samples > 0:
            await listing_figures(ctx, args.listing_samples)
        if args.lag_seconds > 0:
            await lag_figures(ctx, args.lag_repeat or args.repeat, args.lag_seconds)
    finally:
        if "AGENTMESH_REDIS_HOST" in os.environ:
            store = RedisProjectionStore.connect(host, port, prefix=prefix)
            await store.flush_for_tests()
            await store.close()
        if "AGENTMESH_DATABASE_URL" in os.environ:
            await drop_database(server_url, name)


def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="agentmesh-bench-"))
    try:
        with servers(root) as (server_url, host, port):
            asyncio.run(bench(args, server_url, host, port, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    end_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--days", type=float, default=3.0, help="days of recorded_at (90: the retention window)"
    )
    parser.add_argument("--lag-seconds", type=float, default=20.0)
    parser.add_argument("--lag-repeat", type=int, default=0, help="lag rounds (default: --repeat)")
    parser.add_argument("--profile", action="store_true", help="cProfile one rebuild into redis")
    parser.add_argument(
        "--listing-samples", type=int, default=1000, help="registry pages per cursor set (0: none)"
    )
    main(parser.parse_args())
