"""A real mesh for sidecar tests: API + projector, a real MCP server, sidecars."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer

from agentmesh.embedded import free_port
from agentmesh.settings import Settings
from agentmesh.sidecar_main import run_sidecar
from tests.api_support import Api
from tests.support import Agent

POLICY = """\
version: 1
staleness_seconds: {staleness}
rules:
  - id: everyday-tools
    tools: ["search", "read_*", "count"]
    effect: allow
  - id: destructive-tools-need-trust
    tools: ["delete_*"]
    effect: allow
    min_tier: trusted
  - id: writes-need-capability
    tools: ["write_*"]
    effect: allow
    require_capability: "tools:write"
  - id: local-egress
    hosts: ["127.0.0.1"]
    effect: allow
  - id: no-paste
    hosts: ["paste.invalid"]
    effect: deny
"""


@dataclass
class Upstream:
    """A real MCP server (the SDK's MCPServer over Streamable HTTP) counting calls."""

    port: int
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"


def mcp_server(upstream: Upstream) -> MCPServer:
    server: MCPServer = MCPServer("test-upstream")

    def seen(name: str) -> None:
        upstream.calls[name] = upstream.calls.get(name, 0) + 1

    @server.tool()
    def search(query: str) -> str:
        seen("search")
        return f"results for {query}"

    @server.tool()
    def delete_repo(name: str) -> str:
        seen("delete_repo")
        return f"deleted {name}"

    @server.tool()
    def write_file(path: str) -> str:
        seen("write_file")
        return f"wrote {path}"

    @server.tool()
    def secret_tool() -> str:
        seen("secret_tool")
        return "no rule allows me"

    @server.tool()
    async def count(to: int, ctx: Context[Any, Any]) -> str:
        seen("count")
        for step in range(1, to + 1):
            await ctx.report_progress(step, to, f"step {step}")
            await asyncio.sleep(0.2)
        return f"counted to {to}"

    return server


@asynccontextmanager
async def running_upstream(
    factory: Callable[[Upstream], MCPServer[Any]] | None = None, *, json_response: bool = False
) -> AsyncIterator[Upstream]:
    """A real MCP server (``mcp_server`` unless ``factory`` says otherwise) on a free port."""
    upstream = Upstream(free_port())
    mcp = (factory or mcp_server)(upstream)
    app = mcp.streamable_http_app(host="127.0.0.1", json_response=json_response)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=upstream.port, log_config=None, log_level="warning"
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield upstream
    finally:
        server.should_exit = True
        await task


@dataclass
class RunningSidecar:
    url: str
    port: int
    metrics_port: int
    agent: Agent
    settings: Settings
    stop: asyncio.Event
    task: asyncio.Task[None]


@asynccontextmanager
async def running_sidecar(
    api: Api,
    agent: Agent,
    tmp: Path,
    upstreams: str,
    *,
    policy: str = "strict",
    shadow: bool = False,
    staleness: int = 30,
    redis_port: int | None = None,
    policy_text: str | None = None,
    denial_window: float | None = None,
) -> AsyncIterator[RunningSidecar]:
    policy_file = tmp / f"policy-{agent.did[-6:]}.yaml"
    policy_file.write_text(policy_text or POLICY.format(staleness=staleness))
    metrics_port = free_port()
    settings = dataclasses.replace(
        api.settings,
        agent_private_key_pem=agent.key.private_key_pem(),
        upstreams=upstreams,
        api_url=api.url,
        policy_file=policy_file,
        policy=policy,  # type: ignore[arg-type]
        governance_shadow_mode=shadow,
        sidecar_host="127.0.0.1",
        sidecar_port=free_port(),
        sidecar_metrics_port=metrics_port,
        sidecar_outbox_dir=tmp / f"outbox-{agent.did[-6:]}",
        sidecar_health_file=tmp / f"healthy-{agent.did[-6:]}",
        redis_port=redis_port or api.settings.redis_port,
        # AGENTMESH_SIDECAR_DENIAL_WINDOW: run_sidecar takes it from the settings
        sidecar_denial_window=denial_window or api.settings.sidecar_denial_window,
    )
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_sidecar(settings, stop, clock=api.clock, ready=ready.set_result))
    try:
        waiters: list[asyncio.Future[Any]] = [ready, task]
        await asyncio.wait(waiters, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # start-up failed: raise its error
        port = ready.result()
        yield RunningSidecar(
            f"http://127.0.0.1:{port}", port, metrics_port, agent, settings, stop, task
        )
    finally:
        stop.set()
        await task
