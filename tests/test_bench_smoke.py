"""Benchmarks as commands: ``bench/agent_closure.py`` end to end at a toy size, and a
benchmark killed with SIGTERM stops the servers it started and removes its temporary
directory (``bench.common.end_on_sigterm``). Smoke tests of the commands, not
benchmarks: nothing here looks at the numbers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from agentmesh.embedded import EmbeddedPostgres, EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}


def _servers_running() -> set[int]:
    """PIDs of the PostgreSQL postmasters and Redis servers running now."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        program = Path(argv[0].decode(errors="replace")).name
        if (program == "postgres" and b"-D" in argv) or program.startswith("redis-server"):
            found.add(int(entry.name))
    return found


def _cluster_homes() -> set[Path]:
    """Where embedded PostgreSQL clusters live when the test's directory is not
    reachable by their user (running as root): ``agentmesh-pg-*-data-*`` in /tmp."""
    return set(Path(tempfile.gettempdir()).glob("agentmesh-pg-*-data-*")) | set(
        Path("/tmp").glob("agentmesh-pg-*-data-*")
    )


def test_the_closure_bench_compares_both_stores(
    postgres: EmbeddedPostgres, redis_server: EmbeddedRedis
) -> None:
    env = _clean_env() | {
        "AGENTMESH_DATABASE_URL": postgres.url,
        "AGENTMESH_REDIS_HOST": redis_server.host,
        "AGENTMESH_REDIS_PORT": str(redis_server.port),
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "agent_closure.py"), "--reads", "5", "--repeat", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ratios = [line for line in done.stdout.splitlines() if "one read / separate reads" in line]
    assert [line.split()[0] for line in ratios] == ["redis", "redis", "postgres", "postgres"]


async def test_the_append_bench_splits_the_wal_by_relation(
    postgres: EmbeddedPostgres, database_url: str
) -> None:
    """``bench/append.py``'s WAL breakdown reads the server's own WAL with its own
    ``pg_waldump``: every single append's row, key and commit are found, and the parts
    add up to no more than the WAL written in the span."""
    from bench.append import _lsn, ledger_wal_span, wal_by_relation

    span = await ledger_wal_span(database_url, 40, warm=5)
    parts = await wal_by_relation(postgres, database_url, span, 40)
    for relation in ("events_p*", "events_p*_pkey", "ledger_head", "event_ids_p*", "commit"):
        assert parts.get(relation, 0) > 0, parts
    assert sum(parts.values()) <= (_lsn(span[1]) - _lsn(span[0])) / 40


def _rows_of_redis_bench(redis_server: EmbeddedRedis, script: str, *args: str) -> set[str]:
    """Run ``bench/<script>`` on the test's Redis; the first column of what it printed."""
    env = _clean_env() | {
        "AGENTMESH_REDIS_HOST": redis_server.host,
        "AGENTMESH_REDIS_PORT": str(redis_server.port),
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {line.split("  ")[0].strip() for line in done.stdout.splitlines()}


def test_the_metrics_refresh_bench_times_the_loop_beside_each_refresh(
    redis_server: EmbeddedRedis,
) -> None:
    rows = _rows_of_redis_bench(
        redis_server,
        "metrics_refresh.py",
        *("--agents", "300", "--rate", "200", "--seconds", "0.5", "--repeat", "1"),
    )
    assert {"no refresh", "every 64 documents", "api.metrics"} <= rows, rows


def test_the_subscription_bench_compares_the_store_with_redis_py(
    redis_server: EmbeddedRedis,
) -> None:
    rows = _rows_of_redis_bench(
        redis_server, "subscriptions.py", *("--messages", "300", "--repeat", "1")
    )
    assert {"redis-py listen()", "store.changes()"} <= rows, rows


def test_a_benchmark_killed_with_sigterm_stops_its_servers_and_removes_its_directory(
    tmp_path: Path,
) -> None:
    before, homes = _servers_running(), _cluster_homes()
    with subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "agent_closure.py"), "--reads", "20000"],
        cwd=ROOT,
        # Its own embedded servers, its temporary directory in tmp_path; lines as printed.
        env=_clean_env() | {"TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as bench:
        try:
            assert bench.stdout is not None
            assert bench.stderr is not None
            for line in bench.stdout:
                if line.startswith("servers up"):
                    break
            else:
                raise AssertionError(f"ended early: {bench.wait()} {bench.stderr.read()}")
            started = _servers_running() - before
            assert started, "the bench runs its own PostgreSQL and Redis"
            assert list(tmp_path.glob("agentmesh-bench-*"))
            bench.send_signal(signal.SIGTERM)
            bench.wait(timeout=60)
        finally:
            if bench.poll() is None:
                bench.kill()
                bench.wait()
    assert not started & _servers_running(), "servers left running after SIGTERM"
    assert not list(tmp_path.glob("agentmesh-bench-*")), "its temporary directory was left"
    assert not _cluster_homes() - homes, "its PostgreSQL cluster's directory was left"
