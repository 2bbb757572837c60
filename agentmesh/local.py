"""`agentmesh up`: the whole stack on one machine, nothing to install by hand.

With no ``AGENTMESH_DATABASE_URL`` / ``AGENTMESH_REDIS_HOST`` it starts an
embedded PostgreSQL and Redis (PyPI wheels) under the data directory
(``AGENTMESH_DATA_DIR``, default ``.agentmesh``), applies the migrations, and
on first start generates the server's ledger key and an admin token (files
with mode 0600; the token is printed once). Then it runs the API (:8080), its
metrics (:9090) and the projector in this process. A second start reuses the
data. Ctrl-C (or SIGTERM) stops everything cleanly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
from pathlib import Path
from typing import Any

from agentmesh.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from agentmesh.logs import configure_logging
from agentmesh.migrate import upgrade
from agentmesh.settings import Settings
from ledger.identity import SigningKey


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def ensure_local_secrets(data_dir: Path) -> tuple[SigningKey, str, bool]:
    """The ledger key and admin token of this data dir, created on first start."""
    data_dir.mkdir(parents=True, exist_ok=True)
    key_file, token_file = data_dir / "ledger-key.pem", data_dir / "admin-token"
    created = False
    if not key_file.exists():
        _write_secret(key_file, SigningKey.generate().private_key_pem())
        created = True
    if not token_file.exists():
        _write_secret(token_file, secrets.token_urlsafe(32))
        created = True
    return SigningKey.from_pem(key_file.read_text()), token_file.read_text().strip(), created


def _redis_port(data_dir: Path) -> int:
    """Keep the embedded Redis on one port across restarts (sidecars remember it)."""
    port_file = data_dir / "redis-port"
    if port_file.exists():
        return int(port_file.read_text())
    port = free_port()
    port_file.write_text(str(port))
    return port


def run_local_stack(settings: Settings) -> int:
    data_dir = settings.data_dir.resolve()
    key, token, created = ensure_local_secrets(data_dir)
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    try:
        if settings.database_url is None:
            postgres = EmbeddedPostgres(data_dir / "postgres").start()
        if settings.redis_host is None and settings.storage_backend == "redis":
            redis = EmbeddedRedis(
                data_dir / "redis", port=_redis_port(data_dir), persist=True
            ).start()
        local = dataclasses.replace(
            settings,
            database_url=settings.database_url or (postgres.url if postgres else None),
            redis_host=settings.redis_host or (redis.host if redis else None),
            redis_port=redis.port if redis else settings.redis_port,
            agent_private_key_pem=settings.agent_private_key_pem or key.private_key_pem(),
            admin_token=settings.admin_token or token,
            api_projector="true",
            log_format="text" if "AGENTMESH_LOG_FORMAT" not in os.environ else settings.log_format,
        )
        assert local.database_url is not None
        upgrade(local.database_url)
        _announce(local, data_dir, key, token if created else None)
        asyncio.run(_serve(local))
    except KeyboardInterrupt:
        pass
    finally:
        if redis is not None:
            redis.stop()
        if postgres is not None:
            postgres.stop()
        print("agentmesh: stopped", flush=True)
    return 0


def _announce(settings: Settings, data_dir: Path, key: SigningKey, token: str | None) -> None:
    print(f"agentmesh: ledger database  {settings.database_url}", flush=True)
    if settings.storage_backend == "redis":
        print(
            f"agentmesh: read store       redis://{settings.redis_host}:{settings.redis_port}",
            flush=True,
        )
    print(
        f"agentmesh: ledger DID       {key.did} (key in {data_dir / 'ledger-key.pem'})", flush=True
    )
    if token is not None:
        print(
            f"agentmesh: admin token (shown once, kept in {data_dir / 'admin-token'}): {token}",
            flush=True,
        )
    print(f"agentmesh: API              http://127.0.0.1:{settings.api_port}", flush=True)
    if settings.metrics_port:
        print(
            f"agentmesh: metrics          http://127.0.0.1:{settings.metrics_port}/metrics",
            flush=True,
        )
    print("agentmesh: press Ctrl-C to stop", flush=True)


DEMO_POLICY = """\
# The demo sidecar's policy (strict: anything not allowed here is denied).
version: 1
staleness_seconds: 30
rules:
  - id: everyday-tools
    tools: ["search", "read_file", "count"]
    effect: allow
  - id: destructive-tools-need-trust
    tools: ["delete_*"]
    effect: allow
    min_tier: trusted
    severity: high
  - id: local-egress
    hosts: ["127.0.0.1", "localhost"]
    effect: allow
"""


def demo_files(data_dir: Path) -> tuple[SigningKey, Path]:
    """The demo agent's key and the demo policy, created on first start."""
    key_file, policy_file = data_dir / "demo-agent.pem", data_dir / "demo-policy.yaml"
    if not key_file.exists():
        _write_secret(key_file, SigningKey.generate().private_key_pem())
    if not policy_file.exists():
        policy_file.write_text(DEMO_POLICY)
    return SigningKey.from_pem(key_file.read_text()), policy_file


def demo_mcp_port(settings: Settings) -> int:
    """9100 with the default ports; always a valid port."""
    port = settings.sidecar_port + 1019
    return port if port <= 65_535 else settings.sidecar_port - 1019


