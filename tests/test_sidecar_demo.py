"""`agentmesh demo`'s story, run three times against one real mesh (API, projector,
the demo MCP server, a sidecar): allowed, then blocked, every time."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import MCPServer

from agentmesh.embedded import EmbeddedRedis
from agentmesh.local import DEMO_POLICY
from ledger.identity import SigningKey
from sidecar.demo import demo_server, run_demo
from tests.api_support import ADMIN_TOKEN, api_settings, running_api
from tests.sidecar_support import Upstream, running_sidecar, running_upstream


async def test_the_demo_shows_allowed_then_blocked_every_time(
    database_url: str, redis_server: EmbeddedRedis, ledger_key: SigningKey, tmp_path: Path
) -> None:
    async with running_api(api_settings(database_url, redis_server, ledger_key)) as api:
        agent = await api.register()

        def server(_: Upstream) -> MCPServer[Any]:
            return demo_server()

        async with (
            running_upstream(server) as upstream,
            running_sidecar(
                api, agent, tmp_path, f"demo={upstream.url}", policy_text=DEMO_POLICY
            ) as sidecar,
        ):
            for _ in range(3):
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    assert await run_demo(api.url, sidecar.url, ADMIN_TOKEN, agent.did) == 0
                lines = {line.split(".", 1)[0]: line for line in out.getvalue().splitlines()}
                assert "delete_repo" in lines["1"]
                assert "allowed (deleted demo)" in lines["3"], out.getvalue()
                assert "BLOCKED (JSON-RPC error -31403" in lines["6"], out.getvalue()
                assert "reason agent_suspended" in lines["6"]
                assert "(trusted)" in lines["7"] or "(verified_partner)" in lines["7"]
