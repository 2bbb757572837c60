"""Attacks on the sidecar's MCP gate, each against real servers over real HTTP: the
`mcp` SDK's server upstream, the sidecar in front, raw bodies on the wire. Every
test asserts the upstream never ran the blocked tool."""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp.shared.inbound import encode_header_value

from sidecar.mcp import BLOCKED_CODE, Unparseable, classify
from tests.api_support import Api
from tests.sidecar_support import RunningSidecar, Upstream, running_sidecar

MODERN = "2026-07-28"
LEGACY = "2025-11-25"
ACCEPT = "application/json, text/event-stream"
META = (
    '"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28",'
    '"io.modelcontextprotocol/clientCapabilities":{}}'
)
BLOCKED_TOOL = "secret_tool"  # no rule allows it: strict denies it


@dataclass
class RawMcp:
    """Raw POSTs to one MCP endpoint: 2026-07-28 stateless, or a 2025-11-25 session."""

    http: httpx.AsyncClient
    url: str
    era: str
    session: str | None = None

    @classmethod
    async def open(cls, http: httpx.AsyncClient, url: str, era: str) -> RawMcp:
        raw = cls(http, url, era)
        if era == LEGACY:
            hello = {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {
                    "protocolVersion": LEGACY,
                    "capabilities": {},
                    "clientInfo": {"name": "attacker", "version": "1"},
                },
            }
            answer = await http.post(url, json=hello, headers={"Accept": ACCEPT})
            assert answer.status_code == 200, answer.text
            raw.session = answer.headers["mcp-session-id"]
            done = await raw.post(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
            assert done.status_code == 202, done.text
        return raw

    async def post(
        self, body: bytes, method: str = "tools/call", name: str | None = None
    ) -> httpx.Response:
        headers = {"Accept": ACCEPT, "Content-Type": "application/json"}
        if self.era == MODERN:
            headers |= {"MCP-Protocol-Version": MODERN, "Mcp-Method": method}
            if name is not None:
                headers["Mcp-Name"] = name
        else:
            assert self.session is not None
            headers |= {"MCP-Protocol-Version": LEGACY, "Mcp-Session-Id": self.session}
        return await self.http.post(self.url, content=body, headers=headers)


def call(tool: str, arguments: str, *, era: str, method: str = "tools/call") -> str:
    meta = f",{META}" if era == MODERN else ""
    return (
        f'{{"jsonrpc":"2.0","id":7,"method":"{method}",'
        f'"params":{{"name":"{tool}","arguments":{arguments}{meta}}}}}'
    )


def rpc_error(response: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC error of a JSON answer or of the first SSE event carrying one."""
    text = response.text
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
        text = next(line for line in lines if '"error"' in line or '"result"' in line)
    message: dict[str, Any] = json.loads(text)
    error: dict[str, Any] = message.get("error") or {}
    return error


def bypass(case: str, era: str) -> bytes:
    """The issue's bypass bodies (and their kin) for ``era``."""
    bodies = {
        "NaN": call(BLOCKED_TOOL, '{"command":"x","x":NaN}', era=era),
        "Infinity": call(BLOCKED_TOOL, '{"x":Infinity}', era=era),
        "-Infinity": call(BLOCKED_TOOL, '{"x":-Infinity}', era=era),
        "1e999": call(BLOCKED_TOOL, '{"x":1e999}', era=era),
        "batch": "[" + call(BLOCKED_TOOL, "{}", era=era) + "]",
        "duplicate name": call("search", "{}", era=era).replace(
            '"name":"search"', f'"name":"search","name":"{BLOCKED_TOOL}"'
        ),
        "duplicate method": call(BLOCKED_TOOL, "{}", era=era, method="ping").replace(
            '"method":"ping"', '"method":"ping","method":"tools/call"'
        ),
        "BOM": "\ufeff" + call(BLOCKED_TOOL, "{}", era=era),
    }
    return bodies[case].encode()


BYPASSES = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "batch",
    "duplicate name",
    "duplicate method",
    "BOM",
]


@pytest.mark.parametrize("era", [MODERN, LEGACY])
@pytest.mark.parametrize("case", BYPASSES)
async def test_bypass_bodies_are_refused_and_never_reach_the_upstream(
    sidecar: RunningSidecar, upstream: Upstream, era: str, case: str
) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        raw = await RawMcp.open(http, f"{sidecar.url}/mcp/tools", era)
        answer = await raw.post(bypass(case, era), name=BLOCKED_TOOL)
    assert answer.status_code == 400, answer.text
    assert rpc_error(answer)["code"] in (-32700, -32600, -32602)
    assert BLOCKED_TOOL not in upstream.calls


@pytest.mark.parametrize("era", [MODERN, LEGACY])
async def test_the_same_bodies_do_run_the_tool_straight_at_the_upstream(
    upstream: Upstream, era: str
) -> None:
    """The bypasses are real: the SDK server parses these and runs the tool."""
    async with httpx.AsyncClient(timeout=10) as http:
        raw = await RawMcp.open(http, upstream.url, era)
        for case in ("NaN", "Infinity", "1e999", "duplicate name"):
            await raw.post(bypass(case, era), name=BLOCKED_TOOL)
    assert upstream.calls.get(BLOCKED_TOOL, 0) == 4


@pytest.mark.parametrize("era", [MODERN, LEGACY])
async def test_unicode_escapes_decode_to_the_tool_the_upstream_would_run(
    sidecar: RunningSidecar, upstream: Upstream, era: str
) -> None:
    escaped = call("secret\\u005ftool", "{}", era=era, method="tools\\u002fcall")
    async with httpx.AsyncClient(timeout=10) as http:
        raw = await RawMcp.open(http, f"{sidecar.url}/mcp/tools", era)
        answer = await raw.post(escaped.encode(), name=BLOCKED_TOOL)
    assert answer.status_code == 200
    assert rpc_error(answer)["code"] == BLOCKED_CODE
    assert rpc_error(answer)["data"]["tool"] == BLOCKED_TOOL
    assert BLOCKED_TOOL not in upstream.calls


async def test_non_ascii_mcp_name_header_is_decoded_as_the_sdk_encodes_it(
    sidecar: RunningSidecar, upstream: Upstream
) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        raw = await RawMcp.open(http, f"{sidecar.url}/mcp/tools", MODERN)
        body = call("search", '{"query":"x"}', era=MODERN).encode()
        encoded = await raw.post(body, name="=?base64?c2VhcmNo?=")  # "search"
        wrong = await raw.post(body, name="=?base64?ZGVsZXRlX3JlcG8=?=")  # "delete_repo"
        twice = await http.post(
            f"{sidecar.url}/mcp/tools",
            content=body,
            headers=[
                ("Accept", ACCEPT),
                ("MCP-Protocol-Version", MODERN),
                ("Mcp-Method", "tools/call"),
                ("Mcp-Name", "search"),
                ("Mcp-Name", BLOCKED_TOOL),
            ],
        )
    assert encoded.status_code == 200, encoded.text
    assert upstream.calls["search"] == 1
    for refused in (wrong, twice):
        assert refused.status_code == 400
        assert rpc_error(refused)["code"] == -32020
    assert upstream.calls["search"] == 1


# -- the differential test: the sidecar decides on what the SDK server would run ----------

METHODS = ["tools/call", "tools\\/call", "tools\\u002fcall", "\\u0074ools/call", "Tools/call"]
NAMES = ["search", BLOCKED_TOOL, "secret\\u005ftool", "\\u0073earch", "search\\u0000"]
VALUES = ['"x"', "NaN", "Infinity", "-Infinity", "1e999", "-1E400", "12", '"\\ud800"', "1.5e3"]
PREFIXES = ["", "\ufeff", " ", "\t\r\n", "\x0c", "\u00a0", "\u2028"]
SUFFIXES = ["", " ", "\n", "\x0b", "\u3000"]


def unescape(text: str) -> str:
    decoded: str = json.loads(f'"{text}"')
    return decoded


def generated_body(rng: random.Random, era: str) -> tuple[bytes, str, str]:
    """A body, the method and the tool name it announces in its headers."""
    method, name = rng.choice(METHODS), rng.choice(NAMES)
    key = "query" if unescape(name) == "search" else "x"
    value = rng.choice(VALUES) if rng.randrange(2) else '"x"'
    arguments = f'{{"{key}":{value}}}'
    body = call(name, arguments, era=era, method=method)
    announced = unescape(name)
    twist = rng.randrange(6)
    if twist == 1:  # a duplicate name: which one wins differs between parsers
        other = rng.choice(NAMES)
        body = body.replace(f'"name":"{name}"', f'"name":"{name}","name":"{other}"')
        announced = unescape(other)
    elif twist == 2:
        body = body.replace('"params":', '"params":{"name":"search"},"params":', 1)
    elif twist == 3:
        body = f"[{body}]"
    elif twist == 4:
        body = body.replace('"jsonrpc":"2.0"', '"jsonrpc" : "2.0" ', 1)
    # Half of them plain, so that many reach a tool.
    prefix = rng.choice(PREFIXES) if rng.randrange(2) else ""
    suffix = rng.choice(SUFFIXES) if rng.randrange(2) else ""
    text = prefix + body + suffix
    encoding = "utf-16" if rng.randrange(12) == 0 else "utf-8"
    return text.encode(encoding, "surrogatepass"), unescape(method), announced


@pytest.mark.parametrize("era", [MODERN, LEGACY])
async def test_differential_against_the_sdk_servers_parsing(
    sidecar: RunningSidecar, upstream: Upstream, era: str
) -> None:
    """For generated bodies: whenever the SDK server (straight) ran tool X, the sidecar's
    classification is a tools/call of X; through the sidecar, the blocked tool never runs."""
    rng = random.Random(f"differential-{era}")
    ran_somewhere = refused_but_valid = 0
    async with httpx.AsyncClient(timeout=10) as http:
        direct = await RawMcp.open(http, upstream.url, era)
        relayed = await RawMcp.open(http, f"{sidecar.url}/mcp/tools", era)
        for _ in range(200):
            body, method, name = generated_body(rng, era)
            before = dict(upstream.calls)
            header = encode_header_value(name)  # as the SDK's client sends it
            await direct.post(body, method=method, name=header)
            ran = [tool for tool, n in upstream.calls.items() if n != before.get(tool, 0)]
            try:
                classified = classify(body)
            except Unparseable:
                classified = None
            if ran:
                ran_somewhere += 1
                # Decided on exactly that tool, or refused (fail closed).
                assert classified is None or [classified.tool] == ran, (body, ran)
                refused_but_valid += classified is None
            before = dict(upstream.calls)
            await relayed.post(body, method=method, name=header)
            ran = [tool for tool, n in upstream.calls.items() if n != before.get(tool, 0)]
            if ran:  # through the sidecar: only what it decided on, and allowed
                assert classified is not None, (body, ran)
                assert ran == [classified.tool] == ["search"], (body, ran)
    assert ran_somewhere > 10  # the generator reaches tools, not only parse errors
    assert refused_but_valid < ran_somewhere  # non-standard JSON (BOM, UTF-16, NaN …) only


@pytest.mark.parametrize(("mode", "shadow"), [("permissive", False), ("strict", True)])
async def test_permissive_and_shadow_forward_an_unparseable_body_and_record_it(
    api: Api, upstream: Upstream, tmp_path: Path, mode: str, shadow: bool
) -> None:
    agent = await api.register()
    async with running_sidecar(
        api, agent, tmp_path, f"tools={upstream.url}", policy=mode, shadow=shadow
    ) as sidecar:
        async with httpx.AsyncClient(timeout=10) as http:
            raw = await RawMcp.open(http, f"{sidecar.url}/mcp/tools", MODERN)
            answer = await raw.post(bypass("NaN", MODERN), name=BLOCKED_TOOL)
        assert answer.status_code == 200, answer.text
        assert upstream.calls[BLOCKED_TOOL] == 1  # forwarded: the upstream's parser took it
        for _ in range(400):
            events = (await api.client.get(f"/v1/agents/{agent.did}/events")).json()["items"]
            rules = [e["body"]["rule"] for e in events if e["type"] == "policy.violation"]
            if rules:
                break
            await asyncio.sleep(0.05)
    assert rules == [f"{mode}:unparseable"]
