"""How long a single append waits when processes share the ledger (no HTTP).

Each entry's hash chains the one before it, and PostgreSQL shows a commit to other
sessions only once its WAL is flushed: appends of separate processes cannot share a
commit. They take turns on the ledger (an advisory lock, handed over with a commit
while another process waits: ``ledger.postgres.store``), and an append in one
process may wait for the other's commit before its own. This prints, for
``--processes`` separate processes (each a ``PostgresEventStore``, as API workers or
replicas) sending single agent-signed appends on a schedule (open loop: ``--rate``
per second in all, each latency counted from when the append was due), the
latency percentiles of the appends after ``--warmup`` seconds, beside one process
at the same total rate (the baseline), with the turns taken. Medians of
``--repeat`` rounds, rounds interleaved.

Usage: .venv/bin/python bench/turn_latency.py [--rate 1000] [--seconds 8]
       [--processes 1,2,4] [--repeat 3]
Uses AGENTMESH_DATABASE_URL when set, else an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentmesh.embedded import EmbeddedPostgres
from bench.common import end_on_sigterm, fresh_database, percentile, positive, register
from ledger.identity import SigningKey
from ledger.postgres import PostgresEventStore

_ROOT = str(Path(__file__).resolve().parent.parent)
AGENTS_PER_PROCESS = 32

_CHILD = """
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[1])
from bench.append import signed_events
from bench.common import no_collector_pauses, on_schedule
from ledger.identity import SigningKey
from ledger.postgres import PostgresEventStore

async def main() -> None:
    url = sys.argv[2]
    rate, seconds, warmup = (float(value) for value in sys.argv[3:6])
    ledger_key = SigningKey.from_pem(sys.stdin.readline().replace("|", "\\n"))
    agents = [SigningKey.from_pem(line.replace("|", "\\n")) for line in sys.argv[6:]]
    events = signed_events(agents, int(rate * seconds))
    store = await PostgresEventStore.open(url, ledger_key)
    try:
        print("ready", flush=True)
        start = float(sys.stdin.readline())  # the same wall-clock start for every process
        latencies = []
        clock = time.time

        async def one(event, due):
            await store.append([event])
            if due - start >= warmup:
                latencies.append(clock() - due)

        with no_collector_pauses():  # the generator's pauses would count as the store's
            await on_schedule(events, rate, start, one, clock)
        print(json.dumps([latencies, store.turn_counts]), flush=True)
    finally:
        await store.close()

asyncio.run(main())
"""


async def register_all(url: str, ledger_key: SigningKey, agents: list[SigningKey]) -> None:
    store = await PostgresEventStore.open(url, ledger_key)
    try:
        for agent in agents:
            await register(store, agent)
    finally:
        await store.close()


async def round_of(
    url: str, processes: int, args: argparse.Namespace
) -> tuple[list[float], collections.Counter[str]]:
    """Every timed append's latency (s) of ``processes`` processes, and their turns."""
    ledger_key = SigningKey.generate()
    agents = [SigningKey.generate() for _ in range(AGENTS_PER_PROCESS * processes)]
    await register_all(url, ledger_key, agents)
    children = []
    for index in range(processes):
        own = agents[index * AGENTS_PER_PROCESS : (index + 1) * AGENTS_PER_PROCESS]
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD,
            _ROOT,
            url,
            str(args.rate / processes),
            str(args.seconds),
            str(args.warmup),
            *(a.private_key_pem().replace("\n", "|") for a in own),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=2**26,  # a line holds every latency of the process
        )
        assert child.stdin is not None
        child.stdin.write(ledger_key.private_key_pem().replace("\n", "|").encode() + b"\n")
        children.append(child)
    for child in children:
        assert child.stdout is not None
        if (await child.stdout.readline()).strip() != b"ready":
            raise RuntimeError("an appending process failed to start")
    start = datetime.now(UTC).timestamp() + 0.5
    for child in children:
        assert child.stdin is not None
        child.stdin.write(f"{start}\n".encode())
        await child.stdin.drain()
    latencies: list[float] = []
    turns: collections.Counter[str] = collections.Counter()
    for child in children:
        assert child.stdout is not None
        found, counts = json.loads(await child.stdout.readline())
        latencies += found
        turns.update(counts)
        await child.wait()
    return sorted(latencies), turns


async def bench(base_url: str, args: argparse.Namespace) -> None:
    counts = [int(p) for p in args.processes.split(",")]
    if 1 not in counts:
        counts.insert(0, 1)  # the baseline
    found: dict[int, dict[str, list[float]]] = {n: collections.defaultdict(list) for n in counts}
    turns: dict[int, collections.Counter[str]] = {n: collections.Counter() for n in counts}
    for _ in range(args.repeat):
        for n in counts:
            url, _ = await fresh_database(base_url)
            latencies, counted = await round_of(url, n, args)
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
                found[n][name].append(percentile(latencies, q) * 1000)
            turns[n].update(counted)
    print(
        f"single appends, open loop at {args.rate:,.0f}/s in all for {args.seconds:g} s "
        f"(the first {args.warmup:g} s not timed); ms from when each was due, medians of "
        f"{args.repeat} rounds"
    )
    print(f"{'processes':>10} {'p50':>8} {'p90':>8} {'p99':>8} {'p50 x 1':>8}  turns (all rounds)")
    base = statistics.median(found[1]["p50"])
    for n in counts:
        p50, p90, p99 = (statistics.median(found[n][k]) for k in ("p50", "p90", "p99"))
        taken = ", ".join(f"{k} {v:,}" for k, v in sorted(turns[n].items())) or "none"
        label = f"{n}" + (" (baseline)" if n == 1 else "")
        print(f"{label:>10} {p50:8.2f} {p90:8.2f} {p99:8.2f} {p50 / base:7.2f}x  {taken}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rate", type=positive, default=1000)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--repeat", type=positive, default=3)
    args = parser.parse_args()
    base_url = os.environ.get("AGENTMESH_DATABASE_URL")
    if base_url is not None:
        asyncio.run(bench(base_url, args))
        return
    with tempfile.TemporaryDirectory() as root:
        postgres = EmbeddedPostgres(Path(root) / "pg").start()
        try:
            asyncio.run(bench(postgres.url, args))
        finally:
            postgres.stop()


if __name__ == "__main__":
    end_on_sigterm()
    main()
