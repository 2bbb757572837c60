"""Egress by address, not by spelling: every spelling of a denied address, CIDR rules,
a name resolving to a denied address, and link-local denied by default — through a
real sidecar, against a real origin server that counts its connections."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sidecar.policy import Action, Mode, RateLimiter, TrustInfo, decide, ip_literal, parse_policy
from tests.api_support import Api
from tests.sidecar_support import running_sidecar

SPELLINGS = [
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f000001",
    "0x7f.0.0.1",
    "127.0.1",
    "0177.0.0.1",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
]


@dataclass
class Origin:
    """A plain HTTP origin on 127.0.0.1 that records each request head it gets."""

    port: int = 0
    heads: list[bytes] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\norigin")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.heads.append(b"")  # a tunnel: connected, no request of its own
        finally:
            writer.close()


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    found = Origin()
    server = await asyncio.start_server(found.serve, "127.0.0.1", 0)
    found.port = server.sockets[0].getsockname()[1]
    async with server:
        yield found


def policy(deny: str) -> str:
    return f"""\
version: 1
rules:
  - id: tools
    tools: ["search"]
    effect: allow
  - id: no-loopback
    hosts: ["{deny}"]
    effect: deny
  - id: anything-else
    hosts: ["*"]
    effect: allow
"""


async def exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()


def test_every_spelling_is_one_address() -> None:
    for spelling in SPELLINGS:
        assert ip_literal(spelling) == ipaddress.IPv4Address("127.0.0.1"), spelling
    assert ip_literal("[::1]:8080") == ipaddress.IPv6Address("::1")
    assert ip_literal("example.com") is None
    assert ip_literal("0xdeadbeef") == ipaddress.IPv4Address("222.173.190.239")
    assert ip_literal("127.0.0.1 evil") is None  # inet_aton's trailing text is not a host


@pytest.mark.parametrize("deny", ["127.0.0.1", "127.0.0.0/8", "::ffff:127.0.0.0/104", "127.1"])
async def test_a_denied_address_is_denied_in_every_spelling(
    api: Api, origin: Origin, tmp_path: Path, deny: str
) -> None:
    agent = await api.register()
    async with running_sidecar(
        api, agent, tmp_path, "", policy="standard", policy_text=policy(deny)
    ) as sidecar:
        for spelling in [*SPELLINGS, "localhost"]:  # localhost: a name resolving to it
            target = f"{spelling}:{origin.port}"
            got = await exchange(
                sidecar.port, f"GET http://{target}/x HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
            )
            assert got.startswith(b"HTTP/1.1 403"), (spelling, got)
            got = await exchange(
                sidecar.port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
            )
            assert got.startswith(b"HTTP/1.1 403"), (spelling, got)
    assert origin.heads == []  # not one connection reached the origin


async def test_the_connection_goes_to_the_checked_address(
    api: Api, origin: Origin, tmp_path: Path
) -> None:
    """Allowed by address only (no name rule): the name is resolved once, the address
    checked, and that address connected to; the origin still sees the agent's Host."""
    text = """\
version: 1
rules:
  - id: loopback-only
    hosts: ["127.0.0.0/8"]
    effect: allow
"""
    agent = await api.register()
    async with running_sidecar(api, agent, tmp_path, "", policy_text=text) as sidecar:
        for spelling in ("localhost", "127.1", "0x7f000001"):
            target = f"{spelling}:{origin.port}"
            got = await exchange(
                sidecar.port, f"GET http://{target}/x HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
            )
            assert got.startswith(b"HTTP/1.1 200"), (spelling, got)
        denied = await exchange(
            sidecar.port, b"GET http://10.1.2.3/ HTTP/1.1\r\nHost: 10.1.2.3\r\n\r\n"
        )
    assert denied.startswith(b"HTTP/1.1 403")
    hosts = [h.split(b"\r\nhost: ", 1)[1].split(b"\r\n")[0] for h in origin.heads]
    assert hosts == [f"{s}:{origin.port}".encode() for s in ("localhost", "127.1", "0x7f000001")]


@pytest.mark.parametrize("mode", ["strict", "standard"])
async def test_link_local_is_denied_by_default(api: Api, tmp_path: Path, mode: str) -> None:
    text = 'version: 1\nrules:\n  - id: all\n    hosts: ["*"]\n    effect: allow\n'
    agent = await api.register()
    async with running_sidecar(api, agent, tmp_path, "", policy=mode, policy_text=text) as sidecar:
        for target in ("169.254.169.254", "0xa9fea9fe", "[fe80::1]", "[::ffff:169.254.169.254]"):
            got = await exchange(
                sidecar.port,
                f"GET http://{target}/latest HTTP/1.1\r\nHost: {target}\r\n\r\n".encode(),
            )
            assert got.startswith(b"HTTP/1.1 403"), (target, got)


STAR = 'version: 1\nrules:\n  - id: all\n    hosts: ["*"]\n    effect: allow\n'
NAMED = 'version: 1\nrules:\n  - id: md\n    hosts: ["169.254.169.254/32"]\n    effect: allow\n'


@pytest.mark.parametrize("mode", ["strict", "standard"])
def test_link_local_is_reachable_only_when_an_allow_rule_names_it(mode: Mode) -> None:
    trust = TrustInfo("did:mesh:" + "a" * 32, 800, "trusted", "active", frozenset(), 0.0)
    metadata = Action("host", "169.254.169.254")
    star, named = parse_policy(STAR, "p", mode, False), parse_policy(NAMED, "p", mode, False)
    denied = decide(star, metadata, trust, trust.did, RateLimiter(), 0.0)
    assert (denied.allowed, denied.reason, denied.severity) == (False, "link_local", "high")
    assert decide(named, metadata, trust, trust.did, RateLimiter(), 0.0).allowed


def test_permissive_records_link_local_but_does_not_block() -> None:
    trust = TrustInfo("did:mesh:" + "a" * 32, 800, "trusted", "active", frozenset(), 0.0)
    metadata = Action("host", "169.254.169.254")
    permissive = parse_policy("version: 1\nrules: []\n", "p", "permissive", False)
    recorded = decide(permissive, metadata, trust, trust.did, RateLimiter(), 0.0)
    assert (recorded.allowed, recorded.enforced, recorded.reason) == (True, False, "link_local")
