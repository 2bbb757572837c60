"""The sidecar: latency it adds to MCP calls, decisions/s, violation-to-denial time.

Prints, from one run (medians of ``--repeat`` rounds):
  * MCP ``tools/call`` latency p50/p99 straight to the upstream MCP server (the
    baseline) and through the sidecar, and what the sidecar adds (per round
    sidecar minus direct, then the median). One client for both paths: raw
    HTTP/1.1 keep-alive, one call at a time, each path its own MCP session
    (2025-11-25 ``initialize``), ``--calls`` calls per path and round after
    ``--warmup``, in blocks that alternate between the paths so drift on a
    noisy machine hits both alike. The upstream answers plain JSON
    (``json_response=True``: no SSE framing in the figure) and, unless
    ``--no-sse``, SSE (the SDK's default). Also the CPU each call cost the
    sidecar and the upstream process.
  * The floor of any extra hop: the same calls through a plain nginx reverse
    proxy (keep-alive to the upstream, no buffering) when ``/usr/sbin/nginx`` is
    installed; the bench installs nothing and says when it is absent.
  * Decisions/s: ``Sidecar.decide(Action("tool", "search"))`` in this process on
    a warm trust cache (policy evaluation, cached trust, metrics) beside the pure
    ``decide()`` of the same policy and trust (the baseline); and blocked
    ``tools/call``s/s through HTTP (``--connections`` keep-alive connections;
    each blocked call is signed and queued in the outbox, never reaches the
    upstream) beside ``GET /health`` on the same sidecar with the same client
    (the baseline), with the cores the sidecar process kept busy and its CPU
    per request. Two kinds: the same blocked call retried (one penalty, then
    each retry counted into its window) and a distinct blocked tool every call
    (each a signed violation of its own). A blocked call is answered only once
    its record is committed (SQLite, ``synchronous=FULL``; one writer thread
    commits everything queued in one transaction); /health is likely held back
    by this Python client rather than by the sidecar (see its cores).
  * Blocked calls/s from a lower-overhead client: the asyncio client above costs about
    as much CPU per request as a denial costs the sidecar, on the same cores, so it
    measures its own ceiling too. A raw-socket load generator (a process of its own,
    ``--connections`` MCP sessions, ``--depth`` requests pipelined on each) sends the
    same blocked call retried; its own ceiling is measured in the same round against a
    trivial server (a fixed 200 per request), and printed beside it with its CPU per
    request, so a figure held back by the client shows as such.
  * Propagation: ``--rounds`` times per round, a ``low`` violation appended
    through ``POST /v1/violations`` (admin); from its answer, calls through the
    sidecar back to back until the first one blocked (a rule ``min_score`` just
    under the agent's score), and at the same time ``GET /v1/agents/{did}/trust``
    back to back until it shows the violation's position (the baseline: the
    projector's own lag). p50/p99 of both (below 100 violations per round, p99
    is the slowest). Between violations the bench waits
    for the sidecar's own report of the denial to be projected and gives the
    score back with admin ``trust.signal``s.

The stack is real and every server is a process of its own, so the measuring
client (this process) shares no event loop with what it measures: embedded
PostgreSQL and Redis, migrations, ``python -m agentmesh serve projector``,
``serve api`` (1 worker), two upstream MCP servers (this file with
``--serve-upstream``: the ``mcp`` SDK's MCPServer on uvicorn, as in
tests/sidecar_support.py) and, per measure, ``serve sidecar`` for an agent of
its own (strict policy). Targets are reported as met or not, never enforced.

Usage: .venv/bin/python bench/sidecar.py [--repeat 3] [--calls 2000] [--warmup 300]
           [--rounds 30] [--seconds 5] [--connections 8] [--depth 16] [--decide-seconds 1]
           [--no-sse]
Uses AGENTMESH_DATABASE_URL (a fresh database is created on that server) and
AGENTMESH_REDIS_HOST/AGENTMESH_REDIS_PORT when set, else embedded servers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentmesh.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from agentmesh.settings import Settings
from agentmesh.sidecar_main import parse_upstreams
from agentmesh.wiring import open_projection_store, trust_config
from bench.api import (
    HOST,
    HttpConnection,
    Service,
    Stack,
    call,
    fresh_database,
    http_request,
    settle,
    start_api,
)
from bench.common import cpu_seconds, end_on_sigterm, percentile, positive
from ledger.identity import SigningKey
from ledger.timefmt import utc_now
from projections.readstore import ProjectionReader
from sidecar.mcp import BLOCKED_CODE
from sidecar.outbox import Outbox
from sidecar.policy import Action, PolicyWatcher, RateLimiter, decide
from sidecar.service import Sidecar
from sidecar.trust import TrustSource

PROTOCOL_VERSION = "2025-11-25"
ADDED_P50_TARGET_MS = 0.3
ADDED_P99_TARGET_MS = 1.0
BLOCKED_TARGET = 5000.0  # blocked calls/s on one core
NGINX = Path("/usr/sbin/nginx")
PROPAGATION_TARGET_MS = 100.0
BLOCK = 250  # calls per block; the paths alternate block by block
RESULT = b"results for x"
BLOCKED = b'"code":%d' % BLOCKED_CODE
PROBE_SCORES = range(1000, 300, -5)  # one probe tool per min_score
SIGNAL_POINTS = 5  # AGENTMESH_TRUST_REWARD_SIGNAL's default (the stack keeps it)

POLICY = """\
version: 1
rules:
  - id: everyday-tools
    tools: ["search"]
    effect: allow
"""


def probe_policy() -> str:
    rules = "".join(
        f"  - id: probe-{t}\n    tools: [probe_{t}]\n    effect: allow\n    min_score: {t}\n"
        for t in PROBE_SCORES
    )
    return POLICY + rules


# -- the upstream MCP server (run as a process of its own) ---------------------------------


def serve_upstream(port: int, json_response: bool) -> None:
    """The SDK's MCPServer over Streamable HTTP on uvicorn, until SIGTERM."""
    import uvicorn
    from mcp.server.mcpserver import MCPServer

    server: MCPServer = MCPServer("bench-upstream", log_level="WARNING")

    def search(query: str) -> str:
        return f"results for {query}"

    def probe() -> str:
        return "allowed"

    server.add_tool(search, name="search")
    for score in PROBE_SCORES:
        server.add_tool(probe, name=f"probe_{score}")
    app = server.streamable_http_app(host=HOST, json_response=json_response)
    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False)


