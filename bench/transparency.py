"""The transparency log's costs, each beside its baseline from the same run.

Prints (medians of ``--repeat`` rounds where there are rounds):
  * ledger appends (64 appenders, one agent-signed event each) with the Merkle
    tree maintained vs the same appends with the tree's work removed (the
    tree's hashing and its stored subtrees stubbed out *in this bench only*):
    the ratio is what the tree costs the write path (target >= 0.9);
  * for each ledger size in ``--entries`` (default 1M and 10M): the ledger built
    with real signatures and chain (bench/ledger_gen.py), the seconds its tree
    takes at first open, and inclusion and consistency proof generation,
    p50/p99 per proof (medians over ``--repeat`` rounds), through the PostgreSQL
    adapter (what ``GET /v1/ledger/proofs/*`` does, minus HTTP; target p99 <= 5 ms
    at 10M);
  * an audit bundle of the last ``--bundle`` events of the largest ledger (an
    inclusion proof on every event, against the tree of the whole ledger):
    export time and size, and ``verify_bundle`` events/s with every signature and
    with the chain only, each beside the same bundle without per-event proofs
    (format version 1, re-signed) and beside this machine's SHA-256 rate;
  * client-side verification of single inclusion proofs (proofs/s), for scale.

Usage: .venv/bin/python bench/transparency.py [--events 6400]
       [--entries 1000000,10000000] [--bundle 100000] [--proofs 2000] [--repeat 3]
Uses AGENTMESH_DATABASE_URL when set, else an embedded PostgreSQL. Each ledger
is dropped after its figures (10M entries take about 10 GB while they exist).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.append import ledger_appends
from bench.common import drop_database, end_on_sigterm, fresh_database, servers
from bench.ledger_gen import generate_ledger
from ledger import merkle, tlog
from ledger.audit import export_bundle, verify_bundle
from ledger.audit.bundle import FORMAT_VERSION, Manifest
from ledger.audit.proofs import RootMemo
from ledger.chain import Head
from ledger.identity import SigningKey, b64encode
from ledger.merkle import Frontier, Subtree
from ledger.postgres import PostgresEventStore
from ledger.signatures import make_executor


@contextmanager
def tree_off() -> Iterator[None]:
    """The tree's work removed: no leaf hashing, no frontier kept, no subtrees stored
    (checkpoints sign an empty tree). A bench-only patch: the product has no switch
    to turn tamper evidence off."""
    original_leaf, original_extend = tlog.entry_leaf, Frontier.extend_with_subtrees
    original_edge = PostgresEventStore._frontier_at_head

    def no_subtrees(self: Frontier, leaves: Iterable[bytes]) -> tuple[Frontier, list[Subtree]]:
        for _ in leaves:
            pass
        return self, []

    async def empty_edge(self: PostgresEventStore, head: Head) -> Frontier:
        return Frontier()

    tlog.entry_leaf = lambda entry_hash: entry_hash
    Frontier.extend_with_subtrees = no_subtrees  # type: ignore[method-assign]
    PostgresEventStore._frontier_at_head = empty_edge  # type: ignore[method-assign]
    try:
        yield
    finally:
        tlog.entry_leaf = original_leaf
        Frontier.extend_with_subtrees = original_extend  # type: ignore[method-assign]
        PostgresEventStore._frontier_at_head = original_edge  # type: ignore[method-assign]


async def append_rate(base_url: str, events: int, tree: bool) -> float:
    url, _ = await fresh_database(base_url)
    if tree:
        return await ledger_appends(url, 64, events)
    with tree_off():
        return await ledger_appends(url, 64, events)


async def build_ledger(base_url: str, entries: int) -> tuple[str, str, SigningKey, float, float]:
    """A ledger of ``entries`` real entries (signed, chained: bench/ledger_gen.py):
    (URL, database name, key, seconds to generate, seconds the store took to build
    its Merkle tree over them when first opened: what upgrading a ledger costs once)."""
    url, name = await fresh_database(base_url)
    generated = await generate_ledger(url, events=entries, agents=1000)
    started = time.perf_counter()
    store = await PostgresEventStore.open(url, generated.ledger_key)
    try:
        built = time.perf_counter() - started
        await store.checkpoint()
    finally:
        await store.close()
    return url, name, generated.ledger_key, generated.seconds, built


async def proof_latency(
    url: str, key: SigningKey, proofs: int, seed: int
) -> dict[str, list[float]]:
    """One round: ``proofs`` inclusion and consistency proofs of random positions
    against the whole tree, each timed alone (a fresh store each round)."""
    store = await PostgresEventStore.open(url, key)
    rng = random.Random(7 + seed)
    try:
        size = (await store.head()).position
        times: dict[str, list[float]] = {"inclusion": [], "consistency": []}
        for _ in range(proofs):
            position = rng.randint(1, size)
            start = time.perf_counter()
            await store.inclusion_proof(position, size)
            times["inclusion"].append(time.perf_counter() - start)
            first = rng.randint(1, size)
            start = time.perf_counter()
            await store.consistency_proof(first, size)
            times["consistency"].append(time.perf_counter() - start)
        return times
    finally:
        await store.close()


async def verify_rate(url: str, key: SigningKey, count: int) -> float:
    """Client-side: fetch nothing, verify ``count`` inclusion proofs against the root."""
    store = await PostgresEventStore.open(url, key)
    try:
        size = (await store.head()).position
        root = await store.tree_root(size)
        items = []
        for position in random.Random(3).sample(range(1, size + 1), min(count, size)):
            entry = await store.entry_at(position)
            assert entry is not None
            items.append(
                (
                    tlog.entry_leaf(entry.entry_hash),
                    position,
                    await store.inclusion_proof(position, size),
                )
            )
        start = time.perf_counter()
        for leaf, position, proof in items:
            merkle.verify_inclusion(leaf, position - 1, size, proof, root)
        return len(items) / (time.perf_counter() - start)
    finally:
        await store.close()


@dataclass
class BundleFigures:
    events: int
    export_seconds: float
    size: int  # bytes, with a proof on every event
    size_without: int  # the same bundle without them
    verify: dict[str, float]  # events/s by label


def without_proofs(text: str, key: SigningKey) -> str:
    """The same bundle as format version 1: no ``inclusion``, the manifest re-signed."""
    out = []
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if '"kind":"event"' in line[:20]:
            item = json.loads(line)
            del item["inclusion"]
            line = json.dumps(item, separators=(",", ":"), ensure_ascii=False)
        elif number == 0:
            line = line.replace(f'"format_version":{FORMAT_VERSION}', '"format_version":1', 1)
        elif number == len(lines) - 1:
            manifest = msgspec.json.decode(line, type=Manifest)
            unsigned = msgspec.structs.replace(
                manifest, format_version=1, signature="", keys_digest=None, generated_at=None
            )
            signed = msgspec.structs.replace(
                unsigned, signature=b64encode(key.sign(unsigned.signed_bytes()))
            )
            line = msgspec.json.encode(signed).decode()
        out.append(line)
    return "\n".join(out) + "\n"


async def bundle_figures(
    url: str, key: SigningKey, events: int, repeat: int, directory: Path
) -> BundleFigures:
    """Export the last ``events`` entries (an inclusion proof each, against the tree of
    the whole ledger), then verify that bundle and the same without proofs."""
    store = await PostgresEventStore.open(url, key)
    try:
        size = (await store.head()).position
        first = await store.entry_at(max(size - events + 1, 1))
        last = await store.entry_at(size)
        assert first is not None
        assert last is not None
        path = directory / "bundle.jsonl"
        started = time.perf_counter()
        with path.open("w", encoding="utf-8") as out:
            manifest = await export_bundle(
                store,
                key,
                out,
                start=first.recorded_at,
                end=last.recorded_at + timedelta(microseconds=1),
            )
        export_seconds = time.perf_counter() - started
    finally:
        await store.close()
    count = manifest.count
    plain = directory / "bundle-v1.jsonl"
    plain.write_text(without_proofs(path.read_text(encoding="utf-8"), key), encoding="utf-8")
    rates: dict[str, list[float]] = {}
    executor = make_executor(os.cpu_count() or 1)
    try:
        verify_bundle(plain, executor=executor, signatures=False)  # warm the pool
        for _ in range(repeat):
            for label, bundle, signatures in (
                ("with proofs, signatures", path, True),
                ("without proofs, signatures", plain, True),
                ("with proofs, chain only", path, False),
                ("without proofs, chain only", plain, False),
            ):
                started = time.perf_counter()
                report = verify_bundle(bundle, executor=executor, signatures=signatures)
                elapsed = time.perf_counter() - started
                assert report.events == count
                rates.setdefault(label, []).append(count / elapsed)
    finally:
        executor.shutdown()
    # the proofs alone, in one process (what they add to a worker's chunk)
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    proofs = [
        (tlog.entry_leaf(bytes.fromhex(x["entry_hash"])), x["position"] - 1, x["inclusion"])
        for x in lines
        if x["kind"] == "event"
    ]
    memo, started = RootMemo(), time.perf_counter()
    for leaf, index, inclusion in proofs:
        memo.root(leaf, index, inclusion["tree_size"], inclusion["hashes"])
    rates["proofs alone, 1 core"] = [len(proofs) / (time.perf_counter() - started)]
    return BundleFigures(
        events=count,
        export_seconds=export_seconds,
        size=path.stat().st_size,
        size_without=plain.stat().st_size,
        verify={label: statistics.median(values) for label, values in rates.items()},
    )


def sha256_rate(seconds: float = 0.5) -> float:
    data, count, start = b"\x01" + bytes(64), 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(1000):
            hashlib.sha256(data).digest()
        count += 1000
    return count / (time.perf_counter() - start)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(args: argparse.Namespace) -> None:
    sizes = [int(x) for x in args.entries.split(",") if x]  # "" : the append ratio alone
    with (
        tempfile.TemporaryDirectory(prefix="agentmesh-bench-") as made,
        servers(directory := Path(made)) as (base_url, _, _),
    ):
        print(f"appends: {args.events} events x {args.repeat} rounds, 64 appenders")
        on, off = [], []
        for _ in range(args.repeat):  # interleaved, so noise hits both alike
            off.append(await append_rate(base_url, args.events, tree=False))
            on.append(await append_rate(base_url, args.events, tree=True))
        tree_on, tree_off_rate = statistics.median(on), statistics.median(off)
        print(f"{'append, tree off (baseline)':40} {tree_off_rate:10,.0f} events/s")
        print(f"{'append, tree on':40} {tree_on:10,.0f} events/s  x{tree_on / tree_off_rate:.3f}")
        for entries in sizes:
            print(f"building a ledger of {entries:,} entries ...", flush=True)
            url, name, key, generated, tree_seconds = await build_ledger(base_url, entries)
            print(
                f"  generated in {generated:.0f} s ({entries / generated:,.0f} entries/s); "
                f"the tree built over them at first open in {tree_seconds:.1f} s "
                f"({entries / tree_seconds:,.0f} entries/s)"
            )
            rounds = [
                await proof_latency(url, key, args.proofs, seed) for seed in range(args.repeat)
            ]
            for kind in rounds[0]:
                p50s = [quantile(r[kind], 0.5) * 1e3 for r in rounds]
                p99s = [quantile(r[kind], 0.99) * 1e3 for r in rounds]
                label = f"{kind} proof at {entries:,}"
                print(
                    f"{label:40} p50 {statistics.median(p50s):.2f} ms  "
                    f"p99 {statistics.median(p99s):.2f} ms  (median of {len(rounds)} rounds "
                    f"of {args.proofs}; rounds' p99 {', '.join(f'{v:.2f}' for v in p99s)})",
                    flush=True,
                )
            if entries == max(sizes):
                rate = sha256_rate()
                verified = await verify_rate(url, key, args.proofs)
                print(f"{'SHA-256 (65-byte input)':40} {rate:10,.0f} hashes/s")
                label = f"single inclusion proofs at {entries:,}"
                print(
                    f"{label:40} {verified:10,.0f} proofs/s  (= {rate / verified:.0f} SHA-256 each)"
                )
                figures = await bundle_figures(url, key, args.bundle, args.repeat, directory)
                n = figures.events
                print(
                    f"bundle of the last {n:,} events (tree of {entries:,}): exported in "
                    f"{figures.export_seconds:.1f} s ({n / figures.export_seconds:,.0f} events/s); "
                    f"{figures.size / n:,.0f} bytes/event with proofs, "
                    f"{figures.size_without / n:,.0f} without "
                    f"(x{figures.size / figures.size_without:.2f})"
                )
                for label, value in figures.verify.items():
                    print(
                        f"  verify, {label:36} {value:10,.0f} events/s  "
                        f"(= {rate / value:.1f} SHA-256 each)"
                    )
                (directory / "bundle.jsonl").unlink()
                (directory / "bundle-v1.jsonl").unlink()
            await drop_database(base_url, name)


if __name__ == "__main__":
    end_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=6400)
    parser.add_argument("--entries", default="1000000,10000000", help="ledger sizes, by commas")
    parser.add_argument("--bundle", type=int, default=100_000)
    parser.add_argument("--proofs", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
