"""The API's metrics refresh beside its event loop: how long the loop waits for it.

With ``serve api --workers 1`` the state metrics (``api.metrics.read_stats``: every
agent document decoded and scored, every 5 s or longer) are refreshed on a thread of
the API's own process, which shares the interpreter lock with the event loop. A
loop woken by a socket or a timer while the refresh computes waits for that lock;
a request wakes the loop several times (its bytes, the verification, each database
round trip, the answer), so every wait adds up in its latency.

This bench measures that wait without the rest of the API: in one process, an event
loop (uvloop, as uvicorn runs it) handles a request every ``1 / --rate`` seconds
(open loop: a client process sends each on a socket when it is due, and its
latency counts from then to its answer, so a held loop shows in every request
behind it), each request
``--work-us`` of CPU on the loop (a single report costs ~500 µs there), while a
thread refreshes the metrics of ``--agents`` agent documents from a real Redis,
one refresh after another for the whole measure — each measure is *during* a
refresh; an API spends ~1-3 % of its time there. (One wake-up per request here; a
single report wakes the API's loop several times, so it waits several times as
long.) Three ways, in turn, each round:

* ``no refresh`` — the baseline;
* ``every 64 documents`` — the lock handed over (``time.sleep(0)``) every 64
  documents, as the API did before 2026-12-02;
* ``api.metrics`` — the refresh as it is (``read_stats`` with ``_release_lock``:
  the lock handed over whenever held ``HOLD_SECONDS``, then left alone four times
  as long).

Printed per way, medians of ``--repeat`` rounds: the loop's latency p50 / p99 / max,
the p99 over the baseline's, and one refresh's CPU and wall time.

Usage: .venv/bin/python bench/metrics_refresh.py [--agents 2000] [--rate 1000]
           [--work-us 500] [--seconds 5] [--repeat 3]
Uses AGENTMESH_REDIS_HOST/AGENTMESH_REDIS_PORT when set, else an embedded Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from api.metrics import _release_lock, read_stats
from bench.common import end_on_sigterm, no_collector_pauses, percentile, redis_address
from ledger.timefmt import format_time
from projections.config import TrustConfig
from projections.documents import Batch, Meta, decode_trust_only, encode
from projections.readstore import ProjectionReader
from projections.store_redis import RedisProjectionStore
from projections.trust import to_micros

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
WAYS = ("no refresh", "every 64 documents", "api.metrics")


def agent_doc(did: str, index: int, status: str = "active", detail: str = "") -> bytes:
    """An agent document as the projector writes it (a registry record and trust),
    its figures varied by ``index`` (the tests of the metrics read use it too)."""
    base_at = format_time(datetime(2026, 11, 1, 12, index % 60, tzinfo=UTC))
    return encode(
        {
            "grants_in": [],
            "registry": {"did": did, "status": status, "detail": detail},
            "trust": {
                "base_at": base_at,
                "base_milli": 500_000 + index * 997 % 400_000,
                "decay_from": base_at,
                "did": did,
                "handshakes_completed": index % 3,
                "handshakes_failed": 0,
                "partners": {},
                "peers": {},
                "position": index,
                "positives": index % 5,
                "violations": {"low": index % 2, "medium": 0, "high": 0, "critical": 0},
            },
        }
    )


def _hand_over() -> None:
    time.sleep(0)  # the lock released and taken back, as the API's refresh did


async def every_64_documents(reader: ProjectionReader) -> None:
    """The refresh as the API ran it before: the same reads and arithmetic as
    ``read_stats``, the lock handed over every 64 documents."""
    config, now_us, count = reader.config, to_micros(NOW), 0
    async for raw in reader.store.all_agent_docs():
        count += 1
        if count % 64 == 0:
            _hand_over()
        decode_trust_only(raw).score_and_tier(config, now_us)


@dataclass
class Refresher:
    """Refreshes back to back on a thread of its own until stopped."""

    host: str
    port: int
    prefix: str
    way: str
    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    first: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            asyncio.run(self._refresh())
        finally:
            self.first.set()  # a failed refresh does not leave the measure waiting

    async def _refresh(self) -> None:
        store = RedisProjectionStore.connect(self.host, self.port, prefix=self.prefix)
        reader = ProjectionReader(store, TrustConfig())
        try:
            while not self.stop.is_set():
                cpu, wall = time.thread_time(), time.perf_counter()
                if self.way == "api.metrics":
                    await read_stats(reader, NOW, _release_lock)
                else:
                    await every_64_documents(reader)
                self.cpu.append(time.thread_time() - cpu)
                self.wall.append(time.perf_counter() - wall)
                self.first.set()
        finally:
            await store.close()


def spin(seconds: float) -> None:
    """CPU on the loop, as a request's handling is (pure Python: it holds the lock)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def client(sock: socket.socket, rate: float, count: int, out: Any) -> None:
    """In a process of its own (its interpreter lock is not the loop's): request ``i``
    (8 bytes) sent when due at ``start + i / rate``; its latency runs from when it
    was due to its answer."""

    async def run() -> list[float]:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection(sock=sock)
        start = time.perf_counter() + 0.05
        latencies: list[float] = []

        async def answers() -> None:
            for _ in range(count):
                index = int.from_bytes(await reader.readexactly(8), "big")
                latencies.append(time.perf_counter() - (start + index / rate))

        receiving = loop.create_task(answers())
        for index in range(count):
            wait = start + index / rate - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(index.to_bytes(8, "big"))
        await receiving
        writer.close()
        return latencies

    out.send(sorted(uvloop.run(run())))


