"""The sidecar with real parts: the `mcp` SDK's client and server over Streamable HTTP,
the API with its projector, PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from agentmesh.embedded import EmbeddedRedis, free_port
from ledger.identity import SigningKey
from sidecar.mcp import BLOCKED_CODE
from tests.api_support import ADMIN, Api, api_settings, running_api
from tests.sidecar_support import RunningSidecar, Upstream, running_sidecar, running_upstream


async def violation(api: Api, did: str, severity: str) -> int:
    response = await api.client.post(
        "/v1/violations",
        headers=ADMIN,
        json={"agent": did, "severity": severity, "rule": "test", "detail": severity},
    )
    assert response.status_code == 201, response.text
    position: int = response.json()["position"]
    return position


async def reported(api: Api, did: str, marker: str) -> dict[str, Any]:
    """Wait until the sidecar's report mentioning ``marker`` is in the ledger and projected."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        events = (await api.client.get(f"/v1/agents/{did}/events")).json()["items"]
        found = [
            e
            for e in events
            if e["type"] == "policy.violation" and marker in e["body"].get("detail", "")
        ]
        if found:
            await api.projected(did, found[-1]["position"])
            event: dict[str, Any] = found[-1]
            return event
        assert loop.time() < deadline, f"no report about {marker}"
        await asyncio.sleep(0.05)


async def blocked(client: Client, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(MCPError) as info:
        await client.call_tool(tool, arguments)
    assert info.value.error.code == BLOCKED_CODE
    data: dict[str, Any] = info.value.error.data
    return data


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_mcp_through_the_sidecar_then_blocked_after_a_violation(
    api: Api, upstream: Upstream, sidecar: RunningSidecar, mode: str
) -> None:
    async with Client(f"{sidecar.url}/mcp/tools", mode=mode) as client:
        tools = sorted(t.name for t in (await client.list_tools()).tools)
        # strict: only tools a rule allows, and delete_repo only while trusted
        assert tools == ["count", "delete_repo", "search"]
        result = await client.call_tool("search", {"query": "mesh"})
        assert result.content[0].text == "results for mesh"  # type: ignore[union-attr]
        assert (await client.call_tool("delete_repo", {"name": "a"})).content
        assert upstream.calls["delete_repo"] == 1
        data = await blocked(client, "write_file", {"path": "x"})
        assert data["reason"] == "missing_capability"
        assert "write_file" not in upstream.calls  # nothing of a blocked call reached upstream
        # The denial itself was reported (a low violation, -10) by the sidecar's outbox.
        await reported(api, sidecar.agent.did, "write_file")
        # A violation recorded anywhere: the same call is blocked without waiting for a TTL.
        await violation(api, sidecar.agent.did, "critical")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0  # far below the 5 s refresh: only invalidation explains it
        allowed_meanwhile = 0
        error: MCPError | None = None
        while error is None:
            try:
                await client.call_tool("delete_repo", {"name": "b"})
                allowed_meanwhile += 1
            except MCPError as exc:
                error = exc
            assert loop.time() < deadline, "still allowed after the violation"
        assert error.error.code == BLOCKED_CODE
        data = error.error.data
        assert data["reason"] == "below_min_tier"
        assert data["rule"] == "destructive-tools-need-trust"
        assert data["agent"] == sidecar.agent.did
        assert (data["tier"], data["score"]) == ("probationary", 490)
        assert "policy" in data
        assert upstream.calls["delete_repo"] == 1 + allowed_meanwhile  # the blocked one: never
        listed = sorted(t.name for t in (await client.list_tools()).tools)
        assert listed == ["count", "search"]  # filtered by tier now


async def test_streaming_tool_result_arrives_as_a_stream(sidecar: RunningSidecar) -> None:
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        arrivals.append(loop.time())

    async with Client(f"{sidecar.url}/mcp/tools", mode="legacy") as client:
        started = loop.time()
        result = await client.call_tool("count", {"to": 4}, progress_callback=on_progress)
        finished = loop.time()
    assert result.content[0].text == "counted to 4"  # type: ignore[union-attr]
    assert len(arrivals) == 4
    # The first notification arrived while the tool was still running (not buffered).
    assert arrivals[0] - started < (finished - started) / 2


async def test_header_and_body_must_agree(sidecar: RunningSidecar) -> None:
    body = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "search", "arguments": {"query": "x"}},
    }
    async with httpx.AsyncClient() as client:
        wrong_method = await client.post(
            f"{sidecar.url}/mcp/tools",
            json=body,
            headers={"Mcp-Method": "tools/list", "Accept": "application/json, text/event-stream"},
        )
        wrong_name = await client.post(
            f"{sidecar.url}/mcp/tools",
            json=body,
            headers={
                "Mcp-Method": "tools/call",
                "Mcp-Name": "delete_repo",
                "Accept": "application/json, text/event-stream",
            },
        )
    for response in (wrong_method, wrong_name):
        assert response.status_code == 400
        assert response.json()["error"]["code"] == -32020
        assert response.json()["id"] == 7


