"""Retention time, per phase, on a ledger whose oldest days fall out of the window.

Prints (medians of ``--repeat`` rounds, a fresh ledger each round): the time to
build and sign the snapshot and anchor at the cut, to drop each whole day's
partition (DETACH CONCURRENTLY + DROP), to trim the straddling partition, and
to record ``ledger.retention_applied``; beside the baseline of reading one
day's partition (``SELECT count(*)``) in the same run.

Usage: .venv/bin/python bench/retention.py [--per-day 50000] [--days 4] [--repeat 3]
Uses an embedded PostgreSQL (AGENTMESH_DATABASE_URL when set).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ledger.retention as retention
from agentmesh.embedded import EmbeddedPostgres
from bench.common import end_on_sigterm, fresh_database
from bench.ledger_gen import generate_ledger
from ledger.postgres import PostgresEventStore
from projections.config import TrustConfig
from projections.state import MeshState


def timed(
    phases: dict[str, float], name: str, function: Callable[..., Awaitable[Any]]
) -> Callable[..., Awaitable[Any]]:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await function(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - started

    return wrapper


async def one_round(server_url: str, per_day: int, days: int) -> dict[str, float]:
    url = (await fresh_database(server_url))[0]
    generated = await generate_ledger(url, events=per_day * days, agents=500, days=days)
    store = await PostgresEventStore.open(url, generated.ledger_key)
    phases: dict[str, float] = {}
    real = (retention._anchor, retention._prune)
    retention._anchor = timed(phases, "snapshot + anchor", retention._anchor)  # type: ignore[assignment]
    retention._prune = timed(phases, "prune", retention._prune)  # type: ignore[assignment]
    try:
        now = datetime.now(UTC)
        cut_days = days - 2  # the two oldest days (one of them partial) fall out
        plan = await retention.plan_retention(store, generated.ledger_key.public, now, cut_days)
        day = plan.drop[-1]
        started = time.perf_counter()
        rows = await store.pool.fetchval(f"SELECT count(*) FROM {day}")  # noqa: S608 -- a partition name
        phases["read one day (baseline)"] = time.perf_counter() - started
        config = TrustConfig()

        async def snapshot_at(position: int) -> dict[str, Any]:
            state = MeshState(config)
            async for record in store.iter_entries(after=0, batch=10_000):
                if record.position > position:
                    break
                state.apply_recorded(record)
            return state.snapshot()

        started = time.perf_counter()
        await retention.apply_retention(store, generated.ledger_key, plan, snapshot_at, now)
        phases["total"] = time.perf_counter() - started
        phases["prune per dropped partition"] = phases["prune"] / max(len(plan.drop), 1)
        phases["rows in a day"] = float(rows)
        phases["partitions dropped"] = float(len(plan.drop))
        phases["events removed"] = float(plan.rows)
    finally:
        retention._anchor, retention._prune = real
        await store.close()
    return phases


async def main(args: argparse.Namespace) -> None:
    server = None
    root = Path(tempfile.mkdtemp(prefix="agentmesh-bench-"))  # removed at the end
    base_url = os.environ.get("AGENTMESH_DATABASE_URL")
    if base_url is None:
        server = EmbeddedPostgres(root).start()
        base_url = server.url
    try:
        rounds = [await one_round(base_url, args.per_day, args.days) for _ in range(args.repeat)]
        print(
            f"cores: {os.cpu_count()}, {args.per_day:,} events per day over {args.days} days, "
            f"rounds: {args.repeat}"
        )
        baseline = statistics.median(r["read one day (baseline)"] for r in rounds)
        print(f"{'measure':34} {'median':>12} {'x read a day':>13}")
        for name in (
            "read one day (baseline)",
            "snapshot + anchor",
            "prune",
            "prune per dropped partition",
            "total",
        ):
            value = statistics.median(r[name] for r in rounds)
            print(f"{name:34} {value * 1000:10.1f} ms {value / baseline:13.2f}")
        for name in ("rows in a day", "partitions dropped", "events removed"):
            print(f"{name:34} {statistics.median(r[name] for r in rounds):12,.0f}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    end_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-day", type=int, default=50_000)
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
