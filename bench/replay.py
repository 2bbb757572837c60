"""Replaying one agent's timeline, beside just reading the entries it needs.

Prints, from one run (medians of ``--repeat`` rounds), over a generated
ledger of ``--events`` events (``bench/ledger_gen.py``: real signatures, real
chain; 1,000 agents, so about 2,000 entries name each agent):

  * own entries — ``AgentTimelineReplay`` over the agent's own entries,
    read with ``PostgresLedgerReader.read_agent`` (paged by position);
    baseline: the same ``read_agent`` pages, nothing folded;
  * whole ledger — ``AgentTimelineReplay`` over every entry, streamed with
    ``iter_entries`` (batch 10,000), as ``agentmesh replay agent`` does;
    baseline: the same stream, nothing folded.

Why the own entries are enough for the score: an agent's trust (score, decay,
tier, suspension) changes only through events that name it — its
registration, suspension and reinstatement, violations and signals about it,
handshakes it took part in — and ``read_agent`` returns exactly the entries
whose ``subjects`` hold its DID (the agents an event is about, plus its
signer), so folding those alone gives the same score at every moment; entries
about unknown agents change nothing (checked here: every score and tier of
the own-entries timeline equals the whole-ledger one). What they miss are
delegation rows: a grant is only folded when both parties are registered (the
other party's registration is not among the agent's entries), and a
revocation or suspension above a grant it holds cascades onto it without
naming it. That is why ``agentmesh replay agent`` streams the whole ledger.

Usage: .venv/bin/python bench/replay.py [--events 1000000] [--repeat 3]
Uses AGENTMESH_DATABASE_URL (a fresh database is created on that server and
dropped afterwards) when set, else an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentmesh.embedded import EmbeddedPostgres
from bench.common import end_on_sigterm, fresh_database
from bench.ledger_gen import generate_ledger
from ledger.chain import RecordedEvent
from ledger.postgres import PostgresLedgerReader
from projections.config import TrustConfig
from projections.replay import AgentTimelineReplay, ReplaySource, Timeline

CONFIG = TrustConfig()
PAGE = 1000  # read_agent page size, as GET /v1/agents/{did}/trust?at= reads


async def own_entries(reader: PostgresLedgerReader, did: str) -> AsyncIterator[RecordedEvent]:
    """The agent's entries in position order, ``read_agent`` page by page."""
    after = 0
    while True:
        page = await reader.read_agent(did, after, PAGE)
        for record in page:
            yield record
        if len(page) < PAGE:
            return
        after = page[-1].position


async def drain(entries: AsyncIterator[RecordedEvent]) -> int:
    count = 0
    async for _ in entries:
        count += 1
    return count


async def timeline(source: ReplaySource, did: str, end: datetime | None = None) -> Timeline:
    return await AgentTimelineReplay(source, did, end=end, config=CONFIG).run_async()


async def timed(run: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await run()
    return (time.perf_counter() - start) * 1000


async def figures(url: str, did: str, repeat: int) -> None:
    reader = await PostgresLedgerReader.connect(url)
    try:
        own = await drain(own_entries(reader, did))
        whole = await drain(reader.iter_entries(batch=10_000))
        full = await timeline(ReplaySource(reader.iter_entries(batch=10_000)), did)
        fast = await timeline(ReplaySource(own_entries(reader, did), agent=did), did, full.end)
        rows, full_rows = len(fast.rows), len(full.rows)
        for row in full.rows:
            assert fast.at(row.time) == full.at(row.time), f"trust differs at {row.time}"
        runs: dict[str, Callable[[], Awaitable[object]]] = {
            "read_agent pages (baseline)": lambda: drain(own_entries(reader, did)),
            "timeline over own entries": lambda: timeline(
                ReplaySource(own_entries(reader, did), agent=did), did
            ),
            "iter_entries stream (baseline)": lambda: drain(reader.iter_entries(batch=10_000)),
            "timeline over the whole ledger": lambda: timeline(
                ReplaySource(reader.iter_entries(batch=10_000)), did
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeat):  # rounds interleave the measures, so drift hits all alike
            for name, run in runs.items():
                times[name].append(await timed(run))
    finally:
        await reader.close()
    median = {name: statistics.median(values) for name, values in times.items()}
    names = list(median)
    print(
        f"\nagent {did}: {own:,} own entries of {whole:,}; timeline rows: {rows} (own), "
        f"{full_rows} (whole ledger); score and tier equal at every row"
    )
    print(f"median of {repeat}")
    print(f"{'measure':34} {'entries':>10} {'ms':>10} {'x baseline':>11}")
    for name, count, baseline in (
        (names[0], own, names[0]),
        (names[1], own, names[0]),
        (names[2], whole, names[2]),
        (names[3], whole, names[2]),
    ):
        ratio = median[name] / median[baseline]
        print(f"{name:34} {count:10,} {median[name]:10,.1f} {ratio:11.2f}")
    print(
        f"own-entries timeline vs whole-ledger timeline: "
        f"{median[names[3]] / median[names[1]]:,.0f}x faster"
    )


async def bench(args: argparse.Namespace, server_url: str) -> None:
    url, _ = await fresh_database(server_url)
    try:
        print(f"cores: {os.cpu_count()}, ledger events: {args.events:,}, rounds: {args.repeat}")
        ledger = await generate_ledger(url, events=args.events, agents=args.agents)
        print(
            f"generated {ledger.head_position:,} events in {ledger.seconds:.1f} s "
            f"({len(ledger.agents):,} agents, {ledger.grants:,} grants)"
        )
        await figures(url, ledger.agents[0].did, args.repeat)
    finally:
        if "AGENTMESH_DATABASE_URL" in os.environ:
            await drop_database(server_url, url.rsplit("/", 1)[1])


async def drop_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


def main(args: argparse.Namespace) -> None:
    server_url = os.environ.get("AGENTMESH_DATABASE_URL")
    if server_url is not None:
        asyncio.run(bench(args, server_url))
        return
    root = Path(tempfile.mkdtemp(prefix="agentmesh-bench-"))
    postgres = EmbeddedPostgres(root / "pg").start()
    try:
        asyncio.run(bench(args, postgres.url))
    finally:
        postgres.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    end_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    main(parser.parse_args())