async def test_unknown_upstream_and_health(sidecar: RunningSidecar) -> None:
    async with httpx.AsyncClient() as client:
        missing = await client.post(f"{sidecar.url}/mcp/nope", json={"jsonrpc": "2.0"})
        health = await client.get(f"{sidecar.url}/health")
        metrics = (await client.get(f"http://127.0.0.1:{sidecar.metrics_port}/metrics")).text
    assert missing.status_code == 404
    assert health.status_code == 200
    assert health.json()["status"] == "healthy"
    assert sidecar.settings.sidecar_health_file.exists()
    assert 'agentmesh_sidecar_decision_seconds_bucket{le="0.0001"}' in metrics
    assert "agentmesh_sidecar_outbox_depth" in metrics


async def test_http_egress_allow_and_deny(api: Api, sidecar: RunningSidecar) -> None:
    async with httpx.AsyncClient(proxy=sidecar.url) as client:
        allowed = await client.get(f"{api.url}/health")
        denied = await client.get("http://paste.invalid/secret")
        no_rule = await client.get("http://other.invalid/")
    assert allowed.json() == {"status": "healthy"}
    assert denied.status_code == 403
    assert denied.headers["content-type"] == "application/problem+json"
    assert denied.json()["reason"] == "rule_denied"
    assert no_rule.status_code == 403
    assert no_rule.json()["reason"] == "no_rule"
    # CONNECT: a tunnel to an allowed host, a 403 for a denied one.
    host, port = "127.0.0.1", int(api.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    writer.write(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b'{"status":"healthy"}' in await reader.read()
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    writer.write(b"CONNECT paste.invalid:443 HTTP/1.1\r\nHost: paste.invalid:443\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 403")
    writer.close()


async def test_denials_are_reported_to_the_ledger(api: Api, sidecar: RunningSidecar) -> None:
    async with Client(f"{sidecar.url}/mcp/tools", mode="legacy") as client:
        await blocked(client, "secret_tool", {})
    report = await reported(api, sidecar.agent.did, "secret_tool")
    assert report["actor"] == sidecar.agent.did  # signed by the agent's own key
    assert report["body"]["rule"] == "strict:no_rule"
    assert report["body"]["severity"] == "low"


@pytest.mark.parametrize(
    ("mode", "shadow", "expect_blocked"),
    [
        ("strict", False, True),
        ("permissive", False, False),
        ("strict", True, False),
    ],
)
async def test_when_redis_is_down(
    database_url: str,
    ledger_key: SigningKey,
    tmp_path: Path,
    upstream: Upstream,
    mode: str,
    shadow: bool,
    expect_blocked: bool,
) -> None:
    from agentmesh.embedded import EmbeddedRedis as Redis

    redis = Redis(tmp_path / "redis").start()
    try:
        async with running_api(api_settings(database_url, redis, ledger_key)) as api:
            agent = await api.register()
            async with (
                running_sidecar(
                    api,
                    agent,
                    tmp_path,
                    f"tools={upstream.url}",
                    policy=mode,
                    shadow=shadow,
                    staleness=1,
                ) as sidecar,
                Client(f"{sidecar.url}/mcp/tools", mode="legacy") as client,
            ):
                await client.call_tool("search", {"query": "up"})
                redis.stop()
                await asyncio.sleep(2.5)  # past the 1 s staleness bound
                async with httpx.AsyncClient() as http:
                    health = await http.get(f"{sidecar.url}/health")
                assert health.status_code == 503
                if expect_blocked:
                    data = await blocked(client, "search", {"query": "down"})
                    assert data["reason"] in ("trust_stale", "trust_unavailable")
                else:
                    result = await client.call_tool("search", {"query": "down"})
                    assert result.content
    finally:
        redis.stop()


def test_a_bad_policy_file_stops_start_up(tmp_path: Path, database_url: str) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nrules:\n  - id: x\n    tools: [a]\n    efect: allow\n")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")},
        "AGENTMESH_AGENT_PRIVATE_KEY": SigningKey.generate().private_key_pem(),
        "AGENTMESH_API_URL": "http://127.0.0.1:1",
        "AGENTMESH_POLICY_FILE": str(policy),
        "AGENTMESH_STORAGE_BACKEND": "postgres",
        "AGENTMESH_DATABASE_URL": database_url,
    }
    result = subprocess.run(
        [sys.executable, "-m", "agentmesh", "serve", "sidecar"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"agentmesh: error: {policy}:5:")


async def test_peer_handshake_before_the_first_call(
    api: Api, upstream: Upstream, tmp_path: Path
) -> None:
    alice, bob = await api.register(), await api.register()
    async with running_sidecar(api, bob, tmp_path, f"tools={upstream.url}") as bob_sidecar:
        peer = f"peer={upstream.url};did={bob.did};handshake={bob_sidecar.url}"
        async with (
            running_sidecar(api, alice, tmp_path, peer) as alice_sidecar,
            Client(f"{alice_sidecar.url}/mcp/peer", mode="legacy") as client,
        ):
            await client.call_tool("search", {"query": "peer"})
            metrics = (
                await api.client.get(f"http://127.0.0.1:{alice_sidecar.metrics_port}/metrics")
            ).text
            assert 'agentmesh_handshake_total{outcome="verified",reason="ok"} 1.0' in metrics
            await client.call_tool("search", {"query": "again"})  # cached, no new handshake
            events = (
                await api.client.get("/v1/ledger/events", headers=ADMIN, params={"limit": 1000})
            ).json()["items"]
            assert [e["type"] for e in events].count("handshake.completed") == 1
    # A suspended peer fails the handshake: the call is blocked.
    response = await api.client.post(f"/v1/agents/{bob.did}/suspend", headers=ADMIN, json={})
    await api.projected(bob.did, response.json()["position"])
    async with running_sidecar(api, bob, tmp_path, f"tools={upstream.url}") as bob_sidecar:
        peer = f"peer={upstream.url};did={bob.did};handshake={bob_sidecar.url}"
        async with (
            running_sidecar(api, alice, tmp_path, peer) as alice_sidecar,
            Client(f"{alice_sidecar.url}/mcp/peer", mode="legacy") as client,
        ):
            data = await blocked(client, "search", {"query": "peer"})
    assert data["reason"] == "peer_unverified"
    assert data["detail"] == "responder_suspended"


def test_sigterm_drains_in_flight_calls_and_removes_the_liveness_file(
    tmp_path: Path, database_url: str, redis_server: EmbeddedRedis, ledger_key: SigningKey
) -> None:
    """A real `agentmesh serve sidecar` process: a slow call survives SIGTERM."""
    asyncio.run(_drain_scenario(tmp_path, database_url, redis_server, ledger_key))


async def _drain_scenario(
    tmp_path: Path, database_url: str, redis_server: EmbeddedRedis, ledger_key: SigningKey
) -> None:
    settings = api_settings(database_url, redis_server, ledger_key)
    async with running_api(settings) as api, running_upstream() as upstream:
        agent = await api.register()
        policy = tmp_path / "policy.yaml"
        policy.write_text("version: 1\nrules:\n  - id: all\n    tools: ['*']\n    effect: allow\n")
        port, health_file = free_port(), tmp_path / "healthy"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")},
            "AGENTMESH_AGENT_PRIVATE_KEY": agent.key.private_key_pem(),
            "AGENTMESH_API_URL": api.url,
            "AGENTMESH_POLICY_FILE": str(policy),
            "AGENTMESH_POLICY": "strict",
            "AGENTMESH_UPSTREAMS": f"tools={upstream.url}",
            "AGENTMESH_STORAGE_BACKEND": "redis",
            "AGENTMESH_REDIS_HOST": "127.0.0.1",
            "AGENTMESH_REDIS_PORT": str(settings.redis_port),
            "AGENTMESH_REDIS_PREFIX": settings.redis_prefix,
            "AGENTMESH_SIDECAR_HOST": "127.0.0.1",
            "AGENTMESH_SIDECAR_PORT": str(port),
            "AGENTMESH_SIDECAR_METRICS_PORT": "0",
            "AGENTMESH_SIDECAR_HEALTH_FILE": str(health_file),
            "AGENTMESH_SIDECAR_OUTBOX_DIR": str(tmp_path / "outbox"),
        }
        log = (tmp_path / "sidecar.log").open("w")
        process = subprocess.Popen(  # noqa: ASYNC220 -- a real process, waited on below
            [sys.executable, "-m", "agentmesh", "serve", "sidecar"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        log.close()
        try:
            url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient() as http:
                for _ in range(300):
                    try:
                        if (await http.get(f"{url}/health")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.1)
            assert health_file.exists(), (tmp_path / "sidecar.log").read_text()

            async def terminate_soon() -> None:
                await asyncio.sleep(0.5)  # while the 1 s call is in flight
                process.send_signal(signal.SIGTERM)

            terminate = asyncio.create_task(terminate_soon())
            result: Any = None
            # Closing the session needs a new request, which a draining sidecar refuses.
            errors: list[BaseException] = []
            try:
                async with Client(f"{url}/mcp/tools", mode="legacy") as client:
                    result = await client.call_tool("count", {"to": 5})
            except Exception as exc:
                errors.append(exc)
            await terminate
            assert result is not None, f"the in-flight call did not complete: {errors!r}"
            assert result.content[0].text == "counted to 5"
            assert process.wait(timeout=60) == 0
            assert not health_file.exists()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
