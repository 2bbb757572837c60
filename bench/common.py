"""What every benchmark needs: servers, and a fresh migrated database per round."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from agentmesh.embedded import EmbeddedPostgres, EmbeddedRedis
from agentmesh.migrate import upgrade
from bench.ledger_gen import GeneratedLedger, generate_ledger
from ledger.events import AgentRegistered
from ledger.identity import SigningKey
from ledger.postgres import PostgresEventStore
from ledger.timefmt import format_time

T = TypeVar("T")


def end_on_sigterm() -> None:
    """Make SIGTERM (a ``kill``, a job's timeout) end this benchmark as Ctrl-C does, so
    its ``finally`` blocks still stop the servers it started and remove its temporary
    directory; by default the signal killed the process and left them. Each
    benchmark's ``__main__`` calls it first."""

    def terminated(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminated)


@contextlib.contextmanager
def servers(root: Path) -> Iterator[tuple[str, str, int]]:
    """(PostgreSQL server URL, Redis host, port): from the environment or embedded."""
    with contextlib.ExitStack() as stack:
        base_url = os.environ.get("AGENTMESH_DATABASE_URL")
        if base_url is None:
            postgres = EmbeddedPostgres(root / "pg").start()
            stack.callback(postgres.stop)
            base_url = postgres.url
        host, port = stack.enter_context(redis_address(root))
        yield base_url, host, port


@contextlib.contextmanager
def redis_address(root: Path) -> Iterator[tuple[str, int]]:
    """(Redis host, port): ``AGENTMESH_REDIS_HOST``/``_PORT`` when set, else an
    embedded Redis under ``root``, stopped on exit."""
    host = os.environ.get("AGENTMESH_REDIS_HOST")
    if host is not None:
        yield host, int(os.environ.get("AGENTMESH_REDIS_PORT", "6379"))
        return
    server = EmbeddedRedis(root / "redis").start()
    try:
        yield server.host, server.port
    finally:
        server.stop()


async def fresh_database(server_url: str, prefix: str = "bench_") -> tuple[str, str]:
    """A new database with the migrations applied: (its URL, its name)."""
    name = prefix + uuid.uuid4().hex[:10]
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    url = server_url.rsplit("/", 1)[0] + "/" + name
    await asyncio.to_thread(upgrade, url)
    return url, name


async def drop_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


def ledger_args(doc: str | None, *, events: int, agents: int, **more: int) -> argparse.Namespace:
    """The command line of a bench over one generated ledger: ``--events``,
    ``--agents``, ``--days`` (90: the retention window), ``--repeat`` (3) and
    ``more`` integer options with their defaults."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--events", type=positive, default=events)
    parser.add_argument("--agents", type=positive, default=agents)
    parser.add_argument("--days", type=float, default=90.0)
    parser.add_argument("--repeat", type=positive, default=3)
    for name, default in more.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=positive, default=default)
    return parser.parse_args()


def run_on_servers(
    bench: Callable[[str, argparse.Namespace], Coroutine[Any, Any, None]], args: argparse.Namespace
) -> None:
    """Run ``bench(server URL, args)`` on the servers of ``servers`` (then stopped)."""
    with tempfile.TemporaryDirectory() as root, servers(Path(root)) as (url, _, _):
        asyncio.run(bench(url, args))


@contextlib.asynccontextmanager
async def generated(
    server_url: str, args: argparse.Namespace
) -> AsyncIterator[tuple[str, GeneratedLedger]]:
    """A fresh database holding a generated ledger of ``args.events`` events and
    ``args.agents`` agents over ``args.days`` days: (its URL, the ``GeneratedLedger``);
    dropped afterwards."""
    url, name = await fresh_database(server_url)
    try:
        yield (
            url,
            await generate_ledger(url, events=args.events, agents=args.agents, days=args.days),
        )
    finally:
        await drop_database(server_url, name)


async def register(store: PostgresEventStore, agent: SigningKey) -> None:
    """Register ``agent``'s key, signed by the ledger (as the admin API does)."""
    registered = AgentRegistered(
        actor=store.ledger_did,
        occurred_at=format_time(datetime.now(UTC)),
        did=agent.did,
        public_key=agent.public.pem(),
    )
    await store.append([store.sign_own(registered)])


async def on_schedule(
    items: Sequence[T],
    rate: float,
    start: float,
    send: Callable[[T, float], Coroutine[Any, Any, None]],
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    """Open loop: ``send(item, due)`` for item ``i`` at ``due = start + i / rate`` on
    ``clock``, each in its own task, whatever happened to the others (wrk2-style
    constant rate); returns when every one is done."""
    tasks = []
    for index, item in enumerate(items):
        due = start + index / rate
        wait = due - clock()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(send(item, due)))
    await asyncio.gather(*tasks)


@contextlib.contextmanager
def no_collector_pauses() -> Iterator[None]:
    """This process's garbage collector off while it sends and times requests.

    The Python clients of ``bench/api.py`` run in the bench's process, which holds
    every agent's key and the signed bodies: a full collection over that heap stalled
    it 50-115 ms (seen with ``gc.callbacks`` on a 100,000-agent run), and an open loop
    counts each latency from when the request was due, so the client's own stall
    showed as the server's (``GET /health`` at 1,000/s, p50 1.4 ms, had a p99 of 23-48
    ms). One collection before, none during (a measure lasts seconds: its garbage
    waits)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def percentile(ordered: list[float], q: float) -> float:
    """The ``q`` (0-1) quantile of an ascending list, nan when it is empty."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def positive(text: str) -> int:
    """argparse type: a positive integer."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """CPU seconds a process (all its threads) has used so far; 0 without /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
