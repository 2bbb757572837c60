"""Ledger append throughput, beside raw COPY, a peer event store and the Ed25519 ceiling.

Prints, from one run (medians of ``--repeat`` rounds, rounds interleaved):
  * raw COPY of equivalent rows into PostgreSQL (the baseline of the ratios),
  * ledger appends with 1 and with 64 concurrent appenders — agent-signed
    events, each verified, chained and committed (one event per append call),
  * the peer: the ``eventsourcing`` library's PostgreSQL application recorder
    (``PostgresApplicationRecorder``, default settings: one ``insert_events``
    call and one transaction per event, totally ordered notification ids like
    our positions) on the same PostgreSQL, storing the same signed bodies, with
    1 and with 64 threads — and the ledger's ratio to it,
  * WAL bytes per event of each (``pg_current_wal_lsn()`` around the round), and,
    with the embedded server, the 1-appender shapes' WAL by relation (``pg_waldump``
    of the server's own version over an extra round of single appends: the events
    row, each index, the chain head, the single-use ids, the commit records),
  * several processes appending to one ledger at once (``--processes 1,2,4``):
    each a separate ``PostgresEventStore`` (as separate API replicas or workers)
    with 32 concurrent appenders, started together; the total events/s beside
    one process's in the same run, and how they shared the ledger (events per
    commit, commits by path, turns waited, entries caught up, guard misses),
  * the 1-core Ed25519 verify ceiling (libsodium, the ledger's check) and the CPU of
    each check the write path runs, OpenSSL's Ed25519 check beside it.
Both stores commit durably (``synchronous_commit`` on, fsync on) before a call returns.

Usage: .venv/bin/python bench/append.py [--events 12800] [--repeat 3] [--no-peer]
           [--processes 1,2,4]
Uses AGENTMESH_DATABASE_URL when set, else an embedded PostgreSQL. The peer needs
the ``eventsourcing`` and ``psycopg`` packages (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentmesh.embedded import EmbeddedPostgres
from bench.common import end_on_sigterm, fresh_database, register
from ledger.events import PolicyViolation
from ledger.identity import SigningKey
from ledger.postgres import PostgresEventStore
from ledger.signed import SignedEvent
from ledger.timefmt import format_time

_ROOT = str(Path(__file__).resolve().parent.parent)


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


async def wal_bytes_per_event(
    url: str, count: int, run: Callable[[], Awaitable[float]]
) -> tuple[float, float]:
    """(events/s, WAL bytes per event) of ``run`` — the WAL the whole server wrote."""
    conn = await asyncpg.connect(url)
    try:
        before = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
        rate = await run()
        after = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
        wal = await conn.fetchval(
            "SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)", after, before
        )
        return rate, float(wal) / count
    finally:
        await conn.close()


_WALDUMP_RECORD = re.compile(
    r"rmgr: (\S+)\s+len \(rec/tot\):\s*\d+/\s*(\d+), tx:\s*\d+, lsn: ([0-9A-F]+/[0-9A-F]+),"
    r".*?desc: (\S+)(.*)"
)


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


async def insert_lsn(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        return str(await conn.fetchval("SELECT pg_current_wal_insert_lsn()::text"))
    finally:
        await conn.close()


async def wal_by_relation(
    server: EmbeddedPostgres, url: str, span: tuple[str, str], count: int
) -> dict[str, float]:
    """WAL bytes per event between the two LSNs of ``span``, by the relation each record
    touched (``pg_waldump`` of the server's own version; a day partition is named as
    ``<parent>_p*``), commit records as "commit" (of any database: a commit record
    does not name one), records that touched no relation of this database (another
    database's autovacuum, the server's own) as "other (the server, other databases)"."""
    layout = server.layout
    assert layout is not None
    conn = await asyncpg.connect(url)
    try:
        database = await conn.fetchval(
            "SELECT oid FROM pg_database WHERE datname = current_database()"
        )
        names = {
            str(node): re.sub(r"_p\d{8}", "_p*", name)
            for node, name in await conn.fetch(
                "SELECT relfilenode, relname FROM pg_class WHERE relfilenode <> 0"
            )
        }
    finally:
        await conn.close()
    start, end = span
    dump = await asyncio.to_thread(
        subprocess.run,
        [str(layout.bindir / "pg_waldump"), "-p", str(layout.pgdata / "pg_wal"), "-s", start],
        capture_output=True,
        text=True,
    )
    totals: collections.Counter[str] = collections.Counter()
    first, last = _lsn(start), _lsn(end)
    for line in dump.stdout.splitlines():
        match = _WALDUMP_RECORD.search(line)
        if match is None or not first <= _lsn(match.group(3)) < last:
            continue
        rmgr, size, kind, rest = match.group(1), int(match.group(2)), match.group(4), match.group(5)
        relation = re.search(rf"rel \d+/{database}/(\d+)", rest)
        if rmgr == "Transaction" and kind == "COMMIT":
            totals["commit"] += size
        elif relation is not None and relation.group(1) in names:
            totals[names[relation.group(1)]] += size
        else:
            totals["other (the server, other databases)"] += size
    if not totals:
        raise RuntimeError(f"pg_waldump read no record: {dump.stderr.strip()[:200]}")
    return {name: size / count for name, size in totals.most_common()}


async def ledger_wal_span(url: str, count: int, warm: int = 50) -> tuple[str, str]:
    """One appender, one event per append (the 1-appender measure's shape), after
    ``warm`` appends that open the day's partitions; the LSNs around the ``count``."""
    store = await PostgresEventStore.open(url, SigningKey.generate())
    try:
        agents = [SigningKey.generate() for _ in range(8)]
        for agent in agents:
            await register(store, agent)
        events = signed_events(agents, count + warm)
        for event in events[:warm]:
            await store.append([event])
        start = await insert_lsn(url)
        for event in events[warm:]:
            await store.append([event])
        return start, await insert_lsn(url)
    finally:
        await store.close()


async def peer_wal_span(url: str, count: int, warm: int = 50) -> tuple[str, str]:
    """The peer's 1-thread shape, after ``warm`` events that create its table."""
    events = signed_events([SigningKey.generate() for _ in range(8)], count + warm)
    await asyncio.to_thread(peer_appends, url, 1, events[:warm])
    start = await insert_lsn(url)
    await asyncio.to_thread(peer_appends, url, 1, events[warm:])
    return start, await insert_lsn(url)


def peer_appends(url: str, concurrency: int, events: list[SignedEvent]) -> float:
    """The ``eventsourcing`` recorder: one event per ``insert_events`` (one transaction),
    from ``concurrency`` threads, one aggregate (stream) per signer as in the ledger."""
    from eventsourcing.persistence import StoredEvent
    from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore

    parts = urlsplit(url)
    datastore = PostgresDatastore(
        dbname=parts.path.lstrip("/"),
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 5432,
        user=parts.username or "postgres",
        password=parts.password or "",
        pool_size=concurrency,
    )
    try:
        recorder = PostgresApplicationRecorder(datastore, events_table_name="peer_events")
        recorder.create_table()
        streams: dict[str, uuid.UUID] = {}
        versions: dict[uuid.UUID, int] = {}
        stored = []
        for event in events:
            stream = streams.setdefault(event.actor, uuid.uuid4())
            versions[stream] = versions.get(stream, 0) + 1
            stored.append(StoredEvent(stream, versions[stream], event.type, event.body))
        # Each thread owns the streams of its share of signers, as each ledger
        # appender's events are its own: no version conflicts between threads.
        shares: list[list[StoredEvent]] = [[] for _ in range(concurrency)]
        order = {s: i % concurrency for i, s in enumerate(streams.values())}
        for item in stored:
            shares[order[item.originator_id]].append(item)  # type: ignore[index]

        def writer(share: list[StoredEvent]) -> None:
            for item in share:
                recorder.insert_events([item])

        threads = [threading.Thread(target=writer, args=(s,)) for s in shares]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return len(stored) / (time.perf_counter() - start)
    finally:
        datastore.close()


async def ledger_appends(url: str, concurrency: int, count: int) -> float:
    ledger_key = SigningKey.generate()
    store = await PostgresEventStore.open(url, ledger_key)
    try:
        agents = [SigningKey.generate() for _ in range(max(concurrency, 8))]
        for agent in agents:
            await register(store, agent)
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


# One of several appending processes: open the ledger with the shared key, sign this
# process's events, say "ready", wait for "go", append, print start and end times and
# how its commits went (commits by path, turns waited, guard misses).
_PROCESS_CHILD = """
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[1])
from bench.append import signed_events
from ledger.identity import SigningKey
from ledger.postgres import PostgresEventStore

async def main() -> None:
    url, count, concurrency = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    ledger_key = SigningKey.from_pem(sys.stdin.readline().replace("|", "\\n"))
    agents = [SigningKey.from_pem(line.replace("|", "\\n")) for line in sys.argv[5:]]
    store = await PostgresEventStore.open(url, ledger_key)
    try:
        events = iter(signed_events(agents, count))
        print("ready", flush=True)
        sys.stdin.readline()

        async def appender() -> None:
            for event in events:
                await store.append([event])

        start = time.time()
        await asyncio.gather(*(appender() for _ in range(concurrency)))
        end = time.time()
        print(json.dumps([start, end, store.commit_paths, store.turn_counts]), flush=True)
    finally:
        await store.close()

asyncio.run(main())
"""


# Per number of processes: their commits by path and turn counters, summed over rounds.
PROCESS_COUNTS: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)


