"""One agent's reads across the day partitions: planned per call or once.

``read_agent`` (an agent's events page, each agent of an ``?at=`` fold, ``agentmesh
replay agent``) and ``key_before`` (each link of ``GET /v1/delegations/{id}``) find
an agent's entries through the ``subjects`` index of every day partition of
``events`` — 91 over the 90-day window. On a generated ledger of ``--events``
events, ``--agents`` agents over ``--days`` days, plus one new agent with
``--hot-events`` self-reports appended through ``PostgresEventStore.append`` (in
today's partition), this prints, per call on a one-connection reader, the
statements as each call planned them before (the baseline: custom plans, what
PostgreSQL chooses on its own) beside ``PostgresLedgerReader``'s (the first page and
the key entries under one generic plan per connection, later pages planned per
call): the first page (1,000) of ``--samples`` agents, each one's key as of the
head, and every page of the hot agent. Medians of ``--repeat``
rounds (each call's median within a round).

Usage: .venv/bin/python bench/agent_reads.py [--events 200000] [--agents 1000]
       [--days 90] [--hot-events 10000] [--samples 50] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import end_on_sigterm, generated, ledger_args, register, run_on_servers
from bench.scale import hot_appends
from ledger.identity import SigningKey
from ledger.postgres import PostgresEventStore, PostgresLedgerReader
from ledger.postgres.reader import ENTRY_COLUMNS, record_from_row

# The statements as they were planned before: per call (custom plans).
PER_CALL_ENTRIES = (
    f"SELECT {ENTRY_COLUMNS} FROM events "  # noqa: S608 -- constant
    "WHERE subjects @> ARRAY[$1]::text[] AND position > $2 ORDER BY position LIMIT $3"
)
PER_CALL_KEY_ENTRIES = (
    "SELECT body FROM events WHERE subjects @> ARRAY[$1]::text[] "
    "AND event_type IN ('agent.registered', 'agent.key_rotated') "
    "AND position < $2 AND position > $3 ORDER BY position DESC"
)
ANCHOR_BELOW = (
    "SELECT position, keys FROM retention_anchors WHERE position < $1 "
    "ORDER BY position DESC LIMIT 1"
)
PAGE = 1000
Calls = list[Callable[[], Awaitable[object]]]


async def add_hot_agent(url: str, ledger_key: SigningKey, events: int) -> str:
    store = await PostgresEventStore.open(url, ledger_key)
    try:
        hot = SigningKey.generate()
        await register(store, hot)
        await hot_appends(store, hot, events)
        return hot.did
    finally:
        await store.close()


async def ms_per_call(calls: Calls) -> float:
    times = []
    for call in calls:
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


async def bench(server_url: str, args: argparse.Namespace) -> None:
    async with generated(server_url, args) as (url, ledger):
        hot = await add_hot_agent(url, ledger.ledger_key, args.hot_events)
        reader = await PostgresLedgerReader.connect(url, pool_size=1)
        try:
            head = (await reader.head()).position
            step = max(len(ledger.agents) // args.samples, 1)
            dids = [key.did for key in ledger.agents[::step][: args.samples]]
            pool = reader.pool

            async def per_call_page(did: str, after: int) -> list[object]:
                rows = await pool.fetch(PER_CALL_ENTRIES, did, after, PAGE)
                return [record_from_row(r) for r in rows]

            async def per_call_key(did: str) -> object:
                await pool.fetchrow(ANCHOR_BELOW, head + 1)  # as key_before: no anchor here
                return await pool.fetch(PER_CALL_KEY_ENTRIES, did, head + 1, 0)

            async def all_pages(read: Callable[[str, int], Awaitable[list[object]]]) -> None:
                after = 0
                while len(page := await read(hot, after)) == PAGE:
                    after = page[-1].position  # type: ignore[attr-defined]

            async def generic_page(did: str, after: int) -> list[object]:
                return list(await reader.read_agent(did, after, PAGE))

            ways: dict[str, tuple[Calls, Calls]] = {
                "first page": (
                    [partial(per_call_page, d, 0) for d in dids],
                    [partial(reader.read_agent, d, 0, PAGE) for d in dids],
                ),
                "key as of the head": (
                    [partial(per_call_key, d) for d in dids],
                    [partial(reader.key_before, d, head + 1) for d in dids],
                ),
                f"all pages, {args.hot_events:,} events": (
                    [lambda: all_pages(per_call_page)],
                    [lambda: all_pages(generic_page)],
                ),
            }
            found: dict[str, tuple[list[float], list[float]]] = {w: ([], []) for w in ways}
            for _ in range(args.repeat):
                for way, (before, after) in ways.items():
                    found[way][0].append(await ms_per_call(before))
                    found[way][1].append(await ms_per_call(after))
            print(
                f"{head:,} events, {len(ledger.agents):,} agents + 1 with "
                f"{args.hot_events:,} events, {args.days:g} days; ms per call, "
                f"medians of {args.repeat} rounds ({len(dids)} agents a round)"
            )
            print(f"{'read':40} {'per call (baseline)':>20} {'the reader':>13} {'ratio':>7}")
            for way, (per_call, generic) in found.items():
                b, a = statistics.median(per_call), statistics.median(generic)
                print(f"{way:40} {b:20.2f} {a:13.2f} {a / b:6.2f}x")
        finally:
            await reader.close()


if __name__ == "__main__":
    end_on_sigterm()
    run_on_servers(
        bench,
        ledger_args(__doc__, events=200_000, agents=1000, samples=50, hot_events=10_000),
    )
