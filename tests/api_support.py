"""A real API server for tests: uvicorn on a random port, real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
import uvicorn

from agentmesh.embedded import EmbeddedRedis, free_port
from agentmesh.services import api_app
from agentmesh.settings import Settings
from ledger.canonical import canonical_bytes
from ledger.events import AgentKeyRotated, Event, body_of, new_event_id
from ledger.identity import SigningKey, b64encode
from ledger.signed import SignedEvent
from ledger.timefmt import format_time
from tests.support import Agent, ManualClock

ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class Api:
    url: str
    client: httpx.AsyncClient
    clock: ManualClock
    settings: Settings

    async def register(
        self, capabilities: tuple[str, ...] = (), sponsor: str | None = None
    ) -> Agent:
        agent = Agent(capabilities=capabilities)
        response = await self.client.post(
            "/v1/agents",
            headers=ADMIN,
            json={
                "public_key": agent.key.public.pem(),
                "capabilities": list(capabilities),
                "sponsor": sponsor,
                "metadata": {"team": "test"},
            },
        )
        assert response.status_code == 201, response.text
        assert response.json()["did"] == agent.did
        await self.projected(agent.did)
        return agent

    async def projected(self, did: str, position: int | None = None) -> dict[str, Any]:
        """Wait until the projection reflects ``did`` (at ``position`` or later)."""
        for _ in range(400):
            response = await self.client.get(f"/v1/agents/{did}/trust")
            if response.status_code == 200 and (
                position is None or response.json()["position"] >= position
            ):
                body: dict[str, Any] = response.json()
                return body
            await asyncio.sleep(0.01)
        raise AssertionError(f"{did} never projected (at {position})")

    async def head(self) -> int:
        position: int = (await self.client.get("/v1/ledger/head")).json()["position"]
        return position


def signed(event: Event, key: SigningKey, idempotency_key: str | None = None) -> dict[str, Any]:
    """What a client sends: the body it signed (with a fresh ``event_id`` unless the
    event has one) and the base64 signature."""
    if event.event_id is None:
        event = msgspec.structs.replace(event, event_id=new_event_id())
    body = body_of(event)
    payload: dict[str, Any] = {
        "body": body,
        "signature": b64encode(key.sign(canonical_bytes(body))),
    }
    if idempotency_key is not None:
        payload["idempotency_key"] = idempotency_key
    return payload


def signed_rotation(event: AgentKeyRotated, current: SigningKey, new: SigningKey) -> dict[str, Any]:
    """A key rotation as a client sends it: signed by ``current``, proved by ``new``."""
    rotation = SignedEvent.rotation(event, current, new)
    return {"body": msgspec.json.decode(rotation.body), "signature": b64encode(rotation.signature)}


def handshake_request(
    initiator: Agent, responder: str, now: datetime, min_score: int | None = None
) -> dict[str, Any]:
    """A handshake start signed by the initiator."""
    body: dict[str, Any] = {
        "type": "agentmesh.handshake.request",
        "initiator": initiator.did,
        "responder": responder,
        "request_id": new_event_id(),
        "requested_at": format_time(now),
    }
    if min_score is not None:
        body["min_score"] = min_score
    return {"body": body, "signature": b64encode(initiator.key.sign(canonical_bytes(body)))}


def api_settings(
    database_url: str, redis: EmbeddedRedis, ledger_key: SigningKey, **extra: str
) -> Settings:
    return Settings.from_env(
        {
            "AGENTMESH_DATABASE_URL": database_url,
            "AGENTMESH_STORAGE_BACKEND": "redis",
            "AGENTMESH_REDIS_HOST": redis.host,
            "AGENTMESH_REDIS_PORT": str(redis.port),
            "AGENTMESH_REDIS_PREFIX": f"api{uuid.uuid4().hex[:8]}:",
            "AGENTMESH_AGENT_PRIVATE_KEY": ledger_key.private_key_pem(),
            "AGENTMESH_ADMIN_TOKEN": ADMIN_TOKEN,
            "AGENTMESH_API_PROJECTOR": "true",
            "AGENTMESH_LOG_LEVEL": "WARNING",
            **extra,
        }
    )


@asynccontextmanager
async def running_api(
    settings: Settings, clock: ManualClock | None = None, port: int | None = None
) -> AsyncIterator[Api]:
    clock = clock or ManualClock(now=datetime.now(UTC))
    app = api_app(settings, clock=clock)
    port = port or free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_config=None, lifespan="on", access_log=False
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(500):
            if server.started:
                break
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield Api(url, client, clock, settings)
    finally:
        server.should_exit = True
        await task
