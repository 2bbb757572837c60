"""`agentmesh up` (what `make run` runs): a taken port or a second start is one line
and a non-zero exit with nothing left running; SIGINT, SIGTERM and even SIGKILL of
the parent stop its PostgreSQL and Redis; it binds loopback; and the CLI run next
to it finds its database, Redis and ledger public key (issue 14, items 2, 3, 10)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from agentmesh.embedded import free_port

CLI = [sys.executable, "-m", "agentmesh"]


def clean_env(data_dir: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
    return {
        **base,
        "AGENTMESH_DATA_DIR": str(data_dir),
        "AGENTMESH_API_PORT": str(free_port()),
        "AGENTMESH_METRICS_PORT": str(free_port()),
        "AGENTMESH_SIDECAR_PORT": str(free_port()),
        "AGENTMESH_SIDECAR_METRICS_PORT": str(free_port()),
        "AGENTMESH_LOG_LEVEL": "WARNING",
    }


def wait_for(probe: Callable[[], object], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not probe():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.1)


def listeners(port: int) -> list[tuple[str, int]]:
    """(local address, pid) of every process listening on TCP ``port``, from /proc."""
    inodes: dict[str, str] = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if int(port_hex, 16) == port and fields[3] == "0A" and len(address) == width:
                inodes[fields[9]] = address
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        for link in links:
            inode = link.removeprefix("socket:[").removesuffix("]")
            if inode in inodes:
                found.append((inodes[inode], int(pid)))
    return found


def ready(env: dict[str, str]) -> bool:
    try:
        url = f"http://127.0.0.1:{env['AGENTMESH_API_PORT']}/ready"
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stack_ports(data_dir: Path) -> tuple[int, int]:
    """(PostgreSQL port, Redis port) of the running stack."""
    record = json.loads((data_dir / "stack.json").read_text())
    return int(record["database_url"].split(":")[-1].split("/")[0]), int(record["redis_port"])


@pytest.fixture
def up(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, str], Path]]:
    data_dir = tmp_path / ".agentmesh"
    env = clean_env(data_dir)
    process = subprocess.Popen(
        [*CLI, "up"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: ready(env) or process.poll() is not None)
        assert process.poll() is None, process.communicate()
        yield process, env, data_dir
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.communicate(timeout=60)


@pytest.mark.parametrize(
    "taken", ["AGENTMESH_API_PORT", "AGENTMESH_METRICS_PORT", "AGENTMESH_SIDECAR_PORT"]
)
def test_a_taken_port_is_one_line_and_nothing_starts(tmp_path: Path, taken: str) -> None:
    env = clean_env(tmp_path / "data")
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        env[taken] = str(port)
        result = subprocess.run(
            [*CLI, "up"], env=env, capture_output=True, text=True, timeout=120, check=False
        )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("agentmesh: error: port ")
    assert str(port) in lines[0]
    assert taken in lines[0]
    assert not (tmp_path / "data" / "postgres").exists()  # no server was started


def test_a_second_start_names_the_running_stack_and_the_cli_finds_it(
    up: tuple[subprocess.Popen[str], dict[str, str], Path], tmp_path: Path
) -> None:
    process, env, data_dir = up
    second = subprocess.run(
        [*CLI, "up"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert second.returncode == 1
    assert second.stderr.count("\n") == 1, second.stderr
    assert "already running" in second.stderr
    assert str(process.pid) in second.stderr

    # Item 10: loopback only, by default.
    api_port = int(env["AGENTMESH_API_PORT"])
    assert {address for address, _ in listeners(api_port)} == {"0100007F"}

    # Item 3: next to the stack, no database URL, Redis address or key in the env.
    cli_env = {k: v for k, v in env.items() if k != "AGENTMESH_DATA_DIR"}

    def cli(*args: str) -> str:
        result = subprocess.run(
            [*CLI, *args], env=cli_env, cwd=tmp_path, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert cli("ledger", "verify").startswith("ledger OK")
    assert json.loads(cli("projections", "status"))["backend"] == "redis"
    assert json.loads(cli("ledger", "head"))["position"] >= 1
    cli("audit", "export", "--from", "2000-01-01T00:00:00Z", "--to", "2100-01-01T00:00:00Z",
        "-o", "bundle.jsonl")  # fmt: skip
    pinned = str(data_dir / "ledger.pub.pem")
    assert "bundle OK" in cli("audit", "verify", "bundle.jsonl", "--ledger-public-key", pinned)

    # The ledger's public key from the API is the one the stack wrote for auditors.
    checkpoint = httpx.get(f"http://127.0.0.1:{api_port}/v1/ledger/checkpoints/latest").json()
    assert checkpoint["ledger_public_key"] == Path(pinned).read_text()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_signal_stops_everything(
    up: tuple[subprocess.Popen[str], dict[str, str], Path], signum: int
) -> None:
    process, _, data_dir = up
    pg_port, redis_port = stack_ports(data_dir)
    assert listeners(pg_port)
    assert listeners(redis_port)
    process.send_signal(signum)
    out, _ = process.communicate(timeout=90)
    if signum != signal.SIGKILL:
        assert process.returncode == 0
        assert out.strip().endswith("agentmesh: stopped")
        assert not (data_dir / "stack.json").exists()
    # Even after SIGKILL: the servers were told to stop when their parent died.
    wait_for(lambda: not listeners(pg_port) and not listeners(redis_port), 60)
