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
