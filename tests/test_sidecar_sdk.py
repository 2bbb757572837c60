"""The official SDK client through the sidecar: non-ASCII tool and resource names in
2026-07-28 (default) and legacy modes, and notifications/tools/list_changed when
trust changes the tools an agent may call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import ToolsListChanged
from mcp_types import ToolListChangedNotification

from sidecar.mcp import BLOCKED_CODE
from tests.api_support import ADMIN, Api
from tests.sidecar_support import RunningSidecar, Upstream, running_sidecar, running_upstream

NON_ASCII_POLICY = """\
version: 1
rules:
  - id: words
    tools: ["café", "検索"]
    effect: allow
"""


def non_ascii_server(upstream: Upstream) -> MCPServer:
    server: MCPServer = MCPServer("non-ascii")

    def cafe(order: str) -> str:
        upstream.calls["café"] = upstream.calls.get("café", 0) + 1
        return f"un {order}"

    def kensaku(query: str) -> str:
        upstream.calls["検索"] = upstream.calls.get("検索", 0) + 1
        return f"見つかった: {query}"

    def hidden() -> str:
        upstream.calls["hidden"] = upstream.calls.get("hidden", 0) + 1
        return "should not run"

    server.add_tool(cafe, name="café")
    server.add_tool(kensaku, name="検索")
    server.add_tool(hidden, name="hidden")

    @server.resource("notes://café")
    def note() -> str:
        return "crème brûlée"

    return server


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_non_ascii_tool_and_resource_names_through_the_sdk_client(
    api: Api, tmp_path: Path, mode: str
) -> None:
    agent = await api.register()
    async with (
        running_upstream(non_ascii_server) as upstream,
        running_sidecar(
            api, agent, tmp_path, f"words={upstream.url}", policy_text=NON_ASCII_POLICY
        ) as sidecar,
        Client(f"{sidecar.url}/mcp/words", mode=mode) as client,
    ):
        listed = sorted(t.name for t in (await client.list_tools()).tools)
        assert listed == ["café", "検索"]
        cafe = await client.call_tool("café", {"order": "crème"})
        found = await client.call_tool("検索", {"query": "東京"})
        note = await client.read_resource("notes://café")
    assert cafe.content[0].text == "un crème"  # type: ignore[union-attr]
    assert found.content[0].text == "見つかった: 東京"  # type: ignore[union-attr]
    assert note.contents[0].text == "crème brûlée"  # type: ignore[union-attr]
    assert upstream.calls == {"café": 1, "検索": 1}


async def _critical(api: Api, did: str) -> None:
    response = await api.client.post(
        "/v1/violations",
        headers=ADMIN,
        json={"agent": did, "severity": "critical", "rule": "test", "detail": "incident"},
    )
    assert response.status_code == 201, response.text
    await api.projected(did, response.json()["position"])


@pytest.fixture
async def sidecar(api: Api, tmp_path: Path) -> AsyncIterator[tuple[RunningSidecar, Upstream]]:
    agent = await api.register(("tools:read",))
    async with (
        running_upstream() as upstream,
        running_sidecar(api, agent, tmp_path, f"tools={upstream.url}") as running,
    ):
        yield running, upstream


async def test_list_changed_reaches_a_legacy_session_when_trust_hides_a_tool(
    api: Api, sidecar: tuple[RunningSidecar, Upstream]
) -> None:
    running, _ = sidecar
    changed = asyncio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, ToolListChangedNotification):
            changed.set()

    url = f"{running.url}/mcp/tools"
    async with Client(url, mode="legacy", message_handler=on_message) as client:
        before = sorted(t.name for t in (await client.list_tools()).tools)
        assert "delete_repo" in before  # trusted: destructive tools shown
        await _critical(api, running.agent.did)  # -> probationary: delete_repo hidden
        await asyncio.wait_for(changed.wait(), 10)
        after = sorted(t.name for t in (await client.list_tools()).tools)
    assert after == ["count", "search"]


async def test_list_changed_reaches_a_2026_listen_stream(
    api: Api, sidecar: tuple[RunningSidecar, Upstream]
) -> None:
    running, _ = sidecar
    async with Client(f"{running.url}/mcp/tools") as client:  # 2026-07-28 by default
        assert "delete_repo" in {t.name for t in (await client.list_tools()).tools}
        async with client.listen(tools_list_changed=True) as subscription:
            await _critical(api, running.agent.did)
            event = await asyncio.wait_for(anext(aiter(subscription)), 10)
        assert isinstance(event, ToolsListChanged)
        after = sorted(t.name for t in (await client.list_tools()).tools)
    assert after == ["count", "search"]


async def test_calling_a_hidden_tool_is_recorded_as_such(
    api: Api, sidecar: tuple[RunningSidecar, Upstream]
) -> None:
    running, upstream = sidecar
    async with Client(f"{running.url}/mcp/tools", mode="legacy") as client:
        assert "secret_tool" not in {t.name for t in (await client.list_tools()).tools}
        with pytest.raises(MCPError) as info:
            await client.call_tool("secret_tool", {})
    assert info.value.error.code == BLOCKED_CODE
    assert "secret_tool" not in upstream.calls
    for _ in range(400):
        events = (await api.client.get(f"/v1/agents/{running.agent.did}/events")).json()
        details = [e["body"]["detail"] for e in events["items"] if e["type"] == "policy.violation"]
        if details:
            break
        await asyncio.sleep(0.05)
    assert details == [
        "tool secret_tool: tool secret_tool matches no rule (strict mode denies)"
        " (a tool hidden from this agent's tools/list)"
    ]
