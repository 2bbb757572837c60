"""A tail read of the ledger over its day partitions: by position alone, and bounded
by the time of the entry it reads after.

``events`` is partitioned by day of ``recorded_at``; a read by position alone plans
and opens every day partition. A ``PostgresLedgerReader`` bounds a read after an
entry by that entry's time when it read it before (a projector's tail, a client
paging, an export), else by the start of the day partition that held it (its map
of each partition's first position), so only the partitions from that day on are
read (``PostgresLedgerReader._read_rows``). For each ``--days`` (one ledger of
``--events`` generated over that many days, a partition per day), this prints the
read of the 3 newest entries through a one-connection reader, each way, rounds
interleaved: wall time, this process's CPU and the PostgreSQL backend's CPU per read,
medians of the rounds, and the ratio to the read by position alone (the baseline:
the statement every read was before, sent on the reader's pool). The day-map way
clears the reader's remembered times before each read. Then ``entry_at`` and an
inclusion proof (the tree built as a first open builds it) for positions among the
newest 5,000, with the reader's day map off (by position alone) and on.

Usage: .venv/bin/python bench/tail_read.py [--events 100000] [--days 5,90]
       [--reads 1000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_seconds, drop_database, end_on_sigterm, fresh_database, servers
from bench.ledger_gen import generate_ledger
from ledger.postgres import PostgresEventStore, PostgresLedgerReader
from ledger.postgres.reader import ENTRY_COLUMNS

ALONE = f"SELECT {ENTRY_COLUMNS} FROM events WHERE position > $1 ORDER BY position LIMIT $2"  # noqa: S608


async def measure(url: str, days: float, reads: int, repeat: int) -> None:
    reader = await PostgresLedgerReader.connect(url, pool_size=1)
    try:
        pid = await reader.pool.fetchval("SELECT pg_backend_pid()")
        partitions = await reader.pool.fetchval(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'events'::regclass"
        )
        after = (await reader.head()).position - 3
        ways = ("alone", "day", "after")
        found: dict[str, list[tuple[float, float, float]]] = {way: [] for way in ways}
        for _ in range(repeat):
            for way in ways:
                if way == "after":
                    await reader.read(after - 3, 3)  # remembers the entry at `after`
                cpu, wall, server = time.process_time(), time.perf_counter(), cpu_seconds(pid)
                for _ in range(reads):
                    if way == "alone":  # the statement every read was before
                        rows = await reader.pool.fetch(ALONE, after, 100)
                    else:
                        if way == "day":
                            reader._times.clear()  # nothing read before: the day map
                        rows = await reader.read(after, 100)
                    assert len(rows) == 3, rows
                found[way].append(
                    (
                        (time.perf_counter() - wall) / reads * 1e6,
                        (time.process_time() - cpu) / reads * 1e6,
                        (cpu_seconds(pid) - server) / reads * 1e6,
                    )
                )
    finally:
        await reader.close()
    med = {
        way: tuple(statistics.median(r[i] for r in rows) for i in range(3))
        for way, rows in found.items()
    }
    print(
        f"{days:g} days ({partitions} partitions): the 3 newest entries, medians of "
        f"{repeat} rounds x {reads}"
    )
    labels = {
        "alone": "by position alone (baseline)",
        "day": "after an entry, its day known",
        "after": "after an entry read before",
    }
    base = med["alone"]
    for way in ("alone", "day", "after"):
        wall, cpu, server = med[way]
        print(
            f"  {labels[way]:30} {wall:7.0f} µs wall {cpu:6.0f} µs CPU here "
            f"{server:6.0f} µs PostgreSQL   x baseline: wall {wall / base[0]:.2f}, "
            f"PostgreSQL {server / base[2]:.2f}"
        )


async def lookups(url: str, calls: int, repeat: int) -> None:
    """``entry_at`` and an inclusion proof in the tree of the head, for positions among
    the newest 5,000, with the reader's day map off (the baseline: by position alone)
    and on, in alternation."""
    reader = await PostgresLedgerReader.connect(url, pool_size=1)
    try:
        head = (await reader.head()).position
        found: dict[tuple[str, bool], list[float]] = {}
        for _ in range(repeat):
            for what in ("entry_at", "inclusion proof"):
                for on in (False, True):
                    # Off: no map, and none read again (the reader's own fields).
                    reader._days = ([], [])
                    reader._days_read = -math.inf if on else math.inf
                    started = time.perf_counter()
                    for i in range(calls):
                        position = head - 1 - (i * 37) % 5000
                        if what == "entry_at":
                            assert (await reader.entry_at(position)) is not None
                        else:
                            await reader.inclusion_proof(position, head)
                    found.setdefault((what, on), []).append(
                        (time.perf_counter() - started) / calls * 1e6
                    )
    finally:
        await reader.close()
    for what in ("entry_at", "inclusion proof"):
        alone, mapped = (statistics.median(found[what, way]) for way in (False, True))
        print(
            f"  {what:16} by position alone (baseline) {alone:6.0f} µs wall, "
            f"the day map {mapped:6.0f} µs: {mapped / alone:.2f}x"
        )


async def bench(server_url: str, args: argparse.Namespace) -> None:
    for days in args.days:
        url, name = await fresh_database(server_url)
        try:
            ledger = await generate_ledger(url, events=args.events, agents=1000, days=days)
            await measure(url, days, args.reads, args.repeat)
            store = await PostgresEventStore.open(url, ledger.ledger_key)  # builds the tree
            await store.close()
            await lookups(url, args.reads // 3, args.repeat)
        finally:
            await drop_database(server_url, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument(
        "--days", type=lambda text: [float(d) for d in text.split(",")], default=[5.0, 90.0]
    )
    parser.add_argument("--reads", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root, servers(Path(root)) as (url, _, _):
        asyncio.run(bench(url, args))


if __name__ == "__main__":
    end_on_sigterm()
    main()
