"""Audit bundles: export and offline verification throughput, each beside a baseline.

Prints, from one run (medians of ``--repeat`` rounds), over a ledger of ``--events``
events written in bulk by ``bench/ledger_gen.py`` (real signatures, real chain):

  * export — ``export_bundle`` of the whole ledger to a file, in both flavours:
    events/s and bytes per event; baseline: the raw read of the same entries
    (``PostgresLedgerReader.iter_entries``, batch 2,000, nothing written);
  * offline verification of the chain and checkpoint only —
    ``verify_bundle(signatures=False)``: events/s; baseline: SHA-256 of the same
    bytes (``prev_hash ‖ envelope`` of every event) on one core; target
    >= 300,000 events/s, set for format-1 bundles: since format 2 the chain
    check also follows every event's inclusion proof (~15 SHA-256 more per
    event at 10M entries), so this figure now measures that larger work;
  * offline verification with every event signature — ``verify_bundle``:
    events/s; baseline: Ed25519 verification of the same (key, signature, body)
    jobs with ``verify_signature_chunk`` on a process pool of one worker per
    core; target >= 0.8x.

Both verifications get the same warmed process pool as their baselines (one
worker per core), so pool start-up is in neither.

Usage: .venv/bin/python bench/audit.py [--events 200000] [--agents 1000] [--repeat 3]
Uses AGENTMESH_DATABASE_URL (a fresh database is created on that server) when
set, else an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentmesh.embedded import EmbeddedPostgres
from bench.common import drop_database, fresh_database
from bench.ledger_gen import GeneratedLedger, generate_ledger
from ledger.audit import Flavour, export_bundle, read_bundle, verify_bundle
from ledger.events import decode_body
from ledger.identity import VerifyKey
from ledger.postgres import PostgresLedgerReader
from ledger.verify import CHUNK, KeyRing, SignatureJob, make_executor, verify_signature_chunk

FLAVOURS: tuple[Flavour, ...] = ("jsonl", "cloudevents")
SHA_TARGET = 300_000
ED25519_TARGET = 0.8


@dataclass
class Figures:
    """Medians over rounds; ``rates`` in events/s."""

    rates: dict[str, list[float]]
    sizes: dict[str, int]

    def rate(self, name: str) -> float:
        return statistics.median(self.rates[name])


# -- servers ---------------------------------------------------------------------------


@contextlib.contextmanager
def server(root: Path) -> Iterator[str]:
    """A PostgreSQL server URL: from the environment, else embedded."""
    url = os.environ.get("AGENTMESH_DATABASE_URL")
    if url is not None:
        yield url
        return
    postgres = EmbeddedPostgres(root / "pg").start()
    try:
        yield postgres.url
    finally:
        postgres.stop()


# -- export ------------------------------------------------------------------------------


async def raw_read(reader: PostgresLedgerReader, expected: int) -> float:
    """Baseline: stream every entry from PostgreSQL, write nothing."""
    count, start = 0, time.perf_counter()
    async for _ in reader.iter_entries(after=0, batch=2000):
        count += 1
    elapsed = time.perf_counter() - start
    assert count == expected, f"read {count} entries"
    return count / elapsed


async def export_once(
    reader: PostgresLedgerReader,
    ledger: GeneratedLedger,
    span: tuple[datetime, datetime],
    flavour: Flavour,
    path: Path,
) -> float:
    start = time.perf_counter()
    with path.open("w", encoding="utf-8") as handle:
        manifest = await export_bundle(
            reader, ledger.ledger_key, handle, start=span[0], end=span[1], fmt=flavour
        )
    elapsed = time.perf_counter() - start
    assert manifest.count == ledger.head_position, manifest
    return manifest.count / elapsed


async def export_figures(
    url: str, ledger: GeneratedLedger, root: Path, rounds: int, figures: Figures
) -> None:
    reader = await PostgresLedgerReader.connect(url)
    try:
        row = await reader.pool.fetchrow(
            "SELECT min(recorded_at) AS low, max(recorded_at) AS high FROM events"
        )
        span = (row["low"], row["high"] + timedelta(microseconds=1))
        for _ in range(rounds):
            figures.rates.setdefault("read", []).append(
                await raw_read(reader, ledger.head_position)
            )
            for flavour in FLAVOURS:
                path = root / f"bundle.{flavour}.jsonl"
                rate = await export_once(reader, ledger, span, flavour, path)
                figures.rates.setdefault(f"export {flavour}", []).append(rate)
                figures.sizes[flavour] = path.stat().st_size
    finally:
        await reader.close()


# -- verification ----------------------------------------------------------------------


def baseline_inputs(path: Path) -> tuple[list[bytes], list[SignatureJob]]:
    """The bytes the chain hashes, and the signature jobs, of every event in the bundle
    (keys folded in position order, as the ledger's own verifier does)."""
    bundle = read_bundle(path)
    ring = KeyRing(VerifyKey.from_pem(bundle.header.ledger_public_key))
    keys = {record.position: record for record in bundle.keys}
    events = {record.position: record for record in bundle.events}
    hashed: list[bytes] = []
    jobs: list[SignatureJob] = []
    for position in sorted(keys.keys() | events.keys()):
        record = events.get(position) or keys[position]
        event = decode_body(record.body)
        if position in events:
            hashed.append(record.prev_hash + record.envelope())
            key = ring.key_for(position, event)
            jobs.append((position, key, record.signature, record.body))
        ring.advance(position, event)
    return hashed, jobs


def sha256_rate(hashed: list[bytes]) -> float:
    start = time.perf_counter()
    for data in hashed:
        hashlib.sha256(data).digest()
    return len(hashed) / (time.perf_counter() - start)


def ed25519_rate(executor: Executor, jobs: list[SignatureJob]) -> float:
    chunks = [jobs[i : i + CHUNK] for i in range(0, len(jobs), CHUNK)]
    start = time.perf_counter()
    bad = [p for result in executor.map(verify_signature_chunk, chunks) for p in result]
    elapsed = time.perf_counter() - start
    assert not bad, f"{len(bad)} signatures do not verify"
    return len(jobs) / elapsed


def verify_rate(path: Path, executor: Executor, signatures: bool, expected: int) -> float:
    start = time.perf_counter()
    report = verify_bundle(path, signatures=signatures, executor=executor)
    elapsed = time.perf_counter() - start
    assert report.events == expected, report
    return expected / elapsed


def verify_figures(root: Path, expected: int, rounds: int, figures: Figures) -> None:
    workers = os.cpu_count() or 1
    executor = make_executor(workers)
    try:
        list(executor.map(abs, range(2 * workers)))  # start every worker first
        hashed, jobs = baseline_inputs(root / "bundle.jsonl.jsonl")
        add = figures.rates.setdefault
        for _ in range(rounds):
            add("sha256", []).append(sha256_rate(hashed))
            for flavour in FLAVOURS:
                path = root / f"bundle.{flavour}.jsonl"
                add(f"chain {flavour}", []).append(verify_rate(path, executor, False, expected))
        for _ in range(rounds):
            add("ed25519", []).append(ed25519_rate(executor, jobs))
            for flavour in FLAVOURS:
                path = root / f"bundle.{flavour}.jsonl"
                add(f"signed {flavour}", []).append(verify_rate(path, executor, True, expected))
    finally:
        executor.shutdown()


# -- report ------------------------------------------------------------------------------


def row(name: str, value: float, ratio: str = "", note: str = "") -> None:
    print(f"{name:46} {value:12,.0f} {ratio:>10} {note}")


def report(figures: Figures, events: int) -> None:
    rate = figures.rate
    print(f"\n{'measure (medians of rounds)':46} {'events/s':>12} {'x baseline':>10}")
    row("raw read, iter_entries (baseline)", rate("read"))
    for flavour in FLAVOURS:
        value = rate(f"export {flavour}")
        size = figures.sizes[flavour] / events
        row(f"export {flavour}", value, f"{value / rate('read'):.2f}", f"{size:,.0f} B/event")
    row("SHA-256 of the same bytes, 1 core (baseline)", rate("sha256"))
    for flavour in FLAVOURS:
        value = rate(f"chain {flavour}")
        met = "met" if value >= SHA_TARGET else "NOT met"
        ratio = f"{value / rate('sha256'):.2f}"
        note = f"target >= 300,000/s (format 1; now with proofs): {met}"
        row(f"verify chain+checkpoint+proofs, {flavour}", value, ratio, note)
    row("Ed25519 verify, all cores (baseline)", rate("ed25519"))
    for flavour in FLAVOURS:
        value = rate(f"signed {flavour}")
        share = value / rate("ed25519")
        met = "met" if share >= ED25519_TARGET else "NOT met"
        row(f"verify every signature, {flavour}", value, f"{share:.2f}", f"target >= 0.8x: {met}")


# -- main ---------------------------------------------------------------------------------


async def build(args: argparse.Namespace, url: str, root: Path, figures: Figures) -> int:
    ledger = await generate_ledger(url, events=args.events, agents=args.agents)
    print(
        f"generated {ledger.head_position:,} events in {ledger.seconds:.1f} s: "
        f"{len(ledger.agents):,} agents, {ledger.checkpoints:,} checkpoints"
    )
    await export_figures(url, ledger, root, args.repeat, figures)
    return ledger.head_position


async def with_database(args: argparse.Namespace, server_url: str, root: Path) -> None:
    figures = Figures(rates={}, sizes={})
    url, name = await fresh_database(server_url)
    try:
        events = await build(args, url, root, figures)
    finally:
        if "AGENTMESH_DATABASE_URL" in os.environ:
            await drop_database(server_url, name)
    await asyncio.to_thread(verify_figures, root, events, args.repeat, figures)
    report(figures, events)


def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="agentmesh-bench-"))
    print(
        f"cores: {os.cpu_count()}, events: {args.events:,}, rounds: {args.repeat}, "
        f"load average: {os.getloadavg()[0]:.2f}"
    )
    try:
        with server(root) as server_url:
            asyncio.run(with_database(args, server_url, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    main(parser.parse_args())