async def loop_latencies(rate: float, seconds: float, work: float) -> list[float]:
    """Open loop against this event loop: a client process sends a request when it is
    due; the loop spends ``work`` of CPU on each and answers."""
    count = round(rate * seconds)
    ours, theirs = socket.socketpair()
    results, sent = multiprocessing.get_context("fork").Pipe(duplex=False)
    process = multiprocessing.get_context("fork").Process(
        target=client, args=(theirs, rate, count, sent), daemon=True
    )
    process.start()
    theirs.close()
    reader, writer = await asyncio.open_connection(sock=ours)
    try:
        for _ in range(count):
            request = await reader.readexactly(8)
            spin(work)
            writer.write(request)
        latencies: list[float] = await asyncio.to_thread(results.recv)
    finally:
        writer.close()
        await asyncio.to_thread(process.join)
    return latencies


@dataclass
class Figures:
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    worst: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)


async def measure(
    args: argparse.Namespace, host: str, port: int, prefix: str, way: str
) -> tuple[list[float], Refresher | None]:
    refresher = None if way == "no refresh" else Refresher(host, port, prefix, way)
    thread = None
    if refresher is not None:
        thread = threading.Thread(target=refresher.run, name="metrics-refresh", daemon=True)
        thread.start()
        await asyncio.to_thread(refresher.first.wait)  # connected, one refresh done
    try:
        with no_collector_pauses():
            latencies = await loop_latencies(args.rate, args.seconds, args.work_us / 1e6)
    finally:
        if refresher is not None and thread is not None:
            refresher.stop.set()
            await asyncio.to_thread(thread.join)
    return latencies, refresher


async def run(args: argparse.Namespace, host: str, port: int) -> None:
    prefix = f"bench{uuid.uuid4().hex[:8]}:"
    store = RedisProjectionStore.connect(host, port, prefix=prefix)
    docs = {f"did:mesh:{i:032x}": agent_doc(f"did:mesh:{i:032x}", i) for i in range(args.agents)}
    meta = Meta(
        generation="g1",
        position=args.agents,
        recorded_at=None,
        registry_size=args.agents,
        updated_at=format_time(NOW),
        config={},
    )
    await store.replace_all(Batch(agents=docs, grants={}, meta=meta))
    figures = {way: Figures() for way in WAYS}
    try:
        for number in range(1, args.repeat + 1):
            for way in WAYS if number % 2 else WAYS[::-1]:
                latencies, refresher = await measure(args, host, port, prefix, way)
                found = figures[way]
                found.p50.append(percentile(latencies, 0.50) * 1000)
                found.p99.append(percentile(latencies, 0.99) * 1000)
                found.worst.append(latencies[-1] * 1000)
                if refresher is not None:
                    found.cpu.append(statistics.median(refresher.cpu) * 1000)
                    found.wall.append(statistics.median(refresher.wall) * 1000)
                print(
                    f"  round {number} {way:20} p50 {found.p50[-1]:7.2f} ms  "
                    f"p99 {found.p99[-1]:7.2f} ms  max {found.worst[-1]:7.2f} ms",
                    flush=True,
                )
    finally:
        await store.flush_for_tests()
        await store.close()
    report(args, figures)


def report(args: argparse.Namespace, figures: dict[str, Figures]) -> None:
    med: Callable[[list[float]], float] = statistics.median
    base = med(figures["no refresh"].p99)
    print(
        f"event loop at {args.rate:,.0f} requests/s of {args.work_us:g} µs each, "
        f"beside a refresh of {args.agents:,} agents: medians of {args.repeat} round(s)"
    )
    print(
        f"{'way':22} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'p99 ratio':>9} "
        f"{'refresh CPU ms':>15} {'refresh wall ms':>16}"
    )
    for way in WAYS:
        found = figures[way]
        cpu = f"{med(found.cpu):15.1f}" if found.cpu else f"{'-':>15}"
        wall = f"{med(found.wall):16.1f}" if found.wall else f"{'-':>16}"
        print(
            f"{way:22} {med(found.p50):8.2f} {med(found.p99):8.2f} {med(found.worst):8.2f} "
            f"{med(found.p99) / base:9.2f} {cpu} {wall}"
        )


def main() -> None:
    end_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--work-us", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="agentmesh-bench-") as root,
        redis_address(Path(root)) as (host, port),
    ):
        uvloop.run(run(args, host, port))


if __name__ == "__main__":
    main()
