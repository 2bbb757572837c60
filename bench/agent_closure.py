"""A sidecar's trust-cache miss read: ``ProjectionStore.agent_closure`` against separate reads.

``agent_closure`` reads an agent's document with the grants to it, their ancestors
and their delegators' documents in one round trip (a Lua script in Redis, one
statement in PostgreSQL). The baseline, measured in the same run, is the same answer
as separate reads (``projections.readstore.read_closure`` over ``agent_docs`` and
``grant_docs``: the document, then the grants, their ancestors, the delegators), and
the document alone (one read, what an agent without grants needed before). For each
store (Redis, PostgreSQL) and each agent: one granted a capability through a chain of
two grants (the root's delegator and the child's), with a small document (5 peers in
its windows) or a busy agent's large one (2,000 peers, ~134 kB). Prints µs per read,
medians of the rounds, rounds interleaved, and the closure over separate reads.

Usage: .venv/bin/python bench/agent_closure.py [--reads 300] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import end_on_sigterm, fresh_database, positive, servers
from projections.documents import Batch, Meta
from projections.readstore import Closure, ProjectionStore, read_closure
from projections.store_postgres import PostgresProjectionStore
from projections.store_redis import RedisProjectionStore

ROOT, CHILD = "grant-root-0001", "grant-child-001"


def _did(name: str) -> str:
    return "did:mesh:" + name.encode().hex().ljust(32, "0")[:32]


def _agent(did: str, grants: list[str], peers: int) -> bytes:
    """An agent document as the projector writes it (sorted keys: ``grants_in`` first)."""
    window = {f"did:mesh:{i:032x}": [1_700_000_000_000_000 + i, 5, 3] for i in range(peers)}
    return msgspec.json.encode(
        {
            "grants_in": grants,
            "registry": {"did": did, "status": "active"},
            "trust": {"did": did, "partners": {}, "peers": window},
        }
    )


def _grant(grant_id: str, chain: list[str], delegator: str, delegatee: str) -> bytes:
    return msgspec.json.encode(
        {"chain": chain, "delegatee": delegatee, "delegator": delegator, "grant_id": grant_id}
    )


def batch() -> Batch:
    small, large, first, second = (_did(n) for n in ("small", "large", "first", "second"))
    agents = {
        small: _agent(small, [CHILD], 5),
        large: _agent(large, [CHILD], 2000),
        first: _agent(first, [], 5),
        second: _agent(second, [ROOT], 5),
    }
    grants = {
        ROOT: _grant(ROOT, [ROOT], first, second),
        CHILD: _grant(CHILD, [CHILD, ROOT], second, small),
    }
    meta = Meta("bench", 1, None, len(agents), "2026-01-01T00:00:00.000000Z", {})
    return Batch(agents, grants, meta)


async def per_read(read: Callable[[], Awaitable[Any]], reads: int) -> float:
    started = time.perf_counter()
    for _ in range(reads):
        await read()
    return (time.perf_counter() - started) / reads * 1e6


def reads_of(store: ProjectionStore, did: str) -> dict[str, Callable[[], Awaitable[Any]]]:
    return {
        "one read (agent_closure)": lambda: store.agent_closure(did),
        "separate reads (baseline)": lambda: read_closure(did, store.agent_docs, store.grant_docs),
        "the document alone": lambda: store.agent_docs([did]),
    }


async def measure(store: ProjectionStore, reads: int, repeat: int) -> None:
    await store.replace_all(batch())
    for name in ("small", "large"):
        did = _did(name)
        expected = await read_closure(did, store.agent_docs, store.grant_docs)
        found = await store.agent_closure(did)
        if found != expected or not isinstance(found, Closure):
            raise SystemExit(f"{store.name}: the two reads differ: {found} {expected}")
        if len(found.grants) != 2 or len(found.delegators) != 2:
            raise SystemExit(f"{store.name}: not the whole chain: {found}")
        kinds = reads_of(store, did)
        for read in kinds.values():
            await per_read(read, 30)  # warm: prepared statements, the script's SHA
        rounds: dict[str, list[float]] = {kind: [] for kind in kinds}
        for _ in range(repeat):
            for kind, read in kinds.items():
                rounds[kind].append(await per_read(read, reads))
        size = len(batch().agents[did])
        medians = {kind: statistics.median(values) for kind, values in rounds.items()}
        for kind, value in medians.items():
            print(f"  {store.name:8} {name} document ({size:,} B)  {kind:26} {value:8,.0f} µs")
        ratio = medians["one read (agent_closure)"] / medians["separate reads (baseline)"]
        print(f"  {store.name:8} {name} document: one read / separate reads = {ratio:.2f}")


async def main(args: argparse.Namespace) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="agentmesh-bench-") as root,
        servers(Path(root)) as (server_url, host, port),
    ):
        print(f"servers up: Redis at {host}:{port}, PostgreSQL", flush=True)
        redis = RedisProjectionStore.connect(host, port, prefix="bench-closure:")
        try:
            await measure(redis, args.reads, args.repeat)
        finally:
            await redis.close()
        url, _ = await fresh_database(server_url)
        postgres = await PostgresProjectionStore.connect(url, "bench")
        try:
            await measure(postgres, args.reads, args.repeat)
        finally:
            await postgres.close()


if __name__ == "__main__":
    end_on_sigterm()
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--reads", type=positive, default=300)
    parser.add_argument("--repeat", type=positive, default=5)
    arguments = parser.parse_args()
    print(f"reads per round: {arguments.reads}, rounds: {arguments.repeat}; µs per read")
    asyncio.run(main(arguments))
