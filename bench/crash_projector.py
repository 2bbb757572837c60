"""Crash loop: kill -9 the projector at random moments, then check it equals a full replay.

The long version of ``test_kill_9_at_any_point_then_restart_equals_full_replay``
(tests/test_projector_process.py): while events are appended — agent-signed
violations and signals as fast as one appender goes, plus a varied history
(registrations, handshakes, grants, revocations, suspensions) — an
``agentmesh serve projector`` process with the Redis read store is started
and killed with SIGKILL after a random time, ``--kills`` times. Every
``--check-every`` kills, and once at the end, appends pause, a projector is
started, catches up to the head and stops cleanly (exit 0), and the read
store's answers (trust at three query times, tier counts, capabilities,
delegation chains, registry size, the agent listing) and its documents must
equal those of a full replay of the ledger.

Prints kills done, events appended and PASS or FAIL (exit code 0 or 1); on
FAIL, or when a projector exited before its kill, the tail of its output.

Usage: .venv/bin/python bench/crash_projector.py [--kills 200] [--max-seconds 600]
           [--check-every 50] [--seed 42]
Uses AGENTMESH_DATABASE_URL (a fresh database is created on that server) and
AGENTMESH_REDIS_HOST/AGENTMESH_REDIS_PORT when set, else embedded servers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentmesh.embedded import free_port
from bench.common import drop_database, end_on_sigterm, fresh_database, servers
from ledger.identity import SigningKey
from ledger.postgres import PostgresEventStore
from projections.config import TrustConfig
from projections.documents import full_batch
from projections.readstore import ProjectionReader
from projections.state import MeshState, fold_recorded
from projections.store_redis import RedisProjectionStore
from tests.support import Agent, ManualClock, random_history, register
from tests.test_projector_process import (
    ProjectorProcess,
    appender,
    poll_leaders,
    position_of,
    wait_for_position,
)
from tests.test_read_stores import as_bytes, expected_answers, store_answers

CONFIG = TrustConfig()
OFFSETS = [0.0, 10.0, 400.0]  # query times, hours after the last event


class LoggedProjector(ProjectorProcess):
    """The test's ProjectorProcess, with its output kept in a file for post-mortems."""

    def __init__(self, env: dict[str, str], log: Path, metrics_port: int = 0) -> None:
        self.metrics_port = metrics_port
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agentmesh", "serve", "projector"],
                env={**env, "AGENTMESH_PROJECTOR_METRICS_PORT": str(metrics_port)},
                stdout=out,
                stderr=out,
            )

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join("    | " + line for line in text) or "    | (no output)"


@dataclass
class Run:
    store: PostgresEventStore
    redis: RedisProjectionStore
    env: dict[str, str]
    rng: random.Random
    logs: Path
    agents: list[Agent] = field(default_factory=list)
    kills: int = 0
    kills_after_writes: int = 0  # the killed projector had moved the store's position
    died_early: list[str] = field(default_factory=list)  # exit code and output of each
    checks: int = 0
    history_seed: int = 0
    started: int = 0

    def projector(self, metrics_port: int = 0) -> LoggedProjector:
        self.started += 1
        return LoggedProjector(self.env, self.logs / f"projector-{self.started}.log", metrics_port)


# -- appending ----------------------------------------------------------------------


async def history(run: Run, stop: asyncio.Event) -> None:
    """Varied events (grants, revocations, suspensions, …) in short deterministic runs."""
    while not stop.is_set():
        run.history_seed += 1
        clock = ManualClock(now=datetime.now(UTC))  # grants expire after real time
        await random_history(run.store, clock, run.history_seed, steps=10, agents=run.agents)
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def appending(run: Run) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(appender(run.store, run.agents, stop, run.rng)),
        asyncio.create_task(history(run, stop)),
    ]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)


# -- checking -----------------------------------------------------------------------


async def check(run: Run) -> str | None:
    """Start a projector, let it catch up, stop it; None if the store equals a full
    replay, else what differs."""
    process = run.projector(free_port())
    try:
        await poll_leaders([process], seconds=60)
        head = (await run.store.head()).position
        await wait_for_position(run.redis, head, seconds=180)
    except AssertionError as exc:
        process.kill()
        code = process.process.returncode
        return f"projector did not catch up ({exc}; exit code {code}):\n{process.tail()}"
    code = process.stop()
    if code != 0:
        return f"projector exited with {code} on SIGTERM:\n{process.tail()}"
    run.checks += 1
    state = fold_recorded([r async for r in run.store.iter_entries()], CONFIG)
    return await differences(run, state)


