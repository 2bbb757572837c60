"""The key a delegation link is checked against: one agent's, or every agent's.

``GET /v1/delegations/{grant_id}`` (public) checks each link of the chain against
its delegator's key as of the grant. It used to ask for every agent's key as of
that position (``keys_before``: every registration and rotation before it, each
body decoded and its PEM parsed) and keep one; it now asks for that one agent's
(``key_before``: the agent's key entries, through the ``subjects`` index). For a
generated ledger of ``--events`` events and ``--agents`` agents over ``--days``
days, this prints, for ``--grants`` grants of the ledger (delegators old and new,
some with many entries), the wall time per link of each way through a
one-connection reader, rounds interleaved, medians of ``--repeat`` rounds, and the
ratio to ``keys_before`` (the baseline). Both ways must give the same key.

Usage: .venv/bin/python bench/link_key.py [--events 200000] [--agents 100000]
       [--days 90] [--grants 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import end_on_sigterm, generated, ledger_args, run_on_servers
from ledger.events import DelegationGranted, decode_body
from ledger.postgres import PostgresLedgerReader


async def measure(url: str, grants: int, repeat: int) -> None:
    reader = await PostgresLedgerReader.connect(url, pool_size=1)
    try:
        rows = await reader.pool.fetch(
            "SELECT position, body FROM events WHERE event_type = 'delegation.granted' "
            "ORDER BY position"
        )
        step = max(len(rows) // grants, 1)
        links: list[tuple[str, int]] = []
        for row in rows[::step][:grants]:
            event = decode_body(bytes(row["body"]))
            assert isinstance(event, DelegationGranted)
            links.append((event.delegator, row["position"]))
        found: dict[str, list[float]] = {"all": [], "one": []}
        for _ in range(repeat):
            for way in found:
                started = time.perf_counter()
                for did, position in links:
                    if way == "all":
                        key = (await reader.keys_before(position)).get(did)
                    else:
                        key = await reader.key_before(did, position)
                    assert key is not None, (did, position)
                found[way].append((time.perf_counter() - started) / len(links) * 1e3)
        for did, position in links:  # the same answer both ways
            assert await reader.key_before(did, position) == (
                await reader.keys_before(position)
            ).get(did)
        agents = await reader.pool.fetchval(
            "SELECT count(*) FROM events WHERE event_type = 'agent.registered'"
        )
    finally:
        await reader.close()
    everyone, one = (statistics.median(found[way]) for way in ("all", "one"))
    print(f"  {len(links)} links, {agents:,} registrations in the ledger; ms per link:")
    print(f"  every agent's keys (keys_before, baseline) {everyone:10.2f} ms")
    print(f"  the delegator's key (key_before)           {one:10.2f} ms: {one / everyone:.4f}x")


async def bench(server_url: str, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    async with generated(server_url, args) as (url, ledger):
        print(
            f"generated {ledger.head_position:,} events, {args.agents:,} agents, "
            f"{ledger.grants:,} grants over {args.days:g} days in "
            f"{time.perf_counter() - started:.0f} s; medians of {args.repeat} rounds"
        )
        await measure(url, args.grants, args.repeat)


if __name__ == "__main__":
    end_on_sigterm()
    run_on_servers(bench, ledger_args(__doc__, events=200_000, agents=100_000, grants=20))