async def process_appends(url: str, processes: int, count: int, concurrency: int = 32) -> float:
    """Total events/s of ``processes`` processes appending ``count`` events in all
    (their commits and turns are added to ``PROCESS_COUNTS[processes]``)."""
    ledger_key = SigningKey.generate()
    store = await PostgresEventStore.open(url, ledger_key)
    agents = [SigningKey.generate() for _ in range(concurrency * processes)]
    try:
        for agent in agents:
            await register(store, agent)
    finally:
        await store.close()
    children = []
    for index in range(processes):
        own = agents[index * concurrency : (index + 1) * concurrency]
        pems = [a.private_key_pem().replace("\n", "|") for a in own]
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _PROCESS_CHILD,
            _ROOT,
            url,
            str(count // processes),
            str(concurrency),
            *pems,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert child.stdin is not None
        child.stdin.write(ledger_key.private_key_pem().replace("\n", "|").encode() + b"\n")
        children.append(child)
    for child in children:
        assert child.stdout is not None
        ready = await child.stdout.readline()
        if ready.strip() != b"ready":
            raise RuntimeError(f"an appending process failed to start: {ready!r}")
    for child in children:
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        await child.stdin.drain()
    spans: list[tuple[float, float]] = []
    for child in children:
        assert child.stdout is not None
        start, end, paths, turns = json.loads(await child.stdout.readline())
        spans.append((float(start), float(end)))
        PROCESS_COUNTS[processes].update(paths)
        PROCESS_COUNTS[processes].update(turns)
        PROCESS_COUNTS[processes]["events"] += count // processes
        await child.wait()
    elapsed = max(end for _, end in spans) - min(start for start, _ in spans)
    return (count // processes) * processes / elapsed


def check_costs(repeat: int) -> dict[str, float]:
    """Microseconds of CPU per event of each check the write path runs, beside one
    Ed25519 verification in the same run (best of ``repeat`` timings of 5,000)."""
    import timeit

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from ledger import authority, tlog
    from ledger.chain import entry_hash, envelope_bytes
    from ledger.merkle import Frontier
    from ledger.postgres.batch import event_key

    key = SigningKey.generate()
    now = datetime.now(UTC)
    signed = signed_events([key], 1)[0]
    event_id = signed.event.event_id
    assert event_id is not None

    class View:  # an active agent, its key known, nothing seen before
        ledger_did = SigningKey.generate().did

        def key(self, did: str) -> bytes | None:
            return key.public.raw

        def suspended(self, did: str) -> bool:
            return False

        def has_agents(self) -> bool:
            return True

        def seen(self, actor: str, event_id: str, day: date) -> bool:
            return False

    view, frontier = View(), Frontier()

    def envelope() -> bytes:
        body = envelope_bytes(
            position=1,
            recorded_at=now,
            stream_id="agent:x",
            stream_version=1,
            body=signed.body,
            signature=signed.signature,
        )
        return entry_hash(bytes(32), body)

    openssl = Ed25519PublicKey.from_public_bytes(key.public.raw)
    measures: dict[str, Callable[[], object]] = {
        "Ed25519 verify (baseline)": lambda: key.public.is_valid(signed.signature, signed.body),
        "  … OpenSSL's (cryptography), not used": lambda: openssl.verify(
            signed.signature, signed.body
        ),
        "authority rules (ledger/authority.py)": lambda: authority.check(
            signed.event, signed.body, now, view
        ),
        "single-use key, SHA-256(actor, event_id)": lambda: event_key(signed.actor, event_id),
        "chain: canonical envelope + SHA-256": envelope,
        "Merkle leaf + frontier": lambda: frontier.extend_with_subtrees(
            [tlog.entry_leaf(bytes(32))]
        ),
    }
    return {
        name: min(timeit.repeat(run, number=5000, repeat=repeat)) / 5000 * 1e6
        for name, run in measures.items()
    }


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
    root = Path(tempfile.mkdtemp(prefix="agentmesh-bench-"))  # removed at the end
    base_url = os.environ.get("AGENTMESH_DATABASE_URL")
    if base_url is None:
        server = EmbeddedPostgres(root).start()
        base_url = server.url
    try:
        print(f"cores: {os.cpu_count()}, events per round: {args.events}, rounds: {args.repeat}")
        sample = signed_events([SigningKey.generate()], args.events)
        one_count = max(args.events // 8, 500)
        peer_sample = {
            1: signed_events([SigningKey.generate() for _ in range(8)], one_count),
            64: signed_events([SigningKey.generate() for _ in range(64)], args.events),
        }
        counts = {1: one_count, 64: args.events}

        async def copy_round() -> tuple[float, float]:
            url = (await fresh_database(base_url))[0]
            return await wal_bytes_per_event(url, args.events, lambda: raw_copy(url, sample))

        async def ledger_round(concurrency: int) -> tuple[float, float]:
            url = (await fresh_database(base_url))[0]
            count = counts[concurrency]
            return await wal_bytes_per_event(
                url, count, lambda: ledger_appends(url, concurrency, count)
            )

        async def peer_round(concurrency: int) -> tuple[float, float]:
            url = (await fresh_database(base_url))[0]
            events = peer_sample[concurrency]
            return await wal_bytes_per_event(
                url,
                len(events),
                lambda: asyncio.to_thread(peer_appends, url, concurrency, events),
            )

        async def processes_round(processes: int) -> tuple[float, float]:
            url = (await fresh_database(base_url))[0]
            return await wal_bytes_per_event(
                url, args.events, lambda: process_appends(url, processes, args.events)
            )

        measures: dict[str, Callable[[], Awaitable[tuple[float, float]]]] = {
            "raw COPY (baseline)": copy_round,
            "ledger append, 1 appender": lambda: ledger_round(1),
            "ledger append, 64 appenders": lambda: ledger_round(64),
        }
        for n in args.processes:
            measures[f"ledger append, {n} process{'es' if n > 1 else ''} x 32"] = (
                lambda n=n: processes_round(n)  # type: ignore[misc]
            )
        if args.peer:
            measures["eventsourcing, 1 appender (peer)"] = lambda: peer_round(1)
            measures["eventsourcing, 64 threads (peer)"] = lambda: peer_round(64)
        rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in measures}
        for _ in range(args.repeat):  # interleaved, so drift hits every measure alike
            for name, run in measures.items():
                rounds[name].append(await run())
        results = {
            name: (
                statistics.median(r for r, _ in values),
                statistics.median(w for _, w in values),
            )
            for name, values in rounds.items()
        }
        ceiling = statistics.median(verify_ceiling() for _ in range(args.repeat))
        copy_rate = results["raw COPY (baseline)"][0]
        print(f"{'measure':34} {'events/s':>12} {'x raw COPY':>11} {'WAL B/event':>12}")
        for name, (rate, wal) in results.items():
            print(f"{name:34} {rate:12,.0f} {rate / copy_rate:11.3f} {wal:12,.0f}")
        print(f"{'Ed25519 verify, 1 core':34} {ceiling:12,.0f} {ceiling / copy_rate:11.3f}")
        costs = check_costs(max(args.repeat, 3))
        base = costs["Ed25519 verify (baseline)"]
        print(f"{'per-event check (CPU, best of rounds)':42} {'us':>8} {'x verify':>9}")
        for name, micros in costs.items():
            print(f"{name:42} {micros:8.2f} {micros / base:9.3f}")
        many = results["ledger append, 64 appenders"][0]
        target = "met" if many >= 5000 else "NOT met"
        print(f"target >= 5,000 agent-signed events/s with 64 appenders: {target}")
        if len(args.processes) > 1:
            one = results[
                f"ledger append, {args.processes[0]} process"
                f"{'es' if args.processes[0] > 1 else ''} x 32"
            ][0]
            for n in args.processes[1:]:
                total = results[f"ledger append, {n} processes x 32"][0]
                verdict = "met" if total >= one else "NOT met"
                print(
                    f"{n} processes / {args.processes[0]}: {total / one:.2f}x events/s "
                    f"(target: never below one process's: {verdict})"
                )
            for n in args.processes:  # how the processes shared the ledger
                c = PROCESS_COUNTS[n]
                commits = c["fast"] + c["optimistic"] + c["locked"]
                print(
                    f"  {n} process{'es' if n > 1 else ''}: {c['events'] / max(commits, 1):.1f} "
                    f"events/commit; commits fast {c['fast']}, optimistic {c['optimistic']}, "
                    f"locked {c['locked']}; turns waited {c['waited']}, handed over with a "
                    f"commit {c['handed']} of {c['offered']} offered, entries caught up "
                    f"{c['caught_up']}, guard misses {c['missed']} (all rounds)"
                )
        if args.peer:
            for n in (1, 64):
                ours = results[f"ledger append, {n} appender{'s' if n > 1 else ''}"]
                label = "1 appender" if n == 1 else "64 threads"
                peer = results[f"eventsourcing, {label} (peer)"]
                verdict = "met" if n > 1 or ours[0] >= peer[0] else "NOT met"
                print(
                    f"ledger / eventsourcing, {n:2} writer(s): {ours[0] / peer[0]:.2f}x events/s, "
                    f"{ours[1] / peer[1]:.2f}x WAL bytes per event"
                    + (f" (target >= 1.0x events/s: {verdict})" if n == 1 else "")
                )
        if server is None:
            print("WAL by relation: skipped (pg_waldump reads an embedded server's WAL only)")
        else:
            spans = {"ledger, 1 appender": ledger_wal_span}
            if args.peer:
                spans["eventsourcing, 1 appender (peer)"] = peer_wal_span
            for name, span_of in spans.items():
                url = (await fresh_database(base_url))[0]
                parts = await wal_by_relation(server, url, await span_of(url, one_count), one_count)
                print(
                    f"WAL bytes per event by relation, {name} ({one_count} single appends, "
                    f"pg_waldump): {sum(parts.values()):,.0f} in all"
                )
                for relation, size in parts.items():
                    print(f"  {relation:40} {size:8,.1f}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    end_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=12_800)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--no-peer", dest="peer", action="store_false", help="skip the eventsourcing peer"
    )
    parser.add_argument(
        "--processes",
        type=lambda text: [int(n) for n in text.split(",") if n],
        default=[1, 2, 4],
        help="appending processes to measure, comma-separated ('' for none)",
    )
    asyncio.run(main(parser.parse_args()))
