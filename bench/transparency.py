"""The transparency log's costs, each beside its baseline from the same run.

Prints (medians of ``--repeat`` rounds):
  * ledger appends (64 appenders, one agent-signed event each) with the Merkle
    tree maintained vs the same appends with the tree's work removed (the
    tree's hashing and its stored subtrees stubbed out *in this bench only*):
    the ratio is what the tree costs the write path (target >= 0.9);
  * inclusion and consistency proof generation, p50/p99 per proof, through the
    PostgreSQL adapter (what ``GET /v1/ledger/proofs/*`` does, minus HTTP), on a
    ledger of ``--entries`` entries built with real signatures and chain;
  * SHA-256 rate on this machine, and verification of every entry's inclusion
    proof client-side (proofs/s), for scale.

Usage: .venv/bin/python bench/transparency.py [--events 6400] [--entries 100000]
       [--proofs 2000] [--repeat 3]
Uses AGENTMESH_DATABASE_URL when set, else an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.append import ledger_appends
from bench.common import fresh_database, servers
from bench.ledger_gen import generate_ledger
from ledger import merkle, tlog
from ledger.chain import Head
from ledger.identity import SigningKey
from ledger.merkle import Frontier, Subtree
from ledger.postgres import PostgresEventStore


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


async def build_ledger(base_url: str, entries: int) -> tuple[str, SigningKey, float]:
    """A ledger of ``entries`` real entries (signed, chained: bench/ledger_gen.py), and
    the seconds the store took to build its Merkle tree over them when first opened
    (what upgrading an existing ledger costs once)."""
    url, _ = await fresh_database(base_url)
    generated = await generate_ledger(url, events=entries, agents=1000)
    started = time.perf_counter()
    store = await PostgresEventStore.open(url, generated.ledger_key)
    try:
        built = time.perf_counter() - started
        await store.checkpoint()
    finally:
        await store.close()
    return url, generated.ledger_key, built


async def proof_latency(url: str, key: SigningKey, proofs: int) -> dict[str, list[float]]:
    store = await PostgresEventStore.open(url, key)
    rng = random.Random(7)
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
    with servers(Path(tempfile.mkdtemp(prefix="agentmesh-bench-"))) as (base_url, _, _):
        print(f"appends: {args.events} events x {args.repeat} rounds, 64 appenders")
        on, off = [], []
        for _ in range(args.repeat):  # interleaved, so noise hits both alike
            off.append(await append_rate(base_url, args.events, tree=False))
            on.append(await append_rate(base_url, args.events, tree=True))
        tree_on, tree_off_rate = statistics.median(on), statistics.median(off)
        print(f"{'append, tree off (baseline)':36} {tree_off_rate:10,.0f} events/s")
        print(f"{'append, tree on':36} {tree_on:10,.0f} events/s  x{tree_on / tree_off_rate:.3f}")
        print(f"building a ledger of {args.entries:,} entries for the proofs ...")
        started = time.perf_counter()
        url, key, tree_seconds = await build_ledger(base_url, args.entries)
        print(
            f"  generated in {time.perf_counter() - started:.0f} s; the tree built over them "
            f"at first open in {tree_seconds:.1f} s ({args.entries / tree_seconds:,.0f} entries/s)"
        )
        times = await proof_latency(url, key, args.proofs)
        for kind, values in times.items():
            p50, p99 = quantile(values, 0.5) * 1e3, quantile(values, 0.99) * 1e3
            label = f"{kind} proof at {args.entries:,}"
            print(f"{label:36} p50 {p50:.2f} ms  p99 {p99:.2f} ms")
        rate = sha256_rate()
        verified = await verify_rate(url, key, args.proofs)
        print(f"{'SHA-256 (65-byte input)':36} {rate:10,.0f} hashes/s")
        per_proof = rate / verified  # hashes' worth of time per verified proof
        label = "inclusion proofs verified"
        print(f"{label:36} {verified:10,.0f} proofs/s  (= {per_proof:.0f} SHA-256 each)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=6400)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--proofs", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
