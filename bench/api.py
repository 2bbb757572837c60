"""API throughput: trust reads beside /health, signed reports beside direct appends.

Prints, from one run (medians of ``--repeat`` rounds), for each ``--workers`` count:
  * ``GET /v1/agents/{did}/trust`` requests/s and p50/p99 latency at a fixed
    ``--concurrency`` (keep-alive connections, no pipelining), cycling over the
    registered agents, beside ``GET /health`` on the same server with the same
    client and concurrency (the baseline), and the ratio trust / health;
  * one agent-signed ``policy.violation`` per ``POST /v1/violations`` (what a
    sidecar sends; each with its idempotency key, signed before timing): closed
    loop at ``--single-connections`` (64) beside ``GET /health`` at as many
    connections, and the ratio; then open loop (``open_loop``: wrk2-style, each
    request due at ``start + i / rate``, its latency counted from when it was due,
    so a stall shows in every request it held back) at ``--open-rate`` (1,000/s)
    beside ``GET /health`` at the same rate, p50/p99 ack;
  * agent-signed ``policy.violation`` reports/s through ``POST /v1/reports:batch``
    (batches of ``--batch-size``, ``--in-flight`` batches at once, each report with
    its own idempotency key; everything is signed and encoded before timing:
    signing is the client's work), beside the same number of events appended
    straight through ``PostgresEventStore.append`` in this process by 64
    concurrent appenders, one event and one idempotency key per call, into the
    same ledger (the baseline: bench/append.py's figure), and the ratio.

The stack is real: embedded PostgreSQL and Redis, migrations, then
``python -m agentmesh serve api --workers N`` and ``python -m agentmesh serve
projector`` as processes. ``--agents`` agents are registered (``--seed store``,
the default: the same ledger-signed ``agent.registered`` events ``POST
/v1/agents`` appends, appended through ``PostgresEventStore.append`` by 64
appenders in this process — verified, chained, committed — and folded by the
projector; ``--seed http``: through ``POST /v1/agents``, minutes at 100,000),
then the projector is waited for and a sample of them is read until their trust
answers 200. Between measures the
projector is let catch up with the ledger, so each measure starts from the same
quiet state. The API's in-process read cache is on, as by default (``--cache off``
makes every trust read go to Redis).

With /proc, it also prints the cores each process tree kept busy during each
measure: the API with its workers (and, of that, its event-loop threads alone),
the projector, PostgreSQL, Redis, this client with wrk, and "other" (the rest of
the machine: how much a noisy neighbour took), and each server process's CPU per
request answered (steadier than a rate on a shared machine; for a signed report
it includes the projector folding it). Targets are reported as met or not, never
enforced.

Load generator for the closed loops: ``wrk`` when it is on PATH (``apt-get install
wrk``), else a Python asyncio HTTP/1.1 keep-alive client; the same one for a
measure and its /health baseline. The open loops and the batches are sent by
the Python client.

Usage: .venv/bin/python bench/api.py [--repeat 3] [--workers 1 [2 ...]]
           [--concurrency 32] [--duration 10] [--agents 300] [--seed store|http]
           [--single-connections 64] [--open-rate 1000] [--reports 20000 (0: skip)]
           [--in-flight 4] [--cache on|off] [--client auto|wrk|python]
Uses AGENTMESH_DATABASE_URL (a fresh database is created on that server) and
AGENTMESH_REDIS_HOST/AGENTMESH_REDIS_PORT when set, else embedded servers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentmesh.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from agentmesh.migrate import upgrade
from bench.common import end_on_sigterm, no_collector_pauses, on_schedule, percentile, positive
from ledger.canonical import canonical_bytes
from ledger.events import AgentRegistered, PolicyViolation, body_of, new_event_id
from ledger.identity import SigningKey, b64encode
from ledger.postgres import PostgresEventStore
from ledger.signed import SignedEvent
from ledger.timefmt import format_time
from projections.store_redis import RedisProjectionStore

HOST = "127.0.0.1"
TRUST_TARGET = 0.6  # trust req/s over health req/s
TRUST_P99_MS = 20.0
SINGLE_TARGET = 0.6  # single signed reports/s over health req/s, same connections
OPEN_P99_MS = 25.0  # p99 ack of single reports at --open-rate, open loop
REPORTS_TARGET = 5000.0  # signed reports/s through the batch endpoint
DIRECT_APPENDERS = 64


# -- a small HTTP/1.1 keep-alive client -------------------------------------------------


class HttpConnection:
    """One keep-alive HTTP/1.1 connection; one request at a time (no pipelining)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, port: int) -> HttpConnection:
        reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 20)
        return cls(reader, writer)

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        self._writer.write(request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            return status, await self._read_chunked()
        return status, await self._reader.readexactly(length)

    async def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self._reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self._reader.readexactly(size))
            await self._reader.readexactly(2)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def call(
    port: int,
    method: str,
    path: str,
    payload: object = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One request on a fresh connection; the decoded JSON answer (or None)."""
    body = None if payload is None else msgspec.json.encode(payload)
    conn = await HttpConnection.open(port)
    try:
        status, raw = await conn.exchange(http_request(port, method, path, body, headers))
    finally:
        await conn.close()
    return status, (msgspec.json.decode(raw) if raw else None)


# -- load generators (GET at a fixed concurrency) ---------------------------------------


@dataclass(frozen=True)
class Load:
    rate: float  # requests/s
    p50_ms: float
    p99_ms: float
    errors: int  # answers other than 200, plus socket errors and timeouts
    requests: int = 0  # answered requests in the measure (wrk counts them)


class PythonClient:
    """asyncio, raw HTTP/1.1 keep-alive, one request in flight per connection."""

    name = "python asyncio (keep-alive HTTP/1.1)"

    async def run(self, port: int, paths: list[str], concurrency: int, seconds: float) -> Load:
        requests = [http_request(port, "GET", p) for p in paths]
        return await self.run_requests(port, requests, concurrency, seconds)

    async def run_requests(
        self, port: int, requests: list[bytes], concurrency: int, seconds: float
    ) -> Load:
        conns = [await HttpConnection.open(port) for _ in range(concurrency)]
        latencies: list[float] = []
        errors = 0
        deadline = time.perf_counter() + seconds

        async def worker(index: int, conn: HttpConnection) -> None:
            nonlocal errors
            clock = time.perf_counter
            record = latencies.append
            while clock() < deadline:
                started = clock()
                status, _ = await conn.exchange(requests[index % len(requests)])
                record(clock() - started)
                if status not in (200, 201):
                    errors += 1
                index += concurrency

        started = time.perf_counter()
        try:
            with no_collector_pauses():
                await asyncio.gather(*(worker(i, c) for i, c in enumerate(conns)))
        finally:
            elapsed = time.perf_counter() - started
            await asyncio.gather(*(c.close() for c in conns))
        latencies.sort()
        return Load(
            rate=len(latencies) / elapsed,
            p50_ms=percentile(latencies, 0.50) * 1000,
            p99_ms=percentile(latencies, 0.99) * 1000,
            errors=errors,
        )


WRK_SCRIPT = """
local paths = {%s}
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", paths[(n %% #paths) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"p50_us\\": %%d, \\"p99_us\\": %%d, "
    .. "\\"errors\\": %%d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


class WrkClient:
    """wrk (C, epoll): the lightest client, so the server gets most of the 2 cores.

    Both measures go through the same Lua ``request`` function (a rotating path
    list, one entry for /health), so they pay the same client cost."""

    def __init__(self, executable: str, threads: int, workdir: Path) -> None:
        self.executable = executable
        self.threads = threads
        self.workdir = workdir
        self.name = f"wrk ({threads} thread{'s' if threads > 1 else ''})"

    async def run(self, port: int, paths: list[str], concurrency: int, seconds: float) -> Load:
        script = self.workdir / f"wrk-{uuid.uuid4().hex[:8]}.lua"
        script.write_text(WRK_SCRIPT % ", ".join(json.dumps(p) for p in paths))
        return await self.run_script(port, script, concurrency, seconds)

    async def run_script(
        self, port: int, script: Path, concurrency: int, seconds: float, threads: int = 0
    ) -> Load:
        command = [
            self.executable,
            f"-t{min(threads or self.threads, concurrency)}",
            f"-c{concurrency}",
            f"-d{max(round(seconds), 1)}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            f"http://{HOST}:{port}",
        ]
        try:
            done = await asyncio.to_thread(
                subprocess.run, command, capture_output=True, text=True, timeout=seconds + 60
            )
        finally:
            await asyncio.to_thread(script.unlink, True)
        lines = [x for x in done.stdout.splitlines() if x.startswith("BENCH ")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
        found = json.loads(lines[-1][len("BENCH ") :])
        return Load(
            rate=found["requests"] / (found["duration_us"] / 1e6),
            p50_ms=found["p50_us"] / 1000,
            p99_ms=found["p99_us"] / 1000,
            errors=found["errors"],
            requests=found["requests"],
        )


WRK_POST_SCRIPT = """
local bodies = {}
for line in io.lines(%s) do bodies[#bodies + 1] = line end
local headers = {["Content-Type"] = "application/json"}
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", %s, headers, bodies[((n - 1) %% #bodies) + 1])
end
""" + WRK_SCRIPT.split("end\n", 1)[1]


async def posts(
    client: Client, port: int, path: str, bodies: list[bytes], concurrency: int, seconds: float
) -> Load:
    """``POST path`` with each of ``bodies`` once (closed loop: every one of the
    ``concurrency`` connections sends its next request when its answer is in).
    wrk runs them on one thread: each of its threads would send the same bodies."""
    if isinstance(client, PythonClient):
        requests = [http_request(port, "POST", path, b) for b in bodies]
        return await client.run_requests(port, requests, concurrency, seconds)
    data = client.workdir / f"bodies-{uuid.uuid4().hex[:8]}.jsonl"
    data.write_bytes(b"\n".join(bodies) + b"\n")
    script = client.workdir / f"wrk-{uuid.uuid4().hex[:8]}.lua"
    script.write_text(WRK_POST_SCRIPT % (json.dumps(str(data)), json.dumps(path)))
    try:
        return await client.run_script(port, script, concurrency, seconds, threads=1)
    finally:
        data.unlink(missing_ok=True)


async def open_loop(
    port: int, requests: list[bytes], rate: float, connections: int, ok: int
) -> Load:
    """Open loop: request ``i`` is due at ``start + i / rate`` whatever happened to the
    others (wrk2-style constant rate), sent on a free keep-alive connection, and its
    latency counts from when it was *due*, not from when it went out: a slow answer
    that holds back the next sends shows in their latencies (no coordinated
    omission). All ``connections`` busy: the request waits for one, on the clock."""
    conns: asyncio.Queue[HttpConnection] = asyncio.Queue()
    for _ in range(connections):
        conns.put_nowait(await HttpConnection.open(port))
    latencies: list[float] = []
    errors = 0
    clock = time.perf_counter

    async def send(request: bytes, due: float) -> None:
        nonlocal errors
        conn = await conns.get()
        try:
            status, _ = await conn.exchange(request)
        finally:
            conns.put_nowait(conn)
        latencies.append(clock() - due)
        if status != ok:
            errors += 1

    with no_collector_pauses():
        start = clock() + 0.05
        await on_schedule(requests, rate, start, send, clock)
        elapsed = clock() - start
    while not conns.empty():
        await conns.get_nowait().close()
    latencies.sort()
    return Load(
        rate=len(latencies) / elapsed,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        errors=errors,
    )


Client = PythonClient | WrkClient


# -- where the CPU goes ------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds of it and of its reaped children)."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        table[int(entry.name)] = (int(fields[1]), ticks / CLOCK_TICKS)
    return table


def _main_thread_seconds(pid: int) -> float:
    """CPU seconds of a process's main thread alone (its event loop, for the API)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all cores, all processes)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS  # less idle and iowait


class CpuMeter:
    """Cores kept busy during a measure, by process tree: the API with all its
    workers ("api loop": the part spent on their main threads, the event loops),
    the projector, PostgreSQL, Redis, this client (with wrk), and everything else
    on the machine ("other": on a shared box, other people's work)."""

    GROUPS = ("api", "api loop", "projector", "postgres", "redis", "client", "other")

    def __init__(self) -> None:
        self.enabled = Path("/proc/stat").exists()
        self.roots: dict[str, int] = {}

    def snapshot(self) -> tuple[float, dict[str, float]]:
        if not self.enabled:
            return time.perf_counter(), {}
        table = _process_table()
        children: dict[int, list[int]] = {}
        for pid, (parent, _) in table.items():
            children.setdefault(parent, []).append(pid)
        used: dict[str, float] = {}
        claimed: set[int] = set()
        for name, root in self.roots.items():
            tree, total, loops = [root], 0.0, 0.0
            while tree:
                pid = tree.pop()
                if pid in table and pid not in claimed:
                    claimed.add(pid)
                    total += table[pid][1]
                    if name == "api":
                        loops += _main_thread_seconds(pid)
                    tree.extend(children.get(pid, []))
            used[name] = total
            if name == "api":
                used["api loop"] = loops
        me = os.getpid()
        tree, total = [me], 0.0
        while tree:  # this process and its children that belong to no group (wrk)
            pid = tree.pop()
            if pid in table and pid not in claimed:
                claimed.add(pid)
                total += table[pid][1]
                tree.extend(children.get(pid, []))
        used["client"] = total
        used["machine"] = _machine_busy()
        return time.perf_counter(), used

    @staticmethod
    def cores(
        before: tuple[float, dict[str, float]], after: tuple[float, dict[str, float]]
    ) -> dict[str, float]:
        wall = after[0] - before[0]
        if not before[1] or wall <= 0:
            return {}
        found = {
            k: (after[1][k] - before[1].get(k, 0.0)) / wall for k in after[1] if k != "machine"
        }
        machine = (after[1]["machine"] - before[1]["machine"]) / wall
        found["other"] = max(machine - sum(v for k, v in found.items() if k != "api loop"), 0.0)
        return found


# -- the processes ----------------------------------------------------------------------


@dataclass
class Stack:
    """Where the servers are, and what the API and projector processes are told."""

    database_url: str
    redis_host: str
    redis_port: int
    redis_prefix: str
    ledger_key: SigningKey
    admin_token: str
    logs: Path
    cache: bool = True

    def env(self, api_port: int = 0) -> dict[str, str]:
        base = {
            k: v for k, v in os.environ.items() if not k.startswith(("AGENTMESH_", "PROMETHEUS"))
        }
        return {
            **base,
            "AGENTMESH_DATABASE_URL": self.database_url,
            "AGENTMESH_STORAGE_BACKEND": "redis",
            "AGENTMESH_REDIS_HOST": self.redis_host,
            "AGENTMESH_REDIS_PORT": str(self.redis_port),
            "AGENTMESH_REDIS_PREFIX": self.redis_prefix,
            "AGENTMESH_AGENT_PRIVATE_KEY": self.ledger_key.private_key_pem(),
            "AGENTMESH_ADMIN_TOKEN": self.admin_token,
            "AGENTMESH_API_HOST": HOST,
            "AGENTMESH_API_PORT": str(api_port or free_port()),
            "AGENTMESH_METRICS_PORT": str(free_port()),
            "AGENTMESH_PROJECTOR_METRICS_PORT": "0",
            "AGENTMESH_LOG_LEVEL": "WARNING",
            "AGENTMESH_CACHE_ENABLED": "true" if self.cache else "false",
        }


class Service:
    """A child process (its own session), stopped with SIGTERM, killed if it hangs."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agentmesh", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def check(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n{self.tail()}")

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self, timeout: float = 60) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # Its own session: the group holds only this process and its workers.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


async def start_api(stack: Stack, workers: int) -> tuple[Service, int]:
    port = free_port()
    api = Service(
        f"api-w{workers}",
        ["serve", "api", "--workers", str(workers)],
        stack.env(port),
        stack.logs,
    )
    deadline = time.monotonic() + 90
    while True:
        api.check()
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
            status, _ = await call(port, "GET", "/ready")
            if status == 200:
                return api, port
        if time.monotonic() > deadline:
            api.stop()
            raise RuntimeError(f"the API never became ready:\n{api.tail()}")
        await asyncio.sleep(0.1)


async def register_agents(port: int, stack: Stack, count: int) -> list[SigningKey]:
    """``count`` agents through ``POST /v1/agents`` (admin), 16 at a time."""
    keys = [SigningKey.generate() for _ in range(count)]
    auth = {"Authorization": f"Bearer {stack.admin_token}"}
    pending = iter(keys)

    async def registrar() -> None:
        conn = await HttpConnection.open(port)
        try:
            for key in pending:
                body = msgspec.json.encode({"public_key": key.public.pem()})
                status, raw = await conn.exchange(
                    http_request(port, "POST", "/v1/agents", body, auth)
                )
                if status != 201:
                    raise RuntimeError(f"registration answered {status}: {raw[:300]!r}")
        finally:
            await conn.close()

    await asyncio.gather(*(registrar() for _ in range(16)))
    return keys


async def seed_agents(stack: Stack, count: int) -> list[SigningKey]:
    """``count`` agents appended straight through ``PostgresEventStore.append`` in
    this process: the same ``agent.registered`` event ``POST /v1/agents`` appends
    (signed by the ledger key, verified, chained and committed by the writer; one
    event per call, 64 appenders sharing group commits), folded by the projector
    like any other. Only the HTTP hop is skipped: at 100,000 agents it takes minutes."""
    keys = [SigningKey.generate() for _ in range(count)]
    store = await PostgresEventStore.open(stack.database_url, stack.ledger_key)
    try:
        pending = iter(keys)
        stamp = format_time(datetime.now(UTC))

        async def appender() -> None:
            for key in pending:
                event = AgentRegistered(
                    actor=store.ledger_did,
                    occurred_at=stamp,
                    did=key.did,
                    public_key=key.public.pem(),
                )
                await store.append([store.sign_own(event)])

        await asyncio.gather(*(appender() for _ in range(DIRECT_APPENDERS)))
    finally:
        await store.close()
    return keys


async def check_projected(port: int, stack: Stack, dids: list[str], sample: int = 500) -> None:
    """The projector has folded the whole ledger, and a sample of the agents' trust
    answers 200 through the API (every one of them, when there are few)."""
    await settle(stack)
    step = max(1, len(dids) // sample)
    await wait_projected(port, dids[::step])


async def wait_projected(port: int, dids: list[str], seconds: float = 120) -> None:
    """Until every agent's trust answers 200 (the projector has folded it)."""
    deadline = time.monotonic() + seconds
    waiting = list(dids)
    conn = await HttpConnection.open(port)
    try:
        while waiting:
            status, _ = await conn.exchange(
                http_request(port, "GET", f"/v1/agents/{waiting[-1]}/trust")
            )
            if status == 200:
                waiting.pop()
                continue
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(waiting)} agents never projected ({status})")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def settle(stack: Stack, seconds: float = 300) -> float:
    """Wait until the projector has folded the whole ledger; return how long it took."""
    started = time.monotonic()
    store = RedisProjectionStore.connect(
        stack.redis_host, stack.redis_port, prefix=stack.redis_prefix
    )
    conn = await asyncpg.connect(stack.database_url)
    try:
        head: int = await conn.fetchval("SELECT position FROM ledger_head")
        while True:
            meta = await store.meta()
            if meta is not None and meta.position >= head:
                return time.monotonic() - started
            if time.monotonic() - started > seconds:
                print(f"  (projector still behind after {seconds:.0f} s; going on)")
                return seconds
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
        await store.close()


# -- reports ------------------------------------------------------------------------------


def violations(agents: list[SigningKey], count: int, tag: str) -> Iterator[PolicyViolation]:
    now = format_time(datetime.now(UTC))
    for index in range(count):
        key = agents[index % len(agents)]
        yield PolicyViolation(
            actor=key.did,
            event_id=new_event_id(),  # what SignedEvent.create fills in: single-use bodies
            occurred_at=now,
            agent=agents[(index + 1) % len(agents)].did,
            severity="low",
            rule="bench-rule",
            detail=f"blocked call {tag}-{index}",
        )


def report_batches(agents: list[SigningKey], count: int, size: int, tag: str) -> list[bytes]:
    """The request bodies, each report signed by its actor with its own idempotency key."""
    keys = {a.did: a for a in agents}
    reports = []
    for index, event in enumerate(violations(agents, count, tag)):
        body = body_of(event)
        reports.append(
            {
                "body": body,
                "signature": b64encode(keys[event.actor].sign(canonical_bytes(body))),
                "idempotency_key": f"{tag}-{index}",
            }
        )
    return [msgspec.json.encode({"reports": reports[i : i + size]}) for i in range(0, count, size)]


def single_reports(agents: list[SigningKey], count: int, tag: str) -> list[bytes]:
    """``POST /v1/violations`` bodies: one signed report each, with its idempotency
    key (what a sidecar sends), signed before timing."""
    keys = {a.did: a for a in agents}
    bodies = []
    for index, event in enumerate(violations(agents, count, tag)):
        body = body_of(event)
        signature = b64encode(keys[event.actor].sign(canonical_bytes(body)))
        report = {"body": body, "signature": signature, "idempotency_key": f"{tag}-{index}"}
        bodies.append(msgspec.json.encode(report))
    return bodies


@dataclass(frozen=True)
class Sent:
    rate: float  # appended reports/s
    appended: int
    rejected: int
    first_error: str


async def send_reports(port: int, bodies: list[bytes], in_flight: int) -> Sent:
    requests = [http_request(port, "POST", "/v1/reports:batch", b) for b in bodies]
    conns = [await HttpConnection.open(port) for _ in range(min(in_flight, len(requests)))]
    pending = iter(requests)
    appended = rejected = 0
    first_error = ""

    async def sender(conn: HttpConnection) -> None:
        nonlocal appended, rejected, first_error
        for request in pending:
            status, raw = await conn.exchange(request)
            if status != 200:
                raise RuntimeError(f"reports:batch answered {status}: {raw[:300]!r}")
            result = msgspec.json.decode(raw)
            appended += result["appended"]
            rejected += result["rejected"] + result["duplicates"]
            if not first_error and result["rejected"]:
                first_error = next(r["error"] for r in result["results"] if r.get("error"))

    started = time.perf_counter()
    try:
        await asyncio.gather(*(sender(c) for c in conns))
    finally:
        elapsed = time.perf_counter() - started
        await asyncio.gather(*(c.close() for c in conns))
    return Sent(appended / elapsed, appended, rejected, first_error)


def direct_events(agents: list[SigningKey], count: int, tag: str) -> list[tuple[SignedEvent, str]]:
    """The baseline's events, signed by their actors (the client's work: not timed)."""
    keys = {a.did: a for a in agents}
    return [
        (SignedEvent.create(e, keys[e.actor]), f"{tag}-{i}")
        for i, e in enumerate(violations(agents, count, tag))
    ]


async def direct_appends(stack: Stack, events: list[tuple[SignedEvent, str]]) -> float:
    """Baseline: the events straight into the ledger, 64 appenders, one event per call."""
    store = await PostgresEventStore.open(stack.database_url, stack.ledger_key)
    try:
        pending = iter(events)

        async def appender() -> None:
            for event, key in pending:
                result = await store.append([event], idempotency_key=key)
                assert not result.duplicate

        started = time.perf_counter()
        await asyncio.gather(*(appender() for _ in range(DIRECT_APPENDERS)))
        return len(events) / (time.perf_counter() - started)
    finally:
        await store.close()


# -- one server configuration ---------------------------------------------------------------


MEASURES = (
    "GET /health (baseline)",
    "GET /v1/agents/{did}/trust",
    "direct append, 64 appenders (baseline)",
    "POST /v1/reports:batch",
    "GET /health, 64 connections (baseline)",
    "POST /v1/violations, 64 connections",
    "GET /health, open loop (baseline)",
    "POST /v1/violations, open loop",
)


@dataclass
class Figures:
    health: list[Load] = field(default_factory=list)
    trust: list[Load] = field(default_factory=list)
    health64: list[Load] = field(default_factory=list)
    singles: list[Load] = field(default_factory=list)
    open_health: list[Load] = field(default_factory=list)
    open_singles: list[Load] = field(default_factory=list)
    reports: list[float] = field(default_factory=list)
    direct: list[float] = field(default_factory=list)
    cores: dict[str, list[dict[str, float]]] = field(default_factory=dict)


def busy(cores: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in cores.items() if v >= 0.005)


async def measure(
    args: argparse.Namespace,
    stack: Stack,
    client: Client,
    meter: CpuMeter,
    port: int,
    agents: list[SigningKey],
    workers: int,
) -> Figures:
    figures = Figures()
    trust_paths = [f"/v1/agents/{a.did}/trust" for a in agents]
    gets = {
        "health": (MEASURES[0], ["/health"], figures.health),
        "trust": (MEASURES[1], trust_paths, figures.trust),
    }
    for number in range(1, args.repeat + 1):
        # Alternate the order so drift on a noisy machine does not favour one side.
        for name in ("health", "trust") if number % 2 else ("trust", "health"):
            title, paths, loads = gets[name]
            await client.run(port, paths, args.concurrency, args.warmup)
            before = meter.snapshot()
            load = await client.run(port, paths, args.concurrency, args.duration)
            cores = meter.cores(before, meter.snapshot())
            loads.append(load)
            figures.cores.setdefault(title, []).append(cores)
            print(
                f"  round {number} {name:7} {load.rate:9,.0f} req/s  p50 {load.p50_ms:6.2f} ms  "
                f"p99 {load.p99_ms:6.2f} ms  errors {load.errors}  cores: {busy(cores)}"
            )
        tag = f"w{workers}r{number}-{uuid.uuid4().hex[:8]}"
        await single_measures(args, stack, client, meter, port, agents, figures, number, tag)
        if not args.reports:
            continue
        bodies = report_batches(agents, args.reports, args.batch_size, f"http-{tag}")
        await settle(stack)
        before = meter.snapshot()
        sent = await send_reports(port, bodies, args.in_flight)
        cores = meter.cores(before, meter.snapshot())
        lag = await settle(stack)
        figures.reports.append(sent.rate)
        figures.cores.setdefault(MEASURES[3], []).append(cores)
        note = f", {sent.rejected} rejected: {sent.first_error}" if sent.rejected else ""
        print(
            f"  round {number} reports {sent.rate:9,.0f} /s  ({sent.appended:,} appended{note}; "
            f"projector done {lag:.1f} s later)  cores: {busy(cores)}"
        )
        events = direct_events(agents, args.reports, f"direct-{tag}")
        before = meter.snapshot()
        direct = await direct_appends(stack, events)
        cores = meter.cores(before, meter.snapshot())
        lag = await settle(stack)
        figures.direct.append(direct)
        figures.cores.setdefault(MEASURES[2], []).append(cores)
        print(
            f"  round {number} direct  {direct:9,.0f} /s  "
            f"(projector done {lag:.1f} s later)  cores: {busy(cores)}"
        )
    return figures


async def single_measures(
    args: argparse.Namespace,
    stack: Stack,
    client: Client,
    meter: CpuMeter,
    port: int,
    agents: list[SigningKey],
    figures: Figures,
    number: int,
    tag: str,
) -> None:
    """One signed ``policy.violation`` per ``POST /v1/violations``: closed loop at
    ``--single-connections`` beside ``GET /health`` at as many, then open loop at
    ``--open-rate`` per second beside ``GET /health`` at the same rate."""
    conns, seconds = args.single_connections, args.duration
    budget = round(args.single_max_rate * seconds)
    warm = single_reports(agents, round(args.single_max_rate * args.warmup), f"w-{tag}")
    timed = single_reports(agents, budget, f"s-{tag}")
    pairs: list[tuple[str, str, list[Load]]] = [
        ("health64", MEASURES[4], figures.health64),
        ("singles", MEASURES[5], figures.singles),
    ]
    for name, title, loads in pairs if number % 2 else pairs[::-1]:
        await settle(stack)
        if name == "health64":
            await client.run(port, ["/health"], conns, args.warmup)
        else:
            await posts(client, port, "/v1/violations", warm, conns, args.warmup)
        before = meter.snapshot()
        if name == "health64":
            load = await client.run(port, ["/health"], conns, seconds)
        else:
            load = await posts(client, port, "/v1/violations", timed, conns, seconds)
        cores = meter.cores(before, meter.snapshot())
        if name == "singles" and load.rate * seconds > len(timed):
            print(f"  (more than {len(timed):,} reports: raise --single-max-rate)")
        loads.append(load)
        figures.cores.setdefault(title, []).append(cores)
        print(
            f"  round {number} {name:8} {load.rate:9,.0f} /s  p50 {load.p50_ms:6.2f} ms  "
            f"p99 {load.p99_ms:6.2f} ms  errors {load.errors}  cores: {busy(cores)}"
        )
    count = round(args.open_rate * seconds)
    health = [http_request(port, "GET", "/health")] * count
    reports = [
        http_request(port, "POST", "/v1/violations", b)
        for b in single_reports(agents, count, f"o-{tag}")
    ]
    opens: list[tuple[str, str, list[bytes], int, list[Load]]] = [
        ("open health", MEASURES[6], health, 200, figures.open_health),
        ("open singles", MEASURES[7], reports, 201, figures.open_singles),
    ]
    for name, title, requests, ok, loads in opens if number % 2 else opens[::-1]:
        await settle(stack)
        before = meter.snapshot()
        load = await open_loop(port, requests, args.open_rate, conns, ok)
        cores = meter.cores(before, meter.snapshot())
        loads.append(load)
        figures.cores.setdefault(title, []).append(cores)
        print(
            f"  round {number} {name:12} {load.rate:7,.0f} /s  p50 {load.p50_ms:6.2f} ms  "
            f"p99 {load.p99_ms:6.2f} ms  errors {load.errors}  cores: {busy(cores)}"
        )


def med(values: list[float]) -> float:
    return statistics.median(values)


SERVER_GROUPS = ("api", "api loop", "projector", "postgres", "redis")


def cpu_per_request(figures: Figures) -> None:
    """Each server process's CPU per request answered (µs; medians of the rounds):
    steadier than a rate on a shared machine, and it shows what a request costs the
    whole stack, not only the API's event loop ("all": the API, projector, PostgreSQL
    and Redis together)."""
    rates: dict[str, list[float]] = {
        MEASURES[0]: [x.rate for x in figures.health],
        MEASURES[1]: [x.rate for x in figures.trust],
        MEASURES[2]: figures.direct,
        MEASURES[3]: figures.reports,
        MEASURES[4]: [x.rate for x in figures.health64],
        MEASURES[5]: [x.rate for x in figures.singles],
        MEASURES[6]: [x.rate for x in figures.open_health],
        MEASURES[7]: [x.rate for x in figures.open_singles],
    }
    print("\nCPU per request answered, µs (medians)")
    print(f"{'measure':40}" + "".join(f" {g:>9}" for g in (*SERVER_GROUPS, "all")))
    for name in MEASURES:
        rounds = zip(figures.cores.get(name, []), rates[name], strict=True)  # one per round
        pairs = [(c, r) for c, r in rounds if c and r]
        if not pairs:
            continue
        cells = [med([c.get(g, 0.0) / r * 1e6 for c, r in pairs]) for g in SERVER_GROUPS]
        ours = [g for g in SERVER_GROUPS if g != "api loop"]  # the loop is part of "api"
        total = med([sum(c.get(g, 0.0) for g in ours) / r * 1e6 for c, r in pairs])
        print(f"{name:40}" + "".join(f" {v:9.0f}" for v in (*cells, total)))


def report(args: argparse.Namespace, workers: int, figures: Figures) -> list[tuple[str, bool]]:
    """The table of medians and each target, met or not (never asserted)."""
    health = med([x.rate for x in figures.health])
    trust = med([x.rate for x in figures.trust])
    print()
    print(f"serve api --workers {workers}: medians of {args.repeat} round(s)")

    def row(name: str, rate: float, ratio: float, loads: list[Load] | None = None) -> None:
        p50 = p99 = errors = ""
        if loads is not None:
            p50 = f"{med([x.p50_ms for x in loads]):.2f}"
            p99 = f"{med([x.p99_ms for x in loads]):.2f}"
            errors = str(sum(x.errors for x in loads))
        print(f"{name:50} {rate:9,.0f} {p50:>7} {p99:>7} {errors:>6} {ratio:6.3f}")

    print(f"{'measure':50} {'per s':>9} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'ratio':>6}")
    c = args.concurrency
    row(f"{MEASURES[0]}, {c} conns", health, 1.0, figures.health)
    row(f"{MEASURES[1]}, {c} conns", trust, trust / health, figures.trust)
    health64 = med([x.rate for x in figures.health64])
    singles = med([x.rate for x in figures.singles])
    row(MEASURES[4].replace("64", str(args.single_connections)), health64, 1.0, figures.health64)
    row(
        MEASURES[5].replace("64", str(args.single_connections)),
        singles,
        singles / health64,
        figures.singles,
    )
    rate = f"{args.open_rate:,.0f}/s"
    open_health = med([x.rate for x in figures.open_health])
    open_singles = med([x.rate for x in figures.open_singles])
    row(f"{MEASURES[6]} at {rate}", open_health, 1.0, figures.open_health)
    row(f"{MEASURES[7]} at {rate}", open_singles, open_singles / open_health, figures.open_singles)
    reports = direct = 0.0
    if figures.reports:
        reports, direct = med(figures.reports), med(figures.direct)
        row(MEASURES[2], direct, 1.0)
        batch = f"{args.batch_size:,}/batch, {args.in_flight} in flight"
        row(f"{MEASURES[3]} ({batch})", reports, reports / direct)
    if any(figures.cores.get(m) and figures.cores[m][0] for m in MEASURES):
        print(f"\ncores busy during each measure, of {os.cpu_count()} (medians)")
        print(f"{'measure':40}" + "".join(f" {g:>9}" for g in CpuMeter.GROUPS))
        for name in MEASURES:
            rounds = [c for c in figures.cores.get(name, []) if c]
            if rounds:
                cells = [med([c.get(g, 0.0) for c in rounds]) for g in CpuMeter.GROUPS]
                print(f"{name:40}" + "".join(f" {v:9.2f}" for v in cells))
        cpu_per_request(figures)
        noise = max(
            med([c.get("other", 0.0) for c in figures.cores.get(m, []) if c] or [0.0])
            for m in MEASURES
        )
        if noise >= 0.25:
            print(
                f"note: other work on this machine kept up to {noise:.2f} cores busy during "
                "the measures: absolute figures are low, ratios less so"
            )
    print()
    trust_p99 = med([x.p99_ms for x in figures.trust])
    open_p99 = med([x.p99_ms for x in figures.open_singles])
    verdicts = [
        (f"trust/health >= {TRUST_TARGET} ({trust / health:.3f})", trust / health >= TRUST_TARGET),
        (f"trust p99 <= {TRUST_P99_MS:g} ms ({trust_p99:.2f})", trust_p99 <= TRUST_P99_MS),
        (
            f"single reports/health >= {SINGLE_TARGET} ({singles / health64:.3f})",
            singles / health64 >= SINGLE_TARGET,
        ),
        (
            f"open-loop report p99 <= {OPEN_P99_MS:g} ms at {rate} ({open_p99:.2f})",
            open_p99 <= OPEN_P99_MS,
        ),
    ]
    if figures.reports:
        verdicts.append(
            (
                f">= {REPORTS_TARGET:,.0f} batched reports/s ({reports:,.0f})",
                reports >= REPORTS_TARGET,
            )
        )
    for text, met in verdicts:
        print(f"target {text}: {'met' if met else 'NOT met'}")
    return verdicts


# -- main -------------------------------------------------------------------------------------


def choose_client(args: argparse.Namespace, workdir: Path) -> Client:
    wrk = shutil.which("wrk")
    if args.client == "wrk" and wrk is None:
        raise SystemExit("bench/api.py: --client wrk, but wrk is not on PATH")
    if args.client != "python" and wrk is not None:
        return WrkClient(wrk, args.client_threads, workdir)
    return PythonClient()


async def fresh_database(server_url: str) -> str:
    name = "bench_api_" + uuid.uuid4().hex[:10]
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    url = server_url.rsplit("/", 1)[0] + "/" + name
    await asyncio.to_thread(upgrade, url)
    return url


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="agentmesh-bench-api-"))
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    services: list[Service] = []
    try:
        server_url = os.environ.get("AGENTMESH_DATABASE_URL")
        if server_url is None:
            postgres = EmbeddedPostgres(workdir / "pg").start()
            server_url = postgres.url
        redis_host = os.environ.get("AGENTMESH_REDIS_HOST")
        redis_port = int(os.environ.get("AGENTMESH_REDIS_PORT", "6379"))
        if redis_host is None:
            redis = EmbeddedRedis(workdir / "redis").start()
            redis_host, redis_port = redis.host, redis.port
        stack = Stack(
            database_url=await fresh_database(server_url),
            redis_host=redis_host,
            redis_port=redis_port,
            redis_prefix=f"bench{uuid.uuid4().hex[:8]}:",
            ledger_key=SigningKey.generate(),
            admin_token=secrets.token_urlsafe(24),
            logs=workdir,
            cache=args.cache == "on",
        )
        client = choose_client(args, workdir)
        print(
            f"cores: {os.cpu_count()}, rounds: {args.repeat}, agents: {args.agents}, "
            f"client: {client.name}, concurrency: {args.concurrency}, "
            f"{args.duration:g} s per GET measure (+{args.warmup:g} s warm-up), "
            f"reports per round: {args.reports:,}, API read cache: {args.cache}"
        )
        projector = Service("projector", ["serve", "projector"], stack.env(), workdir)
        services.append(projector)
        meter = CpuMeter()
        meter.roots["projector"] = projector.pid
        for name, server in (("postgres", postgres), ("redis", redis)):
            if server is not None and server._process is not None:
                meter.roots[name] = server._process.pid
        agents: list[SigningKey] = []
        verdicts = []
        for workers in args.workers:
            api, port = await start_api(stack, workers)
            services.append(api)
            meter.roots["api"] = api.pid
            print(f"\nserve api --workers {workers} (pid {api.pid}) on :{port}")
            if not agents:
                started = time.perf_counter()
                if args.seed == "http":
                    agents = await register_agents(port, stack, args.agents)
                else:
                    agents = await seed_agents(stack, args.agents)
                await check_projected(port, stack, [a.did for a in agents])
                how = "POST /v1/agents" if args.seed == "http" else "PostgresEventStore.append"
                print(
                    f"  registered {len(agents):,} agents ({how}), projected them and read "
                    f"their trust in {time.perf_counter() - started:.1f} s"
                )
            else:
                await check_projected(port, stack, [a.did for a in agents])
            figures = await measure(args, stack, client, meter, port, agents, workers)
            projector.check()
            api.check()
            api.stop()
            services.remove(api)
            verdicts.append((workers, report(args, workers, figures)))
        if len(verdicts) > 1:
            print()
            for workers, found in verdicts:
                for text, met in found:
                    print(f"workers {workers}: target {text}: {'met' if met else 'NOT met'}")
    finally:
        for service in reversed(services):
            service.stop()
        if redis is not None:
            redis.stop()
        if postgres is not None:
            postgres.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    end_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=positive, default=3)
    parser.add_argument(
        "--workers", type=positive, nargs="+", default=[1], help="serve api --workers (each)"
    )
    parser.add_argument("--concurrency", type=positive, default=32, help="GET connections")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per GET measure")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each measure")
    parser.add_argument("--agents", type=positive, default=300)
    parser.add_argument(
        "--seed",
        choices=["store", "http"],
        default="store",
        help="register the agents through PostgresEventStore.append (default) or POST /v1/agents",
    )
    parser.add_argument(
        "--reports", type=int, default=20_000, help="batched reports per round (0: skip)"
    )
    parser.add_argument(
        "--single-connections", type=positive, default=64, help="POST /v1/violations conns"
    )
    parser.add_argument(
        "--single-max-rate",
        type=positive,
        default=5000,
        help="single reports signed per second of a closed-loop measure (an upper bound)",
    )
    parser.add_argument(
        "--open-rate", type=float, default=1000.0, help="open-loop reports (and /health) per s"
    )
    parser.add_argument("--batch-size", type=positive, default=1000)
    parser.add_argument("--in-flight", type=positive, default=4, help="batches sent at once")
    parser.add_argument(
        "--cache", choices=["on", "off"], default="on", help="the API's in-process read cache"
    )
    parser.add_argument("--client", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--client-threads", type=positive, default=1, help="wrk threads")
    asyncio.run(main(parser.parse_args()))