async def differences(run: Run, state: MeshState) -> str | None:
    reader = ProjectionReader(run.redis, CONFIG)
    clock = ManualClock(now=state.recorded_at or ManualClock().now)
    dids, grants = sorted(state.agents), sorted(state.delegations.grants)
    got = await store_answers(reader, dids, grants, OFFSETS, clock)
    want = expected_answers(state, OFFSETS, clock)
    for key in want:
        if as_bytes(got.get(key)) != as_bytes(want[key]):
            return f"answers differ from a full replay: {key}"
    meta = await run.redis.meta()
    if meta is None or meta.position != state.position:
        return f"store meta {meta} is not at position {state.position}"
    expected = full_batch(state, meta)
    if await run.redis.agent_docs(dids) != [expected.agents[d] for d in dids]:
        return "agent documents differ from a full replay"
    if await run.redis.grant_docs(grants) != [expected.grants[g] for g in grants]:
        return "grant documents differ from a full replay"
    if meta.registry_size != state.registry_size():
        return "registry size differs from a full replay"
    return None


# -- the crash loop -----------------------------------------------------------------


async def crash_loop(run: Run, args: argparse.Namespace, deadline: float) -> str | None:
    while run.kills < args.kills and time.monotonic() < deadline:
        async with appending(run):
            target = min(run.kills + args.check_every, args.kills)
            while run.kills < target and time.monotonic() < deadline:
                before = await position_of(run.redis)
                process = run.projector()
                # Anywhere: during start-up, the load or a rebuild, mid-batch, mid-write.
                await asyncio.sleep(run.rng.uniform(0.3, 3.0))
                if process.process.poll() is not None:
                    run.died_early.append(f"exit {process.process.returncode}:\n{process.tail()}")
                process.kill()
                run.kills += 1
                run.kills_after_writes += await position_of(run.redis) > before
        if run.kills < args.kills and time.monotonic() < deadline:
            problem = await check(run)
            if problem is not None:
                return f"after {run.kills} kills: {problem}"
            print(f"  {run.kills} kills: store equals a full replay", flush=True)
    return None


async def bench(
    args: argparse.Namespace, server_url: str, host: str, port: int, root: Path
) -> bool:
    url, name = await fresh_database(server_url)
    prefix = f"crash{uuid.uuid4().hex[:8]}:"
    base = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
    env = {
        **base,
        "AGENTMESH_DATABASE_URL": url,
        "AGENTMESH_STORAGE_BACKEND": "redis",
        "AGENTMESH_REDIS_HOST": host,
        "AGENTMESH_REDIS_PORT": str(port),
        "AGENTMESH_REDIS_PREFIX": prefix,
        "AGENTMESH_LOG_LEVEL": "WARNING",
    }
    store = await PostgresEventStore.open(url, SigningKey.generate())
    redis = RedisProjectionStore.connect(host, port, prefix=prefix)
    run = Run(store, redis, env, random.Random(args.seed), root)
    started = time.monotonic()
    try:
        run.agents.extend([await register(store) for _ in range(6)])
        problem = await crash_loop(run, args, started + args.max_seconds)
        if problem is None:
            problem = await check(run)
        elapsed = time.monotonic() - started
        head = (await store.head()).position
        print(f"kills done: {run.kills} of {args.kills} in {elapsed:.0f} s")
        print(f"  {run.kills_after_writes} of them after that projector had written to the store")
        if run.kills < args.kills and elapsed >= args.max_seconds:
            print(f"  stopped by --max-seconds {args.max_seconds:g}")
        if run.died_early:
            print(f"  projector had exited by itself before {len(run.died_early)} kills; first:")
            print(run.died_early[0])
        print(f"events appended: {head:,} ({len(run.agents)} agents)")
        print(f"checks against a full replay: {run.checks}")
        print("PASS" if problem is None else f"FAIL: {problem}")
        return problem is None
    finally:
        if "AGENTMESH_REDIS_HOST" in os.environ:
            await redis.flush_for_tests()
        await redis.close()
        await store.close()
        if "AGENTMESH_DATABASE_URL" in os.environ:
            await drop_database(server_url, name)


def main(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="agentmesh-crash-"))
    try:
        with servers(root) as (server_url, host, port):
            return 0 if asyncio.run(bench(args, server_url, host, port, root)) else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    end_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--check-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=42)
    sys.exit(main(parser.parse_args()))
