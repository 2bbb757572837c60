"""A small MCP server (the `mcp` SDK's MCPServer over Streamable HTTP) for demos and tests.

Tools: ``search`` and ``read_file`` (harmless), ``delete_repo`` (the kind a
policy keeps for trusted agents), ``count`` (streams progress notifications
before its result, to show SSE relayed as a stream).
"""

from __future__ import annotations

import asyncio
from typing import Any

from mcp.server.mcpserver import Context, MCPServer


def demo_server() -> MCPServer:
    server: MCPServer = MCPServer("agentmesh-demo", instructions="AgentMesh demo tools")

    @server.tool()
    def search(query: str) -> str:
        """Search the demo corpus."""
        return f"3 results for {query!r}"

    @server.tool()
    def read_file(path: str) -> str:
        """Read a file from the demo repository."""
        return f"contents of {path}"

    @server.tool()
    def delete_repo(name: str) -> str:
        """Delete a repository (dangerous)."""
        return f"deleted {name}"

    @server.tool()
    async def count(to: int, ctx: Context[Any, Any]) -> str:
        """Count to ``to``, reporting progress as it goes (a streamed result)."""
        for step in range(1, to + 1):
            await ctx.report_progress(step, to, f"step {step}")
            await asyncio.sleep(0.05)
        return f"counted to {to}"

    return server


def demo_app(host: str = "127.0.0.1") -> Any:
    """The Starlette app serving the demo at ``/mcp``."""
    return demo_server().streamable_http_app(host=host)


TRUSTED = 700  # the tier delete_repo needs in the demo policy
SIGNAL_POINTS = 5  # one admin trust.signal (AGENTMESH_TRUST_REWARD_SIGNAL's default)


async def run_demo(api_url: str, sidecar_url: str, admin_token: str, did: str) -> int:
    """Against a running `agentmesh up`: the tools the demo agent sees, a call allowed,
    the agent suspended (an admin's signed ledger event), the same call blocked by the
    sidecar, and the agent reinstated. Every run starts from the same standing: a
    suspension left by an interrupted run is lifted, and points an earlier run cost
    (the sidecar reports its own denial) are given back with admin trust signals, so
    the demo shows allowed-then-blocked every time in the same data directory."""
    import httpx
    from mcp import Client

    admin = {"Authorization": f"Bearer {admin_token}"}
    async with (
        Client(f"{sidecar_url}/mcp/demo", mode="legacy") as mcp,
        httpx.AsyncClient(base_url=api_url, headers=admin, timeout=30) as http,
    ):

        async def trust(position: int = 0) -> dict[str, Any]:
            for _ in range(500):  # until the projection shows ``position``
                body: dict[str, Any] = (await http.get(f"/v1/agents/{did}/trust")).json()
                if body.get("position", -1) >= position:
                    return body
                await asyncio.sleep(0.02)
            raise RuntimeError(f"the projection never reached position {position}")

        async def admin_post(path: str, payload: dict[str, Any]) -> int:
            response = await http.post(path, json=payload)
            response.raise_for_status()
            return int(response.json()["position"])

        standing = await trust()
        position = 0
        if standing.get("tier") == "suspended":
            position = await admin_post(f"/v1/agents/{did}/reinstate", {})
        missing = max(0, TRUSTED + 10 - int(standing["score"]))
        for _ in range(min(-(-missing // SIGNAL_POINTS), 200)):
            position = await admin_post("/v1/signals", {"agent": did, "signal": "demo-restore"})
        if position:
            standing = await trust(position)
            print(f"0. restored the demo agent for this run: {standing['score']}")
        tools = await mcp.list_tools()
        print(f"1. tools the demo agent sees: {', '.join(t.name for t in tools.tools)}")
        print(f"2. its trust: {standing['score']} ({standing['tier']})")
        print(f"3. call delete_repo: {await _call(mcp, 'delete_repo', {'name': 'demo'})}")
        position = await admin_post(f"/v1/agents/{did}/suspend", {})
        print(f"4. the agent suspended by an admin (ledger position {position})")
        standing = await trust(position)
        print(f"5. its standing now: {standing['tier']}")
        print(f"6. call delete_repo again: {await _call(mcp, 'delete_repo', {'name': 'demo'})}")
        position = await admin_post(f"/v1/agents/{did}/reinstate", {})
        standing = await trust(position)
        print(f"7. reinstated: {standing['score']} ({standing['tier']}); run it again any time")
    return 0


async def _call(mcp: Any, tool: str, arguments: dict[str, Any]) -> str:
    from mcp.shared.exceptions import MCPError

    try:
        result = await mcp.call_tool(tool, arguments)
    except MCPError as exc:
        data = exc.error.data or {}
        return (
            f"BLOCKED (JSON-RPC error {exc.error.code}: {exc.error.message}; "
            f"reason {data.get('reason')}, rule {data.get('rule')}, tier {data.get('tier')})"
        )
    text = result.content[0].text if result.content else ""
    return f"allowed ({text})"
