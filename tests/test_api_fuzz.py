"""Property-based fuzzing of the API from its own OpenAPI document (schemathesis).

For every operation, generated requests (with and without the admin token)
must never produce a 5xx; every 4xx must be an RFC 9457 problem document; a
rejected request must append nothing to the ledger; and every response must
conform to the document (schemathesis' status code, content type, headers and
response schema checks): the document tells the truth about errors too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from agentmesh.embedded import EmbeddedRedis, free_port
from ledger.identity import SigningKey
from tests.api_support import ADMIN, ADMIN_TOKEN
from tests.test_serve import wait_http

CONFORMANCE = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def server(postgres: Any, redis_server: EmbeddedRedis) -> Iterator[str]:
    import asyncio

    import asyncpg

    name = "fuzz_" + uuid.uuid4().hex[:8]

    async def create() -> None:
        conn = await asyncpg.connect(postgres.url)
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE ledger_template")
        await conn.close()

    asyncio.run(create())
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")},
        "AGENTMESH_DATABASE_URL": postgres.url.rsplit("/", 1)[0] + "/" + name,
        "AGENTMESH_STORAGE_BACKEND": "redis",
        "AGENTMESH_REDIS_HOST": redis_server.host,
        "AGENTMESH_REDIS_PORT": str(redis_server.port),
        "AGENTMESH_REDIS_PREFIX": f"f{uuid.uuid4().hex[:8]}:",
        "AGENTMESH_AGENT_PRIVATE_KEY": SigningKey.generate().private_key_pem(),
        "AGENTMESH_ADMIN_TOKEN": ADMIN_TOKEN,
        "AGENTMESH_API_PROJECTOR": "true",
        "AGENTMESH_API_HOST": "127.0.0.1",
        "AGENTMESH_API_PORT": str(port),
        "AGENTMESH_METRICS_PORT": "0",
        "AGENTMESH_LOG_LEVEL": "ERROR",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "agentmesh", "serve", "api"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/ready")
        # Something to find: two agents, so generated DIDs sometimes hit real ones.
        for _ in range(2):
            key = SigningKey.generate()
            httpx.post(f"{url}/v1/agents", headers=ADMIN, json={"public_key": key.public.pem()})
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def _operations(url: str) -> list[Any]:
    document = httpx.get(f"{url}/schema/openapi.json").json()
    schema = schemathesis.openapi.from_dict(document)
    return [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]


def _head(url: str) -> int:
    position: int = httpx.get(f"{url}/v1/ledger/head").json()["position"]
    return position


def test_no_5xx_every_4xx_a_problem_nothing_appended_on_rejection(server: str) -> None:
    operations = _operations(server)
    assert len(operations) >= 20
    with httpx.Client(base_url=server, timeout=30) as client:
        for operation in operations:
            _fuzz(client, server, operation)


def _fuzz(client: httpx.Client, url: str, operation: Any) -> None:
    @settings(
        max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=operation.as_strategy(), admin=st.booleans())
    def check(case: Any, admin: bool) -> None:
        before = _head(url)
        headers = {**(case.headers or {}), **(ADMIN if admin else {})}
        kwargs = case.as_transport_kwargs(base_url=url, headers=headers)
        kwargs.pop("url", None)
        method = kwargs.pop("method")
        response = client.request(
            method,
            case.formatted_path,
            params=kwargs.get("params"),
            headers=kwargs.get("headers"),
            json=kwargs.get("json"),
            content=kwargs.get("data"),
        )
        label = f"{method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
        assert response.status_code < 500, label
        case.validate_response(response, checks=CONFORMANCE, headers=headers)
        if response.status_code >= 400:
            assert response.headers["content-type"].startswith("application/problem+json"), label
            body = response.json()
            assert body["status"] == response.status_code, label
            assert {"type", "title", "detail"} <= set(body), label
            assert _head(url) == before, f"a rejected request appended: {label}"

    check()


def test_the_document_describes_problems_and_security(server: str) -> None:
    document = httpx.get(f"{server}/schema/openapi.json").json()
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    problem = document["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "detail", "instance"} <= set(problem["properties"])
    for path, item in document["paths"].items():
        for operation in item.values():
            for code, answer in operation["responses"].items():
                if code.startswith(("4", "5")):
                    assert list(answer["content"]) == ["application/problem+json"], (path, code)
    suspend = document["paths"]["/v1/agents/{did}/suspend"]["post"]
    assert {"401", "403", "404"} <= set(suspend["responses"])
    assert suspend["security"] == [{"bearerAuth": []}]
    violations = document["paths"]["/v1/violations"]["post"]["requestBody"]
    shapes = violations["content"]["application/json"]["schema"]["oneOf"]
    assert [s["$ref"].rsplit("/", 1)[1] for s in shapes] == ["SignedViolation", "AdminViolation"]
    signed = document["components"]["schemas"]["SignedViolation"]["properties"]["body"]
    assert signed["$ref"].endswith("/PolicyViolation")


def test_swagger_ui_is_served_from_the_package(server: str) -> None:
    page = httpx.get(f"{server}/schema/swagger").text
    assets = [a for a in page.split('"') + page.split("'") if "swagger-ui" in a and "/" in a]
    assert assets
    assert not [a for a in assets if a.startswith(("http:", "https:", "//"))], assets
    script = httpx.get(f"{server}/schema/assets/swagger-ui-bundle.js")
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert "cdn." not in page


HOSTILE_BODIES = [
    b"[" * 20_000 + b"]" * 20_000,  # nested far past any recursion limit
    b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
    b"{",
    b'{"body": {"type": "policy.violation"}, "signature": 1}',
    b"\xff\xfe\x00",
    b'{"x": NaN}',
    b'{"x": 1e999}',
    b"null",
    b'"' + b"a" * 100_000 + b'"',
]


def test_hostile_bodies_on_every_operation_are_4xx_and_append_nothing(server: str) -> None:
    """Deeply nested and malformed bodies on every operation that takes a body, with and
    without the admin token: a problem document, never a 5xx, never an append."""
    document = httpx.get(f"{server}/schema/openapi.json").json()
    did = "did:mesh:" + "0" * 32
    with httpx.Client(base_url=server, timeout=30) as client:
        for template, item in document["paths"].items():
            path = (
                template.replace("{did}", did)
                .replace("{grant_id}", "grant-fuzz-01")
                .replace("{handshake_id}", "hs_" + "0" * 24)
            )
            for method in item:
                if method not in ("post", "put", "patch", "delete"):
                    continue
                for body in HOSTILE_BODIES:
                    for headers in ({}, ADMIN):
                        before = _head(server)
                        response = client.request(
                            method.upper(),
                            path,
                            content=body,
                            headers={**headers, "content-type": "application/json"},
                        )
                        label = f"{method} {path} {body[:20]!r} -> {response.status_code}"
                        assert 400 <= response.status_code < 500, label
                        assert response.headers["content-type"].startswith(
                            "application/problem+json"
                        ), label
                        assert _head(server) == before, label