class Upstream:
    """``bench/sidecar.py --serve-upstream PORT`` as a child process (its own session)."""

    def __init__(self, name: str, json_response: bool, logs: Path) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = logs / f"upstream-{name}.log"
        argv = [sys.executable, __file__, "--serve-upstream", str(self.port)]
        if json_response:
            argv.append("--json-response")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/mcp"

    def check(self) -> None:
        if self.process.poll() is not None:
            log = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"upstream {self.name} exited ({self.process.returncode}):\n{log}")

    async def ready(self, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.check()
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, RuntimeError):
                conn = await McpConnection.open(self.port, "/mcp")
                await conn.close()
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"upstream {self.name} never answered initialize")
            await asyncio.sleep(0.1)

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


# -- one client for every path: raw HTTP/1.1 keep-alive, one MCP session -------------------


class McpConnection:
    """One keep-alive HTTP/1.1 connection holding one MCP session (2025-11-25:
    ``initialize``, then ``Mcp-Session-Id`` and ``MCP-Protocol-Version`` on every
    request); one request at a time. Responses: Content-Length or chunked (SSE)."""

    def __init__(
        self, port: int, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.port = port
        self.path = path
        self._reader = reader
        self._writer = writer
        self._session_headers = ""
        self._next_id = 0

    @classmethod
    async def open(cls, port: int, path: str) -> McpConnection:
        reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 20)
        conn = cls(port, path, reader, writer)
        try:
            await conn._initialize()
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _initialize(self) -> None:
        hello = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "bench-sidecar", "version": "1"},
            },
        }
        status, headers, body = await self._exchange(self.post(hello))
        session = headers.get(b"mcp-session-id")
        if status != 200 or session is None:
            raise RuntimeError(f"initialize answered {status}: {body[:300]!r}")
        self._session_headers = (
            f"MCP-Protocol-Version: {PROTOCOL_VERSION}\r\nMcp-Session-Id: {session.decode()}\r\n"
        )
        status, _, body = await self._exchange(
            self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        )
        if status != 202:
            raise RuntimeError(f"notifications/initialized answered {status}: {body[:300]!r}")

    def post(self, message: dict[str, Any]) -> bytes:
        body = msgspec.json.encode(message)
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
            "Accept: application/json, text/event-stream\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{self._session_headers}\r\n"
        )
        return head.encode() + body

    def call(self, tool: str, arguments: dict[str, Any] | None = None) -> bytes:
        """A ``tools/call`` request (the next JSON-RPC id of this session)."""
        self._next_id += 1
        params = {"name": tool, "arguments": {"query": "x"} if arguments is None else arguments}
        return self.post(
            {"jsonrpc": "2.0", "id": self._next_id, "method": "tools/call", "params": params}
        )

    def get(self, path: str) -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n\r\n".encode()

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        status, _, body = await self._exchange(request)
        return status, body

    async def _exchange(self, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        self._writer.write(request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        headers: dict[bytes, bytes] = {}
        for line in head[:-4].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            return status, headers, await self._read_chunked()
        length = int(headers.get(b"content-length", b"0"))
        return status, headers, await self._reader.readexactly(length)

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


# -- the stack -----------------------------------------------------------------------------


@dataclass
class Mesh:
    stack: Stack
    api_port: int
    json_upstream: Upstream
    sse_upstream: Upstream | None

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.stack.admin_token}"}

    @property
    def upstreams(self) -> str:
        found = f"json={self.json_upstream.url}"
        if self.sse_upstream is not None:
            found += f",sse={self.sse_upstream.url}"
        return found

    def sidecar_env(self, name: str, key: SigningKey, policy: str, port: int) -> dict[str, str]:
        policy_file = self.stack.logs / f"policy-{name}.yaml"
        policy_file.write_text(policy)
        return {
            **self.stack.env(),
            "AGENTMESH_AGENT_PRIVATE_KEY": key.private_key_pem(),
            "AGENTMESH_API_URL": f"http://{HOST}:{self.api_port}",
            "AGENTMESH_POLICY_FILE": str(policy_file),
            "AGENTMESH_POLICY": "strict",
            "AGENTMESH_UPSTREAMS": self.upstreams,
            "AGENTMESH_SIDECAR_HOST": HOST,
            "AGENTMESH_SIDECAR_PORT": str(port),
            "AGENTMESH_SIDECAR_METRICS_PORT": "0",
            "AGENTMESH_SIDECAR_HEALTH_FILE": str(self.stack.logs / f"healthy-{name}"),
            "AGENTMESH_SIDECAR_OUTBOX_DIR": str(self.stack.logs / f"outbox-{name}"),
        }

    async def register(self) -> SigningKey:
        key = SigningKey.generate()
        status, body = await call(
            self.api_port, "POST", "/v1/agents", {"public_key": key.public.pem()}, self.admin
        )
        if status != 201:
            raise RuntimeError(f"registration answered {status}: {body}")
        deadline = time.monotonic() + 60
        while (await self.trust(key.did))[0] != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{key.did} never projected")
            await asyncio.sleep(0.02)
        return key

    async def trust(self, did: str) -> tuple[int, Any]:
        return await call(self.api_port, "GET", f"/v1/agents/{did}/trust")


class RunningSidecar:
    """``python -m agentmesh serve sidecar`` for one agent, ready when /health is 200."""

    def __init__(self, mesh: Mesh, name: str, key: SigningKey, policy: str) -> None:
        self.port = free_port()
        self.service = Service(
            f"sidecar-{name}",
            ["serve", "sidecar"],
            mesh.sidecar_env(name, key, policy, self.port),
            mesh.stack.logs,
        )

    @property
    def pid(self) -> int:
        return self.service.pid

    async def ready(self, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.service.check()
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
                if (await call(self.port, "GET", "/health"))[0] == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sidecar never became healthy:\n{self.service.tail()}")
            await asyncio.sleep(0.1)

    async def outbox_depth(self) -> int | None:
        status, body = await call(self.port, "GET", "/health")
        return int(body["outbox_depth"]) if status == 200 else None

    async def quiet(self, stack: Stack, seconds: float = 300) -> None:
        """Until the sidecar's outbox is empty and the projector has folded the ledger."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if await self.outbox_depth() == 0:
                await settle(stack, seconds)
                if await self.outbox_depth() == 0:
                    return
            await asyncio.sleep(0.05)
        print(f"  (sidecar outbox not empty after {seconds:.0f} s; going on)")

    def check(self) -> None:
        self.service.check()

    def stop(self) -> None:
        self.service.stop()


class Nginx:
    """A plain nginx reverse proxy (keep-alive upstreams, no buffering): the floor of
    any extra hop. Only when ``/usr/sbin/nginx`` is installed."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log

    @classmethod
    def start(cls, workdir: Path, upstreams: list[Upstream]) -> Nginx | None:
        if not NGINX.exists():
            return None
        port = free_port()
        prefix = workdir / "nginx"
        prefix.mkdir(exist_ok=True)
        pools = "".join(
            f"  upstream {u.name} {{ server {HOST}:{u.port}; keepalive 32; }}\n" for u in upstreams
        )
        locations = "".join(
            f"    location /{u.name}/ {{ proxy_pass http://{u.name}/; proxy_http_version 1.1;"
            f' proxy_set_header Connection ""; proxy_set_header Host {HOST}:{u.port};'
            " proxy_buffering off; proxy_request_buffering off; }\n"
            for u in upstreams
        )
        conf = prefix / "nginx.conf"
        conf.write_text(
            f"daemon off;\nworker_processes 1;\npid {prefix}/nginx.pid;\n"
            f"error_log {prefix}/error.log warn;\nevents {{ worker_connections 1024; }}\n"
            f"http {{\n  access_log off;\n{pools}  server {{\n    listen {HOST}:{port};\n"
            f"{locations}  }}\n}}\n"
        )
        log = prefix / "stderr.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [str(NGINX), "-p", str(prefix), "-c", str(conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(process, port, log)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def ready(self, path: str, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.check()
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, RuntimeError):
                conn = await McpConnection.open(self.port, path)
                await conn.close()
                return
            if time.monotonic() > deadline:
                raise RuntimeError("nginx never relayed initialize")
            await asyncio.sleep(0.1)

    def check(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"nginx exited:\n{self.log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


# -- 1. latency ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p99_ms: float
    rate: float  # calls/s, one at a time
    errors: int
    sidecar_us: float  # sidecar process CPU per call
    upstream_us: float  # upstream process CPU per call


async def timed_calls(conn: McpConnection, count: int, out: list[float]) -> int:
    """``count`` sequential ``tools/call search``; latencies appended to ``out``; errors."""
    requests = [conn.call("search") for _ in range(count)]
    clock = time.perf_counter
    record = out.append
    errors = 0
    for request in requests:
        started = clock()
        status, body = await conn.exchange(request)
        record(clock() - started)
        if status != 200 or RESULT not in body:
            errors += 1
    return errors


async def latency_round(
    args: argparse.Namespace,
    paths: dict[str, tuple[int, str]],
    sidecar_pid: int,
    upstream_pid: int,
    flip: bool,
) -> dict[str, Latency]:
    conns = {name: await McpConnection.open(port, path) for name, (port, path) in paths.items()}
    samples: dict[str, list[float]] = {name: [] for name in paths}
    errors = dict.fromkeys(paths, 0)
    busy = {name: [0.0, 0.0, 0.0] for name in paths}  # wall, sidecar CPU, upstream CPU
    try:
        for conn in conns.values():
            await timed_calls(conn, args.warmup, [])
        names = list(paths)[::-1] if flip else list(paths)
        blocks = math.ceil(args.calls / BLOCK)
        for number in range(blocks):
            count = min(BLOCK, args.calls - number * BLOCK)
            for name in names if number % 2 == 0 else names[::-1]:
                before = (time.perf_counter(), cpu_seconds(sidecar_pid), cpu_seconds(upstream_pid))
                errors[name] += await timed_calls(conns[name], count, samples[name])
                after = (time.perf_counter(), cpu_seconds(sidecar_pid), cpu_seconds(upstream_pid))
                for index in range(3):
                    busy[name][index] += after[index] - before[index]
    finally:
        for conn in conns.values():
            await conn.close()
    found = {}
    for name, values in samples.items():
        values.sort()
        wall, sidecar_cpu, upstream_cpu = busy[name]
        found[name] = Latency(
            p50_ms=percentile(values, 0.50) * 1000,
            p99_ms=percentile(values, 0.99) * 1000,
            rate=len(values) / wall,
            errors=errors[name],
            sidecar_us=sidecar_cpu / len(values) * 1e6,
            upstream_us=upstream_cpu / len(values) * 1e6,
        )
    return found


# -- 2a. decisions in process --------------------------------------------------------------


@contextlib.asynccontextmanager
async def in_process_sidecar(settings: Settings) -> AsyncIterator[Sidecar]:
    """A ``Sidecar`` wired as ``run_sidecar`` wires it (trust watched and kept fresh),
    serving nothing: for ``decide``."""
    key = settings.signing_key()
    policy = PolicyWatcher(
        settings.policy_file, settings.policy_mode, settings.governance_shadow_mode
    )
    store = await open_projection_store(settings)
    reader = ProjectionReader(store, trust_config(settings))
    trust = TrustSource(
        reader, key.did, utc_now, refresh_seconds=min(float(settings.cache_ttl or 5), 5.0)
    )
    outbox = Outbox.open(settings.sidecar_outbox_dir, settings.require_api_url(), key)
    api = httpx.AsyncClient(base_url=settings.require_api_url(), timeout=10)
    sidecar = Sidecar(
        key=key,
        trust=trust,
        policy=policy,
        outbox=outbox,
        upstreams=parse_upstreams(settings.upstreams),
        api=api,
        registry=CollectorRegistry(),
        clock=utc_now,
        handshake_ttl=settings.sidecar_handshake_ttl,
        health_file=None,
    )
    tasks = [asyncio.create_task(trust.watch()), asyncio.create_task(trust.keep_fresh())]
    try:
        await trust.refresh()
        yield sidecar
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await outbox.aclose()
        await sidecar.close()
        await api.aclose()
        await store.close()


@dataclass(frozen=True)
class Decisions:
    pure: float  # decide() alone, per s
    sidecar: float  # Sidecar.decide, per s
    misses: int  # trust cache misses during the Sidecar.decide measure


async def decision_round(sidecar: Sidecar, seconds: float, flip: bool) -> Decisions:
    action = Action("tool", "search")
    trust = await sidecar.trust.current()
    if trust is None:
        raise RuntimeError("the in-process sidecar has no trust data")
    policy, did, limiter = sidecar.policy.current, sidecar.did, RateLimiter()
    if not decide(policy, action, trust, did, limiter, time.monotonic()).allowed:
        raise RuntimeError("search is not allowed: the measure would record denials")

    async def pure() -> float:
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for _ in range(1000):
                decide(policy, action, trust, did, limiter, time.monotonic())
            count += 1000
            await asyncio.sleep(0)
        return count / (time.perf_counter() - started)

    async def full() -> float:
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for _ in range(1000):
                await sidecar.decide(action)
            count += 1000
            await asyncio.sleep(0)  # let the trust watcher run, as the sidecar's loop would
        return count / (time.perf_counter() - started)

    misses = sidecar.trust.misses
    if flip:
        full_rate = await full()
        pure_rate = await pure()
    else:
        pure_rate = await pure()
        full_rate = await full()
    return Decisions(pure_rate, full_rate, sidecar.trust.misses - misses)


# -- 2b. blocked calls through HTTP --------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    rate: float
    errors: int
    cores: float  # of the sidecar process
    client_us: float = float("nan")  # the load generator's own CPU per request


async def fixed_load(
    port: int,
    connections: int,
    seconds: float,
    make: Callable[[McpConnection], bytes],
    ok: Callable[[int, bytes], bool],
    pid: int,
) -> Rate:
    conns = [await McpConnection.open(port, "/mcp/json") for _ in range(connections)]
    count = errors = 0

    async def worker(conn: McpConnection, deadline: float) -> None:
        nonlocal count, errors
        clock = time.perf_counter
        while clock() < deadline:
            status, body = await conn.exchange(make(conn))
            count += 1
            if not ok(status, body):
                errors += 1

    try:
        warm = time.perf_counter() + min(1.0, seconds / 4)
        await asyncio.gather(*(worker(c, warm) for c in conns))
        count = errors = 0
        cpu, started = cpu_seconds(pid), time.perf_counter()
        await asyncio.gather(*(worker(c, started + seconds) for c in conns))
        elapsed = time.perf_counter() - started
        cores = (cpu_seconds(pid) - cpu) / elapsed
    finally:
        for conn in conns:
            await conn.close()
    return Rate(count / elapsed, errors, cores)


# -- 2c. blocked calls from a pipelined raw-socket load generator ---------------------------
#
# The Python asyncio client above spends about as much CPU per request as the sidecar
# does on a denial, on the same two cores: it measures its own ceiling as much as the
# sidecar's. The generator below is a process of its own with plain non-blocking sockets,
# ``--depth`` requests in flight per connection (HTTP/1.1 pipelining: requests written
# back to back, answers read in order), new requests written in one send per batch of
# answers. Its ceiling is measured in the same run against a trivial server (a process
# answering every request with a fixed 200, no parsing beyond framing), and printed.


def serve_trivial(port: int) -> None:
    """A fixed 200 for every request (framing only): the load generator's ceiling."""

    answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"

    class Trivial(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            buffer = self.buffer + data
            answers = 0
            while True:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = buffer[:end].lower()
                at = head.find(b"content-length:")
                length = 0 if at < 0 else int(head[at + 15 :].split(b"\r\n", 1)[0])
                if len(buffer) < end + 4 + length:
                    break
                buffer = buffer[end + 4 + length :]
                answers += 1
            self.buffer = buffer
            if answers:
                self.transport.write(answer * answers)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Trivial, HOST, port, backlog=512)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(run())


class TrivialServer:
    """``bench/sidecar.py --serve-trivial PORT`` as a child process."""

    def __init__(self, logs: Path) -> None:
        self.port = free_port()
        self.log_path = logs / "trivial.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, __file__, "--serve-trivial", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    async def ready(self, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.check()
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(HOST, self.port)
                writer.close()
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the trivial server never listened")
            await asyncio.sleep(0.05)

    def check(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"the trivial server exited ({self.process.returncode})")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _blocking_exchange(sock: Any, request: bytes) -> tuple[int, dict[bytes, bytes]]:
    """One request and its answer (Content-Length framing) on a blocking socket."""
    sock.sendall(request)
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed during the MCP handshake")
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get(b"content-length", b"0"))
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(lines[0][9:12]), headers


def generate_load(
    port: int, path: str, tool: str, connections: int, depth: int, seconds: float
) -> dict[str, float]:
    """Pipelined ``tools/call tool`` on ``connections`` MCP sessions (``initialize`` first,
    as McpConnection does), ``depth`` in flight on each, for ``seconds`` after a warm-up of
    a quarter of that (at most 1 s). Counts answers, and those that are not 200 with a
    blocked error (unless ``tool`` is empty: any 200 then, against the trivial server)."""
    import resource
    import selectors
    import socket

    def post(body: bytes, session: str) -> bytes:
        return (
            f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            "Accept: application/json, text/event-stream\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{session}\r\n"
        ).encode() + body

    socks: list[socket.socket] = []
    sessions: list[str] = []
    for _ in range(connections):
        sock = socket.create_connection((HOST, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = ""
        if tool:
            hello = {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {
                    "protocolVersion": PROTOCOL_VERSION,
                    "capabilities": {},
                    "clientInfo": {"name": "bench-sidecar-load", "version": "1"},
                },
            }
            status, headers = _blocking_exchange(sock, post(msgspec.json.encode(hello), ""))
            if status != 200 or b"mcp-session-id" not in headers:
                raise RuntimeError(f"initialize answered {status}")
            session = (
                f"MCP-Protocol-Version: {PROTOCOL_VERSION}\r\n"
                f"Mcp-Session-Id: {headers[b'mcp-session-id'].decode()}\r\n"
            )
            note = msgspec.json.encode({"jsonrpc": "2.0", "method": "notifications/initialized"})
            _blocking_exchange(sock, post(note, session))
        sock.setblocking(False)
        socks.append(sock)
        sessions.append(session)

    head_of = [
        (
            f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            "Accept: application/json, text/event-stream\r\nContent-Type: application/json\r\n"
            f"{session}Content-Length: "
        ).encode()
        for session in sessions
    ]
    prefix = b'{"jsonrpc":"2.0","id":'
    suffix = b',"method":"tools/call","params":{"name":' + msgspec.json.encode(tool)
    suffix += b',"arguments":{}}}'
    serial = [0]

    def requests(index: int, count: int) -> bytes:
        out = []
        for _ in range(count):
            serial[0] += 1
            body = prefix + str(serial[0]).encode() + suffix
            out.append(head_of[index] + str(len(body)).encode() + b"\r\n\r\n" + body)
        return b"".join(out)

    selector = selectors.DefaultSelector()
    buffers = [b""] * connections
    pending_out = [b""] * connections
    answered = [0, 0]  # answers, errors
    for index, sock in enumerate(socks):
        selector.register(sock, selectors.EVENT_READ, index)
        pending_out[index] = requests(index, depth)

    def send(index: int) -> None:
        data = pending_out[index]
        if data:
            sent = socks[index].send(data)
            pending_out[index] = data[sent:]

    def run(until: float) -> None:
        for index in range(connections):
            send(index)
        while time.perf_counter() < until:
            for key, _ in selector.select(0.5):
                index = key.data
                data = socks[index].recv(262144)
                if not data:
                    raise ConnectionError("the server closed a connection")
                buffer = buffers[index] + data
                done = 0
                while True:
                    end = buffer.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    head = buffer[:end]
                    at = head.lower().find(b"content-length:")
                    length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
                    stop = end + 4 + length
                    if len(buffer) < stop:
                        break
                    ok = head.startswith(b"HTTP/1.1 200") and (
                        not tool or BLOCKED in buffer[end:stop]
                    )
                    answered[1] += 0 if ok else 1
                    buffer = buffer[stop:]
                    done += 1
                buffers[index] = buffer
                answered[0] += done
                if done:
                    pending_out[index] += requests(index, done)
                send(index)

    run(time.perf_counter() + min(1.0, seconds / 4))
    print("measuring", flush=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    answered[:] = [0, 0]
    started = time.perf_counter()
    run(started + seconds)
    elapsed = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    count, errors = answered
    for sock in socks:
        sock.close()
    return {
        "count": count,
        "errors": errors,
        "elapsed": elapsed,
        "cpu": usage.ru_utime + usage.ru_stime - cpu,
    }


async def pipelined_load(
    port: int, path: str, tool: str, args: argparse.Namespace, pid: int
) -> Rate:
    """``generate_load`` in a process of its own; the server's CPU (``pid``) meanwhile."""
    argv = [
        sys.executable,
        __file__,
        "--generate-load",
        msgspec.json.encode(
            {
                "port": port,
                "path": path,
                "tool": tool,
                "connections": args.connections,
                "depth": args.depth,
                "seconds": args.seconds,
            }
        ).decode(),
    ]
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    await process.stdout.readline()  # "measuring": sessions opened, warm-up done
    cpu, started = cpu_seconds(pid), time.perf_counter()
    out, _ = await process.communicate()
    cores = (cpu_seconds(pid) - cpu) / (time.perf_counter() - started)
    if process.returncode != 0:
        raise RuntimeError(f"the load generator failed ({process.returncode})")
    found = msgspec.json.decode(out.splitlines()[-1])
    rate = found["count"] / found["elapsed"]
    return Rate(rate, int(found["errors"]), cores, found["cpu"] / max(found["count"], 1) * 1e6)


# -- 3. propagation ------------------------------------------------------------------------


@dataclass
class Propagation:
    denial_ms: list[float] = field(default_factory=list)  # append answered -> first block
    projected_ms: list[float] = field(default_factory=list)  # append answered -> trust shows it
    allowed_meanwhile: list[int] = field(default_factory=list)
    skipped: int = 0


async def propagation_round(
    mesh: Mesh, sidecar: RunningSidecar, key: SigningKey, rounds: int, top: int
) -> Propagation:
    """``rounds`` violations, each measured from a score given back up to ``top``."""
    did = key.did
    found = Propagation()
    port = mesh.api_port
    writer = await HttpConnection.open(port)  # appends, signals
    poller = await HttpConnection.open(port)  # GET trust, back to back
    mcp = await McpConnection.open(sidecar.port, "/mcp/json")
    read_trust = http_request(port, "GET", f"/v1/agents/{did}/trust")

    async def trust() -> dict[str, Any]:
        status, raw = await poller.exchange(read_trust)
        if status != 200:
            raise RuntimeError(f"GET trust answered {status}: {raw[:300]!r}")
        body: dict[str, Any] = msgspec.json.decode(raw)
        return body

    async def admin(path: str, payload: dict[str, Any]) -> dict[str, Any]:
        body = msgspec.json.encode({"agent": did, **payload})
        status, raw = await writer.exchange(http_request(port, "POST", path, body, mesh.admin))
        if status != 201:
            raise RuntimeError(f"{path} answered {status}: {raw[:300]!r}")
        answer: dict[str, Any] = msgspec.json.decode(raw)
        return answer

    try:
        for _ in range(rounds):
            await sidecar.quiet(mesh.stack)
            score = (await trust())["score"]
            if score <= top - 10:  # the last round's violation and the sidecar's report of it
                for _ in range(min(math.ceil((top - score) / SIGNAL_POINTS), 20)):
                    await admin("/v1/signals", {"signal": "bench-restore"})
                await sidecar.quiet(mesh.stack)
                score = (await trust())["score"]
            # The probe's rule wants min_score in (score - 10, score - 2]: allowed now
            # (with room for decay), blocked once a low violation (-10) is projected.
            threshold = next((t for t in PROBE_SCORES if score - 10 < t <= score - 2), None)
            if threshold is None:
                found.skipped += 1
                continue
            tool = f"probe_{threshold}"
            if BLOCKED in (await mcp.exchange(mcp.call(tool, {})))[1]:
                found.skipped += 1  # the sidecar is behind the API: not a fair start
                continue
            appended = await admin(
                "/v1/violations", {"severity": "low", "rule": "bench", "detail": "propagation"}
            )
            answered = time.perf_counter()
            position = appended["position"]

            async def first_denial(tool: str = tool, answered: float = answered) -> float:
                allowed = 0
                while True:
                    _, body = await mcp.exchange(mcp.call(tool, {}))
                    if BLOCKED in body:
                        found.allowed_meanwhile.append(allowed)
                        return (time.perf_counter() - answered) * 1000
                    allowed += 1
                    if time.perf_counter() - answered > 30:
                        raise RuntimeError("the sidecar never blocked after the violation")

            async def projected(position: int = position, answered: float = answered) -> float:
                while (await trust())["position"] < position:
                    if time.perf_counter() - answered > 30:
                        raise RuntimeError("the trust read never showed the violation")
                return (time.perf_counter() - answered) * 1000

            denial, lag = await asyncio.gather(first_denial(), projected())
            found.denial_ms.append(denial)
            found.projected_ms.append(lag)
    finally:
        await mcp.close()
        await poller.close()
        await writer.close()
    return found


# -- the report ----------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


@dataclass
class Results:
    latency: dict[str, dict[str, list[Latency]]] = field(default_factory=dict)
    decisions: list[Decisions] = field(default_factory=list)
    health: list[Rate] = field(default_factory=list)
    blocked: list[Rate] = field(default_factory=list)
    distinct: list[Rate] = field(default_factory=list)
    ceiling: list[Rate] = field(default_factory=list)  # the generator vs a trivial server
    pipelined: list[Rate] = field(default_factory=list)  # the generator, same call retried
    propagation: list[Propagation] = field(default_factory=list)


def report(args: argparse.Namespace, results: Results) -> None:
    print()
    print(f"medians of {args.repeat} round(s)")
    print(
        f"{'measure':52} {'p50 ms':>8} {'p99 ms':>8} {'per s':>10} {'x base':>7} "
        f"{'sidecar':>8} {'upstrm':>7}"
    )
    print(f"{'':52} {'':>8} {'':>8} {'':>10} {'':>7} {'CPU µs':>8} {'CPU µs':>7}")
    verdicts: list[str] = []
    for variant, paths in results.latency.items():
        direct, via = paths["direct"], paths["sidecar"]
        base_p50 = med([x.p50_ms for x in direct])
        for figures, label in (
            (direct, f"tools/call direct, {variant} upstream (baseline)"),
            (via, f"tools/call via sidecar, {variant} upstream"),
        ):
            p50 = med([x.p50_ms for x in figures])
            errors = sum(x.errors for x in figures)
            note = f"  ({errors} errors)" if errors else ""
            print(
                f"{label:52} {p50:8.3f} {med([x.p99_ms for x in figures]):8.3f} "
                f"{med([x.rate for x in figures]):10,.0f} {p50 / base_p50:7.2f} "
                f"{med([x.sidecar_us for x in figures]):8.0f} "
                f"{med([x.upstream_us for x in figures]):7.0f}{note}"
            )
        added50 = med([v.p50_ms - d.p50_ms for d, v in zip(direct, via, strict=True)])
        added99 = med([v.p99_ms - d.p99_ms for d, v in zip(direct, via, strict=True)])
        print(f"{'  added by the sidecar':52} {added50:8.3f} {added99:8.3f}")
        floor = paths.get("nginx")
        if floor:
            p50 = med([x.p50_ms for x in floor])
            print(
                f"{f'tools/call via nginx, {variant} upstream (floor)':52} {p50:8.3f} "
                f"{med([x.p99_ms for x in floor]):8.3f} {med([x.rate for x in floor]):10,.0f} "
                f"{p50 / base_p50:7.2f}"
            )
            floor50 = med([n.p50_ms - d.p50_ms for d, n in zip(direct, floor, strict=True)])
            floor99 = med([n.p99_ms - d.p99_ms for d, n in zip(direct, floor, strict=True)])
            print(
                f"{'  added by nginx':52} {floor50:8.3f} {floor99:8.3f}"
                f"  (sidecar adds {added50 / floor50 if floor50 > 0 else float('nan'):.2f}x"
                " nginx's p50)"
            )
        else:
            print(f"{'  (nginx floor: not installed, not measured)':52}")
        verdicts.append(
            f"added latency, {variant} upstream: p50 <= {ADDED_P50_TARGET_MS} ms "
            f"{met(added50 <= ADDED_P50_TARGET_MS)} ({added50:.3f}), p99 <= "
            f"{ADDED_P99_TARGET_MS} ms {met(added99 <= ADDED_P99_TARGET_MS)} ({added99:.3f})"
        )
    if results.decisions:
        pure = med([x.pure for x in results.decisions])
        full = med([x.sidecar for x in results.decisions])
        misses = sum(x.misses for x in results.decisions)
        print(f"{'decide() alone, in process (baseline)':52} {'':8} {'':8} {pure:10,.0f} {1:7.2f}")
        label = "Sidecar.decide(tool search), warm cache, in process"
        print(
            f"{label:52} {'':8} {'':8} {full:10,.0f} {full / pure:7.2f}"
            f"  ({1e6 / full:.1f} µs per decision vs {1e6 / pure:.1f}; {misses} cache misses)"
        )
    if results.blocked:
        health = med([x.rate for x in results.health])
        conns = f"{args.connections} conns"
        for label, rates in (
            (f"GET /health via sidecar, {conns} (baseline)", results.health),
            (f"blocked tools/call, same call retried, {conns}", results.blocked),
            (f"blocked tools/call, a new tool each, {conns}", results.distinct),
        ):
            rate = med([x.rate for x in rates])
            errors = sum(x.errors for x in rates)
            note = f"  ({errors} errors)" if errors else ""
            cores = med([x.cores for x in rates])
            print(
                f"{label:52} {'':8} {'':8} {rate:10,.0f} {rate / health:7.2f} "
                f"{cores / rate * 1e6:8.0f}  (sidecar busy {cores:.2f} cores){note}"
            )
        for label, rates in (("retried", results.blocked), ("distinct", results.distinct)):
            rate = med([x.rate for x in rates])
            per_core = rate / max(med([x.cores for x in rates]), 1e-9)
            verdicts.append(
                f"blocked calls ({label}, asyncio client) >= {BLOCKED_TARGET:,.0f}/s on one "
                f"core: {met(min(rate, per_core) >= BLOCKED_TARGET)} ({rate:,.0f}/s, "
                f"{per_core:,.0f} per sidecar core)"
            )
    if results.pipelined:
        pipes = f"{args.connections} conns x {args.depth} pipelined"
        for label, rates, who in (
            (f"trivial server, {pipes} (generator ceiling)", results.ceiling, "server"),
            (f"blocked tools/call, same call retried, {pipes}", results.pipelined, "sidecar"),
        ):
            rate = med([x.rate for x in rates])
            errors = sum(x.errors for x in rates)
            note = f"  ({errors} errors)" if errors else ""
            cores = med([x.cores for x in rates])
            print(
                f"{label:52} {'':8} {'':8} {rate:10,.0f} {'':7} {cores / rate * 1e6:8.0f}"
                f"  ({who} busy {cores:.2f} cores; generator "
                f"{med([x.client_us for x in rates]):.1f} µs/request){note}"
            )
        rate = med([x.rate for x in results.pipelined])
        ceiling = med([x.rate for x in results.ceiling])
        per_core = rate / max(med([x.cores for x in results.pipelined]), 1e-9)
        verdicts.append(
            f"blocked calls (retried, pipelined generator) >= {BLOCKED_TARGET:,.0f}/s on one "
            f"core: {met(min(rate, per_core) >= BLOCKED_TARGET)} ({rate:,.0f}/s, "
            f"{per_core:,.0f} per sidecar core; the generator's ceiling {ceiling:,.0f}/s)"
        )
    if results.propagation:
        rounds = results.propagation

        def p(q: float, pick: Callable[[Propagation], list[float]]) -> float:
            return med([percentile(sorted(pick(r)), q) for r in rounds if pick(r)])

        lag50, lag99 = p(0.5, lambda r: r.projected_ms), p(0.99, lambda r: r.projected_ms)
        deny50, deny99 = p(0.5, lambda r: r.denial_ms), p(0.99, lambda r: r.denial_ms)
        count = sum(len(r.denial_ms) for r in rounds)
        slowest = max((x for r in rounds for x in r.denial_ms), default=float("nan"))
        skipped = sum(r.skipped for r in rounds)
        meanwhile = med([float(x) for r in rounds for x in r.allowed_meanwhile])
        label = "projector lag: GET trust shows it (baseline)"
        print(f"{label:52} {lag50:8.1f} {lag99:8.1f} {'':10} {1:7.2f}")
        label = "violation appended -> first blocked call"
        print(
            f"{label:52} {deny50:8.1f} {deny99:8.1f} {'':10} {deny50 / lag50:7.2f}"
            f"  ({count} violations, {skipped} skipped; calls allowed meanwhile: "
            f"median {meanwhile:.0f})"
        )
        verdicts.append(
            f"violation -> first denial < {PROPAGATION_TARGET_MS:.0f} ms: p50 "
            f"{met(deny50 < PROPAGATION_TARGET_MS)} ({deny50:.1f}), p99 "
            f"{met(deny99 < PROPAGATION_TARGET_MS)} ({deny99:.1f}); slowest of all "
            f"{count}: {slowest:.1f} ms"
        )
    print()
    for line in verdicts:
        print(f"target {line}")


# -- main ----------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="agentmesh-bench-sidecar-"))
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    children: list[Service | Upstream | RunningSidecar | Nginx | TrivialServer] = []
    results = Results()
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
        )
        print(
            f"cores: {os.cpu_count()}, rounds: {args.repeat}, {args.calls:,} calls per path "
            f"and latency round (+{args.warmup} warm-up), {args.rounds} violations per "
            f"propagation round, {args.seconds:g} s per rate measure at {args.connections} "
            f"connections"
        )
        projector = Service("projector", ["serve", "projector"], stack.env(), workdir)
        children.append(projector)
        api, api_port = await start_api(stack, 1)
        children.append(api)
        json_upstream = Upstream("json", True, workdir)
        children.append(json_upstream)
        sse_upstream = None
        if args.sse:
            sse_upstream = Upstream("sse", False, workdir)
            children.append(sse_upstream)
        for upstream in (json_upstream, sse_upstream):
            if upstream is not None:
                await upstream.ready()
        mesh = Mesh(stack, api_port, json_upstream, sse_upstream)
        print(f"api pid {api.pid} :{api_port}, projector pid {projector.pid}, upstreams ", end="")
        print(
            ", ".join(f"{u.name} pid {u.pid} :{u.port}" for u in (json_upstream, sse_upstream) if u)
        )

        # 1. latency, and 2a. decisions in process (the same agent: it only calls `search`)
        key = await mesh.register()
        sidecar = RunningSidecar(mesh, "latency", key, POLICY)
        children.append(sidecar)
        await sidecar.ready()
        print(f"\nlatency: sidecar pid {sidecar.pid} :{sidecar.port}")
        nginx = Nginx.start(workdir, [u for u in (json_upstream, sse_upstream) if u])
        if nginx is None:
            print(f"nginx: absent ({NGINX} not installed; the bench installs nothing):")
            print("  the plain reverse-proxy floor is not measured in this run")
        else:
            children.append(nginx)
            await nginx.ready(f"/{json_upstream.name}/mcp")
            print(f"nginx floor: {NGINX} pid {nginx.pid} :{nginx.port}")
        variants = [("JSON", json_upstream)] + ([("SSE", sse_upstream)] if sse_upstream else [])
        for number in range(1, args.repeat + 1):
            for variant, upstream in variants:
                assert upstream is not None
                paths = {
                    "direct": (upstream.port, "/mcp"),
                    "sidecar": (sidecar.port, f"/mcp/{upstream.name}"),
                }
                if nginx is not None:
                    paths["nginx"] = (nginx.port, f"/{upstream.name}/mcp")
                found = await latency_round(args, paths, sidecar.pid, upstream.pid, number % 2 == 0)
                for name, figures in found.items():
                    results.latency.setdefault(variant, {}).setdefault(name, []).append(figures)
                    print(
                        f"  round {number} {variant:4} {name:7} p50 {figures.p50_ms:6.3f} ms  "
                        f"p99 {figures.p99_ms:6.3f} ms  {figures.rate:6,.0f} calls/s  "
                        f"CPU/call: sidecar {figures.sidecar_us:4.0f} µs, upstream "
                        f"{figures.upstream_us:4.0f} µs  errors {figures.errors}"
                    )
        env = mesh.sidecar_env("in-process", key, POLICY, free_port())
        async with in_process_sidecar(Settings.from_env(env)) as local:
            print("\ndecisions in process (this process, same agent and policy)")
            for number in range(1, args.repeat + 1):
                decisions = await decision_round(local, args.decide_seconds, number % 2 == 0)
                results.decisions.append(decisions)
                print(
                    f"  round {number} decide() {decisions.pure:10,.0f}/s  Sidecar.decide "
                    f"{decisions.sidecar:10,.0f}/s  cache misses {decisions.misses}"
                )
        sidecar.stop()
        children.remove(sidecar)

        # 3. propagation
        key = await mesh.register()
        sidecar = RunningSidecar(mesh, "propagation", key, probe_policy())
        children.append(sidecar)
        await sidecar.ready()
        top = (await mesh.trust(key.did))[1]["score"]
        print(f"\npropagation: sidecar pid {sidecar.pid} :{sidecar.port}, score {top}")
        for number in range(1, args.repeat + 1):
            propagation = await propagation_round(mesh, sidecar, key, args.rounds, top)
            results.propagation.append(propagation)
            deny, lag = sorted(propagation.denial_ms), sorted(propagation.projected_ms)
            print(
                f"  round {number} first denial p50 {percentile(deny, 0.5):6.1f} ms  p99 "
                f"{percentile(deny, 0.99):6.1f} ms | trust read p50 {percentile(lag, 0.5):6.1f}"
                f" ms  p99 {percentile(lag, 0.99):6.1f} ms  ({len(deny)} violations, "
                f"{propagation.skipped} skipped)"
            )
        sidecar.stop()
        children.remove(sidecar)

        # 2b. blocked calls through HTTP (last: every one becomes a report in the ledger)
        key = await mesh.register()
        sidecar = RunningSidecar(mesh, "blocked", key, POLICY)
        children.append(sidecar)
        await sidecar.ready()
        print(f"\nblocked calls: sidecar pid {sidecar.pid} :{sidecar.port}")

        def blocked_call(conn: McpConnection) -> bytes:
            return conn.call("secret_tool", {})  # no rule: strict denies it

        serial = iter(range(1 << 62))

        def distinct_call(conn: McpConnection) -> bytes:
            return conn.call(f"secret_{next(serial)}", {})  # a new kind: signed each time

        def is_blocked(status: int, body: bytes) -> bool:
            return status == 200 and BLOCKED in body

        health_request = http_request(sidecar.port, "GET", "/health")
        measures: dict[str, tuple[Callable[[McpConnection], bytes], Any, list[Rate]]] = {
            "health": (lambda _: health_request, lambda status, _: status == 200, results.health),
            "blocked": (blocked_call, is_blocked, results.blocked),
            "distinct": (distinct_call, is_blocked, results.distinct),
        }
        for number in range(1, args.repeat + 1):
            await sidecar.quiet(stack)
            names = list(measures)
            order = names[number % 3 :] + names[: number % 3]
            for name in order:
                make, ok, rates = measures[name]
                rate = await fixed_load(
                    sidecar.port, args.connections, args.seconds, make, ok, sidecar.pid
                )
                rates.append(rate)
                print(
                    f"  round {number} {name:8} {rate.rate:8,.0f}/s  sidecar busy "
                    f"{rate.cores:.2f} cores  errors {rate.errors}"
                )
        trivial = TrivialServer(workdir)
        children.append(trivial)
        await trivial.ready()
        print(
            f"  pipelined raw-socket load generator: {args.connections} conns x {args.depth} "
            f"in flight; its ceiling against a trivial server (pid {trivial.pid})"
        )
        for number in range(1, args.repeat + 1):
            await sidecar.quiet(stack)
            runs = [
                ("ceiling", trivial.port, "/", "", trivial.pid, results.ceiling),
                (
                    "pipelined",
                    sidecar.port,
                    "/mcp/json",
                    "secret_tool",
                    sidecar.pid,
                    results.pipelined,
                ),
            ]
            for name, port, path, tool, pid, rates in runs[:: 1 if number % 2 else -1]:
                rate = await pipelined_load(port, path, tool, args, pid)
                rates.append(rate)
                print(
                    f"  round {number} {name:9} {rate.rate:8,.0f}/s  server busy "
                    f"{rate.cores:.2f} cores  generator {rate.client_us:5.1f} µs/request  "
                    f"errors {rate.errors}"
                )
        trivial.stop()
        children.remove(trivial)
        depth = await sidecar.outbox_depth()
        print(f"  (outbox depth after the last measure: {depth})")
        sidecar.stop()
        children.remove(sidecar)
        for child in children:
            child.check()
        report(args, results)
    finally:
        for child in reversed(children):
            child.stop()
        if redis is not None:
            redis.stop()
        if postgres is not None:
            postgres.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    end_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=positive, default=3)
    parser.add_argument("--calls", type=positive, default=2000, help="per path and round")
    parser.add_argument("--warmup", type=positive, default=300, help="calls before each round")
    parser.add_argument("--rounds", type=positive, default=30, help="violations per round")
    parser.add_argument("--seconds", type=float, default=5.0, help="per rate measure")
    parser.add_argument("--connections", type=positive, default=8, help="for the rate measures")
    parser.add_argument("--decide-seconds", type=float, default=1.0, help="per decide measure")
    parser.add_argument("--no-sse", dest="sse", action="store_false", help="JSON upstream only")
    parser.add_argument(
        "--depth", type=positive, default=16, help="pipelined requests in flight per connection"
    )
    parser.add_argument("--serve-trivial", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--generate-load", help=argparse.SUPPRESS)
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json-response", action="store_true", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.serve_upstream is not None:
        serve_upstream(parsed.serve_upstream, parsed.json_response)
    elif parsed.serve_trivial is not None:
        serve_trivial(parsed.serve_trivial)
    elif parsed.generate_load is not None:
        print(
            msgspec.json.encode(generate_load(**msgspec.json.decode(parsed.generate_load))).decode()
        )
    else:
        asyncio.run(main(parsed))