def sidecar_settings(settings: Settings, data_dir: Path) -> Settings:
    key, policy_file = demo_files(data_dir)
    return dataclasses.replace(
        settings,
        agent_private_key_pem=key.private_key_pem(),
        upstreams=f"demo=http://127.0.0.1:{demo_mcp_port(settings)}/mcp",
        api_url=f"http://127.0.0.1:{settings.api_port}",
        policy_file=policy_file,
        policy="strict",
        sidecar_host="127.0.0.1",
        sidecar_outbox_dir=data_dir / "outbox",
        sidecar_health_file=data_dir / "sidecar-healthy",
    )


async def _serve(settings: Settings) -> None:
    import uvicorn

    from agentmesh.services import api_app, metrics_server
    from agentmesh.sidecar_main import run_sidecar
    from sidecar.demo import demo_app

    configure_logging(settings)
    server = metrics_server(settings) if settings.metrics_port else None
    if server is not None:
        server.start()
    stop = asyncio.Event()
    data_dir = settings.data_dir.resolve()
    try:
        app = api_app(settings, on_open=server.attach if server is not None else None)
        api = uvicorn.Server(
            uvicorn.Config(
                app,
                host=settings.api_host,
                port=settings.api_port,
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=10,
            )
        )
        demo = uvicorn.Server(
            uvicorn.Config(
                demo_app(),
                host="127.0.0.1",
                port=demo_mcp_port(settings),
                log_config=None,
                access_log=False,
                log_level="warning",
            )
        )
        servers = [asyncio.create_task(api.serve()), asyncio.create_task(demo.serve())]
        sidecar = asyncio.create_task(_demo_sidecar(settings, data_dir, api, stop, run_sidecar))
        await asyncio.wait([*servers, sidecar], return_when=asyncio.FIRST_COMPLETED)
        api.should_exit = demo.should_exit = True
        stop.set()
        await asyncio.gather(*servers, sidecar, return_exceptions=True)
    finally:
        if server is not None:
            server.stop()


async def _demo_sidecar(
    settings: Settings, data_dir: Path, api: Any, stop: asyncio.Event, run_sidecar: Any
) -> None:
    """Register the demo agent once the API answers, then run its sidecar."""
    import httpx

    while not api.started:  # noqa: ASYNC110 -- uvicorn exposes only a flag
        await asyncio.sleep(0.05)
    local = sidecar_settings(settings, data_dir)
    key = SigningKey.from_pem(local.agent_private_key_pem or "")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.api_port}") as client:
        response = await client.post(
            "/v1/agents",
            headers={"Authorization": f"Bearer {settings.admin_token}"},
            json={
                "public_key": key.public.pem(),
                "capabilities": ["tools:*"],
                "metadata": {"role": "demo agent behind the local sidecar"},
            },
        )
        if response.status_code not in (201, 409):
            print(f"agentmesh: demo agent not registered: {response.text}", flush=True)
            return
    print(
        f"agentmesh: sidecar          http://127.0.0.1:{settings.sidecar_port}/mcp/demo "
        f"(demo agent {key.did}); try: agentmesh demo",
        flush=True,
    )
    await run_sidecar(local, stop)


async def run_demo(settings: Settings) -> int:
    """Against a running `agentmesh up`: tools listed, a call allowed, a violation
    recorded, and the same call blocked by the sidecar."""
    import httpx
    from mcp import Client

    data_dir = settings.data_dir.resolve()
    key, _ = demo_files(data_dir)
    token = (data_dir / "admin-token").read_text().strip()
    api = f"http://127.0.0.1:{settings.api_port}"
    url = f"http://127.0.0.1:{settings.sidecar_port}/mcp/demo"
    async with Client(url, mode="legacy") as mcp, httpx.AsyncClient(base_url=api) as http:
        tools = await mcp.list_tools()
        print(f"1. tools the demo agent sees: {', '.join(t.name for t in tools.tools)}")
        trust = (await http.get(f"/v1/agents/{key.did}/trust")).json()
        print(f"2. its trust: {trust['score']} ({trust['tier']})")
        print(f"3. call delete_repo: {await _call(mcp, 'delete_repo', {'name': 'demo'})}")
        report = await http.post(
            "/v1/violations",
            headers={"Authorization": f"Bearer {token}"},
            json={
                "agent": key.did,
                "severity": "critical",
                "rule": "demo-incident",
                "detail": "recorded by agentmesh demo",
            },
        )
        print(f"4. a critical violation recorded at ledger position {report.json()['position']}")
        for _ in range(100):
            trust = (await http.get(f"/v1/agents/{key.did}/trust")).json()
            if trust["position"] >= report.json()["position"]:
                break
            await asyncio.sleep(0.02)
        print(f"5. its trust now: {trust['score']} ({trust['tier']})")
        print(f"6. call delete_repo again: {await _call(mcp, 'delete_repo', {'name': 'demo'})}")
    return 0


async def _call(mcp: Any, tool: str, arguments: dict[str, Any]) -> str:
    from mcp.shared.exceptions import MCPError

    try:
        result = await mcp.call_tool(tool, arguments)
    except MCPError as exc:
        data = exc.error.data or {}
        return (
            f"BLOCKED (JSON-RPC error {exc.error.code}: {exc.error.message}; "
            f"rule {data.get('rule')}, tier {data.get('tier')}, score {data.get('score')})"
        )
    text = result.content[0].text if result.content else ""
    return f"allowed ({text})"
