"""Merkle core speed: SHA-256 rate, frontier appends, proof generation at 1M and 10M leaves.

Prints, from one run on this machine:
  * the SHA-256 rate on a node-sized input (the baseline every figure is bounded by),
  * frontier append rate: one leaf at a time, in batches, and in batches while
    collecting the completed subtrees a store would write,
  * inclusion and consistency proof generation p50/p99 (µs) at 1M leaves, reading
    complete-subtree hashes from an in-memory dict, and at 10M leaves, reading
    them from one bytearray per level (a dict of 20M hashes would take ~1.3 GB),
  * proof verification p50/p99 beside them.
Tree sizes and indexes are drawn at random, so most proofs need an incomplete
right subtree rebuilt from stored ones. Figures only: nothing here asserts on time.

Usage: .venv/bin/python bench/merkle.py [--proofs 20000] [--big 10000000]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ledger.merkle import (
    Frontier,
    HashAt,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_at,
    verify_consistency,
    verify_inclusion,
)

MILLION = 1_000_000
T = TypeVar("T")


def sha256_rate(seconds: float = 1.0) -> float:
    """SHA-256 calls per second on a 65-byte input (0x01 ‖ two hashes)."""
    data, sha256, count = b"\x01" + bytes(64), hashlib.sha256, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10_000):
            sha256(data).digest()
        count += 10_000
    return count / (time.perf_counter() - start)


def counter_leaves(start: int, stop: int) -> list[bytes]:
    return [leaf_hash(i.to_bytes(8, "big")) for i in range(start, stop)]


def rate(count: int, action: Callable[[], T]) -> tuple[float, T]:
    """Items per second of ``action`` over ``count`` items, and its result."""
    start = time.perf_counter()
    result = action()
    return count / (time.perf_counter() - start), result


def append_rates(leaves: list[bytes]) -> dict[tuple[int, int], bytes]:
    """Print append rates; return the 1M-leaf subtree dict built by the collecting run."""
    few = leaves[:200_000]

    def one_by_one() -> Frontier:
        frontier = Frontier()
        for leaf in few:
            frontier = frontier.append(leaf)
        return frontier

    def batched() -> Frontier:
        frontier = Frontier()
        for i in range(0, len(leaves), 1000):
            frontier = frontier.extend(leaves[i : i + 1000])
        return frontier

    def collecting() -> None:
        # A store writes each batch's subtrees and drops them: so does this loop.
        frontier = Frontier()
        for i in range(0, len(leaves), 1000):
            frontier, _done = frontier.extend_with_subtrees(leaves[i : i + 1000])

    single, _ = rate(len(few), one_by_one)
    batch, _ = rate(len(leaves), batched)
    collect, _ = rate(len(leaves), collecting)
    print(f"frontier append, one leaf per call:      {single:>12,.0f} leaves/s")
    print(f"frontier append, batches of 1000:         {batch:>12,.0f} leaves/s")
    print(f"  … collecting completed subtrees:        {collect:>12,.0f} leaves/s")
    return subtree_dict(leaves)


def subtree_dict(leaves: list[bytes]) -> dict[tuple[int, int], bytes]:
    """The in-memory store: every completed subtree, keyed by (level, index)."""
    frontier, store = Frontier(), {}
    gc.disable()  # millions of long-lived tuples: the collector would rescan them all
    try:
        for i in range(0, len(leaves), 1000):
            frontier, done = frontier.extend_with_subtrees(leaves[i : i + 1000])
            store.update({(s.level, s.index): s.hash for s in done})
    finally:
        gc.enable()
    gc.freeze()
    return store


def percentiles(samples_ns: list[int]) -> str:
    cuts = statistics.quantiles(samples_ns, n=100)
    return f"p50 {cuts[49] / 1000:7.1f} µs   p99 {cuts[98] / 1000:7.1f} µs"


def time_proofs(label: str, size: int, hash_at: HashAt, count: int) -> None:
    """Print generation and verification percentiles for random proofs in a tree of ``size``."""
    rng = random.Random(size)
    roots: dict[int, bytes] = {}

    def root(n: int) -> bytes:
        return roots.setdefault(n, root_at(n, hash_at))

    gen_incl, ver_incl, gen_cons, ver_cons = [], [], [], []
    clock = time.perf_counter_ns
    for _ in range(count):
        tree = rng.randint(size // 2, size)
        index = rng.randrange(tree)
        t0 = clock()
        proof = inclusion_proof(index, tree, hash_at)
        t1 = clock()
        verify_inclusion(hash_at(0, index), index, tree, proof, root(tree))
        t2 = clock()
        old = rng.randint(1, tree)
        old_root = root_at(old, hash_at)
        t3 = clock()
        cproof = consistency_proof(old, tree, hash_at)
        t4 = clock()
        verify_consistency(old, tree, cproof, old_root, root(tree))
        t5 = clock()
        gen_incl.append(t1 - t0)
        ver_incl.append(t2 - t1)
        gen_cons.append(t4 - t3)
        ver_cons.append(t5 - t4)
    print(f"{label} inclusion proof    generate {percentiles(gen_incl)}")
    print(f"{label} inclusion proof    verify   {percentiles(ver_incl)}")
    print(f"{label} consistency proof  generate {percentiles(gen_cons)}")
    print(f"{label} consistency proof  verify   {percentiles(ver_cons)}")


def build_levels(size: int) -> list[bytearray]:
    """Every complete-subtree hash of a ``size``-leaf tree, one bytearray per level."""
    sha256 = hashlib.sha256
    level = bytearray()
    for lo in range(0, size, MILLION):
        hi = min(size, lo + MILLION)
        level += b"".join([sha256(b"\x00" + i.to_bytes(8, "big")).digest() for i in range(lo, hi)])
    levels = [level]
    while len(levels[-1]) >= 64:
        below, above = memoryview(levels[-1]), bytearray()
        pairs = len(below) // 64
        for lo in range(0, pairs, MILLION):
            hi = min(pairs, lo + MILLION)
            above += b"".join(
                [sha256(b"\x01" + below[64 * i : 64 * i + 64]).digest() for i in range(lo, hi)]
            )
        levels.append(above)
    return levels


def dict_reader(store: dict[tuple[int, int], bytes]) -> HashAt:
    def hash_at(level: int, index: int) -> bytes:
        return store[level, index]

    return hash_at


def level_reader(levels: list[bytearray]) -> HashAt:
    def hash_at(level: int, index: int) -> bytes:
        return bytes(levels[level][32 * index : 32 * index + 32])

    return hash_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--proofs", type=int, default=20_000, help="proofs timed per tree")
    parser.add_argument("--big", type=int, default=10 * MILLION, help="leaves of the large tree")
    args = parser.parse_args()
    started = time.perf_counter()

    sha = sha256_rate()
    print(f"SHA-256 (65-byte input):                  {sha:>12,.0f} hashes/s")

    leaves = counter_leaves(0, MILLION)
    store = append_rates(leaves)
    del leaves
    time_proofs("1M ", MILLION, dict_reader(store), args.proofs)
    del store

    t0 = time.perf_counter()
    levels = build_levels(args.big)
    built = time.perf_counter() - t0
    stored = sum(len(level) for level in levels) // 32
    print(
        f"{args.big / MILLION:g}M tree: {stored:,} subtree hashes generated level by level "
        f"in {built:.1f} s ({sum(map(len, levels)) / 2**20:,.0f} MiB)"
    )
    time_proofs(f"{args.big // MILLION}M", args.big, level_reader(levels), args.proofs)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
