"""Tracing (OTLP) and structured logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentmesh.embedded import EmbeddedRedis, free_port
from api.telemetry import setup_tracing
from ledger.identity import SigningKey
from tests.api_support import ADMIN, api_settings, running_api

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def tracer_provider() -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)


async def test_requests_and_ledger_appends_are_traced(
    database_url: str, redis_server: EmbeddedRedis, ledger_key: SigningKey
) -> None:
    EXPORTER.clear()
    async with running_api(api_settings(database_url, redis_server, ledger_key)) as api:
        agent = SigningKey.generate()
        response = await api.client.post(
            "/v1/agents", headers=ADMIN, json={"public_key": agent.public.pem()}
        )
        assert response.status_code == 201
        await api.client.get(f"/v1/agents/{agent.did}/trust")
    names = [span.name for span in EXPORTER.get_finished_spans()]
    assert "POST /v1/agents" in names
    assert "GET /v1/agents/{did}/trust" in names  # the template, not the raw path
    append = next(s for s in EXPORTER.get_finished_spans() if s.name == "ledger.append")
    request = next(s for s in EXPORTER.get_finished_spans() if s.name == "POST /v1/agents")
    assert append.parent is not None
    assert append.parent.span_id == request.context.span_id
    assert append.attributes is not None
    position = append.attributes["ledger.position"]
    assert isinstance(position, int)
    assert position >= 1


def test_an_unreachable_collector_never_breaks_requests() -> None:
    """The OTLP exporter runs on a background thread with a bounded queue; with
    nothing listening, spans are dropped and the caller is not blocked."""
    provider = setup_tracing(f"http://127.0.0.1:{free_port()}", "agentmesh-test")
    tracer = provider.get_tracer("test")
    for index in range(2000):  # more than fits in one export batch
        with tracer.start_as_current_span(f"span-{index}"):
            pass
    provider.shutdown()


def test_json_logs(database_url: str, redis_server: EmbeddedRedis) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")},
        "AGENTMESH_DATABASE_URL": database_url,
        "AGENTMESH_STORAGE_BACKEND": "redis",
        "AGENTMESH_REDIS_HOST": redis_server.host,
        "AGENTMESH_REDIS_PORT": str(redis_server.port),
        "AGENTMESH_REDIS_PREFIX": f"l{uuid.uuid4().hex[:8]}:",
        "AGENTMESH_PROJECTOR_METRICS_PORT": "0",
        "AGENTMESH_LOG_FORMAT": "json",
        "AGENTMESH_LOG_LEVEL": "INFO",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "agentmesh", "serve", "projector"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    lines = []
    for raw in process.stderr:  # every line is one JSON object
        lines.append(json.loads(raw))
        if lines[-1]["event"] == "projector_leader":
            break
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=30)
    assert process.returncode == 0
    lines += [json.loads(line) for line in rest.strip().splitlines()]
    assert any(line["event"] == "projector_leader" for line in lines)
    assert all({"time", "level", "logger", "event"} <= set(line) for line in lines)
