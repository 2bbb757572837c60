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

With ``--scale 100000,2000000`` it measures instead what the scale run's audit rows
measure (``bench/scale.py``), at each of those ledger sizes (agents: size /
``--events-per-agent``, as the scale run keeps the events per agent): the export
of the newest ``--export-events`` events (jsonl, every event with its inclusion
proof) — events/s, and the seconds before the first line (the range and the key
entries) — and the offline verification of that bundle with every signature
(``verify_bundle`` on a warmed pool, one worker per core), with the ratio of each
size's figure to the first size's: the scale target is a ratio >= 0.8.

Usage: .venv/bin/python bench/audit.py [--events 200000] [--agents 1000] [--repeat 3]
       .venv/bin/python bench/audit.py --scale 100000,2000000 [--export-events 50000]
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
from bench.common import drop_database, end_on_sigterm, fresh_database, positive
from bench.ledger_gen import GeneratedLedger, generate_ledger
from ledger.audit import Flavour, export_bundle, read_bundle, verify_bundle
from ledger.audit.export import prepare_export
from ledger.events import decode_body
from ledger.identity import VerifyKey
from ledger.postgres import PostgresLedgerReader
from ledger.postgres.tree import build_tree
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


def sizes(text: str) -> list[int]:
    """argparse type: comma-separated positive integers (underscores allowed)."""
    return [positive(part.strip()) for part in text.split(",") if part.strip()]


async def generate(url: str, events: int, agents: int) -> GeneratedLedger:
    """A ledger written in bulk, with its Merkle tree built (as at the store's first open)."""
    ledger = await generate_ledger(url, events=events, agents=agents)
    started = time.perf_counter()
    reader = await PostgresLedgerReader.connect(url)
    try:
        await build_tree(reader.pool)
    finally:
        await reader.close()
    print(
        f"generated {ledger.head_position:,} events in {ledger.seconds:.1f} s "
        f"(Merkle tree {time.perf_counter() - started:.1f} s): "
        f"{len(ledger.agents):,} agents, {ledger.checkpoints:,} checkpoints"
    )
    return ledger


async def build(args: argparse.Namespace, url: str, root: Path, figures: Figures) -> int:
    ledger = await generate(url, args.events, args.agents)
    await export_figures(url, ledger, root, args.repeat, figures)
    return ledger.head_position


# -- scale: the newest events of ledgers of growing size -------------------------------


@dataclass
class ScaleFigures:
    """One size's rounds: export and verify in events/s, the export's seconds before
    its first entry line (range, key entries, header), the bundle's bytes and keys."""

    events: int
    export: list[float]
    prelude: list[float]
    verify: list[float]
    keys: int = 0
    size: int = 0


async def newest_span(
    reader: PostgresLedgerReader, first: int, last: int
) -> tuple[datetime, datetime]:
    """The recorded_at range of positions first..last (the scale run's export range)."""
    low = await reader.pool.fetchval("SELECT recorded_at FROM events WHERE position = $1", first)
    high = await reader.pool.fetchval("SELECT recorded_at FROM events WHERE position = $1", last)
    return low, high + timedelta(microseconds=1)


async def scale_export(
    url: str, ledger: GeneratedLedger, count: int, path: Path, rounds: int, out: ScaleFigures
) -> None:
    reader = await PostgresLedgerReader.connect(url)
    try:
        span = await newest_span(reader, ledger.head_position - count + 1, ledger.head_position)
        for _ in range(rounds):
            start = time.perf_counter()
            export = await prepare_export(reader, ledger.ledger_key, start=span[0], end=span[1])
            with path.open("w", encoding="utf-8") as handle:
                chunks = export.chunks()
                handle.write(await anext(chunks))  # header, key entries, the tree's edge
                out.prelude.append(time.perf_counter() - start)
                async for text in chunks:
                    handle.write(text)
                out.size = handle.tell()
            elapsed = time.perf_counter() - start
            assert export.manifest is not None
            assert export.manifest.count == count
            out.export.append(count / elapsed)
            out.keys = export.manifest.keys
    finally:
        await reader.close()


def scale_verify(
    path: Path, executor: Executor, count: int, rounds: int, out: ScaleFigures
) -> None:
    for _ in range(rounds):
        out.verify.append(verify_rate(path, executor, True, count))


async def scale_size(
    args: argparse.Namespace, server_url: str, root: Path, events: int, executor: Executor
) -> ScaleFigures:
    agents = max(2, events // args.events_per_agent)
    print(f"\n{events:,} events, {agents:,} agents")
    url, name = await fresh_database(server_url)
    out = ScaleFigures(events=events, export=[], prelude=[], verify=[])
    path = root / f"scale-{events}.jsonl"
    try:
        ledger = await generate(url, events, agents)
        count = min(args.export_events, ledger.head_position)
        await scale_export(url, ledger, count, path, args.repeat, out)
        await asyncio.to_thread(scale_verify, path, executor, count, args.repeat, out)
    finally:
        path.unlink(missing_ok=True)
        if "AGENTMESH_DATABASE_URL" in os.environ:
            await drop_database(server_url, name)
    median = statistics.median
    print(
        f"  export {median(out.export):,.0f} events/s (rounds "
        f"{', '.join(f'{r:,.0f}' for r in out.export)}; first line after "
        f"{median(out.prelude):.2f} s), verify {median(out.verify):,.0f} events/s (rounds "
        f"{', '.join(f'{r:,.0f}' for r in out.verify)}); {out.keys:,} key entries, "
        f"{out.size / count:,.0f} B/event"
    )
    return out


def scale_report(sizes: list[ScaleFigures], export_events: int) -> None:
    median = statistics.median
    base = sizes[0]
    print(f"\nthe newest {export_events:,} events (medians of rounds; ratio to {base.events:,})")
    print(
        f"{'ledger size':>12} {'export/s':>10} {'ratio':>6} {'prelude s':>10} "
        f"{'verify/s':>10} {'ratio':>6} {'keys':>8}"
    )
    for size in sizes:
        export, verify = median(size.export), median(size.verify)
        print(
            f"{size.events:>12,} {export:>10,.0f} {export / median(base.export):>6.2f} "
            f"{median(size.prelude):>10.2f} {verify:>10,.0f} "
            f"{verify / median(base.verify):>6.2f} {size.keys:>8,}"
        )


async def scale(args: argparse.Namespace, server_url: str, root: Path) -> None:
    workers = os.cpu_count() or 1
    executor = make_executor(workers)
    try:
        list(executor.map(abs, range(2 * workers)))  # start every worker first
        sizes = [await scale_size(args, server_url, root, n, executor) for n in args.scale]
    finally:
        executor.shutdown()
    scale_report(sizes, args.export_events)


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
    events = ", ".join(f"{n:,}" for n in args.scale) if args.scale else f"{args.events:,}"
    print(
        f"cores: {os.cpu_count()}, events: {events}, rounds: {args.repeat}, "
        f"load average: {os.getloadavg()[0]:.2f}"
    )
    try:
        with server(root) as server_url:
            if args.scale:
                asyncio.run(scale(args, server_url, root))
            else:
                asyncio.run(with_database(args, server_url, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    end_on_sigterm()
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--scale",
        type=sizes,
        default=None,
        help="ledger sizes, comma-separated (e.g. 100000,2000000): the newest events' "
        "export and verification at each",
    )
    parser.add_argument("--export-events", type=positive, default=50_000)
    parser.add_argument("--events-per-agent", type=positive, default=100)
    main(parser.parse_args())
