"""A read through the ledger reader's pool, with and without asyncpg's reset on release.

``ledger.postgres.reader.create_pool(reader=True)`` (every ``PostgresLedgerReader``
on its own pool: the projector's ledger reads, ``?at=``, exports, the CLI) returns a
connection without asyncpg's reset query; the writer's pool (``reader=False``) keeps
it. Prints, for ``pool.fetchval("SELECT 1")`` on a one-connection pool of each kind,
interleaved rounds on one embedded PostgreSQL: wall time and this process's CPU per
read, medians of the rounds, and the ratio (the writer's kind is the baseline).

Usage: .venv/bin/python bench/reader_pool.py [--reads 3000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import end_on_sigterm, servers
from ledger.postgres.reader import create_pool


async def measure(url: str, reads: int, repeat: int) -> None:
    pools = {kind: await create_pool(url, 1, reader=kind) for kind in (True, False)}
    found: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    try:
        for _ in range(repeat):
            for kind, pool in pools.items():
                cpu, wall = time.process_time(), time.perf_counter()
                for _ in range(reads):
                    await pool.fetchval("SELECT 1")
                found[kind].append(
                    (
                        (time.perf_counter() - wall) / reads * 1e6,
                        (time.process_time() - cpu) / reads * 1e6,
                    )
                )
    finally:
        for pool in pools.values():
            await pool.close()
    medians = {
        kind: (statistics.median(w for w, _ in rows), statistics.median(c for _, c in rows))
        for kind, rows in found.items()
    }
    print(f"a read through a one-connection pool, medians of {repeat} rounds x {reads}")
    for kind, label in ((False, "writer's pool (reset on release)"), (True, "reader's pool")):
        wall, cpu = medians[kind]
        print(f"  {label:34} {wall:7.0f} µs wall  {cpu:6.0f} µs CPU here")
    base, quick = medians[False], medians[True]
    print(f"  reader / writer: wall {quick[0] / base[0]:.2f}x, CPU {quick[1] / base[1]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root, servers(Path(root)) as (url, _, _):
        asyncio.run(measure(url, args.reads, args.repeat))


if __name__ == "__main__":
    end_on_sigterm()
    main()
