"""What one ``GET /v1/agents/{did}/trust?at=`` may cost, with and without its limits.

``?at=`` needs no credential. Its fold reads the agent's entries and, transitively,
those of every peer that reported on an agent already included; with reports
spread across a mesh that closure is most of the ledger. The API bounds each
request (``api.routes.AT_LIMITS``: entries read, agents in the closure) and
refuses past them (422, naming the offline replay). For a generated ledger of
``--events`` events, ``--agents`` agents over ``--days`` days, this prints, for
``--samples`` agents, the wall time of ``projections.history.state_at`` on a
one-connection reader without limits (the baseline: what a request cost before)
and with the API's limits (until it answers or is refused), how many of them the
limits refused, and the closure of each; medians of ``--repeat`` rounds.

Usage: .venv/bin/python bench/at_limits.py [--events 200000] [--agents 1000]
       [--days 90] [--samples 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.routes import AT_LIMITS
from bench.common import end_on_sigterm, generated, ledger_args, run_on_servers
from ledger.postgres import PostgresLedgerReader
from projections.config import TrustConfig
from projections.history import FoldLimits, FoldTooLargeError, state_at


async def fold(
    reader: PostgresLedgerReader, did: str, ledger_did: str, limits: FoldLimits | None
) -> tuple[float, int | None]:
    """Seconds, and the closure's size (None: refused by the limits)."""
    started = time.perf_counter()
    try:
        state = await state_at(
            reader,
            did,
            datetime.now(UTC),
            ledger_did=ledger_did,
            config=TrustConfig(),
            limits=limits,
        )
    except FoldTooLargeError:
        return time.perf_counter() - started, None
    return time.perf_counter() - started, len(state.agents)


async def bench(server_url: str, args: argparse.Namespace) -> None:
    async with generated(server_url, args) as (url, ledger):
        reader = await PostgresLedgerReader.connect(url, pool_size=1)
        try:
            step = max(len(ledger.agents) // args.samples, 1)
            dids = [key.did for key in ledger.agents[::step][: args.samples]]
            ledger_did = ledger.ledger_key.did
            print(
                f"{ledger.head_position:,} events, {len(ledger.agents):,} agents, "
                f"{args.days:g} days; limits: {AT_LIMITS.events:,} entries, "
                f"{AT_LIMITS.agents:,} agents; medians of {args.repeat} rounds"
            )
            for did in dids:
                found: dict[str, list[float]] = {"none": [], "limits": []}
                closure: dict[str, int | None] = {}
                for _ in range(args.repeat):
                    for way, limits in (("none", None), ("limits", AT_LIMITS)):
                        seconds, size = await fold(reader, did, ledger_did, limits)
                        found[way].append(seconds)
                        closure[way] = size
                none, bounded = (statistics.median(found[w]) for w in ("none", "limits"))
                outcome = "refused (422)" if closure["limits"] is None else "answered"
                print(
                    f"  {did[:22]}…: closure {closure['none']:,} agents; without limits "
                    f"(baseline) {none:7.2f} s, with them {bounded:6.2f} s, {outcome}: "
                    f"{bounded / none:.3f}x"
                )
        finally:
            await reader.close()


if __name__ == "__main__":
    end_on_sigterm()
    run_on_servers(bench, ledger_args(__doc__, events=200_000, agents=1000, samples=3))
