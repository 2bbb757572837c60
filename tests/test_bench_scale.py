"""bench/scale.py end to end at toy sizes: a smoke test of the command, not a benchmark.

Both sizes are built (signed, chained, Merkle tree), every figure is measured once
against the session's PostgreSQL and Redis and a real ``serve api``, and the table
comes out; nothing here looks at the numbers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from agentmesh.embedded import EmbeddedPostgres, EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent


def test_scale_run_prints_every_figure_at_both_sizes(
    postgres: EmbeddedPostgres, redis_server: EmbeddedRedis
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
    env |= {
        "AGENTMESH_DATABASE_URL": postgres.url,
        "AGENTMESH_REDIS_HOST": redis_server.host,
        "AGENTMESH_REDIS_PORT": str(redis_server.port),
    }
    toy = "--events 3000 --agents 30 --small-events 1500 --hot-events 200 --repeat 1"
    toy += " --duration 1 --samples 40 --at-samples 2 --export-events 400 --days 3"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scale.py"), *toy.split()],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "== 1,500 events, 15 agents ==" in out, out
    assert "== 3k events, 30 agents ==" in out, out
    table = out.split("scale run:", 1)[1]
    for label in (
        "single-report appends",
        "GET /v1/agents/{did}/trust, cache off",
        "sidecar decision, trust-cache miss p50",
        "GET /v1/agents deep full page",
        "?at=",
        "projection rebuild into redis",
        "redis bytes per agent document",
        "audit export",
        "offline verify",
        "retention: one day's partition",
        "disk bytes per event",
    ):
        assert label in table, f"{label!r} missing from the table:\n{table}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
