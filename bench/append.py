"""Ledger append throughput, beside raw COPY and the Ed25519 verify ceiling.

Prints, from one run (medians of ``--repeat`` rounds):
  * raw COPY of equivalent rows into PostgreSQL (the baseline),
  * ledger appends with 1 and with 64 concurrent appenders — agent-signed
    events, each verified, chained and committed (one event per append call),
  * the 1-core Ed25519 verify ceiling,
and each figure's ratio to raw COPY.

Usage: .venv/bin/python bench/append.py [--events 12800] [--repeat 3]
Uses AGENTMESH_DATABASE_URL when set, else an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentmesh.embedded import EmbeddedPostgres
from bench.common import fresh_database
from ledger.events import AgentRegistered, PolicyViolation
from ledger.identity import SigningKey
from ledger.postgres import PostgresEventStore
from ledger.signed import SignedEvent
from ledger.timefmt import format_time


def signed_events(agents: list[SigningKey], count: int) -> list[SignedEvent]:
    now = format_time(datetime.now(UTC))
    events = []
    for index in range(count):
        key = agents[index % len(agents)]
        event = PolicyViolation(
            actor=key.did,
            occurred_at=now,
            agent=key.did,
            severity="low",
            rule="bench-rule",
            detail=f"blocked call {index}",
        )
        events.append(SignedEvent.create(event, key))
    return events


async def raw_copy(url: str, events: list[SignedEvent]) -> float:
    """Baseline: COPY rows shaped like ledger rows into a plain table, one transaction."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS raw_events (LIKE events)")
        await conn.execute("TRUNCATE raw_events")
        now = datetime.now(UTC)
        rows = [
            (
                i + 1,
                now,
                "agent:x",
                i + 1,
                e.type,
                e.actor,
                [e.actor],
                e.body,
                e.signature,
                bytes(32),
                bytes(32),
            )
            for i, e in enumerate(events)
        ]
        start = time.perf_counter()
        async with conn.transaction():
            await conn.copy_records_to_table("raw_events", records=rows)
        return len(rows) / (time.perf_counter() - start)
    finally:
        await conn.close()


async def ledger_appends(url: str, concurrency: int, count: int) -> float:
    ledger_key = SigningKey.generate()
    store = await PostgresEventStore.open(url, ledger_key)
    try:
        agents = [SigningKey.generate() for _ in range(max(concurrency, 8))]
        for agent in agents:
            await store.append_own(
                AgentRegistered(
                    actor=ledger_key.did,
                    occurred_at=format_time(datetime.now(UTC)),
                    did=agent.did,
                    public_key=agent.public.pem(),
                )
            )
        events = signed_events(agents, count)  # signing is the client's work: not timed
        queue = iter(events)

        async def appender() -> None:
            for event in queue:
                await store.append([event])

        start = time.perf_counter()
        await asyncio.gather(*(appender() for _ in range(concurrency)))
        return count / (time.perf_counter() - start)
    finally:
        await store.close()


def verify_ceiling(seconds: float = 1.0) -> float:
    key = SigningKey.generate()
    body = b'{"actor":"did:mesh:00","type":"policy.violation"}' * 4
    signature, public = key.sign(body), key.public
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(200):
            public.is_valid(signature, body)
        count += 200
    return count / (time.perf_counter() - start)


async def median_of(repeat: int, run: Callable[[], Awaitable[float]]) -> float:
    return statistics.median([await run() for _ in range(repeat)])


async def main(args: argparse.Namespace) -> None:
    server = None
    base_url = os.environ.get("AGENTMESH_DATABASE_URL")
    if base_url is None:
        server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="agentmesh-bench-"))).start()
        base_url = server.url
    try:
        print(f"cores: {os.cpu_count()}, events per round: {args.events}, rounds: {args.repeat}")
        sample = signed_events([SigningKey.generate()], args.events)

        async def copy_round() -> float:
            return await raw_copy((await fresh_database(base_url))[0], sample)

        async def ledger_round(concurrency: int, count: int) -> float:
            return await ledger_appends((await fresh_database(base_url))[0], concurrency, count)

        copy_rate = await median_of(args.repeat, copy_round)
        one = await median_of(args.repeat, lambda: ledger_round(1, max(args.events // 8, 500)))
        many = await median_of(args.repeat, lambda: ledger_round(64, args.events))
        ceiling = statistics.median(verify_ceiling() for _ in range(args.repeat))
        rows = [
            ("raw COPY (baseline)", copy_rate),
            ("ledger append, 1 appender", one),
            ("ledger append, 64 appenders", many),
            ("Ed25519 verify, 1 core", ceiling),
        ]
        print(f"{'measure':34} {'events/s':>12} {'x raw COPY':>11}")
        for name, rate in rows:
            print(f"{name:34} {rate:12,.0f} {rate / copy_rate:11.3f}")
        target = "met" if many >= 5000 else "NOT met"
        print(f"target >= 5,000 agent-signed events/s with 64 appenders: {target}")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=12_800)
    parser.add_argument("--repeat", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
