"""A change subscription's cost per message: the read store's against redis-py's own.

``RedisProjectionStore.changes`` reads its subscription with
``get_message(timeout=heartbeat)`` so that a server gone silent is noticed
(``HEARTBEAT``: a PING after 5 s without a word, given up 5 s later); redis-py's
``listen()`` blocks on one read with no timeout and never notices. This bench
publishes ``--messages`` change notifications (pipelined, 500 at a time) to a real
Redis while one subscriber decodes them, two ways in turn each round:

* ``redis-py listen()`` — a bare ``PubSub.listen()`` loop decoding each ``Change``:
  the baseline, the fastest a redis-py subscriber goes;
* ``store.changes()`` — the read store's subscription as the API's cache and the
  sidecars follow it.

Printed per way, medians of ``--repeat`` rounds: messages delivered per second and
this process's CPU per message (subscriber and publisher together), and the ratio
to the baseline. A saturated stream: in service the stream carries at most one
message per projector commit (reads at least 5 ms apart).

Usage: .venv/bin/python bench/subscriptions.py [--messages 20000] [--repeat 5]
Uses AGENTMESH_REDIS_HOST/AGENTMESH_REDIS_PORT when set, else an embedded Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis

from bench.common import end_on_sigterm, positive, redis_address
from projections.documents import Change
from projections.readstore import SUBSCRIBED
from projections.store_redis import RedisProjectionStore

WAYS = ("redis-py listen()", "store.changes()")
PIPELINE = 500


async def bare(client: aioredis.Redis, channel: str, count: int, ready: asyncio.Event) -> None:
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)
    seen = 0
    try:
        async for message in pubsub.listen():
            if message["type"] == "subscribe":
                ready.set()
            elif message["type"] == "message":
                Change.decode(message["data"])
                seen += 1
                if seen == count:
                    return
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def through_store(store: RedisProjectionStore, count: int, ready: asyncio.Event) -> None:
    seen = 0
    async for change in store.changes():
        if change == SUBSCRIBED:
            ready.set()
            continue
        seen += 1
        if seen == count:
            return


async def one(way: str, host: str, port: int, count: int) -> tuple[float, float]:
    """Messages per second and CPU µs per message, one measure."""
    prefix = f"bench{uuid.uuid4().hex[:6]}:"
    store = RedisProjectionStore.connect(host, port, prefix=prefix)
    client = aioredis.Redis(host=host, port=port)
    ready = asyncio.Event()
    if way == WAYS[0]:
        task = asyncio.create_task(bare(client, prefix + "changes", count, ready))
    else:
        task = asyncio.create_task(through_store(store, count, ready))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        bodies = [Change(i + 1, frozenset({f"did:mesh:{i:032x}"})).encode() for i in range(count)]
        started, cpu = time.perf_counter(), time.process_time()
        for first in range(0, count, PIPELINE):
            async with client.pipeline(transaction=False) as pipe:
                for body in bodies[first : first + PIPELINE]:
                    pipe.publish(prefix + "changes", body)
                await pipe.execute()
        await asyncio.wait_for(task, 300)
        elapsed, used = time.perf_counter() - started, time.process_time() - cpu
        return count / elapsed, used / count * 1e6
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
        await client.aclose()


async def run(args: argparse.Namespace, host: str, port: int) -> None:
    rates: dict[str, list[float]] = {way: [] for way in WAYS}
    cpus: dict[str, list[float]] = {way: [] for way in WAYS}
    for number in range(args.repeat):
        for way in WAYS if number % 2 == 0 else WAYS[::-1]:
            rate, cpu = await one(way, host, port, args.messages)
            rates[way].append(rate)
            cpus[way].append(cpu)
    base = statistics.median(rates[WAYS[0]])
    print(f"{args.messages:,} messages, medians of {args.repeat} rounds")
    for way in WAYS:
        rate = statistics.median(rates[way])
        print(
            f"{way:18}  {rate:9,.0f} messages/s  {statistics.median(cpus[way]):6.1f} µs CPU "
            f"a message  ratio {rate / base:.2f}"
        )


def main() -> None:
    end_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=positive, default=20000)
    parser.add_argument("--repeat", type=positive, default=5)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="agentmesh-bench-") as root,
        redis_address(Path(root)) as (host, port),
    ):
        asyncio.run(run(args, host, port))


if __name__ == "__main__":
    main()
