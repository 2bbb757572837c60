"""The projector as a real process: crash loops (kill -9) and leader take-over."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agentmesh.embedded import EmbeddedRedis, free_port
from ledger.identity import SigningKey
from ledger.postgres import PostgresEventStore
from projections.config import TrustConfig
from projections.readstore import ProjectionReader
from projections.state import fold_recorded
from projections.store_redis import RedisProjectionStore
from tests.support import Agent, register
from tests.test_read_stores import as_bytes, expected_answers, store_answers

CONFIG = TrustConfig()


class ProjectorProcess:
    def __init__(self, env: dict[str, str], metrics_port: int = 0) -> None:
        self.metrics_port = metrics_port
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agentmesh", "serve", "projector"],
            env={**env, "AGENTMESH_PROJECTOR_METRICS_PORT": str(metrics_port)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def metric(self, name: str) -> float | None:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2
            ) as response:
                body = response.read().decode()
        except OSError:
            return None
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None


@pytest.fixture
def env(database_url: str, redis_server: EmbeddedRedis, ledger_key: SigningKey) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
    return {
        **base,
        "AGENTMESH_DATABASE_URL": database_url,
        "AGENTMESH_STORAGE_BACKEND": "redis",
        "AGENTMESH_REDIS_HOST": redis_server.host,
        "AGENTMESH_REDIS_PORT": str(redis_server.port),
        "AGENTMESH_REDIS_PREFIX": f"p{uuid.uuid4().hex[:8]}:",
        "AGENTMESH_LOG_LEVEL": "WARNING",
    }


@pytest.fixture
async def redis_store(env: dict[str, str]) -> AsyncIterator[RedisProjectionStore]:
    store = RedisProjectionStore.connect(
        "127.0.0.1", int(env["AGENTMESH_REDIS_PORT"]), prefix=env["AGENTMESH_REDIS_PREFIX"]
    )
    yield store
    await store.close()


async def position_of(store: RedisProjectionStore) -> int:
    meta = await store.meta()
    return 0 if meta is None else meta.position


async def wait_for_position(store: RedisProjectionStore, target: int, seconds: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while await position_of(store) < target:
        assert loop.time() < deadline, f"projection stuck at {await position_of(store)}"
        await asyncio.sleep(0.05)


async def appender(
    store: PostgresEventStore, agents: list[Agent], stop: asyncio.Event, rng: random.Random
) -> None:
    while not stop.is_set():
        a, b = rng.sample(agents, 2)
        event = (
            a.violation(subject=b.did, severity="low")
            if rng.random() < 0.7
            else a.signal(subject=b.did)
        )
        await store.append([event])
        await asyncio.sleep(rng.uniform(0, 0.004))


async def test_kill_9_at_any_point_then_restart_equals_full_replay(
    store: PostgresEventStore, env: dict[str, str], redis_store: RedisProjectionStore
) -> None:
    """Short version of bench/crash_projector.py (which runs hundreds of kills)."""
    rng = random.Random(42)
    agents = [await register(store) for _ in range(6)]
    stop = asyncio.Event()
    writer = asyncio.create_task(appender(store, agents, stop, rng))
    try:
        for _ in range(6):
            process = ProjectorProcess(env)
            await asyncio.sleep(rng.uniform(0.8, 2.0))  # dies mid-batch, mid-write, anywhere
            process.kill()
    finally:
        stop.set()
        await writer
    final = ProjectorProcess(env, free_port())
    try:
        await poll_leaders([final])
        head = (await store.head()).position
        await wait_for_position(redis_store, head)
    finally:
        assert final.stop() == 0
    state = fold_recorded([r async for r in store.iter_entries()], CONFIG)
    reader = ProjectionReader(redis_store, CONFIG)
    from tests.support import ManualClock

    clock = ManualClock(now=state.recorded_at or ManualClock().now)
    got = await store_answers(reader, sorted(state.agents), [], [0.0, 10.0], clock)
    want = expected_answers(state, [0.0, 10.0], clock)
    assert as_bytes(got) == as_bytes(want)


async def test_one_leader_and_take_over_when_it_dies(
    store: PostgresEventStore, env: dict[str, str], redis_store: RedisProjectionStore
) -> None:
    agents = [await register(store) for _ in range(3)]
    first = ProjectorProcess(env, free_port())
    second = ProjectorProcess(env, free_port())
    try:
        await wait_for_position(redis_store, (await store.head()).position)
        leaders = await poll_leaders([first, second])
        assert sorted(leaders) == [0.0, 1.0]  # exactly one projects
        leader, standby = (first, second) if leaders[0] == 1.0 else (second, first)
        leader.kill()
        await store.append([agents[0].violation(subject=agents[1].did)])
        await wait_for_position(redis_store, (await store.head()).position, seconds=30)
        assert standby.metric("agentmesh_projector_leader") == 1.0
        lag = standby.metric("agentmesh_projector_lag_events")
        assert lag is not None
    finally:
        for process in (first, second):
            if process.process.poll() is None:
                process.stop()


async def poll_leaders(processes: list[ProjectorProcess], seconds: float = 20) -> list[Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        values = [p.metric("agentmesh_projector_leader") for p in processes]
        if None not in values and sum(values) == 1.0:  # type: ignore[arg-type]
            return values
        assert loop.time() < deadline, f"leaders: {values}"
        await asyncio.sleep(0.1)


async def test_cli_rebuild_and_status(
    store: PostgresEventStore, env: dict[str, str], redis_store: RedisProjectionStore
) -> None:
    agents = [await register(store) for _ in range(3)]
    await store.append([agents[0].violation(subject=agents[1].did)])
    head = (await store.head()).position

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agentmesh", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    rebuilt = cli("projections", "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert rebuilt.stdout.strip() == (
        f"rebuilt redis read store: position {head}, 3 agents, 0 grants"
    )
    assert await position_of(redis_store) == head
    status = cli("projections", "status")
    assert status.returncode == 0, status.stderr
    assert '"lag": 0' in status.stdout
    memory = cli("projections", "rebuild", "--backend", "memory")
    assert memory.returncode == 2  # not a choice: the memory store lives in one process
