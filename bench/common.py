"""What every benchmark needs: servers, and a fresh migrated database per round."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg

from agentmesh.embedded import EmbeddedPostgres, EmbeddedRedis
from agentmesh.migrate import upgrade


@contextlib.contextmanager
def servers(root: Path) -> Iterator[tuple[str, str, int]]:
    """(PostgreSQL server URL, Redis host, port): from the environment or embedded."""
    with contextlib.ExitStack() as stack:
        base_url = os.environ.get("AGENTMESH_DATABASE_URL")
        if base_url is None:
            postgres = EmbeddedPostgres(root / "pg").start()
            stack.callback(postgres.stop)
            base_url = postgres.url
        host = os.environ.get("AGENTMESH_REDIS_HOST")
        port = int(os.environ.get("AGENTMESH_REDIS_PORT", "6379"))
        if host is None:
            redis_server = EmbeddedRedis(root / "redis").start()
            stack.callback(redis_server.stop)
            host, port = redis_server.host, redis_server.port
        yield base_url, host, port


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
